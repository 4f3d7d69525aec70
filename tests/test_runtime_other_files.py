"""The parity check on files bkn_export did not write, against saved outputs: what a tester found running it on
ONNX's own backend test data (every verdict there agreed with a direct check; these are the rough edges)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from runtime import polygraphy_io
from runtime.compare import Tolerance, compare_output
from runtime.errors import BKNInputError
from runtime.model_io import STANDARD_DOMAINS
from runtime.parity import Status, run_parity


def test_an_optional_output_is_the_same_value_on_every_runtime(tmp_path: Path) -> None:
    """ONNX Runtime returns an optional's tensor, the reference evaluator ``[tensor]``: one of them always failed."""
    optional = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 3]))
    graph = helper.make_graph(
        [helper.make_node("Optional", ["x"], ["y"])], "optional",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])], [helper.make_value_info("y", optional)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path / "optional.onnx"
    onnx.save(model, path)
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    report = run_parity(
        None, path, {"x": x}, mode="inference", runtimes="ort:cpu:all,reference", reference_outputs=[{"y": x}]
    )
    assert [r.status for r in report.runtimes] == [Status.PASSED, Status.PASSED]


def test_a_failing_integer_output_reports_its_error_statistics() -> None:
    reference = np.arange(10, dtype=np.int64)
    actual = reference.copy()
    actual[3] += 2
    result = compare_output("n", reference, actual, Tolerance(0.0, 0.0))
    assert not result.passed
    assert result.max_abs_error == 2 and result.stat_abs_error == 2
    assert result.mean_abs_error == pytest.approx(0.2) and result.max_rel_error == pytest.approx(2 / 3)


def test_string_arrays_are_refused_by_the_polygraphy_json_writer(tmp_path: Path) -> None:
    with pytest.raises(BKNInputError, match="ONNX string tensors"):
        polygraphy_io.save_inputs(tmp_path / "in.json", [{"x": np.array(["a", "b"], dtype=object)}])


def test_the_training_preview_domain_is_standard() -> None:
    """Gradient and optimizer ops (``ai.onnx.preview.training``) were called custom ops needing a library."""
    assert "ai.onnx.preview.training" in STANDARD_DOMAINS


def _renamed_training_file(tmp_path: Path, keep_metadata: bool) -> tuple[object, Path]:
    """A training export of a two-layer model whose BatchKalmanNorm nodes and function another tool renamed to
    ``p_BatchKalmanNorm`` (the file still runs: the function body moved with the name)."""
    import torch
    from support.small_models import two_layer_classifier

    from bkn_export.export import export_onnx

    model = two_layer_classifier().eval()
    path = tmp_path / "renamed.onnx"
    export_onnx(model, (torch.randn(2, 3, 8, 8),), path, mode="training")
    onnx_model = onnx.load(path)
    for node in onnx_model.graph.node:
        if node.op_type == "BatchKalmanNorm":
            node.op_type = "p_BatchKalmanNorm"
    for function in onnx_model.functions:
        if function.name == "BatchKalmanNorm":
            function.name = "p_BatchKalmanNorm"
    if not keep_metadata:
        del onnx_model.metadata_props[:]
    onnx.save(onnx_model, path)
    return model, path


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_renamed_bkn_op_nodes_are_named_in_a_note_and_keep_the_training_mode(
    tmp_path: Path, keep_metadata: bool
) -> None:
    """Without the mode metadata such a file was taken for an inference export with "no ai.bkn nodes" and failed
    against the eval forward; with it, nothing said that the BKN op was there under another name."""
    from runtime.model_io import declared_mode

    model, path = _renamed_training_file(tmp_path, keep_metadata)
    assert declared_mode(onnx.load(path)) == "training"
    report = run_parity(model, path, runtimes="ort:cpu:all", localise_failures=False)
    assert report.mode == "training" and report.passed
    (note,) = [note for note in report.notes if "renamed" in note]
    assert "'1' (ai.bkn::p_BatchKalmanNorm), '4' (ai.bkn::p_BatchKalmanNorm)" in note
