"""``erfc`` for the training export, accurate in its tail in float32.

Why: the chain's Gaussian moments (:mod:`bkn_export.moments`: ReLU, piecewise activations,
Φ(z) = erfc(−z/√2)/2) need erfc *relative* to its value where it is small, e.g. Φ(−a) in
the ReLU variance σ² (a² Φ(a) Φ(−a) + Φ(a) + a φ(a) (Φ(−a) − Φ(a)) − φ(a)²). ONNX has no
Erfc, and torch.onnx's translation is ``1 − Erf(x)``: in float32 that is exact to an
absolute 6e-8 only, so erfc(3) = 2.2e-5 comes out 0.13 % off and erfc(4) = 1.5e-8 as 0 or
6e-8. Measured on geffnet's SemNASNet-100 (training export, 64×64, batch 2): the float32
prior variances came out up to 1,300 ulps from their float64 values, and ONNX Runtime's
output was 5× as far from float64 as PyTorch float32's (5.2e-5 against 8.8e-6), which the
parity checker's measured tolerance rightly failed.

What: for float32 (and half types, computed in float32) the exported erfc is

    erfc(|x|) = t exp(−z_h²) exp((z_h − z)(z + z_h) + P(t)),   t = 1 / (1 + |x|/2)

with P the degree-9 Chebyshev fit of Press et al., *Numerical Recipes* (2nd ed., §6.2,
``erfcc``: fractional error below 1.2e-7 for every x ≥ 0), and z² split as
z_h² + (z − z_h)(z + z_h) with z_h = ⌊128 z⌋/128, so that the rounding of z² (up to 120 ulps
of the result near z = 11, where the formula's z is capped) does not enter it: z_h² is exact in
float32. For x < 0, erfc(x) = 2 − erfc(|x|). Evaluated in float32 (NumPy, 200,000 points on
[−6, 10], where erfc(x) is a normal float32, x ≤ 9.1), it is within 4.6e-7 relative of
math.erfc everywhere (8 ulps), where 1 − Erf loses every digit from x ≈ 4. No Erf node remains, so
an engine's own Erf approximation (OpenVINO's float32 Erf is off by up to 5.3e-7 near 0) does not
enter the chain either.

float64 keeps torch.onnx's ``1 − Erf``: the fit's 1.2e-7 would be far from a float64 reference, and what
an engine does with it is its own (ONNX Runtime has no float64 ``Erf`` kernel; ``onnx.reference``'s is off
by up to 3e-8).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ERFC_OVERLOADS", "translate_erfc"]

#: P(t) of Numerical Recipes' ``erfcc``, constant term first (erfc(z) ≈ t exp(−z² + P(t))).
_CHEBYSHEV = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)

#: erfc(11) = 1.4e-54, below float32's smallest subnormal: the formula's z is capped there.
_UNDERFLOW = 11.0

#: z_h = ⌊z · 2^7⌋ / 2^7: with z at most _UNDERFLOW (below 2^4), z_h has at most 11 significant bits and z_h²
#: is exact in float32's 24.
_SPLIT = 128.0


def _erfc_float32(x: Any) -> Any:
    """The module docstring's formula, in x's (float32) type."""
    from onnxscript import opset18 as op

    def constant(value: float) -> Any:
        scalar: Any = op.Constant(value_float=value)
        return op.CastLike(scalar, x)

    # |x| beyond _UNDERFLOW gives 0 in float32 either way; capping it keeps ±inf finite (erfc(+inf) = 0,
    # erfc(-inf) = 2, not inf - inf = NaN). A Where, not Min: NaN stays NaN on every engine.
    magnitude = op.Abs(x)
    cap = constant(_UNDERFLOW)
    z = op.Where(op.Greater(magnitude, cap), cap, magnitude)
    t = op.Div(constant(1.0), op.Add(constant(1.0), op.Mul(constant(0.5), z)))
    poly = constant(_CHEBYSHEV[-1])
    for coefficient in reversed(_CHEBYSHEV[:-1]):
        poly = op.Add(constant(coefficient), op.Mul(t, poly))
    split = constant(_SPLIT)
    head = op.Div(op.Floor(op.Mul(z, split)), split)
    rest = op.Add(op.Mul(op.Sub(head, z), op.Add(z, head)), poly)
    tail = op.Mul(op.Mul(t, op.Exp(op.Neg(op.Mul(head, head)))), op.Exp(rest))
    return op.Where(op.Less(x, constant(0.0)), op.Sub(constant(2.0), tail), tail)


def translate_erfc(x: Any) -> Any:
    """``aten::erfc`` / ``aten::special_erfc`` → ONNX: float64 as ``1 − Erf(x)``; float32 by
    :func:`_erfc_float32`; float16 / bfloat16 cast to float32 for it and back."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    dtype = x.dtype
    if dtype == ir.DataType.DOUBLE:
        one: Any = op.Constant(value_float=1.0)
        return op.Sub(op.CastLike(one, x), op.Erf(x))
    if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return op.CastLike(_erfc_float32(op.Cast(x, to=ir.DataType.FLOAT)), x)
    return _erfc_float32(x)


#: The ATen overloads :func:`translate_erfc` replaces in the training export's translation table.
ERFC_OVERLOADS = (torch.ops.aten.erfc.default, torch.ops.aten.special_erfc.default)
