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
