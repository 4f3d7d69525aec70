"""Fused eager forms of the hot prediction steps (conv / linear, ReLU and piecewise activation moments).

:mod:`bkn_export.moments` is the reference: plain differentiable tensor code that
``torch.export``, dynamo and the ONNX exporter trace. Run eagerly, its autograd graph
has one node per small op, and a conv's prediction touches its weight W (C_out, C_in/g, *k)
many times: W∘W, a per-tap product, their backward's outer products and W-sized
products, each a full pass over W. On a micro-batch those passes cost more than the conv
itself (``benchmarks/bench_networks.py --profile``; benchmarks/RESULTS.md, "Whole-network
train step on CPU").

Here the same math runs as ``torch.autograd.Function`` s with closed-form backward:

* :func:`affine_moments` — a Conv{1,2,3}d whose windows never read one input twice
  (zero padding, a zero pad folded in, or none; not transposed), or a Linear (K = 1).
  With T = per-tap means (C_out, K), f (K,) the fraction of positions at which tap t
  reads an input and H (K, K) the fraction at which taps t and t' both do (products of
  per-dim tables, :func:`bkn_export.moments._coverage_tables`, cached per geometry)::

      T[o,t] = Σ_i W[o,i,t] μ_i            S[o,i] = Σ_t W[o,i,t]² f_t
      M_o = Σ_t T[o,t] f_t                 V_o = Σ_i S[o,i] σ²_i + max(T_o H T_oᵀ − M_o², 0)

  (no border: f = 1 and the second term of V is 0 exactly, as in the reference). The
  backward, with gT = ∂M f + 2 ∂V' (T H) (∂V' = ∂V where the clamp passes)::

      ∂W[o,i,t] = gT[o,t] μ_i + 2 ∂V_o σ²_i f_t W[o,i,t]
      ∂μ_i = Σ_{o,t} gT[o,t] W[o,i,t]      ∂σ²_i = Σ_o ∂V_o S[o,i]

  W is read three times forward (T, W∘W for S) and three times backward (∂μ and ∂W),
  and S is kept instead of W∘W.
* :func:`relu_moments` — with a = μ/σ, E = μ Φ(a) + σ φ(a): ∂E/∂μ = Φ(a), ∂E/∂σ = φ(a),
  ∂Var/∂μ = 2 E Φ(−a), ∂Var/∂σ = 2 σ Φ(a) − 2 E φ(a) (the forward is the reference's).
* :func:`piecewise_moments` — relu6, leaky_relu, hardtanh, hardsigmoid, hardswish
  (continuous, piecewise quadratic): the reference's forward, and Stein's identities
  ∂E[g(X)]/∂μ = E[g'(X)], ∂E[g(X)]/∂σ = E[g'(X) Z] for g = f, f² as truncated moments
  (:class:`_PiecewiseMoments`).

Under ``create_graph=True`` each backward instead recomputes its forward with autograd
and differentiates that, so second and higher derivatives are the reference's.

:func:`predict_steps` is what the transitions call: these functions for the steps they
cover when nothing traces the call (plain eager, any device), the steps' own
``predict`` (the reference) otherwise and for every other step. A squeeze-and-excitation
:class:`~bkn_export.chain.steps.Gate` runs its branch through :func:`predict_steps` too
(the product with the gate is :class:`~bkn_export.chain.steps.Gate`'s, repeated here). :func:`reference_only`
switches the fused forms off (benchmarks and tests compare the two).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

# Private API, as in bkn_export.ops: a dispatch mode (fake tensors, make_fx, FlopCounterMode)
# must see the reference ops, not one opaque Function.
from torch.utils._python_dispatch import _get_current_dispatch_mode

from bkn_export import moments
from bkn_export.chain.steps import Affine, Elementwise, Gate, Moments, Spatial, Step, linear_runs

__all__ = ["affine_moments", "piecewise_moments", "predict_steps", "reference_only", "relu_moments", "uses_fused"]

_ENABLED: ContextVar[bool] = ContextVar("bkn_fused_predictions", default=True)


@contextmanager
def reference_only() -> Iterator[None]:
    """Within the block (this thread / task), :func:`predict_steps` runs every step's reference ``predict``."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def uses_fused(mean: Tensor) -> bool:
    """Whether :func:`predict_steps` takes the fused forms for this call (eager, nothing tracing)."""
    # Compiling first: dynamo cannot trace the ContextVar (nor needs to).
    return (
        not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()
        and type(mean) is Tensor
        and _get_current_dispatch_mode() is None
        and not torch.overrides.has_torch_function((mean,))
        and not torch._C._are_functorch_transforms_active()  # torch.func: these Functions have no vmap rule
        and _ENABLED.get()
    )


# --------------------------------------------------------------------------- conv / linear


#: (f, H) or None per conv geometry, input size and dtype: constants of the layer's shape.
_COVERAGE: dict[tuple[Any, ...], tuple[Tensor, Tensor] | None] = {}


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _coverage(
    layer: nn.modules.conv._ConvNd, spatial: Spatial, padding: tuple[tuple[int, int], ...], dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """(f (K,), H (K, K)) of ``layer``'s geometry on ``spatial`` after a zero pad ``padding``,
    or None where every tap reads an input at every position (computed once per geometry)."""
    key = _hashable(
        (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.weight.device, spatial, padding, dtype)
    )  # modules may hold lists (efficientnet-pytorch's stride)
    if key in _COVERAGE:
        return _COVERAGE[key]
    coverage = None
    if moments._borders_vary(layer, padding, "zeros"):
        # Constants: never part of a graph, and usable outside the inference mode they may be built in.
        with torch.inference_mode(False), torch.no_grad():
            tables = [
                moments._coverage_tables(
                    moments._conv_index_map(layer, d, spatial[d], padding[d], "zeros"), dtype, False
                )
                for d in range(len(spatial))
            ]
            fraction, pairs = tables[0][0], tables[0][1]
            for d in range(1, len(tables)):
                fraction = torch.outer(fraction, tables[d][0]).reshape(-1)
                pairs = torch.kron(pairs, tables[d][1])
            coverage = (fraction.reshape(-1).contiguous(), pairs.contiguous())
    _COVERAGE[key] = coverage
    return coverage


def conv_covered(layer: nn.Module, input_padding: tuple[tuple[int, int], ...] | None, mode: str) -> bool:
    """Whether :func:`affine_moments` computes this conv's moments (else the reference does)."""
    if not isinstance(layer, nn.modules.conv._ConvNd) or layer.transposed:
        return False
    if layer.padding_mode != "zeros" or (input_padding is not None and mode != "zeros"):
        return False
    return not isinstance(layer.padding, str) or layer.padding == "valid"


def _affine_forward(
    weight: Tensor, mean: Tensor, variance: Tensor, fraction: Tensor | None, pairs: Tensor | None
) -> tuple[Tensor, ...]:
    """(M, V, and what the backward keeps) of an affine map without bias. weight: (C_out, B, K)."""
    rows, inputs, kernel = weight.shape
    groups = mean.shape[0] // inputs
    if groups == 1 and kernel == 1:  # 1×1 conv, Linear: matrix-vector products (bmm of vectors is slow)
        matrix = weight.squeeze(2)
        square_sums = matrix * matrix if fraction is None else (matrix * matrix) * fraction
        taps = (matrix @ mean).unsqueeze(1)
        out_variance = square_sums @ variance
        mean_rows, variance_rows = mean.unsqueeze(0), variance.unsqueeze(0)  # broadcast as (1, B)
        if fraction is None:
            return taps.squeeze(1), out_variance, mean_rows, variance_rows, taps, square_sums
        assert pairs is not None
        out_mean = taps.squeeze(1) * fraction
        mixed = taps * pairs
        spread = (mixed * taps).squeeze(1) - out_mean * out_mean
        return (
            out_mean,
            out_variance + spread.clamp_min(0.0),
            mean_rows,
            variance_rows,
            taps,
            square_sums,
            mixed,
            spread,
        )
    mean_rows = mean.reshape(groups, 1, inputs).expand(groups, rows // groups, inputs).reshape(rows, inputs)
    variance_rows = variance.reshape(groups, 1, inputs).expand(groups, rows // groups, inputs).reshape(rows, inputs)
    taps = torch.bmm(mean_rows.unsqueeze(1), weight).squeeze(1)  # T (C_out, K)
    squares = weight * weight
    square_sums = squares.sum(-1) if fraction is None else squares @ fraction  # S (C_out, B)
    del squares
    out_variance = (square_sums * variance_rows).sum(-1)
    if fraction is None:
        return taps.sum(-1), out_variance, mean_rows, variance_rows, taps, square_sums
    assert pairs is not None
    out_mean = taps @ fraction
    mixed = taps @ pairs  # T H
    spread = (mixed * taps).sum(-1) - out_mean * out_mean
    return out_mean, out_variance + spread.clamp_min(0.0), mean_rows, variance_rows, taps, square_sums, mixed, spread


def _differentiated(
    forward: Any, inputs: tuple[Tensor, ...], extra: tuple[Any, ...], grads: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """create_graph=True: the VJP of ``forward`` recomputed with autograd, so that it differentiates again."""
    with torch.enable_grad():
        outputs = forward(*inputs, *extra)[: len(grads)]
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        found = torch.autograd.grad(
            [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs], create_graph=True,
            allow_unused=True,
        )  # fmt: skip
    result: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, found):
        result[i] = g
    return tuple(result)


class _AffineMoments(torch.autograd.Function):
    """(M, V) of an affine map without bias; see the module docstring. W: (C_out, B, K)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: Tensor, mean: Tensor, variance: Tensor, fraction: Tensor | None, pairs: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        out_mean, out_variance, *kept = _affine_forward(weight, mean, variance, fraction, pairs)
        mean_rows, variance_rows, taps, square_sums, *border = kept
        mixed, spread = border if border else (None, None)
        ctx.save_for_backward(
            weight, mean, variance, fraction, pairs, mean_rows, variance_rows, taps, square_sums, out_mean, mixed,
            spread,
        )  # fmt: skip
        return out_mean, out_variance

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, mean, variance, fraction, pairs, mean_rows, variance_rows, _, square_sums, out_mean, mixed, spread = (
            ctx.saved_tensors
        )
        if torch.is_grad_enabled():
            return (
                *_differentiated(
                    _affine_forward, (weight, mean, variance), (fraction, pairs), (grad_mean, grad_variance)
                ),
                None,
                None,
            )
        rows, inputs, kernel = weight.shape
        groups = mean.shape[0] // inputs
        if grad_mean is None:
            grad_mean = out_mean.new_zeros(rows)
        if grad_variance is None:
            grad_variance = out_mean.new_zeros(rows)
        if fraction is None:
            grad_taps = grad_mean.unsqueeze(1).expand(rows, kernel)
        else:
            grad_spread = torch.where(spread >= 0, grad_variance, 0.0)
            grad_taps = (grad_mean - 2.0 * grad_spread * out_mean).unsqueeze(1) * fraction + 2.0 * (
                grad_spread.unsqueeze(1) * mixed
            )
        if groups == 1 and kernel == 1:
            matrix = weight.squeeze(2)
            grad_input_mean = matrix.t() @ grad_taps.squeeze(1)
            grad_input_variance = square_sums.t() @ grad_variance
            grad_matrix = matrix * (2.0 * grad_variance.unsqueeze(1) * variance_rows)
            if fraction is not None:
                grad_matrix.mul_(fraction)
            grad_matrix.addr_(grad_taps.squeeze(1), mean)
            return grad_matrix.unsqueeze(2), grad_input_mean, grad_input_variance, None, None
        grad_mean_rows = torch.bmm(weight, grad_taps.unsqueeze(2)).squeeze(2)  # Σ_t gT W  (C_out, B)
        grad_input_mean = grad_mean_rows.reshape(groups, -1, inputs).sum(1).reshape(-1)
        grad_input_variance = (grad_variance.unsqueeze(1) * square_sums).reshape(groups, -1, inputs).sum(1).reshape(-1)
        grad_weight = weight * (2.0 * grad_variance.unsqueeze(1) * variance_rows).unsqueeze(2)  # one W-sized buffer
        if fraction is not None:
            grad_weight.mul_(fraction)
        grad_weight.addcmul_(grad_taps.unsqueeze(1), mean_rows.unsqueeze(2))
        return grad_weight, grad_input_mean, grad_input_variance, None, None


def affine_moments(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    variance: Tensor,
    coverage: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """Moments of a conv/linear output pooled over positions, fused (module docstring).

    weight: (C_out, C_in/g, *k) (a Linear's (C_out, C_in) as k = ()); bias: (C_out,) or
    None; mean, variance: (C_in,); coverage: (f (K,), H (K, K)) or None where every tap
    reads an input at every position. Returns (C_out,), (C_out,), as
    :func:`bkn_export.moments.conv_moments` / :func:`~bkn_export.moments.linear_moments`.
    """
    dtype = mean.dtype
    w = weight.to(dtype)
    w = w.reshape(w.shape[0], w.shape[1], -1)
    fraction, pairs = (None, None) if coverage is None else (coverage[0].to(dtype), coverage[1].to(dtype))
    out_mean, out_variance = _AffineMoments.apply(w, mean, variance, fraction, pairs)
    if bias is not None:
        out_mean = out_mean + bias.to(dtype)
    return out_mean, out_variance


def _conv_step(step: Affine, layer: nn.Module, mean: Tensor, variance: Tensor, spatial: Spatial) -> Moments:
    assert isinstance(layer, nn.modules.conv._ConvNd)
    rank = len(layer.kernel_size)
    padding = step.input_padding if step.input_padding is not None else ((0, 0),) * rank
    if len(spatial) != rank:  # the reference names the mismatch
        return step.predict(mean, variance, spatial, {step.module: layer})
    coverage = _coverage(layer, tuple(spatial), padding, mean.dtype)
    out_spatial = tuple(
        moments._conv_output_length(layer, d, spatial[d] + padding[d][0] + padding[d][1]) for d in range(rank)
    )
    out_mean, out_variance = affine_moments(layer.weight, layer.bias, mean, variance, coverage)
    return out_mean, out_variance, out_spatial


# --------------------------------------------------------------------------- ReLU


class _ReluMoments(torch.autograd.Function):
    """(E, Var) of ReLU(X), X ~ N(μ, v): the reference's forward, closed-form backward."""

    @staticmethod
    def forward(ctx: Any, mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out_mean, out_variance = moments._relu_moments(mean, variance)
        ctx.save_for_backward(mean, variance, out_mean)
        return out_mean, out_variance

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        mean, variance, out_mean = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiated(moments._relu_moments, (mean, variance), (), (grad_mean, grad_variance))  # type: ignore[return-value]
        floor = moments._VARIANCE_FLOOR
        std = variance.clamp_min(floor).sqrt()
        a = (mean / std).clamp(-moments._Z_LIMIT, moments._Z_LIMIT)
        below, above, pdf = moments._cdf(a), moments._cdf(-a), moments._pdf(a)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_variance = torch.zeros_like(mean) if grad_variance is None else grad_variance
        grad_input_mean = grad_mean * below + grad_variance * 2.0 * out_mean * above
        grad_std = grad_mean * pdf + grad_variance * 2.0 * (std * below - out_mean * pdf)
        grad_input_variance = torch.where(variance >= floor, grad_std / (2.0 * std), 0.0)
        return grad_input_mean, grad_input_variance


class _PiecewiseMoments(torch.autograd.Function):
    """(E, Var) of f(X) for a continuous piecewise-quadratic f (reference forward, Stein backward).

    With X = μ + σZ and f continuous (so f and f² are absolutely continuous),
    ∂E[g(X)]/∂μ = E[g'(X)] and ∂E[g(X)]/∂σ = E[g'(X) Z]; for g = f and g = f², on each
    piece f = c0 + c1 x + c2 x², f' = e0 + e1 Z (e0 = c1 + 2 c2 μ, e1 = 2 c2 σ) and
    f = d0 + d1 Z + d2 Z², so every expectation is a sum of truncated moments
    I_k = E[Z^k 1{piece}], k ≤ 4 (the recursion of the reference). Var = E[f²] − E².
    """

    @staticmethod
    def forward(ctx: Any, mean: Tensor, variance: Tensor, pieces: Any) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        out_mean, out_variance = moments._piecewise_quadratic_moments(pieces, mean, variance)
        ctx.save_for_backward(mean, variance, out_mean)
        ctx.pieces = pieces
        return out_mean, out_variance

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mean, variance, out_mean = ctx.saved_tensors
        pieces = ctx.pieces
        if torch.is_grad_enabled():
            return (
                *_differentiated(
                    lambda m, v: moments._piecewise_quadratic_moments(pieces, m, v),
                    (mean, variance),
                    (),
                    (grad_mean, grad_variance),
                ),
                None,
            )
        floor, limit = moments._VARIANCE_FLOOR, moments._Z_LIMIT
        dtype, device = mean.dtype, mean.device
        std = variance.clamp_min(floor).sqrt()
        shape = (-1,) + (1,) * mean.dim()

        def table(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device).reshape(shape)

        lo = ((table([-math.inf if p.lo is None else p.lo for p in pieces]) - mean) / std).clamp(-limit, limit)
        hi = ((table([math.inf if p.hi is None else p.hi for p in pieces]) - mean) / std).clamp(-limit, limit)
        c0, c1, c2 = (table([float(getattr(p, c)) for p in pieces]) for c in ("c0", "c1", "c2"))
        sign = torch.where(lo > 0, 1.0, -1.0).to(dtype)
        root_half = math.sqrt(0.5)
        truncated = [
            0.5 * sign * (torch.special.erfc(sign * lo * root_half) - torch.special.erfc(sign * hi * root_half))
        ]
        pdf_lo, pdf_hi = moments._pdf(lo), moments._pdf(hi)
        truncated.append(pdf_lo - pdf_hi)
        edge_lo, edge_hi = pdf_lo, pdf_hi
        for k in range(2, 5):
            edge_lo, edge_hi = edge_lo * lo, edge_hi * hi
            truncated.append((k - 1) * truncated[k - 2] + edge_lo - edge_hi)
        i0, i1, i2, i3, i4 = truncated
        e0, e1 = c1 + 2.0 * c2 * mean, 2.0 * c2 * std
        d0, d1, d2 = c0 + c1 * mean + c2 * mean * mean, e0 * std, c2 * std * std
        a0, a1, a2, a3 = d0 * e0, d0 * e1 + d1 * e0, d1 * e1 + d2 * e0, d2 * e1  # f f' in powers of Z
        slope_mean = (e0 * i0 + e1 * i1).sum(0)  # E[f']
        slope_std = (e0 * i1 + e1 * i2).sum(0)  # E[f' Z]
        square_mean = 2.0 * (a0 * i0 + a1 * i1 + a2 * i2 + a3 * i3).sum(0)  # ∂E[f²]/∂μ
        square_std = 2.0 * (a0 * i1 + a1 * i2 + a2 * i3 + a3 * i4).sum(0)  # ∂E[f²]/∂σ
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_variance = torch.zeros_like(mean) if grad_variance is None else grad_variance
        grad_input_mean = grad_mean * slope_mean + grad_variance * (square_mean - 2.0 * out_mean * slope_mean)
        grad_std = grad_mean * slope_std + grad_variance * (square_std - 2.0 * out_mean * slope_std)
        grad_input_variance = torch.where(variance >= floor, grad_std / (2.0 * std), 0.0)
        return grad_input_mean, grad_input_variance, None


#: Continuous piecewise-quadratic kinds with number parameters (prelu's slope is a tensor: reference).
_PIECEWISE_KINDS = frozenset({"relu6", "leaky_relu", "hardtanh", "hardsigmoid", "hardswish"})


def piecewise_moments(kind: str, mean: Tensor, variance: Tensor, **params: Any) -> tuple[Tensor, Tensor] | None:
    """:func:`bkn_export.moments.elementwise_moments` for a continuous piecewise kind with a fused
    backward, or None for another kind (or a hardtanh with min_val > max_val, not continuous)."""
    name, resolved, _ = moments._resolve_parameters(kind, params)
    if name not in _PIECEWISE_KINDS:
        return None
    if name == "hardtanh" and float(resolved["min_val"]) > float(resolved["max_val"]):
        return None
    pieces = moments._pieces(name, resolved, mean)
    return _PiecewiseMoments.apply(mean, variance, pieces)  # type: ignore[no-any-return]


def relu_moments(mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bkn_export.moments.elementwise_moments` ``("relu", ...)`` with a fused backward."""
    return _ReluMoments.apply(mean, variance)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- dispatch


def _fused_step(
    step: Step, mean: Tensor, variance: Tensor, spatial: Spatial, modules: Mapping[str, nn.Module]
) -> Moments | None:
    if isinstance(step, Elementwise) and step.kind == "relu":
        out_mean, out_variance = relu_moments(mean, variance)
        return out_mean, out_variance, tuple(spatial)
    if isinstance(step, Elementwise) and step.module is None:
        fused = piecewise_moments(step.kind, mean, variance, **dict(step.params))
        return None if fused is None else (*fused, tuple(spatial))
    if isinstance(step, Gate):  # the branch (squeeze-and-excitation) through the fused forms, then Gate's product
        gate_mean, gate_variance, _ = predict_steps(step.branch, mean, variance, spatial, modules)
        out_mean = mean * gate_mean
        second = (variance + mean * mean) * (gate_variance + gate_mean * gate_mean)
        return out_mean, (second - out_mean * out_mean).clamp_min(0.0), tuple(spatial)
    if isinstance(step, Affine):
        layer = modules.get(step.module)
        if layer is None:  # the reference names the missing module
            return None
        if step.kind == "linear" and isinstance(layer, nn.Linear):
            out_mean, out_variance = affine_moments(layer.weight, layer.bias, mean, variance, None)
            return out_mean, out_variance, tuple(spatial)
        if step.kind == "conv" and conv_covered(layer, step.input_padding, step.input_padding_mode):
            return _conv_step(step, layer, mean, variance, spatial)
    return None


def predict_steps(
    steps: tuple[Step, ...], mean: Tensor, variance: Tensor, spatial: Spatial, modules: Mapping[str, nn.Module]
) -> Moments:
    """:func:`bkn_export.chain.steps.predict_steps`, with the fused forms where they apply (module docstring)."""
    fused = uses_fused(mean)
    for step in linear_runs(steps, modules):  # runs of linear steps that need it: one exact LinearRun (PRIOR)
        result = _fused_step(step, mean, variance, spatial, modules) if fused else None
        if result is None:
            result = step.predict(mean, variance, spatial, modules)
        mean, variance, spatial = result
    return mean, variance, spatial
