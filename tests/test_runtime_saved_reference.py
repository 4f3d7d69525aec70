"""Saved references (``bkn parity M.onnx --load-outputs REF --load-inputs IN``) judged against what the file declares.

Small graphs built with ``onnx.helper``, so the expected outputs are computed independently with NumPy:

* an integer / bool output saved as floats is compared exactly (whole numbers) or refused (exit 2), never
  within a float tolerance;
* a declared scalar (rank 0) saved with shape (1,) is a saved file that does not fit the model (exit 2);
* ``--equal-nan`` (``Criteria(equal_nan=True)``) matches the reference's NaN / ±Inf by position, says so in the
  report, and still fails a NaN on one side only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime import polygraphy_io
from runtime.compare import Criteria
from runtime.parity import run_parity

# onnx.reference's Log warns on log(0) and log(-1), which the model computes on purpose
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")

X = np.array([[0.5, 3.0, -1.0], [2.0, 0.0, 1.0]], dtype=np.float32)


def _model(tmp_path: Path) -> Path:
    """x (2, 3) float32 -> total: scalar sum, index: argmax per row (int64), positive: x > 0 (bool), log: log(x)."""
    outputs = [
        helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
        helper.make_tensor_value_info("index", TensorProto.INT64, [2]),
        helper.make_tensor_value_info("positive", TensorProto.BOOL, [2, 3]),
        helper.make_tensor_value_info("log", TensorProto.FLOAT, [2, 3]),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("ArgMax", ["x"], ["index"], axis=1, keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Greater", ["x", "zero"], ["positive"]),
        helper.make_node("Log", ["x"], ["log"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(nodes, "saved_reference", [x], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def _expected(x: np.ndarray = X) -> dict[str, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log(x)
    return {
        "total": np.array(x.sum(), dtype=np.float32),
        "index": x.argmax(axis=1).astype(np.int64),
        "positive": x > 0,
        "log": log,
    }


def _parity(tmp_path: Path, saved: dict[str, np.ndarray], *options: str, x: np.ndarray = X) -> int:
    from bkn_export.cli import main

    path = _model(tmp_path)
    polygraphy_io.save_inputs(tmp_path / "in.json", [{"x": x}])
    polygraphy_io.save_outputs(tmp_path / "ref.json", [saved])
    argv = [
        "parity", str(path), "--load-outputs", str(tmp_path / "ref.json"), "--load-inputs", str(tmp_path / "in.json"),
        "--runtimes", "ort:cpu:all,reference", "--no-localise", "--json", str(tmp_path / "report.json"), *options,
    ]  # fmt: skip
    return main(argv)


def _without(name: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in _expected().items() if k != name and k != "log"}


@pytest.mark.parametrize("stored", ["float32", "float64"])
def test_integer_and_bool_outputs_saved_as_whole_floats_compare_exactly(tmp_path: Path, stored: str) -> None:
    saved = {**_without("log"), "index": _expected()["index"].astype(stored)}
    saved["positive"] = _expected()["positive"].astype(stored)
    assert _parity(tmp_path, saved) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert any(f"'index' is stored as {stored}" in note for note in report["notes"])
    judged = {c["output"]: c for r in report["runtimes"] for c in r["outputs"]}
    # judged int64 against int64 (exactly), not "int64 ONNX output vs float64 reference" within a tolerance
    assert judged["index"]["tolerance_source"] == "int64 defaults" and judged["positive"]["tolerance_source"] == (
        "bool defaults"
    )


def test_an_integer_output_saved_as_floats_is_never_passed_within_a_float_tolerance(tmp_path: Path) -> None:
    """A wrong index saved as a float (2.0 for 1) failed as one with atol 0, but passed with --atol 1."""
    saved = {**_without("log"), "index": np.array([1.0, 2.0])}  # ArgMax gives [1, 0]
    assert _parity(tmp_path, saved, "--atol", "5") == 1
    report = json.loads((tmp_path / "report.json").read_text())
    index = next(c for c in report["runtimes"][0]["outputs"] if c["output"] == "index")
    assert not index["passed"] and "compared exactly" in index["message"]


@pytest.mark.parametrize(
    ("name", "values"),
    [("index", [1.0, 0.25]), ("index", [1.0, np.nan]), ("index", [1.0, 2.0**60]), ("positive", [[0.5] * 3] * 2)],
)
def test_an_integer_output_saved_as_floats_that_are_not_whole_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, values: list[float]
) -> None:
    """Fractional, NaN, or beyond what the float holds exactly (2^60 in float64): exit 2, naming the output and the
    dtypes; before, 0.25 for 0 passed with --atol 0.5 (a float comparison)."""
    saved = {**_without("log"), name: np.array(values, dtype=np.float64)}
    assert _parity(tmp_path, saved, "--atol", "0.5") == 2
    error = capsys.readouterr().err
    assert "SavedDataError" in error and f"saved output {name!r}" in error and "float64" in error


def test_a_declared_scalar_saved_with_shape_1_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The ONNX output 'total' has rank 0; a (1,) array is a saved file that does not fit the model: exit 2 (it was
    compared, and failed on the shape, exit 1). The same value with shape () passes."""
    saved = _without("log")
    assert _parity(tmp_path, saved) == 0
    saved["total"] = saved["total"].reshape(1)
    assert _parity(tmp_path, saved) == 2
    error = capsys.readouterr().err
    assert "SavedDataError" in error and "'total'" in error and "declares it a scalar" in error


def test_equal_nan_matches_the_references_nan_and_inf_by_position_and_says_so(tmp_path: Path) -> None:
    """log(x) of X holds NaN (log -1) and -inf (log 0): by default a broken reference (exit 1); with --equal-nan the
    runtimes, which give the same NaN / -inf there, pass, the report records the option and a note names it."""
    saved = _expected()
    assert _parity(tmp_path, saved) == 1
    assert json.loads((tmp_path / "report.json").read_text())["reference_problems"]
    assert _parity(tmp_path, saved, "--equal-nan") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["criteria"]["equal_nan"] is True and "equal NaN" in report["criteria"]["description"]
    held = "NaN / ±Inf values: 2 in 'log' (input set 0)"
    assert any(note.startswith("--equal-nan") and held in note for note in report["notes"])
    jsonschema = pytest.importorskip("jsonschema")
    from runtime.report import load_schema

    jsonschema.validate(report, load_schema())


def test_equal_nan_still_fails_a_nan_on_one_side_only(tmp_path: Path) -> None:
    """The reference's NaN where the runtime gives a number (and the runtime's -inf where the reference has one)."""
    saved = _expected()
    saved["log"] = saved["log"].copy()
    saved["log"][1, 0] = np.nan  # log(2.0) is finite in every runtime
    assert _parity(tmp_path, saved, "--equal-nan") == 1
    report = json.loads((tmp_path / "report.json").read_text())
    log = next(c for c in report["runtimes"][0]["outputs"] if c["output"] == "log")
    assert not log["passed"] and "NaN/Inf" in log["message"]


def test_equal_nan_through_the_python_api(tmp_path: Path) -> None:
    path = _model(tmp_path)
    report = run_parity(
        None, path, [{"x": X}], runtimes="ort:cpu:all", reference_outputs=[_expected()],
        criteria=Criteria(equal_nan=True), localise_failures=False,
    )  # fmt: skip
    assert report.passed and report.criteria.equal_nan
    assert any("equal_nan=True" in note for note in report.notes)


#: x whose sum, 6.1, bfloat16 rounds to 6.09375: 6e-3 from float32, outside float32's tolerance, inside bfloat16's.
X_ROUNDED = np.array([[0.3, 3.1, -1.0], [2.0, 0.7, 1.0]], dtype=np.float32)


def _bfloat16_saved(total: float) -> dict[str, np.ndarray]:
    import ml_dtypes

    saved = _without("log")
    saved["index"] = X_ROUNDED.argmax(axis=1).astype(np.int64)
    saved["positive"] = X_ROUNDED > 0
    saved["total"] = np.array(total, dtype=np.float32).astype(ml_dtypes.bfloat16)
    return saved


@pytest.mark.parametrize(("shift", "code"), [(0.0, 0), (0.25, 1)])
def test_a_bfloat16_output_saved_to_a_file_is_judged_at_bfloat16_tolerances(
    tmp_path: Path, shift: float, code: int
) -> None:
    """NumPy saves a bfloat16 array as raw 2-byte records (V2), which crashed the comparison (ValueError); read back
    as bfloat16, the float32 output is judged against it at bfloat16's defaults, and a real difference still fails."""
    saved = _bfloat16_saved(float(X_ROUNDED.sum()) + shift)
    assert _parity(tmp_path, saved, x=X_ROUNDED) == code
    report = json.loads((tmp_path / "report.json").read_text())
    total = [c for r in report["runtimes"] for c in r["outputs"] if c["output"] == "total"]
    assert len(total) == 2 and all(c["passed"] is (code == 0) for c in total)
    assert all(c["tolerance_source"] == "bfloat16 defaults (float32 ONNX output vs bfloat16 reference)" for c in total)


@pytest.mark.parametrize("kind", ["ml_dtypes", "torch"])
def test_a_bfloat16_reference_through_the_python_api_is_judged_at_bfloat16_tolerances(
    tmp_path: Path, kind: str
) -> None:
    """A bfloat16 ``ml_dtypes`` array was judged at float32's tolerances (so its own rounding failed it), and a
    ``torch.bfloat16`` tensor raised NumPy's TypeError."""
    saved: dict[str, object] = dict(_bfloat16_saved(float(X_ROUNDED.sum())))
    if kind == "torch":
        torch = pytest.importorskip("torch")
        saved["total"] = torch.tensor(float(X_ROUNDED.sum()), dtype=torch.bfloat16)
    report = run_parity(
        None, _model(tmp_path), [{"x": X_ROUNDED}], runtimes="ort:cpu:all", reference_outputs=[saved],  # type: ignore[list-item]
        localise_failures=False,
    )  # fmt: skip
    (result,) = report.runtimes
    total = next(c for c in result.outputs if c.output == "total")
    assert report.passed and total.tolerance.atol == pytest.approx(1e-2) and 0 < total.max_abs_error < 1e-2


def test_raw_records_other_than_bfloat16_are_refused_naming_the_output(tmp_path: Path) -> None:
    from runtime.errors import SavedDataError

    saved = {**_without("log"), "total": np.zeros((), dtype="V4")}
    with pytest.raises(SavedDataError, match=r"saved output 'total' of iteration 0 holds raw \|V4 records"):
        run_parity(None, _model(tmp_path), [{"x": X}], runtimes="ort:cpu:all", reference_outputs=[saved])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_runtime_returning_floats_for_an_integer_output_fails_as_a_wrong_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: type
) -> None:
    """A runtime that returned ArgMax's int64 indices as whole floats passed, compared within float tolerances."""
    from runtime.backends.reference import ReferenceEvaluatorBackend
    from runtime.parity import Status

    run = ReferenceEvaluatorBackend.run

    def floats_for_index(self: ReferenceEvaluatorBackend, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = run(self, inputs)
        return {**outputs, "index": outputs["index"].astype(dtype)}

    monkeypatch.setattr(ReferenceEvaluatorBackend, "run", floats_for_index)
    report = run_parity(
        None, _model(tmp_path), [{"x": X}], runtimes="reference", reference_outputs=[_without("log")],
        localise_failures=False,
    )  # fmt: skip
    (result,) = report.runtimes
    verdicts = {c.output: c for c in result.outputs}
    assert result.status is Status.FAILED and verdicts["total"].passed and verdicts["positive"].passed
    assert not verdicts["index"].passed
    assert verdicts["index"].message == (
        f"reference returned {np.dtype(dtype).name} for 'index', which the ONNX file declares int64: a wrong dtype "
        "(an integer / bool output is compared exactly, never within a float tolerance)"
    )
