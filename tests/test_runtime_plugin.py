"""The pytest plugin: cheap to load, its fixture passes on parity and fails readably on a mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
from test_runtime_support import exported_digits, trained_digits

from runtime import assert_parity
from runtime.errors import ParityMismatchError


def test_plugin_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, runtime.pytest_plugin, runtime; "
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    from importlib.metadata import entry_points

    assert any(e.value == "runtime.pytest_plugin" for e in entry_points(group="pytest11"))


def test_assert_parity_passes_and_returns_the_report() -> None:
    report = assert_parity(trained_digits(), torch.randn(3, 1, 8, 8), mode="inference", runtimes="ort:cpu:all")
    assert report.passed and [r.runtime for r in report.ran] == ["ort:cpu:all"]


def test_assert_parity_failure_message_is_readable(tmp_path: Path) -> None:
    import copy

    model = trained_digits()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.block1.conv1.weight[0, 0, 1, 1] += 0.5
    onnx_path = tmp_path / "good.onnx"
    from bkn_export.export import export_onnx

    export_onnx(model, (torch.randn(2, 1, 8, 8),), onnx_path, mode="inference")
    with pytest.raises(ParityMismatchError) as caught:
        assert_parity(broken, torch.randn(2, 1, 8, 8), runtimes="ort:cpu:all", onnx_path=onnx_path)
    message = str(caught.value)
    assert message.startswith(f"parity (inference) failed for {onnx_path}: 1 of 1 runtime(s) differ")
    output = onnx.load(onnx_path).graph.output[0].name
    assert f"ort:cpu:all / {output}:" in message and "outside atol=1e-05 rtol=0.0001" in message
    assert "localisation: first diverging module: block1.conv1 + block1.norm1" in message
    assert isinstance(caught.value, AssertionError)


def test_bkn_parity_fixture_in_a_users_test_suite(tmp_path: Path) -> None:
    """A user's test file using the fixture, run by pytest with the plugin from its entry point.

    The first test exports through the fixture; the second checks a model against an ONNX
    file of a different model (the trained digits network exported here) and must fail.
    The third checks a training export of a model with Dropout, drop-path and a module
    with its own train-mode behaviour (the reference must run only BKN in train mode);
    the fourth makes two checks of one mode, and both reports must be kept. (One pytest
    subprocess for all four: each costs seconds of start-up on a shared machine.)
    """
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            import torch
            from bkn_export.demo.models import digits_resnet
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_runtime_reference import _converted
            from test_runtime_support import exported_digits, trained_digits

            def test_exports_match(bkn_parity):
                torch.manual_seed(0)
                report = bkn_parity(digits_resnet("bkn"), torch.randn(2, 1, 8, 8), mode="training", atol=1e-5)
                assert report.passed

            def test_mismatch_is_reported(bkn_parity):
                torch.manual_seed(0)
                untrained = digits_resnet("bkn")
                bkn_parity(untrained, torch.randn(2, 1, 8, 8), onnx_path={str(exported_digits("inference"))!r})

            def test_training_export_semantics(bkn_parity):
                assert bkn_parity(_converted(), torch.randn(4, 1, 6, 6), mode="training").passed

            def test_two_checks_same_mode(bkn_parity):
                path = exported_digits("inference")
                bkn_parity(trained_digits(), torch.randn(2, 1, 8, 8), onnx_path=path)
                bkn_parity(trained_digits(), torch.randn(5, 1, 8, 8), onnx_path=path)

            import pytest

            @pytest.mark.parametrize("batch", [3, 4], ids=["a/b", "a:b"])
            def test_ids_a_path_cannot_keep(bkn_parity, batch):
                # positional arguments as assert_parity's: model, inputs, mode, runtimes, atol, rtol
                path = exported_digits("inference")
                bkn_parity(trained_digits(), torch.randn(batch, 1, 8, 8), "inference", None, 1e-5, 1e-4, onnx_path=path)

            def test_only_an_unavailable_runtime(bkn_parity):
                bkn_parity(trained_digits(), torch.randn(2, 1, 8, 8), runtimes="tensorrt")
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--bkn-parity-runtimes", "ort:cpu:all",
         f"--bkn-parity-report-dir={tmp_path / 'reports'}", "test_user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "1 failed, 5 passed, 1 skipped" in result.stdout, result.stdout[-3000:]
    assert "ParityMismatchError: parity (inference) failed for" in result.stdout
    assert "localisation: first diverging module: " in result.stdout
    reports = tmp_path / "reports"
    (exports,) = reports.glob("test_exports_match-*")  # one folder per test: its name and a hash of its node id
    assert (exports / "parity_training.html").is_file()
    (mismatch,) = reports.glob("test_mismatch_is_reported-*")
    assert (mismatch / "parity_inference.json").is_file()
    # ids that differ only in characters a path cannot keep: two folders, both reports kept
    twins = sorted(reports.glob("test_ids_a_path_cannot_keep_a_b_-*"))
    shapes = sorted(
        json.loads((t / "parity_inference.json").read_text())["model"]["inputs"][0]["shape"][0] for t in twins
    )
    assert shapes == [3, 4]
    (unavailable,) = reports.glob("test_only_an_unavailable_runtime-*/parity_inference.json")  # skipped, reported
    assert {r["status"] for r in json.loads(unavailable.read_text())["runtimes"]} == {"unavailable"}
    assert "SKIPPED" in result.stdout or "1 skipped" in result.stdout
    (kept,) = reports.glob("test_two_checks_same_mode-*")
    assert sorted(p.name for p in kept.iterdir()) == [
        "parity_inference.html", "parity_inference.json", "parity_inference_2.html", "parity_inference_2.json",
    ]  # fmt: skip
    batches = [json.loads((kept / f"{n}.json").read_text())["model"]["inputs"][0]["shape"][0] for n in
               ("parity_inference", "parity_inference_2")]  # fmt: skip
    assert batches == [2, 5]


def test_the_fixture_in_ci_relative_report_dir_prefix_selection_empty_list_and_uncompared_outputs(
    tmp_path: Path,
) -> None:
    """What a CI run of the fixture met (a cold QA session): a relative --bkn-parity-report-dir followed a test that
    changed directory (its reports left the artifact folder); ``runtimes=[]`` ran the command line's selection; a
    prefix selection (``ort``) warned on every test for the providers this machine lacks (failing ``-W error``); a
    file output the model does not return passed without a word. One pytest subprocess for the four."""
    (tmp_path / "test_ci.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            import pytest
            import torch
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_runtime_support import exported_digits, trained_digits
            from runtime.errors import UnknownRuntimeError

            def test_changes_directory(bkn_parity, monkeypatch, tmp_path):
                monkeypatch.chdir(tmp_path)
                bkn_parity(trained_digits(), torch.randn(2, 1, 8, 8), onnx_path=exported_digits("inference"))

            def test_empty_runtime_list_is_refused(bkn_parity):
                with pytest.raises(UnknownRuntimeError):
                    bkn_parity(trained_digits(), torch.randn(2, 1, 8, 8), runtimes=[],
                               onnx_path=exported_digits("inference"))

            def test_a_prefix_selection_does_not_warn(bkn_parity):
                bkn_parity(trained_digits(), torch.randn(2, 1, 8, 8), runtimes="ort",
                           onnx_path=exported_digits("inference"))

            class _Fewer(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.net = trained_digits()

                def forward(self, x):
                    return self.net(x)

            def test_an_uncompared_output_warns(bkn_parity, tmp_path):
                import onnx
                from onnx import helper

                model = onnx.load(exported_digits("inference"))
                first = model.graph.output[0]
                model.graph.node.append(helper.make_node("Identity", [first.name], ["extra"]))
                extra = model.graph.output.add()
                extra.CopyFrom(first)
                extra.name = "extra"
                path = tmp_path / "extra.onnx"
                onnx.save(model, path)
                with pytest.warns(UserWarning, match="'extra' of the file not compared"):
                    bkn_parity(_Fewer().eval(), torch.randn(2, 1, 8, 8), onnx_path=path)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::UserWarning",
         "--bkn-parity-runtimes", "ort:cpu:all", "--bkn-parity-report-dir=rel_reports", "test_ci.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "4 passed" in result.stdout, result.stdout[-3000:]
    (report,) = (tmp_path / "rel_reports").glob("test_changes_directory-*/parity_inference.json")
    assert json.loads(report.read_text())["passed"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"model": None}, "model must be a torch.nn.Module"),
        ({"model": "digits.pt"}, "model must be a torch.nn.Module"),
        ({"inputs": None}, "inputs must be a tensor"),
        ({"inputs": "x.npy"}, "inputs must be a tensor"),
        ({"runtimes": 123}, "runtimes must be"),
        ({"tolerances": {"output": (1e-3, 1e-3)}}, r"tolerances\['output'\] must be runtime.compare.Tolerance"),
        ({"criteria": {"equal_nan": True}}, "criteria must be runtime.compare.Criteria"),
    ],
)
def test_assert_parity_refuses_arguments_of_the_wrong_type(arguments: dict[str, object], message: str) -> None:
    """They failed later, with an error about something else (``'NoneType' object has no attribute
    'named_modules'``, ``'tuple' object has no attribute 'atol'``, a NumPy object-array error)."""
    from runtime.errors import BKNInputError

    call = {"model": trained_digits(), "inputs": torch.randn(2, 1, 8, 8), **arguments}
    with pytest.raises(BKNInputError, match=message):
        assert_parity(call.pop("model"), call.pop("inputs"), onnx_path=exported_digits("inference"), **call)  # type: ignore[arg-type]


def test_assert_parity_refuses_a_bad_onnx_path_or_report_dir_as_bad_input(tmp_path: Path) -> None:
    """A missing file, a folder or a corrupt file raised FileNotFoundError, IsADirectoryError and protobuf's
    DecodeError; a report_dir that is a file, FileExistsError."""
    from runtime.errors import BKNInputError, ModelFileError

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    for path in (tmp_path / "missing.onnx", tmp_path, corrupt):
        with pytest.raises(ModelFileError):
            assert_parity(trained_digits(), torch.randn(2, 1, 8, 8), onnx_path=path, runtimes="ort:cpu:all")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(BKNInputError, match="is a file, not a directory"):
        assert_parity(
            trained_digits(), torch.randn(2, 1, 8, 8), onnx_path=exported_digits("inference"), report_dir=a_file
        )
