"""Triton twins of the C kernels ``affine_moments`` / ``affine_moments_backward`` (``native/csrc/affine.c``).

Moments of a conv / linear output pooled over positions, for CUDA tensors: the same arguments as the
``native.call`` sites of :class:`bkn_export.chain.fast._AffineMoments`, the same formulas, in double.
W: (C_out, B, K) contiguous (B the inputs per group, K the taps); μ, σ²: (groups B,); f: (K,) and
H: (K, K) the coverage tables, or both None. Row o reads the inputs of its group g = o / (C_out / groups)::

    T[o,t] = Σ_i W[o,i,t] μ_i                 S[o,i] = Σ_t W[o,i,t]² f_t
    M_o = Σ_t T[o,t] f_t                      V_o = Σ_i S[o,i] σ²_i + max(spread_o, 0)
    spread_o = Σ_t (T H)[o,t] T[o,t] − M_o²

Without coverage tables f = 1 and V has no spread term (as in the reference). Backward, with
∂V' = ∂V where spread_o ≥ 0 (else 0; ∂V where there is no spread term)::

    gT[o,t] = (∂M_o − 2 ∂V'_o M_o) f_t + 2 ∂V'_o (T H)[o,t]         (∂M_o without coverage tables)
    ∂W[o,i,t] = gT[o,t] μ_i + 2 ∂V_o σ²_i f_t W[o,i,t]
    ∂μ_{gB+i} = Σ_{o∈g, t} gT[o,t] W[o,i,t]     ∂σ²_{gB+i} = Σ_{o∈g} ∂V_o S[o,i]

Kernels, read top to bottom. A tile is (BLOCK_O, BLOCK_I, BLOCK_T): row lanes × inputs × taps, the lanes filling
what a row's inputs and taps leave of TILE_ELEMENTS (many rows at once for a depthwise conv or a small Linear):

* ``_affine_forward_kernel`` (grid: C_out / BLOCK_O): each program streams its rows' W (T and Σ_i W² σ² per tap
  in registers), stores T in ``taps``, then reads T back (after a block barrier) for M, T H and the spread.
  **One launch.**
* ``_affine_backward_kernel``: recomputes M, T H, the spread and gT per row from ``taps`` and the tables,
  writes ∂W, and sums ∂μ, ∂σ² over rows in registers. Grid (groups × row chunks, input blocks): a program
  takes a chunk of one group's rows, BLOCK_O at a time, and one block of its inputs, and writes its sums as one
  partial per chunk. With several groups whose rows fit one chunk and inputs one tile (depthwise and small
  grouped convs: ``ACROSS_GROUPS``), the lanes are groups instead, each stepping through all its rows, and
  the sums are complete.
* ``_affine_input_gradient_kernel`` (grid: input blocks) adds each input's partials in chunk order (a fixed
  order: deterministic, no atomics); not launched where there is one chunk per group.
  **Backward: one launch (one chunk per group), else two.**

Numerics: every sum and product runs in float64 for float32 tensors too, as the C kernel does. Two of the
formulas cancel where double keeps digits float32 would lose: spread = T H Tᵀ − M² (H ≈ f fᵀ when most
positions see every tap, so both terms are close) and gT's ∂V' ((T H)_t − M f_t); and T is stored in the
float64 ``taps`` buffer the caller passes. The W passes should be memory-bound on sm_90 (a few double
operations per weight element each way against 4-8 bytes moved; double runs at half float32's rate there), so
double should cost little there (not measured: no GPU yet); on a GPU with slow double arithmetic it would cost
more. The border (M, T H, spread) is O(K²) per row, recomputed backward as the C kernel does. Results round
once to the tensors' dtype. The sums run in another order than the C kernel's (tiles, tree reductions, fused
multiply-adds when compiled), so in float64 they agree with it to rounding, in float32 to one unit in the last
place (tests/test_kernels_affine_moments.py).

Host side: the launchers read only shapes, dtypes and the CPU ``parameters`` tensor ([B, K, groups],
``native.parameters``; read with ``.tolist()``, no device synchronisation; a parameters tensor on the device is
not read: B, K and groups then come from the shapes). Coverage tables on the CPU while the data is on the device
are copied there once and cached. No tensor value on the device is read on the host, so a train step stays
capturable in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from bkn_export.errors import BKNInputError
from bkn_export.kernels.layout import MAX_ELEMENTS, cdiv, next_power_of_2

__all__ = ["LAUNCHERS", "LAUNCHES", "affine_moments", "affine_moments_backward"]

#: Elements in one (BLOCK_O, BLOCK_I, BLOCK_T) tile. Held in float64, 1024 values are 8 per thread at 4 warps,
#: 16 registers per tile-shaped value; the backward keeps about ten such values live (W, ∂W, μ, σ², gT, the
#: sums). 2048 took 255 registers and spilled in the depthwise and grouped 3×3 backward (ptxas -v for sm_90);
#: 1024 spilled nowhere (3×3 convs of 64 and 256, depthwise 3×3 / 5×5 of 960, Linear 2048 → 1000, a padded
#: 1×1, 7×7×7, a 32-group 3×3; at most 245 registers, in the depthwise backward).
TILE_ELEMENTS = 1024
#: The most taps in one block of the tile (K = 343 takes six blocks of 64).
MAX_BLOCK_T = 64
#: Backward: a program's rows times K is at least this many weight elements per input, so that the partial
#: sums (two float64 values per input per chunk of rows) stay at most 1/16 of W's float32 bytes.
ELEMENTS_PER_PARTIAL = 64
#: At least this many rows per backward program (a 3×3 conv's 64 // 9 = 7 rounds up here).
MIN_ROWS_PER_PROGRAM = 8
#: Inputs per program of the kernel that adds the partials.
REDUCE_BLOCK = 256

_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- kernels
#
# Tiles are (BLOCK_O, BLOCK_I, BLOCK_T): row lanes × inputs × taps. W[o, i, t] is at (o B + i) K + t.


@triton.jit
def _mixed_taps(
    taps_ptr,
    rows,
    row_mask,
    pairs_ptr,
    K,
    t,
    t_mask,
    BLOCK_O: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """(T H)[o, t] = Σ_u T[o,u] H[u,t] for the row lanes ``rows`` (BLOCK_O,) and taps ``t`` (BLOCK_T,), from T in
    memory (a masked lane's T reads as 0)."""
    mixed = tl.zeros([BLOCK_O, BLOCK_T], tl.float64)
    for u0 in range(0, K, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        u_mask = u < K
        taps_mask = row_mask[:, None] & u_mask[None, :]
        taps_u = tl.load(taps_ptr + rows[:, None] * K + u[None, :], mask=taps_mask, other=0.0).to(tl.float64)
        table_mask = u_mask[:, None] & t_mask[None, :]
        pairs = tl.load(pairs_ptr + u[:, None] * K + t[None, :], mask=table_mask, other=0.0).to(tl.float64)
        terms = taps_u[:, :, None] * pairs[None, :, :]
        mixed += tl.sum(tl.where(table_mask[None, :, :], terms, 0.0), axis=1)  # a masked lane may hold inf · 0
    return mixed


@triton.jit
def _rows_border(
    taps_ptr,
    rows,
    row_mask,
    fraction_ptr,
    pairs_ptr,
    K,
    HAS_TABLES: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """(M_o, spread_o) of the row lanes from T in memory (spread 0 without coverage tables)."""
    mean_lanes = tl.zeros([BLOCK_O, BLOCK_T], tl.float64)
    quadratic_lanes = tl.zeros([BLOCK_O, BLOCK_T], tl.float64)
    for t0 in range(0, K, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < K
        mask = row_mask[:, None] & t_mask[None, :]
        taps = tl.load(taps_ptr + rows[:, None] * K + t[None, :], mask=mask, other=0.0).to(tl.float64)
        if HAS_TABLES:
            fraction = tl.load(fraction_ptr + t, mask=t_mask, other=0.0).to(tl.float64)
            mean_lanes += taps * fraction[None, :]
            mixed = _mixed_taps(taps_ptr, rows, row_mask, pairs_ptr, K, t, t_mask, BLOCK_O, BLOCK_U, BLOCK_T)
            quadratic_lanes += tl.where(mask, mixed * taps, 0.0)
        else:
            mean_lanes += taps
    mean = tl.sum(mean_lanes, axis=1)
    spread = tl.sum(quadratic_lanes, axis=1)
    if HAS_TABLES:
        spread = spread - mean * mean
    return mean, spread


@triton.jit
def _affine_forward_rows(
    weight_ptr,
    mean_ptr,
    variance_ptr,
    fraction_ptr,
    pairs_ptr,
    taps_ptr,
    rows_total,
    B,
    K,
    per_group,
    HAS_TABLES: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The body of :func:`_affine_forward_kernel` (also run by ``kernels.path_moments``): T[o, :] into ``taps``
    for the rows o of this program's BLOCK_O lanes (any groups); returns (rows, row_mask, M, V) in float64."""
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask = rows < rows_total
    inputs = (rows // per_group) * B  # the first input of each lane's group
    square_lanes = tl.zeros([BLOCK_O, BLOCK_T], tl.float64)  # f_t Σ_i W[o,i,t]² σ²_i
    for t0 in range(0, K, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < K
        tap_sums = tl.zeros([BLOCK_O, BLOCK_I, BLOCK_T], tl.float64)
        square_sums = tl.zeros([BLOCK_O, BLOCK_I, BLOCK_T], tl.float64)
        for i0 in range(0, B, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            lane_mask = row_mask[:, None] & (i < B)[None, :]
            mu = tl.load(mean_ptr + inputs[:, None] + i[None, :], mask=lane_mask, other=0.0).to(tl.float64)
            s2 = tl.load(variance_ptr + inputs[:, None] + i[None, :], mask=lane_mask, other=0.0).to(tl.float64)
            mask = lane_mask[:, :, None] & t_mask[None, None, :]
            offsets = (rows[:, None, None] * B + i[None, :, None]) * K + t[None, None, :]
            w = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
            tap_sums += w * mu[:, :, None]
            square_sums += w * w * s2[:, :, None]
        taps = tl.sum(tap_sums, axis=1)
        squares = tl.sum(square_sums, axis=1)
        if HAS_TABLES:
            fraction = tl.load(fraction_ptr + t, mask=t_mask, other=0.0).to(tl.float64)
            squares = squares * fraction[None, :]
        square_lanes += tl.where(t_mask[None, :], squares, 0.0)  # a masked tap may hold 0 · inf
        store_mask = row_mask[:, None] & t_mask[None, :]
        tl.store(taps_ptr + rows[:, None] * K + t[None, :], taps.to(taps_ptr.dtype.element_ty), mask=store_mask)
    tl.debug_barrier()  # T stored by every thread of the program before any reads it back
    mean, spread = _rows_border(taps_ptr, rows, row_mask, fraction_ptr, pairs_ptr, K, HAS_TABLES, BLOCK_O, BLOCK_U,
                                BLOCK_T)  # fmt: skip
    variance = tl.sum(square_lanes, axis=1) + tl.where(spread < 0.0, 0.0, spread)  # NaN stays NaN, as in C
    return rows, row_mask, mean, variance


@triton.jit
def _affine_forward_kernel(
    weight_ptr,
    mean_ptr,
    variance_ptr,
    fraction_ptr,
    pairs_ptr,
    taps_ptr,
    out_mean_ptr,
    out_variance_ptr,
    rows_total,
    B,
    K,
    per_group,
    HAS_TABLES: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Rows o of this program's BLOCK_O lanes (any groups): T[o, :] into ``taps``, then M_o and V_o."""
    rows, row_mask, mean, variance = _affine_forward_rows(
        weight_ptr, mean_ptr, variance_ptr, fraction_ptr, pairs_ptr, taps_ptr, rows_total, B, K, per_group,
        HAS_TABLES, BLOCK_O, BLOCK_I, BLOCK_U, BLOCK_T,
    )  # fmt: skip
    tl.store(out_mean_ptr + rows, mean.to(out_mean_ptr.dtype.element_ty), mask=row_mask)
    tl.store(out_variance_ptr + rows, variance.to(out_variance_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _affine_backward_program(
    weight_ptr,
    mean_ptr,
    variance_ptr,
    fraction_ptr,
    pairs_ptr,
    taps_ptr,
    grad_mean_ptr,
    grad_variance_ptr,
    grad_weight_ptr,
    input_mean_ptr,
    input_variance_ptr,
    B,
    K,
    groups,
    per_group,
    chunks,
    rows_per_program,
    inputs_total,
    HAS_TABLES: tl.constexpr,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    ACROSS_GROUPS: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """∂W of some rows, and ∂μ, ∂σ² of their inputs summed over those rows.

    ACROSS_GROUPS: the lanes are BLOCK_O groups (all their inputs in one block), each stepping through all its
    rows; ∂μ, ∂σ² are complete and stored. Else the program takes rows [first, first + rows_per_program) of one
    group g, BLOCK_O lanes at a time, and inputs of block ``program_id(1)``; it stores the sums over its rows at
    ``input_*[chunk, g B + i]`` (the outputs themselves where chunks = 1, else float64 partials)."""
    lanes = tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i < B
    if ACROSS_GROUPS:
        lane_groups = tl.program_id(0) * BLOCK_O + lanes
        group_mask = lane_groups < groups
        first_rows = lane_groups * per_group
        steps = per_group
        step_rows = 1
        chunk = 0
        rows_here = per_group
    else:
        g = tl.program_id(0) // chunks
        chunk = tl.program_id(0) % chunks
        rows_here = tl.minimum(rows_per_program, per_group - chunk * rows_per_program)
        lane_groups = tl.zeros([BLOCK_O], tl.int32) + g
        group_mask = lanes >= 0
        first_rows = g * per_group + chunk * rows_per_program + lanes
        steps = tl.cdiv(rows_here, BLOCK_O)
        step_rows = BLOCK_O
    inputs = lane_groups[:, None] * B + i[None, :]
    input_mask = group_mask[:, None] & i_mask[None, :]
    mu = tl.load(mean_ptr + inputs, mask=input_mask, other=0.0).to(tl.float64)
    s2 = tl.load(variance_ptr + inputs, mask=input_mask, other=0.0).to(tl.float64)
    grad_mu = tl.zeros([BLOCK_O, BLOCK_I], tl.float64)
    grad_s2 = tl.zeros([BLOCK_O, BLOCK_I], tl.float64)
    for step in range(0, steps):
        rows = first_rows + step * step_rows
        if ACROSS_GROUPS:
            row_mask = group_mask
        else:
            row_mask = step * BLOCK_O + lanes < rows_here
        if HAS_GRAD_MEAN:
            gm = tl.load(grad_mean_ptr + rows, mask=row_mask, other=0.0).to(tl.float64)
        else:
            gm = tl.zeros([BLOCK_O], tl.float64)
        if HAS_GRAD_VARIANCE:
            gv = tl.load(grad_variance_ptr + rows, mask=row_mask, other=0.0).to(tl.float64)
        else:
            gv = tl.zeros([BLOCK_O], tl.float64)
        if HAS_TABLES:
            m, spread = _rows_border(taps_ptr, rows, row_mask, fraction_ptr, pairs_ptr, K, True, BLOCK_O, BLOCK_U,
                                     BLOCK_T)  # fmt: skip
            gv_spread = tl.where(spread >= 0.0, gv, 0.0)  # a NaN spread: 0, as in C
            base = gm - 2.0 * gv_spread * m
        for t0 in range(0, K, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < K
            if HAS_TABLES:
                fraction = tl.load(fraction_ptr + t, mask=t_mask, other=0.0).to(tl.float64)
                mixed = _mixed_taps(taps_ptr, rows, row_mask, pairs_ptr, K, t, t_mask, BLOCK_O, BLOCK_U, BLOCK_T)
                grad_taps = base[:, None] * fraction[None, :] + 2.0 * gv_spread[:, None] * mixed
            else:
                fraction = tl.where(t_mask, 1.0, 0.0).to(tl.float64)
                grad_taps = gm[:, None] + tl.zeros([BLOCK_O, BLOCK_T], tl.float64)
            grad_taps = tl.where(row_mask[:, None] & t_mask[None, :], grad_taps, 0.0)
            scaled = 2.0 * gv[:, None] * fraction[None, :]
            mask = (row_mask[:, None] & i_mask[None, :])[:, :, None] & t_mask[None, None, :]
            offsets = (rows[:, None, None] * B + i[None, :, None]) * K + t[None, None, :]
            w = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
            grad_w = grad_taps[:, None, :] * mu[:, :, None] + scaled[:, None, :] * s2[:, :, None] * w
            tl.store(grad_weight_ptr + offsets, grad_w.to(grad_weight_ptr.dtype.element_ty), mask=mask)
            grad_mu += tl.sum(grad_taps[:, None, :] * w, axis=2)
            grad_s2 += gv[:, None] * tl.sum(w * w * fraction[None, None, :], axis=2)
    if ACROSS_GROUPS:
        out = inputs
        out_mask = input_mask
        sum_mu = grad_mu
        sum_s2 = grad_s2
    else:
        out = chunk * inputs_total + g * B + i
        out_mask = i_mask
        sum_mu = tl.sum(grad_mu, axis=0)
        sum_s2 = tl.sum(grad_s2, axis=0)
    tl.store(input_mean_ptr + out, sum_mu.to(input_mean_ptr.dtype.element_ty), mask=out_mask)
    tl.store(input_variance_ptr + out, sum_s2.to(input_variance_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _affine_backward_kernel(
    weight_ptr,
    mean_ptr,
    variance_ptr,
    fraction_ptr,
    pairs_ptr,
    taps_ptr,
    grad_mean_ptr,
    grad_variance_ptr,
    grad_weight_ptr,
    input_mean_ptr,
    input_variance_ptr,
    B,
    K,
    groups,
    per_group,
    chunks,
    rows_per_program,
    inputs_total,
    HAS_TABLES: tl.constexpr,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    ACROSS_GROUPS: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """∂W of some rows and the sums of ∂μ, ∂σ² over them: :func:`_affine_backward_program` (the body, also run by
    ``kernels.path_moments``)."""
    _affine_backward_program(
        weight_ptr, mean_ptr, variance_ptr, fraction_ptr, pairs_ptr, taps_ptr, grad_mean_ptr, grad_variance_ptr,
        grad_weight_ptr, input_mean_ptr, input_variance_ptr, B, K, groups, per_group, chunks, rows_per_program,
        inputs_total, HAS_TABLES, HAS_GRAD_MEAN, HAS_GRAD_VARIANCE, ACROSS_GROUPS, BLOCK_O, BLOCK_I, BLOCK_U, BLOCK_T,
    )  # fmt: skip


@triton.jit
def _affine_input_gradient_kernel(
    partial_mean_ptr,
    partial_variance_ptr,
    input_mean_ptr,
    input_variance_ptr,
    inputs_total,
    chunks,
    BLOCK: tl.constexpr,
):
    """∂μ_j, ∂σ²_j = the sums of the partials [c, j] over the chunks c, in chunk order."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < inputs_total
    grad_mu = tl.zeros([BLOCK], tl.float64)
    grad_s2 = tl.zeros([BLOCK], tl.float64)
    for c in range(0, chunks):
        grad_mu += tl.load(partial_mean_ptr + c * inputs_total + j, mask=mask, other=0.0)
        grad_s2 += tl.load(partial_variance_ptr + c * inputs_total + j, mask=mask, other=0.0)
    tl.store(input_mean_ptr + j, grad_mu.to(input_mean_ptr.dtype.element_ty), mask=mask)
    tl.store(input_variance_ptr + j, grad_s2.to(input_variance_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host side


class _Geometry(NamedTuple):
    """A call's shape: C_out rows of B inputs and K taps each, in ``groups`` groups."""

    rows: int
    inputs: int
    taps: int
    groups: int

    @property
    def per_group(self) -> int:
        return self.rows // self.groups

    @property
    def block_t(self) -> int:
        return min(next_power_of_2(self.taps), MAX_BLOCK_T)

    @property
    def block_i(self) -> int:
        """All of a row's inputs where they fit a tile (with its taps), else as many as fit."""
        return max(1, min(next_power_of_2(max(self.inputs, 1)), TILE_ELEMENTS // self.block_t))


class _Tiles(NamedTuple):
    """Block sizes of one launch: BLOCK_O row lanes × BLOCK_I inputs × BLOCK_T taps ≤ TILE_ELEMENTS, and BLOCK_U
    taps of H at a time in the border (BLOCK_O × BLOCK_U × BLOCK_T ≤ TILE_ELEMENTS)."""

    block_o: int
    block_i: int
    block_u: int
    block_t: int

    @classmethod
    def of(cls, geometry: _Geometry, lanes: int) -> _Tiles:
        """Tiles for ``lanes`` row lanes in all (rows or groups): as many lanes as fill the tile."""
        block_t, block_i = geometry.block_t, geometry.block_i
        block_o = max(1, min(TILE_ELEMENTS // (block_i * block_t), next_power_of_2(max(lanes, 1))))
        block_u = max(1, min(block_t, TILE_ELEMENTS // (block_o * block_t)))
        return cls(block_o, block_i, block_u, block_t)

    @property
    def num_warps(self) -> int:
        """One warp per 256 tile elements (8 per thread in a full tile), 1 to 4."""
        return max(1, min(4, self.block_o * self.block_i * self.block_t // 256))

    def constants(self) -> dict[str, int]:
        return {
            "BLOCK_O": self.block_o,
            "BLOCK_I": self.block_i,
            "BLOCK_U": self.block_u,
            "BLOCK_T": self.block_t,
            "num_warps": self.num_warps,
        }


def _check_data(name: str, weight: Tensor, **tensors: Tensor | None) -> None:
    """Every data tensor given is contiguous and on W's device (the kernels index them flat)."""
    for label, tensor in {"weight": weight, **tensors}.items():
        if tensor is None:
            continue
        if tensor.device != weight.device or not tensor.is_contiguous():
            raise BKNInputError(
                f"{name}: {label} must be a contiguous tensor on {weight.device} (got {tensor.device}, strides "
                f"{tensor.stride()}); pass .contiguous() tensors on one device"
            )


def _geometry(
    name: str,
    weight: Tensor,
    mean: Tensor,
    variance: Tensor,
    fraction: Tensor | None,
    pairs: Tensor | None,
    parameters: Tensor,
    count: int | None,
) -> _Geometry:
    """(C_out, B, K, groups) of a call, checked against the tensors (shapes and dtypes only: nothing read on
    the device). count: C_out (the ``native.call`` count; default W's first dim)."""
    rows = weight.shape[0] if count is None else int(count)
    if parameters.device.type == "cpu":
        inputs, taps, groups = (int(v) for v in parameters.tolist())
    else:  # not read on the host: B from W's second dim, K from the rest (the caller's (C_out, B, K) view)
        inputs = weight.shape[1] if weight.dim() > 1 else 1
        taps = weight.numel() // max(1, rows * inputs)
        groups = mean.numel() // inputs if inputs else 1
    if weight.dtype not in _DTYPES or mean.dtype != weight.dtype or variance.dtype != weight.dtype:
        raise BKNInputError(
            f"{name}: weight, mean and variance must share one dtype, float32 or float64; got {weight.dtype}, "
            f"{mean.dtype}, {variance.dtype}"
        )
    if groups < 1 or inputs < 0 or taps < 1 or rows % groups:
        raise BKNInputError(f"{name}: parameters [B, K, groups] = [{inputs}, {taps}, {groups}] do not fit {rows} rows")
    if weight.numel() != rows * inputs * taps or mean.numel() != groups * inputs or variance.numel() != mean.numel():
        raise BKNInputError(
            f"{name}: weight {tuple(weight.shape)}, mean {tuple(mean.shape)}, variance {tuple(variance.shape)} do "
            f"not fit C_out = {rows}, B = {inputs}, K = {taps}, groups = {groups}; pass W as (C_out, B, K)"
        )
    if weight.numel() > MAX_ELEMENTS:
        raise BKNInputError(f"{name}: {weight.numel()} weight elements; the kernels index with 32 bits")
    if (fraction is None) != (pairs is None):
        raise BKNInputError(f"{name}: pass both coverage tables (fraction, pairs) or neither")
    if fraction is not None and pairs is not None:
        if fraction.numel() != taps or pairs.numel() != taps * taps:
            raise BKNInputError(f"{name}: coverage tables must be ({taps},) and ({taps}, {taps}) for K = {taps}")
    return _Geometry(rows, inputs, taps, groups)


#: Coverage tables copied to the data's device: (address, dtype, shape, strides, target dtype, device) →
#: (source, its version counter then, copy). The source is kept so that its memory is not reused by another table
#: while the entry lives; a view of it (another tensor object, same memory) hits the entry, an in-place change of
#: it (a new version) does not. Bounded: emptied when full.
_DEVICE_TABLES: dict[tuple[object, ...], tuple[Tensor, int, Tensor]] = {}
_DEVICE_TABLES_SIZE = 256


def _on_device(table: Tensor, like: Tensor) -> Tensor:
    """``table`` on ``like``'s device and dtype, contiguous: itself when it already is, else a cached copy.

    Coverage tables are constants of a layer's geometry, built once per geometry on the CPU or on the weight's
    device; a copy is made on the first call (so outside any CUDA graph capture) and reused after. An inference
    tensor (built under ``torch.inference_mode``) has no version counter: it is copied on every call."""
    if table.device == like.device and table.dtype == like.dtype and table.is_contiguous():
        return table
    if table.is_inference():  # no version counter to tell an in-place change by: not cached
        return table.detach().to(device=like.device, dtype=like.dtype).contiguous()
    key = (table.data_ptr(), table.dtype, tuple(table.shape), table.stride(), like.dtype, like.device)
    found = _DEVICE_TABLES.get(key)
    if found is not None and found[0]._version == found[1]:
        return found[2]
    copy = table.detach().to(device=like.device, dtype=like.dtype).contiguous()
    if len(_DEVICE_TABLES) >= _DEVICE_TABLES_SIZE:
        _DEVICE_TABLES.clear()
    _DEVICE_TABLES[key] = (table, table._version, copy)
    return copy


def _tables(fraction: Tensor | None, pairs: Tensor | None, weight: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(f, H, whether given) as kernel arguments; W stands in for absent tables (never read)."""
    if fraction is None or pairs is None:
        return weight, weight, False
    return _on_device(fraction, weight), _on_device(pairs, weight), True


def affine_moments(
    weight: Tensor,
    mean: Tensor,
    variance: Tensor,
    fraction: Tensor | None,
    pairs: Tensor | None,
    parameters: Tensor,
    taps: Tensor,
    out_mean: Tensor,
    out_variance: Tensor,
    count: int | None = None,
) -> None:
    """M, V of C_out rows into ``out_mean``, ``out_variance`` (C_out,), and T into ``taps`` (C_out, K) (any float
    dtype; float64 keeps T as the C kernel does: the border and the backward read T back from it). One launch.

    weight: (C_out, B, K) contiguous; mean, variance: (groups B,); fraction (K,), pairs (K, K): the coverage
    tables or both None; parameters: float64 [B, K, groups]; count: C_out. Math: the module docstring."""
    geometry = _geometry("affine_moments", weight, mean, variance, fraction, pairs, parameters, count)
    _check_data("affine_moments", weight, mean=mean, variance=variance, taps=taps, out_mean=out_mean,
                out_variance=out_variance)  # fmt: skip
    if geometry.rows == 0:
        return
    f, h, has_tables = _tables(fraction, pairs, weight)
    tiles = _Tiles.of(geometry, geometry.rows)
    _affine_forward_kernel[(cdiv(geometry.rows, tiles.block_o),)](
        weight, mean, variance, f, h, taps, out_mean, out_variance, geometry.rows, geometry.inputs, geometry.taps,
        geometry.per_group, HAS_TABLES=has_tables, **tiles.constants(),
    )  # fmt: skip


def _rows_per_program(geometry: _Geometry) -> int:
    """Rows of one group that one backward program sums (before rounding to its lanes): at least
    MIN_ROWS_PER_PROGRAM, and ELEMENTS_PER_PARTIAL / K so that the partials stay small."""
    return max(MIN_ROWS_PER_PROGRAM, cdiv(ELEMENTS_PER_PARTIAL, geometry.taps))


def affine_moments_backward(
    weight: Tensor,
    mean: Tensor,
    variance: Tensor,
    fraction: Tensor | None,
    pairs: Tensor | None,
    parameters: Tensor,
    taps: Tensor,
    grad_mean: Tensor | None,
    grad_variance: Tensor | None,
    grad_weight: Tensor,
    grad_input_mean: Tensor,
    grad_input_variance: Tensor,
    count: int | None = None,
) -> None:
    """∂W into ``grad_weight`` (W's shape and dtype), ∂μ, ∂σ² into ``grad_input_mean``, ``grad_input_variance``
    ((groups B,), any float dtype: the sums stay in double until the store, so a buffer in the tensors' dtype
    holds bit for bit what a float64 buffer cast to it would), from T (``taps``, as the forward wrote it).

    grad_mean / grad_variance: (C_out,) or None (that output did not reach the loss: zero). Other arguments as
    :func:`affine_moments`. Launches: one where a group's rows fit one program (``_rows_per_program``; with
    several groups whose inputs fit one tile, as depthwise convs, the program's lanes are groups), else two (the
    second adds the partial sums of each chunk of rows, in chunk order)."""
    geometry = _geometry("affine_moments_backward", weight, mean, variance, fraction, pairs, parameters, count)
    _check_data(
        "affine_moments_backward", weight, mean=mean, variance=variance, taps=taps, grad_mean=grad_mean,
        grad_variance=grad_variance, grad_weight=grad_weight, grad_input_mean=grad_input_mean,
        grad_input_variance=grad_input_variance,
    )  # fmt: skip
    inputs_total = geometry.groups * geometry.inputs
    if geometry.rows == 0:  # no rows: the sums are empty (as C's zero fill)
        grad_input_mean.zero_()
        grad_input_variance.zero_()
        return
    if geometry.inputs == 0:
        return
    f, h, has_tables = _tables(fraction, pairs, weight)
    flags = {"HAS_TABLES": has_tables, "HAS_GRAD_MEAN": grad_mean is not None}
    flags["HAS_GRAD_VARIANCE"] = grad_variance is not None
    grads = (weight if grad_mean is None else grad_mean, weight if grad_variance is None else grad_variance)
    wanted_rows = _rows_per_program(geometry)
    if geometry.groups > 1 and geometry.inputs <= geometry.block_i and geometry.per_group <= wanted_rows:
        # Many small groups (depthwise convs): lanes are groups, each program sums all its groups' rows.
        across = _Tiles.of(geometry, geometry.groups)
        _affine_backward_kernel[(cdiv(geometry.groups, across.block_o), 1)](
            weight, mean, variance, f, h, taps, *grads, grad_weight, grad_input_mean, grad_input_variance,
            geometry.inputs, geometry.taps, geometry.groups, geometry.per_group, 1, geometry.per_group, inputs_total,
            ACROSS_GROUPS=True, **flags, **across.constants(),
        )  # fmt: skip
        return
    tiles = _Tiles.of(geometry, geometry.per_group)
    rows_per_program = min(cdiv(wanted_rows, tiles.block_o) * tiles.block_o, geometry.per_group)
    chunks = cdiv(geometry.per_group, rows_per_program)
    if chunks * inputs_total > MAX_ELEMENTS:
        raise BKNInputError(f"affine_moments_backward: {chunks * inputs_total} partial sums; 32-bit indexing")
    if chunks == 1:
        input_mean, input_variance = grad_input_mean, grad_input_variance
    else:
        partials = torch.empty((2, chunks, inputs_total), dtype=torch.float64, device=weight.device)
        input_mean, input_variance = partials[0], partials[1]
    grid = (geometry.groups * chunks, cdiv(geometry.inputs, tiles.block_i))
    _affine_backward_kernel[grid](
        weight, mean, variance, f, h, taps, *grads, grad_weight, input_mean, input_variance, geometry.inputs,
        geometry.taps, geometry.groups, geometry.per_group, chunks, rows_per_program, inputs_total,
        ACROSS_GROUPS=False, **flags, **tiles.constants(),
    )  # fmt: skip
    if chunks > 1:
        _affine_input_gradient_kernel[(cdiv(inputs_total, REDUCE_BLOCK),)](
            input_mean, input_variance, grad_input_mean, grad_input_variance, inputs_total, chunks,
            BLOCK=REDUCE_BLOCK, num_warps=4,
        )  # fmt: skip


#: The C kernel each launcher mirrors (``native.call`` names).
LAUNCHERS: dict[str, Callable[..., None]] = {
    "affine_moments": affine_moments,
    "affine_moments_backward": affine_moments_backward,
}
#: Kernels launched per call (the backward's at most: one where a group's rows and inputs fit one program).
LAUNCHES: dict[str, int] = {"affine_moments": 1, "affine_moments_backward": 2}
