"""Every bad input to ``bkn export`` / ``bkn demo`` is one clear line and the rule's exit code.

Specification (README, "Exit codes"; :mod:`bkn_export.commands.exit_codes`): 0 success;
1 the command ran and found a problem with the model (it cannot be exported: an
unsupported layer, non-finite weights, a dynamic-spatial file that does not run at other
sizes); 2 the command could not do its job because of its input or environment (missing,
corrupt or wrong-kind files, bad options or names, an unloadable factory or checkpoint, an
unwritable path, a full disk). The message is one line on stderr naming the problem; never
a traceback; no file is left at the output path.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_hardening_faults import fill_disk_after
from torch import nn

from bkn_export.cli import main
from bkn_export.commands.exit_codes import EXIT_BAD_INPUT, EXIT_MODEL_PROBLEM, error_line, exit_code_for, run_command
from bkn_export.errors import (
    BKNInputError,
    CheckpointError,
    ExportError,
    FactoryError,
    FoldError,
    InvalidStatisticsError,
    ModelFileError,
    NonFiniteWeightsError,
    OptionError,
    OutputWriteError,
    PluginLibraryNotFoundError,
    RuntimeLoadError,
    UnsupportedLayerError,
)
from runtime.errors import ParityMismatchError, RuntimeExecutionError, SavedDataError, UnknownRuntimeError

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from bkn_export import BatchKalmanNorm2d

    def small():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def pair():
        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3, padding=1)
            def forward(self, image, mask):
                return self.conv(image) * mask
        return Pair()

    def flatten_linear():
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))

    def batch_statistics_only():
        return nn.Sequential(nn.Conv2d(1, 4, 1), BatchKalmanNorm2d(4, track_running_stats=False))

    def converted_chain():
        import bkn_export
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        )
        return bkn_export.convert_batchnorm(model.eval(), torch.randn(2, 1, 8, 8))

    def converted_chain_at(size=8):
        import bkn_export
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        )
        return bkn_export.convert_batchnorm(model.eval(), torch.randn(2, 1, size, size))

    def nan_weight():
        model = small()
        with torch.no_grad():
            model[0].weight[1, 0, 2, 2] = float("nan")
        return model
    """
)


@pytest.fixture
def models(tmp_path: Path) -> str:
    """Path of a .py file with small factories (spec prefix ``<path>:``)."""
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return str(path)


def export_argv(spec: str, out: Path, *extra: str, shape: str = "1,1,8,8") -> list[str]:
    return ["export", spec, "--input-shape", shape, "-o", str(out), *extra]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr) of ``bkn argv``; argparse usage errors count as their SystemExit code."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


def assert_one_line(stderr: str, *fragments: str) -> None:
    """The failure is reported on one line (argparse adds its usage line first), no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------- the rule itself


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UnsupportedLayerError("x"), EXIT_MODEL_PROBLEM),
        (InvalidStatisticsError("x"), EXIT_MODEL_PROBLEM),
        (NonFiniteWeightsError("x"), EXIT_MODEL_PROBLEM),
        (FoldError("x"), EXIT_MODEL_PROBLEM),
        (ExportError("x"), EXIT_MODEL_PROBLEM),
        (ParityMismatchError("x"), EXIT_MODEL_PROBLEM),
        (RuntimeExecutionError("x"), EXIT_MODEL_PROBLEM),
        (BKNInputError("x"), EXIT_BAD_INPUT),
        (OptionError("x"), EXIT_BAD_INPUT),
        (FactoryError("x"), EXIT_BAD_INPUT),
        (CheckpointError("x"), EXIT_BAD_INPUT),
        (ModelFileError("x"), EXIT_BAD_INPUT),
        (UnknownRuntimeError("x"), EXIT_BAD_INPUT),
        (SavedDataError("x"), EXIT_BAD_INPUT),
        (RuntimeLoadError("x"), EXIT_BAD_INPUT),
        (PluginLibraryNotFoundError("x"), EXIT_BAD_INPUT),
        (OutputWriteError("x"), EXIT_BAD_INPUT),
        (OSError(errno.ENOSPC, "No space left on device"), EXIT_BAD_INPUT),
        (MemoryError(), EXIT_BAD_INPUT),
    ],
)
def test_each_error_class_maps_to_the_rule(error: Exception, code: int) -> None:
    assert exit_code_for(error) == code


def test_a_class_declares_its_own_code_where_it_is_defined() -> None:
    class RuntimeSpecific(Exception):  # e.g. an error class that lives in runtime/
        exit_code = 1

    class Narrower(OutputWriteError):
        exit_code = 1

    assert exit_code_for(RuntimeSpecific()) == 1
    assert exit_code_for(Narrower("x")) == 1  # the class's own declaration beats its base's table entry


def test_an_unknown_error_is_a_bug_and_keeps_its_traceback() -> None:
    def buggy() -> int:
        raise KeyError("not covered by the rule")

    assert exit_code_for(KeyError("x")) is None
    with pytest.raises(KeyError):
        run_command("export", buggy)


def test_run_command_prints_one_line_and_returns_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    def fails() -> int:
        raise CheckpointError("checkpoint c.pt does not exist\nsecond line of detail")

    assert run_command("export", fails) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (
        "bkn export: CheckpointError: checkpoint c.pt does not exist; second line of detail\n"
    )
    assert error_line("demo", MemoryError()).startswith("bkn demo: MemoryError: out of memory")


# --------------------------------------------------------------------------- bkn export: input (exit 2)


def test_factory_file_with_a_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "broken.py"
    source.write_text("def build(:\n    pass\n")
    code, err = run_cli(export_argv(f"{source}:build", tmp_path / "m.onnx"), capsys)
    assert code == 2
    assert_one_line(err, "FactoryError", "SyntaxError", "broken.py, line 1")
    assert not (tmp_path / "m.onnx").exists()


def test_factory_file_raising_at_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "raises.py"
    source.write_text("raise RuntimeError('no GPU found')\n")
    code, err = run_cli(export_argv(f"{source}:build", tmp_path / "m.onnx"), capsys)
    assert code == 2
    assert_one_line(err, "FactoryError", "raises.py", "RuntimeError: no GPU found")


def test_module_raising_a_non_import_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raising_module_for_bkn_test.py").write_text("raise ValueError('bad config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run_cli(export_argv("raising_module_for_bkn_test:build", tmp_path / "m.onnx"), capsys)
    assert code == 2
    assert_one_line(err, "module 'raising_module_for_bkn_test'", "ValueError: bad config")


def test_checkpoint_that_is_a_directory(tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ckpt").mkdir()
    argv = export_argv(f"{models}:small", tmp_path / "m.onnx", "--checkpoint", str(tmp_path / "ckpt"))
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "CheckpointError", "is a directory")


def test_corrupt_checkpoint(tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated zip")
    argv = export_argv(f"{models}:small", tmp_path / "m.onnx", "--checkpoint", str(tmp_path / "ckpt.pt"))
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "CheckpointError", "is truncated or damaged")


def test_huge_input_shape_is_refused_before_allocating(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(export_argv(f"{models}:small", tmp_path / "m.onnx", shape="1000000000,1,224,224"), capsys)
    assert code == 2
    assert_one_line(err, "OptionError", "GiB for the example alone")


@pytest.mark.parametrize("value", ["-5", "1.5", "lots"])
def test_external_data_threshold_must_be_a_nonnegative_integer(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    argv = export_argv(f"{models}:small", tmp_path / "m.onnx", "--external-data-threshold", value)
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "--external-data-threshold", "an integer >= 0")


@pytest.mark.parametrize("value", ["20.7", "17", "24"])
def test_opset_must_be_an_integer_in_range(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, err = run_cli(export_argv(f"{models}:small", tmp_path / "m.onnx", "--opset", value), capsys)
    assert code == 2
    assert_one_line(err, "--opset")


def test_unknown_input_name_in_input_shape(tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["export", f"{models}:pair", "--input-shape", "image:1,1,8,8", "--input-shape", "maks:1,4,8,8"]
    code, err = run_cli([*argv, "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 2
    assert_one_line(err, "OptionError", "['maks']", "['image', 'mask']")


def test_named_input_shapes_follow_forward_order(tmp_path: Path, models: str) -> None:
    import onnx

    out = tmp_path / "m.onnx"
    argv = ["export", f"{models}:pair", "--input-shape", "mask:1,4,8,8", "--input-shape", "image:1,1,8,8"]
    assert main([*argv, "-o", str(out)]) == 0
    graph = onnx.load(out).graph
    assert [i.name for i in graph.input] == ["image", "mask"]
    assert [d.dim_value for d in graph.input[1].type.tensor_type.shape.dim][1:] == [4, 8, 8]


def test_output_names_of_the_wrong_count(tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = export_argv(f"{models}:small", tmp_path / "m.onnx", "--output-names", "a,b")
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "OptionError", "output_names has 2 names", "returns 1 output")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("where", ["missing directory", "a directory", "under a file"])
def test_unwritable_output_path(tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str], where: str) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    out = {
        "missing directory": tmp_path / "no" / "such" / "m.onnx",
        "a directory": tmp_path / "a_dir",
        "under a file": tmp_path / "a_file" / "m.onnx",
    }[where]
    code, err = run_cli(export_argv(f"{models}:small", out), capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", f"cannot write {out}")


def test_full_disk_while_writing_the_model(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_disk_after(monkeypatch, tmp_path, 100)
    out = tmp_path / "m.onnx"
    code, err = run_cli(export_argv(f"{models}:small", out), capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", f"cannot write {out}", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.py"]  # no partial file, no temporary


# --------------------------------------------------------------------------- bkn export: the model (exit 1)


def test_unsupported_layer_is_a_model_problem(tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(export_argv(f"{models}:batch_statistics_only", tmp_path / "m.onnx"), capsys)
    assert code == 1
    assert_one_line(err, "UnsupportedLayerError", "track_running_stats=False")


def test_non_finite_conv_weight_is_refused_naming_the_parameter(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(export_argv(f"{models}:nan_weight", tmp_path / "m.onnx"), capsys)
    assert code == 1
    assert_one_line(err, "NonFiniteWeightsError", "parameter '0.weight' of Conv2d '0'", "index (1, 0, 2, 2)")
    assert not (tmp_path / "m.onnx").exists()


def test_dynamic_spatial_on_flatten_linear_is_an_export_error(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(export_argv(f"{models}:flatten_linear", tmp_path / "m.onnx", "--dynamic-spatial"), capsys)
    assert code == 1
    assert_one_line(err, "ExportError", "dynamic_spatial", "[16, 16]", "needs fixed spatial sizes")
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- bkn demo


def test_demo_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").write_text("x")
    code, err = run_cli(["demo", "--out", str(tmp_path / "out"), "--steps", "1"], capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", "is a file")


def test_demo_empty_runtime_list_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["demo", "--out", str(tmp_path / "out"), "--steps", "1", "--runtimes", ""], capsys)
    assert code == 2
    assert_one_line(err, "UnknownRuntimeError")
    assert not (tmp_path / "out").exists()  # nothing trained or written, not even an empty --out


@pytest.fixture
def read_only_directory(tmp_path: Path) -> object:
    """A directory writes to which fail with EROFS or EACCES: a read-only tmpfs, or chmod 0555 for non-root."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)], check=False)
    if mounted.returncode != 0:
        pytest.skip("running as root and cannot mount a read-only tmpfs: permissions do not apply to root")
    yield target
    subprocess.run(["umount", str(target)], check=False)


def test_demo_out_in_a_read_only_directory(read_only_directory: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["demo", "--out", str(read_only_directory / "sub"), "--steps", "1"], capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", str(read_only_directory / "sub"))


def test_export_into_a_read_only_directory(
    read_only_directory: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(export_argv(f"{models}:small", read_only_directory / "m.onnx"), capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", "m.onnx")


# --------------------------------------------------------------------------- the API raises the same classes


def test_api_refuses_a_non_integer_opset(tmp_path: Path) -> None:
    from bkn_export.export import export_onnx

    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    for bad in (20.7, 20.0, "20", True):
        with pytest.raises(OptionError, match="opset must be an integer"):
            export_onnx(model, torch.randn(1, 1, 4, 4), tmp_path / "m.onnx", opset=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-5, 1.5, None])
def test_api_refuses_a_bad_external_data_threshold(tmp_path: Path, bad: object) -> None:
    from bkn_export.export import export_onnx

    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with pytest.raises(OptionError, match="external_data_threshold must be a whole number of bytes"):
        export_onnx(model, torch.randn(1, 1, 4, 4), tmp_path / "m.onnx", external_data_threshold=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- QA sweep: shapes, checkpoints, parity


@pytest.mark.parametrize(("text", "bad"), [("2,x,8", "'x'"), ("2,,8", "''"), ("1,3,a,8", "'a'")])
def test_input_shape_with_a_non_integer_part_is_refused_naming_it(text: str, bad: str) -> None:
    """No part of a shape is skipped: '2,x,8' would otherwise become (2, 8) without a word."""
    import argparse

    from bkn_export.commands.arguments import parse_shape

    with pytest.raises(argparse.ArgumentTypeError, match=rf"part\(s\) {bad} are not integers"):
        parse_shape(text)
    assert parse_shape("2,1,8,8") == parse_shape("2x1x8x8") == (2, 1, 8, 8)


@pytest.mark.parametrize("text", ["x:1,3,a", "x:1,3,0", ":1,3", "x:1,3,8;y:"])
def test_a_bad_shape_set_is_refused_under_its_own_flag(text: str) -> None:
    """The message names the flag the user typed (--shape-set), not --input-shape."""
    import argparse

    from bkn_export.commands.parity import parse_shape_set

    with pytest.raises(argparse.ArgumentTypeError, match=r"^--shape-set ") as caught:
        parse_shape_set(text)
    assert "--input-shape" not in str(caught.value)
    assert parse_shape_set("x:1,3,8;y:2") == [("x", (1, 3, 8)), ("y", (2,))]


def test_input_shape_with_the_wrong_channel_count_is_bad_input(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    code, err = run_cli(export_argv(f"{models}:small", out, shape="2,3,8,8"), capsys)
    assert code == 2
    assert_one_line(err, "OptionError", "--input-shape 2,3,8,8", "to have 1 channels, but got 3")
    assert not out.exists()


def test_corrupt_checkpoint_message_does_not_advise_an_unsafe_load(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ckpt.pt").write_bytes(b"garbage, not a torch.save file")
    argv = export_argv(f"{models}:small", tmp_path / "m.onnx", "--checkpoint", str(tmp_path / "ckpt.pt"))
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "CheckpointError", "cannot read checkpoint", "weights-only")
    assert "weights_only" not in err and "False" not in err


def _exported_small(tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "small.onnx"
    code, err = run_cli(export_argv(f"{models}:small", out, shape="2,1,8,8"), capsys)
    assert code == 0, err
    return out


def test_parity_with_a_model_that_does_not_fit_the_file_is_bad_input(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A factory whose model cannot take the ONNX inputs: one line naming the mismatch, exit 2, no traceback."""
    onnx_path = _exported_small(tmp_path, models, capsys)
    (tmp_path / "other.py").write_text(
        "from torch import nn\n\ndef three():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    )
    argv = ["parity", f"{tmp_path / 'other.py'}:three", str(onnx_path), "--runtimes", "ort:cpu:all"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "BKNInputError", "the PyTorch model does not run on the inputs of", "(2, 1, 8, 8)")


def test_parity_load_outputs_of_the_wrong_shape_is_bad_input(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from runtime import polygraphy_io

    onnx_path = _exported_small(tmp_path, models, capsys)
    inputs, outputs = tmp_path / "in.json", tmp_path / "out.json"
    polygraphy_io.save_inputs(inputs, [{"input": np.zeros((2, 1, 8, 8), np.float32)}])
    polygraphy_io.save_outputs(outputs, [{"output": np.zeros((1, 4, 8, 8), np.float32)}], runner="pytorch")
    argv = ["parity", str(onnx_path), "--runtimes", "ort:cpu:all", "--load-inputs", str(inputs)]
    code, err = run_cli([*argv, "--load-outputs", str(outputs)], capsys)
    assert code == 2
    assert_one_line(err, "SavedDataError", "'output'", "(1, 4, 8, 8)", "(2, 4, 8, 8)")


def test_checkpoint_with_other_wiring_names_the_differing_steps() -> None:
    """C3: the message shows what differs (the ReLU vs SiLU step), not two identical summaries."""
    from bkn_export import convert_batchnorm
    from bkn_export.errors import ChainWiringError

    def net(act: type[nn.Module]) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), act(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        ).eval()

    x = torch.randn(2, 1, 8, 8)
    saved = convert_batchnorm(net(nn.ReLU), x).state_dict()
    other = convert_batchnorm(net(nn.SiLU), x)
    with pytest.raises(
        ChainWiringError, match=r"wiring differs in sources\[0\]\.steps: saved \[relu 2 .*this model \[silu 2"
    ):
        other.load_state_dict(saved)


def test_a_batchnorm_checkpoint_for_a_converted_factory_points_at_load_batchnorm_state_dict(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hint said to build the model with the same factory arguments, which would not help."""
    batchnorm = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    torch.save(batchnorm.state_dict(), tmp_path / "bn.pt")
    argv = export_argv(f"{models}:converted_chain", tmp_path / "m.onnx", "--checkpoint", str(tmp_path / "bn.pt"))
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "CheckpointError", "lacks only BKN-only entries", "load_batchnorm_state_dict")


# --------------------------------------------------------------------------- QA of 2026-12-07 (third session)


def test_parity_repro_that_is_a_file_is_refused_before_the_runs(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing regular file as --repro passed the up-front check: every runtime ran, the bundle's failure was a
    note on stdout, and the exit code was 1, a mismatch's."""
    onnx_path = _exported_small(tmp_path, models, capsys)
    (tmp_path / "afile").write_text("keep me")
    argv = ["parity", f"{models}:small", str(onnx_path), "--runtimes", "reference", "--repro", str(tmp_path / "afile")]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", "is not a directory")
    assert err.startswith("bkn parity:")  # no blank line first (a progress display on a stderr that is no terminal)
    assert (tmp_path / "afile").read_text() == "keep me"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    code, err = run_cli([*argv[:-1], str(tmp_path / "dangling")], capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", "broken symlink")


def test_parity_custom_op_library_that_is_no_library_is_bad_input(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not a shared library let every ONNX Runtime configuration fail to load: "5 of 7 runtime(s)
    could not run the file", exit 1, the model's code; it is the environment's problem."""
    onnx_path = _exported_small(tmp_path, models, capsys)
    (tmp_path / "libops.so").write_text("not a library")
    argv = ["parity", f"{models}:small", str(onnx_path), "--custom-op-library", str(tmp_path / "libops.so")]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "RuntimeLoadError", "is not a shared library")
    # a review: a shared library that is no custom-op library (the C library itself) still ran every runtime, exit 1
    import ctypes.util

    found = ctypes.util.find_library("m")
    libm = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6") if Path(p).is_file()), found)
    if libm and Path(libm).is_file():
        code, err = run_cli([*argv[:-1], libm], capsys)
        assert code == 2
        assert_one_line(err, "RuntimeLoadError", "does not export RegisterCustomOps")
    code, err = run_cli([*argv[:-1], str(tmp_path)], capsys)
    assert code == 2
    assert_one_line(err, "RuntimeLoadError", "is a directory")
    # a second review: an empty name (an unset shell variable) was reported as "custom-op library  is a directory"
    code, err = run_cli([*argv[:-1], ""], capsys)
    assert code == 2
    assert_one_line(err, "RuntimeLoadError", "an empty path")


@pytest.mark.parametrize("runtimes", ["all,reference", "reference,all"])
def test_all_combined_with_other_runtime_names_says_so(
    runtimes: str, tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review: ``--runtimes all,reference`` said "unknown runtime 'all'", though 'all' is the documented name."""
    onnx_path = _exported_small(tmp_path, models, capsys)
    code, err = run_cli(["parity", f"{models}:small", str(onnx_path), "--runtimes", runtimes], capsys)
    assert code == 2
    assert_one_line(err, "'all' cannot be combined with other runtime names")
    code, err = run_cli(["demo", "--out", str(tmp_path / "out"), "--steps", "1", "--runtimes", runtimes], capsys)
    assert code == 2
    assert_one_line(err, "'all' cannot be combined with other runtime names")
    assert not (tmp_path / "out").exists()
    code, err = run_cli(["parity", f"{models}:small", str(onnx_path), "--runtimes", "all,all"], capsys)
    assert "cannot be combined" not in err  # 'all' twice is 'all'


def test_a_negative_tolerance_in_exponent_form_gets_its_own_message(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse took ``--rtol -1e-3`` for an option flag: "expected one argument"."""
    onnx_path = tmp_path / "never.onnx"
    code, err = run_cli(["parity", f"{models}:small", str(onnx_path), "--rtol", "-1e-3"], capsys)
    assert code == 2
    assert_one_line(err, "--rtol", "expected a finite number >= 0")


@pytest.mark.parametrize("command", ["demo", "train-demo", "export"])
def test_an_empty_output_path_is_refused(
    command: str, tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out ''`` (an unset shell variable) wrote the demo's seven files into the current directory, exit 0."""
    monkeypatch.chdir(tmp_path)
    argv = {
        "demo": ["demo", "--out", "", "--steps", "1"],
        "train-demo": ["train-demo", "--out", "", "--quick"],
        "export": export_argv(f"{models}:small", Path("")),
    }[command]
    if command == "export":
        argv[argv.index("-o") + 1] = ""
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, "an empty path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.py"]


def test_demo_with_a_runtime_that_cannot_run_here_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bkn demo --runtimes tensorrt`` without TensorRT trained, exported and reported both modes as a MISMATCH,
    exit 1, where ``bkn parity`` gives 2. Here: refused first (exit 2), nothing written."""
    from runtime.registry import discover

    unavailable = next((e.name for e in discover() if not e.availability.ok and e.availability.applicable), None)
    if unavailable is None:
        pytest.skip("every known runtime runs on this machine")
    code, err = run_cli(["demo", "--out", str(tmp_path / "out"), "--steps", "1", "--runtimes", unavailable], capsys)
    assert code == 2
    assert_one_line(err, "RuntimeLoadError", "cannot run here", unavailable)
    assert not (tmp_path / "out").exists()


def test_parity_without_arguments_says_what_it_expects(capsys: pytest.CaptureFixture[str]) -> None:
    """The message ended in a dangling ``positional argument(s):``."""
    code, err = run_cli(["parity"], capsys)
    assert code == 2
    assert_one_line(err, "expected [SPEC] MODEL.onnx, got 0 positional argument(s) (see `bkn parity --help`)")


def test_a_factory_module_in_the_current_directory_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bkn export mynet:factory`` from the folder holding ``mynet.py``: the console script does not put the current
    directory on ``sys.path`` (``python -m`` does), and the import failed (an install QA, sixth session of
    2026-12-07). The directory is searched last, and stays for the factory's own imports."""
    from bkn_export.factory import load_factory

    (tmp_path / "bkn_qa_mynet.py").write_text(
        "import torch\ndef factory():\n    from bkn_qa_mylayers import width\n    return torch.nn.Linear(width, 2)\n"
    )
    (tmp_path / "bkn_qa_mylayers.py").write_text("width = 3\n")  # a sibling the factory imports when called
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_factory("bkn_qa_mynet:factory")().in_features == 3
    assert sys.path[-1] == str(tmp_path)  # searched last
