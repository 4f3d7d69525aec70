"""Polygraphy interop: our JSON is what the installed Polygraphy reads and writes; its error statistics, ours.

``runtime.polygraphy_io`` never imports Polygraphy; these tests prove the round trip
against Polygraphy 0.53.x itself, in both on-disk forms (one file, a folder of
per-iteration files), and that ``--check-error-stat`` judges as Polygraphy's comparator does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_runtime_support import digits_inputs, exported_digits, trained_digits

from runtime import polygraphy_io
from runtime.compare import Criteria, Tolerance, compare_output
from runtime.errors import SavedDataError

polygraphy = pytest.importorskip("polygraphy")


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {"x": rng.standard_normal((2, 1, 8, 8)).astype(np.float32), "k": np.arange(3, dtype=np.int64)},
        {"x": rng.standard_normal((5, 1, 8, 8)).astype(np.float16), "k": np.arange(4, dtype=np.int64)},
    ]


def _equal(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        assert list(fa) == list(fb)
        for name in fa:
            assert fa[name].dtype == fb[name].dtype
            np.testing.assert_array_equal(fa[name], fb[name])


@pytest.mark.parametrize("form", ["inputs.json", "inputs_dir"])
def test_inputs_we_write_are_what_polygraphy_loads(tmp_path: Path, form: str) -> None:
    from polygraphy.comparator import DataLoader  # noqa: F401  (the loader `polygraphy run` uses)
    from polygraphy.json import load_json
    from polygraphy.json.serde import list_iteration_files

    path = polygraphy_io.save_inputs(tmp_path / form, _feeds())
    if form.endswith(".json"):
        loaded = load_json(str(path))
    else:
        loaded = [load_json(f) for f in list_iteration_files(str(path))]
    _equal([dict(f) for f in loaded], _feeds())


@pytest.mark.parametrize("form", ["inputs.json", "inputs_dir"])
def test_inputs_polygraphy_writes_are_what_we_load(tmp_path: Path, form: str) -> None:
    from polygraphy.json import save_json
    from polygraphy.json.serde import IterationWriter

    target = tmp_path / form
    if form.endswith(".json"):
        save_json(_feeds(), str(target))
    else:
        with IterationWriter(str(target)) as writer:
            for feed in _feeds():
                writer.append(feed)
    _equal(polygraphy_io.load_inputs(target), _feeds())


def test_outputs_round_trip_through_polygraphy_run_results(tmp_path: Path) -> None:
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    outputs = [
        {"linear": np.full((2, 10), 0.5, np.float32)},
        {"linear": np.arange(20, dtype=np.float32).reshape(2, 10)},
    ]
    ours = polygraphy_io.save_outputs(tmp_path / "ref.json", outputs, runner="pytorch", seconds=[0.1, 0.2])
    theirs = RunResults.load(str(ours))
    assert list(theirs.keys()) == ["pytorch"]
    for iteration, expected in zip(theirs["pytorch"], outputs):
        assert iteration.runner_name == "pytorch"
        np.testing.assert_array_equal(iteration["linear"], expected["linear"])
    # and back: a RunResults Polygraphy saves, with two runners
    results = RunResults()
    results.add(
        [IterationResult({"linear": o["linear"]}, runner_name="onnxrt-runner") for o in outputs],
        runner_name="onnxrt-runner",
    )
    results.add(
        [IterationResult({"linear": o["linear"] + 1}, runner_name="trt-runner") for o in outputs],
        runner_name="trt-runner",
    )
    results.save(str(tmp_path / "theirs.json"))
    loaded = polygraphy_io.load_outputs(tmp_path / "theirs.json")
    assert list(loaded) == ["onnxrt-runner", "trt-runner"]
    np.testing.assert_array_equal(loaded["trt-runner"][1]["linear"], outputs[1]["linear"] + 1)


def test_outputs_folder_form_round_trip(tmp_path: Path) -> None:
    from polygraphy.comparator import RunResults

    outputs = [{"y": np.ones(3, np.float32) * i} for i in range(3)]
    folder = polygraphy_io.save_outputs(tmp_path / "outs", outputs)
    streamed = list(RunResults.load_streaming(str(folder)))
    assert len(streamed) == 3
    np.testing.assert_array_equal(streamed[2]["pytorch"][0]["y"], outputs[2]["y"])
    assert [o["y"].tolist() for o in polygraphy_io.load_outputs(folder)["pytorch"]] == [
        o["y"].tolist() for o in outputs
    ]


def test_reading_imports_no_polygraphy(tmp_path: Path) -> None:
    polygraphy_io.save_inputs(tmp_path / "in.json", _feeds())
    code = (
        "import sys; from runtime import polygraphy_io as p; "
        f"p.load_inputs({str(tmp_path / 'in.json')!r}); print('polygraphy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a Polygraphy JSON file"),
        ('[{"x": {"array": "AAAA", "polygraphy_class": "ndarray"}}]', "cannot be decoded"),
        ('[{"x": {"polygraphy_class": "Mystery"}}]', "Polygraphy 'Mystery'"),
    ],
)
def test_corrupt_json_is_a_saved_data_error_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SavedDataError, match=message) as caught:
        polygraphy_io.load_inputs(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("stat", ["max", "mean", "median", "quantile"])
def test_error_statistics_match_polygraphys_comparator(stat: str) -> None:
    """Same arrays, same atol/rtol: our verdict equals Polygraphy's CompareFunc.simple verdict."""
    from polygraphy.comparator import CompareFunc
    from polygraphy.comparator.struct import IterationResult

    rng = np.random.default_rng(7)
    reference = rng.standard_normal(4000).astype(np.float32)
    reference[:5] = 0.0  # exercises Polygraphy's epsilon on zero references
    verdicts = []
    for scale, atol, rtol in [(1e-3, 5e-4, 1e-3), (1e-3, 2e-3, 1e-9), (1e-2, 1e-4, 1e-2), (1e-5, 1e-4, 1e-4)]:
        actual = reference + (rng.standard_normal(4000) * scale).astype(np.float32)
        compare = CompareFunc.simple(atol=atol, rtol=rtol, check_error_stat=stat, error_quantile=0.9)
        theirs = compare(
            IterationResult({"y": actual}, runner_name="a"), IterationResult({"y": reference}, runner_name="r")
        )
        criteria = Criteria(stat, error_quantile=0.9)
        ours = compare_output("y", reference, actual, Tolerance(atol, rtol), criteria=criteria)
        assert ours.passed == bool(theirs["y"]), (stat, scale, atol, rtol)
        verdicts.append(ours.passed)
    assert True in verdicts and False in verdicts  # both verdicts exercised


def test_elementwise_rule_differs_from_polygraphys_elemwise_as_documented() -> None:
    """docs/polygraphy.md: atol 1e-5, rtol 1e-4, r = 1, error 1.05e-4: Polygraphy fails it, we pass it."""
    from polygraphy.comparator import CompareFunc
    from polygraphy.comparator.struct import IterationResult

    reference = np.ones(8, np.float64)
    actual = reference + 1.05e-4
    compare = CompareFunc.simple(atol=1e-5, rtol=1e-4, check_error_stat="elemwise")
    theirs = compare(
        IterationResult({"y": actual}, runner_name="a"), IterationResult({"y": reference}, runner_name="r")
    )
    assert not bool(theirs["y"])
    assert compare_output("y", reference, actual, Tolerance(1e-5, 1e-4)).passed
    # above atol + rtol*|r| both fail
    assert not compare_output("y", reference, reference + 1.2e-4, Tolerance(1e-5, 1e-4)).passed


def test_elemwise_is_accepted_as_elementwise() -> None:
    assert Criteria("elemwise").error_stat == "elementwise"


def test_max_mismatch_and_cosine_min() -> None:
    reference = np.linspace(-1, 1, 1000, dtype=np.float32)
    actual = reference.copy()
    actual[:5] += 1.0  # 0.5 % of the elements far off
    tolerance = Tolerance(1e-5, 1e-4)
    assert not compare_output("y", reference, actual, tolerance).passed
    assert compare_output("y", reference, actual, tolerance, criteria=Criteria(max_mismatch=0.01)).passed
    assert not compare_output("y", reference, actual, tolerance, criteria=Criteria(max_mismatch=0.001)).passed
    loose = Criteria(max_mismatch=0.01, cosine_min=0.999999)
    result = compare_output("y", reference, actual, tolerance, criteria=loose)
    assert not result.passed and "cosine similarity" in result.message


def test_cosine_of_all_nan_output_is_not_shown_as_one() -> None:
    reference = np.ones(4, np.float32)
    result = compare_output("y", reference, np.full(4, np.nan, np.float32), Tolerance(1e-5, 1e-4))
    assert not result.passed and np.isnan(result.cosine_similarity)


def test_save_outputs_then_compare_without_pytorch(tmp_path: Path) -> None:
    """`bkn parity SPEC M.onnx --save-outputs`, then `bkn parity M.onnx --load-outputs --load-inputs`.

    Exit 0 against the saved PyTorch outputs, 1 when a saved output is off.
    """
    import torch

    from bkn_export.cli import main

    checkpoint = tmp_path / "digits.pt"
    torch.save(trained_digits().state_dict(), checkpoint)
    onnx_path = str(exported_digits("inference"))
    spec = "bkn_export.demo.models:digits_resnet"
    ref = tmp_path / "ref.json"
    argv = [
        "parity", spec, onnx_path, "--checkpoint", str(checkpoint), "--runtimes", "ort:cpu:all",
        "--iterations", "2", "--shape-set", "x:3,1,8,8", "--shape-set", "x:1,1,8,8", "--save-outputs", str(ref),
        "--json", str(tmp_path / "r.json"),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["iterations"] == 4 and report["seed"] == 0
    assert [s[0]["shape"] for s in report["input_sets"]] == [[3, 1, 8, 8], [3, 1, 8, 8], [1, 1, 8, 8], [1, 1, 8, 8]]
    inputs = tmp_path / "ref_inputs.json"
    assert inputs.is_file()
    common = [
        "parity",
        onnx_path,
        "--load-outputs",
        str(ref),
        "--load-inputs",
        str(inputs),
        "--runtimes",
        "ort:cpu:all,reference",
    ]
    assert main(common) == 0
    data = json.loads(ref.read_text())
    first = polygraphy_io.load_outputs(ref)["pytorch"]
    output = onnx.load(onnx_path).graph.output[0].name
    first[0][output] = first[0][output] + 0.1
    polygraphy_io.save_outputs(tmp_path / "off.json", first)
    assert data["lst"][0][0] == "pytorch"
    assert main([*common[:3], str(tmp_path / "off.json"), *common[4:]]) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--load-outputs", "REF"], "--load-outputs needs the inputs"),
        (["--load-inputs", "IN", "--load-outputs", "MISSING"], "does not exist"),
    ],
)
def test_load_outputs_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from bkn_export.cli import main

    polygraphy_io.save_inputs(tmp_path / "in.json", [{"x": digits_inputs(2)[0]}])
    output = onnx.load(exported_digits("inference")).graph.output[0].name
    polygraphy_io.save_outputs(tmp_path / "ref.json", [{output: np.zeros((2, 10), np.float32)}])
    mapping = {"REF": str(tmp_path / "ref.json"), "IN": str(tmp_path / "in.json"), "MISSING": str(tmp_path / "no.json")}
    argv = ["parity", str(exported_digits("inference")), *[mapping.get(a, a) for a in extra]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_npz_inputs_load_as_one_set_and_pickles_are_refused(tmp_path: Path) -> None:
    feed = _feeds()[0]
    np.savez(tmp_path / "in.npz", **feed)
    _equal(polygraphy_io.load_inputs(tmp_path / "in.npz"), [feed])
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SavedDataError, match=r"cannot read it as an \.npz archive"):
        polygraphy_io.load_inputs(tmp_path / "pickled.npz")
