"""Random parity inputs take the export example's size in symbolic dims (docs QA, 2026-12-07).

A ``dynamic_spatial`` file leaves H and W symbolic; parity's random inputs gave them size 1. A conv without padding
then failed to run in PyTorch, with a hint to "pass the model that was exported" (it was), and a network that runs
at 1 x 1 passed on that degenerate input with no note. The export now records its example shapes
(``bkn_export.example_shapes``) and parity takes them for symbolic dims other than the batch (which stays 2); where a
file records none, the report notes the inputs checked only at size 1, and the PyTorch error says to give shapes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bkn_export import BatchKalmanNorm2d, wire_chain
from bkn_export.cli import main
from bkn_export.export import export_onnx
from bkn_export.export.metadata import read_metadata
from runtime.errors import BKNInputError
from runtime.model_io import (
    EXAMPLE_SHAPES_METADATA,
    TensorSpec,
    default_shape,
    example_shapes,
    random_inputs,
    symbol_conflicts_note,
    unsized_dims_note,
)
from runtime.parity import run_parity


def _valid_conv() -> nn.Module:
    """Runs only where H, W >= 5 (two unpadded 3 x 3 convs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), BatchKalmanNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3), BatchKalmanNorm2d(2))
    wire_chain(model, torch.randn(2, 1, 8, 8))
    return model.eval()


def _padded_conv() -> nn.Module:
    """Runs at any H, W (1 x 1 included)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), BatchKalmanNorm2d(2), nn.ReLU())
    return model.eval()


def _export(model: nn.Module, path: Path, mode: str = "inference") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, torch.randn(2, 1, 8, 8), path, mode=mode, dynamic_spatial=True)
    return path


def _without_example_shapes(path: Path) -> Path:
    """The file as another exporter (or an older version) writes it: no example shapes recorded."""
    proto = onnx.load(str(path))
    kept = [prop for prop in proto.metadata_props if prop.key != EXAMPLE_SHAPES_METADATA]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    stripped = path.with_name(f"stripped_{path.name}")
    onnx.save(proto, str(stripped))
    return stripped


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_the_export_records_its_example_shapes(tmp_path: Path, mode: str) -> None:
    path = _export(_valid_conv(), tmp_path / f"{mode}.onnx", mode)
    proto = onnx.load(str(path))
    assert json.loads(read_metadata(proto)["example_shapes"]) == {"input": [2, 1, 8, 8]}
    assert example_shapes(proto) == {"input": (2, 1, 8, 8)}


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_parity_of_a_dynamic_spatial_file_runs_at_the_example_size(tmp_path: Path, mode: str) -> None:
    model = _valid_conv()
    report = run_parity(model, _export(model, tmp_path / f"{mode}.onnx", mode), runtimes="ort:cpu:all")
    assert report.passed, report.notes
    assert [spec.shape for spec in report.inputs] == [(2, 1, 8, 8)]
    assert not any("size 1" in note for note in report.notes)


def test_without_recorded_shapes_a_model_that_cannot_run_at_size_1_names_the_shapes(tmp_path: Path) -> None:
    model = _valid_conv()
    stripped = _without_example_shapes(_export(model, tmp_path / "valid.onnx"))
    with pytest.raises(BKNInputError, match=r"symbolic dims ran at size 1 .*--input-shape"):
        run_parity(model, stripped, runtimes="ort:cpu:all")
    given = {"input": np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)}
    assert run_parity(model, stripped, [given], runtimes="ort:cpu:all").passed


def test_without_recorded_shapes_a_size_1_check_is_named_in_the_report(tmp_path: Path) -> None:
    model = _padded_conv()
    report = run_parity(
        model, _without_example_shapes(_export(model, tmp_path / "padded.onnx")), runtimes="ort:cpu:all"
    )
    assert report.passed
    assert [spec.shape for spec in report.inputs] == [(2, 1, 1, 1)]
    (note,) = [note for note in report.notes if "size 1" in note]
    assert "'input' (dim(s) 2, 3; shape (2, 1, 1, 1))" in note and "--input-shape" in note


def test_the_cli_takes_the_example_size_for_generated_input_sets(tmp_path: Path) -> None:
    path = _export(_valid_conv(), tmp_path / "valid.onnx")
    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\nfrom torch import nn\nfrom bkn_export import BatchKalmanNorm2d, wire_chain\n\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Conv2d(1, 2, 3), BatchKalmanNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3), "
        "BatchKalmanNorm2d(2))\n"
        "    wire_chain(model, torch.randn(2, 1, 8, 8))\n    return model\n"
    )
    report = tmp_path / "report.json"
    argv = [f"{factory}:build", str(path), "--runtimes", "ort:cpu:all", "--iterations", "2", "--json", str(report)]
    assert main(["parity", *argv]) == 0
    written = json.loads(report.read_text())
    assert [[spec["shape"] for spec in specs] for specs in written["input_sets"]] == [[[2, 1, 8, 8]]] * 2


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"x": "2,1,8,8"}',
        '{"x": [2, -1, 8, 8]}',
        '{"x": [2, true, 8, 8]}',
        '{"x": [2.5]}',
        '{"x": [2, 1, 0, 8]}',  # an empty example: the export refuses one, so an edited entry
        '{"x": [2, 1, 100000, 100000]}',  # more than random inputs are made unasked
    ],
)
def test_a_malformed_entry_records_no_example_shape(text: str) -> None:
    proto = onnx.ModelProto()
    proto.metadata_props.add(key=EXAMPLE_SHAPES_METADATA, value=text)
    assert example_shapes(proto) == {}


def test_an_example_of_another_rank_or_fixed_dims_is_not_taken() -> None:
    spec = TensorSpec("x", "float32", ("batch", 3, "height", "width"))
    assert default_shape(spec) == (2, 3, 1, 1)
    assert default_shape(spec, example=(4, 3, 16, 12)) == (2, 3, 16, 12)  # the batch stays 2
    assert default_shape(spec, example=(4, 1, 16, 12)) == (2, 3, 1, 1)  # disagrees on a fixed dim
    assert default_shape(spec, example=(3, 16, 12)) == (2, 3, 1, 1)  # another rank
    assert default_shape(TensorSpec("s", "int64", ()), example=()) == ()


def test_the_note_names_only_symbolic_dims_held_at_1_in_every_set() -> None:
    spec = TensorSpec("x", "float32", ("batch", 3, "height", "width"))
    one = {"x": np.zeros((2, 3, 1, 1), np.float32)}
    wide = {"x": np.zeros((2, 3, 1, 7), np.float32)}
    assert unsized_dims_note([spec], [one, wide]) is not None and "dim(s) 2;" in str(
        unsized_dims_note([spec], [one, wide])
    )
    assert unsized_dims_note([spec], [{"x": np.zeros((1, 3, 4, 4), np.float32)}]) is None  # a batch of 1 is no concern
    assert unsized_dims_note([TensorSpec("x", "float32", (1, 3, 1, 1))], [one]) is None  # fixed dims are the file's


def test_a_size_given_for_one_input_holds_for_every_dim_of_that_name() -> None:
    """Two inputs sharing the file's symbols (x * mask): a shape given for x alone sets mask's dims of the same name
    (before, mask took its recorded 8 x 8 against x's 16 x 16, and PyTorch failed with a hint to pass the model)."""
    specs = [
        TensorSpec("x", "float32", ("batch", 1, "height", "width")),
        TensorSpec("mask", "float32", ("batch", 1, "height", "width")),
        TensorSpec("other", "float32", ("batch", 3, "depth")),
        TensorSpec("unnamed", "float32", ("?", "?")),
    ]
    examples = {"mask": (2, 1, 8, 8), "other": (2, 3, 5), "unnamed": (4, 6)}
    made = random_inputs(specs, {"x": (4, 1, 16, 12)}, examples=examples)
    assert made["mask"].shape == (4, 1, 16, 12)
    assert made["other"].shape == (4, 3, 5)  # the batch is one symbol; its own dims keep the example's size
    assert made["unnamed"].shape == (2, 6)  # dims without a name are not one symbol


def test_defaults_give_one_size_per_dim_name() -> None:
    """a: [N, s], b: [s, N] (y = a * b^T): b follows the sizes a's defaults took (before: b (2, 1) against a (2, 1),
    which ONNX Runtime broadcast to a (2, 2) output the file says cannot occur)."""
    specs = [TensorSpec("a", "float32", ("N", "s")), TensorSpec("b", "float32", ("s", "N"))]
    assert random_inputs(specs)["b"].shape == (1, 2)
    assert random_inputs(specs, examples={"a": (2, 9)})["b"].shape == (9, 2)
    assert random_inputs(specs, {"b": (5, 3)})["a"].shape == (3, 5)


def test_given_sizes_that_disagree_on_a_dim_name_are_noted() -> None:
    specs = [TensorSpec("a", "float32", ("N", "s")), TensorSpec("b", "float32", ("s", "N"))]
    agreeing = {"a": np.zeros((3, 5), np.float32), "b": np.zeros((5, 3), np.float32)}
    assert symbol_conflicts_note(specs, [agreeing]) is None
    disagreeing = {"a": np.zeros((3, 5), np.float32), "b": np.zeros((6, 9), np.float32)}
    note = symbol_conflicts_note(specs, [agreeing, disagreeing])
    assert note is not None and "'N' (3 in 'a', 9 in 'b'; input set 1)" in note and "'s' (5 in 'a', 6 in 'b'" in note


def test_recorded_shapes_that_fit_no_input_are_named_with_the_size_1_note(tmp_path: Path) -> None:
    """An input renamed after export: its recorded example shape fits no input, so the check ran at size 1; the note
    says so and names the recorded entry, instead of leaving the user to wonder why the export's size was not used."""
    model = _padded_conv()
    path = _export(model, tmp_path / "padded.onnx")
    proto = onnx.load(str(path))
    old = proto.graph.input[0].name
    proto.graph.input[0].name = "renamed"
    for node in proto.graph.node:
        node.input[:] = ["renamed" if name == old else name for name in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, str(renamed))
    report = run_parity(model, renamed, runtimes="ort:cpu:all")
    (note,) = [note for note in report.notes if "size 1" in note]
    assert f"records example shapes for {old!r}, which no input of that name and rank takes" in note
    spec = TensorSpec("x", "float32", ("batch", 3, "height", "width"))
    one = {"x": np.zeros((2, 3, 1, 1), np.float32)}
    assert "records example shapes" not in str(unsized_dims_note([spec], [one], {"x": (2, 3, 8, 8)}))
    assert "for 'x'" in str(unsized_dims_note([spec], [one], {"x": (2, 4, 8, 8)}))  # its fixed dim disagrees
