"""How the Triton kernels see an (N, C, *) tensor: a strided (rows, C) problem per sample.

Every kernel indexes ``x: (N, C, *)`` as a 3-d strided view ``(N', C, S')`` and
reduces over (N', S') per channel. Both memory layouts BatchNorm meets in practice
fit that view without a copy:

* channels-first (NCHW, ``torch.contiguous_format``): strides (C·S, S, 1); the rows
  of one sample are contiguous, so a tile is a block of rows of a few channels.
* channels-last (NHWC, ``torch.channels_last`` / ``channels_last_3d``): strides
  (S·C, 1, C); sample and spatial index merge into one row index of N·S rows
  (stride C), so a tile is a block of rows of a block of contiguous channels.

Any other layout is copied to contiguous first. The tile shape is chosen per layout
so that the contiguous dimension is the long side of the tile (coalesced loads); the
kernels themselves are the same for both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from bkn_export.errors import BKNInputError

__all__ = [
    "CHANNELS_LAST_BLOCK_C",
    "CHANNEL_BLOCK",
    "CHUNKS_PER_PROGRAM",
    "COMBINE_BLOCK_P",
    "MAX_CHANNELS",
    "MAX_ELEMENTS",
    "NUM_WARPS",
    "SINGLE_PROGRAM_MAX_COUNT",
    "SINGLE_PROGRAM_MAX_ELEMENTS",
    "TILE_ELEMENTS",
    "ChannelView",
    "Tiling",
    "cdiv",
    "channel_view",
    "choose_single_program",
    "choose_tiling",
    "next_power_of_2",
    "restore_layout",
    "statistics_vector",
    "use_single_program",
    "working_tensor",
]

#: Elements in one streaming tile (BLOCK_S x BLOCK_C). 4096 float32 values are 16 KiB,
#: 32 per thread at NUM_WARPS = 4: enough independent loads in flight per thread to
#: hide DRAM latency, few enough registers that several programs share an SM (the
#: same budget Triton's fused layer-norm tutorial settles on for its row block).
TILE_ELEMENTS = 4096

#: Channels per tile in channels-last layout: 64 contiguous channels are 256 bytes of
#: float32 / 128 bytes of float16 per row, i.e. whole 128-byte memory transactions.
CHANNELS_LAST_BLOCK_C = 64

#: Tiles one program of a reduction kernel streams through before it writes its
#: partial statistics. Each program then covers up to 32K elements (128 KiB float32),
#: which keeps the number of partials (and so the combine step) small while a
#: ResNet-50 layer at batch 32 still yields hundreds of programs to fill an H100's SMs.
CHUNKS_PER_PROGRAM = 8

#: Partials merged per step of the combine kernels ([COMBINE_BLOCK_P, CHANNEL_BLOCK]
#: tile of float32 = 8 KiB: one coalesced load per array and step).
COMBINE_BLOCK_P = 64

#: Channels per program in the per-channel (combine / update) kernels; (C,) vectors
#: are contiguous, 32 float32 = one 128-byte transaction.
CHANNEL_BLOCK = 32

#: Largest n = N · prod(*) (elements per channel) for which one program per channel
#: block may run all passes (``use_single_program``): at most two tiles of 4096 rows,
#: so a program streams ≤ 8K elements per channel twice.
SINGLE_PROGRAM_MAX_COUNT = 2 * TILE_ELEMENTS

#: Largest tensor (elements) for the single-program path. 2²⁰ float32 are 4 MiB, about
#: 1.3 µs per pass at an H100's 3.35 TB/s: the same order as one kernel launch, so the
#: three-kernel path would be launch-bound. Larger tensors need its grid parallelism
#: (one program per channel block is C / BLOCK_C programs, too few to fill 132 SMs).
#: ResNet-50 at 224²: batch 1 every layer but conv1, batch 8 the last stage, go single-program.
SINGLE_PROGRAM_MAX_ELEMENTS = 2**20

#: Warps per program of every kernel (see TILE_ELEMENTS).
NUM_WARPS = 4

#: The kernels index with 32-bit offsets; larger tensors must take the reference.
MAX_ELEMENTS = 2**31 - 1

#: The three-kernel path's grids (:meth:`Tiling.reduce_grid`, :meth:`Tiling.stream_grid`) put the channel blocks
#: on CUDA's grid axis y, whose limit is 65535; a block holds one channel at the least (channels-first with more
#: than 2048 positions), so up to 65535 channels always fit. More take the reference: a launch past the limit fails
#: on a GPU ("invalid argument") and passes in Triton's interpreter, which has no such limit.
MAX_CHANNELS = 65535


@dataclass(frozen=True)
class ChannelView:
    """An (N', C, S') strided view of ``x: (N, C, *)`` for the kernels.

    ``samples`` (N') x ``rows`` (S') elements per channel, ``count = N' S' = N prod(*)``.
    ``stride_*`` are element strides of sample, channel and row.
    """

    samples: int
    channels: int
    rows: int
    stride_sample: int
    stride_channel: int
    stride_row: int

    @property
    def count(self) -> int:
        """Elements per channel, n = N · prod(*)."""
        return self.samples * self.rows


@dataclass(frozen=True)
class Tiling:
    """Block sizes and grids for one ChannelView.

    Streaming kernels (normalize, grad_input) run one [block_rows, block_channels]
    tile per program on ``stream_grid``; reduction kernels run ``chunks_per_program``
    such tiles per program on ``reduce_grid`` and write one partial per program and
    channel (``num_partials`` of them, ``programs_per_sample`` per sample, each over
    ``rows_per_program`` rows).
    """

    block_rows: int
    block_channels: int
    chunks_per_program: int
    programs_per_sample: int
    channel_blocks: int
    row_blocks_per_sample: int

    @property
    def rows_per_program(self) -> int:
        return self.block_rows * self.chunks_per_program

    def num_partials(self, view: ChannelView) -> int:
        return view.samples * self.programs_per_sample

    def reduce_grid(self, view: ChannelView) -> tuple[int, int]:
        return (self.num_partials(view), self.channel_blocks)

    def stream_grid(self, view: ChannelView) -> tuple[int, int]:
        return (view.samples * self.row_blocks_per_sample, self.channel_blocks)


def _is_standard_layout(x: Tensor) -> bool:
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def working_tensor(x: Tensor, name: str = "x") -> Tensor:
    """``x`` itself when it is channels-first or channels-last dense, else a contiguous copy.

    Raises BKNInputError for rank < 2, empty tensors, or more than MAX_ELEMENTS elements.
    """
    if x.dim() < 2:
        raise BKNInputError(f"BKN Triton kernel: {name} must have shape (N, C, *), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise BKNInputError(f"BKN Triton kernel: {name} is empty (shape {tuple(x.shape)}); pass a non-empty batch")
    if x.numel() > MAX_ELEMENTS:
        raise BKNInputError(
            f"BKN Triton kernel: {name} has {x.numel()} elements, more than the kernels' 32-bit indexing allows "
            f"({MAX_ELEMENTS}); split the batch or run the reference (bkn_export.functional)"
        )
    return x if _is_standard_layout(x) else x.contiguous()


def restore_layout(result: Tensor, original: Tensor, working: Tensor) -> Tensor:
    """``result`` (computed with the strides of ``working``) in the layout of BatchNorm's output for ``original``,
    ``suggest_memory_format(original)``, which is what the ops' fake implementations promise
    (:func:`bkn_export.ops.laid_out`; one copy, only for unusual layouts)."""
    if working is original:
        return result
    out = torch.empty_like(original, memory_format=suggest_memory_format(original))
    if out.stride() == result.stride():
        return result
    return out.copy_(result)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the dispatch when ``t`` already has it (the common case: a host µs or two each)."""
    return t if t.dtype == dtype else t.to(dtype)


def statistics_vector(t: Tensor, channels: int, name: str) -> Tensor:
    """A per-channel (C,) input as the contiguous float32 vector the kernels read."""
    if t.shape != (channels,):
        raise BKNInputError(
            f"BKN Triton kernel: {name} must have shape ({channels},) to match the input's channels, "
            f"got {tuple(t.shape)}"
        )
    if t.dtype == torch.float32 and t.is_contiguous():  # the common case: no dispatch (a host µs or two each)
        return t
    return t.to(torch.float32).contiguous()


def channel_view(x: Tensor) -> ChannelView:
    """The (N', C, S') view of a tensor returned by :func:`working_tensor`.

    Sample and row merge into one row index (N' = 1) whenever their strides allow it:
    channels-last layouts, C == 1, and inputs without spatial dims (N, C).
    """
    samples, channels = x.shape[0], x.shape[1]
    rows = x.numel() // (samples * channels)
    stride_sample, stride_channel, stride_row = x.view(samples, channels, rows).stride()
    if rows == 1:
        return ChannelView(1, channels, samples, 0, stride_channel, stride_sample)
    if samples == 1 or stride_sample == rows * stride_row:
        return ChannelView(1, channels, samples * rows, 0, stride_channel, stride_row)
    return ChannelView(samples, channels, rows, stride_sample, stride_channel, stride_row)


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def cdiv(numerator: int, denominator: int) -> int:
    """⌈numerator / denominator⌉ for a positive denominator: ``triton.cdiv`` for host code. Triton 3.9's is a
    ``constexpr_function``, whose wrapper costs about 1.9 µs per host call on the CPU machine (against 0.03 µs
    for the arithmetic), and the launchers call it a few times per launch."""
    return (numerator + denominator - 1) // denominator


def next_power_of_2(value: int) -> int:
    """``triton.next_power_of_2`` for host code (same bit steps and results, 0 for 0), without its
    ``constexpr_function`` wrapper (see :func:`cdiv`)."""
    value -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        value |= value >> shift
    return value + 1


def choose_tiling(view: ChannelView) -> Tiling:
    """Tile shape with the contiguous dimension as its long side (see module docstring)."""
    if view.stride_row == 1 and view.rows > 1:  # channels-first: rows contiguous
        block_rows = min(_next_power_of_2(view.rows), TILE_ELEMENTS)
        block_channels = min(_next_power_of_2(view.channels), max(1, TILE_ELEMENTS // block_rows))
    else:  # channels contiguous (channels-last, or (N, C) inputs)
        block_channels = min(_next_power_of_2(view.channels), CHANNELS_LAST_BLOCK_C)
        block_rows = min(_next_power_of_2(view.rows), TILE_ELEMENTS // block_channels)
    row_blocks = -(-view.rows // block_rows)
    chunks = min(row_blocks, CHUNKS_PER_PROGRAM)
    rows_per_program = block_rows * chunks
    return Tiling(
        block_rows=block_rows,
        block_channels=block_channels,
        chunks_per_program=chunks,
        programs_per_sample=-(-view.rows // rows_per_program),
        channel_blocks=-(-view.channels // block_channels),
        row_blocks_per_sample=row_blocks,
    )


def use_single_program(view: ChannelView, fallback_ratio: float) -> bool:
    """Whether forward and backward run as one kernel (one program per channel block).

    Only without the fallback rule, which needs the batch variance of *all* channels
    before any channel can be updated (a grid-wide dependency).
    """
    return (
        fallback_ratio <= 0
        and view.count <= SINGLE_PROGRAM_MAX_COUNT
        and view.count * view.channels <= SINGLE_PROGRAM_MAX_ELEMENTS
    )


def choose_single_program(view: ChannelView, fallback_ratio: float, requested: bool | None) -> bool:
    """``requested`` if given (True is refused with the fallback rule), else :func:`use_single_program`."""
    if requested is None:
        return use_single_program(view, fallback_ratio)
    if requested and fallback_ratio > 0:
        raise BKNInputError(
            "BKN Triton kernel: the single-program path cannot apply the fallback rule (it needs every "
            "channel's batch variance first); pass single_program=None or fallback_ratio=0"
        )
    return requested
