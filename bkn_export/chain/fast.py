"""Fused eager forms of the hot prediction steps (conv / linear, activation moments, the
squeeze-and-excitation product).

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
  per-dim tables, :func:`bkn_export.moments._coverage_tables`, cached per geometry with
  the output size)::

      T[o,t] = Σ_i W[o,i,t] μ_i            S[o,i] = Σ_t W[o,i,t]² f_t
      M_o = Σ_t T[o,t] f_t                 V_o = Σ_i S[o,i] σ²_i + max(T_o H T_oᵀ − M_o², 0)

  (no border: f = 1 and the second term of V is 0 exactly, as in the reference). The
  backward, with gT = ∂M f + 2 ∂V' (T H) (∂V' = ∂V where the clamp passes)::

      ∂W[o,i,t] = gT[o,t] μ_i + 2 ∂V_o σ²_i f_t W[o,i,t]
      ∂μ_i = Σ_{o,t} gT[o,t] W[o,i,t]      ∂σ²_i = Σ_o ∂V_o S[o,i]

  In the PyTorch form W is read three times forward (T, W∘W for S) and three times backward
  (∂μ and ∂W), and S is kept instead of W∘W (the C kernel: once each way, below); a
  depthwise conv's T and ∂μ are elementwise products. A 1×1 conv's or Linear's ∂W is built
  in its own buffer, without a W-sized outer product: on CPU a fresh W-sized temporary costs
  more than a pass over W (1.1 ms against 0.09 ms at 1152 × 320).
* :func:`relu_moments` — with a = μ/σ, E = μ Φ(a) + σ φ(a): ∂E/∂μ = Φ(a), ∂E/∂σ = φ(a),
  ∂Var/∂μ = 2 E Φ(−a), ∂Var/∂σ = 2 σ Φ(a) − 2 E φ(a) (the forward is the reference's,
  op for op, keeping Φ(±a), φ(a) and σ for the backward).
* :func:`piecewise_moments` — relu6, leaky_relu, hardtanh, hardsigmoid, hardswish
  (continuous, piecewise quadratic): the reference's formulas with the breakpoints and
  coefficients as constants cached per (kind, parameters, dtype, device, rank), each
  breakpoint standardized once for the two pieces that share it (the same values as the
  reference, bit for bit); the backward by Stein's identities ∂E[g(X)]/∂μ = E[g'(X)],
  ∂E[g(X)]/∂σ = E[g'(X) Z] for g = f, (f − E)², from the truncated moments the forward
  kept (:class:`_PiecewiseMoments`).
* :func:`gauss_hermite_moments` — silu (swish), sigmoid, tanh: the reference's quadrature
  E = Σ_j w_j f(μ + σ z_j), Var = Σ_j w_j (f − E)², op for op, with the backward
  ∂L/∂x_j = w_j (gE − 2 gV Σ_k w_k c_k + 2 gV c_j) f'(x_j) (c = f − E), with fewer (C, n)
  buffers than autograd's graph (efficientnet-b0: 0.6-3 % of a train step, measured).
* :func:`gate_product` — a :class:`~bkn_export.chain.steps.Gate`'s product of the input's
  and the gate's moments (:class:`_GateProduct`).

On CPU the elementwise Functions (ReLU, piecewise, Gauss–Hermite, the gate product) run
C kernels of :mod:`bkn_export.native` forward and backward where it takes the tensors (the
same formulas per element in double; ``docs/native.md``), on CUDA their Triton twins
(:mod:`bkn_export.per_channel` dispatches by device; ``docs/kernels.md``), else the PyTorch
forms described above. So does :func:`affine_moments` (``csrc/affine.c``): one pass over W forward (T and
Σ_i S σ² together, no W∘W) and one backward (∂W written, ∂μ and ∂σ² accumulated), in double,
with one torch thread or W up to :data:`_AFFINE_NATIVE_WEIGHTS` elements (the kernel is
single-threaded; beyond, ATen's multi-threaded ops), an unpadded 1×1 / Linear up to
:data:`_AFFINE_NATIVE_MATRIX` (measured: the kernel ahead of BLAS up to there); on CUDA its
Triton twin, whatever the size. Under
``create_graph=True`` each backward instead recomputes its forward with autograd and
differentiates that, so second and higher derivatives are the reference's.

:func:`predict_steps` is what the transitions call: these functions for the steps they
cover when nothing traces the call (plain eager, any device), the steps' own
``predict`` (the reference) otherwise and for every other step (prelu, elu / selu / celu,
gelu, mish, softplus, pooling, resampling, ...). An elementwise step takes its fused
form whether it was recorded from a module or a function. A squeeze-and-excitation
:class:`~bkn_export.chain.steps.Gate` runs its branch through :func:`predict_steps` too,
then :func:`gate_product`. :func:`reference_only` switches the fused forms off
(benchmarks and tests compare the two).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import fast_prior, moments, native, per_channel
from bkn_export.chain.steps import Affine, Elementwise, Gate, Moments, Spatial, Step, linear_runs

__all__ = [
    "affine_moments",
    "elementwise_function",
    "elementwise_moments",
    "gate_product",
    "gauss_hermite_moments",
    "piecewise_moments",
    "predict_grouped",
    "predict_steps",
    "reference_only",
    "relu_moments",
    "uses_fused",
]

_ENABLED: ContextVar[bool] = ContextVar("bkn_fused_predictions", default=True)


@contextmanager
def reference_only() -> Iterator[None]:
    """Within the block (this thread / task), :func:`predict_steps` runs every step's reference ``predict``
    and the prior's glue its unfused operators (:func:`bkn_export.fast_prior.unfused`)."""
    token = _ENABLED.set(False)
    try:
        with fast_prior.unfused():
            yield
    finally:
        _ENABLED.reset(token)


def uses_fused(mean: Tensor) -> bool:
    """Whether :func:`predict_steps` takes the fused forms for this call (eager, nothing tracing)."""
    # Compiling first (in native.untraced): dynamo cannot trace the ContextVar (nor needs to).
    return (
        native.untraced()
        and type(mean) is Tensor
        and not torch.overrides.has_torch_function((mean,))
        and _ENABLED.get()
    )


# --------------------------------------------------------------------------- conv / linear


#: ((f, H) or None, output spatial size) per conv geometry, input size and dtype: constants of the layer's shape.
_COVERAGE: dict[tuple[Any, ...], tuple[tuple[Tensor, Tensor] | None, Spatial]] = {}


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _coverage(
    layer: nn.modules.conv._ConvNd, spatial: Spatial, padding: tuple[tuple[int, int], ...], dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """(f (K,), H (K, K)) of ``layer``'s geometry on ``spatial`` after a zero pad ``padding``,
    or None where every tap reads an input at every position (computed once per geometry)."""
    return _conv_geometry(layer, spatial, padding, dtype)[0]


def _conv_geometry(
    layer: nn.modules.conv._ConvNd, spatial: Spatial, padding: tuple[tuple[int, int], ...], dtype: torch.dtype
) -> tuple[tuple[Tensor, Tensor] | None, Spatial]:
    """(:func:`_coverage`, the output's spatial size), computed once per geometry."""
    key: tuple[Any, ...] = (
        layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.weight.device, spatial, padding, dtype,
    )  # fmt: skip
    try:
        found = _COVERAGE.get(key)
    except TypeError:  # modules may hold lists (efficientnet-pytorch's stride)
        key = _hashable(key)
        found = _COVERAGE.get(key)
    if found is not None:
        return found
    coverage = None
    if moments._borders_vary(layer, padding, "zeros"):
        # Constants: never part of a graph, and usable outside the inference mode they may be built in.
        with torch.inference_mode(False), torch.no_grad(), moments.without_autocast(layer.weight.device.type):
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
    out_spatial = tuple(
        moments._conv_output_length(layer, d, spatial[d] + padding[d][0] + padding[d][1]) for d in range(len(spatial))
    )
    if len(_COVERAGE) >= moments._CACHE_SIZE:
        _COVERAGE.clear()
    _COVERAGE[key] = (coverage, out_spatial)
    return coverage, out_spatial


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
        square_sums = matrix * matrix if fraction is None else (matrix * matrix).mul_(fraction)
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
    if inputs == 1:  # depthwise: T[o, t] = W[o, 0, t] μ_o (no batch of 1×1 products)
        taps = weight.squeeze(1) * mean_rows
    else:
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
    """create_graph=True: the VJP of ``forward`` recomputed with autograd, so that it differentiates again.

    The forward runs on aliases of the inputs (``view_as``): ``autograd.grad`` with respect to a
    tensor counts every path from it, so where one input depends on another (a gate's moments on
    the input's, in a squeeze-and-excitation block) it would add that path a second time — the
    outer backward already follows it."""
    with torch.enable_grad():
        inputs = tuple(t.view_as(t) if t.requires_grad else t for t in inputs)
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


#: The most weight elements for which :class:`_AffineMoments` runs its C kernels while torch has several threads (the
#: kernels run on one; with one torch thread they always run). Beyond, ATen's multi-threaded ops. Measured forward +
#: backward on two cores, float32 (µs, kernel against ATen on 2 threads, benchmarks/bench_affine_moments.py
#: --threads 2 --large): 3×3 128 → 128 (147k) 153 / 310, 256 → 256 (590k) 555 / 1307, 512 → 512 (2.4M) 2590 / 5400;
#: 1×1 1280 × 320 (410k) 238 / 248, 2048 × 512 (1M) 517 / 501 (break-even), 1280 × 960 (1.2M) 720-1770 / 1040-1190.
#: ATen's ops scale with threads and the kernels do not: 1×1's break-even, below 3×3's on more cores.
_AFFINE_NATIVE_WEIGHTS = 1 << 20
#: The most weight elements for which an unpadded 1×1 conv or Linear (K = 1, no coverage tables) runs the
#: C kernels: beyond, ATen's BLAS matrix-vector products (larger than measured). Measured on one thread, forward +
#: backward, float32 (µs, kernel against PyTorch): 512 × 128 101 / 116, 960 × 160 132 / 165, 1152 × 192 165 / 209,
#: 1280 × 320 256 / 330, 2048 × 512 (1M) 670-720 / 970-1020, 1280 × 960 (1.2M) 1590-1700 / 3210-4550: the kernel
#: ahead throughout.
_AFFINE_NATIVE_MATRIX = 1 << 21
#: The most taps K for which the C kernels run: they keep O(K) doubles per row on the C stack (about 100 K bytes
#: backward; a 2¹⁹-tap Conv1d overflowed it), so that a thread's smaller stack holds them too. 7×7×7 is 343.
_AFFINE_NATIVE_TAPS = 512


def _native_affine(
    weight: Tensor, mean: Tensor, variance: Tensor, fraction: Tensor | None, pairs: Tensor | None
) -> Tensor | None:
    """The parameters of the kernels ``affine_moments`` / ``affine_moments_backward`` (:mod:`bkn_export.per_channel`:
    C on the CPU, the Triton twins on CUDA) where :class:`_AffineMoments` runs them on these inputs, else None:
    float32/float64, contiguous, one dtype, at most :data:`_AFFINE_NATIVE_TAPS` taps, nothing tracing
    (:func:`bkn_export.native.untraced`), and on the CPU one torch thread or at most
    :data:`_AFFINE_NATIVE_WEIGHTS` weights (the C kernels use one thread)."""
    rows, inputs, kernel = weight.shape
    on_cpu = not per_channel.triton_route(mean)  # the size limits are the C kernels' (one thread, C stack)
    if weight.numel() == 0 or not native.untraced():
        return None
    if on_cpu and not (torch.get_num_threads() == 1 or weight.numel() <= _AFFINE_NATIVE_WEIGHTS):
        return None
    if kernel > _AFFINE_NATIVE_TAPS:
        return None
    if on_cpu and kernel == 1 and fraction is None and weight.numel() > _AFFINE_NATIVE_MATRIX:
        return None
    if mean.dim() != 1 or mean.shape != variance.shape or mean.shape[0] % inputs or weight.dtype != mean.dtype:
        return None
    groups = mean.shape[0] // inputs
    name = "affine_moments"
    if groups == 0 or rows % groups:
        return None
    if not (per_channel.takes(mean, variance, kernel=name) and per_channel.takes(weight, kernel=name)):
        return None
    tables = (fraction, pairs)
    if fraction is not None and (pairs is None or (fraction.numel(), pairs.shape) != (kernel, (kernel, kernel))):
        return None
    if any(t is not None and (t.dtype != mean.dtype or not per_channel.takes(t, kernel=name)) for t in tables):
        return None
    return native.parameters(inputs, kernel, groups)  # the kernels' [B, K, groups]


def _taps_view(weight: Tensor) -> Tensor:
    """W as (C_out, B, K) (a Linear's (C_out, C_in) with K = 1)."""
    return weight.reshape(weight.shape[0], weight.shape[1], math.prod(weight.shape[2:]))


def _affine_forward_of(weight: Tensor, *args: Any) -> tuple[Tensor, ...]:
    """:func:`_affine_forward` of the layer's own weight (C_out, B, *k)."""
    return _affine_forward(_taps_view(weight), *args)


class _AffineMoments(torch.autograd.Function):
    """(M, V) of an affine map without bias; see the module docstring. W: (C_out, B, *k), seen as (C_out, B, K).

    On CPU the C kernels ``affine_moments`` / ``affine_moments_backward`` evaluate both with one pass over W each
    (:func:`_native_affine` says where); the forward then keeps only T (C_out, K), in float64. ∂W comes back in
    W's own shape, not as a view: where the conv's own ∂W arrives second, autograd then adds it in place (onto
    a view it allocates a new W-sized sum: 1.9 ms for 512 × 512 × 3 × 3, measured).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: Tensor, mean: Tensor, variance: Tensor, fraction: Tensor | None, pairs: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        with _without_autocast(mean):
            return _AffineMoments._forward(ctx, weight, mean, variance, fraction, pairs)

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors  # read once: a checkpoint's saved-tensor hooks unpack each tensor only once
        with _without_autocast(saved[1]):
            return _AffineMoments._backward(ctx, saved, grad_mean, grad_variance)

    @staticmethod
    def _forward(
        ctx: Any, weight: Tensor, mean: Tensor, variance: Tensor, fraction: Tensor | None, pairs: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        matrix = _taps_view(weight)
        ctx.parameters = _native_affine(matrix, mean, variance, fraction, pairs)
        if ctx.parameters is not None:
            rows, _, kernel = matrix.shape
            taps = weight.new_empty((rows, kernel), dtype=torch.float64)
            out_mean, out_variance = mean.new_empty(rows), mean.new_empty(rows)
            per_channel.call(
                "affine_moments", matrix, mean, variance, fraction, pairs, ctx.parameters, taps, out_mean,
                out_variance, count=rows,
            )  # fmt: skip
            ctx.save_for_backward(weight, mean, variance, fraction, pairs, taps)
            return out_mean, out_variance
        out_mean, out_variance, *kept = _affine_forward(matrix, mean, variance, fraction, pairs)
        mean_rows, variance_rows, taps, square_sums, *border = kept
        mixed, spread = border if border else (None, None)
        ctx.save_for_backward(
            weight, mean, variance, fraction, pairs, mean_rows, variance_rows, taps, square_sums, out_mean, mixed,
            spread,
        )  # fmt: skip
        return out_mean, out_variance

    @staticmethod
    def _backward(
        ctx: Any, saved: tuple[Any, ...], grad_mean: Tensor | None, grad_variance: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        layer_weight, mean, variance, fraction, pairs = saved[:5]
        if torch.is_grad_enabled():
            return (
                *_differentiated(
                    _affine_forward_of, (layer_weight, mean, variance), (fraction, pairs), (grad_mean, grad_variance)
                ),
                None,
                None,
            )
        weight = _taps_view(layer_weight)
        if ctx.parameters is not None:
            grads = _native_affine_backward(saved, ctx.parameters, grad_mean, grad_variance)
            if grads is not None:
                return (*grads, None, None)
            out_mean, _, *kept = _affine_forward(weight, mean, variance, fraction, pairs)
            border = kept[4:] if len(kept) > 4 else [None, None]
            saved = (*saved[:5], *kept[:4], out_mean, *border)
        mean_rows, variance_rows, _, square_sums, out_mean, mixed, spread = saved[5:]
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
            # One W-sized buffer: a fresh W-sized temporary (the outer product 2 ∂V σ²ᵀ) costs more
            # than the passes over W themselves (1.1 ms against 0.09 ms at 1152 × 320, measured).
            scale = 2.0 * grad_variance if fraction is None else (2.0 * grad_variance) * fraction
            grad_weight = _weight_shaped(layer_weight)
            grad_matrix = grad_weight.view(rows, inputs)
            torch.mul(matrix, scale.unsqueeze(1), out=grad_matrix)
            grad_matrix.mul_(variance_rows)
            grad_matrix.addr_(grad_taps.squeeze(1), mean)
            return grad_weight, grad_input_mean, grad_input_variance, None, None
        if inputs == 1 and rows == groups:  # depthwise: ∂μ_o = Σ_t gT[o, t] W[o, 0, t]
            grad_input_mean = (weight.squeeze(1) * grad_taps).sum(1)
        else:  # Σ_t gT W per row (C_out, B), then over each group's rows (a copy of W permuted for
            # one matrix-vector product is slower in a network: a fresh W-sized buffer, measured)
            grad_mean_rows = torch.bmm(weight, grad_taps.unsqueeze(2)).squeeze(2)
            grad_input_mean = grad_mean_rows.reshape(groups, -1, inputs).sum(1).reshape(-1)
        grad_input_variance = (grad_variance.unsqueeze(1) * square_sums).reshape(groups, -1, inputs).sum(1).reshape(-1)
        grad_weight = _weight_shaped(layer_weight)  # one W-sized buffer
        grad_taps_weight = grad_weight.view(rows, inputs, kernel)
        torch.mul(weight, (2.0 * grad_variance.unsqueeze(1) * variance_rows).unsqueeze(2), out=grad_taps_weight)
        if fraction is not None:
            grad_taps_weight.mul_(fraction)
        grad_taps_weight.addcmul_(grad_taps.unsqueeze(1), mean_rows.unsqueeze(2))
        return grad_weight, grad_input_mean, grad_input_variance, None, None


def _weight_shaped(layer_weight: Tensor) -> Tensor:
    """A new contiguous buffer for ∂W in W's own shape, which the backward fills through a (C_out, B[, K]) view
    and returns itself: autograd adds the conv's own ∂W into it in place, where onto a returned view (a
    reshape) it allocates a new W-sized sum (0.43 ms for a 240 × 960 1×1 conv in MobileNetV3, measured)."""
    return torch.empty_like(layer_weight, memory_format=torch.contiguous_format)


def _without_autocast(like: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off on ``like``'s device where it is on: the moments' matrix products stay in their dtype
    (statistics; under bfloat16 autocast the backward's products also met float32 operands and failed)."""
    return moments.without_autocast(like.device.type)


def _native_affine_backward(
    saved: tuple[Tensor, ...], parameters: Tensor, grad_mean: Tensor | None, grad_variance: Tensor | None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(∂W in W's shape, ∂μ, ∂σ²) by the C kernel ``affine_moments_backward`` from what the native forward kept,
    or None where it cannot take the gradients (another dtype: autograd's own; an expanded zero is made
    contiguous)."""
    layer_weight, mean, variance, fraction, pairs, taps = saved
    weight = _taps_view(layer_weight)
    grads = [None if g is None else g.contiguous() for g in (grad_mean, grad_variance)]
    given = [g for g in grads if g is not None]
    if (
        not given
        or given[0].dtype != weight.dtype
        or given[0].numel() != weight.shape[0]
        or not per_channel.takes(*given, kernel="affine_moments_backward")
    ):
        return None
    grad_weight = _weight_shaped(layer_weight)
    # The C kernel writes its double sums as they are; the Triton twin rounds them into the data's dtype.
    sums_dtype = mean.dtype if per_channel.triton_route(mean) else torch.float64
    grad_input_mean = mean.new_empty(mean.shape, dtype=sums_dtype)
    grad_input_variance = mean.new_empty(mean.shape, dtype=sums_dtype)
    per_channel.call(
        "affine_moments_backward", weight, mean, variance, fraction, pairs, parameters, taps, *grads, grad_weight,
        grad_input_mean, grad_input_variance, count=weight.shape[0],
    )  # fmt: skip
    return grad_weight, grad_input_mean.to(mean.dtype), grad_input_variance.to(mean.dtype)


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
    if weight.shape[1] == 0:  # no inputs (C_in = 0): W μ and (W∘W) σ² are empty sums, as in the reference
        zeros = mean.new_zeros(weight.shape[0])
        return (zeros if bias is None else zeros + bias.to(dtype)), zeros
    w = weight.to(dtype)
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
    coverage, out_spatial = _conv_geometry(layer, tuple(spatial), padding, mean.dtype)
    out_mean, out_variance = affine_moments(layer.weight, layer.bias, mean, variance, coverage)
    return out_mean, out_variance, out_spatial


# --------------------------------------------------------------------------- elementwise


def _constant(values: Any, dtype: torch.dtype, device: torch.device, shape: tuple[int, ...]) -> Tensor:
    """A constant tensor that is never part of a graph and is usable outside the inference mode
    it may be built in (the caches below are filled under whatever mode the first call runs)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(values, dtype=dtype, device=device).reshape(shape)


def _native_elementwise(mean: Tensor, variance: Tensor, kernel: str) -> bool:
    """Whether an elementwise moments Function runs its kernel (:mod:`bkn_export.per_channel`: C on
    CPU, Triton on CUDA) on these inputs: float32/float64, contiguous, one shape, nothing tracing."""
    return mean.shape == variance.shape and native.untraced() and per_channel.takes(mean, variance, kernel=kernel)


def _native_backward(
    kernel: str, saved: tuple[Tensor, ...], grad_mean: Tensor | None, grad_variance: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """First-order backward of an elementwise moments Function by its C kernel ``kernel``
    (arguments: the saved inputs, then ∂L/∂(E, Var) or NULL), or None where the kernel cannot take
    the gradients (another dtype: autograd's own, or an expanded zero: made contiguous here)."""
    mean = saved[0]
    grads = [None if g is None else g.contiguous() for g in (grad_mean, grad_variance)]
    if not per_channel.takes(mean, *grads, kernel=kernel):
        return None
    grad_input_mean, grad_input_variance = torch.empty_like(mean), torch.empty_like(mean)
    per_channel.call(kernel, *saved, *grads, grad_input_mean, grad_input_variance)
    return grad_input_mean, grad_input_variance


class _ReluMoments(torch.autograd.Function):
    """(E, Var) of ReLU(X), X ~ N(μ, v): the reference's forward, closed-form backward; on CPU the
    C kernel ``relu_moments`` for both (the same formulas in double, :mod:`bkn_export.native`)."""

    @staticmethod
    def forward(ctx: Any, mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.native = _native_elementwise(mean, variance, "relu_moments")
        if ctx.native:
            out_mean, out_variance = torch.empty_like(mean), torch.empty_like(mean)
            per_channel.call("relu_moments", mean, variance, out_mean, out_variance)
            ctx.save_for_backward(mean, variance)
            return out_mean, out_variance
        out_mean, out_variance, std, pdf, below, above, spread = moments._relu_terms(mean, variance)
        ctx.save_for_backward(mean, variance, out_mean, std, pdf, below, above, spread)
        return out_mean, out_variance

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiated(moments._relu_moments, saved[:2], (), (grad_mean, grad_variance))  # type: ignore[return-value]
        if ctx.native:
            grads = _native_backward("relu_moments_backward", saved, grad_mean, grad_variance)
            if grads is not None:
                return grads
            terms = moments._relu_terms(*saved)
            saved = (*saved, terms[0], *terms[2:])
        mean, variance, out_mean, std, pdf, below, above, spread = saved
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_variance = (
            torch.zeros_like(mean) if grad_variance is None else torch.where(spread >= 0, grad_variance, 0.0)
        )  # the clamp at 0 passes where Var ≥ 0
        twice = 2.0 * grad_variance
        grad_input_mean = grad_mean * below + twice * out_mean * above
        grad_std = grad_mean * pdf + twice * (std * below - out_mean * pdf)
        grad_input_variance = torch.where(variance >= moments._VARIANCE_FLOOR, grad_std / (2.0 * std), 0.0)
        return grad_input_mean, grad_input_variance


def relu_moments(mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bkn_export.moments.elementwise_moments` ``("relu", ...)`` with a fused backward."""
    return _ReluMoments.apply(mean, variance)  # type: ignore[no-any-return]


class _PiecewiseTable(NamedTuple):
    """A continuous piecewise-quadratic f as constants of shape (·, 1 × rank).

    edges: (P + 1, …) the breakpoints −∞ = b_0 < b_1 < … < b_P = +∞ (piece p is b_p ≤ x < b_{p+1});
    c0, c1: (P, …) f = c0 + c1 x + c2 x² on each piece; c2, twice_c2: (P, …) c2 and 2 c2, or None
    where every c2 is 0 (piecewise linear: truncated moments up to order 2 suffice, not 4).
    native: the kernel ``piecewise_moments``' parameters (float64, on the CPU whatever the data's device:
    the Triton twin reads them on the host), [P, order, b_0 … b_P, c0, c1, c2] (order 4, or 2 where every
    c2 is 0); None beyond its piece count. native_kept: the
    count (order + 1) P of truncated moments it keeps per element for its backward.
    """

    edges: Tensor
    c0: Tensor
    c1: Tensor
    c2: Tensor | None
    twice_c2: Tensor | None
    pieces: tuple[moments._Piece, ...]  # the reference's form (create_graph differentiates it)
    native: Tensor | None
    native_kept: int


_CPU = torch.device("cpu")

#: Their constant tensors per (plan, dtype, device, rank).
_PIECEWISE_TABLES: dict[tuple[Any, ...], _PiecewiseTable] = {}

#: The most pieces the kernel ``piecewise_moments`` takes (BKN_MAX_PIECES in csrc/piecewise.c).
_NATIVE_MAX_PIECES = 8

#: Continuous piecewise-quadratic kinds with number parameters (prelu's slope is a tensor: reference).
_PIECEWISE_KINDS = frozenset({"relu6", "leaky_relu", "hardtanh", "hardsigmoid", "hardswish"})


def _piecewise_plan(name: str, resolved: Mapping[str, Any]) -> Any:
    """(edges (P + 1,), c0, c1, c2 (P,)) as float tuples of a continuous piecewise kind; None where
    its pieces are not a continuous partition (a hardtanh with min_val ≥ max_val)."""
    if name == "hardtanh" and float(resolved["min_val"]) > float(resolved["max_val"]):
        return None
    pieces = moments._pieces(name, resolved, torch.empty(0))
    coefficients = [tuple(float(getattr(p, c)) for p in pieces) for c in ("c0", "c1", "c2")]
    edges = (-math.inf, *(float(p.hi) for p in pieces[:-1] if p.hi is not None), math.inf)
    joined = all(a.hi == b.lo for a, b in itertools.pairwise(pieces))
    increasing = len(edges) == len(pieces) + 1 and all(a < b for a, b in itertools.pairwise(edges))
    if not (joined and increasing and pieces[0].lo is None and pieces[-1].hi is None):
        return None
    return (edges, *coefficients)


def _piecewise_table(plan: Any, dtype: torch.dtype, device: torch.device, rank: int) -> _PiecewiseTable:
    key = (plan, dtype, device, rank)
    table = _PIECEWISE_TABLES.get(key)
    if table is None:
        edges, c0, c1, c2 = plan
        shape = (-1,) + (1,) * rank
        quadratic = any(c != 0.0 for c in c2)
        table = _PiecewiseTable(
            _constant(edges, dtype, device, shape),
            _constant(c0, dtype, device, shape),
            _constant(c1, dtype, device, shape),
            _constant(c2, dtype, device, shape) if quadratic else None,
            _constant([2.0 * c for c in c2], dtype, device, shape) if quadratic else None,
            tuple(
                moments._Piece(None if lo == -math.inf else lo, None if hi == math.inf else hi, *c)
                for lo, hi, *c in zip(edges[:-1], edges[1:], c0, c1, c2, strict=True)
            ),
            _constant([len(c0), 4 if quadratic else 2, *edges, *c0, *c1, *c2], torch.float64, _CPU, (-1,))
            if len(c0) <= _NATIVE_MAX_PIECES
            else None,
            (5 if quadratic else 3) * len(c0),
        )
        if len(_PIECEWISE_TABLES) >= moments._CACHE_SIZE:
            _PIECEWISE_TABLES.clear()
        _PIECEWISE_TABLES[key] = table
    return table


def _piecewise_forward(mean: Tensor, variance: Tensor, table: _PiecewiseTable) -> tuple[Tensor | None, ...]:
    """(E, Var) of f(X) with what the backward reuses: the values of
    :func:`bkn_export.moments._piecewise_quadratic_moments` (same formulas, same rounding), the
    standardized breakpoints computed once for the two pieces that share each.

    With z_b = (b − μ)/σ (clamped to ±30; ±∞ edges give ±30, as there), on piece p:
    I_0 = Φ(z_{p+1}) − Φ(z_p) (in the upper tail where z_p > 0), I_1 = φ(z_p) − φ(z_{p+1}),
    I_k = (k−1) I_{k−2} + z_p^{k−1} φ(z_p) − z_{p+1}^{k−1} φ(z_{p+1}); f = d0 + d1 Z + d2 Z² there.
    Returns (E, Var, σ, d0 − E, d1, d2 or None, ΣVar before the clamp, I_0, …, I_order) (P, …) each.
    """
    std = torch.sqrt(variance.clamp_min(moments._VARIANCE_FLOOR))
    z = ((table.edges - mean) / std).clamp(-moments._Z_LIMIT, moments._Z_LIMIT)  # (P + 1, *mean.shape)
    lo = z[:-1]
    scaled = z * moments._SQRT_HALF
    upper, lower = torch.special.erfc(scaled), torch.special.erfc(-scaled)  # 2Φ(−z), 2Φ(z)
    probability = 0.5 * torch.where(lo > 0, upper[:-1] - upper[1:], lower[1:] - lower[:-1])
    edge = moments._pdf(z)
    truncated = [probability, edge[:-1] - edge[1:]]
    for k in range(2, 5 if table.c2 is not None else 3):
        edge = edge * z
        previous = truncated[k - 2] if k == 2 else (k - 1) * truncated[k - 2]
        truncated.append(previous + edge[:-1] - edge[1:])
    d0 = table.c0 + table.c1 * mean
    d1 = table.c1 * std
    d2 = None
    if table.c2 is not None:
        assert table.twice_c2 is not None
        d0 = d0 + table.c2 * mean * mean
        d1 = d1 + table.twice_c2 * mean * std
        d2 = table.c2 * std * std
        out_mean = (d0 * truncated[0] + d1 * truncated[1] + d2 * truncated[2]).sum(dim=0)
    else:
        out_mean = (d0 * truncated[0] + d1 * truncated[1]).sum(dim=0)
    e0 = d0 - out_mean
    terms = e0 * e0 * truncated[0] + 2.0 * e0 * d1 * truncated[1] + d1 * d1 * truncated[2]
    if d2 is not None:
        terms = terms + 2.0 * e0 * d2 * truncated[2] + 2.0 * d1 * d2 * truncated[3] + d2 * d2 * truncated[4]
    spread = terms.sum(dim=0)
    return out_mean, spread.clamp_min(0.0), std, e0, d1, d2, spread, *truncated


class _PiecewiseMoments(torch.autograd.Function):
    """(E, Var) of f(X) for a continuous piecewise-quadratic f (reference forward, Stein backward).

    With X = μ + σZ and f continuous (so f and f² are absolutely continuous),
    ∂E[g(X)]/∂μ = E[g'(X)] and ∂E[g(X)]/∂σ = E[g'(X) Z]; for g = f and g = (f − E)², on each
    piece f − E = d0' + d1 Z + d2 Z² (d0' = d0 − E) and f' = e0 + e1 Z (e0 = c1 + 2 c2 μ,
    e1 = 2 c2 σ), so with the truncated moments I_k of the forward::

        ∂E/∂μ = Σ e0 I0 + e1 I1              ∂E/∂σ = Σ e0 I1 + e1 I2
        ∂Var/∂μ = 2 Σ_k a_k I_k              ∂Var/∂σ = 2 Σ_k a_k I_{k+1}

    (a0, a1, a2, a3) = (d0' e0, d0' e1 + d1 e0, d1 e1 + d2 e0, d2 e1), the coefficients of
    (f − E) f' in powers of Z (∂Var = ∂E[(f − E)²] as E[f − E] = 0); centred, so that nothing
    cancels where σ ≪ |E|. Var's clamp at 0 passes where the centred sum is ≥ 0.

    On CPU the C kernels ``piecewise_moments`` / ``piecewise_moments_backward`` evaluate both
    (:mod:`bkn_export.native`; the forward keeps the truncated moments, float64, for the backward).
    """

    @staticmethod
    def forward(ctx: Any, mean: Tensor, variance: Tensor, table: _PiecewiseTable) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.table = table
        ctx.native = table.native is not None and _native_elementwise(mean, variance, "piecewise_moments")
        if ctx.native:
            out_mean, out_variance = torch.empty_like(mean), torch.empty_like(mean)
            kept = mean.new_empty((mean.numel(), table.native_kept), dtype=torch.float64)
            per_channel.call("piecewise_moments", mean, variance, table.native, kept, out_mean, out_variance)
            ctx.save_for_backward(mean, variance, kept)
            return out_mean, out_variance
        terms = _piecewise_forward(mean, variance, table)
        ctx.save_for_backward(mean, variance, *terms[2:])
        return terms[0], terms[1]  # type: ignore[return-value]

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        table: _PiecewiseTable = ctx.table
        if torch.is_grad_enabled():
            return (
                *_differentiated(
                    lambda m, v: moments._piecewise_quadratic_moments(table.pieces, m, v),
                    saved[:2],
                    (),
                    (grad_mean, grad_variance),
                ),
                None,
            )
        if ctx.native:
            assert table.native is not None
            mean, variance, kept = saved
            grads = _native_backward(
                "piecewise_moments_backward", (mean, variance, table.native, kept), grad_mean, grad_variance
            )
            if grads is not None:
                return (*grads, None)
            saved = (mean, variance, *_piecewise_forward(mean, variance, table)[2:])
        mean, variance, std, centred, d1, d2, spread, *truncated = saved
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_variance = (
            torch.zeros_like(mean) if grad_variance is None else torch.where(spread >= 0, grad_variance, 0.0)
        )
        twice = 2.0 * grad_variance
        e0 = table.c1 if table.twice_c2 is None else table.c1 + table.twice_c2 * mean
        # Per power of Z: the coefficient of I_k in ∂/∂μ (and of I_{k+1} in ∂/∂σ) of gE E + gV Var.
        shared = grad_mean + twice * centred
        coefficients = [e0 * shared, twice * d1 * e0]
        if d2 is not None:
            assert table.twice_c2 is not None
            e1 = table.twice_c2 * std
            coefficients[1] = coefficients[1] + e1 * shared
            coefficients.append(twice * (d1 * e1 + d2 * e0))
            coefficients.append(twice * d2 * e1)
        along_mean = coefficients[0] * truncated[0]
        along_std = coefficients[0] * truncated[1]
        for k in range(1, len(coefficients)):
            along_mean = along_mean + coefficients[k] * truncated[k]
            along_std = along_std + coefficients[k] * truncated[k + 1]
        grad_std = along_std.sum(dim=0)
        grad_input_variance = torch.where(variance >= moments._VARIANCE_FLOOR, grad_std / (2.0 * std), 0.0)
        return along_mean.sum(dim=0), grad_input_variance, None


def piecewise_moments(kind: str, mean: Tensor, variance: Tensor, **params: Any) -> tuple[Tensor, Tensor] | None:
    """:func:`bkn_export.moments.elementwise_moments` for a continuous piecewise kind with a fused
    backward, or None for another kind (or a hardtanh with min_val > max_val, not continuous)."""
    plan = _plan(kind, tuple(sorted(params.items())))
    if plan is None or plan[0] != "piecewise":
        return None
    table = _piecewise_table(plan[1], mean.dtype, mean.device, mean.dim())
    return _PiecewiseMoments.apply(mean, variance, table)  # type: ignore[no-any-return]


def _silu_derivative(x: Tensor) -> Tensor:
    """silu'(x) = s (1 + x (1 − s)), s = sigmoid(x) (in place on new buffers: no further temporaries)."""
    sigmoid = torch.sigmoid(x)
    return torch.rsub(sigmoid, 1.0).mul_(x).add_(1.0).mul_(sigmoid)


def _sigmoid_derivative(x: Tensor) -> Tensor:
    """sigmoid'(x) = s (1 − s)."""
    sigmoid = torch.sigmoid(x)
    return torch.rsub(sigmoid, 1.0).mul_(sigmoid)


def _tanh_derivative(x: Tensor) -> Tensor:
    """tanh'(x) = 1 − tanh(x)²."""
    tanh = torch.tanh(x)
    return tanh.mul_(tanh).neg_().add_(1.0)


#: The Gauss–Hermite kinds with a fused backward: f (the reference's function) and f'.
_SMOOTH: dict[str, tuple[Any, Any]] = {
    "silu": (F.silu, _silu_derivative),
    "sigmoid": (torch.sigmoid, _sigmoid_derivative),
    "tanh": (torch.tanh, _tanh_derivative),
}


class _GaussHermiteMoments(torch.autograd.Function):
    """(E, Var) of f(X) by an n-node Gauss–Hermite rule (the reference's forward), closed-form backward.

    E = Σ_j w_j f(x_j), Var = Σ_j w_j (f(x_j) − E)², x_j = μ + σ z_j. With c_j = f(x_j) − E and
    S = Σ_j w_j c_j (0 up to rounding, kept so that the gradient is the reference's)::

        ∂L/∂f(x_j) = w_j (gE − 2 gV S + 2 gV c_j)      ∂L/∂x_j = that · f'(x_j)
        ∂L/∂μ = Σ_j ∂L/∂x_j                             ∂L/∂σ = Σ_j ∂L/∂x_j z_j

    On CPU (``parameters``: :func:`_hermite_parameters`) the C kernels ``gauss_hermite_moments`` /
    ``gauss_hermite_moments_backward`` evaluate both (:mod:`bkn_export.native`) where the rule has at most
    :data:`_HERMITE_NATIVE_NODES` nodes in all; the forward keeps the (…, n) sigmoid or tanh per node for
    the backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, mean: Tensor, variance: Tensor, kind: str, points: Tensor, weights: Tensor, parameters: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        ctx.kind, ctx.parameters = kind, parameters
        ctx.native = (
            parameters is not None
            and (mean.numel() * points.numel() <= _HERMITE_NATIVE_NODES or per_channel.triton_route(mean))
            and _native_elementwise(mean, variance, "gauss_hermite_moments")
        )
        if ctx.native:
            out_mean, out_variance = torch.empty_like(mean), torch.empty_like(mean)
            # The kernel's sigmoid / tanh per node, for a backward without exponentials (float64: as it computes).
            kept = mean.new_empty((*mean.shape, points.numel()), dtype=torch.float64)
            per_channel.call("gauss_hermite_moments", mean, variance, parameters, kept, out_mean, out_variance)
            ctx.save_for_backward(mean, variance, points, weights, kept)
            return out_mean, out_variance
        out_mean, out_variance, *kept_terms = moments._gauss_hermite_terms(
            _SMOOTH[kind][0], mean, variance, points, weights
        )
        ctx.save_for_backward(mean, variance, points, weights, *kept_terms)
        return out_mean, out_variance

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mean, variance, points, weights, *kept = ctx.saved_tensors
        function, derivative = _SMOOTH[ctx.kind]
        if torch.is_grad_enabled():
            return (
                *_differentiated(
                    lambda m, v: moments._gauss_hermite_terms(function, m, v, points, weights)[:2],
                    (mean, variance),
                    (),
                    (grad_mean, grad_variance),
                ),
                None,
                None,
                None,
                None,
            )
        if ctx.native:
            grads = _native_backward(
                "gauss_hermite_moments_backward", (mean, variance, ctx.parameters, *kept), grad_mean, grad_variance
            )
            if grads is not None:
                return (*grads, None, None, None, None)
            kept = moments._gauss_hermite_terms(function, mean, variance, points, weights)[2:]
        std, x, centred, spread = kept
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_variance = (
            torch.zeros_like(mean) if grad_variance is None else torch.where(spread >= 0, grad_variance, 0.0)
        )
        twice = 2.0 * grad_variance
        shared = grad_mean - twice * (centred @ weights)
        grad_x = (centred * twice.unsqueeze(-1)).add_(shared.unsqueeze(-1)).mul_(weights).mul_(derivative(x))
        grad_std = grad_x @ points
        grad_input_variance = torch.where(variance >= moments._VARIANCE_FLOOR, grad_std / (2.0 * std), 0.0)
        return grad_x.sum(-1), grad_input_variance, None, None, None, None


#: Gauss–Hermite (points, weights) per (nodes, dtype, device), as constants.
_HERMITE: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
#: The kernel ``gauss_hermite_moments``' parameters per (kind, nodes): float64 [n, kind code, points, weights].
_HERMITE_NATIVE: dict[tuple[str, int], Tensor] = {}
#: The most nodes in all (elements × nodes) for which the kernels run (one thread; 8 nodes at a time): beyond,
#: PyTorch's form, whose large ops split across threads. Forward + backward on one thread (measured, µs,
#: kernel against PyTorch): silu 240 × 64 nodes 87 / 133, 1152 × 64 237 / 262; sigmoid 1152 × 128 345 / 553.
_HERMITE_NATIVE_NODES = 1 << 17
#: csrc/gauss_hermite.c's codes of the kinds.
_HERMITE_KIND_CODES = {"silu": 0, "sigmoid": 1, "tanh": 2}


def _hermite_parameters(name: str, nodes: int) -> Tensor:
    parameters = _HERMITE_NATIVE.get((name, nodes))
    if parameters is None:
        points, weights = moments._hermite_rule(nodes)
        parameters = _constant([nodes, _HERMITE_KIND_CODES[name], *points, *weights], torch.float64, _CPU, (-1,))
        if len(_HERMITE_NATIVE) >= moments._CACHE_SIZE:
            _HERMITE_NATIVE.clear()
        _HERMITE_NATIVE[(name, nodes)] = parameters
    return parameters


def gauss_hermite_moments(kind: str, mean: Tensor, variance: Tensor, **params: Any) -> tuple[Tensor, Tensor] | None:
    """:func:`bkn_export.moments.elementwise_moments` for silu (swish), sigmoid and tanh with a fused
    backward, or None for another kind."""
    plan = _plan(kind, tuple(sorted(params.items())))
    if plan is None or plan[0] != "smooth":
        return None
    return _gauss_hermite(plan, mean, variance)


def _gauss_hermite(plan: tuple[Any, ...], mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
    return _GaussHermiteMoments.apply(mean, variance, *_gauss_hermite_constants(plan, mean))  # type: ignore[no-any-return]


def _gauss_hermite_constants(plan: tuple[Any, ...], mean: Tensor) -> tuple[str, Tensor, Tensor, Tensor]:
    """:class:`_GaussHermiteMoments`' arguments after (mean, variance): the kind, the rule's points and weights
    in ``mean``'s dtype and device, the kernels' parameters."""
    _, name, nodes = plan
    key = (nodes, mean.dtype, mean.device)
    rule = _HERMITE.get(key)
    if rule is None:
        points, weights = moments._hermite_rule(nodes)
        rule = (_constant(points, mean.dtype, mean.device, (-1,)), _constant(weights, mean.dtype, mean.device, (-1,)))
        if len(_HERMITE) >= moments._CACHE_SIZE:
            _HERMITE.clear()
        _HERMITE[key] = rule
    return name, *rule, _hermite_parameters(name, nodes)


#: What the fused forms do per (kind, sorted params): ("relu",), ("piecewise", plan), or None (the
#: reference: another kind, or parameters it rejects and names).
_PLANS: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[Any, ...] | None] = {}


def _plan(kind: str, params: tuple[tuple[str, Any], ...]) -> tuple[Any, ...] | None:
    key = (kind, params)
    if key in _PLANS:
        return _PLANS[key]
    plan: tuple[Any, ...] | None = None
    try:
        name, resolved, nodes = moments._resolve_parameters(kind, dict(params))
    except moments.MomentsError:
        name, resolved, nodes = "", {}, None
    if name == "relu":
        plan = ("relu",)
    elif name in _PIECEWISE_KINDS:
        pieces = _piecewise_plan(name, resolved)
        plan = None if pieces is None else ("piecewise", pieces)
    elif name in _SMOOTH:
        plan = ("smooth", name, nodes if nodes is not None else moments.GAUSS_HERMITE_NODES[name])
    if len(_PLANS) >= moments._CACHE_SIZE:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def elementwise_function(
    kind: str, params: tuple[tuple[str, Any], ...], mean: Tensor
) -> tuple[type[torch.autograd.Function], tuple[Any, ...]] | None:
    """The fused moments Function of an activation and its constant arguments after (mean, variance) (params:
    sorted (name, value) pairs, as :class:`~bkn_export.chain.steps.Elementwise` holds them; the constants are
    built for ``mean``'s dtype, device and rank), or None where none applies."""
    plan = _plan(kind, params)
    if plan is None:
        return None
    if plan[0] == "relu":
        return _ReluMoments, ()
    if plan[0] == "smooth":
        return _GaussHermiteMoments, _gauss_hermite_constants(plan, mean)
    return _PiecewiseMoments, (_piecewise_table(plan[1], mean.dtype, mean.device, mean.dim()),)


def elementwise_moments(
    kind: str, params: tuple[tuple[str, Any], ...], mean: Tensor, variance: Tensor
) -> tuple[Tensor, Tensor] | None:
    """:func:`bkn_export.moments.elementwise_moments` through the fused forms (params: sorted
    (name, value) pairs, as :class:`~bkn_export.chain.steps.Elementwise` holds them), or None
    where none applies."""
    found = elementwise_function(kind, params, mean)
    if found is None:
        return None
    function, constants = found
    return function.apply(mean, variance, *constants)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- squeeze-and-excitation product


def _gate_forward(
    mean: Tensor, variance: Tensor, gate_mean: Tensor, gate_variance: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:class:`~bkn_export.chain.steps.Gate`'s product op for op: (mean, variance, E[x²], E[g²], the
    variance before the clamp at 0)."""
    out_mean = mean * gate_mean
    second_input = variance + mean * mean
    second_gate = gate_variance + gate_mean * gate_mean
    spread = second_input * second_gate - out_mean * out_mean
    return out_mean, spread.clamp_min(0.0), second_input, second_gate, spread


class _GateProduct(torch.autograd.Function):
    """Moments of x · g for independent x ~ (m, v), g ~ (m_g, v_g) of one shape::

        mean = m m_g        variance = (v + m²)(v_g + m_g²) − mean²

    Backward (gV passing where the variance is ≥ 0): ∂m = gE m_g + 2 gV m v_g,
    ∂v = gV (v_g + m_g²), ∂m_g = gE m + 2 gV m_g v, ∂v_g = gV (v + m²). On CPU the C kernels
    ``gate_product`` / ``gate_product_backward`` evaluate both (:mod:`bkn_export.native`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, mean: Tensor, variance: Tensor, gate_mean: Tensor, gate_variance: Tensor
    ) -> tuple[Tensor, Tensor]:
        inputs = (mean, variance, gate_mean, gate_variance)
        ctx.native = native.untraced() and per_channel.takes(*inputs, kernel="gate_product")
        if ctx.native:
            out_mean, out_variance = torch.empty_like(mean), torch.empty_like(mean)
            per_channel.call("gate_product", *inputs, out_mean, out_variance)
            ctx.save_for_backward(*inputs)
            return out_mean, out_variance
        out_mean, out_variance, *kept = _gate_forward(*inputs)
        ctx.save_for_backward(*inputs, *kept)
        return out_mean, out_variance

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        mean, variance, gate_mean, gate_variance, *kept = ctx.saved_tensors
        inputs = (mean, variance, gate_mean, gate_variance)
        if torch.is_grad_enabled():
            return _differentiated(lambda *t: _gate_forward(*t)[:2], inputs, (), (grad_mean, grad_variance))
        if ctx.native:
            grads = [None if g is None else g.contiguous() for g in (grad_mean, grad_variance)]
            if per_channel.takes(mean, *grads, kernel="gate_product_backward"):
                outputs = [torch.empty_like(mean) for _ in range(4)]
                per_channel.call("gate_product_backward", *inputs, *grads, *outputs)
                return tuple(outputs)
            kept = list(_gate_forward(*inputs)[2:])
        second_input, second_gate, spread = kept
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_variance = (
            torch.zeros_like(mean) if grad_variance is None else torch.where(spread >= 0, grad_variance, 0.0)
        )
        twice = 2.0 * grad_variance
        return (
            grad_mean * gate_mean + twice * mean * gate_variance,
            grad_variance * second_gate,
            grad_mean * mean + twice * gate_mean * variance,
            grad_variance * second_input,
        )


def gate_product(mean: Tensor, variance: Tensor, gate_mean: Tensor, gate_variance: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`~bkn_export.chain.steps.Gate`'s product of moments (all four of one shape; else unfused)."""
    if mean.shape == variance.shape == gate_mean.shape == gate_variance.shape:
        return _GateProduct.apply(mean, variance, gate_mean, gate_variance)  # type: ignore[no-any-return]
    out_mean, out_variance, *_ = _gate_forward(mean, variance, gate_mean, gate_variance)
    return out_mean, out_variance


# --------------------------------------------------------------------------- dispatch


def _fused_step(
    step: Step, mean: Tensor, variance: Tensor, spatial: Spatial, modules: Mapping[str, nn.Module]
) -> Moments | None:
    if isinstance(step, Elementwise):  # module or functional form alike; prelu (a tensor slope): reference
        fused = None if step.kind == "prelu" else elementwise_moments(step.kind, step.params, mean, variance)
        return None if fused is None else (*fused, tuple(spatial))
    if isinstance(step, Gate):  # the branch (squeeze-and-excitation) through the fused forms, then Gate's product
        gate_mean, gate_variance, _ = predict_steps(step.branch, mean, variance, spatial, modules)
        out_mean, out_variance = gate_product(mean, variance, gate_mean, gate_variance)
        return out_mean, out_variance, tuple(spatial)
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
    # Runs of linear steps that need it become one exact LinearRun (PRIOR).
    return predict_grouped(linear_runs(steps, modules), mean, variance, spatial, modules)


def predict_grouped(
    steps: tuple[Step, ...], mean: Tensor, variance: Tensor, spatial: Spatial, modules: Mapping[str, nn.Module]
) -> Moments:
    """:func:`predict_steps` on steps already grouped by :func:`~bkn_export.chain.steps.linear_runs` (or a suffix
    of such a tuple)."""
    fused = uses_fused(mean)
    for step in steps:
        result = _fused_step(step, mean, variance, spatial, modules) if fused else None
        if result is None:
            result = step.predict(mean, variance, spatial, modules)
        mean, variance, spatial = result
    return mean, variance, spatial
