"""Triton helpers shared by the forward and backward kernels.

Statistics are accumulated in float32 with Chan et al.'s parallel combination of
(count, mean, M2) triples (the pairwise form of Welford's algorithm): every tile
computes its own mean and centred sum of squares M2 = Σ (x - mean_tile)² from values
held in registers (an exact two-pass within the tile), and tiles, programs and
partials merge as::

    n = n_a + n_b     δ = mean_b - mean_a     mean = mean_a + δ n_b / n
    M2 = M2_a + M2_b + δ² n_a n_b / n

All of it runs on shifted data x - K with one K per channel, the channel's first
element (sample 0, row 0), loaded by every program that needs it: the sums then add
numbers of the size of the spread, not of the mean, so even the tile means stay
exact to float32 rounding when |mean| is 10⁵ times the standard deviation; x̄ = K +
mean(x - K) at the end. No step squares a raw mean, so the variance keeps its
precision where E[x²] - E[x]² would lose every digit. The backward carries Σ g and
Σ g (x - mean) along with the moments, re-centred at every merge.
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl
from torch import Tensor

from bkn_export.kernels.prior_moments import assembled_prior, assembly_gradients, load_assembly_inputs

__all__ = [
    "VARIANCE_FLOOR",
    "PriorAssembly",
    "channel_shift",
    "fallback_fired",
    "kalman_posterior",
    "merge_gradient_sums",
    "merge_moments",
    "partial_counts",
    "prior_statistics",
    "store_prior_gradients",
    "tile_moments",
    "tile_offsets",
]


class PriorAssembly(NamedTuple):
    """The prior's last step, for the op's launchers to do in their kernels (:func:`prior_statistics`,
    :func:`store_prior_gradients`) instead of a launch of its own each way::

        Σ_pred = v + softplus(r),  p = L sigmoid(l) [· k]

    raw r, logit l, known k (or None): (C,) float32; limit: L. The launchers then take the prediction's
    variance v in place of Σ_pred and no p; the backward returns ∂L/∂(v, r, l) in place of ∂L/∂(Σ_pred, p).
    """

    raw: Tensor
    logit: Tensor
    known: Tensor | None
    limit: float


#: Same floor as bkn_export.functional's fallback rule (batch variance clamp); a
#: constexpr because Triton kernels may only read constexpr globals, spelled here because
#: kernels/ imports nothing from bkn_export beyond layout and errors (tests/test_kernels.py
#: asserts the two are equal).
VARIANCE_FLOOR = tl.constexpr(1e-12)


@triton.jit
def tile_offsets(
    sample,
    tile_start,
    channel_offsets,
    channel_mask,
    rows,
    stride_sample,
    stride_channel,
    stride_row,
    BLOCK_ROWS: tl.constexpr,
):
    """Element offsets and mask of the [BLOCK_ROWS, channels] tile starting at row ``tile_start`` of ``sample``."""
    row_offsets = tile_start + tl.arange(0, BLOCK_ROWS)
    mask = (row_offsets < rows)[:, None] & channel_mask[None, :]
    offsets = (
        sample.to(tl.int64) * stride_sample
        + row_offsets[:, None] * stride_row
        + channel_offsets[None, :] * stride_channel
    )
    return offsets, mask


@triton.jit
def tile_moments(shifted, mask, rows, tile_start, BLOCK_ROWS: tl.constexpr):
    """(count, mean, masked x - mean) of a tile of shifted float32 values (zeros where masked)."""
    count = tl.maximum(tl.minimum(rows - tile_start, BLOCK_ROWS), 0).to(tl.float32)
    mean = tl.sum(shifted, axis=0) / tl.maximum(count, 1.0)
    centred = tl.where(mask, shifted - mean[None, :], 0.0)
    return count, mean, centred


@triton.jit
def channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel):
    """K: the first element (sample 0, row 0) of each channel, float32; the data shift."""
    return tl.load(x_ptr + channel_offsets * stride_channel, mask=channel_mask, other=0.0).to(tl.float32)


@triton.jit
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's merge of two (count, mean, M2) triples; an empty side (count 0) is a no-op."""
    count = count_a + count_b
    weight_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2


@triton.jit
def merge_gradient_sums(sum_g_a, centred_a, mean_a, sum_g_b, centred_b, mean_b, mean):
    """Merge (Σ g, Σ g (x - mean_side)) of two sides, re-centred at the merged ``mean``."""
    sum_g = sum_g_a + sum_g_b
    centred = centred_a + (mean_a - mean) * sum_g_a + centred_b + (mean_b - mean) * sum_g_b
    return sum_g, centred


@triton.jit
def partial_counts(partial, num_partials, rows, programs_per_sample, rows_per_program):
    """Elements per channel behind each partial index (0 past ``num_partials``), float32.

    Partial ``i`` covers rows [(i mod P) R, (i mod P) R + R) of its sample, clipped at
    ``rows`` (P = programs_per_sample, R = rows_per_program): the same for every channel.
    """
    first_row = (partial % programs_per_sample) * rows_per_program
    count = tl.minimum(rows - first_row, rows_per_program)
    return tl.where(partial < num_partials, count, 0).to(tl.float32)


@triton.jit
def kalman_posterior(batch_mean, batch_variance, prior_mean, prior_variance, prior_weight):
    """The Kalman update (moment-matched blend), elementwise over channels.

    μ = m + q d,  Σ = p Σ_pred + q S + p q d²  with d = x̄ - m, q = 1 - p.
    """
    batch_weight = 1.0 - prior_weight
    innovation = batch_mean - prior_mean
    mean = prior_mean + batch_weight * innovation
    variance = (
        prior_weight * prior_variance
        + batch_weight * batch_variance
        + prior_weight * batch_weight * innovation * innovation
    )
    return mean, variance


@triton.jit
def fallback_fired(prior_variance_ptr, batch_variance_ptr, channels, fallback_ratio, BLOCK: tl.constexpr):
    """The authors' rule over all channels: mean(Σ_pred / max(S, floor)) ≥ fallback_ratio.

    Every program of a fallback kernel evaluates it over the whole (C,) vectors: C
    loads per program, far cheaper than a separate launch and a grid-wide barrier.
    """
    total = 0.0
    for start in range(0, channels, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < channels
        prior_variance = tl.load(prior_variance_ptr + offsets, mask=mask, other=0.0)
        batch_variance = tl.load(batch_variance_ptr + offsets, mask=mask, other=1.0)
        # clamp_min's NaN passes through (tl.maximum would return the floor): a NaN channel keeps the mean NaN and
        # the rule off, as in the reference, instead of a ratio of ~1e12 that switched every channel to the batch.
        floored = tl.where(batch_variance != batch_variance, batch_variance, tl.maximum(batch_variance, VARIANCE_FLOOR))
        total += tl.sum(prior_variance / floored, axis=0)
    return total / channels >= fallback_ratio


@triton.jit
def prior_statistics(
    channel_offsets,
    channel_mask,
    prior_variance_ptr,
    prior_weight_ptr,
    raw_ptr,
    logit_ptr,
    known_ptr,
    limit,
    ASSEMBLE: tl.constexpr,
    HAS_KNOWN: tl.constexpr,
):
    """(Σ_pred, p) of one channel block, float32: loaded, or under ASSEMBLE the prior's last step done here
    from the prediction's variance v (at ``prior_variance_ptr``), r, l and the known-channel mask k::

        Σ_pred = v + softplus(r),  p = L sigmoid(l) [· k]      (L = ``limit``)

    in float64 and rounded once (:func:`bkn_export.kernels.prior_moments.assembled_prior`): the values the
    separate ``prior_assembly`` launch stores, so the op's result is that of the two launches."""
    if ASSEMBLE:
        r, logit, known = load_assembly_inputs(raw_ptr, logit_ptr, known_ptr, channel_offsets, channel_mask, HAS_KNOWN)
        v = tl.load(prior_variance_ptr + channel_offsets, mask=channel_mask, other=0.0).to(tl.float64)
        variance64, weight64 = assembled_prior(v, r, logit, known, limit, HAS_KNOWN)
        variance = variance64.to(tl.float32)
        weight = weight64.to(tl.float32)
    else:
        variance = tl.load(prior_variance_ptr + channel_offsets, mask=channel_mask, other=0.0)
        weight = tl.load(prior_weight_ptr + channel_offsets, mask=channel_mask, other=0.0)
    return variance, weight


@triton.jit
def store_prior_gradients(
    channel_offsets,
    channel_mask,
    grad_prior_variance,
    grad_prior_weight,
    grad_prior_weight_ptr,
    grad_raw_ptr,
    raw_ptr,
    logit_ptr,
    known_ptr,
    limit,
    ASSEMBLE: tl.constexpr,
    HAS_KNOWN: tl.constexpr,
):
    """Store ∂L/∂p at ``grad_prior_weight_ptr``; under ASSEMBLE (see :func:`prior_statistics`) the assembly's
    backward instead: ∂L/∂r at ``grad_raw_ptr`` and ∂L/∂l at ``grad_prior_weight_ptr``
    (:func:`bkn_export.kernels.prior_moments.assembly_gradients`, float64, rounded once). ∂L/∂v is ∂L/∂Σ_pred,
    which the caller stores."""
    if ASSEMBLE:
        r, logit, known = load_assembly_inputs(raw_ptr, logit_ptr, known_ptr, channel_offsets, channel_mask, HAS_KNOWN)
        grad_raw, grad_logit = assembly_gradients(
            r, logit, known, grad_prior_variance.to(tl.float64), grad_prior_weight.to(tl.float64), limit
        )
        tl.store(grad_raw_ptr + channel_offsets, grad_raw.to(tl.float32), mask=channel_mask)
        tl.store(grad_prior_weight_ptr + channel_offsets, grad_logit.to(tl.float32), mask=channel_mask)
    else:
        tl.store(grad_prior_weight_ptr + channel_offsets, grad_prior_weight, mask=channel_mask)
