"""Functional reference for Batch Kalman Normalization (BKN).

This module is the single source of truth for the math. Every fast path (the CPU
custom op, the Triton kernels, the ONNX function body, the TensorRT plugin) is
tested against the functions here, and nothing else re-derives the equations.

Notation for layer ``k`` with input ``x_k`` of shape ``(N, C_k, *)``; all
statistics are per channel (diagonal covariances)::

    batch statistics  x̄_k = mean_{N,*} x_k              S_k = biased variance_{N,*} x_k
    prediction        μ_{k|k-1} = T_k(μ_{k-1|k-1})      Σ_{k|k-1} = T_k^var(Σ_{k-1|k-1}) + R_k
    update            μ_{k|k} = p_k μ_{k|k-1} + q_k x̄_k                         (q_k = 1 - p_k)
                      Σ_{k|k} = p_k Σ_{k|k-1} + q_k S_k + p_k q_k (x̄_k - μ_{k|k-1})²
    normalize         y_k = γ_k (x_k - μ_{k|k}) / sqrt(Σ_{k|k} + ε) + β_k
    running stats     r_μ ← (1-α) r_μ + α μ_{k|k}      r_Σ ← (1-α) r_Σ + α n/(n-1) Σ_{k|k}
    inference         y = γ (x - r_μ) / sqrt(r_Σ + ε) + β        (an affine map: foldable)

``p_k`` is the weight on the prior (the Kalman gain's complement). The update is
the moment-matched mixture of the prior N(μ_{k|k-1}, Σ_{k|k-1}) and the batch
N(x̄_k, S_k) with weights (p, q); with ``p = 0`` it is exactly BatchNorm.

Transitions ``T_k`` (how the previous posterior is carried to layer k) live in
:mod:`bkn_export.chain.transitions`; the moment propagation they use (activations,
pooling, resampling, convolutions, linear paths) is :mod:`bkn_export.moments`, and here
only the learned one, :func:`predict_linear`: μ = A μ', Σ = (A∘A) Σ' + R.

Half-precision inputs (float16, bfloat16) accumulate statistics in float32; the
posterior statistics are float32 for them, and ``y`` has the dtype of ``x``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from bkn_export.moments import linear_moments

__all__ = [
    "PRIOR_WEIGHT_LIMIT",
    "BatchStatistics",
    "KalmanNormInputs",
    "KalmanStep",
    "StatisticGradients",
    "UpdateTerms",
    "batch_kalman_norm",
    "batch_kalman_norm_backward",
    "batch_statistics",
    "contiguous_weight",
    "effective_prior_weight",
    "inference_affine",
    "kalman_norm_inference",
    "kalman_posterior",
    "kalman_update",
    "kalman_update_terms",
    "predict_linear",
    "prior_weight_after_fallback",
    "reduction_dims",
    "running_statistics_update",
    "statistic_gradients",
    "statistics_dtype",
    "update_gradients",
    "update_running_statistics_",
]

#: Largest prior weight the learned gain can reach; keeps q = 1 - p away from 0 so
#: the batch always contributes and gradients reach the input statistics.
PRIOR_WEIGHT_LIMIT = 0.999


class BatchStatistics(NamedTuple):
    """Per-channel statistics of one micro-batch.

    mean, variance: (C,) in the statistics dtype (biased variance).
    count: elements per channel, ``n = N * prod(*)``.
    """

    mean: Tensor
    variance: Tensor
    count: int  # type: ignore[assignment]  # shadows tuple.count, which nothing here uses


class KalmanStep(NamedTuple):
    """Result of one BKN training step.

    output: (N, C, *) dtype of ``x``.
    posterior_mean, posterior_variance: (C,) in the statistics dtype.
    """

    output: Tensor
    posterior_mean: Tensor
    posterior_variance: Tensor


class KalmanNormInputs(NamedTuple):
    """The inputs of one BKN training step, in the order of :func:`batch_kalman_norm`'s
    arguments and of the custom op ``bkn::batch_kalman_norm``'s schema.

    x: (N, C, *); prior_mean, prior_variance, prior_weight: (C,); weight (γ), bias (β):
    (C,) or None; eps: ε; fallback_ratio: the authors' fallback threshold (0 = off).
    """

    x: Tensor
    prior_mean: Tensor
    prior_variance: Tensor
    prior_weight: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float
    fallback_ratio: float


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which statistics are accumulated: float32 for half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reduction_dims(x: Tensor) -> list[int]:
    """All dims of ``x: (N, C, *)`` except the channel dim 1."""
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so it broadcasts against ``x: (N, C, *)``."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def batch_statistics(x: Tensor) -> BatchStatistics:
    """Mean and biased variance over (N, *) of ``x: (N, C, *)``.

    Returns (C,) tensors in :func:`statistics_dtype`; count = N * prod(*).
    """
    dims = reduction_dims(x)
    x_acc = x.to(statistics_dtype(x.dtype))
    variance, mean = torch.var_mean(x_acc, dim=dims, correction=0)
    count = x.numel() // max(x.shape[1], 1)
    return BatchStatistics(mean, variance, count)


# --------------------------------------------------------------------------- prediction

_VARIANCE_FLOOR = 1e-12


def predict_linear(
    previous_mean: Tensor, previous_variance: Tensor, matrix: Tensor, process_noise: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Learned transition: μ = A m', Σ = (A∘A) v' + R with A: (C, C_prev); m', v': (C_prev,);
    R: (C,) or None (:func:`bkn_export.moments.linear_moments`, no bias, plus R)."""
    mean, variance = linear_moments(matrix, None, previous_mean, previous_variance)
    if process_noise is not None:
        variance = variance + process_noise.to(variance.dtype)
    return mean, variance


# --------------------------------------------------------------------------- update


def effective_prior_weight(
    prior_weight: Tensor, prior_variance: Tensor, batch_variance: Tensor, fallback_ratio: float
) -> Tensor:
    """The prior weight after the authors' fallback rule.

    When ``fallback_ratio > 0`` and mean(Σ_{k|k-1} / S_k) ≥ fallback_ratio, the prior is
    considered unreliable and the layer uses plain batch statistics (p = 0). The
    comparison is not differentiable; gradients pass to ``prior_weight`` elsewhere.
    """
    return prior_weight_after_fallback(prior_weight, prior_variance, batch_variance, fallback_ratio)[0]


def prior_weight_after_fallback(
    prior_weight: Tensor, prior_variance: Tensor, batch_variance: Tensor, fallback_ratio: float
) -> tuple[Tensor, Tensor | None]:
    """(:func:`effective_prior_weight`, whether the rule fired: a 0-dim bool, None when the rule
    is off) — the backward needs both (∂L/∂p is 0 where it fired)."""
    if fallback_ratio <= 0:
        return prior_weight, None
    fired = _fallback_fired(prior_variance, batch_variance, fallback_ratio)
    return torch.where(fired, torch.zeros_like(prior_weight), prior_weight), fired


def _fallback_fired(prior_variance: Tensor, batch_variance: Tensor, fallback_ratio: float) -> Tensor:
    """0-dim bool: mean(Σ_{k|k-1} / S_k) ≥ fallback_ratio."""
    return (prior_variance / batch_variance.clamp_min(_VARIANCE_FLOOR)).mean() >= fallback_ratio


def kalman_update(
    prior_mean: Tensor,
    prior_variance: Tensor,
    batch_mean: Tensor,
    batch_variance: Tensor,
    prior_weight: Tensor,
) -> tuple[Tensor, Tensor]:
    """Moment-matched blend of prior and batch (all (C,)); returns (μ_{k|k}, Σ_{k|k}).

    μ = p m + q x̄ and Σ = p Σ_pred + q S + p q (x̄ - m)² with q = 1 - p, written with
    ``lerp`` (exact at q = 1, so p = 0 gives the batch statistics bit for bit) and
    few ops (the CPU fast path runs this per step; each op costs microseconds).
    """
    terms = kalman_update_terms(prior_mean, prior_variance, batch_mean, batch_variance, prior_weight)
    return terms.mean, terms.variance


class UpdateTerms(NamedTuple):
    """:func:`kalman_update`'s result and the intermediates its gradient reuses, all (C,).

    mean, variance: μ_{k|k}, Σ_{k|k}; batch_weight: q = 1 - p; innovation: d = x̄ - m;
    weight_product: p q; innovation_squared: d².
    """

    mean: Tensor
    variance: Tensor
    batch_weight: Tensor
    innovation: Tensor
    weight_product: Tensor
    innovation_squared: Tensor


def kalman_update_terms(
    prior_mean: Tensor,
    prior_variance: Tensor,
    batch_mean: Tensor,
    batch_variance: Tensor,
    prior_weight: Tensor,
) -> UpdateTerms:
    """:func:`kalman_update` keeping its intermediates (what :func:`update_gradients` needs again)."""
    batch_weight = 1.0 - prior_weight
    innovation = batch_mean - prior_mean
    mean = torch.lerp(prior_mean, batch_mean, batch_weight)
    blend = torch.lerp(prior_variance, batch_variance, batch_weight)
    weight_product, innovation_squared = prior_weight * batch_weight, innovation * innovation
    variance = torch.addcmul(blend, weight_product, innovation_squared)
    return UpdateTerms(mean, variance, batch_weight, innovation, weight_product, innovation_squared)


def kalman_posterior(
    stats: BatchStatistics,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Prior and batch statistics → posterior; returns (μ_{k|k}, Σ_{k|k}, p) all (C,).

    ``p`` is the prior weight actually used (0 where the fallback fired). The prior is
    cast to the statistics dtype of ``stats``.
    """
    acc = stats.mean.dtype
    prior_mean = prior_mean.to(acc)
    prior_variance = prior_variance.to(acc)
    p = effective_prior_weight(prior_weight.to(acc), prior_variance, stats.variance, fallback_ratio)
    mean, variance = kalman_update(prior_mean, prior_variance, stats.mean, stats.variance, p)
    return mean, variance, p


class StatisticGradients(NamedTuple):
    """Gradients of one BKN step with respect to its per-channel quantities, all (C,).

    batch_mean = ∂L/∂x̄, batch_variance = ∂L/∂S, prior_mean = ∂L/∂μ_{k|k-1},
    prior_variance = ∂L/∂Σ_{k|k-1}, prior_weight = ∂L/∂p (0 where the fallback fired).
    """

    batch_mean: Tensor
    batch_variance: Tensor
    prior_mean: Tensor
    prior_variance: Tensor
    prior_weight: Tensor


def statistic_gradients(
    grad_mean: Tensor,
    grad_variance: Tensor,
    stats: BatchStatistics,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    fallback_ratio: float,
) -> StatisticGradients:
    """Backward of :func:`kalman_posterior` (the update), given ∂L/∂μ_{k|k} and ∂L/∂Σ_{k|k}.

    With d = x̄ - μ_{k|k-1} and q = 1 - p::

        ∂L/∂x̄ = q ∂L/∂μ + 2pq d ∂L/∂Σ           ∂L/∂S = q ∂L/∂Σ
        ∂L/∂μ_{k|k-1} = p ∂L/∂μ - 2pq d ∂L/∂Σ    ∂L/∂Σ_{k|k-1} = p ∂L/∂Σ
        ∂L/∂p = -d ∂L/∂μ + (Σ_{k|k-1} - S + (1 - 2p) d²) ∂L/∂Σ

    Shared by the reference backward and every CPU/GPU fast path.
    """
    acc = stats.mean.dtype
    m = prior_mean.to(acc)
    v_pred = prior_variance.to(acc)
    p, fired = prior_weight_after_fallback(prior_weight.to(acc), v_pred, stats.variance, fallback_ratio)
    terms = kalman_update_terms(m, v_pred, stats.mean, stats.variance, p)
    batch_mean, batch_variance, grad_m, grad_v, grad_p = update_gradients(
        grad_mean, grad_variance, v_pred, stats.variance, p, terms, fired
    )
    assert grad_m is not None and grad_v is not None and grad_p is not None  # all needed by default
    return StatisticGradients(batch_mean, batch_variance, grad_m, grad_v, grad_p)


def update_gradients(
    grad_mean: Tensor,
    grad_variance: Tensor,
    prior_variance: Tensor,
    batch_variance: Tensor,
    prior_weight: Tensor,
    terms: UpdateTerms,
    fired: Tensor | None,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`statistic_gradients` from the update's terms, all (C,) in one dtype.

    prior_weight: p after the fallback rule; terms: :func:`kalman_update_terms` of it;
    fired: the rule's 0-dim bool (None when it is off), where ∂L/∂p = 0. needs: whether
    ∂L/∂(μ_{k|k-1}, Σ_{k|k-1}, p) are wanted; those that are not come back as None (a
    constant prior, e.g. a first-in-chain layer's, saves their ops). Returns ∂L/∂x̄, ∂L/∂S,
    then those three. The CPU fast path passes what its forward kept.
    """
    p, q, innovation = prior_weight, terms.batch_weight, terms.innovation
    pqd = terms.weight_product * innovation  # cross term: 2 p q d ∂L/∂Σ
    batch_mean = torch.addcmul(q * grad_mean, pqd, grad_variance, value=2.0)
    grad_prior_mean = torch.addcmul(p * grad_mean, pqd, grad_variance, value=-2.0) if needs[0] else None
    grad_prior_variance = p * grad_variance if needs[1] else None
    grad_p = None
    if needs[2]:
        # (Σ_pred - S + (1 - 2p) d²) ∂L/∂Σ - d ∂L/∂μ, with 1 - 2p = q - p
        grad_p = torch.addcmul(prior_variance - batch_variance, q - p, terms.innovation_squared) * grad_variance
        grad_p = torch.addcmul(grad_p, innovation, grad_mean, value=-1.0)
        if fired is not None:  # where the fallback fired, p is the constant 0
            grad_p = torch.where(fired, torch.zeros_like(grad_p), grad_p)
    return batch_mean, q * grad_variance, grad_prior_mean, grad_prior_variance, grad_p


def batch_kalman_norm(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float = 0.0,
) -> KalmanStep:
    """One BKN training step after the prediction: batch statistics, update, normalize.

    x: (N, C, *) any float dtype (channels_last allowed); prior_mean, prior_variance,
    prior_weight: (C,) (``prior_weight`` = 0 gives BatchNorm); weight (γ), bias (β):
    (C,) or None. Returns y (dtype of x) and the posterior (C,) in the statistics dtype.
    """
    if x.dim() < 2:
        raise ValueError(f"batch_kalman_norm expects x of shape (N, C, *), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"batch_kalman_norm got an empty batch of shape {tuple(x.shape)}")
    acc = statistics_dtype(x.dtype)
    stats = batch_statistics(x)
    mean, variance, _ = kalman_posterior(stats, prior_mean, prior_variance, prior_weight, fallback_ratio)
    scale = torch.rsqrt(variance + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    y = x.to(acc) * _per_channel(scale, x) + _per_channel(shift, x)
    return KalmanStep(y.to(x.dtype), mean, variance)


def batch_kalman_norm_backward(
    grad_output: Tensor | None,
    grad_posterior_mean: Tensor | None,
    grad_posterior_variance: Tensor | None,
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    eps: float,
    fallback_ratio: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Closed-form gradients of :func:`batch_kalman_norm`.

    Returns grads for (x, prior_mean, prior_variance, prior_weight, weight, bias).
    With x̂ = (x - μ)/s, s = sqrt(Σ + ε), g_x̂ = g γ, d = x̄ - m_pred, q = 1 - p::

        ∂L/∂μ   = -Σ g_x̂ / s + ḡ_μ          ∂L/∂Σ = -Σ g_x̂ x̂ / (2 s²) + ḡ_Σ
        ∂L/∂x̄   = q ∂L/∂μ + 2pq d ∂L/∂Σ      ∂L/∂S = q ∂L/∂Σ
        ∂L/∂m   = p ∂L/∂μ - 2pq d ∂L/∂Σ      ∂L/∂Σ_pred = p ∂L/∂Σ
        ∂L/∂p   = -d ∂L/∂μ + (Σ_pred - S + (1 - 2p) d²) ∂L/∂Σ
        ∂L/∂x_i = g_x̂,i / s + ∂L/∂x̄ / n + 2 (x_i - x̄) ∂L/∂S / n

    This is what the fused kernels implement; tests check it against autograd.
    """
    acc = statistics_dtype(x.dtype)
    dims = reduction_dims(x)
    x_acc = x.to(acc)
    stats = batch_statistics(x)
    mean, variance, _ = kalman_posterior(stats, prior_mean, prior_variance, prior_weight, fallback_ratio)
    inv_std = torch.rsqrt(variance + eps)
    x_hat = (x_acc - _per_channel(mean, x)) * _per_channel(inv_std, x)
    if grad_output is None:
        grad_output = torch.zeros_like(x)
    g = grad_output.to(acc)
    sum_g = g.sum(dim=dims)
    sum_g_xhat = (g * x_hat).sum(dim=dims)
    gamma = weight.to(acc) if weight is not None else torch.ones_like(mean)
    grad_mean = -gamma * sum_g * inv_std
    if grad_posterior_mean is not None:
        grad_mean = grad_mean + grad_posterior_mean.to(acc)
    grad_variance = -0.5 * gamma * sum_g_xhat * inv_std * inv_std
    if grad_posterior_variance is not None:
        grad_variance = grad_variance + grad_posterior_variance.to(acc)
    grads = statistic_gradients(
        grad_mean, grad_variance, stats, prior_mean, prior_variance, prior_weight, fallback_ratio
    )
    n = stats.count
    grad_x = (
        g * _per_channel(gamma * inv_std, x)
        + _per_channel(grads.batch_mean / n, x)
        + (x_acc - _per_channel(stats.mean, x)) * _per_channel(2.0 * grads.batch_variance / n, x)
    )
    grad_weight = sum_g_xhat if weight is not None else None
    return (
        grad_x.to(x.dtype),
        grads.prior_mean.to(prior_mean.dtype),
        grads.prior_variance.to(prior_variance.dtype),
        grads.prior_weight.to(prior_weight.dtype),
        grad_weight,
        sum_g,
    )


def running_statistics_update(
    running_mean: Tensor,
    running_variance: Tensor,
    posterior_mean: Tensor,
    posterior_variance: Tensor,
    momentum: float,
    count: int,
) -> tuple[Tensor, Tensor]:
    """BatchNorm's running-statistics rule applied to the posterior (no gradient).

    r_μ ← (1-α) r_μ + α μ_{k|k};  r_Σ ← (1-α) r_Σ + α · n/(n-1) · Σ_{k|k}.
    For n = 1 the unbiased factor is undefined; the posterior variance is used as is.
    Returns new tensors in the dtype of the running buffers.
    """
    new_mean, new_variance = running_mean.clone(), running_variance.clone()
    update_running_statistics_(new_mean, new_variance, posterior_mean, posterior_variance, momentum, count)
    return new_mean, new_variance


def update_running_statistics_(
    running_mean: Tensor,
    running_variance: Tensor,
    posterior_mean: Tensor,
    posterior_variance: Tensor,
    momentum: float | Tensor,
    count: int,
) -> None:
    """In-place form of :func:`running_statistics_update` (what the modules call).

    momentum: α, a float or a 0-dim tensor of the running buffers' dtype (the modules'
    ``momentum=None`` passes 1 / num_batches_tracked as a tensor: no host read).
    """
    mean, variance = posterior_mean.detach(), posterior_variance.detach()
    if mean.dtype != running_mean.dtype:
        mean = mean.to(running_mean.dtype)
    if isinstance(count, int) and isinstance(momentum, float) and variance.dtype == running_variance.dtype:
        # Eager, float α (the common case): r_Σ ← (1-α) r_Σ + (α n/(n-1)) Σ in place, two ops
        # and no temporary.
        running_mean.lerp_(mean, momentum)
        running_variance.mul_(1.0 - momentum).add_(variance, alpha=momentum * count / max(count - 1, 1))
        return
    # sym_max, not a branch: with a symbolic count (torch.export, dynamic batch) a branch
    # would specialise the graph on n > 1; for n = 1 this gives 1 / 1 (variance as is).
    if isinstance(count, Tensor):  # torch.jit.trace records sizes as tensors
        unbiased = count / torch.clamp(count - 1, min=1)
    elif isinstance(count, int):  # a static size: torch 2.11's dynamo cannot trace torch.sym_max on two ints
        unbiased = count / max(count - 1, 1)
    else:
        unbiased = count / torch.sym_max(count - 1, 1)
    running_mean.lerp_(mean, momentum)
    running_variance.lerp_((variance * unbiased).to(running_variance.dtype), momentum)


def inference_affine(
    running_mean: Tensor, running_variance: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Eval-mode BKN as y = a x + b per channel: a = γ / sqrt(r_Σ + ε), b = β - a r_μ."""
    scale = torch.rsqrt(running_variance + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def kalman_norm_inference(
    x: Tensor,
    running_mean: Tensor,
    running_variance: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval-mode BKN: y = γ (x - r_μ) / sqrt(r_Σ + ε) + β, lowered to ``F.batch_norm``.

    Using ``F.batch_norm`` is deliberate: the ONNX exporter folds it into a preceding
    Conv/Gemm, and CPU/cuDNN have fused kernels for it. γ goes through :func:`contiguous_weight`.
    """
    return F.batch_norm(x, running_mean, running_variance, contiguous_weight(weight), bias, False, 0.0, eps)


def contiguous_weight(weight: Tensor | None) -> Tensor | None:
    """γ (C,), made contiguous (differentiably) where it is a strided view made a Parameter: the C kernels read it
    by position, and ATen's CPU ``native_batch_norm_backward`` ignores its strides for (N, C) inputs (wrong input
    gradients; ``nn.BatchNorm1d`` has the same bug). Every route of a layer's step passes γ through this."""
    return weight.contiguous() if weight is not None and not weight.is_contiguous() else weight
