"""A repro bundle for a runtime that returned no output the bundle expects, and random inputs of a range their dtype
holds, and inputs bound by name (cold QA, 2026-12-06).

``_reproduces`` indexed the runtime's outputs by the expected names: a runtime that named an output otherwise (as
OpenVINO did for a folded trailing Identity) raised ``KeyError`` from ``--repro``, which lost the whole run's report
and left a bundle without its README. Checked with the ONNX reference evaluator on a real file.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from runtime.backends.reference import ReferenceEvaluatorBackend
from runtime.compare import TolerancePolicy
from runtime.parity import run_parity
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


class _TwoInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * 2 + y


def test_inputs_bound_by_name_in_another_order_than_forward_s_are_named(tmp_path: Path) -> None:
    """A file whose positional inputs were named ('y', 'x') fails everywhere; the run says the inputs were bound by
    name (it blamed the reference's ONNX semantics only)."""
    path = tmp_path / "swapped.onnx"
    example = (torch.randn(2, 3), torch.randn(2, 3))
    torch.onnx.export(_TwoInputs(), example, str(path), dynamo=False, input_names=["y", "x"], output_names=["out"])
    report = run_parity(_TwoInputs(), path, runtimes="reference")
    assert not report.passed
    assert any("['y', 'x'] are bound to forward's parameters by name" in note for note in report.notes)
    same = tmp_path / "same.onnx"
    torch.onnx.export(_TwoInputs(), example, str(same), dynamo=False, input_names=["x", "y"], output_names=["out"])
    assert not [note for note in run_parity(_TwoInputs(), same, runtimes="reference").notes if "bound to" in note]
