"""A repro bundle for a runtime that returned no output the bundle expects, and random inputs of a range their dtype
holds (cold QA, 2026-12-06).

``_reproduces`` indexed the runtime's outputs by the expected names: a runtime that named an output otherwise (as
OpenVINO did for a folded trailing Identity) raised ``KeyError`` from ``--repro``, which lost the whole run's report
and left a bundle without its README. Checked with the ONNX reference evaluator on a real file.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper

from runtime.backends.reference import ReferenceEvaluatorBackend
from runtime.compare import TolerancePolicy
from runtime.repro import _reproduces


def test_an_expected_output_the_runtime_did_not_return_is_named_not_a_key_error(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    model.ir_version = 9
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    feed = {"x": np.ones((2, 3), np.float32)}
    entry = SimpleNamespace(name="onnx-reference", make=ReferenceEvaluatorBackend)
    policy = TolerancePolicy()
    assert _reproduces(entry, path, feed, {"y": np.ones((2, 3), np.float32)}, policy).startswith("no ")
    verdict = _reproduces(entry, path, feed, {"w": np.ones((2, 3), np.float32)}, policy)
    assert verdict == "yes (the runtime returned no output 'w')"


def test_a_value_range_beyond_the_inputs_dtype_is_refused_by_name() -> None:
    """``--val-range 0,1e39`` on a float32 input was reported as "holds 268 NaN/Inf value(s)": the user gave none."""
    import pytest

    from runtime.errors import BKNInputError
    from runtime.model_io import TensorSpec, random_inputs

    spec = TensorSpec("x", "float32", (2, 3))
    with pytest.raises(BKNInputError, match=r"input 'x': the value range \[0, 1e\+39\) exceeds float32's largest"):
        random_inputs([spec], val_range={None: (0.0, 1e39)})
    half = TensorSpec("h", "float16", (2, 3))
    with pytest.raises(BKNInputError, match=r"exceeds float16's largest finite value 6\.55e"):
        random_inputs([half], val_range={"h": (-1e5, 0.0)})
    assert random_inputs([spec], val_range={None: (-1e30, 1e30)})["x"].dtype == np.float32
