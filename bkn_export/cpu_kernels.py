"""CPU fast path of the custom ops ``bkn::batch_kalman_norm`` and its backward.

Same math as :func:`bkn_export.functional.batch_kalman_norm` and
:func:`~bkn_export.functional.batch_kalman_norm_backward` (tested against them), with
fewer passes over the (N, C, *) tensors. It reuses ATen's vectorized per-channel
BatchNorm kernels where that is mathematically exact:

* The normalization y = γ (x - μ_{k|k}) / sqrt(Σ_{k|k} + ε) + β is eval-mode
  BatchNorm with the posterior in place of the running statistics: one fused pass.
* The backward of eval-mode BatchNorm with the same posterior gives Σ g and Σ g x̂ in one
  reduction pass. ∂L/∂x = g γ / s + (the batch statistics' share, per-channel affine in x) is
  then one pass of the C kernel ``kalman_input_gradient`` (centred on x̄, in x's dtype; one torch
  thread or small tensors, :func:`_one_pass_input_gradient`), else ATen's g γ / s pass with the
  affine share added in place (two more passes).
* Batch statistics: in untraced eager execution the C kernel ``kalman_batch_statistics`` (two
  passes per channel in double, rounded once, no temporary the size of x); else ATen
  (:func:`batch_statistics`). A traced step (torch.compile, export, make_fx) therefore rounds
  its statistics as the ATen form does, which may differ from the eager step's by an ulp.
* The backward needs the forward's batch statistics and update terms
  (:class:`ForwardState`): the backward op recomputes them (:func:`forward_state`), the
  eager path of :mod:`bkn_export.ops` keeps them from its forward; both then run
  :func:`backward_from_state`, so their results are bit for bit the same.
* The per-channel arithmetic (the Kalman update forward; the posterior's gradient, the
  update's gradients and the slope and offset of ∂L/∂x backward) is one call each to the C
  kernels of :mod:`bkn_export.native` (``csrc/kalman.c``, in double) in untraced eager
  execution where they take the tensors, instead of ~7 and ~20 operators on (C,) tensors;
  else (no library, :func:`bkn_export.native.disabled`, tracing, other strides) the same
  formulas as PyTorch operators (:func:`functional.kalman_update_terms`,
  :func:`functional.update_gradients`). The fallback rule, where it is on, stays PyTorch.

The fast path covers float32 and float64 inputs whose prior, gain and affine
parameters have the same dtype (what the modules pass): :func:`covers` says so, and
:mod:`bkn_export.ops` runs the functional reference for anything else (every error
case included, so that messages and numerics stay the same). This module registers
nothing; ``ops`` makes it the CPU implementation of both ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import Tensor

from bkn_export import functional as Fk
from bkn_export import native
from bkn_export.functional import KalmanNormInputs, KalmanStep

__all__ = [
    "NOT_KEPT",
    "ForwardState",
    "aten_input_gradient",
    "backward_from_state",
    "batch_kalman_norm",
    "batch_kalman_norm_backward",
    "batch_statistics",
    "covers",
    "fast_path_applies",
    "forward_state",
    "forward_with_state",
    "op_outruns_batchnorm",
]

_FAST_DTYPES = (torch.float32, torch.float64)
_aten = torch.ops.aten
# Per-channel value count (N * prod(*)) up to which ATen's statistics kernel is the faster
# one for contiguous float32 inputs (measured with 1 thread: about equal at 98, 2-10x faster
# below; at (2, 64, 112, 112) it is 5x slower)...
_SMALL_COUNT = 100
# ...and total size up to which it is faster whatever the count: the other path costs a fixed
# ~16 µs in four ops (torch 2.13, 1 thread: ATen 3.9 / 10.5 / 10.8 µs against 17 / 19 / 18 µs
# at (2, 16, 8, 8), (2, 64, 8, 8), (2, 16, 16, 16); 38 against 24 µs at (2, 64, 16, 16)).
_SMALL_NUMEL = 16384
#: The most elements for which ∂L/∂x's one-pass C kernel runs under several torch threads: ATen's grain size
#: (``at::internal::GRAIN_SIZE``), below which its own passes use one thread too. Measured with 1 thread (torch
#: 2.13), the kernel against ATen's three passes: 154 / 309 µs at (2, 144, 56, 56), 2157 / 6802 at (16, 144, 56, 56).
_ONE_PASS_SHARED_LIMIT = 32768


def fast_path_applies(x: Tensor, *per_channel: Tensor | None) -> bool:
    """True when ``x: (N, C, *)`` is a non-empty float32/float64 CPU tensor and every
    given (C,) tensor (None allowed) has its dtype and device."""
    dtype = x.dtype
    if dtype not in _FAST_DTYPES or x.dim() < 2 or x.numel() == 0 or x.device.type != "cpu":
        return False
    for t in per_channel:  # a loop, not all(<genexpr>): this runs twice per training step
        if t is not None and (t.dtype != dtype or t.dim() != 1 or t.device.type != "cpu"):
            return False
    return True


def batch_statistics(x: Tensor) -> Fk.BatchStatistics:
    """Mean and biased variance over (N, *) of a float32/float64 ``x: (N, C, *)``.

    In untraced eager execution, for a contiguous x (one torch thread, or at most
    :data:`_ONE_PASS_SHARED_LIMIT` elements), the C kernel ``kalman_batch_statistics``: per channel
    Σ x, then Σ (x - x̄) and Σ (x - x̄)² in double, S = (Σ (x - x̄)² - (Σ (x - x̄))² / n) / n, each
    rounded once to x's dtype (2.6-3.8x faster than the ATen form below at micro-batch shapes on AVX2, and
    exact to half an ulp). Otherwise ATen:
    channels-last layouts, float64 inputs and float32 inputs with at most
    ``_SMALL_COUNT`` values per channel or ``_SMALL_NUMEL`` values in all use ATen's
    BatchNorm statistics kernel (two passes, centred; fast for them: at (2, 1024, 2, 2)
    about 10x the path below). For
    other contiguous float32 (N, C, *) that kernel is slow on CPU, so: x̄ by a sum, c = x - x̄ by
    eval-mode BatchNorm (one pass), then Σ c and Σ c² from the weight/bias gradients
    of eval-mode BatchNorm's backward with ``grad_output = input = c``. Centering first
    keeps float32 precision for inputs whose mean is large against their spread;
    n S = Σ c² - (Σ c)² / n removes the rounding of x̄.
    """
    count = x.numel() // x.shape[1]
    if _pass_kernels_take(x):
        mean, variance = x.new_empty(x.shape[1]), x.new_empty(x.shape[1])
        parameters = native.parameters(x.shape[1], _plane_size(x))
        native.call("kalman_batch_statistics", x, parameters, mean, variance)
        return Fk.BatchStatistics(mean, variance, count)
    dims = Fk.reduction_dims(x)
    if not x.is_contiguous() or x.dtype == torch.float64 or count <= _SMALL_COUNT or x.numel() <= _SMALL_NUMEL:
        mean, variance = torch.batch_norm_update_stats(x, None, None, 0.0)
        return Fk.BatchStatistics(mean, variance, count)
    mean = x.mean(dim=dims)
    zeros, ones = torch.zeros_like(mean), torch.ones_like(mean)
    centered = torch.batch_norm(x, None, None, mean, ones, False, 0.0, 0.0, False)
    _, sum_squares, sum_centered = _aten.native_batch_norm_backward(
        centered, centered, None, zeros, ones, None, None, False, 0.0, [False, True, True]
    )
    variance = torch.addcmul(sum_squares, sum_centered, sum_centered, value=-1.0 / count).div_(count).clamp_min_(0.0)
    return Fk.BatchStatistics(mean, variance, count)


def covers(inputs: KalmanNormInputs, grads: KalmanStep | None = None) -> bool:
    """Whether the fast path takes these inputs (and, for the backward, these output gradients).

    grads: ∂L/∂(y, posterior_mean, posterior_variance) in the op's output shapes; the
    fast backward needs them in x's dtype.
    """
    x, prior_mean, prior_variance, prior_weight, weight, bias, _, _ = inputs
    if grads is None:
        return fast_path_applies(x, prior_mean, prior_variance, prior_weight, weight, bias)
    return (
        grads.output.dtype == x.dtype
        and grads.output.shape == x.shape
        and fast_path_applies(
            x, prior_mean, prior_variance, prior_weight, weight, grads.posterior_mean, grads.posterior_variance
        )
    )


class ForwardState(NamedTuple):
    """What the CPU forward computed that its backward needs again, all (C,) in x's dtype.

    stats: x̄, S, n; prior_weight: p after the fallback rule; terms: the update's posterior
    μ_{k|k}, Σ_{k|k} and intermediates (:func:`functional.kalman_update_terms`), the latter
    :data:`NOT_KEPT` where the C kernel computed the posterior (the backward recomputes
    them); fired: the fallback rule's 0-dim bool, None when the rule is off
    (``fallback_ratio`` 0).
    """

    stats: Fk.BatchStatistics
    prior_weight: Tensor
    terms: Fk.UpdateTerms
    fired: Tensor | None


#: Stands for the update's intermediates (q, d, p q, d²) in a :class:`ForwardState` whose
#: posterior the C kernel computed: it keeps only the posterior, the backward recomputes the rest.
NOT_KEPT = torch.empty(0)


def _posterior(
    prior_mean: Tensor, prior_variance: Tensor, stats: Fk.BatchStatistics, prior_weight: Tensor
) -> Fk.UpdateTerms:
    """:func:`functional.kalman_update_terms`; by the C kernel ``kalman_update`` where it takes
    the tensors (the posterior only: intermediates :data:`NOT_KEPT`) and rounds as ATen does."""
    per_channel = (prior_mean, prior_variance, stats.mean, stats.variance, prior_weight)
    if native.untraced() and native.takes(*per_channel) and _update_kernel_rounds_as_aten(prior_mean.dtype):
        mean, variance = torch.empty_like(prior_mean), torch.empty_like(prior_mean)
        native.call("kalman_update", *per_channel, mean, variance)
        return Fk.UpdateTerms(mean, variance, NOT_KEPT, NOT_KEPT, NOT_KEPT, NOT_KEPT)
    return Fk.kalman_update_terms(*per_channel)


_ROUNDS_AS_ATEN: dict[torch.dtype, bool] = {}


def _update_kernel_rounds_as_aten(dtype: torch.dtype) -> bool:
    """Whether the ``kalman_update`` kernel gives ATen's posterior bit for bit in ``dtype``
    (checked once, on 67 channels: ATen's vector loop and its tail). The kernel rounds as ATen's
    kernels do with FMA (``csrc/kalman.c``); where this machine's ATen rounds otherwise, the
    PyTorch form runs, so that eager and traced steps (the same operators) agree bit for bit."""
    rounds = _ROUNDS_AS_ATEN.get(dtype)
    if rounds is None:
        with torch.inference_mode(False), torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            mean, batch_mean = torch.randn((2, 67), generator=generator, dtype=dtype)
            variance, batch_variance, prior_weight = torch.rand((3, 67), generator=generator, dtype=dtype)
            prior_weight[::5] = 0.0
            probe = (mean, variance + 0.1, batch_mean, batch_variance + 0.1, prior_weight)
            want = Fk.kalman_update_terms(*probe)
            got = (torch.empty_like(mean), torch.empty_like(mean))
            native.call("kalman_update", *probe, *got)
            rounds = torch.equal(got[0], want.mean) and torch.equal(got[1], want.variance)
        _ROUNDS_AS_ATEN[dtype] = rounds
    return rounds


def forward_state(inputs: KalmanNormInputs) -> ForwardState:
    """Batch statistics and the Kalman update of :func:`covers`-ed inputs (no dtype casts:
    the fast path's per-channel tensors already have x's dtype)."""
    x, prior_mean, prior_variance, prior_weight, _, _, _, fallback_ratio = inputs
    stats = batch_statistics(x)
    prior_weight, fired = Fk.prior_weight_after_fallback(prior_weight, prior_variance, stats.variance, fallback_ratio)
    terms = _posterior(prior_mean, prior_variance, stats, prior_weight)
    return ForwardState(stats, prior_weight, terms, fired)


def forward_with_state(inputs: KalmanNormInputs) -> tuple[KalmanStep, ForwardState]:
    """:func:`batch_kalman_norm` and what :func:`backward_from_state` needs of it."""
    state = forward_state(inputs)
    mean, variance = state.terms.mean, state.terms.variance
    y = torch.batch_norm(inputs.x, inputs.weight, inputs.bias, mean, variance, False, 0.0, inputs.eps, False)
    return KalmanStep(y, mean, variance), state


def batch_kalman_norm(inputs: KalmanNormInputs) -> KalmanStep:
    """CPU forward of ``bkn::batch_kalman_norm`` for inputs that :func:`covers` accepts.

    Returns (y, posterior_mean, posterior_variance) as :func:`functional.batch_kalman_norm` does.
    """
    return forward_with_state(inputs)[0]


def batch_kalman_norm_backward(
    inputs: KalmanNormInputs, grads: KalmanStep
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CPU backward of ``bkn::batch_kalman_norm`` for inputs that :func:`covers` accepts.

    grads: ∂L/∂(y, posterior_mean, posterior_variance). Returns the gradients of (x,
    prior_mean, prior_variance, prior_weight, weight, bias), the weight's as zeros when
    ``weight`` is None (what the backward op returns); the math is
    :func:`functional.batch_kalman_norm_backward`'s. Recomputes the forward's state, so
    the result is bit for bit :func:`backward_from_state` after :func:`forward_with_state`.
    """
    grad_x, grad_mean, grad_variance, grad_p, grad_weight, grad_bias = backward_from_state(
        inputs, forward_state(inputs), *grads
    )
    assert grad_mean is not None and grad_variance is not None and grad_p is not None  # all needed by default
    return grad_x, grad_mean, grad_variance, grad_p, grad_weight, grad_bias


def backward_from_state(
    inputs: KalmanNormInputs,
    state: ForwardState,
    grad_output: Tensor,
    grad_posterior_mean: Tensor | None,
    grad_posterior_variance: Tensor | None,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor, Tensor]:
    """:func:`batch_kalman_norm_backward` given the forward's state (nothing recomputed).

    grad_output: (N, C, *) in x's dtype; grad_posterior_mean, grad_posterior_variance:
    (C,) in x's dtype, or None where the posterior did not reach the loss (zero). needs:
    whether the gradients of (prior_mean, prior_variance, prior_weight) are wanted; those
    that are not come back as None (:func:`functional.update_gradients`).
    """
    x, weight, eps, terms = inputs.x, inputs.weight, inputs.eps, state.terms
    one_pass = _one_pass_input_gradient(x, grad_output, weight, terms.variance)
    # Eval-mode BatchNorm backward with the posterior: Σ g x̂, Σ g in one reduction pass, and g γ / s in a
    # second one unless the C kernel writes all of ∂L/∂x in its own pass below.
    grad_x, sum_g_xhat, sum_g = _aten.native_batch_norm_backward(
        grad_output, x, weight, terms.mean, terms.variance, None, None, False, eps, [not one_pass, True, True]
    )
    sums = (sum_g, sum_g_xhat, grad_posterior_mean, grad_posterior_variance)
    per_channel = _per_channel_backward(inputs, state, *sums, needs)
    if per_channel is None:
        per_channel = _per_channel_backward_pytorch(inputs, state, *sums, needs)
    grad_prior_mean, grad_prior_variance, grad_p, slope, offset = per_channel
    if grad_p is not None and state.fired is not None:  # where the fallback fired, p is the constant 0
        grad_p = torch.where(state.fired, torch.zeros_like(grad_p), grad_p)
    # ∂L/∂x = g γ / s + ∂L/∂x̄ / n + 2 (x - x̄) ∂L/∂S / n: the batch statistics' share is an affine map of x per channel.
    batch_mean = state.stats.mean
    if one_pass and native.takes(batch_mean, slope, offset):
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        parameters = native.parameters(eps, x.shape[1], _plane_size(x))
        per_channel_terms = (weight, terms.variance, batch_mean, slope, offset)
        native.call("kalman_input_gradient", grad_output, x, *per_channel_terms, parameters, grad_x)
    else:
        if one_pass:  # the per-channel terms came from the PyTorch form in another dtype: ATen's pass after all
            grad_x = _aten.native_batch_norm_backward(
                grad_output, x, weight, terms.mean, terms.variance, None, None, False, eps, [True, False, False]
            )[0]
        grad_x.addcmul_(x, Fk._per_channel(slope, x)).add_(Fk._per_channel(offset, x))
    grad_weight = sum_g_xhat if weight is not None else torch.zeros_like(sum_g)
    return grad_x, grad_prior_mean, grad_prior_variance, grad_p, grad_weight, sum_g


_ONE_PASS: ContextVar[bool] = ContextVar("bkn_one_pass_input_gradient", default=True)


@contextmanager
def aten_input_gradient() -> Iterator[None]:
    """Within the block (this thread / task) the backward builds ∂L/∂x with ATen's three passes instead of the
    one-pass C kernel (``benchmarks/bench_layers.py --three-pass`` compares the two)."""
    token = _ONE_PASS.set(False)
    try:
        yield
    finally:
        _ONE_PASS.reset(token)


#: The size from which an unwired layer's train step runs faster through the op (its one-pass C statistics and ∂L/∂x)
#: than as ATen's train-mode BatchNorm, with one torch thread (benchmarks/bench_layers.py, "unwired" against
#: "first in chain", torch 2.13: equal at (2, 256, 14, 14), 100352 elements; 1.7x at (2, 144, 56, 56), 1.9x at
#: (16, 144, 56, 56)).
_OP_OUTRUNS_BATCHNORM = 1 << 17


def op_outruns_batchnorm(x: Tensor) -> bool:
    """Whether the op's CPU fast path is faster on ``x: (N, C, *)`` than ATen's train-mode BatchNorm, so that an
    unwired layer should take it (``nn.BatchKalmanNorm._is_plain_batchnorm``): more than
    :data:`_OP_OUTRUNS_BATCHNORM` elements that the C statistics kernel takes (one torch thread: ATen's
    BatchNorm shares larger inputs among several)."""
    return x.numel() > _OP_OUTRUNS_BATCHNORM and _pass_kernels_take(x)


def _pass_kernels_take(x: Tensor) -> bool:
    """Whether the C kernels of the op's passes over x (``kalman_batch_statistics``, ``kalman_input_gradient``)
    take it: eager, a contiguous non-empty float32/float64 (N, C, *), and one torch thread or at most
    :data:`_ONE_PASS_SHARED_LIMIT` elements (the kernels are single-threaded; ATen's passes share larger inputs
    among the threads)."""
    return (
        native.untraced()  # first: Dynamo cannot trace the ContextVar in native.takes (nor needs to)
        and x.dim() >= 2
        and 0 < x.numel()
        and (x.numel() <= _ONE_PASS_SHARED_LIMIT or torch.get_num_threads() == 1)
        and native.takes(x)
    )


def _plane_size(x: Tensor) -> int:
    """The values per (sample, channel) plane of ``x: (N, C, *)``, as the kernels over x take it."""
    return x.numel() // (x.shape[0] * x.shape[1])


def _one_pass_input_gradient(x: Tensor, grad_output: Tensor, weight: Tensor | None, posterior_variance: Tensor) -> bool:
    """Whether the C kernel ``kalman_input_gradient`` writes ∂L/∂x (one pass over g and x, centred on x̄) instead of
    ATen's eval-mode BatchNorm pass plus two in-place passes: eager, contiguous x and g of one dtype, a
    non-empty (N, C, *) with per-channel tensors the kernels take, and one torch thread or at most
    :data:`_ONE_PASS_SHARED_LIMIT` elements (the kernel is single-threaded)."""
    return (
        _pass_kernels_take(x)  # first: its tracing check comes before the ContextVar below
        and _ONE_PASS.get()
        and native.takes(x, grad_output)
        and native.takes(posterior_variance, weight)
    )


class _PerChannelGradients(NamedTuple):
    """∂L/∂(prior_mean, prior_variance, p) (None where not wanted; ∂L/∂p before the fallback
    rule's zero) and ∂L/∂x's per-channel slope and offset, all (C,)."""

    prior_mean: Tensor | None
    prior_variance: Tensor | None
    prior_weight: Tensor | None
    slope: Tensor
    offset: Tensor


def _per_channel_backward(
    inputs: KalmanNormInputs,
    state: ForwardState,
    sum_g: Tensor,
    sum_g_xhat: Tensor,
    grad_posterior_mean: Tensor | None,
    grad_posterior_variance: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> _PerChannelGradients | None:
    """The C kernel ``kalman_norm_backward``: everything per channel between eval-mode
    BatchNorm's sums and the pass over ∂L/∂x, in one call; None where it does not take the tensors."""
    prior_mean, prior_variance, weight = inputs.prior_mean, inputs.prior_variance, inputs.weight
    stats, posterior_variance = state.stats, state.terms.variance
    grad_mean = None if grad_posterior_mean is None else grad_posterior_mean.contiguous()
    grad_variance = None if grad_posterior_variance is None else grad_posterior_variance.contiguous()
    per_channel = (sum_g, sum_g_xhat, weight, grad_mean, grad_variance, prior_mean, prior_variance)
    statistics = (stats.mean, stats.variance, state.prior_weight, posterior_variance)
    if not (native.untraced() and native.takes(*per_channel, *statistics)):
        return None
    grad_m, grad_v, grad_p = (torch.empty_like(sum_g) if wanted else None for wanted in needs)
    slope, offset = torch.empty_like(sum_g), torch.empty_like(sum_g)
    parameters = native.parameters(stats.count, inputs.eps)  # [n, ε]
    native.call("kalman_norm_backward", *per_channel, *statistics, parameters, grad_m, grad_v, grad_p, slope, offset)
    return _PerChannelGradients(grad_m, grad_v, grad_p, slope, offset)


def _per_channel_backward_pytorch(
    inputs: KalmanNormInputs,
    state: ForwardState,
    sum_g: Tensor,
    sum_g_xhat: Tensor,
    grad_posterior_mean: Tensor | None,
    grad_posterior_variance: Tensor | None,
    needs: tuple[bool, bool, bool],
) -> _PerChannelGradients:
    """:func:`_per_channel_backward` as PyTorch operators (the update's gradients by
    :func:`functional.update_gradients`, ∂L/∂p without the fallback rule's zero)."""
    prior_mean, prior_variance, weight, eps = inputs.prior_mean, inputs.prior_variance, inputs.weight, inputs.eps
    stats, terms = state.stats, state.terms
    if terms.batch_weight is NOT_KEPT:  # the C kernel ran the forward: recompute the intermediates
        kept = Fk.kalman_update_terms(prior_mean, prior_variance, stats.mean, stats.variance, state.prior_weight)
        terms = Fk.UpdateTerms(terms.mean, terms.variance, *kept[2:])
    inv_std = torch.rsqrt(terms.variance + eps)
    gamma_inv_std = inv_std * weight if weight is not None else inv_std
    # ∂L/∂μ = ḡ_μ - γ Σ g / s,  ∂L/∂Σ = ḡ_Σ - γ Σ g x̂ / (2 s²)
    if grad_posterior_mean is None:
        grad_mean = torch.mul(gamma_inv_std, sum_g).neg_()
    else:
        grad_mean = torch.addcmul(grad_posterior_mean, gamma_inv_std, sum_g, value=-1.0)
    if grad_posterior_variance is None:
        grad_variance = torch.mul(gamma_inv_std * inv_std, sum_g_xhat).mul_(-0.5)
    else:
        grad_variance = torch.addcmul(grad_posterior_variance, gamma_inv_std * inv_std, sum_g_xhat, value=-0.5)
    grad_batch_mean, grad_batch_variance, grad_prior_mean, grad_prior_variance, grad_p = Fk.update_gradients(
        grad_mean, grad_variance, prior_variance, stats.variance, state.prior_weight, terms, None, needs
    )
    slope = grad_batch_variance * (2.0 / stats.count)
    offset = torch.addcmul(grad_batch_mean * (1.0 / stats.count), slope, stats.mean, value=-1.0)
    return _PerChannelGradients(grad_prior_mean, grad_prior_variance, grad_p, slope, offset)
