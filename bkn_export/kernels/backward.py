"""Train-mode BKN backward in Triton: two per-channel reductions, then grad_x.

Math (per channel; :func:`bkn_export.functional.batch_kalman_norm_backward`), with
x̂ = (x - μ)/s, s = sqrt(Σ + ε), d = x̄ - μ_pred, q = 1 - p, n elements per channel::

    Σ g,  Σ g x̂ = (Σ g (x - x̄) + (x̄ - μ) Σ g) / s                    (the two reductions)
    ∂L/∂μ = -γ Σ g / s + ḡ_μ            ∂L/∂Σ = -γ Σ g x̂ / (2 s²) + ḡ_Σ
    ∂L/∂x̄ = q ∂L/∂μ + 2pq d ∂L/∂Σ       ∂L/∂S = q ∂L/∂Σ
    ∂L/∂μ_pred = p ∂L/∂μ - 2pq d ∂L/∂Σ   ∂L/∂Σ_pred = p ∂L/∂Σ
    ∂L/∂p = -d ∂L/∂μ + (Σ_pred - S + (1 - 2p) d²) ∂L/∂Σ   (0 where the fallback fired)
    ∂L/∂γ = Σ g x̂,  ∂L/∂β = Σ g
    ∂L/∂x = g γ/s + ∂L/∂x̄ / n + (x - x̄) 2 ∂L/∂S / n

The batch statistics are recomputed here (the op's backward receives x, not the
forward's statistics), in the same pass as the two gradient sums: one read of (x, g)
for all reductions, one read of (x, g) and one write for grad_x, the same traffic as
cuDNN's BatchNorm backward. Three kernels, as in the forward:

1. ``_partial_backward_kernel``: per program and channel, (mean, M2) of x and
   (Σ g, Σ g (x - mean)) over its rows.
2. ``_backward_statistics_kernel``: merges them into x̄, S, Σ g, Σ g (x - x̄) and,
   without the fallback rule, computes every per-channel gradient and the three
   coefficients of grad_x in the same program; with ``fallback_ratio > 0`` it stores
   the sums and ``_backward_fallback_kernel`` does that after the rule.
3. ``_grad_input_kernel``: ∂L/∂x = g a + (x - x̄) c + b elementwise.

Small channels without the fallback rule take one launch instead
(``_single_program_backward_kernel``, see ``layout.use_single_program``): one program
per channel block streams (x, g) for the sums, computes the per-channel gradients, and
streams (x, g) again to write grad_x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bkn_export.errors import BKNInputError
from bkn_export.kernels.common import (
    PriorAssembly,
    channel_shift,
    fallback_fired,
    kalman_posterior,
    merge_gradient_sums,
    merge_moments,
    partial_counts,
    prior_statistics,
    store_prior_gradients,
    tile_moments,
    tile_offsets,
)
from bkn_export.kernels.forward import prior_weight_or_assembly
from bkn_export.kernels.layout import (
    CHANNEL_BLOCK,
    COMBINE_BLOCK_P,
    NUM_WARPS,
    as_dtype,
    cdiv,
    channel_view,
    choose_single_program,
    choose_tiling,
    restore_layout,
    statistics_vector,
    working_tensor,
)

__all__ = ["batch_kalman_norm_backward", "batch_kalman_norm_backward_assembled"]


@triton.jit
def _accumulate_tile(
    x_ptr,
    grad_ptr,
    shift,
    sample,
    tile_start,
    channel_offsets,
    channel_mask,
    rows,
    stride_sample,
    stride_channel,
    stride_row,
    count,
    mean,
    m2,
    sum_g,
    centred_sum,
    BLOCK_ROWS: tl.constexpr,
):
    """Merge one tile of (x, g) into (count, mean, M2) of x - K and (Σ g, Σ g (x - mean))."""
    offsets, mask = tile_offsets(
        sample, tile_start, channel_offsets, channel_mask, rows, stride_sample, stride_channel, stride_row, BLOCK_ROWS
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tile_count, tile_mean, centred = tile_moments(
        tl.where(mask, x - shift[None, :], 0.0), mask, rows, tile_start, BLOCK_ROWS
    )
    new_count, new_mean, new_m2 = merge_moments(
        count, mean, m2, tile_count, tile_mean, tl.sum(centred * centred, axis=0)
    )
    sum_g, centred_sum = merge_gradient_sums(
        sum_g, centred_sum, mean, tl.sum(g, axis=0), tl.sum(g * centred, axis=0), tile_mean, new_mean
    )
    return new_count, new_mean, new_m2, sum_g, centred_sum


@triton.jit
def _partial_backward_kernel(
    x_ptr,
    grad_ptr,
    partial_mean_ptr,
    partial_m2_ptr,
    partial_sum_g_ptr,
    partial_centred_ptr,
    channels,
    rows,
    stride_sample,
    stride_channel,
    stride_row,
    programs_per_sample,
    chunks_per_program,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 1: (mean, M2) of x and (Σ g, Σ g (x - mean)) of this program's rows, per channel."""
    partial = tl.program_id(0)
    channel_offsets = tl.program_id(1) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    sample = partial // programs_per_sample
    first_row = (partial % programs_per_sample) * chunks_per_program * BLOCK_ROWS
    shift = channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel)

    count = 0.0
    mean = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    centred_sum = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    for chunk in range(0, chunks_per_program):
        count, mean, m2, sum_g, centred_sum = _accumulate_tile(
            x_ptr,
            grad_ptr,
            shift,
            sample,
            first_row + chunk * BLOCK_ROWS,
            channel_offsets,
            channel_mask,
            rows,
            stride_sample,
            stride_channel,
            stride_row,
            count,
            mean,
            m2,
            sum_g,
            centred_sum,
            BLOCK_ROWS,
        )

    out = partial * channels + channel_offsets
    tl.store(partial_mean_ptr + out, mean, mask=channel_mask)
    tl.store(partial_m2_ptr + out, m2, mask=channel_mask)
    tl.store(partial_sum_g_ptr + out, sum_g, mask=channel_mask)
    tl.store(partial_centred_ptr + out, centred_sum, mask=channel_mask)


@triton.jit
def _store_channel_gradients(
    channel_offsets,
    channel_mask,
    count,
    batch_mean,
    batch_variance,
    sum_g,
    centred_sum,
    prior_variance,
    prior_weight,
    eps,
    prior_mean_ptr,
    weight_ptr,
    grad_posterior_mean_ptr,
    grad_posterior_variance_ptr,
    grad_prior_mean_ptr,
    grad_prior_variance_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    extra_grad_weight_ptr,
    extra_grad_bias_ptr,
    HAS_WEIGHT: tl.constexpr,
    HAS_EXTRA_WEIGHT: tl.constexpr,
    HAS_EXTRA_BIAS: tl.constexpr,
):
    """Per-channel gradients of one channel block (module docstring; Σ_pred and p given): stores those of
    μ_pred, Σ_pred, γ, β (plus ∂L/∂γ, ∂L/∂β from γ's and β's other uses under HAS_EXTRA_*: one add here
    instead of autograd's launch); returns ∂L/∂Σ_pred, ∂L/∂p and grad_x's coefficients (a, c, b)."""
    prior_mean = tl.load(prior_mean_ptr + channel_offsets, mask=channel_mask, other=0.0)
    mean, variance = kalman_posterior(batch_mean, batch_variance, prior_mean, prior_variance, prior_weight)
    inv_std = tl.rsqrt(variance + eps)
    sum_g_xhat = inv_std * (centred_sum + (batch_mean - mean) * sum_g)
    if HAS_WEIGHT:
        gamma = tl.load(weight_ptr + channel_offsets, mask=channel_mask, other=1.0)
        grad_weight = sum_g_xhat
        if HAS_EXTRA_WEIGHT:
            grad_weight = grad_weight + tl.load(extra_grad_weight_ptr + channel_offsets, mask=channel_mask, other=0.0)
        tl.store(grad_weight_ptr + channel_offsets, grad_weight, mask=channel_mask)
    else:
        gamma = tl.full([1], 1.0, dtype=tl.float32)
        tl.store(grad_weight_ptr + channel_offsets, tl.zeros_like(sum_g_xhat), mask=channel_mask)
    grad_bias = sum_g
    if HAS_EXTRA_BIAS:
        grad_bias = grad_bias + tl.load(extra_grad_bias_ptr + channel_offsets, mask=channel_mask, other=0.0)
    tl.store(grad_bias_ptr + channel_offsets, grad_bias, mask=channel_mask)

    grad_mean = -gamma * sum_g * inv_std
    grad_mean += tl.load(grad_posterior_mean_ptr + channel_offsets, mask=channel_mask, other=0.0)
    grad_variance = -0.5 * gamma * sum_g_xhat * inv_std * inv_std
    grad_variance += tl.load(grad_posterior_variance_ptr + channel_offsets, mask=channel_mask, other=0.0)

    batch_weight = 1.0 - prior_weight
    innovation = batch_mean - prior_mean
    cross = 2.0 * prior_weight * batch_weight * innovation * grad_variance
    grad_batch_mean = batch_weight * grad_mean + cross
    grad_batch_variance = batch_weight * grad_variance
    tl.store(grad_prior_mean_ptr + channel_offsets, prior_weight * grad_mean - cross, mask=channel_mask)
    grad_prior_variance = prior_weight * grad_variance
    tl.store(grad_prior_variance_ptr + channel_offsets, grad_prior_variance, mask=channel_mask)

    spread = prior_variance - batch_variance + (1.0 - 2.0 * prior_weight) * innovation * innovation
    grad_prior_weight = -innovation * grad_mean + spread * grad_variance
    input_scale = gamma * inv_std
    centred_scale = 2.0 * grad_batch_variance / count
    return grad_prior_variance, grad_prior_weight, input_scale, centred_scale, grad_batch_mean / count


@triton.jit
def _store_input_coefficients(
    channel_offsets,
    channel_mask,
    input_scale,
    centred_scale,
    input_offset,
    input_scale_ptr,
    centred_scale_ptr,
    input_offset_ptr,
):
    """Store grad_x's per-channel coefficients (a, c, b) for ``_grad_input_kernel``."""
    tl.store(input_scale_ptr + channel_offsets, input_scale, mask=channel_mask)
    tl.store(centred_scale_ptr + channel_offsets, centred_scale, mask=channel_mask)
    tl.store(input_offset_ptr + channel_offsets, input_offset, mask=channel_mask)


@triton.jit
def _backward_statistics_kernel(
    x_ptr,
    partial_mean_ptr,
    partial_m2_ptr,
    partial_sum_g_ptr,
    partial_centred_ptr,
    batch_variance_ptr,
    centred_sum_ptr,
    prior_mean_ptr,
    prior_variance_ptr,
    prior_weight_ptr,
    raw_ptr,
    logit_ptr,
    known_ptr,
    weight_ptr,
    grad_posterior_mean_ptr,
    grad_posterior_variance_ptr,
    grad_prior_mean_ptr,
    grad_prior_variance_ptr,
    grad_prior_weight_ptr,
    grad_raw_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    extra_grad_weight_ptr,
    extra_grad_bias_ptr,
    input_scale_ptr,
    shifted_mean_ptr,
    centred_scale_ptr,
    input_offset_ptr,
    batch_mean_ptr,
    eps,
    limit: tl.float64,
    channels,
    rows,
    stride_channel,
    num_partials,
    programs_per_sample,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    UPDATE: tl.constexpr,
    ASSEMBLE: tl.constexpr,
    HAS_KNOWN: tl.constexpr,
    HAS_EXTRA_WEIGHT: tl.constexpr,
    HAS_EXTRA_BIAS: tl.constexpr,
    BLOCK_PARTIALS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 2: merge partials into x̄, S, Σ g, Σ g (x - x̄); then all gradients (UPDATE) or store the sums."""
    channel_offsets = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels

    count = 0.0
    mean = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    centred_sum = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_PARTIALS):
        partial = start + tl.arange(0, BLOCK_PARTIALS)
        counts = partial_counts(partial, num_partials, rows, programs_per_sample, rows_per_program)
        mask = (partial < num_partials)[:, None] & channel_mask[None, :]
        offsets = partial[:, None] * channels + channel_offsets[None, :]
        partial_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0)
        partial_m2 = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0)
        partial_sum_g = tl.load(partial_sum_g_ptr + offsets, mask=mask, other=0.0)
        partial_centred = tl.load(partial_centred_ptr + offsets, mask=mask, other=0.0)
        chunk_count = tl.sum(counts, axis=0)
        chunk_mean = tl.sum(counts[:, None] * partial_mean, axis=0) / tl.maximum(chunk_count, 1.0)
        deviation = partial_mean - chunk_mean[None, :]
        chunk_m2 = tl.sum(partial_m2 + counts[:, None] * deviation * deviation, axis=0)
        chunk_sum_g = tl.sum(partial_sum_g, axis=0)
        chunk_centred = tl.sum(partial_centred + deviation * partial_sum_g, axis=0)
        previous_mean = mean
        count, mean, m2 = merge_moments(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
        sum_g, centred_sum = merge_gradient_sums(
            sum_g, centred_sum, previous_mean, chunk_sum_g, chunk_centred, chunk_mean, mean
        )
    variance = m2 / count
    tl.store(shifted_mean_ptr + channel_offsets, mean, mask=channel_mask)  # grad_x centres x - K at it
    batch_mean = mean + channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel)

    if UPDATE:
        prior_variance, prior_weight = prior_statistics(
            channel_offsets,
            channel_mask,
            prior_variance_ptr,
            prior_weight_ptr,
            raw_ptr,
            logit_ptr,
            known_ptr,
            limit,
            ASSEMBLE,
            HAS_KNOWN,
        )
        grad_prior_variance, grad_prior_weight, input_scale, centred_scale, input_offset = _store_channel_gradients(
            channel_offsets,
            channel_mask,
            count,
            batch_mean,
            variance,
            sum_g,
            centred_sum,
            prior_variance,
            prior_weight,
            eps,
            prior_mean_ptr,
            weight_ptr,
            grad_posterior_mean_ptr,
            grad_posterior_variance_ptr,
            grad_prior_mean_ptr,
            grad_prior_variance_ptr,
            grad_weight_ptr,
            grad_bias_ptr,
            extra_grad_weight_ptr,
            extra_grad_bias_ptr,
            HAS_WEIGHT,
            HAS_EXTRA_WEIGHT,
            HAS_EXTRA_BIAS,
        )
        store_prior_gradients(
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
            ASSEMBLE,
            HAS_KNOWN,
        )
        _store_input_coefficients(
            channel_offsets,
            channel_mask,
            input_scale,
            centred_scale,
            input_offset,
            input_scale_ptr,
            centred_scale_ptr,
            input_offset_ptr,
        )
    else:
        tl.store(batch_mean_ptr + channel_offsets, batch_mean, mask=channel_mask)
        tl.store(batch_variance_ptr + channel_offsets, variance, mask=channel_mask)
        tl.store(grad_bias_ptr + channel_offsets, sum_g, mask=channel_mask)
        tl.store(centred_sum_ptr + channel_offsets, centred_sum, mask=channel_mask)


@triton.jit
def _backward_fallback_kernel(
    batch_variance_ptr,
    centred_sum_ptr,
    prior_mean_ptr,
    prior_variance_ptr,
    prior_weight_ptr,
    weight_ptr,
    grad_posterior_mean_ptr,
    grad_posterior_variance_ptr,
    grad_prior_mean_ptr,
    grad_prior_variance_ptr,
    grad_prior_weight_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    extra_grad_weight_ptr,
    extra_grad_bias_ptr,
    input_scale_ptr,
    centred_scale_ptr,
    input_offset_ptr,
    batch_mean_ptr,
    eps,
    count,
    channels,
    fallback_ratio,
    HAS_WEIGHT: tl.constexpr,
    HAS_EXTRA_WEIGHT: tl.constexpr,
    HAS_EXTRA_BIAS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 2b (fallback_ratio > 0): the rule over all channels, then all gradients; ∂L/∂p = 0 if fired."""
    fired = fallback_fired(prior_variance_ptr, batch_variance_ptr, channels, fallback_ratio, BLOCK_CHANNELS)
    channel_offsets = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    batch_mean = tl.load(batch_mean_ptr + channel_offsets, mask=channel_mask, other=0.0)
    batch_variance = tl.load(batch_variance_ptr + channel_offsets, mask=channel_mask, other=0.0)
    sum_g = tl.load(grad_bias_ptr + channel_offsets, mask=channel_mask, other=0.0)
    centred_sum = tl.load(centred_sum_ptr + channel_offsets, mask=channel_mask, other=0.0)
    prior_variance = tl.load(prior_variance_ptr + channel_offsets, mask=channel_mask, other=0.0)
    prior_weight = tl.load(prior_weight_ptr + channel_offsets, mask=channel_mask, other=0.0)
    prior_weight = tl.where(fired, 0.0, prior_weight)
    _, grad_prior_weight, input_scale, centred_scale, input_offset = _store_channel_gradients(
        channel_offsets,
        channel_mask,
        count,
        batch_mean,
        batch_variance,
        sum_g,
        centred_sum,
        prior_variance,
        prior_weight,
        eps,
        prior_mean_ptr,
        weight_ptr,
        grad_posterior_mean_ptr,
        grad_posterior_variance_ptr,
        grad_prior_mean_ptr,
        grad_prior_variance_ptr,
        grad_weight_ptr,
        grad_bias_ptr,
        extra_grad_weight_ptr,
        extra_grad_bias_ptr,
        HAS_WEIGHT,
        HAS_EXTRA_WEIGHT,
        HAS_EXTRA_BIAS,
    )
    tl.store(grad_prior_weight_ptr + channel_offsets, tl.where(fired, 0.0, grad_prior_weight), mask=channel_mask)
    _store_input_coefficients(
        channel_offsets,
        channel_mask,
        input_scale,
        centred_scale,
        input_offset,
        input_scale_ptr,
        centred_scale_ptr,
        input_offset_ptr,
    )


@triton.jit
def _grad_input_tile(
    x_ptr,
    grad_ptr,
    grad_input_ptr,
    shift,
    shifted_mean,
    input_scale,
    centred_scale,
    input_offset,
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
    """∂L/∂x = g a + ((x - K) - mean(x - K)) c + b on one tile (see ``common`` for K)."""
    offsets, mask = tile_offsets(
        sample, tile_start, channel_offsets, channel_mask, rows, stride_sample, stride_channel, stride_row, BLOCK_ROWS
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    centred = (x - shift[None, :]) - shifted_mean[None, :]
    grad_input = g * input_scale[None, :] + centred * centred_scale[None, :] + input_offset[None, :]
    tl.store(grad_input_ptr + offsets, grad_input.to(grad_input_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_kernel(
    x_ptr,
    grad_ptr,
    grad_input_ptr,
    input_scale_ptr,
    shifted_mean_ptr,
    centred_scale_ptr,
    input_offset_ptr,
    channels,
    rows,
    stride_sample,
    stride_channel,
    stride_row,
    row_blocks_per_sample,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 3: ∂L/∂x = g a + (x - x̄) c + b per channel (a = γ/s, c = 2 ∂L/∂S / n, b = ∂L/∂x̄ / n)."""
    block = tl.program_id(0)
    channel_offsets = tl.program_id(1) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    _grad_input_tile(
        x_ptr,
        grad_ptr,
        grad_input_ptr,
        channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel),
        tl.load(shifted_mean_ptr + channel_offsets, mask=channel_mask, other=0.0),
        tl.load(input_scale_ptr + channel_offsets, mask=channel_mask, other=0.0),
        tl.load(centred_scale_ptr + channel_offsets, mask=channel_mask, other=0.0),
        tl.load(input_offset_ptr + channel_offsets, mask=channel_mask, other=0.0),
        block // row_blocks_per_sample,
        (block % row_blocks_per_sample) * BLOCK_ROWS,
        channel_offsets,
        channel_mask,
        rows,
        stride_sample,
        stride_channel,
        stride_row,
        BLOCK_ROWS,
    )


@triton.jit
def _single_program_backward_kernel(
    x_ptr,
    grad_ptr,
    grad_input_ptr,
    prior_mean_ptr,
    prior_variance_ptr,
    prior_weight_ptr,
    raw_ptr,
    logit_ptr,
    known_ptr,
    weight_ptr,
    grad_posterior_mean_ptr,
    grad_posterior_variance_ptr,
    grad_prior_mean_ptr,
    grad_prior_variance_ptr,
    grad_prior_weight_ptr,
    grad_raw_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    extra_grad_weight_ptr,
    extra_grad_bias_ptr,
    eps,
    limit: tl.float64,
    channels,
    rows,
    stride_sample,
    stride_channel,
    stride_row,
    num_tiles,
    row_blocks_per_sample,
    HAS_WEIGHT: tl.constexpr,
    ASSEMBLE: tl.constexpr,
    HAS_KNOWN: tl.constexpr,
    HAS_EXTRA_WEIGHT: tl.constexpr,
    HAS_EXTRA_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """All three passes for one channel block in one program (small n, no fallback rule)."""
    channel_offsets = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    shift = channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel)

    count = 0.0
    mean = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    centred_sum = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    for tile in range(0, num_tiles):
        count, mean, m2, sum_g, centred_sum = _accumulate_tile(
            x_ptr,
            grad_ptr,
            shift,
            tile // row_blocks_per_sample,
            (tile % row_blocks_per_sample) * BLOCK_ROWS,
            channel_offsets,
            channel_mask,
            rows,
            stride_sample,
            stride_channel,
            stride_row,
            count,
            mean,
            m2,
            sum_g,
            centred_sum,
            BLOCK_ROWS,
        )

    prior_variance, prior_weight = prior_statistics(
        channel_offsets,
        channel_mask,
        prior_variance_ptr,
        prior_weight_ptr,
        raw_ptr,
        logit_ptr,
        known_ptr,
        limit,
        ASSEMBLE,
        HAS_KNOWN,
    )
    grad_prior_variance, grad_prior_weight, input_scale, centred_scale, input_offset = _store_channel_gradients(
        channel_offsets,
        channel_mask,
        count,
        mean + shift,
        m2 / count,
        sum_g,
        centred_sum,
        prior_variance,
        prior_weight,
        eps,
        prior_mean_ptr,
        weight_ptr,
        grad_posterior_mean_ptr,
        grad_posterior_variance_ptr,
        grad_prior_mean_ptr,
        grad_prior_variance_ptr,
        grad_weight_ptr,
        grad_bias_ptr,
        extra_grad_weight_ptr,
        extra_grad_bias_ptr,
        HAS_WEIGHT,
        HAS_EXTRA_WEIGHT,
        HAS_EXTRA_BIAS,
    )
    store_prior_gradients(
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
        ASSEMBLE,
        HAS_KNOWN,
    )
    for tile in range(0, num_tiles):
        _grad_input_tile(
            x_ptr,
            grad_ptr,
            grad_input_ptr,
            shift,
            mean,
            input_scale,
            centred_scale,
            input_offset,
            tile // row_blocks_per_sample,
            (tile % row_blocks_per_sample) * BLOCK_ROWS,
            channel_offsets,
            channel_mask,
            rows,
            stride_sample,
            stride_channel,
            stride_row,
            BLOCK_ROWS,
        )


# --------------------------------------------------------------------------- launcher


def batch_kalman_norm_backward(
    grad_output: Tensor,
    grad_posterior_mean: Tensor,
    grad_posterior_variance: Tensor,
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    eps: float,
    fallback_ratio: float,
    single_program: bool | None = None,
    extra_grad_weight: Tensor | None = None,
    extra_grad_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused BKN backward; same contract as ``torch.ops.bkn.batch_kalman_norm_backward``.

    grad_output, x: (N, C, *) float32/float16/bfloat16; grad_posterior_*, prior_*,
    weight: (C,). Returns grads for (x, prior_mean, prior_variance, prior_weight,
    weight, bias): grad_x in the dtype and layout of x, the prior grads in the dtypes
    of the priors, the γ/β grads float32 (γ's is zeros when ``weight`` is None).
    ``single_program`` as in :func:`~bkn_export.kernels.forward.batch_kalman_norm_forward`.
    ``extra_grad_weight``, ``extra_grad_bias``: (C,) gradients of γ and β from their other uses (the next
    layers' predictions), added in the kernel to the op's own (what autograd would add in a launch of its own).
    """
    grad_x, grad_prior_mean, grad_prior_variance, grad_prior_weight, _, grad_weight, grad_bias = _backward(
        grad_output, grad_posterior_mean, grad_posterior_variance, x, prior_mean, prior_variance, prior_weight,
        None, weight, eps, fallback_ratio, single_program, extra_grad_weight, extra_grad_bias,
    )  # fmt: skip
    return (
        grad_x,
        as_dtype(grad_prior_mean, prior_mean.dtype),
        as_dtype(grad_prior_variance, prior_variance.dtype),
        as_dtype(grad_prior_weight, prior_weight.dtype),
        grad_weight,
        grad_bias,
    )


def batch_kalman_norm_backward_assembled(
    grad_output: Tensor,
    grad_posterior_mean: Tensor,
    grad_posterior_variance: Tensor,
    x: Tensor,
    prior_mean: Tensor,
    variance: Tensor,
    assembly: PriorAssembly,
    weight: Tensor | None,
    eps: float,
    single_program: bool | None = None,
    extra_grad_weight: Tensor | None = None,
    extra_grad_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`batch_kalman_norm_backward` of a forward that assembled its prior (``assembly``, see
    :func:`~bkn_export.kernels.forward.batch_kalman_norm_forward`; no fallback rule), the assembly's backward in
    the same kernels: returns ∂L/∂(x, μ_pred, v, r, l, γ, β), the (C,) ones float32. ``variance`` is the
    prediction's v."""
    grad_x, grad_prior_mean, grad_variance, grad_logit, grad_raw, grad_weight, grad_bias = _backward(
        grad_output, grad_posterior_mean, grad_posterior_variance, x, prior_mean, variance, None, assembly,
        weight, eps, 0.0, single_program, extra_grad_weight, extra_grad_bias,
    )  # fmt: skip
    assert grad_raw is not None
    return grad_x, grad_prior_mean, grad_variance, grad_raw, grad_logit, grad_weight, grad_bias


def _backward(
    grad_output: Tensor,
    grad_posterior_mean: Tensor,
    grad_posterior_variance: Tensor,
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor | None,
    assembly: PriorAssembly | None,
    weight: Tensor | None,
    eps: float,
    fallback_ratio: float,
    single_program: bool | None,
    extra_grad_weight: Tensor | None,
    extra_grad_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Both launchers: (∂x, ∂μ_pred, ∂Σ_pred or ∂v, ∂p or ∂l, ∂r or None, ∂γ, ∂β), the (C,) ones float32."""
    x_work = working_tensor(x)
    if grad_output.shape != x.shape:
        raise BKNInputError(
            f"BKN Triton backward: grad_output has shape {tuple(grad_output.shape)} but x has {tuple(x.shape)}; "
            "pass the gradient of the op's output y"
        )
    grad_work = grad_output
    if grad_output.stride() != x_work.stride():  # one set of strides for every (N, C, *) tensor
        grad_work = torch.empty_like(x_work, dtype=grad_output.dtype).copy_(grad_output)
    view = channel_view(x_work)
    tiling = choose_tiling(view)
    channels = view.channels
    prior_mean32 = statistics_vector(prior_mean, channels, "prior_mean")
    prior_variance32 = statistics_vector(prior_variance, channels, "prior_variance")
    prior_weight32, assembled = prior_weight_or_assembly(prior_weight, assembly, channels, fallback_ratio)
    weight32 = statistics_vector(weight, channels, "weight") if weight is not None else prior_weight32
    grad_mean32 = statistics_vector(grad_posterior_mean, channels, "grad_posterior_mean")
    grad_variance32 = statistics_vector(grad_posterior_variance, channels, "grad_posterior_variance")
    extra_weight32, extra_bias32 = (
        statistics_vector(extra, channels, name) if extra is not None else None
        for extra, name in ((extra_grad_weight, "extra_grad_weight"), (extra_grad_bias, "extra_grad_bias"))
    )
    has_extra_weight = extra_weight32 is not None and weight is not None
    extras = (
        extra_weight32 if extra_weight32 is not None else grad_mean32,  # placeholder pointers, never read
        extra_bias32 if extra_bias32 is not None else grad_mean32,
    )
    # Separate allocations: a custom op's outputs may not alias one another.
    grad_prior_mean, grad_prior_variance, grad_prior_weight, grad_weight, grad_bias = (
        x.new_empty((channels,), dtype=torch.float32) for _ in range(5)
    )
    grad_raw = x.new_empty((channels,), dtype=torch.float32) if assembled.assemble else None
    grad_x_work = torch.empty_like(x_work)

    def results() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        grad_x = restore_layout(grad_x_work, x, x_work)
        return grad_x, grad_prior_mean, grad_prior_variance, grad_prior_weight, grad_raw, grad_weight, grad_bias

    flags = {
        "HAS_WEIGHT": weight is not None,
        "ASSEMBLE": assembled.assemble,
        "HAS_KNOWN": assembled.has_known,
        "HAS_EXTRA_WEIGHT": has_extra_weight,
        "HAS_EXTRA_BIAS": extra_bias32 is not None,
    }
    if choose_single_program(view, fallback_ratio, single_program):
        _single_program_backward_kernel[(tiling.channel_blocks,)](
            x_work,
            grad_work,
            grad_x_work,
            prior_mean32,
            prior_variance32,
            prior_weight32,
            *assembled.pointers,
            weight32,
            grad_mean32,
            grad_variance32,
            grad_prior_mean,
            grad_prior_variance,
            grad_prior_weight,
            grad_raw if grad_raw is not None else grad_prior_weight,  # placeholder pointer, never written
            grad_weight,
            grad_bias,
            *extras,
            eps,
            assembled.limit,
            channels,
            view.rows,
            view.stride_sample,
            view.stride_channel,
            view.stride_row,
            view.samples * tiling.row_blocks_per_sample,
            tiling.row_blocks_per_sample,
            **flags,
            BLOCK_ROWS=tiling.block_rows,
            BLOCK_CHANNELS=tiling.block_channels,
            num_warps=NUM_WARPS,
        )
        return results()

    num_partials = tiling.num_partials(view)
    partials = x.new_empty((4, num_partials, channels), dtype=torch.float32)
    _partial_backward_kernel[tiling.reduce_grid(view)](
        x_work,
        grad_work,
        partials[0],
        partials[1],
        partials[2],
        partials[3],
        channels,
        view.rows,
        view.stride_sample,
        view.stride_channel,
        view.stride_row,
        tiling.programs_per_sample,
        tiling.chunks_per_program,
        BLOCK_ROWS=tiling.block_rows,
        BLOCK_CHANNELS=tiling.block_channels,
        num_warps=NUM_WARPS,
    )

    # grad_x coefficients (a, mean(x - K), c, b) and, for the fallback path, (x̄, S, Σ g (x - x̄)).
    workspace = x.new_empty((7, channels), dtype=torch.float32)
    input_scale, shifted_mean, centred_scale, input_offset, batch_mean, batch_variance, centred_sum = workspace.unbind(
        0
    )
    update_inline = fallback_ratio <= 0
    channel_grid = (cdiv(channels, CHANNEL_BLOCK),)
    _backward_statistics_kernel[channel_grid](
        x_work,
        partials[0],
        partials[1],
        partials[2],
        partials[3],
        batch_variance,
        centred_sum,
        prior_mean32,
        prior_variance32,
        prior_weight32,
        *assembled.pointers,
        weight32,
        grad_mean32,
        grad_variance32,
        grad_prior_mean,
        grad_prior_variance,
        grad_prior_weight,
        grad_raw if grad_raw is not None else grad_prior_weight,
        grad_weight,
        grad_bias,
        *extras,
        input_scale,
        shifted_mean,
        centred_scale,
        input_offset,
        batch_mean,
        eps,
        assembled.limit,
        channels,
        view.rows,
        view.stride_channel,
        num_partials,
        tiling.programs_per_sample,
        tiling.rows_per_program,
        **flags,
        UPDATE=update_inline,
        BLOCK_PARTIALS=COMBINE_BLOCK_P,
        BLOCK_CHANNELS=CHANNEL_BLOCK,
        num_warps=NUM_WARPS,
    )
    if not update_inline:
        _backward_fallback_kernel[channel_grid](
            batch_variance,
            centred_sum,
            prior_mean32,
            prior_variance32,
            prior_weight32,
            weight32,
            grad_mean32,
            grad_variance32,
            grad_prior_mean,
            grad_prior_variance,
            grad_prior_weight,
            grad_weight,
            grad_bias,
            *extras,
            input_scale,
            centred_scale,
            input_offset,
            batch_mean,
            eps,
            float(view.count),
            channels,
            float(fallback_ratio),
            HAS_WEIGHT=weight is not None,
            HAS_EXTRA_WEIGHT=has_extra_weight,
            HAS_EXTRA_BIAS=extra_bias32 is not None,
            BLOCK_CHANNELS=CHANNEL_BLOCK,
            num_warps=NUM_WARPS,
        )

    _grad_input_kernel[tiling.stream_grid(view)](
        x_work,
        grad_work,
        grad_x_work,
        input_scale,
        shifted_mean,
        centred_scale,
        input_offset,
        channels,
        view.rows,
        view.stride_sample,
        view.stride_channel,
        view.stride_row,
        tiling.row_blocks_per_sample,
        BLOCK_ROWS=tiling.block_rows,
        BLOCK_CHANNELS=tiling.block_channels,
        num_warps=NUM_WARPS,
    )
    return results()
