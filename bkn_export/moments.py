"""Per-channel Gaussian moments pushed through the layers between two normalizations.

The ``propagate`` transition predicts a normalization's input statistics from its
predecessor's by pushing per-channel moments through whatever sits between the two:
activations, pooling, resampling and the feeding Conv/Linear. This module is that
math, and nothing else: pure functions of tensors (no module state), differentiable
in every tensor argument, deterministic, free of ``.item()`` and of Python branches on
tensor values (``torch.export`` / dynamo traceable), float32 and float64.

API (``mean``, ``variance``: per-channel moments of shape (C,); ``spatial``: the
spatial size ``*`` of one sample ``(C, *)`` entering the step)::

    elementwise_moments(kind, mean, variance, **params) -> (mean, variance)
        kinds: ELEMENTWISE_KINDS; how exact each one is: ACCURACY[kind]
    pool_moments(PoolSpec, mean, variance, spatial) -> (mean, variance, out_spatial)
        PoolSpec.from_module(nn.AvgPool2d(...)) / PoolSpec.from_call("avg_pool2d", args, kwargs)
    resample_moments(ResampleSpec, mean, variance, spatial) -> (mean, variance, out_spatial)
        ResampleSpec.from_module(nn.Upsample(...)) / ResampleSpec.from_call(args, kwargs) (F.interpolate)
    conv_moments(conv_layer, mean, variance, spatial, *, input_padding=None, input_padding_mode="zeros")
        -> (mean, variance, out_spatial)          (input_padding: a pad module just before the conv)
    linear_path_moments([PoolSpec | ResampleSpec | PadSpec | conv_layer, ...], mean, variance, spatial)
        -> (mean, variance, out_spatial)          (a run of linear steps around ≤ 1 conv, exactly)
    linear_moments(weight, bias, mean, variance) -> (mean, variance)
    normalized_output_moments(posterior_mean, posterior_variance, weight, bias, eps) -> (mean, variance)
    max_of_normals_moments(count) -> (mean, variance)     of the max of `count` i.i.d. N(0, 1)

Errors: :class:`MomentsError` (a ``ValueError``) names the unsupported layer, call or argument.

The model (the assumption the authors' sampled prior makes): every position of every
sample is an independent draw, channel c from N(mean_c, variance_c) at the entry of
the path; channels are independent. A layer's output is then independent across
samples but not Gaussian and, where windows overlap, correlated across positions; each
function returns the exact mean and variance of one output *pooled over positions*
(what batch statistics over (N, *) estimate): with M_p, V_p the mean and variance of
output position p, by the law of total variance::

    mean = mean_p M_p               variance = mean_p V_p + var_p M_p

Chained calls treat each step's output as Gaussian and its positions as independent
again (moment matching); that, and the independence itself, are the approximations of
a chain. After a window or an interpolation the positions are correlated: a run of
linear steps is exact only as one :func:`linear_path_moments` call (step by step, e.g.
bilinear ×2 → 3×3 conv misses the variance by 40 %; docs/prior.md). Within one step
everything is exact except where :data:`ACCURACY` or the function's docstring names a
quadrature.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Public (documented as user-code friendly) and understood by dynamo: whether a size is static.
from torch.fx.experimental.symbolic_shapes import has_static_value

from bkn_export.tracing import nothing_traces

__all__ = [
    "ACCURACY",
    "ELEMENTWISE_KINDS",
    "GAUSS_HERMITE_ACCURACY",
    "GAUSS_HERMITE_NODES",
    "LinearStep",
    "MomentsError",
    "PadSpec",
    "PoolSpec",
    "ResampleSpec",
    "conv_moments",
    "elementwise_moments",
    "linear_moments",
    "linear_path_moments",
    "max_of_normals_moments",
    "normalized_output_moments",
    "pool_moments",
    "resample_moments",
    "without_autocast",
]


class MomentsError(ValueError):
    """A layer, call or argument that the moment propagation does not support."""


_VARIANCE_FLOOR = 1e-12
#: Standardized breakpoints are clamped to ±this: the Gaussian mass beyond is < 1e-190.
_Z_LIMIT = 30.0
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Bound on the entries of each constant cache below (constants of a layer's shape: a network
#: uses tens of them; a full cache is emptied, not grown).
_CACHE_SIZE = 512
_SQRT_HALF = math.sqrt(0.5)


# --------------------------------------------------------------------------- Gaussian pieces


def _std(variance: Tensor) -> Tensor:
    return torch.sqrt(variance.clamp_min(_VARIANCE_FLOOR))


def _pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _cdf(z: Tensor) -> Tensor:
    """Φ(z) = erfc(−z/√2)/2: accurate in the lower tail in torch (``torch.special.ndtr``, 1 + erf,
    loses it below z ≈ −5), and never NaN (``log_ndtr``'s export is). The training export writes
    erfc by :mod:`bkn_export.export.erfc` (relative to 4.6e-7 in float32), not torch.onnx's 1 − Erf,
    which keeps no digit of the tail in float32 (float64 exports keep 1 − Erf)."""
    return 0.5 * torch.special.erfc(-z * _SQRT_HALF)


def _caches_constants(tensor: Tensor) -> bool:
    """Whether constant tensors (edges, coefficients, quadrature rules, coverage tables, pooling factors) may be
    taken from a cache for this call: plain eager mode only. Under torch.compile / torch.export /
    jit tracing, a dispatch mode (fake tensors, make_fx), a tensor subclass, torch.func
    transforms or inference mode (whose tensors cannot be saved for backward later) they are
    built in the call, so that a graph stays self-contained."""
    return (
        nothing_traces()
        and type(tensor) is Tensor
        and not torch.overrides.has_torch_function((tensor,))
        and not torch._C._are_functorch_transforms_active()
        and not torch.is_inference_mode_enabled()
    )


def _compiles_constants(spatial: Sequence[Any]) -> bool:
    """Whether dynamo is tracing the call with static ``spatial`` sizes: constants that depend only on
    shapes can then be :func:`_graph_constants` (with symbolic sizes they are built in the graph)."""
    return torch.compiler.is_dynamo_compiling() and all(has_static_value(size) for size in spatial)


@torch.compiler.assume_constant_result
def _constant_values(
    build: Callable[..., tuple[Tensor, ...]], key: tuple[Any, ...], dtype: torch.dtype
) -> tuple[Any, ...]:
    """``build(*key, dtype, cpu)``'s tensors as (nested lists of) Python floats, exactly their values.

    Dynamo calls this function when it traces it, instead of tracing it (``key``: plain values
    that the result depends on alone), so that the result is a constant of the graph."""
    with torch.inference_mode(False), torch.no_grad():
        return tuple(table.tolist() for table in build(*key, dtype, torch.device("cpu")))


def _graph_constants(
    build: Callable[..., tuple[Tensor, ...]], key: tuple[Any, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, ...]:
    """``build(*key, dtype, device)`` as constants of a dynamo graph (:func:`_compiles_constants`):
    tensors made from Python floats, not kernels that recompute them every step."""
    return tuple(torch.tensor(values, dtype=dtype, device=device) for values in _constant_values(build, key, dtype))


_MILLS_SWITCH = 3.0
_MILLS_TERMS = 24


def _mills_ratio(y: Tensor) -> Tensor:
    """R(y) = Φ(−y)/φ(y) for y ≥ 0 (clamped), without underflow.

    Below 3 directly; from 3 on by Laplace's continued fraction
    R = 1/(y + 1/(y + 2/(y + 3/(y + …)))) cut at 24 terms (relative error < 1e-10 there),
    built from Add/Div only, so that it exports and differentiates everywhere.
    """
    y = y.clamp_min(0.0)
    near = y.clamp_max(_MILLS_SWITCH)
    direct = _cdf(-near) / _pdf(near)
    far = y.clamp_min(_MILLS_SWITCH)
    tail = torch.zeros_like(far)
    for k in range(_MILLS_TERMS, 0, -1):
        tail = k / (far + tail)
    return torch.where(y < _MILLS_SWITCH, direct, 1.0 / (far + tail))


class _Boundary:
    """The standard-normal terms at one standardized breakpoint z = (b − μ)/σ (clamped to
    ±_Z_LIMIT), shared by the two pieces that meet there: Φ(z), Φ(−z) and z^k φ(z)."""

    def __init__(self, z: Tensor, order: int) -> None:
        self.z = z.clamp(-_Z_LIMIT, _Z_LIMIT)
        self.below = _cdf(self.z)
        self.above = _cdf(-self.z)
        pdf = _pdf(self.z)
        self.powers = [pdf]  # z^k φ(z), k = 0..order−1
        for _ in range(1, order):
            self.powers.append(self.powers[-1] * self.z)


def _partial_moments(lo: _Boundary | None, hi: _Boundary | None, order: int) -> list[Tensor | float]:
    """[E[Z^k · 1{lo ≤ Z < hi}] for k = 0..order], Z ~ N(0, 1); None: ∓∞.

    I_0 = P(lo ≤ Z < hi), taken in the lower tail (Φ(−lo) − Φ(−hi) when lo > 0) so that it
    does not cancel; I_1 = φ(lo) − φ(hi); I_k = (k−1) I_{k−2} + lo^{k−1} φ(lo) − hi^{k−1} φ(hi).
    """
    if lo is None and hi is None:
        probability: Tensor | float = 1.0
    elif lo is None:
        assert hi is not None
        probability = hi.below
    elif hi is None:
        probability = lo.above
    else:
        probability = torch.where(lo.z > 0, lo.above - hi.above, hi.below - lo.below)
    moments: list[Tensor | float] = [probability]
    for k in range(1, order + 1):
        edge_lo = 0.0 if lo is None else lo.powers[k - 1]
        edge_hi = 0.0 if hi is None else hi.powers[k - 1]
        previous = (k - 1) * moments[k - 2] if k >= 2 else 0.0
        moments.append(previous + edge_lo - edge_hi)
    return moments


_Coefficient = float | Tensor


@dataclass(frozen=True)
class _Piece:
    """f(x) = c0 + c1 x + c2 x² on lo ≤ x < hi (None: unbounded)."""

    lo: float | None
    hi: float | None
    c0: _Coefficient = 0.0
    c1: _Coefficient = 0.0
    c2: _Coefficient = 0.0


def _piecewise_quadratic_moments(pieces: Sequence[_Piece], mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of f(X), X ~ N(mean, variance), f piecewise quadratic.

    ``pieces`` must cover the real line (a zero piece included): the centred variance
    sums over them.

    On each piece, with X = μ + σZ, f = d0 + d1 Z + d2 Z² (d0 = c0 + c1 μ + c2 μ²,
    d1 = (c1 + 2 c2 μ) σ, d2 = c2 σ²); the moments are sums of the truncated moments
    I_k of Z over the piece's standardized interval. The variance is computed centred,
    as Σ_pieces E[(f − m)² 1_piece], so that it does not cancel when σ ≪ |m|.
    """
    std = _std(variance)
    quadratic = any(not isinstance(piece.c2, float) or piece.c2 != 0.0 for piece in pieces)
    order = 4 if quadratic else 2
    dtype, device = mean.dtype, mean.device
    # All pieces at once, stacked along a leading dim P: one op per formula, whatever P.
    lo_edges, hi_edges = tuple(p.lo for p in pieces), tuple(p.hi for p in pieces)
    if _caches_constants(mean):  # eager: the (P, 1, …) edge and float coefficient tensors, built once
        lo_finite, lo_unbounded = _piece_edges(lo_edges, dtype, device, mean.dim())
        hi_finite, hi_unbounded = _piece_edges(hi_edges, dtype, device, mean.dim())
    else:
        lo_finite, lo_unbounded = _build_piece_edges(lo_edges, dtype, device, mean.dim())
        hi_finite, hi_unbounded = _build_piece_edges(hi_edges, dtype, device, mean.dim())

    def standardized(finite: Tensor, is_unbounded: Tensor, unbounded: float) -> Tensor:
        """(P, *mean.shape) z of each piece's edge; an unbounded edge is ±_Z_LIMIT (no gradient path)."""
        z = ((finite - mean) / std).clamp(-_Z_LIMIT, _Z_LIMIT)
        return torch.where(is_unbounded, unbounded, z)

    lo = standardized(lo_finite, lo_unbounded, -_Z_LIMIT)  # (P, *mean.shape)
    hi = standardized(hi_finite, hi_unbounded, _Z_LIMIT)

    def stacked(values: Sequence[_Coefficient]) -> Tensor:
        """(P, *mean.shape), or (P, 1, …) (broadcasting alike) when every value is a float."""
        if all(isinstance(v, float) for v in values):  # a constant: cached in eager, built as one when traced
            build = _piece_coefficients if _caches_constants(mean) else _build_piece_coefficients
            return build(tuple(float(v) for v in values), dtype, device, mean.dim())
        return torch.stack([torch.as_tensor(v, dtype=dtype, device=device).expand_as(mean) for v in values])

    c0 = stacked([p.c0 for p in pieces])
    c1 = stacked([p.c1 for p in pieces])
    # I_0 in the lower tail (Φ(−lo) − Φ(−hi) when lo > 0), so that it does not cancel
    sign = torch.where(lo > 0, 1.0, -1.0).to(dtype)
    probability = 0.5 * sign * (torch.special.erfc(sign * lo * _SQRT_HALF) - torch.special.erfc(sign * hi * _SQRT_HALF))
    pdf_lo, pdf_hi = _pdf(lo), _pdf(hi)
    moments = [probability, pdf_lo - pdf_hi]  # I_k = (k−1) I_{k−2} + lo^{k−1} φ(lo) − hi^{k−1} φ(hi)
    edge_lo, edge_hi = pdf_lo, pdf_hi
    for k in range(2, order + 1):
        edge_lo, edge_hi = edge_lo * lo, edge_hi * hi
        moments.append((k - 1) * moments[k - 2] + edge_lo - edge_hi)
    d0 = c0 + c1 * mean
    d1 = c1 * std
    out_mean = _sum_pieces(d0 * moments[0] + d1 * moments[1])
    if quadratic:
        c2 = stacked([p.c2 for p in pieces])
        d0 = d0 + c2 * mean * mean
        d1 = d1 + 2.0 * c2 * mean * std
        d2 = c2 * std * std
        out_mean = _sum_pieces(d0 * moments[0] + d1 * moments[1] + d2 * moments[2])
    e0 = d0 - out_mean
    terms = e0 * e0 * moments[0] + 2.0 * e0 * d1 * moments[1] + d1 * d1 * moments[2]
    if quadratic:
        terms = terms + 2.0 * e0 * d2 * moments[2] + 2.0 * d1 * d2 * moments[3] + d2 * d2 * moments[4]
    return out_mean, _sum_pieces(terms).clamp_min(0.0)


def _sum_pieces(stacked: Tensor) -> Tensor:
    """Σ over the leading (piece) dim of a (P, …) tensor, as P − 1 elementwise adds in order: a compiler
    fuses them with the per-piece terms, where a sum over dim 0 is a reduction kernel of its own."""
    pieces = stacked.unbind(0)
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return total


def _build_piece_edges(
    edges: Sequence[float | None], dtype: torch.dtype, device: torch.device, rank: int
) -> tuple[Tensor, Tensor]:
    """(P, 1 × rank) finite edges (0 where unbounded) and the (P, 1 × rank) bool mask of unbounded ones."""
    shape = (-1,) + (1,) * rank
    finite = torch.tensor([0.0 if e is None else e for e in edges], dtype=dtype, device=device).reshape(shape)
    return finite, torch.tensor([e is None for e in edges], device=device).reshape(shape)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _piece_edges(
    edges: tuple[float | None, ...], dtype: torch.dtype, device: torch.device, rank: int
) -> tuple[Tensor, Tensor]:
    """:func:`_build_piece_edges`, cached (eager only; plain constants, no grad)."""
    return _build_piece_edges(edges, dtype, device, rank)


def _build_piece_coefficients(values: tuple[float, ...], dtype: torch.dtype, device: torch.device, rank: int) -> Tensor:
    """(P, 1 × rank) tensor of float coefficients (from Python floats: a constant of a traced graph)."""
    return torch.tensor(values, dtype=dtype, device=device).reshape((-1,) + (1,) * rank)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _piece_coefficients(values: tuple[float, ...], dtype: torch.dtype, device: torch.device, rank: int) -> Tensor:
    """:func:`_build_piece_coefficients`, cached (eager only; plain constants, no grad)."""
    return _build_piece_coefficients(values, dtype, device, rank)


def _relu_moments(mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
    """Exact moments of ReLU(X), the common case, in few operations (a = μ/σ)::

        E = μ Φ(a) + σ φ(a)
        Var = σ² (a² Φ(a) Φ(−a) + Φ(a) + a φ(a) (Φ(−a) − Φ(a)) − φ(a)²)

    The variance is written so that nothing cancels as a → +∞ (it tends to σ²); as a → −∞
    the relative rounding grows like a⁴ ε (1e-12 at a = −10 in float64), on a variance that
    is then below σ² 1e-23.
    """
    out_mean, out_variance, *_ = _relu_terms(mean, variance)
    return out_mean, out_variance


def _relu_terms(mean: Tensor, variance: Tensor) -> tuple[Tensor, ...]:
    """:func:`_relu_moments` with its intermediates (a fused backward reuses them):
    (E, Var, σ, φ(a), Φ(a), Φ(−a), Var before the clamp at 0)."""
    std = _std(variance)
    a = (mean / std).clamp(-_Z_LIMIT, _Z_LIMIT)
    pdf, below, above = _pdf(a), _cdf(a), _cdf(-a)
    out_mean = mean * below + std * pdf
    ratio = a * a * below * above + below + a * pdf * (above - below) - pdf * pdf
    spread = std * std * ratio
    return out_mean, spread.clamp_min(0.0), std, pdf, below, above, spread


def _exponential_partial(rate: float, mean: Tensor, std: Tensor) -> Tensor:
    """E[exp(rate · X) · 1{X < 0}] = exp(rate μ + rate² σ²/2) Φ(−y), y = μ/σ + rate σ, without overflow.

    For y ≥ 0 the two factors are rewritten as exp(−μ²/2σ²) φ(0) R(y) with the Mills ratio
    R (:func:`_mills_ratio`): e^{50} · Φ(−20)-like products at σ = 10 never form. For y < 0
    the exponent is below −rate²σ²/2 ≤ 0 (clamped there, so the branch not taken cannot
    overflow and poison the gradient).
    """
    y = mean / std + rate * std
    scaled = torch.exp(-0.5 * (mean / std) ** 2) * _INV_SQRT_2PI * _mills_ratio(y)
    exponent = (rate * mean + 0.5 * (rate * std) ** 2).clamp_max(0.0)
    direct = torch.exp(exponent) * _cdf(-y.clamp_max(0.0))
    return torch.where(y >= 0, scaled, direct)


def _exponential_linear_moments(
    mean: Tensor, variance: Tensor, scale: float, alpha: float, rate: float
) -> tuple[Tensor, Tensor]:
    """Exact moments of f(x) = scale · (x if x > 0 else alpha · (exp(rate · x) − 1)).

    ELU is (1, α, 1), CELU (1, α, 1/α), SELU (λ, α, 1). With A = scale·α, the negative
    piece is A e^{rate X} − A and E[e^{κX} 1{X<0}] is closed form
    (:func:`_exponential_partial`); the positive piece is a truncated-Gaussian moment.
    The variance is centred on the mean, piece by piece.
    """
    std = _std(variance)
    zero = _Boundary(-mean / std, 2)
    i = _partial_moments(zero, None, 2)  # truncated moments of Z over the positive piece
    p_negative = zero.below
    e1 = _exponential_partial(rate, mean, std)
    e2 = _exponential_partial(2.0 * rate, mean, std)
    amplitude = scale * alpha
    out_mean = scale * (mean * i[0] + std * i[1]) + amplitude * (e1 - p_negative)
    # E[(scale·X − m)² 1{X ≥ 0}], centred on m.
    e0 = scale * mean - out_mean
    d1 = scale * std
    positive_part = e0 * e0 * i[0] + 2.0 * e0 * d1 * i[1] + d1 * d1 * i[2]
    offset = -amplitude - out_mean  # the negative piece minus m is A e^{rate X} + offset
    negative_part = amplitude * amplitude * e2 + 2.0 * amplitude * offset * e1 + offset * offset * p_negative
    return out_mean, (positive_part + negative_part).clamp_min(0.0)


def _compute_hermite_rule(nodes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Probabilists' Gauss–Hermite nodes and weights (weights sum to 1) for N(0, 1)."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    weights = weights / weights.sum()
    return tuple(float(p) for p in points), tuple(float(w) for w in weights)


#: Rules for the usual counts, as plain floats computed once: a traced or compiled forward
#: reads constants (dynamo cannot trace numpy.polynomial). Other counts are computed per
#: call, which only eager mode and torch.export (not torch.compile) can do.
_HERMITE_RULES = {nodes: _compute_hermite_rule(nodes) for nodes in (16, 32, 64, 128, 256)}


def _hermite_rule(nodes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    rule = _HERMITE_RULES.get(nodes)
    return rule if rule is not None else _compute_hermite_rule(nodes)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _hermite_tensors(nodes: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(nodes,) points and weights of :func:`_hermite_rule` as tensors, cached (eager only)."""
    points, weights = _hermite_rule(nodes)
    return torch.tensor(points, dtype=dtype, device=device), torch.tensor(weights, dtype=dtype, device=device)


def _gauss_hermite_moments(
    function: Callable[[Tensor], Tensor], mean: Tensor, variance: Tensor, nodes: int
) -> tuple[Tensor, Tensor]:
    """Mean and centred variance of f(X), X ~ N(mean, variance), by an n-node Gauss–Hermite rule.

    E f(X) ≈ Σ_j w_j f(μ + σ z_j); Var ≈ Σ_j w_j (f(μ + σ z_j) − E)². The nodes are fixed
    (constants of the graph); cost O(C · nodes).
    """
    if _caches_constants(mean):
        points, weights = _hermite_tensors(nodes, mean.dtype, mean.device)
    else:
        points_list, weights_list = _hermite_rule(nodes)
        points = torch.tensor(points_list, dtype=mean.dtype, device=mean.device)
        weights = torch.tensor(weights_list, dtype=mean.dtype, device=mean.device)
    out_mean, out_variance, *_ = _gauss_hermite_terms(function, mean, variance, points, weights)
    return out_mean, out_variance


def _gauss_hermite_terms(
    function: Callable[[Tensor], Tensor], mean: Tensor, variance: Tensor, points: Tensor, weights: Tensor
) -> tuple[Tensor, ...]:
    """:func:`_gauss_hermite_moments` on the rule (points, weights) (n,), with its intermediates (a
    fused backward reuses them): (E, Var, σ, x (…, n) = μ + σ z, f(x) − E, Var before the clamp at 0)."""
    std = _std(variance)
    x = mean.unsqueeze(-1) + std.unsqueeze(-1) * points
    values = function(x)
    out_mean = values @ weights
    centred = values - out_mean.unsqueeze(-1)
    spread = (centred * centred) @ weights
    return out_mean, spread.clamp_min(0.0), std, x, centred, spread


# --------------------------------------------------------------------------- elementwise

ELEMENTWISE_KINDS: tuple[str, ...] = (
    "identity", "relu", "relu6", "leaky_relu", "prelu", "hardtanh", "hardsigmoid", "hardswish",
    "elu", "selu", "celu", "silu", "gelu", "sigmoid", "tanh", "mish", "softplus",
)  # fmt: skip

#: Nodes of the Gauss–Hermite rule per kind: the smallest power of two whose measured
#: variance error stays within about 1 % over μ ∈ [−4, 4], σ ∈ [0.05, 10] (tanh: 1.2 %).
GAUSS_HERMITE_NODES: Mapping[str, int] = {
    "silu": 64,
    "gelu": 128,
    "sigmoid": 128,
    "tanh": 256,
    "mish": 64,
    "softplus": 64,
}

#: Measured bound (mean, variance) on the relative error of the Gauss–Hermite kinds at their
#: node counts: the maximum over μ ∈ [−4, 4] (33 values) × σ ∈ [0.05, 10] (25 log-spaced)
#: against a 240 001-point float64 quadrature, rounded up; the mean's error relative to
#: max(|mean|, std) of the output. gelu holds for both approximations; softplus was
#: measured with beta=2, threshold=5 (its switch to x at the threshold is a small jump).
#: Reproduce: ``python tests/test_moments.py --accuracy-table`` (or ``pytest -m slow``).
GAUSS_HERMITE_ACCURACY: Mapping[str, tuple[float, float]] = {
    "silu": (0.0025, 0.004),
    "gelu": (0.0016, 0.0025),
    "sigmoid": (0.001, 0.005),
    "tanh": (0.004, 0.013),
    "mish": (0.004, 0.006),
    "softplus": (0.003, 0.004),
}

_EXACT_PIECEWISE = "exact: truncated-Gaussian moments (error ~1e-9 in float64, measured)"
_EXACT_EXPONENTIAL = "exact: truncated-Gaussian and truncated log-normal moments (error ~1e-9 in float64, measured)"

#: How exact each kind's moments are (see docs/prior.md for the measured table).
ACCURACY: Mapping[str, str] = {
    "identity": "exact",
    "relu": _EXACT_PIECEWISE,
    "relu6": _EXACT_PIECEWISE,
    "leaky_relu": _EXACT_PIECEWISE,
    "prelu": _EXACT_PIECEWISE,
    "hardtanh": _EXACT_PIECEWISE,
    "hardsigmoid": _EXACT_PIECEWISE,
    "hardswish": _EXACT_PIECEWISE + ", up to 4th order (quadratic piece)",
    "elu": _EXACT_EXPONENTIAL,
    "selu": _EXACT_EXPONENTIAL,
    "celu": _EXACT_EXPONENTIAL,
    **{
        kind: f"Gauss–Hermite, {GAUSS_HERMITE_NODES[kind]} nodes: relative error ≤ {100 * bound[0]:.2g} % (mean), "
        f"≤ {100 * bound[1]:.2g} % (variance) over μ ∈ [−4, 4], σ ∈ [0.05, 10] (measured)"
        for kind, bound in GAUSS_HERMITE_ACCURACY.items()
    },
}

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

_PARAMETERS: Mapping[str, Mapping[str, Any]] = {
    "identity": {},
    "relu": {},
    "relu6": {},
    "leaky_relu": {"negative_slope": 0.01},
    "prelu": {"weight": None},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0},
    "hardsigmoid": {},
    "hardswish": {},
    "elu": {"alpha": 1.0},
    "selu": {},
    "celu": {"alpha": 1.0},
    "silu": {},
    "gelu": {"approximate": "none"},
    "sigmoid": {},
    "tanh": {},
    "mish": {},
    "softplus": {"beta": 1.0, "threshold": 20.0},
}
_ALIASES = {"swish": "silu", "gelu_tanh": "gelu"}
#: Accepted and ignored: they do not change the function's values.
_IGNORED_PARAMETERS = frozenset({"inplace"})


def _resolve_parameters(kind: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any], int | None]:
    name = _ALIASES.get(kind, kind)
    if name not in _PARAMETERS:
        raise MomentsError(
            f"elementwise_moments: unknown activation {kind!r}; supported: {', '.join(ELEMENTWISE_KINDS)}. "
            "Add a closed form or a Gauss–Hermite entry in bkn_export/moments.py, or let the transition fall back."
        )
    nodes = params.get("nodes")
    resolved = dict(_PARAMETERS[name])
    if kind == "gelu_tanh":
        resolved["approximate"] = "tanh"
    for key, value in params.items():
        if key == "nodes" or key in _IGNORED_PARAMETERS:
            continue
        if key not in resolved:
            raise MomentsError(
                f"elementwise_moments: {kind!r} takes {sorted(resolved) or 'no parameters'}, got {key!r}"
            )
        resolved[key] = value
    if name == "prelu" and not isinstance(resolved["weight"], Tensor):
        raise MomentsError("elementwise_moments: 'prelu' needs weight=<Tensor of shape (1,) or (C,)> (the slope)")
    if name == "gelu" and resolved["approximate"] not in ("none", "tanh"):
        raise MomentsError(f"elementwise_moments: gelu approximate must be 'none' or 'tanh', got {resolved!r}")
    if nodes is not None and (not isinstance(nodes, int) or nodes < 16):
        raise MomentsError(f"elementwise_moments: nodes must be an int ≥ 16, got {nodes!r}")
    return name, resolved, nodes


def _smooth_function(name: str, params: Mapping[str, Any]) -> Callable[[Tensor], Tensor]:
    """The activation itself, from torch, for the Gauss–Hermite kinds."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return functools.partial(F.gelu, approximate=params["approximate"])
    if name == "sigmoid":
        return torch.sigmoid
    if name == "tanh":
        return torch.tanh
    if name == "mish":
        return F.mish
    return functools.partial(F.softplus, beta=params["beta"], threshold=params["threshold"])


def _pieces(name: str, params: Mapping[str, Any], mean: Tensor) -> list[_Piece]:
    """The piecewise-quadratic form of a piecewise activation; the pieces cover the real line."""
    if name == "relu":
        return [_Piece(None, 0.0), _Piece(0.0, None, 0.0, 1.0)]
    if name == "relu6":
        return [_Piece(None, 0.0), _Piece(0.0, 6.0, 0.0, 1.0), _Piece(6.0, None, 6.0)]
    if name in ("leaky_relu", "prelu"):
        slope = params["negative_slope"] if name == "leaky_relu" else params["weight"].to(mean.dtype)
        return [_Piece(None, 0.0, 0.0, slope), _Piece(0.0, None, 0.0, 1.0)]
    if name == "hardtanh":
        low, high = float(params["min_val"]), float(params["max_val"])
        return [_Piece(None, low, low), _Piece(low, high, 0.0, 1.0), _Piece(high, None, high)]
    if name == "hardsigmoid":  # relu6(x + 3) / 6
        return [_Piece(None, -3.0), _Piece(-3.0, 3.0, 0.5, 1.0 / 6.0), _Piece(3.0, None, 1.0)]
    if name == "hardswish":  # x · relu6(x + 3) / 6
        return [_Piece(None, -3.0), _Piece(-3.0, 3.0, 0.0, 0.5, 1.0 / 6.0), _Piece(3.0, None, 0.0, 1.0)]
    raise AssertionError(name)


def elementwise_moments(kind: str, mean: Tensor, variance: Tensor, **params: Any) -> tuple[Tensor, Tensor]:
    """Mean and variance of f(X) for X ~ N(mean, variance), elementwise.

    mean, variance: any shape (typically (C,)); returns two tensors of that shape. ``kind``
    is one of :data:`ELEMENTWISE_KINDS` (aliases: ``swish`` = silu, ``gelu_tanh``), with the
    parameters of the torch module of the same name and its defaults: ``leaky_relu``
    (negative_slope), ``prelu`` (weight: (1,) or (C,), broadcast against ``mean``),
    ``hardtanh`` (min_val, max_val), ``elu`` / ``celu`` (alpha), ``gelu``
    (approximate="none" | "tanh"), ``softplus`` (beta, threshold); ``inplace`` is ignored.
    ``nodes=`` overrides the Gauss–Hermite node count (≥ 16) of the quadrature kinds.

    Methods (:data:`ACCURACY` states each one's measured error):

    * piecewise linear / quadratic (relu, relu6, leaky_relu, prelu, hardtanh,
      hardsigmoid, hardswish): exact, from the truncated moments E[Z^k 1{a ≤ Z < b}],
      k ≤ 4, of the standard normal over each piece;
    * elu, selu, celu: exact, adding E[e^{κX} 1{X < 0}] = e^{κμ + κ²σ²/2} Φ(−μ/σ − κσ);
    * silu, gelu, sigmoid, tanh, mish, softplus: a fixed-node Gauss–Hermite rule
      (:data:`GAUSS_HERMITE_NODES`) applied to the torch function itself.

    Variances are computed centred on the mean (no E[f²] − E[f]² cancellation) and
    clamped at 0; a variance below 1e-12 is treated as 1e-12 (σ = 1e-6).
    """
    name, resolved, nodes = _resolve_parameters(kind, params)
    if name == "identity":
        return mean, variance
    if name in GAUSS_HERMITE_NODES:
        count = nodes if nodes is not None else GAUSS_HERMITE_NODES[name]
        return _gauss_hermite_moments(_smooth_function(name, resolved), mean, variance, count)
    if name == "elu":
        return _exponential_linear_moments(mean, variance, 1.0, float(resolved["alpha"]), 1.0)
    if name == "celu":
        alpha = float(resolved["alpha"])
        return _exponential_linear_moments(mean, variance, 1.0, alpha, 1.0 / alpha)
    if name == "selu":
        return _exponential_linear_moments(mean, variance, _SELU_SCALE, _SELU_ALPHA, 1.0)
    if name == "relu":
        return _relu_moments(mean, variance)
    return _piecewise_quadratic_moments(_pieces(name, resolved, mean), mean, variance)


# --------------------------------------------------------------------------- max of Gaussians

_MAX_GRID = (-10.0, 12.0, 2201)


def _compute_max_grid() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A uniform z grid on [−10, 12] (step 0.01) and log Φ(z) there, computed in float64."""
    low, high, count = _MAX_GRID
    step = (high - low) / (count - 1)
    points = [low + k * step for k in range(count)]
    log_cdf = [math.log(0.5 * math.erfc(-z / math.sqrt(2.0))) for z in points]
    return tuple(points), tuple(log_cdf)


_MAX_GRID_TABLE = _compute_max_grid()  # constants (plain floats), as the Gauss–Hermite rules


def max_of_normals_moments(count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of the maximum of ``count`` i.i.d. standard normals (elementwise).

    count: a float tensor of any shape, values ≥ 1 (not necessarily integers). The density
    of the maximum is n φ(z) Φ(z)^{n−1}; it is evaluated on a fixed uniform grid
    z ∈ [−10, 12] (step 0.01) and normalized there (a trapezoid rule on a smooth, rapidly
    decaying integrand): mean and variance are within 1e-6 of the exact values for
    n = 1…10⁶ (tests/test_moments.py::test_max_of_normals_known_values). Cost O(numel · 2201).
    """
    points_list, log_cdf_list = _MAX_GRID_TABLE
    points = torch.tensor(points_list, dtype=count.dtype, device=count.device)
    log_cdf = torch.tensor(log_cdf_list, dtype=count.dtype, device=count.device)
    exponent = -0.5 * points * points + (count.clamp_min(1.0).unsqueeze(-1) - 1.0) * log_cdf
    density = torch.softmax(exponent, dim=-1)
    mean = density @ points
    centred = points - mean.unsqueeze(-1)
    return mean, (density * centred * centred).sum(-1)


# --------------------------------------------------------------------------- pooling

_POOL_KINDS = ("avg", "max", "adaptive_avg", "adaptive_max")


def _ntuple(value: Any, rank: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * rank
    values = tuple(value)
    if len(values) == 1:
        return values * rank
    if len(values) != rank:
        raise MomentsError(f"{what}: expected {rank} values, got {values}")
    return values


def _pool_rank(module: torch.nn.Module) -> int:
    name = type(module).__name__
    for rank in (1, 2, 3):
        if name.endswith(f"{rank}d"):
            return rank
    raise MomentsError(f"PoolSpec: cannot tell the spatial rank of {name}")


@dataclass(frozen=True)
class PoolSpec:
    """What a pooling layer does to the spatial grid, normalized to tuples of length ``rank``.

    kind: "avg" | "max" | "adaptive_avg" | "adaptive_max"; kernel_size, stride, padding,
    dilation (max only), ceil_mode, count_include_pad and divisor_override (avg only) as
    in ``nn.AvgPool*d`` / ``nn.MaxPool*d``; output_size for the adaptive kinds (None in a
    dim keeps the input size). LPPool is not supported (:class:`MomentsError`).
    """

    kind: str
    rank: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    output_size: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _POOL_KINDS:
            raise MomentsError(f"PoolSpec: kind must be one of {_POOL_KINDS}, got {self.kind!r}")

    @classmethod
    def create(
        cls,
        kind: str,
        rank: int,
        *,
        kernel_size: Any = None,
        stride: Any = None,
        padding: Any = 0,
        dilation: Any = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        output_size: Any = None,
        return_indices: bool = False,
    ) -> PoolSpec:
        """Normalize the arguments of a pooling module or functional call (ints or tuples)."""
        if return_indices:
            raise MomentsError(
                f"PoolSpec: {kind} pooling with return_indices=True returns indices as well; its values' moments "
                "are supported only without them"
            )
        if kind.startswith("adaptive"):
            if output_size is None:
                raise MomentsError(f"PoolSpec: {kind} pooling needs output_size")
            sizes = (output_size,) * rank if isinstance(output_size, int) or output_size is None else output_size
            return cls(kind, rank, output_size=_ntuple(sizes, rank, "PoolSpec output_size"))
        if kernel_size is None:
            raise MomentsError(f"PoolSpec: {kind} pooling needs kernel_size")
        kernel = _ntuple(kernel_size, rank, "PoolSpec kernel_size")
        strides = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
        return cls(
            kind,
            rank,
            kernel_size=kernel,
            stride=_ntuple(strides, rank, "PoolSpec stride"),
            padding=_ntuple(padding, rank, "PoolSpec padding"),
            dilation=_ntuple(dilation, rank, "PoolSpec dilation"),
            ceil_mode=bool(ceil_mode),
            count_include_pad=bool(count_include_pad),
            divisor_override=divisor_override,
        )

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> PoolSpec:
        """From ``nn.AvgPool{1,2,3}d``, ``nn.MaxPool*d``, ``nn.AdaptiveAvgPool*d``, ``nn.AdaptiveMaxPool*d``."""
        nn = torch.nn
        rank = _pool_rank(module)
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return cls.create(
                "avg",
                rank,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                ceil_mode=module.ceil_mode,
                count_include_pad=module.count_include_pad,
                divisor_override=getattr(module, "divisor_override", None),
            )
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return cls.create(
                "max",
                rank,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                ceil_mode=module.ceil_mode,
                return_indices=module.return_indices,
            )
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return cls.create("adaptive_avg", rank, output_size=module.output_size)
        if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return cls.create(
                "adaptive_max", rank, output_size=module.output_size, return_indices=module.return_indices
            )
        raise MomentsError(
            f"PoolSpec.from_module: {type(module).__name__} is not a supported pooling layer "
            "(AvgPool, MaxPool, AdaptiveAvgPool, AdaptiveMaxPool 1d/2d/3d)"
        )

    @classmethod
    def from_call(cls, function: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> PoolSpec:
        """From a functional call: ``function`` is ``avg_pool2d``, ``max_pool1d``,
        ``adaptive_avg_pool3d``, ``adaptive_max_pool2d`` … (a ``torch.nn.functional.``
        prefix is accepted); ``args``/``kwargs`` as passed, with or without the input tensor first."""
        name = function.rsplit(".", 1)[-1]
        rank = int(name[-2]) if name[-1:] == "d" and name[-2:-1].isdigit() else 0
        base = name[:-2]
        names: dict[str, tuple[str, ...]] = {
            "avg_pool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
            "max_pool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
            "adaptive_avg_pool": ("output_size",),
            "adaptive_max_pool": ("output_size", "return_indices"),
        }
        if rank not in (1, 2, 3) or base not in names:
            raise MomentsError(
                f"PoolSpec.from_call: {function!r} is not avg_pool, max_pool, adaptive_avg_pool or adaptive_max_pool "
                "1d/2d/3d"
            )
        positional = list(args[1:] if args and isinstance(args[0], Tensor) else args)
        if len(positional) > len(names[base]):
            raise MomentsError(f"PoolSpec.from_call: too many arguments for {function}: {positional}")
        bound = dict(zip(names[base], positional))
        for key, value in kwargs.items():
            if key == "input":
                continue
            if key not in names[base] or key in bound:
                raise MomentsError(f"PoolSpec.from_call: unexpected or repeated argument {key!r} for {function}")
            bound[key] = value
        kind = base.removesuffix("_pool")
        return cls.create(kind, rank, **bound)

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The pooled spatial size, as PyTorch computes it (ceil_mode's last-window rule included)."""
        if len(spatial) != self.rank:
            raise MomentsError(f"pool_moments: a {self.rank}d {self.kind} pool needs a {self.rank}d spatial size")
        if self.kind.startswith("adaptive"):
            return tuple(s if o is None else o for s, o in zip(spatial, self.output_size))
        return tuple(_pooled_length(self, d, spatial[d]) for d in range(self.rank))


def _pooled_length(spec: PoolSpec, dim: int, size: int) -> int:
    kernel, stride, pad = spec.kernel_size[dim], spec.stride[dim], spec.padding[dim]
    dilation = spec.dilation[dim] if spec.kind == "max" else 1
    span = dilation * (kernel - 1) + 1
    numerator = size + 2 * pad - span + (stride - 1 if spec.ceil_mode else 0)
    out = numerator // stride + 1
    if not spec.ceil_mode or pad + stride <= span:  # then the last window always starts inside
        return out
    # PyTorch drops a last window that would start in the right padding: x ≥ 0 below. As
    # x ∈ [pad − span, pad − span + stride − 1] ⊂ [−bound, bound) (pad ≤ kernel / 2),
    # (x + bound) // bound is 1 exactly when x ≥ 0: integer arithmetic, so a symbolic size
    # stays symbolic (no branch).
    x = (out - 1) * stride - size - pad
    bound = max(span - pad, stride) + 1
    return out - (x + bound) // bound


def _window_bounds(spec: PoolSpec, dim: int, size: int, out: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(L_out,) start and end (exclusive) of each output position's window in the padded frame, for
    avg (clipped to size + pad, as PyTorch does for the divisor) and adaptive kinds (no padding)."""
    position = torch.arange(out, device=device)
    if spec.kind.startswith("adaptive"):
        return (position * size) // out, ((position + 1) * size + out - 1) // out
    start = position * spec.stride[dim] - spec.padding[dim]
    end = torch.clamp(start + spec.kernel_size[dim], max=size + spec.padding[dim])
    return start, end


def _real_counts(spec: PoolSpec, dim: int, size: int, out: int, device: torch.device) -> Tensor:
    """(L_out,) long: how many real (not padding) inputs each output position's window holds."""
    if spec.kind == "max":
        position = torch.arange(out, device=device).unsqueeze(1)
        tap = torch.arange(spec.kernel_size[dim], device=device).unsqueeze(0)
        source = position * spec.stride[dim] - spec.padding[dim] + tap * spec.dilation[dim]
        return ((source >= 0) & (source < size)).sum(dim=1)
    start, end = _window_bounds(spec, dim, size, out, device)
    return torch.clamp(end, max=size) - torch.clamp(start, min=0)


def _largest_window(spec: PoolSpec, dim: int, size: int, out: int) -> int:
    if spec.kind == "adaptive_max":
        return -(-size // out) + 1
    return spec.kernel_size[dim]


def pool_moments(
    spec: PoolSpec, mean: Tensor, variance: Tensor, spatial: Sequence[int]
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Moments of a pooling layer's output, pooled over positions, and its spatial size.

    mean, variance: (C,) moments of the i.i.d. input positions; spatial: the input's
    spatial size (rank = spec.rank). Returns (C,), (C,) and the output spatial size.

    Average pooling (avg, adaptive_avg), exact under independence: output p averages
    n_p real inputs with divisor D_p (padding reads zeros; ``count_include_pad`` counts it
    in D_p, clipped like PyTorch; ``divisor_override`` replaces D_p), so
    M_p = μ n_p/D_p and V_p = σ² n_p/D_p². n_p and D_p are products over dims of
    per-dim counts, so the position averages factor into per-dim means (cost O(Σ L_d))::

        mean = μ Π_d E[n/D]         variance = σ² Π_d E[n/D²] + μ² (Π_d E[(n/D)²] − (Π_d E[n/D])²)

    Max pooling (max, adaptive_max): output p is the max of its n_p real inputs (padding
    counts as −∞, so border windows are smaller; dilation and ceil_mode included), i.e.
    μ + σ·max of n_p i.i.d. standard normals, whose moments e(n), v(n) come from
    :func:`max_of_normals_moments` (a fixed-grid quadrature, error ≤ 1e-6). Exact under the
    independence assumption up to that quadrature; the assumption itself is the
    approximation (neighbouring activations of a real feature map are correlated, which
    makes their max smaller). The n_p take few values: their histogram is the product of
    per-dim histograms, so the cost is O(Σ L_d K_d + Π_d K_d · 2201)::

        mean = μ + σ E_p[e(n_p)]      variance = σ² (E_p[v(n_p)] + Var_p[e(n_p)])

    The adaptive max pool's histogram runs up to its largest window, ceil(L_in / L_out) + 1
    per dim (a symbolic size under dynamic shapes, not a specialized one).

    The factors of μ and σ² above depend only on the geometry: eager calls take them from a
    cache (:func:`_pool_factors`), dynamo with static sizes makes them constants of its graph,
    other traces build them in the graph.
    """
    out_spatial = spec.output_shape(spatial)
    factors = None
    if _caches_constants(mean):  # eager: the position averages are constants of the geometry, built once
        try:
            factors = _pool_factors(spec, tuple(spatial), mean.dtype, mean.device)
        except TypeError:  # a spec built by hand with lists: not hashable
            factors = None
    elif _compiles_constants(spatial):  # dynamo, static sizes: constants of the graph
        factors = _graph_constants(_spec_pool_factors, (_step_key(spec), tuple(spatial)), mean.dtype, mean.device)
    if factors is None:
        factors = _build_pool_factors(spec, spatial, out_spatial, mean)
    if spec.kind in ("avg", "adaptive_avg"):
        first, second, spread = factors
        out_mean = mean * first
        out_variance = variance * second + mean * mean * spread
        return out_mean, out_variance, out_spatial
    mean_e, scale = factors
    std = _std(variance)
    return mean + std * mean_e, variance * scale, out_spatial


def _build_pool_factors(
    spec: PoolSpec, spatial: Sequence[int], out_spatial: Sequence[int], like: Tensor
) -> tuple[Tensor, ...]:
    """The 0-dim constants of :func:`pool_moments` (dtype and device of ``like``): average kinds
    (Π_d E[n/D], Π_d E[n/D²], max(Π_d E[(n/D)²] − (Π_d E[n/D])², 0)); max kinds
    (E_p[e(n_p)], E_p[v(n_p)] + Var_p[e(n_p)])."""
    dtype, device = like.dtype, like.device
    counts = [_real_counts(spec, d, spatial[d], out_spatial[d], device).to(dtype) for d in range(spec.rank)]
    if spec.kind in ("avg", "adaptive_avg"):
        one = like.new_ones(())
        first, second, square = one, one, one  # Π_d E[n/D], Π_d E[n/D²], Π_d E[(n/D)²]
        for d in range(spec.rank):
            if spec.kind == "avg" and spec.divisor_override is None and spec.count_include_pad:
                start, end = _window_bounds(spec, d, spatial[d], out_spatial[d], device)
                divisor = (end - start).to(dtype)
            elif spec.kind == "avg" and spec.divisor_override is not None:
                divisor = torch.ones_like(counts[d])
            else:
                divisor = counts[d]
            ratio = counts[d] / divisor
            first = first * ratio.mean()
            second = second * (ratio / divisor).mean()
            square = square * (ratio * ratio).mean()
        if spec.kind == "avg" and spec.divisor_override is not None:
            scale = 1.0 / spec.divisor_override
            first, second, square = first * scale, second * scale * scale, square * scale * scale
        return first, second, (square - first * first).clamp_min(0.0)
    # max: histogram of window sizes, per dim then joint
    joint: Tensor | None = None
    sizes: Tensor | None = None
    for d in range(spec.rank):
        largest = _largest_window(spec, d, spatial[d], out_spatial[d])
        values = torch.arange(largest + 1, device=device, dtype=dtype)
        histogram = (counts[d].unsqueeze(1) == values.unsqueeze(0)).to(dtype).mean(dim=0)
        if joint is None or sizes is None:
            joint, sizes = histogram, values
        else:
            joint = (joint.unsqueeze(-1) * histogram).reshape(-1)
            sizes = (sizes.unsqueeze(-1) * values).reshape(-1)
    assert joint is not None and sizes is not None
    expected, spread = max_of_normals_moments(sizes)
    mean_e = (joint * expected).sum()
    var_e = (joint * (expected - mean_e) ** 2).sum()
    mean_v = (joint * spread).sum()
    return mean_e, mean_v + var_e


def _spec_pool_factors(
    key: _StepKey, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, ...]:
    """:func:`_build_pool_factors` of the :class:`PoolSpec` of this :func:`_step_key` (for :func:`_graph_constants`)."""
    cls, values = key
    spec = cls(*values)
    return _build_pool_factors(spec, spatial, spec.output_shape(spatial), torch.empty((), dtype=dtype, device=device))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _pool_factors(
    spec: PoolSpec, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, ...]:
    """:func:`_build_pool_factors`, cached (eager only; plain constants, no grad)."""
    with torch.inference_mode(False), torch.no_grad():
        like = torch.empty((), dtype=dtype, device=device)
        return _build_pool_factors(spec, spatial, spec.output_shape(spatial), like)


# --------------------------------------------------------------------------- resampling

_RESAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "bicubic", "area")


@dataclass(frozen=True)
class ResampleSpec:
    """An ``F.interpolate`` / ``nn.Upsample`` call: mode, and size or scale_factor (a number or
    one per spatial dim), align_corners, recompute_scale_factor, as PyTorch takes them."""

    mode: str = "nearest"
    size: int | tuple[int, ...] | None = None
    scale_factor: float | tuple[float, ...] | None = None
    align_corners: bool | None = None
    recompute_scale_factor: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in _RESAMPLE_MODES:
            raise MomentsError(f"ResampleSpec: mode {self.mode!r} is not one of {_RESAMPLE_MODES}")
        if (self.size is None) == (self.scale_factor is None):
            raise MomentsError("ResampleSpec: give exactly one of size and scale_factor")

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> ResampleSpec:
        """From ``nn.Upsample`` (and ``nn.UpsamplingNearest2d`` / ``nn.UpsamplingBilinear2d``)."""
        if not isinstance(module, torch.nn.Upsample):
            raise MomentsError(f"ResampleSpec.from_module: {type(module).__name__} is not an nn.Upsample")
        return cls(
            module.mode,
            _maybe_tuple(module.size),
            _maybe_tuple(module.scale_factor),
            module.align_corners,
            module.recompute_scale_factor,
        )

    @classmethod
    def from_call(cls, args: Sequence[Any], kwargs: Mapping[str, Any]) -> ResampleSpec:
        """From the arguments of ``F.interpolate`` (or ``F.upsample``), with or without the input first."""
        names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
        positional = list(args[1:] if args and isinstance(args[0], Tensor) else args)
        bound: dict[str, Any] = dict(zip(names, positional))
        bound.update({k: v for k, v in kwargs.items() if k != "input"})
        unknown = set(bound) - set(names)
        if unknown:
            raise MomentsError(f"ResampleSpec.from_call: unexpected arguments {sorted(unknown)} for F.interpolate")
        if bound.pop("antialias", False):
            raise MomentsError("ResampleSpec: antialias=True is not supported (its filter is not modelled)")
        return cls(
            bound.get("mode", "nearest"),
            _maybe_tuple(bound.get("size")),
            _maybe_tuple(bound.get("scale_factor")),
            bound.get("align_corners"),
            bound.get("recompute_scale_factor"),
        )

    def _per_dim(self, value: Any, rank: int) -> tuple[Any, ...]:
        if value is None:
            return (None,) * rank
        values = value if isinstance(value, tuple) else (value,)
        if len(values) == 1:
            return values * rank
        if len(values) != rank:
            raise MomentsError(f"resample_moments: {values} has not one value per spatial dim ({rank})")
        return values

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The output spatial size: ``size``, or floor(input · scale_factor) per dim."""
        rank = len(spatial)
        if self.size is not None:
            return tuple(int(s) for s in self._per_dim(self.size, rank))
        factors = self._per_dim(self.scale_factor, rank)
        # An integral factor stays integer arithmetic (a symbolic size stays exact and unguarded).
        return tuple(
            s * int(f) if float(f).is_integer() else math.floor(s * float(f)) for s, f in zip(spatial, factors)
        )

    def source_scales(self, spatial: Sequence[int]) -> tuple[float | None, ...]:
        """The per-dim scale PyTorch's kernels use (1/scale_factor unless recomputed; None: in/out)."""
        if self.size is not None or self.recompute_scale_factor:
            return (None,) * len(spatial)
        return tuple(1.0 / float(f) for f in self._per_dim(self.scale_factor, len(spatial)))


def _maybe_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _linear_taps(
    size: int, out: int, scale: float | None, align_corners: bool, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_out,) lower index, upper index and upper weight of PyTorch's linear interpolation."""
    position = torch.arange(out, device=device, dtype=dtype)
    if align_corners:
        ratio = (size - 1) / (out - 1) if out > 1 else 0.0
        source = position * ratio
    else:
        ratio = scale if scale is not None and scale > 0 else size / out
        source = torch.clamp((position + 0.5) * ratio - 0.5, min=0.0)
    lower = torch.clamp(torch.floor(source), max=size - 1)
    weight = source - lower
    upper = torch.clamp(lower + 1, max=size - 1)
    return lower, upper, weight


def _cubic_weights(t: Tensor) -> list[Tensor]:
    """PyTorch's bicubic convolution weights (A = −0.75) for taps at offsets −1, 0, 1, 2."""
    a = -0.75

    def near(x: Tensor) -> Tensor:
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resample_variance_factor(
    spec: ResampleSpec, size: int, out: int, scale: float | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """E_q Σ_j (Σ_{taps k reading input j} w_k(q))² along one dim: the variance factor of
    an interpolation whose weights sum to 1 (taps clamped at the border can read one input twice)."""
    align = bool(spec.align_corners)
    if spec.mode in ("linear", "bilinear", "trilinear"):
        lower, upper, weight = _linear_taps(size, out, scale, align, device, dtype)
        distinct = (1 - weight) ** 2 + weight**2
        return torch.where(lower == upper, torch.ones_like(weight), distinct).mean()
    # bicubic: four taps at floor(src) − 1 … floor(src) + 2, clamped; src not clamped at 0
    position = torch.arange(out, device=device, dtype=dtype)
    if align:
        source = position * ((size - 1) / (out - 1) if out > 1 else 0.0)
    else:
        ratio = scale if scale is not None and scale > 0 else size / out
        source = (position + 0.5) * ratio - 0.5
    base = torch.floor(source)
    weights = _cubic_weights(source - base)
    indices = [torch.clamp(base + offset, 0, size - 1) for offset in (-1, 0, 1, 2)]
    index = torch.stack(indices, dim=1)  # (L_out, 4)
    tap_weight = torch.stack(weights, dim=1)
    same = (index.unsqueeze(2) == index.unsqueeze(1)).to(dtype)  # (L_out, 4, 4)
    return torch.einsum("qa,qab,qb->q", tap_weight, same, tap_weight).mean()


def resample_moments(
    spec: ResampleSpec, mean: Tensor, variance: Tensor, spatial: Sequence[int]
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Moments of ``F.interpolate(x, ...)``'s output pooled over positions, and its spatial size.

    mean, variance: (C,); spatial: the input's spatial size. Nearest (and nearest-exact)
    copy one input per output position: the moments are unchanged. Linear, bilinear,
    trilinear and bicubic mix inputs with weights summing to 1 per dim, so the mean is
    unchanged and the variance is σ² Π_d E_q[Σ_j (Σ_{k→j} w_k(q))²] (taps that PyTorch
    clamps to the same border input add their weights before squaring; the factor is
    separable over dims); align_corners, scale_factor vs size and recompute_scale_factor
    follow PyTorch's source-index rules. ``area`` is adaptive average pooling. Exact under
    independence; cost O(Σ_d L_out,d).
    """
    rank = len(spatial)
    out_spatial = spec.output_shape(spatial)
    if spec.mode == "area":
        return pool_moments(PoolSpec.create("adaptive_avg", rank, output_size=out_spatial), mean, variance, spatial)
    if spec.mode in ("nearest", "nearest-exact"):
        return mean, variance, out_spatial
    expected_rank = {"linear": 1, "bilinear": 2, "trilinear": 3, "bicubic": 2}[spec.mode]
    if rank != expected_rank:
        raise MomentsError(f"resample_moments: mode {spec.mode!r} needs {expected_rank} spatial dims, got {rank}")
    if _compiles_constants(spatial):  # dynamo, static sizes: a constant of the graph
        (factor,) = _graph_constants(_spec_resample_factor, (_step_key(spec), tuple(spatial)), mean.dtype, mean.device)
    else:
        factor = _resample_factor(spec, spatial, mean.dtype, mean.device)
    return mean, variance * factor, out_spatial


def _resample_factor(spec: ResampleSpec, spatial: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Π_d :func:`_resample_variance_factor` (0-dim): the variance factor of :func:`resample_moments`."""
    out_spatial, scales = spec.output_shape(spatial), spec.source_scales(spatial)
    factor = torch.ones((), dtype=dtype, device=device)
    for d in range(len(spatial)):
        factor = factor * _resample_variance_factor(spec, spatial[d], out_spatial[d], scales[d], device, dtype)
    return factor


def _spec_resample_factor(
    key: _StepKey, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor]:
    """(:func:`_resample_factor`,) of the :class:`ResampleSpec` of this :func:`_step_key` (for
    :func:`_graph_constants`)."""
    cls, values = key
    return (_resample_factor(cls(*values), spatial, dtype, device),)


# --------------------------------------------------------------------------- conv / linear
# The conv weight helpers below were moved here from bkn_export.functional (which re-exports
# them for its own prediction): one implementation of the per-tap algebra.


def _weight_blocks(weight: Tensor, groups: int) -> Tensor:
    """(g, A, B, K) view of a conv weight: (C/g, C_prev/g) per group, (C_prev/g, C/g) if transposed."""
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def _per_tap(weight: Tensor, groups: int, transposed: bool, moment: Tensor) -> Tensor:
    """(C, *k): Σ_i W[o, i, t] · moment_i per output channel o and kernel tap t.

    weight: (C, C_prev/g, *k), or (C_prev, C/g, *k) when ``transposed``; moment: (C_prev,).
    """
    blocks = _weight_blocks(weight, groups)
    if transposed:  # per group (1, C_prev/g) @ (C_prev/g, C/g · K)
        taps = moment.reshape(groups, 1, -1) @ blocks.flatten(2)
    else:  # per group and output channel (1, C_prev/g) @ (C_prev/g, K)
        # An explicit bmm on W's own layout: matmul's broadcasting would copy W transposed,
        # forward and backward, and W-sized temporaries dominate this prediction's cost.
        _, per_group, inputs, taps_count = blocks.shape
        rows = moment.reshape(groups, 1, 1, inputs).expand(groups, per_group, 1, inputs)
        taps = torch.bmm(rows.reshape(-1, 1, inputs), blocks.reshape(-1, inputs, taps_count))
    return taps.reshape(-1, *weight.shape[2:])


def _tap_weighted(weight: Tensor, groups: int, transposed: bool, moment: Tensor, tap_weights: Tensor) -> Tensor:
    """(C,): Σ_{i,t} W[o, i, t] · tap_weights_t · moment_i (weight, moment as :func:`_per_tap`).

    Sums over the (contiguous) kernel first, then over input channels: cheaper than
    :func:`_per_tap` followed by a weighted sum over taps.
    """
    summed = _weight_blocks(weight, groups) @ tap_weights.reshape(-1).to(weight.dtype)  # (g, A, B)
    if transposed:
        return (moment.reshape(groups, 1, -1) @ summed).reshape(-1)
    return (summed @ moment.reshape(groups, -1, 1)).reshape(-1)


def _conv_pads(layer: torch.nn.modules.conv._ConvNd, dim: int) -> tuple[int, int]:
    """(left, right) padding of one spatial dim ("same": total dilation·(k−1), the extra on the right)."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return 0, 0
        total = layer.dilation[dim] * (layer.kernel_size[dim] - 1)
        return total // 2, total - total // 2
    pad = layer.padding[dim]
    assert isinstance(pad, int)
    return pad, pad


class _ConvDim(NamedTuple):
    """One spatial dim of a conv's geometry: all that its index map depends on besides the sizes."""

    transposed: bool
    kernel: int
    stride: int
    dilation: int
    pads: tuple[int, int]
    output_padding: int
    padding_mode: str

    @classmethod
    def of(cls, layer: torch.nn.modules.conv._ConvNd, dim: int) -> _ConvDim:
        return cls(
            bool(layer.transposed),
            int(layer.kernel_size[dim]),
            int(layer.stride[dim]),
            int(layer.dilation[dim]),
            _conv_pads(layer, dim),
            int(layer.output_padding[dim]) if layer.transposed else 0,
            str(layer.padding_mode),
        )

    def output_length(self, size: int) -> int:
        span = self.dilation * (self.kernel - 1)
        left, right = self.pads
        if self.transposed:
            return (size - 1) * self.stride - 2 * left + span + self.output_padding + 1
        return (size + left + right - span - 1) // self.stride + 1


def _conv_output_length(layer: torch.nn.modules.conv._ConvNd, dim: int, size: int) -> int:
    return _ConvDim.of(layer, dim).output_length(size)


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _padded_source(index: Tensor, size: int, mode: str) -> Tensor:
    """Map indices into a padded frame shifted to the input's origin (``index`` = padded − left)
    back to the input index ``F.pad`` copies there, or −1 (zeros) outside; −1 stays −1."""
    if mode == "zeros":
        return torch.where((index >= 0) & (index < size), index, -1)
    if mode == "reflect":
        mapped = torch.where(index < 0, -index, index)
        mapped = torch.where(mapped >= size, 2 * (size - 1) - mapped, mapped)
    elif mode == "replicate":
        mapped = torch.clamp(index, 0, size - 1)
    elif mode == "circular":  # index in [−size, 2·size): F.pad refuses to wrap around more than once
        # (not torch.remainder: with a symbolic size, the ONNX exporter cannot translate it)
        mapped = torch.where(index < 0, index + size, index)
        mapped = torch.where(mapped >= size, mapped - size, mapped)
    else:
        raise MomentsError(f"conv_moments: padding mode {mode!r} is not one of {_PADDING_MODES}")
    return mapped


def _conv_index_map(
    layer: torch.nn.modules.conv._ConvNd,
    dim: int,
    size: int,
    input_padding: tuple[int, int] = (0, 0),
    input_padding_mode: str = "zeros",
) -> Tensor:
    """(L_out, K_d) long: the input index that kernel tap t of output position q reads, −1 for none.

    A conv's tap t at output q reads the padded input at q·s + t·dil, i.e. input
    j = q·s − pad_left + t·dil, mapped back into [0, size) by the padding mode exactly as
    ``F.pad`` does (reflect: −j or 2(size−1)−j; replicate: clamp; circular: j mod size) or
    reading nothing (zeros) outside. A transposed conv's output q takes input j where
    j·s − pad + t·dil = q (nothing when no such j exists). ``input_padding`` (left, right),
    a pad applied to the input before the layer (``F.pad`` / ``nn.ZeroPad2d`` …, mode
    ``input_padding_mode``), composes: the layer's map on the padded length, then that pad's.
    """
    return _index_map(_ConvDim.of(layer, dim), size, input_padding, input_padding_mode, layer.weight.device)


def _index_map(
    geometry: _ConvDim, size: int, input_padding: tuple[int, int], input_padding_mode: str, device: torch.device
) -> Tensor:
    """:func:`_conv_index_map` of one dim's geometry."""
    kernel, stride, dilation = geometry.kernel, geometry.stride, geometry.dilation
    before, after = input_padding
    padded = size + before + after
    out = geometry.output_length(padded)
    left, _ = geometry.pads
    position = torch.arange(out, device=device).unsqueeze(1)
    tap = torch.arange(kernel, device=device).unsqueeze(0)
    if geometry.transposed:
        source = position + left - tap * dilation  # = j · stride for the input j it takes
        valid = (source >= 0) & (source < padded * stride) & (torch.remainder(source, stride) == 0)
        index = torch.where(valid, torch.div(source, stride, rounding_mode="floor"), -1)
    else:
        index = _padded_source(position * stride - left + tap * dilation, padded, geometry.padding_mode)
    if before == 0 and after == 0:
        return index
    return torch.where(index >= 0, _padded_source(index - before, size, input_padding_mode), -1)


def _inputs_repeat(layer: torch.nn.modules.conv._ConvNd, input_padding: Sequence[tuple[int, int]], mode: str) -> bool:
    """Whether one window can read the same input twice (padding modes that copy inputs)."""
    if mode != "zeros" and any(p != 0 for pair in input_padding for p in pair):
        return True
    if layer.transposed or layer.padding_mode == "zeros":
        return False
    return layer.padding == "same" or (not isinstance(layer.padding, str) and any(p != 0 for p in layer.padding))


def _borders_vary(
    layer: torch.nn.modules.conv._ConvNd, input_padding: Sequence[tuple[int, int]] = (), mode: str = "zeros"
) -> bool:
    """Whether some output position's window has taps outside the input (zero padding,
    or a transposed conv's border and stride gaps); if not, every tap counts everywhere."""
    if mode == "zeros" and any(p != 0 for pair in input_padding for p in pair):
        return True
    if layer.transposed:
        return True
    if layer.padding_mode != "zeros" or layer.padding == "valid":
        return False
    return layer.padding == "same" or any(p != 0 for p in layer.padding)


#: Whether autocast exists per device type (fixed for the process: asked once per type).
_AUTOCAST_AVAILABLE: dict[str, bool] = {}
#: What :func:`without_autocast` returns where autocast is off (a nullcontext is reusable and reentrant).
_NO_CONTEXT = contextlib.nullcontext()


def without_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast off on ``device_type`` where it is on, else a no-op context. The tables cached per dtype are built
    under it: under autocast their matrix products would run in bfloat16 / float16, and the cache would keep a
    table of another dtype than its key for every later call (a crash in float32 steps after one autocast step)."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


def _coverage_tables(index: Tensor, dtype: torch.dtype, repeats: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """From a (L_out, K) index map: f (K,) = E_q[tap reads an input], h (K, K) = E_q[both taps read
    inputs], and when ``repeats``, g (K, K) = E_q[both taps read the same input] (else g = diag f,
    not built). Cost O(L_out · K²)."""
    valid = (index >= 0).to(dtype)
    count = index.shape[0]
    fraction = valid.mean(dim=0)
    pairs = valid.transpose(0, 1) @ valid / count
    if not repeats:
        return fraction, pairs, None
    same = ((index.unsqueeze(2) == index.unsqueeze(1)) & (index >= 0).unsqueeze(2)).to(dtype).mean(dim=0)
    return fraction, pairs, same


#: What a conv's coverage tables depend on: per spatial dim its geometry, input size and the
#: (left, right) of a pad before it; the pad's mode; whether one window can read an input twice.
_CoverageKey = tuple[tuple[_ConvDim, ...], tuple[int, ...], tuple[tuple[int, int], ...], str, bool]
#: Whole-kernel f (*k) and h (K, K), then, where an input can repeat, g (K, K).
_Coverage = tuple[Tensor, ...]


def _build_coverage(key: _CoverageKey, dtype: torch.dtype, device: torch.device) -> _Coverage:
    """The coverage tables of a conv over all its spatial dims (K = Π_d K_d, the kernel flattened
    with the last dim fastest): f = ⊗_d f_d reshaped to the kernel, h = ⊗_d h_d (K, K) and, when
    ``repeats``, g = ⊗_d g_d (K, K): Kronecker products of the per-dim :func:`_coverage_tables`."""
    geometries, spatial, input_padding, input_padding_mode, repeats = key
    per_dim = [
        _coverage_tables(_index_map(geometry, size, pad, input_padding_mode, device), dtype, repeats)
        for geometry, size, pad in zip(geometries, spatial, input_padding)
    ]
    fraction, pairs, same = per_dim[0]
    for f, h, g in per_dim[1:]:
        fraction = torch.outer(fraction, f).reshape(-1)
        pairs = torch.kron(pairs, h)
        same = None if same is None or g is None else torch.kron(same, g)
    kernel = tuple(geometry.kernel for geometry in geometries)
    return (fraction.reshape(kernel), pairs) if same is None else (fraction.reshape(kernel), pairs, same)


#: Coverage tables per :data:`_CoverageKey`, dtype and device; eager only.
_COVERAGE_TABLES: dict[tuple[Any, ...], _Coverage] = {}


def _layer_coverage_tables(
    layer: torch.nn.modules.conv._ConvNd,
    spatial: Sequence[int],
    input_padding: Sequence[tuple[int, int]],
    input_padding_mode: str,
    dtype: torch.dtype,
    repeats: bool,
    cached: bool,
) -> _Coverage:
    """:func:`_build_coverage` for ``layer`` on an input of size ``spatial`` after a pad
    ``input_padding``: taken from a bounded cache when ``cached`` (eager); under dynamo with
    static sizes, constants of the graph (:func:`_graph_constants`); otherwise (other tracers,
    symbolic sizes) built in the graph. Constants of the layer's shape, never requiring grad."""
    key: _CoverageKey = (
        tuple(_ConvDim.of(layer, d) for d in range(len(spatial))),
        tuple(spatial),
        tuple((pad[0], pad[1]) for pad in input_padding),
        input_padding_mode,
        repeats,
    )
    device = layer.weight.device
    if cached:
        full_key = (key, dtype, device)
        tables = _COVERAGE_TABLES.get(full_key)
        if tables is None:
            with without_autocast(device.type):
                tables = _build_coverage(key, dtype, device)
            if len(_COVERAGE_TABLES) >= _CACHE_SIZE:
                _COVERAGE_TABLES.clear()
            _COVERAGE_TABLES[full_key] = tables
        return tables
    if _compiles_constants(spatial):
        return _graph_constants(_build_coverage, (key,), dtype, device)
    return _build_coverage(key, dtype, device)


def _quadratic_form(taps: Tensor, table: Tensor) -> Tensor:
    """(C,): Σ_{t,t'} taps[c,t] table[t,t'] taps[c,t'] for taps (C, K), table (K, K): one product and
    one reduction (compiled: one kernel, where a matmul by a constant table is a copy and an extern call)."""
    return (taps.unsqueeze(2) * table * taps.unsqueeze(1)).sum(dim=(1, 2))


def _weight_quadratic(weight: Tensor, table: Tensor) -> Tensor:
    """(A, B): Σ_{t,t'} W[a,b,t] table[t,t'] W[a,b,t'] for W (A, B, *k), table (K, K)."""
    flat = weight.flatten(2)
    return (flat * (flat @ table)).sum(dim=2)


def conv_moments(
    layer: torch.nn.Module,
    mean: Tensor,
    variance: Tensor,
    spatial: Sequence[int],
    *,
    input_padding: Sequence[tuple[int, int]] | None = None,
    input_padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Exact moments of a Conv/ConvTranspose layer's output, pooled over positions.

    layer: ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d`` (any padding and padding
    mode, stride, dilation, groups, output_padding), weight W; mean, variance: (C_in,)
    moments of the independent input positions; spatial: the input's spatial size.
    ``input_padding``: per spatial dim, in order, the (left, right) of a pad applied to the
    input before the layer (``nn.ZeroPad2d``, ``nn.ReflectionPad2d``, ``F.pad``, the static
    "same" padding of TF-ported convs …) with mode ``input_padding_mode`` (zeros, reflect,
    replicate, circular); not for ConvTranspose. Returns (C_out,), (C_out,) and the output
    spatial size.

    Output o at position p is b_o + Σ_{i,t} W[o,i,t] x_{i, j(p,t)}, where j(p,t) is the
    input that tap t reads (:func:`_conv_index_map`: none in zero padding; for reflect,
    replicate and circular padding several taps of one window can read the same input,
    at the border or, when a circular window wraps, anywhere). Its moments::

        M_p = b + Σ_t a_t c_p(t)                   a_t = Σ_i W[:,i,t] μ_i,  c_p(t) = [tap t reads an input]
        V_p = Σ_i σ²_i Σ_{t,t'} W[:,i,t] W[:,i,t'] [j(p,t) = j(p,t') exists]

    (weights of taps that read the same input add before squaring). The indicators are
    products over spatial dims, so their position averages factor into per-dim tables
    f_d (K_d,), h_d and g_d (K_d, K_d) (:func:`_coverage_tables`); pooled over positions::

        mean     = b + Σ_t a_t Π_d f_d(t_d)
        variance = Σ_i σ²_i Σ_{t,t'} W W' Π_d g_d(t_d, t'_d)  +  Σ_{t,t'} a_t a_t' Π_d h_d − (mean − b)²

    (g is diagonal, = f, where no input repeats.) Cost: O(Σ_d L_out,d · K_d² + K²) for the
    tables (once per geometry in eager mode, and constants of a graph compiled with static
    sizes) plus O(C_out · (C_in/groups + K) · K) without repeats, O(C_out · C_in/groups · K²) with
    them (reflect, replicate, circular), independent of the batch. Gradients flow into
    W, b, mean and variance.
    """
    if not isinstance(layer, torch.nn.modules.conv._ConvNd):
        raise MomentsError(f"conv_moments: {type(layer).__name__} is not a Conv or ConvTranspose layer")
    dtype = mean.dtype
    weight = layer.weight.to(dtype)
    groups = layer.groups
    kernel = weight.shape[2:]
    rank = len(kernel)
    name = type(layer).__name__
    if len(spatial) != rank:
        raise MomentsError(f"conv_moments: a {rank}d {name} needs a {rank}d spatial shape, got {tuple(spatial)}")
    pairs = [(0, 0)] * rank if input_padding is None else [tuple(pair) for pair in input_padding]
    if len(pairs) != rank or any(len(pair) != 2 or min(pair) < 0 for pair in pairs):
        raise MomentsError(
            f"conv_moments: input_padding for a {rank}d {name} must be {rank} non-negative (left, right) pairs, "
            f"got {input_padding}"
        )
    pre_padding: list[tuple[int, int]] = [(pair[0], pair[1]) for pair in pairs]
    if layer.transposed and any(p != 0 for pair in pre_padding for p in pair):
        raise MomentsError(f"conv_moments: input_padding before a {name} is not supported")
    if input_padding_mode not in _PADDING_MODES:
        raise MomentsError(f"conv_moments: input_padding_mode must be one of {_PADDING_MODES}")
    transposed = layer.transposed
    out_spatial = tuple(_conv_output_length(layer, d, spatial[d] + sum(pre_padding[d])) for d in range(rank))
    kernel_dims = list(range(1, rank + 1))
    repeats = _inputs_repeat(layer, pre_padding, input_padding_mode)
    if not repeats and not _borders_vary(layer, pre_padding, input_padding_mode):
        # every tap reads a distinct input at every position: M is constant
        all_taps = weight.new_ones(kernel)
        centred_mean = _tap_weighted(weight, groups, transposed, mean, all_taps)
        predicted_variance = _tap_weighted(weight * weight, groups, transposed, variance, all_taps)
    else:
        fraction, both, *same = _layer_coverage_tables(
            layer, spatial, pre_padding, input_padding_mode, dtype, repeats, _caches_constants(mean)
        )
        tap_mean = _per_tap(weight, groups, transposed, mean)
        centred_mean = (tap_mean * fraction).sum(dim=kernel_dims)
        if repeats:  # Σ_i σ²_i Σ_{t,t'} W W' g(t, t'), g = Π_d g_d of the whole kernel
            quadratic = _weight_quadratic(weight, same[0])
            blocks = quadratic.reshape(groups, -1, quadratic.shape[1])  # (g, C_out/g, C_in/g)
            mean_of_variance = (blocks @ variance.reshape(groups, -1, 1)).reshape(-1)
        else:  # Σ_t f_t Σ_i W[:,i,t]² σ²_i: the same per-tap reduction as the mean's (one kernel compiled)
            mean_of_variance = (_per_tap(weight * weight, groups, transposed, variance) * fraction).sum(dim=kernel_dims)
        mean_of_square = _quadratic_form(tap_mean.flatten(1), both)  # Σ_{t,t'} a_t a_t' h(t, t')
        predicted_variance = mean_of_variance + (mean_of_square - centred_mean * centred_mean).clamp_min(0.0)
    predicted_mean = centred_mean if layer.bias is None else centred_mean + layer.bias.to(dtype)
    return predicted_mean, predicted_variance, out_spatial


# --------------------------------------------------------------------------- linear paths


@dataclass(frozen=True)
class PadSpec:
    """A pad before a layer (``F.pad``, ``nn.ZeroPad2d``, ``nn.ReflectionPad2d`` …): per spatial
    dim in order (not ``F.pad``'s last-dim-first order), the (left, right) counts, and the mode
    (zeros, reflect, replicate, circular; a constant pad other than 0 is not supported)."""

    padding: tuple[tuple[int, int], ...]
    mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.mode not in _PADDING_MODES:
            raise MomentsError(f"PadSpec: mode {self.mode!r} is not one of {_PADDING_MODES}")


#: A step of a linear path: average pooling, resampling, a pad, or a Conv/ConvTranspose module.
LinearStep = PoolSpec | ResampleSpec | PadSpec | torch.nn.Module


def _one_hot(index: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """(..., size) rows e_index, a zero row where index is −1."""
    return (index.unsqueeze(-1) == torch.arange(size, device=index.device)).to(dtype)


def _pool_matrix(spec: PoolSpec, dim: int, size: int, out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(L_out, L_in): average pooling along one dim (divisor_override: the indicator; its 1/D is global)."""
    start, end = _window_bounds(spec, dim, size, out, device)
    position = torch.arange(size, device=device)
    inside = (position >= start.unsqueeze(1)) & (position < end.unsqueeze(1))
    counts = inside.sum(dim=1).to(dtype)
    if spec.kind == "avg" and spec.divisor_override is not None:
        return inside.to(dtype)
    if spec.kind == "avg" and spec.count_include_pad:
        divisor = (end - start).to(dtype)
    else:
        divisor = counts
    return inside.to(dtype) / divisor.unsqueeze(1)


def _resample_matrix(
    spec: ResampleSpec, size: int, out: int, scale: float | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(L_out, L_in): PyTorch's interpolation along one dim (weights of taps on one input add)."""
    if spec.mode in ("nearest", "nearest-exact"):
        ratio = scale if scale is not None and scale > 0 else size / out
        position = torch.arange(out, device=device, dtype=torch.float32)
        offset = 0.5 if spec.mode == "nearest-exact" else 0.0
        source = torch.clamp(torch.floor((position + offset) * ratio), max=size - 1).long()
        return _one_hot(source, size, dtype)
    if spec.mode in ("linear", "bilinear", "trilinear"):
        lower, upper, weight = _linear_taps(size, out, scale, bool(spec.align_corners), device, dtype)
        return _one_hot(lower.long(), size, dtype) * (1 - weight).unsqueeze(1) + _one_hot(
            upper.long(), size, dtype
        ) * weight.unsqueeze(1)
    # bicubic
    position = torch.arange(out, device=device, dtype=dtype)
    if spec.align_corners:
        source = position * ((size - 1) / (out - 1) if out > 1 else 0.0)
    else:
        ratio = scale if scale is not None and scale > 0 else size / out
        source = (position + 0.5) * ratio - 0.5
    base = torch.floor(source)
    matrix = torch.zeros(out, size, dtype=dtype, device=device)
    for offset, weight in zip((-1, 0, 1, 2), _cubic_weights(source - base)):
        matrix = matrix + _one_hot(torch.clamp(base + offset, 0, size - 1).long(), size, dtype) * weight.unsqueeze(1)
    return matrix


def _step_matrix(
    step: LinearStep, dim: int, size: int, dtype: torch.dtype, device: torch.device, spatial: Sequence[int]
) -> tuple[Tensor, int]:
    """(L_out, L_in) matrix of a non-conv linear step along ``dim``, and L_out."""
    out = _step_output_size(step, dim, size, spatial)
    if isinstance(step, PadSpec):
        source = _padded_source(torch.arange(out, device=device) - step.padding[dim][0], size, step.mode)
        return _one_hot(source, size, dtype), out
    if isinstance(step, PoolSpec):
        return _pool_matrix(step, dim, size, out, dtype, device), out
    assert isinstance(step, ResampleSpec)
    if step.mode == "area":
        adaptive = PoolSpec.create("adaptive_avg", len(spatial), output_size=step.output_shape(spatial))
        return _pool_matrix(adaptive, dim, size, out, dtype, device), out
    return _resample_matrix(step, size, out, step.source_scales(spatial)[dim], dtype, device), out


def _step_output_size(step: LinearStep, dim: int, size: int, spatial: Sequence[int]) -> int:
    """L_out of a non-conv linear step along ``dim`` (``spatial``: its input's size in every dim)."""
    if isinstance(step, PadSpec):
        before, after = step.padding[dim]
        return size + before + after
    assert isinstance(step, (PoolSpec, ResampleSpec))
    return step.output_shape(spatial)[dim]


#: A non-conv linear step as plain values: its class and its field values.
_StepKey = tuple[type, tuple[Any, ...]]


def _step_key(step: LinearStep) -> _StepKey:
    return type(step), tuple(getattr(step, field.name) for field in fields(step))  # type: ignore[arg-type]


def _path_sizes(
    before: Sequence[LinearStep], geometries: tuple[_ConvDim, ...] | None, after: Sequence[LinearStep],
    spatial: Sequence[int],
) -> list[int]:  # fmt: skip
    """The output size of a linear path: ``before``, the conv of these ``geometries`` (if any), ``after``."""
    sizes = list(spatial)
    for step in before:
        sizes = [_step_output_size(step, d, sizes[d], sizes) for d in range(len(sizes))]
    if geometries is not None:
        sizes = [geometry.output_length(size) for geometry, size in zip(geometries, sizes)]
    for step in after:
        sizes = [_step_output_size(step, d, sizes[d], sizes) for d in range(len(sizes))]
    return sizes


def _through_steps(
    steps: Sequence[Any], matrices: list[Tensor], sizes: list[int], dtype: torch.dtype, device: torch.device
) -> list[int]:
    """Left-multiply each dim's matrix in ``matrices`` (in place) by every step's per-dim matrix, in order;
    returns the sizes after the steps."""
    for step in steps:
        new_sizes = list(sizes)
        for d in range(len(sizes)):
            matrix, new_sizes[d] = _step_matrix(step, d, sizes[d], dtype, device, sizes)
            matrices[d] = matrix @ matrices[d]
        sizes = new_sizes
    return sizes


def _build_path_tables(
    before_keys: tuple[_StepKey, ...],
    geometries: tuple[_ConvDim, ...] | None,
    after_keys: tuple[_StepKey, ...],
    spatial: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, ...]:
    """The tables of :func:`linear_path_moments` (steps as :func:`_step_key` values, the conv as its
    per-dim geometry or None), over the whole kernel (K = Π_d K_d, flattened with the last dim fastest;
    products of per-dim tables): f (*k), h and g (K, K), the bias cross term (*k), Π_d E[β_d] and
    Π_d E[β_d²] (0-dim)."""
    before = [cls(*values) for cls, values in before_keys]
    after = [cls(*values) for cls, values in after_keys]
    rank = len(spatial)
    # per-dim matrices before the conv
    pre: list[Tensor] = []
    sizes = list(spatial)
    for d in range(rank):
        pre.append(torch.eye(spatial[d], dtype=dtype, device=device))
    sizes = _through_steps(before, pre, sizes, dtype, device)
    # the conv's per-tap selections (K_d, L_out, L_mid), or one identity "tap"
    if geometries is not None:
        taps = []
        for d in range(rank):
            index = _index_map(geometries[d], sizes[d], (0, 0), "zeros", device)  # (L_out, K_d)
            taps.append(_one_hot(index.transpose(0, 1), sizes[d], dtype))  # (K_d, L_out, L_mid)
        sizes = [tap.shape[1] for tap in taps]
    else:
        taps = [torch.eye(sizes[d], dtype=dtype, device=device).unsqueeze(0) for d in range(rank)]
    post = [torch.eye(sizes[d], dtype=dtype, device=device) for d in range(rank)]
    sizes = _through_steps(after, post, sizes, dtype, device)
    tables: list[Tensor] = []
    for d in range(rank):
        paths = post[d] @ taps[d] @ pre[d]  # (K_d, L_out, L_in)
        count = paths.shape[1]
        rows = paths.sum(dim=2)  # (K_d, L_out)
        beta = post[d].sum(dim=1)  # (L_out,)
        flat = paths.flatten(1)
        per_dim = [
            rows.mean(dim=1),
            rows @ rows.transpose(0, 1) / count,
            flat @ flat.transpose(0, 1) / count,
            rows @ beta / count,
            beta.mean(),
            (beta * beta).mean(),
        ]
        if not tables:
            tables = per_dim
            continue
        fraction, pairs, same, bias_cross, beta_mean, beta_square = tables
        tables = [
            torch.outer(fraction, per_dim[0]).reshape(-1),
            torch.kron(pairs, per_dim[1]),
            torch.kron(same, per_dim[2]),
            torch.outer(bias_cross, per_dim[3]).reshape(-1),
            beta_mean * per_dim[4],
            beta_square * per_dim[5],
        ]
    kernel = tuple(tap.shape[0] for tap in taps)
    return tables[0].reshape(kernel), tables[1], tables[2], tables[3].reshape(kernel), tables[4], tables[5]


def _global_scale(step: LinearStep) -> float:
    """The factor a step applies to every output beyond its per-dim matrices (divisor_override)."""
    if isinstance(step, PoolSpec) and step.kind == "avg" and step.divisor_override is not None:
        return 1.0 / step.divisor_override
    return 1.0


def _check_linear_step(step: LinearStep) -> None:
    if isinstance(step, PoolSpec) and step.kind not in ("avg", "adaptive_avg"):
        raise MomentsError(
            f"linear_path_moments: {step.kind} pooling is not linear; push it with pool_moments "
            "(its input positions are then taken as independent)"
        )
    if isinstance(step, torch.nn.Module) and not isinstance(step, torch.nn.modules.conv._ConvNd):
        raise MomentsError(f"linear_path_moments: {type(step).__name__} is not a Conv/ConvTranspose layer")


#: :func:`_build_path_tables`' tables per (path key, input size, dtype, device), in eager mode
#: (:func:`_caches_constants`): constants of the path's shape, never requiring grad.
_PATH_TABLES: dict[tuple[Any, ...], tuple[Tensor, ...]] = {}


def linear_path_moments(
    steps: Sequence[LinearStep], mean: Tensor, variance: Tensor, spatial: Sequence[int]
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Exact moments of a path of linear spatial steps around at most one Conv/ConvTranspose.

    steps: in order, any of average pooling (``PoolSpec`` avg / adaptive_avg),
    resampling (``ResampleSpec``), pads (``PadSpec``) and at most one ``nn.Conv*d`` /
    ``nn.ConvTranspose*d``; mean, variance: (C_in,) moments of the independent input
    positions; spatial: the input's spatial size. Returns (C_out,), (C_out,) and the
    output spatial size.

    Chaining :func:`pool_moments`, :func:`resample_moments` and :func:`conv_moments`
    treats every intermediate output as having independent positions, which it has not
    after a window or an interpolation (AvgPool2d(3, 2, 1) → Conv 3×3: variance 31 % off,
    bilinear ×2 → Conv 3×3: 40 %, Conv 3×3 → AvgPool2d(2): 23 %; docs/prior.md). This
    function is exact for the whole path: each step is a linear map that factors over
    spatial dims, so along dim d the path is, per conv tap t, a matrix
    T_d^{(t)} = Post_d S_d^{(t)} Pre_d (L_out,d × L_in,d) — the steps after the conv, the
    conv's tap selection (its padding modes included), the steps before — and output o at
    Q is b_o β(Q) + Σ_{i,t} W[o,i,t] Σ_j Π_d T_d^{(t_d)}[Q_d, j_d] x_{i,j}. Its moments,
    pooled over Q, need only per-dim (K_d,) and (K_d, K_d) tables::

        mean     = b Π_d E[β_d] + Σ_t a_t Π_d E_Q[r_d^{(t)}]          r^{(t)} = row sums of T^{(t)}
        variance = Σ_i σ²_i Σ_{t,t'} W W' Π_d ⟨T_d^{(t)}, T_d^{(t')}⟩/L_out,d  +  Var_Q(M_Q)

    with β_d the row sums of Post_d. Without a conv the channels pass through one by one.
    Cost: O(Σ_d K_d · L_out,d · L_mid,d · L_in,d) for the dense per-dim matrices (about
    2·10⁷ multiply-adds for a 3×3 conv at 112²), plus O(C_out · C_in/groups · K²).
    """
    for step in steps:
        _check_linear_step(step)
    convs = [step for step in steps if isinstance(step, torch.nn.modules.conv._ConvNd)]
    if len(convs) > 1:
        raise MomentsError("linear_path_moments: at most one Conv/ConvTranspose per path")
    dtype, device = mean.dtype, mean.device
    rank = len(spatial)
    split = len(steps)
    for k, step in enumerate(steps):
        if isinstance(step, torch.nn.modules.conv._ConvNd):
            split = k
    before, after = list(steps[:split]), list(steps[split + 1 :])
    pre_scale, post_scale = 1.0, 1.0
    for step in before:
        pre_scale *= _global_scale(step)
    for step in after:
        post_scale *= _global_scale(step)
    mean, variance = mean * pre_scale, variance * pre_scale * pre_scale
    if convs:
        layer = convs[0]
        assert isinstance(layer, torch.nn.modules.conv._ConvNd)
        if len(layer.kernel_size) != rank:
            raise MomentsError(
                f"linear_path_moments: a {len(layer.kernel_size)}d {type(layer).__name__} in a {rank}d path"
            )
        weight = layer.weight.to(dtype)
        groups, transposed, bias = layer.groups, layer.transposed, layer.bias
        geometries: tuple[_ConvDim, ...] | None = tuple(_ConvDim.of(layer, d) for d in range(rank))
    else:
        channels = mean.shape[0]
        weight = torch.ones(channels, 1, *([1] * rank), dtype=dtype, device=device)
        groups, transposed, bias = channels, False, None
        geometries = None
    # the tables: constants of the path's shape (of the graph, when dynamo traces static sizes)
    key = (tuple(_step_key(step) for step in before), geometries, tuple(_step_key(step) for step in after))
    if _caches_constants(mean):  # eager: built once per path shape, dtype and device (bounded cache)
        full_key = (*key, tuple(spatial), dtype, device)
        tables = _PATH_TABLES.get(full_key)
        if tables is None:
            with torch.no_grad(), without_autocast(device.type):
                tables = _build_path_tables(*key, tuple(spatial), dtype, device)
            if len(_PATH_TABLES) >= _CACHE_SIZE:
                _PATH_TABLES.clear()
            _PATH_TABLES[full_key] = tables
    elif _compiles_constants(spatial):
        tables = _graph_constants(_build_path_tables, (*key, tuple(spatial)), dtype, device)
    else:
        tables = _build_path_tables(*key, tuple(spatial), dtype, device)
    fraction, pairs, same, bias_cross, beta_mean, beta_square = tables
    sizes = _path_sizes(before, geometries, after, spatial)
    kernel_dims = list(range(1, rank + 1))
    tap_mean = _per_tap(weight, groups, transposed, mean)  # (C_out, *K)
    centred_mean = (tap_mean * fraction).sum(dim=kernel_dims)
    mean_of_square = _quadratic_form(tap_mean.flatten(1), pairs)
    if transposed:
        weight_out_first = (
            _weight_blocks(weight, groups).transpose(1, 2).reshape(-1, weight.shape[0] // groups, *weight.shape[2:])
        )
    else:
        weight_out_first = weight
    quadratic = _weight_quadratic(weight_out_first, same)
    blocks = quadratic.reshape(groups, -1, quadratic.shape[1])  # (g, C_out/g, C_in/g)
    mean_of_variance = (blocks @ variance.reshape(groups, -1, 1)).reshape(-1)
    out_mean = centred_mean
    if bias is not None:
        b = bias.to(dtype)
        out_mean = out_mean + b * beta_mean
        mean_of_square = mean_of_square + b * b * beta_square + 2 * b * (tap_mean * bias_cross).sum(dim=kernel_dims)
    spread = (mean_of_square - out_mean * out_mean).clamp_min(0.0)
    out_variance = mean_of_variance + spread
    return out_mean * post_scale, out_variance * post_scale * post_scale, tuple(sizes)


def linear_moments(weight: Tensor, bias: Tensor | None, mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of ``F.linear(x, weight, bias)`` for independent inputs: W μ + b and (W∘W) σ².

    weight: (C_out, C_in); bias: (C_out,) or None; mean, variance: (C_in,). Exact.
    """
    weight = weight.to(mean.dtype)
    out_mean = weight @ mean
    if bias is not None:
        out_mean = out_mean + bias.to(mean.dtype)
    return out_mean, (weight * weight) @ variance


def normalized_output_moments(
    posterior_mean: Tensor, posterior_variance: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Moments of a normalization's output y = γ (x − μ)/sqrt(Σ + ε) + β for x ~ N(μ, Σ).

    posterior_mean μ, posterior_variance Σ: (C,); weight γ, bias β: (C,) or None
    (affine=False: γ = 1, β = 0). Returns (β, γ² Σ / (Σ + ε)): the "normalization-aware"
    convention, where a successor's prior starts from what the normalization emits rather
    than from the statistics of its input. Exact.
    """
    ratio = posterior_variance / (posterior_variance + eps)
    out_mean = (
        torch.zeros_like(posterior_mean) if bias is None else bias.to(posterior_mean.dtype).expand_as(posterior_mean)
    )
    if weight is None:
        return out_mean, ratio
    gamma = weight.to(posterior_variance.dtype)
    return out_mean, gamma * gamma * ratio
