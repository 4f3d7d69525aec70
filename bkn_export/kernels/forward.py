"""Train-mode BKN forward in Triton: batch statistics, Kalman update, normalize.

Math (per channel c, n = N · prod(*) elements; :func:`bkn_export.functional.batch_kalman_norm`)::

    x̄ = mean x,  S = mean (x - x̄)²                                    (float32)
    p = 0 if fallback fired else p;  q = 1 - p;  d = x̄ - μ_pred
    μ = μ_pred + q d,  Σ = p Σ_pred + q S + p q d²
    y = x · γ/sqrt(Σ + ε) + (β - μ γ/sqrt(Σ + ε))                      (dtype of x)

Three passes, as three kernels read top to bottom:

1. ``_partial_moments_kernel`` (grid: partials x channel blocks) streams
   CHUNKS_PER_PROGRAM tiles of its rows and writes one (mean, M2) partial per channel.
2. ``_forward_statistics_kernel`` (grid: channel blocks) merges the partials (Chan's
   combination, see ``common``) into x̄ and S and, without the fallback rule, applies
   the Kalman update in the same program. The fallback rule needs S of *all*
   channels, so with ``fallback_ratio > 0`` it stores (x̄, S) and
   ``_forward_fallback_kernel`` applies the rule and the update.
3. ``_normalize_kernel`` (grid: row tiles x channel blocks) writes y; it computes the
   per-channel affine from (μ, Σ, γ, β) in each program.

Small channels (n ≤ SINGLE_PROGRAM_MAX_COUNT, no fallback rule) take one launch instead:
``_single_program_forward_kernel`` gives each channel block one program that streams
its elements twice (statistics, then normalize; the second read mostly hits L2). At
batch 1-8 on late ResNet layers the three-kernel path would be launch-bound.
"""

from __future__ import annotations

from typing import NamedTuple

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
    merge_moments,
    partial_counts,
    prior_statistics,
    tile_moments,
    tile_offsets,
)
from bkn_export.kernels.layout import (
    CHANNEL_BLOCK,
    COMBINE_BLOCK_P,
    NUM_WARPS,
    ChannelView,
    Tiling,
    cdiv,
    channel_view,
    choose_single_program,
    choose_tiling,
    restore_layout,
    statistics_vector,
    working_tensor,
)

__all__ = ["batch_kalman_norm_forward"]


@triton.jit
def _accumulate_tile(
    x_ptr,
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
    BLOCK_ROWS: tl.constexpr,
):
    """Merge one tile of x into (count, mean, M2) of x - K (see ``common``)."""
    offsets, mask = tile_offsets(
        sample, tile_start, channel_offsets, channel_mask, rows, stride_sample, stride_channel, stride_row, BLOCK_ROWS
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tile_count, tile_mean, centred = tile_moments(
        tl.where(mask, x - shift[None, :], 0.0), mask, rows, tile_start, BLOCK_ROWS
    )
    return merge_moments(count, mean, m2, tile_count, tile_mean, tl.sum(centred * centred, axis=0))


@triton.jit
def _partial_moments_kernel(
    x_ptr,
    partial_mean_ptr,
    partial_m2_ptr,
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
    """Pass 1: (mean, M2) of this program's rows, per channel of its channel block."""
    partial = tl.program_id(0)
    channel_offsets = tl.program_id(1) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    sample = partial // programs_per_sample
    first_row = (partial % programs_per_sample) * chunks_per_program * BLOCK_ROWS
    shift = channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel)

    count = 0.0
    mean = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    for chunk in range(0, chunks_per_program):
        count, mean, m2 = _accumulate_tile(
            x_ptr,
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
            BLOCK_ROWS,
        )

    out = partial * channels + channel_offsets
    tl.store(partial_mean_ptr + out, mean, mask=channel_mask)
    tl.store(partial_m2_ptr + out, m2, mask=channel_mask)


@triton.jit
def _store_posterior(
    channel_offsets,
    channel_mask,
    batch_mean,
    batch_variance,
    prior_variance,
    prior_weight,
    prior_mean_ptr,
    posterior_mean_ptr,
    posterior_variance_ptr,
):
    """Kalman update of one channel block (Σ_pred, p given); stores and returns (μ_{k|k}, Σ_{k|k})."""
    prior_mean = tl.load(prior_mean_ptr + channel_offsets, mask=channel_mask, other=0.0)
    mean, variance = kalman_posterior(batch_mean, batch_variance, prior_mean, prior_variance, prior_weight)
    tl.store(posterior_mean_ptr + channel_offsets, mean, mask=channel_mask)
    tl.store(posterior_variance_ptr + channel_offsets, variance, mask=channel_mask)
    return mean, variance


@triton.jit
def _forward_statistics_kernel(
    x_ptr,
    partial_mean_ptr,
    partial_m2_ptr,
    batch_mean_ptr,
    batch_variance_ptr,
    prior_mean_ptr,
    prior_variance_ptr,
    prior_weight_ptr,
    raw_ptr,
    logit_ptr,
    known_ptr,
    posterior_mean_ptr,
    posterior_variance_ptr,
    limit: tl.float64,
    channels,
    rows,
    stride_channel,
    num_partials,
    programs_per_sample,
    rows_per_program,
    UPDATE: tl.constexpr,
    ASSEMBLE: tl.constexpr,
    HAS_KNOWN: tl.constexpr,
    BLOCK_PARTIALS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 2: merge partials into (x̄, S); then the update (UPDATE; the prior assembled here under ASSEMBLE,
    ``common.prior_statistics``) or store (x̄, S)."""
    channel_offsets = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels

    count = 0.0
    mean = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK_PARTIALS):
        partial = start + tl.arange(0, BLOCK_PARTIALS)
        counts = partial_counts(partial, num_partials, rows, programs_per_sample, rows_per_program)
        mask = (partial < num_partials)[:, None] & channel_mask[None, :]
        offsets = partial[:, None] * channels + channel_offsets[None, :]
        partial_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0)
        partial_m2 = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0)
        chunk_count = tl.sum(counts, axis=0)
        chunk_mean = tl.sum(counts[:, None] * partial_mean, axis=0) / tl.maximum(chunk_count, 1.0)
        deviation = partial_mean - chunk_mean[None, :]
        chunk_m2 = tl.sum(partial_m2 + counts[:, None] * deviation * deviation, axis=0)
        count, mean, m2 = merge_moments(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    variance = m2 / count
    mean += channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel)

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
        _store_posterior(
            channel_offsets,
            channel_mask,
            mean,
            variance,
            prior_variance,
            prior_weight,
            prior_mean_ptr,
            posterior_mean_ptr,
            posterior_variance_ptr,
        )
    else:
        tl.store(batch_mean_ptr + channel_offsets, mean, mask=channel_mask)
        tl.store(batch_variance_ptr + channel_offsets, variance, mask=channel_mask)


@triton.jit
def _forward_fallback_kernel(
    batch_mean_ptr,
    batch_variance_ptr,
    prior_mean_ptr,
    prior_variance_ptr,
    prior_weight_ptr,
    posterior_mean_ptr,
    posterior_variance_ptr,
    channels,
    fallback_ratio,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 2b (fallback_ratio > 0): p = 0 everywhere if the rule fires, then the update."""
    fired = fallback_fired(prior_variance_ptr, batch_variance_ptr, channels, fallback_ratio, BLOCK_CHANNELS)
    channel_offsets = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    batch_mean = tl.load(batch_mean_ptr + channel_offsets, mask=channel_mask, other=0.0)
    batch_variance = tl.load(batch_variance_ptr + channel_offsets, mask=channel_mask, other=0.0)
    prior_variance = tl.load(prior_variance_ptr + channel_offsets, mask=channel_mask, other=0.0)
    prior_weight = tl.load(prior_weight_ptr + channel_offsets, mask=channel_mask, other=0.0)
    prior_weight = tl.where(fired, 0.0, prior_weight)
    _store_posterior(
        channel_offsets,
        channel_mask,
        batch_mean,
        batch_variance,
        prior_variance,
        prior_weight,
        prior_mean_ptr,
        posterior_mean_ptr,
        posterior_variance_ptr,
    )


@triton.jit
def _affine(
    channel_offsets,
    channel_mask,
    mean,
    variance,
    weight_ptr,
    bias_ptr,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """(a, b) of y = x a + b: a = γ/sqrt(Σ + ε), b = β - μ a, float32 per channel."""
    scale = tl.rsqrt(variance + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + channel_offsets, mask=channel_mask, other=1.0)
    offset = -mean * scale
    if HAS_BIAS:
        offset = offset + tl.load(bias_ptr + channel_offsets, mask=channel_mask, other=0.0)
    return scale, offset


@triton.jit
def _normalize_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    variance_ptr,
    weight_ptr,
    bias_ptr,
    eps,
    channels,
    rows,
    stride_sample,
    stride_channel,
    stride_row,
    row_blocks_per_sample,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 3: y = x · a + b with a = γ/sqrt(Σ + ε), b = β - μ a (per channel, float32)."""
    block = tl.program_id(0)
    channel_offsets = tl.program_id(1) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    mean = tl.load(mean_ptr + channel_offsets, mask=channel_mask, other=0.0)
    variance = tl.load(variance_ptr + channel_offsets, mask=channel_mask, other=1.0)
    scale, offset = _affine(
        channel_offsets, channel_mask, mean, variance, weight_ptr, bias_ptr, eps, HAS_WEIGHT, HAS_BIAS
    )

    sample = block // row_blocks_per_sample
    tile_start = (block % row_blocks_per_sample) * BLOCK_ROWS
    offsets, mask = tile_offsets(
        sample, tile_start, channel_offsets, channel_mask, rows, stride_sample, stride_channel, stride_row, BLOCK_ROWS
    )
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = x * scale[None, :] + offset[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _single_program_forward_kernel(
    x_ptr,
    y_ptr,
    prior_mean_ptr,
    prior_variance_ptr,
    prior_weight_ptr,
    raw_ptr,
    logit_ptr,
    known_ptr,
    weight_ptr,
    bias_ptr,
    posterior_mean_ptr,
    posterior_variance_ptr,
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
    HAS_BIAS: tl.constexpr,
    ASSEMBLE: tl.constexpr,
    HAS_KNOWN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """All three passes for one channel block in one program (small n, no fallback rule; the prior assembled here
    under ASSEMBLE, ``common.prior_statistics``)."""
    channel_offsets = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    channel_mask = channel_offsets < channels
    shift = channel_shift(x_ptr, channel_offsets, channel_mask, stride_channel)

    count = 0.0
    mean = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_CHANNELS], dtype=tl.float32)
    for tile in range(0, num_tiles):
        count, mean, m2 = _accumulate_tile(
            x_ptr,
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
    posterior_mean, posterior_variance = _store_posterior(
        channel_offsets,
        channel_mask,
        mean + shift,
        m2 / count,
        prior_variance,
        prior_weight,
        prior_mean_ptr,
        posterior_mean_ptr,
        posterior_variance_ptr,
    )
    scale, offset = _affine(
        channel_offsets,
        channel_mask,
        posterior_mean,
        posterior_variance,
        weight_ptr,
        bias_ptr,
        eps,
        HAS_WEIGHT,
        HAS_BIAS,
    )
    for tile in range(0, num_tiles):
        offsets, mask = tile_offsets(
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
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = x * scale[None, :] + offset[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


class AssemblyArguments(NamedTuple):
    """The kernels' assembly arguments: (r, l, k) pointers (placeholders without ``assemble``), L, flags."""

    pointers: tuple[Tensor, Tensor, Tensor]
    limit: float
    assemble: bool
    has_known: bool


def prior_weight_or_assembly(
    prior_weight: Tensor | None, assembly: PriorAssembly | None, channels: int, fallback_ratio: float
) -> tuple[Tensor, AssemblyArguments]:
    """(p as a float32 (C,) vector, or a placeholder under ``assembly``; the kernels' assembly arguments). Checks
    that exactly one of ``prior_weight`` and ``assembly`` is given and that the fallback rule is off with an
    assembly."""
    if (prior_weight is None) == (assembly is None):
        raise BKNInputError(
            "BKN Triton launcher: pass either prior_weight (the gain p) or assembly (the prior's last step), "
            f"not {'both' if assembly is not None else 'neither'}"
        )
    if assembly is None:
        assert prior_weight is not None
        weight32 = statistics_vector(prior_weight, channels, "prior_weight")
        return weight32, AssemblyArguments((weight32, weight32, weight32), 0.0, False, False)
    if fallback_ratio > 0:
        raise BKNInputError(
            "BKN Triton launcher: the prior's assembly cannot run in the op's kernels under the fallback rule "
            "(fallback_ratio > 0 reads every channel's assembled Σ_pred first); assemble the prior separately"
        )
    raw = statistics_vector(assembly.raw, channels, "raw")
    logit = statistics_vector(assembly.logit, channels, "logit")
    known = statistics_vector(assembly.known, channels, "known") if assembly.known is not None else None
    pointers = (raw, logit, known if known is not None else raw)
    return raw, AssemblyArguments(pointers, float(assembly.limit), True, known is not None)


def _launch_normalize(
    x: Tensor,
    y: Tensor,
    view: ChannelView,
    tiling: Tiling,
    mean: Tensor,
    variance: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> None:
    """Launch pass 3: y = γ (x - mean)/sqrt(variance + ε) + β into ``y`` (same strides as ``x``).

    mean, variance, weight, bias: contiguous float32 (C,); None weight/bias mean γ = 1, β = 0.
    """
    _normalize_kernel[tiling.stream_grid(view)](
        x,
        y,
        mean,
        variance,
        weight if weight is not None else mean,  # placeholder pointer, never read
        bias if bias is not None else mean,
        eps,
        view.channels,
        view.rows,
        view.stride_sample,
        view.stride_channel,
        view.stride_row,
        tiling.row_blocks_per_sample,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=tiling.block_rows,
        BLOCK_CHANNELS=tiling.block_channels,
        num_warps=NUM_WARPS,
    )


def batch_kalman_norm_forward(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
    single_program: bool | None = None,
    assembly: PriorAssembly | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused train-mode BKN step; same contract as ``torch.ops.bkn.batch_kalman_norm``.

    x: (N, C, *) float32/float16/bfloat16, channels-first or channels-last (other
    layouts are copied); prior_mean, prior_variance, prior_weight, weight, bias: (C,).
    Returns y (dtype and layout of x) and the posterior mean and variance, float32 (C,).
    ``single_program``: force (True) or forbid (False) the one-kernel path; None picks
    it by size (``layout.use_single_program``). Tests use it to cover both paths.
    ``assembly``: the prior's last step in these kernels (:class:`~bkn_export.kernels.common.PriorAssembly`):
    ``prior_variance`` is then the prediction's variance v and ``prior_weight`` None; the launches are the
    same. Not with the fallback rule (it reads every channel's Σ_pred before any update).
    Raises BKNInputError for empty, too large or mis-shaped inputs.
    """
    x_work = working_tensor(x)
    view = channel_view(x_work)
    tiling = choose_tiling(view)
    channels = view.channels
    prior_mean32 = statistics_vector(prior_mean, channels, "prior_mean")
    prior_variance32 = statistics_vector(prior_variance, channels, "prior_variance")
    prior_weight32, assembled = prior_weight_or_assembly(prior_weight, assembly, channels, fallback_ratio)
    weight32 = statistics_vector(weight, channels, "weight") if weight is not None else None
    bias32 = statistics_vector(bias, channels, "bias") if bias is not None else None
    posterior_mean = x.new_empty((channels,), dtype=torch.float32)
    posterior_variance = x.new_empty((channels,), dtype=torch.float32)
    y_work = torch.empty_like(x_work)

    if choose_single_program(view, fallback_ratio, single_program):
        _single_program_forward_kernel[(tiling.channel_blocks,)](
            x_work,
            y_work,
            prior_mean32,
            prior_variance32,
            prior_weight32,
            *assembled.pointers,
            weight32 if weight32 is not None else prior_weight32,  # placeholder pointer, never read
            bias32 if bias32 is not None else prior_weight32,
            posterior_mean,
            posterior_variance,
            eps,
            assembled.limit,
            channels,
            view.rows,
            view.stride_sample,
            view.stride_channel,
            view.stride_row,
            view.samples * tiling.row_blocks_per_sample,
            tiling.row_blocks_per_sample,
            HAS_WEIGHT=weight32 is not None,
            HAS_BIAS=bias32 is not None,
            ASSEMBLE=assembled.assemble,
            HAS_KNOWN=assembled.has_known,
            BLOCK_ROWS=tiling.block_rows,
            BLOCK_CHANNELS=tiling.block_channels,
            num_warps=NUM_WARPS,
        )
        return restore_layout(y_work, x, x_work), posterior_mean, posterior_variance

    num_partials = tiling.num_partials(view)
    partials = x.new_empty((2, num_partials, channels), dtype=torch.float32)
    _partial_moments_kernel[tiling.reduce_grid(view)](
        x_work,
        partials[0],
        partials[1],
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

    update_inline = fallback_ratio <= 0
    if update_inline:  # (x̄, S) stay in registers; the pointers are placeholders never written
        batch_mean, batch_variance = posterior_mean, posterior_variance
    else:
        batch_mean, batch_variance = x.new_empty((2, channels), dtype=torch.float32).unbind(0)
    channel_grid = (cdiv(channels, CHANNEL_BLOCK),)
    _forward_statistics_kernel[channel_grid](
        x_work,
        partials[0],
        partials[1],
        batch_mean,
        batch_variance,
        prior_mean32,
        prior_variance32,
        prior_weight32,
        *assembled.pointers,
        posterior_mean,
        posterior_variance,
        assembled.limit,
        channels,
        view.rows,
        view.stride_channel,
        num_partials,
        tiling.programs_per_sample,
        tiling.rows_per_program,
        UPDATE=update_inline,
        ASSEMBLE=assembled.assemble,
        HAS_KNOWN=assembled.has_known,
        BLOCK_PARTIALS=COMBINE_BLOCK_P,
        BLOCK_CHANNELS=CHANNEL_BLOCK,
        num_warps=NUM_WARPS,
    )
    if not update_inline:
        _forward_fallback_kernel[channel_grid](
            batch_mean,
            batch_variance,
            prior_mean32,
            prior_variance32,
            prior_weight32,
            posterior_mean,
            posterior_variance,
            channels,
            float(fallback_ratio),
            BLOCK_CHANNELS=CHANNEL_BLOCK,
            num_warps=NUM_WARPS,
        )

    _launch_normalize(x_work, y_work, view, tiling, posterior_mean, posterior_variance, weight32, bias32, eps)
    return restore_layout(y_work, x, x_work), posterior_mean, posterior_variance
