"""The PyTorch model's outputs pair with the file's by the order recorded at export, not by graph position.

A graph tool that reorders a file's outputs (names and values kept) made parity fail a file that agrees: the
model's first tensor was compared with whatever output came first in the graph, under that output's name (found
by a tester). Exports now record the order (``bkn_export.output_order``); a file without it is paired by
position, and the report says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.export import export_onnx
from bkn_export.export.metadata import read_metadata
from runtime.backends.torch_eager import TorchEagerBackend
from runtime.model_io import OUTPUT_ORDER_METADATA, returned_output_order
from runtime.parity import run_parity


class _TwoHeads(nn.Module):
    """Two outputs of one shape and dtype: position is the only thing that tells them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.bn(self.conv(x))
        v = self.bn2(self.conv2(torch.relu(u)))
        return u + 0.5 * v, u - v


def _model(example: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = convert_batchnorm(_TwoHeads(), example)
    with torch.no_grad():
        for name in ("bn.running_mean", "bn2.running_mean"):
            model.get_buffer(name).uniform_(-1, 1)
        for name in ("bn.running_var", "bn2.running_var"):
            model.get_buffer(name).uniform_(0.5, 2.0)
    return model


def _export(mode: str, path: Path) -> tuple[nn.Module, dict[str, np.ndarray]]:
    example = torch.randn(2, 3, 6, 6)
    model = _model(example)
    if mode == "inference":
        export_onnx(model.eval(), (example,), path)
    else:
        export_onnx(model.train(), (example,), path, mode="training", running_stats_io=True)
    return model, {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)}


def _rewrite_outputs(source: Path, target: Path, edit: str) -> None:
    """``reverse``: the graph outputs reversed (names and values kept), as a graph tool may leave them;
    ``swap names``: the first two outputs' names exchanged (the values now differ from the names' PyTorch ones);
    ``drop metadata``: the recorded order removed (a file exported by another tool)."""
    model = onnx.load(source)
    graph = model.graph
    if edit == "reverse":
        outputs = list(graph.output)
        del graph.output[:]
        graph.output.extend(outputs[::-1])
    elif edit == "swap names":
        first, second = graph.output[0].name, graph.output[1].name
        renames = {first: second, second: first}
        for node in graph.node:
            for index, name in enumerate(node.output):
                if name in renames:
                    node.output[index] = renames[name]
        for output in graph.output[:2]:
            output.name = renames[output.name]
    elif edit == "drop metadata":
        kept = [prop for prop in model.metadata_props if prop.key != OUTPUT_ORDER_METADATA]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    onnx.save(model, target)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_exports_record_the_order_the_model_returns_its_outputs(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "model.onnx"
    _export(mode, path)
    model = onnx.load(path)
    order = read_metadata(model)["output_order"]
    assert order.startswith('["output_0", "output_1"')
    assert returned_output_order(model) == ([o.name for o in model.graph.output], None)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_reordered_outputs_still_pass(tmp_path: Path, mode: str) -> None:
    path, reordered = tmp_path / "model.onnx", tmp_path / "reordered.onnx"
    model, feed = _export(mode, path)
    _rewrite_outputs(path, reordered, "reverse")
    assert [o.name for o in onnx.load(reordered).graph.output][-1] == "output_0"
    report = run_parity(model, reordered, [feed], mode=mode, runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed, [(r.runtime, r.status, r.outputs) for r in report.runtimes]
    checked = {c.output for r in report.runtimes if r.ran for c in r.outputs}
    assert {"output_0", "output_1"} <= checked
    assert not any("paired" in note for note in report.notes)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_outputs_whose_names_were_swapped_still_fail(tmp_path: Path, mode: str) -> None:
    """The order is looked up by name, so a file whose named outputs hold the other tensor is caught."""
    path, swapped = tmp_path / "model.onnx", tmp_path / "swapped.onnx"
    model, feed = _export(mode, path)
    _rewrite_outputs(path, swapped, "swap names")
    report = run_parity(model, swapped, [feed], mode=mode, runtimes="ort:cpu:all", localise_failures=False)
    assert not report.passed
    failed = {c.output for r in report.runtimes if r.ran for c in r.outputs if not c.passed}
    assert failed == {"output_0", "output_1"}


def test_a_file_without_a_recorded_order_is_paired_by_position_and_says_so(tmp_path: Path) -> None:
    path, plain, plain_reordered = tmp_path / "model.onnx", tmp_path / "plain.onnx", tmp_path / "plain_rev.onnx"
    model, feed = _export("inference", path)
    _rewrite_outputs(path, plain, "drop metadata")
    report = run_parity(model, plain, [feed], mode="inference", runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed, [(r.runtime, r.status, r.outputs) for r in report.runtimes]
    note = next(note for note in report.notes if "paired" in note)
    assert "by position (output_0, output_1)" in note and "records no output order" in note

    # Without the record, a reordered file is compared by position: it fails, and the note says why.
    _rewrite_outputs(plain, plain_reordered, "reverse")
    report = run_parity(
        model, plain_reordered, [feed], mode="inference", runtimes="ort:cpu:all", localise_failures=False
    )
    assert not report.passed
    assert any("reordered after export would fail here" in note for note in report.notes)


def test_a_recorded_order_that_misses_an_output_falls_back_to_position(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    _export("inference", path)
    model = onnx.load(path)
    del model.graph.output[1]
    names, note = returned_output_order(model)  # removed: still paired by the record, with a note
    assert names == ["output_0", "output_1"]
    assert note is not None and "'output_1' recorded at export are not in the file" in note
    model = onnx.load(path)
    model.graph.output[1].name = "renamed"
    names, note = returned_output_order(model)
    assert names == ["output_0", "renamed"]
    assert note is not None and "not those its export recorded" in note


def test_the_pytorch_backend_keys_outputs_by_the_recorded_order(tmp_path: Path) -> None:
    """``TorchEagerBackend.load`` (a ``pytorch`` runtime in any run) reads the same order as the parity check."""
    path, reordered = tmp_path / "model.onnx", tmp_path / "reordered.onnx"
    model, feed = _export("inference", path)
    _rewrite_outputs(path, reordered, "reverse")
    backend = TorchEagerBackend(model, "inference")
    backend.load(str(reordered))
    outputs = backend.run(feed)
    with torch.no_grad():
        first, second = model.eval()(torch.from_numpy(feed["x"]))
    np.testing.assert_array_equal(outputs["output_0"], first.numpy())
    np.testing.assert_array_equal(outputs["output_1"], second.numpy())
    assert backend.notes == []


def test_the_runtime_reads_the_key_the_export_writes() -> None:
    """``runtime`` keeps its own copy of the key (reading a file must not import the exporter)."""
    from bkn_export.export.metadata import METADATA_PREFIX, OUTPUT_ORDER_KEY

    assert OUTPUT_ORDER_METADATA == METADATA_PREFIX + OUTPUT_ORDER_KEY


def test_outputs_removed_after_export_pair_by_the_recorded_order(tmp_path: Path) -> None:
    """The first output pruned away (``onnx.utils.extract_model`` keeping ``output_1``): the model's second tensor is
    still compared with ``output_1``, the pruned one with nothing, and a note says so."""
    path, pruned = tmp_path / "model.onnx", tmp_path / "pruned.onnx"
    model, feed = _export("inference", path)
    onnx.utils.extract_model(str(path), str(pruned), ["x"], ["output_1"])
    proto = onnx.load(pruned)
    proto.metadata_props.extend(onnx.load(path).metadata_props)  # extract_model keeps no metadata
    onnx.save(proto, pruned)
    report = run_parity(model, pruned, [feed], mode="inference", runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed, [(r.runtime, r.status, r.outputs) for r in report.runtimes]
    assert any("'output_0' recorded at export are not in the file" in note for note in report.notes)


@pytest.mark.parametrize("recorded", ['[1, "output_0"]', '[["output_0"], "output_1"]', '{"a": 1}', "not json"])
def test_a_corrupt_recorded_order_falls_back_to_position(tmp_path: Path, recorded: str) -> None:
    path = tmp_path / "model.onnx"
    _export("inference", path)
    model = onnx.load(path)
    next(p for p in model.metadata_props if p.key == OUTPUT_ORDER_METADATA).value = recorded
    names, note = returned_output_order(model)
    assert names == ["output_0", "output_1"]
    assert note is not None and "not those its export recorded" in note
