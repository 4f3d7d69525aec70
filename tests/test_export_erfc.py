"""The training export's erfc (:mod:`bkn_export.export.erfc`): relative accuracy in the tail.

torch.onnx translates ``erfc`` as ``1 − Erf``, which in float32 keeps no digit of erfc(x)
from x ≈ 4 on; the chain's Gaussian moments (Φ in the ReLU and piecewise moments) need it.
Each check runs the exported graph in ONNX Runtime and in ``onnx.reference`` and compares
with float64 truth (``math.erfc``, PyTorch float64).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from bkn_export import moments
from bkn_export.export.op.translation import translation_table


class _Erfc(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfc(x)


class _ReluMoments(nn.Module):
    def forward(self, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return moments.elementwise_moments("relu", mean, variance)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> onnx.ModelProto:
    program = torch.onnx.export(
        module, args, dynamo=True, custom_translation_table=translation_table(), optimize=True, verbose=False
    )
    assert program is not None
    program.save(str(path))
    return onnx.load(str(path))


def _run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feeds), ReferenceEvaluator(model).run(None, feeds)]  # type: ignore[list-item]


def _relative(actual: np.ndarray, truth: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - truth) / np.abs(truth)))


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input]


def test_float32_erfc_is_relatively_accurate_in_its_tail(tmp_path: Path) -> None:
    # up to 9: erfc(9) = 4e-37 is still a normal float32 (erfc(10) = 2e-45 would be a subnormal)
    x = np.concatenate([np.linspace(-6.0, 9.0, 3001), [0.0, 3.0, 4.0, 5.0]]).astype(np.float32)
    model = _export(_Erfc(), (torch.from_numpy(x),), tmp_path / "erfc.onnx")
    assert not [n for n in model.graph.node if n.op_type == "Erf"], "an Erf node is left (1 − Erf cancels)"
    truth = np.array([math.erfc(float(v)) for v in x])
    for values in _run_both(model, {_graph_inputs(model)[0]: x}):
        # 1 − Erf: erfc(4) = 1.5e-8 came out as 0 or 6e-8 (relative error 1 and more)
        assert _relative(values[0], truth) < 1e-6


def test_float32_erfc_of_infinities_and_nan_is_torchs(tmp_path: Path) -> None:
    """erfc(+inf) = 0, erfc(-inf) = 2 (not inf - inf = NaN inside the formula), NaN stays NaN, and far arguments
    underflow to exactly 0 / 2 as in torch."""
    x = np.array([np.inf, -np.inf, np.nan, 11.0, 30.0, 1e30, -30.0, -1e30], dtype=np.float32)
    model = _export(_Erfc(), (torch.from_numpy(x),), tmp_path / "erfc_inf.onnx")
    expected = torch.special.erfc(torch.from_numpy(x)).numpy()
    for values in _run_both(model, {_graph_inputs(model)[0]: x}):
        np.testing.assert_array_equal(values[0], expected)


def test_float64_erfc_keeps_one_minus_erf(tmp_path: Path) -> None:
    """float64 keeps torch.onnx's 1 − Erf, unchanged: the float32 fit's 1.2e-7 would be far from a
    float64 reference. (What runs it is the engine's: ONNX Runtime has no float64 Erf kernel, and
    onnx.reference's Erf is off by up to 3e-8 in float64.)"""
    x = np.linspace(-6.0, 6.0, 1201)
    model = _export(_Erfc(), (torch.from_numpy(x),), tmp_path / "erfc64.onnx")
    assert sorted(n.op_type for n in model.graph.node) == ["Erf", "Sub"]
    (values,) = ReferenceEvaluator(model).run(None, {_graph_inputs(model)[0]: x})
    assert values.dtype == np.float64


def test_float16_erfc_is_computed_in_float32(tmp_path: Path) -> None:
    x = np.linspace(-2.0, 2.5, 91).astype(np.float16)
    model = _export(_Erfc(), (torch.from_numpy(x),), tmp_path / "erfc16.onnx")
    truth = np.array([math.erfc(float(v)) for v in x])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (values,) = session.run(None, {_graph_inputs(model)[0]: x})
    assert values.dtype == np.float16
    assert _relative(values, truth) < 2 * 2.0**-11  # float16 rounding of a float32 result


def test_exported_relu_moments_are_as_accurate_as_pytorch_float32(tmp_path: Path) -> None:
    """The ReLU moments the chain pushes through a ReLU, exported: E and Var of ReLU(N(μ, 1)) for
    μ/σ from −4 to 6, against PyTorch float64, are as close as PyTorch float32's evaluation of the
    same formulas (whose own cancellation reaches 3.4e-5 of Var at μ = −4). With 1 − Erf, Φ(−4)
    = 3.2e-5 carried an absolute 6e-8: 0.5 % of E and 4.7 % of Var at μ = −4."""
    mean = np.linspace(-4.0, 6.0, 201).astype(np.float32)
    variance = np.ones_like(mean)
    model = _export(
        _ReluMoments(), (torch.from_numpy(mean), torch.from_numpy(variance)), tmp_path / "relu_moments.onnx"
    )
    truth = [
        t.numpy()
        for t in moments.elementwise_moments(
            "relu", torch.from_numpy(mean).double(), torch.from_numpy(variance).double()
        )
    ]
    single = moments.elementwise_moments("relu", torch.from_numpy(mean), torch.from_numpy(variance))
    names = _graph_inputs(model)
    for values in _run_both(model, {names[0]: mean, names[1]: variance}):
        for exported, eager, exact in zip(values, single, truth):
            # the worst case over μ of each float32 evaluation (which μ is worst depends on rounding)
            assert _relative(exported, exact) <= 2.0 * _relative(eager.numpy(), exact)


@pytest.mark.parametrize("overload", ["erfc", "special_erfc"])
def test_translation_table_replaces_both_erfc_overloads(overload: str) -> None:
    table = translation_table()
    assert getattr(torch.ops.aten, overload).default in table
