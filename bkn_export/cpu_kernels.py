"""CPU fast path of the custom ops ``bkn::batch_kalman_norm`` and its backward.

Same math as :func:`bkn_export.functional.batch_kalman_norm` and
:func:`~bkn_export.functional.batch_kalman_norm_backward` (tested against them), with
fewer passes over the (N, C, *) tensors. It reuses ATen's vectorized per-channel
BatchNorm kernels where that is mathematically exact:

* The normalization y = γ (x - μ_{k|k}) / sqrt(Σ_{k|k} + ε) + β is eval-mode
  BatchNorm with the posterior in place of the running statistics: one fused pass.
* The backward of eval-mode BatchNorm with the same posterior gives, in one
  reduction pass plus one elementwise pass, Σ g, Σ g x̂ and g γ / s; the batch
  statistics' share of ∂L/∂x is per-channel affine in x and added in place.
* Batch statistics: see :func:`batch_statistics` (ATen's BatchNorm statistics kernel is
  fast for channels-last inputs but slow for contiguous NC* ones on CPU).

The fast path covers float32 and float64 inputs whose prior, gain and affine
parameters have the same dtype (what the modules pass): :func:`covers` says so, and
:mod:`bkn_export.ops` runs the functional reference for anything else (every error
case included, so that messages and numerics stay the same). This module registers
nothing; ``ops`` makes it the CPU implementation of both ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bkn_export import functional as Fk
from bkn_export.functional import KalmanNormInputs, KalmanStep

__all__ = ["batch_kalman_norm", "batch_kalman_norm_backward", "batch_statistics", "covers", "fast_path_applies"]

_FAST_DTYPES = (torch.float32, torch.float64)
_aten = torch.ops.aten
# Per-channel value count (N * prod(*)) up to which ATen's statistics kernel is the faster
# one for contiguous float32 inputs (measured with 1 thread: about equal at 98, 2-10x faster
# below; at (2, 64, 112, 112) it is 5x slower).
_SMALL_COUNT = 100


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

    Channels-last layouts, float64 inputs and float32 inputs with at most
    ``_SMALL_COUNT`` values per channel use ATen's BatchNorm statistics kernel (two
    passes, centred; fast for them: at (2, 1024, 2, 2) about 10x the path below). For
    other contiguous float32 (N, C, *) that kernel is slow on CPU, so: x̄ by a sum, c = x - x̄ by
    eval-mode BatchNorm (one pass), then Σ c and Σ c² from the weight/bias gradients
    of eval-mode BatchNorm's backward with ``grad_output = input = c``. Centering first
    keeps float32 precision for inputs whose mean is large against their spread;
    n S = Σ c² - (Σ c)² / n removes the rounding of x̄.
    """
    dims = Fk.reduction_dims(x)
    count = x.numel() // x.shape[1]
    if not x.is_contiguous() or x.dtype == torch.float64 or count <= _SMALL_COUNT:
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


def batch_kalman_norm(inputs: KalmanNormInputs) -> KalmanStep:
    """CPU forward of ``bkn::batch_kalman_norm`` for inputs that :func:`covers` accepts.

    Returns (y, posterior_mean, posterior_variance) as :func:`functional.batch_kalman_norm` does.
    """
    x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio = inputs
    stats = batch_statistics(x)
    mean, variance, _ = Fk.kalman_posterior(stats, prior_mean, prior_variance, prior_weight, fallback_ratio)
    y = torch.batch_norm(x, weight, bias, mean, variance, False, 0.0, eps, False)
    return KalmanStep(y, mean, variance)


def batch_kalman_norm_backward(
    inputs: KalmanNormInputs, grads: KalmanStep
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CPU backward of ``bkn::batch_kalman_norm`` for inputs that :func:`covers` accepts.

    grads: ∂L/∂(y, posterior_mean, posterior_variance). Returns the gradients of (x,
    prior_mean, prior_variance, prior_weight, weight, bias), the weight's as zeros when
    ``weight`` is None (what the backward op returns); the math is
    :func:`functional.batch_kalman_norm_backward`'s.
    """
    x, prior_mean, prior_variance, prior_weight, weight, _, eps, fallback_ratio = inputs
    grad_output, grad_posterior_mean, grad_posterior_variance = grads
    stats = batch_statistics(x)
    mean, variance, _ = Fk.kalman_posterior(stats, prior_mean, prior_variance, prior_weight, fallback_ratio)
    # Eval-mode BatchNorm backward with the posterior: g γ / s, Σ g x̂, Σ g in two passes.
    grad_x, sum_g_xhat, sum_g = _aten.native_batch_norm_backward(
        grad_output, x, weight, mean, variance, None, None, False, eps, [True, True, True]
    )
    inv_std = torch.rsqrt(variance + eps)
    gamma_inv_std = inv_std * weight if weight is not None else inv_std
    grad_mean = grad_posterior_mean - gamma_inv_std * sum_g
    grad_variance = grad_posterior_variance - 0.5 * gamma_inv_std * inv_std * sum_g_xhat
    statistic_grads = Fk.statistic_gradients(
        grad_mean, grad_variance, stats, prior_mean, prior_variance, prior_weight, fallback_ratio
    )
    # ∂L/∂x += ∂L/∂x̄ / n + 2 (x - x̄) ∂L/∂S / n, an affine map of x per channel.
    slope = 2.0 * statistic_grads.batch_variance / stats.count
    offset = statistic_grads.batch_mean / stats.count - slope * stats.mean
    grad_x.addcmul_(x, Fk._per_channel(slope, x)).add_(Fk._per_channel(offset, x))
    grad_weight = sum_g_xhat if weight is not None else torch.zeros_like(sum_g)
    return (
        grad_x,
        statistic_grads.prior_mean,
        statistic_grads.prior_variance,
        statistic_grads.prior_weight,
        grad_weight,
        sum_g,
    )
