"""Parity under hostile names, full disks and bad options; localisation without metadata; repro bundles.

Each test states one behaviour of ``bkn parity`` / ``runtime``: user strings print as written
(no rich markup), reports are written whole or not at all (exit 2 with the path and the
reason), bad options are exit 2 naming what was expected, dropped forward arguments are
skipped with a note, failures without exporter metadata are localised node by node against
the ONNX reference evaluator, and a repro bundle re-checks on its own.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_runtime_support import digits_inputs, exported_digits, trained_digits

from bkn_export.cli import main
from runtime import polygraphy_io
from runtime.backends.openvino import openvino_devices
from runtime.backends.reference import ReferenceEvaluatorBackend
from runtime.parity import run_parity
from runtime.report import report_text

SPEC = "bkn_export.demo.models:digits_resnet"
needs_openvino = pytest.mark.skipif(not openvino_devices()[0], reason=f"OpenVINO: {openvino_devices()[1]}")


class _TwoOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.relu(x)


def _hostile_names_model(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["[/]"]), helper.make_node("Relu", ["x"], ["[blink red]x"])],
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("[/]", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("[blink red]x", TensorProto.FLOAT, [2, 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)


def test_output_names_that_look_like_markup_print_as_written(tmp_path: Path) -> None:
    path = tmp_path / "hostile.onnx"
    _hostile_names_model(path)
    report = run_parity(_TwoOutputs(), path, runtimes="reference")
    assert report.passed
    text = report_text(report, width=240)
    assert "[/]" in text and "[blink red]x" in text


def test_reports_on_a_full_disk_exit_2_with_path_and_reason_and_leave_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write failure injected at the system call (fsync -> ENOSPC), through the real atomic writer."""
    checkpoint = tmp_path / "d.pt"
    torch.save(trained_digits().state_dict(), checkpoint)
    onnx_path = exported_digits("inference")  # exported before the disk fills up
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            return real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    report = tmp_path / "out" / "r.json"
    argv = [
        "parity", SPEC, str(onnx_path), "--checkpoint", str(checkpoint),
        "--runtimes", "ort:cpu:all", "--json", str(report),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(report) in err and "No space left on device" in err and "Traceback" not in err
    assert not report.exists()
    assert [p.name for p in report.parent.iterdir()] == []  # no temporary left behind


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tolerance", "nope=1e-3,1e-3"], "tolerance for unknown output(s) ['nope']"),
        (["--runtimes", ""], "no runtime named"),
        (["--input-shape", "y:2,1,8,8"], "unknown input 'y'"),
        (["--val-range", "y:0,1"], "--val-range for unknown input(s) ['y']"),
        (["--load-inputs", "inputs.npy"], "expected .npz"),
        (["--json", ""], "--json was given an empty path"),  # an unset $REPORT: the report was silently not written
        (["--html", " "], "--html was given an empty path"),
    ],
)
def test_bad_options_exit_2_naming_what_was_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["parity", SPEC, str(exported_digits("inference")), "--runtimes", "reference", *extra]
    if "inputs.npy" in extra:
        (tmp_path / "inputs.npy").write_bytes(b"\x93NUMPY")
        argv[-1] = str(tmp_path / "inputs.npy")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [["--atol", "nan"], ["--atol", "-1"], ["--rtol", "inf"], ["--val-range", "x:1,0"], ["--check-error-stat", "p99"]],
)
def test_invalid_option_values_are_usage_errors(extra: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["parity", SPEC, str(exported_digits("inference")), *extra])
    assert caught.value.code == 2


def test_corrupt_npz_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "in.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    assert main(["parity", SPEC, str(exported_digits("inference")), "--load-inputs", str(bad)]) == 2
    assert "cannot read it as an .npz archive" in capsys.readouterr().err


class _DroppedArgument(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_an_argument_the_exporter_dropped_is_skipped_with_a_note(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _DroppedArgument().eval()
    path = tmp_path / "dropped.onnx"
    # the TorchScript exporter drops an input no output depends on
    torch.onnx.export(
        model, (torch.randn(2, 4), torch.randn(2, 4)), str(path), dynamo=False, input_names=["x", "unused"]
    )
    assert [i.name for i in onnx.load(path).graph.input] == ["x"]
    report = run_parity(model, path, runtimes="reference")
    assert report.passed
    assert report.notes == ["forward argument 'unused' is not an ONNX input (dropped by the exporter): passed None"]


def _without_metadata(source: Path, target: Path) -> None:
    model = onnx.load(source)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, target)


@needs_openvino
def test_runtime_divergence_without_metadata_is_localised_node_by_node(tmp_path: Path) -> None:
    """OpenVINO with its engine precision (bf16 on this CPU) diverges from ONNX semantics at the first Conv."""
    if "bf16" not in openvino_precision_hint():
        pytest.skip("this CPU's OpenVINO default precision is f32: nothing diverges")
    path = tmp_path / "plain.onnx"
    _without_metadata(exported_digits("inference"), path)
    report = run_parity(
        trained_digits(), path, digits_inputs(), runtimes="openvino:cpu", openvino_precision="engine",
        repro_dir=tmp_path / "repro",
    )  # fmt: skip
    (result,) = report.failures()
    loc = result.localisation
    assert loc is not None and loc.method == "nodes" and loc.status == "localised", loc
    assert loc.first is not None and loc.first.op_type == "Conv"
    assert "against the ONNX reference evaluator" in loc.message
    bundle = tmp_path / "repro" / "openvino_cpu"
    sub = onnx.load(bundle / "model.onnx")
    assert [n.op_type for n in sub.graph.node] == ["Conv"]
    assert "reproduces the failure: yes" in (bundle / "README.txt").read_text()
    recheck = [
        "parity", str(bundle / "model.onnx"), "--load-inputs", str(bundle / "inputs.json"),
        "--load-outputs", str(bundle / "expected.json"), "--runtimes", "reference",
    ]  # fmt: skip
    assert list(polygraphy_io.load_outputs(bundle / "expected.json")) == ["onnx-reference-evaluator"]
    assert main(recheck) == 0


def openvino_precision_hint() -> str:
    from runtime.backends.openvino import OpenVINOBackend

    return OpenVINOBackend(precision="engine").precision_hint()


def test_a_wrong_file_without_metadata_is_not_blamed_on_a_runtime(tmp_path: Path) -> None:
    """Every runtime runs the (wrong) file as ONNX defines it: node by node finds no runtime at fault."""
    model = onnx.load(exported_digits("inference"))
    for node in model.graph.node:
        del node.metadata_props[:]
    weight = next(t for t in model.graph.initializer if t.name == "head.weight")
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0, 0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    path = tmp_path / "wrong.onnx"
    onnx.save(model, path)
    report = run_parity(trained_digits(), path, digits_inputs(), runtimes="ort:cpu:all")
    (result,) = report.failures()
    assert result.localisation is not None and result.localisation.method == "nodes"
    assert result.localisation.status == "not_localised"
    assert "differs from ONNX's semantics" in result.localisation.message


def _library_registering_nothing(tmp_path: Path) -> Path:
    """A real custom-op library whose ``RegisterCustomOps`` registers no op (and reports success): ONNX Runtime loads
    it, then cannot create a session for a file whose custom op nothing implements."""
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a custom-op library")
    source = tmp_path / "noops.c"
    source.write_text("void *RegisterCustomOps(void *opts, const void *api) { (void)opts; (void)api; return 0; }\n")
    library = tmp_path / "libnoops.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def test_a_runtime_that_cannot_load_the_file_is_not_localised(tmp_path: Path) -> None:
    """A load failure is an error with the runtime's reason, never 'the divergence is after the last module'."""
    model = onnx.load(exported_digits("training"))
    path = tmp_path / "no_body.onnx"
    del model.functions[:]
    onnx.save(model, path)
    report = run_parity(
        trained_digits(), path, digits_inputs(), runtimes="ort:cpu:all", mode="training",
        custom_op_libraries=[_library_registering_nothing(tmp_path)],  # loads, implements nothing
    )  # fmt: skip
    (result,) = report.failures()
    assert result.status == "error" and result.localisation is None
    assert "after the last module" not in report_text(report)


# The fixture keeping every report of a test is checked in
# test_runtime_plugin.py::test_bkn_parity_fixture_in_a_users_test_suite (test_two_checks_same_mode).


def test_iterations_are_seeded_and_reproducible() -> None:
    from runtime.model_io import input_sets, tensor_specs

    specs, _ = tensor_specs(onnx.load(exported_digits("inference")))
    first = input_sets(specs, [{"x": (2, 1, 8, 8)}], iterations=3, seed=5, val_range={None: (-2.0, 2.0)})
    again = input_sets(specs, [{"x": (2, 1, 8, 8)}], iterations=3, seed=5, val_range={None: (-2.0, 2.0)})
    assert len(first) == 3 and not np.array_equal(first[0]["x"], first[1]["x"])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["x"], b["x"])
    assert all(f["x"].min() >= -2.0 and f["x"].max() < 2.0 for f in first)


def test_a_directory_given_as_the_onnx_file_says_so(tmp_path: Path) -> None:
    from runtime.errors import ModelFileError

    with pytest.raises(ModelFileError, match="is a directory, not an ONNX file"):
        run_parity(trained_digits(), tmp_path, digits_inputs())


def test_a_missing_external_data_file_is_named(tmp_path: Path) -> None:
    from runtime.errors import ModelFileError

    model = onnx.load(exported_digits("inference"))
    path = tmp_path / "external.onnx"
    onnx.save(model, path, save_as_external_data=True, location="external.data", size_threshold=0)
    (tmp_path / "external.data").unlink()
    with pytest.raises(ModelFileError, match=r"external-data file external\.data, which is missing"):
        run_parity(trained_digits(), path, digits_inputs())


@pytest.mark.parametrize("location", [".", "../outside.data", "/etc/hostname"])
def test_an_external_data_location_that_names_no_file_beside_the_model_is_named(tmp_path: Path, location: str) -> None:
    from runtime.errors import ModelFileError

    model = onnx.load(exported_digits("inference"))
    path = tmp_path / "inner" / "external.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, location="external.data", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)
    (tmp_path / "outside.data").write_bytes((path.parent / "external.data").read_bytes())
    with pytest.raises(ModelFileError, match=rf"location {re.escape(repr(location))}, which names no file in"):
        run_parity(trained_digits(), path, digits_inputs())


def test_a_report_path_that_is_a_symlink_is_replaced_not_written_through(tmp_path: Path) -> None:
    from runtime.report import write_json

    target = tmp_path / "elsewhere.json"
    target.write_text("keep me\n")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    report = run_parity(trained_digits(), exported_digits("inference"), digits_inputs(), runtimes="reference")
    write_json(report, link)
    assert not link.is_symlink() and json.loads(link.read_text())["passed"]
    assert target.read_text() == "keep me\n"


def test_a_repro_of_the_whole_model_names_its_expected_outputs_by_their_source(tmp_path: Path) -> None:
    """A failure against saved outputs that every node agrees with ONNX on is not localised to a node: the bundle is
    the whole model and its expected.json's runner says ``expected`` (the run's reference), not ``reference``, the
    name of the ONNX reference evaluator's runtime it is re-checked on."""
    path = exported_digits("inference")
    feed = {onnx.load(path).graph.input[0].name: digits_inputs()[0]}
    (name,) = (output.name for output in onnx.load(path).graph.output)
    backend = ReferenceEvaluatorBackend()
    backend.load(str(path))
    wrong = {name: backend.run(feed)[name] + np.float32(0.5)}
    report = run_parity(None, path, [feed], runtimes="reference", reference_outputs=[wrong], repro_dir=tmp_path / "r")
    assert not report.passed
    bundle = tmp_path / "r" / "reference"
    assert "the whole model" in (bundle / "README.txt").read_text()
    (iteration,) = polygraphy_io.load_outputs(bundle / "expected.json")["expected"]
    np.testing.assert_array_equal(iteration[name], wrong[name])


def test_a_custom_op_library_that_cannot_be_used_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review of the library check: a library whose own dependency is missing was "does not load here or does not
    export RegisterCustomOps" (the loader's reason dropped); it says the loader's reason now. And a relative name
    (``libops.so`` in the current directory, ``./libops.so`` given as a Path) reached ONNX Runtime without its
    directory, which the loader then looked up in the system's paths: every configuration failed to load a library
    that was there. It is passed as an absolute path."""
    import shutil
    import subprocess

    from runtime.errors import RuntimeLoadError

    library = _library_registering_nothing(tmp_path)
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    (tmp_path / "helper.c").write_text("int helper(void) { return 1; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "libhelper.so"), str(tmp_path / "helper.c")])
    (tmp_path / "dep.c").write_text(
        "int helper(void);\nvoid *RegisterCustomOps(void *o, const void *a) { (void)o; (void)a; helper(); return 0; }\n"
    )
    needing = tmp_path / "libneeds.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(needing), str(tmp_path / "dep.c"), f"-L{tmp_path}", "-lhelper"],
        check=True,
    )
    (tmp_path / "libhelper.so").unlink()  # the dependency is gone
    with pytest.raises(RuntimeLoadError, match=r"does not load here \(.*libhelper\.so"):
        run_parity(trained_digits(), exported_digits("inference"), digits_inputs(), custom_op_libraries=[needing])
    monkeypatch.chdir(tmp_path)
    for relative in (library.name, Path(".") / library.name):
        report = run_parity(
            trained_digits(), exported_digits("inference"), digits_inputs(), runtimes="ort:cpu:all",
            custom_op_libraries=[relative],
        )  # fmt: skip
        assert report.passed, report.runtimes  # a library that loads and registers (nothing, here) is taken
