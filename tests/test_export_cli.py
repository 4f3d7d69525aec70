"""``bkn export`` and :func:`bkn_export.factory.load_model` (the spec + checkpoint form ``bkn parity`` shares).

Specification: a factory spec and a checkpoint give the same model every time; the
exported file computes that model's eval output; bad specs, checkpoints and shapes
exit with status 2 and a message that names them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_inference import randomize_statistics

from bkn_export import BatchKalmanNormBase
from bkn_export.cli import main
from bkn_export.commands import export as export_command
from bkn_export.errors import CheckpointError, FactoryError
from bkn_export.export.metadata import read_metadata
from bkn_export.factory import load_model

SPEC = "bkn_export.demo.models:digits_resnet"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A digits_resnet(width=8) state dict with non-trivial statistics."""
    model = randomize_statistics(load_model(SPEC, width=8))
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    return path


def test_export_with_checkpoint_matches_the_loaded_model(tmp_path: Path, checkpoint: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "model.onnx"
    argv = ["export", SPEC, "--checkpoint", str(checkpoint), "--input-shape", "1,1,8,8", "-o", str(out)]
    assert main([*argv, "--factory-arg", "width=8"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "stem_norm" in printed and "conv" in printed
    model = load_model(SPEC, str(checkpoint), width=8).eval()
    proto = onnx.load(out)
    assert read_metadata(proto)["mode"] == "inference"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 8, 8)  # batch 3 although exported from --input-shape 1,...: the batch is dynamic
    (actual,) = session.run(None, {proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        assert np.abs(actual - model(x).numpy()).max() <= 1e-5


def test_cli_options_reach_the_exporter(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    argv = ["export", SPEC, "--input-shape", "2,1,8,8", "-o", str(out), "--opset", "18", "--fp16", "--dynamic-spatial"]
    assert main(argv) == 0
    proto = onnx.load(out)
    metadata = read_metadata(proto)
    assert (metadata["opset"], metadata["fp16"], metadata["dynamic_spatial"]) == ("18", "true", "true")
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["no_such_package.models:factory"], "cannot import module 'no_such_package.models'"),
        (["bkn_export.demo.models:no_such_factory"], "has no attribute 'no_such_factory'"),
        (["bkn_export.demo.models"], "not of the form 'pkg.module:factory'"),
        (["bkn_export.demo.models:NORMALIZERS"], "not a callable"),
        ([SPEC, "--checkpoint", "/nonexistent/ckpt.pt"], "checkpoint /nonexistent/ckpt.pt does not exist"),
        ([SPEC, "--graph-optimizer", "fold"], "--graph-optimizer applies to --mode training only"),
    ],
)
def test_bad_input_exits_2_with_a_named_cause(tmp_path: Path, capsys, argv_tail: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    spec, *rest = argv_tail
    argv = ["export", spec, *rest, "--input-shape", "1,1,8,8", "-o", str(tmp_path / "m.onnx")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, checkpoint: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["export", SPEC, "--checkpoint", str(checkpoint), "--input-shape", "1,1,8,8", "-o", str(tmp_path / "m.onnx")]
    assert main(argv) == 2  # saved with width=8, built with the default width
    assert "does not fit the model" in capsys.readouterr().err


def test_malformed_input_shape_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", SPEC, "--input-shape", "1,one,8", "-o", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2


def test_load_model_from_a_python_file_with_kwargs(tmp_path: Path) -> None:
    source = tmp_path / "my_models.py"
    source.write_text(
        textwrap.dedent(
            """
            from torch import nn
            def build(width=4):
                return nn.Sequential(nn.Linear(3, width))
            def not_a_model():
                return 42
            def broken():
                raise RuntimeError("factory exploded")
            """
        )
    )
    model = load_model(f"{source}:build", width=7)
    assert model.get_submodule("0").out_features == 7
    with pytest.raises(FactoryError, match=r"returned a int, not a torch\.nn\.Module"):
        load_model(f"{source}:not_a_model")
    with pytest.raises(FactoryError, match="raised RuntimeError: factory exploded"):
        load_model(f"{source}:broken")


def test_load_model_accepts_wrapped_state_dicts(tmp_path: Path) -> None:
    reference = randomize_statistics(load_model(SPEC, width=8))
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    loaded = load_model(SPEC, str(path), width=8)
    for key, value in reference.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded.state_dict()[key], value), key
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(SPEC, str(tmp_path / "garbage.pt"))


def test_training_mode_routes_to_the_training_exporter(tmp_path: Path) -> None:
    out = tmp_path / "train.onnx"
    argv = [
        "export",
        SPEC,
        "--input-shape",
        "2,1,8,8",
        "-o",
        str(out),
        "--mode",
        "training",
        "--factory-arg",
        "width=4",
    ]
    assert main(argv) == 0
    assert out.exists()
    assert any(node.op_type == "BatchKalmanNorm" for node in onnx.load(out).graph.node)
    assert read_metadata(onnx.load(out))["graph_optimizer"] == "full"


def test_graph_optimizer_reaches_the_training_exporter(tmp_path: Path) -> None:
    from bkn_export.export.common import GRAPH_OPTIMIZERS

    out = tmp_path / "train.onnx"
    argv = ["export", SPEC, "--input-shape", "2,1,8,8", "-o", str(out), "--mode", "training", "--graph-optimizer"]
    assert main([*argv, "fold", "--factory-arg", "width=4"]) == 0
    assert read_metadata(onnx.load(out))["graph_optimizer"] == "fold"
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    (action,) = [action for action in parser._actions if action.dest == "graph_optimizer"]
    assert tuple(action.choices or ()) == GRAPH_OPTIMIZERS  # the CLI's choices are the exporter's


@pytest.mark.slow  # a fresh interpreter imports torch and the exporter (~20 s here)
def test_console_entry_point_runs(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    completed = subprocess.run(
        [sys.executable, "-m", "bkn_export.cli", "export", SPEC, "--input-shape", "1,1,8,8", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert out.exists()


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_a_float64_model_is_exported_from_float64_examples(tmp_path: Path, mode: str) -> None:
    """The CLI made float32 examples whatever the model, and blamed --input-shape for a float64 model."""
    source = tmp_path / "double_models.py"
    source.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from bkn_export import convert_batchnorm
            def net():
                torch.manual_seed(0)
                model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                      nn.BatchNorm2d(4)).double()
                return convert_batchnorm(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
            """
        )
    )
    out = tmp_path / "m.onnx"
    assert main(["export", f"{source}:net", "--input-shape", "2,3,8,8", "--mode", mode, "-o", str(out)]) == 0
    graph_input = onnx.load(out).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


_GRAPH_MODELS = """
import torch
from torch import nn
from bkn_export import convert_batchnorm

class Graph(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 8), nn.BatchNorm1d(8)

    def forward(self, x, edge_index):
        h = self.linear(x)
        return self.bn(torch.zeros_like(h).index_add(0, edge_index[1], h[edge_index[0]]))

def net():
    torch.manual_seed(0)
    ring = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])
    return convert_batchnorm(Graph(), (torch.randn(6, 4), ring))
"""


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_integer_example_inputs_come_from_load_inputs(tmp_path: Path, mode: str) -> None:
    """Third QA of 2026-12-06: `bkn export` made float examples only, so a graph network (integer edge indices)
    could not be exported from the CLI. ``--load-inputs x.npz`` gives the examples by forward() argument name; the
    file computes the model's output on them, and takes the edge indices as int64."""
    source = tmp_path / "graph_models.py"
    source.write_text(_GRAPH_MODELS)
    x = np.random.default_rng(0).standard_normal((6, 4))  # float64: cast to the model's float32
    edge_index = np.array([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]], dtype=np.int64)
    np.savez(tmp_path / "inputs.npz", x=x, edge_index=edge_index)
    out = tmp_path / "graph.onnx"
    argv = ["export", f"{source}:net", "--load-inputs", str(tmp_path / "inputs.npz"), "--static-batch"]
    assert main([*argv, "--mode", mode, "-o", str(out)]) == 0
    inputs = {value.name: value.type.tensor_type.elem_type for value in onnx.load(out).graph.input}
    assert (inputs["x"], inputs["edge_index"]) == (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
    model = load_model(f"{source}:net").eval()
    if mode == "training":  # what the training file computes: BKN layers in train mode, the rest in eval
        for module in model.modules():
            if isinstance(module, BatchKalmanNormBase):
                module.train()
    with torch.no_grad():
        expected = model(torch.from_numpy(x).float(), torch.from_numpy(edge_index)).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["output"], {"x": x.astype(np.float32), "edge_index": edge_index})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.zeros((6, 4)), "edges": np.zeros((2, 6), np.int64)},
            r"\['edges'\] are not arguments of Graph.forward\(\)",
        ),
        ({"edge_index": np.zeros((2, 6), np.int64)}, r"give the first 2 forward\(\) arguments \['x', 'edge_index'\]"),
        ({"x": np.zeros((6, 5)), "edge_index": np.zeros((2, 6), np.int64)}, r"does not run on this example"),
    ],
)
def test_load_inputs_that_do_not_fit_the_forward_exit_2(tmp_path: Path, capsys, arrays, message: str) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "graph_models.py"
    source.write_text(_GRAPH_MODELS)
    np.savez(tmp_path / "inputs.npz", **arrays)
    argv = ["export", f"{source}:net", "--load-inputs", str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "m.onnx")]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "m.onnx").exists()


def test_input_shape_and_load_inputs_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", SPEC, "--input-shape", "1,1,8,8", "--load-inputs", "x.npz", "-o", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2


_SCALED_MODELS = """
import torch
from torch import nn

class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, scale):
        return self.bn(self.conv(x)) * scale

def net():
    torch.manual_seed(0)
    return Scaled()
"""


def test_load_inputs_keeps_a_0d_input_and_reads_big_endian_arrays(tmp_path: Path) -> None:
    """QA of the new option: a 0-d array became shape (1,) with a batch axis (np.ascontiguousarray), so the file
    refused the model's own scalar input; a big-endian array crashed with a traceback. Now the scalar stays a 0-d
    graph input and big-endian values are read as they are."""
    source = tmp_path / "scaled_models.py"
    source.write_text(_SCALED_MODELS)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(">f4")
    np.savez(tmp_path / "inputs.npz", x=x, scale=np.array(2.5, dtype=np.float32))
    out = tmp_path / "scaled.onnx"
    assert main(["export", f"{source}:net", "--load-inputs", str(tmp_path / "inputs.npz"), "-o", str(out)]) == 0
    scale_input = next(value for value in onnx.load(out).graph.input if value.name == "scale")
    assert len(scale_input.type.tensor_type.shape.dim) == 0
    model = load_model(f"{source}:net").eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x.astype(np.float32)), torch.tensor(2.5)).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.astype(np.float32), "scale": np.array(2.5, np.float32)})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_an_export_failure_is_one_line_on_stderr_without_torchs_guard_logs(tmp_path: Path) -> None:
    """QA of 2026-12-06: a dynamic-batch export of a graph network (edge indices of first axis 2) printed about 30
    lines of torch's "Error while creating guard" logs before the one-line error; now the one line alone, naming
    the static batch."""
    source = tmp_path / "graph_models.py"
    source.write_text(_GRAPH_MODELS)
    np.savez(
        tmp_path / "inputs.npz",
        x=np.zeros((6, 4), np.float32),
        edge_index=np.array([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]], dtype=np.int64),
    )
    argv = ["export", f"{source}:net", "--load-inputs", str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "m.onnx")]
    completed = subprocess.run(
        [sys.executable, "-m", "bkn_export.cli", *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert completed.returncode == 2  # exports with --static-batch: an option this model cannot take (cold QA)
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert completed.stderr.startswith("bkn export: StaticShapeNeededError: ") and "--static-batch" in completed.stderr


def test_an_example_of_batch_0_is_bad_input(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32))
    argv = ["export", SPEC, "--load-inputs", str(tmp_path / "empty.npz"), "-o", str(tmp_path / "m.onnx")]
    assert main(argv) == 2
    assert "example input 1 has shape (0, 1, 8, 8): an empty batch" in capsys.readouterr().err
