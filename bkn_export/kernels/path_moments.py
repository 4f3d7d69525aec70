"""A prediction path's head in one Triton launch forward and two backward: the twins' stages, fused.

:class:`bkn_export.chain.path_moments._PathMoments` runs up to three stages, each its own Triton twin on CUDA
(three launches forward, about four backward)::

    v0 = γ² Σ / (Σ + ε)                      output_variance            (kernels.prior_moments; optional)
    (m1, v1) = moments of f(X), X ~ N(m0, v0)   relu / piecewise / Gauss–Hermite (kernels.elementwise_moments; optional)
    (M, V) = moments of W X, + b               affine_moments              (kernels.affine_moments; optional)

:func:`path_moments` computes the same sequence in **one launch**, :func:`path_moments_backward` its reverse in
**two**; :func:`path_moments_take` says which inputs they cover (the caller runs the stages otherwise).

Forward (``_path_forward_kernel``, the affine twin's grid: blocks of BLOCK_O output rows). Each program computes
v0 and (m1, v1) for the input channels its rows read — a contiguous range, all C_in for an ungrouped layer: the
stages are (C_in,)-sized and recomputed per program — and stores them in a float64 buffer (C_in,) shared by all
programs, then (after a block barrier) runs the affine twin's body (``affine_moments._affine_forward_rows``) on it
and adds the bias. Programs that write a channel write the same bits (the same float64 operations on the same
inputs), so the shared buffer holds the value whoever wrote it last: deterministic, no atomics. The program of
row block 0 also writes v0 (the node's third output) for every channel. Without an affine stage the programs are
blocks of channels and store (m1, v1) as the outputs.

Backward, two launches (deterministic, no atomics):

1. ``_path_rows_backward_kernel``: the affine backward's grid; each program recomputes (m1, v1) for its input
   channels into the shared buffer, then runs the affine twin's backward body
   (``affine_moments._affine_backward_program``): ∂W written, and its sums of ∂m1, ∂v1 over its rows written as
   float64 partials (chunks, C_in) (one chunk per group where a group's rows fit one program).
2. ``_path_inputs_backward_kernel``: per block of input channels, the partials summed in chunk order (the affine
   twin's ``_affine_input_gradient_kernel`` order), then the activation's backward (its forward recomputed from
   m0 and v0: the truncated moments, the per-node sigmoid / tanh bit for bit what the twins keep), ∂v0 +=
   ∂gaussian, and the output variance's backward.

Without an affine stage the backward is launch 2 alone, reading the output gradients.

Numerics: every stage's formulas are the twins' own device functions (``_relu_terms``, ``_hermite_kept``,
``_hermite_moments``, ``_piecewise_truncated``, ``_piecewise_combine``, the affine bodies), in float64 for float32
data too. The twins round v0, (m1, v1), ∂m1, ∂v1, ∂m0, ∂v0 to the data's dtype between stages; here they stay in
float64 and only the outputs round, once. So in float64 the results are the twin sequence's to rounding (the same
operations; the affine sums in the same tiles), and in float32 they are the float64 results rounded once, where
the sequence's are within a few float32 ulps of them (tests/test_kernels_path_moments.py). Launched with
``enable_fp_fusion=False`` as the elementwise and prior twins (whose exp and erfc splittings assume it); the
affine twin's sums are then not contracted into FMAs (a rounding difference).

Host side: the launchers read shapes, dtypes and the float64 CPU parameter tables (the affine [B, K, groups],
the piecewise / Gauss–Hermite headers, via the twins' own cached copies to the device); no tensor value on the
device, so a train step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from bkn_export.errors import BKNInputError
from bkn_export.kernels import affine_moments as _affine
from bkn_export.kernels import elementwise_moments as _elementwise
from bkn_export.kernels.affine_moments import _affine_backward_program, _affine_forward_rows
from bkn_export.kernels.elementwise_moments import (
    _hermite_gradients,
    _hermite_kept,
    _hermite_moments,
    _piecewise_combine,
    _piecewise_stein,
    _piecewise_truncated,
    _relu_terms,
    _std,
    _variance_floor,
)
from bkn_export.kernels.layout import MAX_ELEMENTS, cdiv, next_power_of_2

__all__ = ["LAUNCHES", "path_moments", "path_moments_backward", "path_moments_take"]

#: Kernels launched per call: forward 1, backward 2 (1 without an affine stage).
LAUNCHES: dict[str, int] = {"path_moments": 1, "path_moments_backward": 2}

#: Activation codes of the kernels (constexpr ACTIVATION).
_NONE, _RELU, _PIECEWISE, _SMOOTH = 0, 1, 2, 3
_ACTIVATIONS = {"relu": _RELU, "piecewise": _PIECEWISE, "smooth": _SMOOTH}
#: Channels per step of the stage loops without nodes or pieces (ReLU, none): 2 per thread at 4 warps.
STAGE_BLOCK = 256
#: The most taps the fused kernels take (the C kernels' limit, chain.fast._AFFINE_NATIVE_TAPS).
MAX_TAPS = 512
_DTYPES = (torch.float32, torch.float64)
_LAUNCH = {"enable_fp_fusion": False}
#: Warps of the launches over channels (the twins' own), against which the stage blocks are sized.
NUM_WARPS = 4


# --------------------------------------------------------------------------- device functions: the stages


@triton.jit
def _source_gaussian(
    mean_ptr,
    variance_ptr,
    source_weight_ptr,
    c,
    mask,
    eps,
    HAS_EPS: tl.constexpr,
    HAS_SOURCE_WEIGHT: tl.constexpr,
):
    """(m0, Σ, γ, v0) of channels ``c``: v0 = (γ γ)(Σ / (Σ + ε)) (prior_moments' output_variance) under HAS_EPS,
    else Σ itself; γ = 1 without a source weight."""
    m0 = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float64)
    s = tl.load(variance_ptr + c, mask=mask, other=1.0).to(tl.float64)
    g = tl.zeros_like(s) + 1.0
    v0 = s
    if HAS_EPS:
        v0 = s / (s + eps)
        if HAS_SOURCE_WEIGHT:
            g = tl.load(source_weight_ptr + c, mask=mask, other=1.0).to(tl.float64)
            v0 = (g * g) * v0
    return m0, s, g, v0


@triton.jit
def _piece_constants(table_ptr, PIECES: tl.constexpr, PIECE_BLOCK: tl.constexpr):
    """The piece table's (lo edges, hi edges, c0, c1, c2) as (1, PIECE_BLOCK) rows, and the pieces' mask."""
    pieces = tl.arange(0, PIECE_BLOCK)
    on_piece = pieces < PIECES
    lo_edge = tl.load(table_ptr + 2 + pieces, mask=on_piece, other=0.0)[None, :]
    hi_edge = tl.load(table_ptr + 3 + pieces, mask=on_piece, other=0.0)[None, :]
    c0 = tl.load(table_ptr + 3 + PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    c1 = tl.load(table_ptr + 3 + 2 * PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    c2 = tl.load(table_ptr + 3 + 3 * PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    return lo_edge, hi_edge, c0, c1, c2, on_piece[None, :]


@triton.jit
def _hermite_rule(table_ptr, NODES: tl.constexpr, NODE_BLOCK: tl.constexpr):
    """The rule's (points, weights) as (1, NODE_BLOCK) rows, and the nodes' mask."""
    nodes = tl.arange(0, NODE_BLOCK)
    points = tl.load(table_ptr + 2 + nodes, mask=nodes < NODES, other=0.0).to(tl.float64)[None, :]
    weights = tl.load(table_ptr + 2 + NODES + nodes, mask=nodes < NODES, other=0.0).to(tl.float64)[None, :]
    return points, weights, (nodes < NODES)[None, :]


@triton.jit
def _activation_forward(
    mean,
    variance,
    table_ptr,
    ACTIVATION: tl.constexpr,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    ORDER: tl.constexpr,
    SUB_BLOCK: tl.constexpr,
):
    """(E, Var) of f(X), X ~ N(mean, variance), per channel, as the activation's twin computes them (none: the
    input). NODES is the rule's nodes or the table's pieces; SUB_BLOCK its power of two."""
    if ACTIVATION == 1:
        _s, _pdf, _below, _above, out_mean, spread = _relu_terms(mean, variance)
        out_variance = tl.where(spread < 0.0, 0.0, spread)
    elif ACTIVATION == 2:
        lo_edge, hi_edge, c0, c1, c2, pieces_inside = _piece_constants(table_ptr, NODES, SUB_BLOCK)
        m = mean[:, None]
        s = _std(variance)[:, None]
        i0, i1, i2, i3, i4 = _piecewise_truncated(m, s, lo_edge, hi_edge, ORDER)
        out_mean, spread, _centred, _d1, _d2 = _piecewise_combine(
            m, s, c0, c1, c2, i0, i1, i2, i3, i4, pieces_inside, ORDER
        )
        out_variance = tl.where(spread < 0.0, 0.0, spread)
    elif ACTIVATION == 3:
        points, weights, nodes_inside = _hermite_rule(table_ptr, NODES, SUB_BLOCK)
        x = mean[:, None] + _std(variance)[:, None] * points
        u = _hermite_kept(x, KIND)
        out_mean, spread, _total, _centred = _hermite_moments(x, u, weights, nodes_inside, KIND)
        out_variance = tl.where(spread < 0.0, 0.0, spread)
    else:
        out_mean = mean
        out_variance = variance
    return out_mean, out_variance


@triton.jit
def _activation_backward(
    mean,
    variance,
    grad_mean,
    grad_variance,
    table_ptr,
    ACTIVATION: tl.constexpr,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    ORDER: tl.constexpr,
    SUB_BLOCK: tl.constexpr,
):
    """(∂L/∂mean, ∂L/∂variance) of the activation's moments from (∂L/∂E, ∂L/∂Var) (float64, 0 where the output
    did not reach the loss), as its twin's backward computes them, its forward recomputed (none: passed on)."""
    if ACTIVATION == 1:
        s, pdf, below, above, out_mean, spread = _relu_terms(mean, variance)
        twice = 2.0 * tl.where(spread >= 0.0, grad_variance, 0.0)
        along_mean = grad_mean * below + twice * out_mean * above
        grad_std = grad_mean * pdf + twice * (s * below - out_mean * pdf)
        along_variance = tl.where(variance >= _variance_floor(), grad_std / (2.0 * s), 0.0)
    elif ACTIVATION == 2:
        lo_edge, hi_edge, c0, c1, c2, pieces_inside = _piece_constants(table_ptr, NODES, SUB_BLOCK)
        m = mean[:, None]
        s = _std(variance)
        i0, i1, i2, i3, i4 = _piecewise_truncated(m, s[:, None], lo_edge, hi_edge, ORDER)
        _out_mean, spread, centred, d1, d2 = _piecewise_combine(
            m, s[:, None], c0, c1, c2, i0, i1, i2, i3, i4, pieces_inside, ORDER
        )
        twice = (2.0 * tl.where(spread >= 0.0, grad_variance, 0.0))[:, None]
        along_mean, along_std = _piecewise_stein(
            m, s[:, None], c1, c2, centred, d1, d2, i0, i1, i2, i3, i4, twice, grad_mean[:, None], pieces_inside,
            ORDER,
        )  # fmt: skip
        along_variance = tl.where(variance >= _variance_floor(), along_std / (2.0 * s), 0.0)
    elif ACTIVATION == 3:
        points, weights, nodes_inside = _hermite_rule(table_ptr, NODES, SUB_BLOCK)
        s = _std(variance)
        x = mean[:, None] + s[:, None] * points
        u = _hermite_kept(x, KIND)
        _out_mean, spread, total, centred = _hermite_moments(x, u, weights, nodes_inside, KIND)
        twice = 2.0 * tl.where(spread >= 0.0, grad_variance, 0.0)
        along_mean, along_std = _hermite_gradients(
            x, u, points, weights, nodes_inside, centred, total, twice, grad_mean, KIND
        )
        along_variance = tl.where(variance >= _variance_floor(), along_std / (2.0 * s), 0.0)
    else:
        along_mean = grad_mean
        along_variance = grad_variance
    return along_mean, along_variance


@triton.jit
def _stage_values(
    mean_ptr,
    variance_ptr,
    source_weight_ptr,
    table_ptr,
    stage_mean_ptr,
    stage_variance_ptr,
    first,
    last,
    eps,
    HAS_EPS: tl.constexpr,
    HAS_SOURCE_WEIGHT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    ORDER: tl.constexpr,
    SUB_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(m1, v1) of channels [first, last) into ``stage_*`` (the affine stage's inputs)."""
    for start in range(first, last, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        mask = c < last
        m0, _s, _g, v0 = _source_gaussian(
            mean_ptr, variance_ptr, source_weight_ptr, c, mask, eps, HAS_EPS, HAS_SOURCE_WEIGHT
        )
        m1, v1 = _activation_forward(m0, v0, table_ptr, ACTIVATION, NODES, KIND, ORDER, SUB_BLOCK)
        tl.store(stage_mean_ptr + c, m1.to(stage_mean_ptr.dtype.element_ty), mask=mask)
        tl.store(stage_variance_ptr + c, v1.to(stage_variance_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _path_forward_kernel(
    mean_ptr,
    variance_ptr,
    source_weight_ptr,
    table_ptr,
    weight_ptr,
    fraction_ptr,
    pairs_ptr,
    bias_ptr,
    stage_mean_ptr,
    stage_variance_ptr,
    taps_ptr,
    out_mean_ptr,
    out_variance_ptr,
    gaussian_ptr,
    channels,
    rows_total,
    B,
    K,
    per_group,
    eps: tl.float64,
    HAS_EPS: tl.constexpr,
    HAS_SOURCE_WEIGHT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    ORDER: tl.constexpr,
    SUB_BLOCK: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    HAS_TABLES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """HAS_AFFINE: rows [pid BLOCK_O, + BLOCK_O): (m1, v1) of their groups' inputs into ``stage_*``, then the affine
    twin's body on them, + b; program 0 also writes v0 of every channel. Else: channels [pid BLOCK_C, + BLOCK_C):
    v0, and (m1, v1) as the outputs."""
    pid = tl.program_id(0)
    if HAS_AFFINE:
        first_row = pid * BLOCK_O
        last_row = tl.minimum(first_row + BLOCK_O, rows_total) - 1
        _stage_values(
            mean_ptr, variance_ptr, source_weight_ptr, table_ptr, stage_mean_ptr, stage_variance_ptr,
            (first_row // per_group) * B, (last_row // per_group + 1) * B, eps, HAS_EPS, HAS_SOURCE_WEIGHT,
            ACTIVATION, NODES, KIND, ORDER, SUB_BLOCK, BLOCK_C,
        )  # fmt: skip
        if HAS_EPS:
            if pid == 0:
                for start in range(0, channels, BLOCK_C):
                    c = start + tl.arange(0, BLOCK_C)
                    mask = c < channels
                    _m0, _s, _g, v0 = _source_gaussian(
                        mean_ptr, variance_ptr, source_weight_ptr, c, mask, eps, HAS_EPS, HAS_SOURCE_WEIGHT
                    )
                    tl.store(gaussian_ptr + c, v0.to(gaussian_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the stage values stored by every thread of the program before any reads them
        rows, row_mask, out_mean, out_variance = _affine_forward_rows(
            weight_ptr, stage_mean_ptr, stage_variance_ptr, fraction_ptr, pairs_ptr, taps_ptr, rows_total, B, K,
            per_group, HAS_TABLES, BLOCK_O, BLOCK_I, BLOCK_U, BLOCK_T,
        )  # fmt: skip
        if HAS_BIAS:
            out_mean = out_mean + tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float64)
        tl.store(out_mean_ptr + rows, out_mean.to(out_mean_ptr.dtype.element_ty), mask=row_mask)
        tl.store(out_variance_ptr + rows, out_variance.to(out_variance_ptr.dtype.element_ty), mask=row_mask)
    else:
        c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = c < channels
        m0, _s, _g, v0 = _source_gaussian(
            mean_ptr, variance_ptr, source_weight_ptr, c, mask, eps, HAS_EPS, HAS_SOURCE_WEIGHT
        )
        if HAS_EPS:
            tl.store(gaussian_ptr + c, v0.to(gaussian_ptr.dtype.element_ty), mask=mask)
        m1, v1 = _activation_forward(m0, v0, table_ptr, ACTIVATION, NODES, KIND, ORDER, SUB_BLOCK)
        tl.store(out_mean_ptr + c, m1.to(out_mean_ptr.dtype.element_ty), mask=mask)
        tl.store(out_variance_ptr + c, v1.to(out_variance_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _path_rows_backward_kernel(
    mean_ptr,
    variance_ptr,
    source_weight_ptr,
    table_ptr,
    weight_ptr,
    fraction_ptr,
    pairs_ptr,
    taps_ptr,
    grad_mean_ptr,
    grad_variance_ptr,
    stage_mean_ptr,
    stage_variance_ptr,
    grad_weight_ptr,
    partial_mean_ptr,
    partial_variance_ptr,
    B,
    K,
    groups,
    per_group,
    chunks,
    rows_per_program,
    inputs_total,
    eps: tl.float64,
    HAS_EPS: tl.constexpr,
    HAS_SOURCE_WEIGHT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    ORDER: tl.constexpr,
    SUB_BLOCK: tl.constexpr,
    HAS_TABLES: tl.constexpr,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    ACROSS_GROUPS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """(m1, v1) of the inputs this program of the affine backward reads into ``stage_*``, then the affine twin's
    backward body: ∂W of its rows, its sums of ∂m1, ∂v1 into the float64 partials [chunk, input]."""
    if ACROSS_GROUPS:
        first = tl.program_id(0) * BLOCK_O * B
        last = tl.minimum((tl.program_id(0) + 1) * BLOCK_O, groups) * B
    else:
        g = tl.program_id(0) // chunks
        first = g * B + tl.program_id(1) * BLOCK_I
        last = g * B + tl.minimum((tl.program_id(1) + 1) * BLOCK_I, B)
    _stage_values(
        mean_ptr, variance_ptr, source_weight_ptr, table_ptr, stage_mean_ptr, stage_variance_ptr, first, last, eps,
        HAS_EPS, HAS_SOURCE_WEIGHT, ACTIVATION, NODES, KIND, ORDER, SUB_BLOCK, BLOCK_C,
    )  # fmt: skip
    tl.debug_barrier()  # the stage values stored by every thread of the program before any reads them
    _affine_backward_program(
        weight_ptr, stage_mean_ptr, stage_variance_ptr, fraction_ptr, pairs_ptr, taps_ptr, grad_mean_ptr,
        grad_variance_ptr, grad_weight_ptr, partial_mean_ptr, partial_variance_ptr, B, K, groups, per_group, chunks,
        rows_per_program, inputs_total, HAS_TABLES, HAS_GRAD_MEAN, HAS_GRAD_VARIANCE, ACROSS_GROUPS, BLOCK_O,
        BLOCK_I, BLOCK_U, BLOCK_T,
    )  # fmt: skip


@triton.jit
def _path_inputs_backward_kernel(
    mean_ptr,
    variance_ptr,
    source_weight_ptr,
    table_ptr,
    partial_mean_ptr,
    partial_variance_ptr,
    grad_gaussian_ptr,
    grad_mean_in_ptr,
    grad_variance_in_ptr,
    grad_source_weight_ptr,
    channels,
    chunks,
    eps: tl.float64,
    HAS_EPS: tl.constexpr,
    HAS_SOURCE_WEIGHT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    ORDER: tl.constexpr,
    SUB_BLOCK: tl.constexpr,
    HAS_PARTIAL_MEAN: tl.constexpr,
    HAS_PARTIAL_VARIANCE: tl.constexpr,
    HAS_GRAD_GAUSSIAN: tl.constexpr,
    WANTS_GRAD_SOURCE_WEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Channels [pid BLOCK_C, + BLOCK_C): ∂m1, ∂v1 = the partials [c, j] summed over c in chunk order (a partial
    pointer absent: 0), the activation's backward, ∂v0 += ∂gaussian, the output variance's backward:
    ∂Σ = ∂v0 (γ γ) ε / (Σ + ε)², ∂γ = ∂v0 2 γ (Σ / (Σ + ε)) (prior_moments' formulas, in their order)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < channels
    grad_m1 = tl.zeros([BLOCK_C], tl.float64)
    grad_v1 = tl.zeros([BLOCK_C], tl.float64)
    for chunk in range(0, chunks):
        if HAS_PARTIAL_MEAN:
            grad_m1 += tl.load(partial_mean_ptr + chunk * channels + c, mask=mask, other=0.0).to(tl.float64)
        if HAS_PARTIAL_VARIANCE:
            grad_v1 += tl.load(partial_variance_ptr + chunk * channels + c, mask=mask, other=0.0).to(tl.float64)
    m0, s, g, v0 = _source_gaussian(mean_ptr, variance_ptr, source_weight_ptr, c, mask, eps, HAS_EPS, HAS_SOURCE_WEIGHT)
    grad_m0, grad_v0 = _activation_backward(m0, v0, grad_m1, grad_v1, table_ptr, ACTIVATION, NODES, KIND, ORDER,
                                            SUB_BLOCK)  # fmt: skip
    tl.store(grad_mean_in_ptr + c, grad_m0.to(grad_mean_in_ptr.dtype.element_ty), mask=mask)
    if HAS_EPS:
        if HAS_GRAD_GAUSSIAN:
            grad_v0 = grad_v0 + tl.load(grad_gaussian_ptr + c, mask=mask, other=0.0).to(tl.float64)
        total = s + eps
        grad_sigma = grad_v0 * (g * g) * eps / (total * total)
        tl.store(grad_variance_in_ptr + c, grad_sigma.to(grad_variance_in_ptr.dtype.element_ty), mask=mask)
        if WANTS_GRAD_SOURCE_WEIGHT:
            grad_g = grad_v0 * 2.0 * g * (s / total)
            tl.store(grad_source_weight_ptr + c, grad_g.to(grad_source_weight_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_variance_in_ptr + c, grad_v0.to(grad_variance_in_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- host side


def _activation_options(
    activation: tuple[str, Tensor | None] | None, device: torch.device
) -> tuple[Tensor | None, dict]:
    """(the activation's float64 table on ``device`` or None, its constexprs and the stage block BLOCK_C)."""
    if activation is None:
        return None, {"ACTIVATION": _NONE, "NODES": 1, "KIND": 0, "ORDER": 2, "SUB_BLOCK": 1, "BLOCK_C": STAGE_BLOCK}
    kind, parameters = activation
    if kind == "relu":
        return None, {"ACTIVATION": _RELU, "NODES": 1, "KIND": 0, "ORDER": 2, "SUB_BLOCK": 1, "BLOCK_C": STAGE_BLOCK}
    if kind not in _ACTIVATIONS or parameters is None:
        raise BKNInputError(f"path_moments: activation {kind!r}: expected None, ('relu', None), ('piecewise', "
                            "table) or ('smooth', parameters)")  # fmt: skip
    name = "path_moments"
    table = _elementwise._table(name, parameters, device)
    first, second = table.header
    if kind == "piecewise":
        if not 1 <= first <= _elementwise.MAX_PIECES or second not in (2, 4) or parameters.numel() < 3 + 4 * first:
            raise BKNInputError(f"path_moments: parameters pieces={first} order={second} are not a piece table")
        block = next_power_of_2(first)
        options = {"ACTIVATION": _PIECEWISE, "NODES": first, "KIND": 0, "ORDER": second, "SUB_BLOCK": block,
                   "BLOCK_C": _elementwise.PIECEWISE_TILE // block}  # fmt: skip
        return table.device_table, options
    if second not in (0, 1, 2) or first < 1 or parameters.numel() < 2 + 2 * first:
        raise BKNInputError(f"path_moments: parameters nodes={first} kind={second} are not a Gauss–Hermite rule")
    block = next_power_of_2(first)
    options = {"ACTIVATION": _SMOOTH, "NODES": first, "KIND": second, "ORDER": 2, "SUB_BLOCK": block,
               "BLOCK_C": max(1, min(64, _elementwise.HERMITE_TILE // block))}  # fmt: skip
    return table.device_table, options


def _check(
    mean: Tensor,
    variance: Tensor,
    source_weight: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    **more: Tensor | None,
) -> None:
    """One float dtype (float32 / float64), one device, contiguous (C,) data."""
    if mean.dtype not in _DTYPES:
        raise BKNInputError(f"path_moments: tensors must be float32 or float64, got {mean.dtype}")
    named = {"variance": variance, "source_weight": source_weight, "weight": weight, "bias": bias, **more}
    for label, tensor in {"mean": mean, **named}.items():
        if tensor is None:
            continue
        if tensor.device != mean.device or not tensor.is_contiguous():
            raise BKNInputError(f"path_moments: {label} must be a contiguous tensor on {mean.device}")
        if label in ("variance", "source_weight", "weight", "bias") and tensor.dtype != mean.dtype:
            raise BKNInputError(f"path_moments: {label} is {tensor.dtype}, mean {mean.dtype}: pass one dtype")
    for label, tensor in {"variance": variance, "source_weight": source_weight}.items():
        if tensor is not None and tensor.numel() != mean.numel():
            raise BKNInputError(f"path_moments: {label} has {tensor.numel()} elements, mean {mean.numel()}")
    if weight is None and bias is not None:
        raise BKNInputError("path_moments: a bias without an affine stage")
    if weight is not None and bias is not None and bias.numel() != weight.shape[0]:
        raise BKNInputError(f"path_moments: bias has {bias.numel()} elements for {weight.shape[0]} rows")


def _per_warps(options: dict[str, Any], num_warps: int) -> dict[str, Any]:
    """``options`` with the stage block BLOCK_C scaled to a launch of ``num_warps`` warps (the affine tiles take 1
    to 4): the twins' values per thread (theirs run at 4 warps), so that the stage loops do not spill (a ReLU stage
    of 256 channels at one warp took 255 registers and 768 bytes of stack on sm_90)."""
    return dict(options, BLOCK_C=max(1, options["BLOCK_C"] * num_warps // NUM_WARPS))


def _stage_buffers(mean: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 (m1, v1) buffers (C_in,) the programs share (module docstring)."""
    both = torch.empty((2, mean.numel()), dtype=torch.float64, device=mean.device)
    return both[0], both[1]


def path_moments(
    mean: Tensor,
    variance: Tensor,
    source_weight: Tensor | None,
    eps: float | None,
    activation: tuple[str, Tensor | None] | None,
    weight: Tensor | None,
    fraction: Tensor | None,
    pairs: Tensor | None,
    parameters: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(M, V, v0 or None, T) of a path's head in one launch: output_variance (``eps`` given; γ = ``source_weight``
    or 1) → activation (None, ``("relu", None)``, ``("piecewise", table)``, ``("smooth", rule)``: the CPU float64
    tables of the twins) → affine_moments (``weight`` (C_out, B, K), the coverage tables or None, ``parameters``
    the CPU float64 [B, K, groups]) → + ``bias``. mean, variance (and γ): (C_in,). T: float64 (C_out, K) as the
    affine twin writes it (the backward reads it); (0, 0) without an affine stage (``weight`` None: M, V are then
    (m1, v1), (C_in,))."""
    _check(mean, variance, source_weight, weight, bias)
    table, options = _activation_options(activation, mean.device)
    channels = mean.numel()
    has_eps = eps is not None
    gaussian = torch.empty_like(mean) if has_eps else None
    common = dict(options, HAS_EPS=has_eps, HAS_SOURCE_WEIGHT=has_eps and source_weight is not None)
    table_arg = mean if table is None else table
    weight_arg = mean if source_weight is None else source_weight
    eps_value = float(eps) if eps is not None else 0.0
    if weight is None:
        out_mean, out_variance = torch.empty_like(mean), torch.empty_like(mean)
        taps = torch.empty((0, 0), dtype=torch.float64, device=mean.device)
        if channels:
            _path_forward_kernel[(cdiv(channels, options["BLOCK_C"]),)](
                mean, variance, weight_arg, table_arg, mean, mean, mean, mean, mean, mean, taps, out_mean,
                out_variance, mean if gaussian is None else gaussian, channels, 0, 1, 1, 1, eps_value,
                HAS_AFFINE=False, HAS_TABLES=False, HAS_BIAS=False, BLOCK_O=1, BLOCK_I=1, BLOCK_U=1, BLOCK_T=1,
                num_warps=NUM_WARPS, **common, **_LAUNCH,
            )  # fmt: skip
        return out_mean, out_variance, gaussian, taps
    if parameters is None:
        raise BKNInputError("path_moments: an affine stage needs its parameters [B, K, groups]")
    geometry = _affine._geometry("path_moments", weight, mean, variance, fraction, pairs, parameters, None)
    rows = geometry.rows
    taps = torch.empty((rows, geometry.taps), dtype=torch.float64, device=mean.device)
    out_mean, out_variance = mean.new_empty(rows), mean.new_empty(rows)
    if rows == 0:
        if gaussian is not None:  # no row program to write it: the output variance stage alone
            gaussian = path_moments(mean, variance, source_weight, eps, None, None, None, None, None, None)[2]
        return out_mean, out_variance, gaussian, taps
    f, h, has_tables = _affine._tables(fraction, pairs, weight)
    tiles = _affine._Tiles.of(geometry, rows)
    stage_mean, stage_variance = _stage_buffers(mean)
    _path_forward_kernel[(cdiv(rows, tiles.block_o),)](
        mean, variance, weight_arg, table_arg, weight, f, h, weight if bias is None else bias, stage_mean,
        stage_variance, taps, out_mean, out_variance, mean if gaussian is None else gaussian, channels, rows,
        geometry.inputs, geometry.taps, geometry.per_group, eps_value, HAS_AFFINE=True, HAS_TABLES=has_tables,
        HAS_BIAS=bias is not None, **tiles.constants(), **_per_warps(common, tiles.num_warps), **_LAUNCH,
    )  # fmt: skip
    return out_mean, out_variance, gaussian, taps


def path_moments_backward(
    mean: Tensor,
    variance: Tensor,
    source_weight: Tensor | None,
    eps: float | None,
    activation: tuple[str, Tensor | None] | None,
    weight: Tensor | None,
    fraction: Tensor | None,
    pairs: Tensor | None,
    parameters: Tensor | None,
    bias: Tensor | None,
    taps: Tensor,
    grad_mean: Tensor | None,
    grad_variance: Tensor | None,
    grad_gaussian: Tensor | None,
    weight_shape: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(∂mean, ∂variance, ∂γ or None, ∂W or None, ∂b or None) of :func:`path_moments` from ∂M, ∂V, ∂v0 (each
    None: that output did not reach the loss), ``taps`` as the forward wrote it; the other arguments as
    :func:`path_moments`. ∂W has W's (C_out, B, K) view's shape, or ``weight_shape`` (the layer's own: a tensor of
    that shape, not a view, so that autograd adds the conv's own ∂W into it in place). Two launches (one without
    an affine stage). ∂γ is given where the output variance stage has a γ, ∂b (= ∂M) where there is a bias and ∂M."""
    _check(mean, variance, source_weight, weight, bias, grad_mean=grad_mean, grad_variance=grad_variance,
           grad_gaussian=grad_gaussian)  # fmt: skip
    table, options = _activation_options(activation, mean.device)
    channels = mean.numel()
    has_eps = eps is not None
    wants_grad_source_weight = has_eps and source_weight is not None
    common = dict(options, HAS_EPS=has_eps, HAS_SOURCE_WEIGHT=wants_grad_source_weight)
    table_arg = mean if table is None else table
    weight_arg = mean if source_weight is None else source_weight
    eps_value = float(eps) if eps is not None else 0.0
    grad_mean_in, grad_variance_in = torch.empty_like(mean), torch.empty_like(mean)
    grad_source_weight = torch.empty_like(mean) if wants_grad_source_weight else None
    grad_bias = grad_mean if bias is not None else None
    grad_weight = None
    if weight is None:
        partials: tuple[Tensor | None, Tensor | None] = (grad_mean, grad_variance)
        chunks = 1
    else:
        if parameters is None:
            raise BKNInputError("path_moments_backward: an affine stage needs its parameters [B, K, groups]")
        geometry = _affine._geometry("path_moments_backward", weight, mean, variance, fraction, pairs, parameters,
                                     None)  # fmt: skip
        _check(mean, variance, source_weight, weight, bias, taps=taps)
        grad_base = torch.empty(weight_shape or weight.shape, dtype=weight.dtype, device=weight.device)
        grad_weight = grad_base.view(weight.shape)
        plan = _rows_plan(geometry)
        chunks = plan.chunks
        partial = torch.empty((2, chunks, channels), dtype=torch.float64, device=mean.device)  # all written
        partials = (partial[0], partial[1])
        if geometry.rows and geometry.inputs:
            f, h, has_tables = _affine._tables(fraction, pairs, weight)
            stage_mean, stage_variance = _stage_buffers(mean)
            _path_rows_backward_kernel[plan.grid](
                mean, variance, weight_arg, table_arg, weight, f, h, taps,
                weight if grad_mean is None else grad_mean, weight if grad_variance is None else grad_variance,
                stage_mean, stage_variance, grad_weight, partial[0], partial[1], geometry.inputs, geometry.taps,
                geometry.groups, geometry.per_group, chunks, plan.rows_per_program, channels, eps_value,
                HAS_TABLES=has_tables, HAS_GRAD_MEAN=grad_mean is not None,
                HAS_GRAD_VARIANCE=grad_variance is not None, ACROSS_GROUPS=plan.across, **plan.tiles.constants(),
                **_per_warps(common, plan.tiles.num_warps),
                **_LAUNCH,
            )  # fmt: skip
        else:  # no rows: the sums are empty
            grad_weight.zero_()
            partial.zero_()
    if channels:
        _path_inputs_backward_kernel[(cdiv(channels, options["BLOCK_C"]),)](
            mean, variance, weight_arg, table_arg, mean if partials[0] is None else partials[0],
            mean if partials[1] is None else partials[1], mean if grad_gaussian is None else grad_gaussian,
            grad_mean_in, grad_variance_in, mean if grad_source_weight is None else grad_source_weight, channels,
            chunks, eps_value, HAS_PARTIAL_MEAN=partials[0] is not None, HAS_PARTIAL_VARIANCE=partials[1] is not None,
            HAS_GRAD_GAUSSIAN=has_eps and grad_gaussian is not None, WANTS_GRAD_SOURCE_WEIGHT=wants_grad_source_weight,
            num_warps=NUM_WARPS, **common, **_LAUNCH,
        )  # fmt: skip
    return grad_mean_in, grad_variance_in, grad_source_weight, None if weight is None else grad_base, grad_bias


class _RowsPlan(NamedTuple):
    """The rows pass of the backward as ``affine_moments_backward`` plans its first launch: row chunks per group
    (1 with groups as lanes), grid, ACROSS_GROUPS, tiles and rows per program."""

    chunks: int
    grid: tuple[int, int]
    across: bool
    tiles: Any
    rows_per_program: int


def _rows_plan(geometry: Any) -> _RowsPlan:
    """:func:`bkn_export.kernels.affine_moments.affine_moments_backward`'s choice of its first launch."""
    wanted_rows = _affine._rows_per_program(geometry)
    if geometry.groups > 1 and geometry.inputs <= geometry.block_i and geometry.per_group <= wanted_rows:
        across = _affine._Tiles.of(geometry, geometry.groups)
        return _RowsPlan(1, (cdiv(geometry.groups, across.block_o), 1), True, across, geometry.per_group)
    tiles = _affine._Tiles.of(geometry, geometry.per_group)
    rows_per_program = max(1, min(cdiv(wanted_rows, tiles.block_o) * tiles.block_o, geometry.per_group))
    chunks = cdiv(geometry.per_group, rows_per_program) if geometry.per_group else 1
    grid = (geometry.groups * chunks, cdiv(geometry.inputs, tiles.block_i))
    return _RowsPlan(chunks, grid, False, tiles, rows_per_program)


def path_moments_take(
    mean: Tensor,
    variance: Tensor,
    source_weight: Tensor | None,
    eps: float | None,
    activation: tuple[str, Tensor | None] | None,
    weight: Tensor | None,
    fraction: Tensor | None,
    pairs: Tensor | None,
    parameters: Tensor | None,
    bias: Tensor | None,
) -> bool:
    """Whether :func:`path_moments` and its backward take these inputs (else the caller runs the stages): Triton
    not disabled (``BKN_DISABLE_TRITON``); mean, variance, γ, W, b, the coverage tables plain contiguous tensors of
    one float32 / float64 dtype and device; mean, variance, γ (C_in,); the activation None, ReLU, a piece table
    (≤ 8 pieces, order 2 or 4) or a silu / sigmoid / tanh rule, as CPU float64 tables; the affine stage (or none)
    with CPU float64 [B, K, groups] parameters that fit W (C_out, B, K) with B ≥ 1, K ≤ 512, C_out a multiple of
    groups, B groups = C_in, both coverage tables (K,), (K, K) or neither, 32-bit indexable; b (C_out,) or None
    (and None without an affine stage). Reads shapes, dtypes and the CPU tables only."""
    if os.environ.get("BKN_DISABLE_TRITON", "0") == "1":
        return False
    dtype, device = mean.dtype, mean.device
    if dtype not in _DTYPES or mean.dim() != 1:
        return False
    for tensor in (mean, variance, source_weight, weight, bias, fraction, pairs):
        if tensor is None:
            continue
        if type(tensor) not in (Tensor, torch.nn.Parameter) or tensor.dtype != dtype or not tensor.is_contiguous():
            return False
        # The coverage tables may stay on the CPU (copied to the device once and cached, as the affine twin does).
        if tensor.device != device and not ((tensor is fraction or tensor is pairs) and tensor.device.type == "cpu"):
            return False
    channels = mean.numel()
    if any(t is not None and t.shape != mean.shape for t in (variance, source_weight)):
        return False
    if channels == 0 or channels > MAX_ELEMENTS:
        return False
    if not _activation_taken(activation):
        return False
    if weight is None:
        return bias is None and fraction is None and pairs is None
    if parameters is None or parameters.device.type != "cpu" or parameters.dtype != torch.float64:
        return False
    if parameters.numel() != 3 or weight.dim() != 3:
        return False
    inputs, taps, groups = (int(v) for v in parameters.tolist())
    rows = weight.shape[0]
    if inputs < 1 or taps < 1 or taps > MAX_TAPS or groups < 1 or rows < 1 or rows % groups:
        return False
    if tuple(weight.shape) != (rows, inputs, taps) or inputs * groups != channels:
        return False
    if weight.numel() > MAX_ELEMENTS:
        return False
    if (fraction is None) != (pairs is None):
        return False
    if fraction is not None and pairs is not None and (fraction.numel() != taps or pairs.numel() != taps * taps):
        return False
    if bias is not None and bias.shape != (rows,):
        return False
    chunks = _rows_plan(_affine._Geometry(rows, inputs, taps, groups)).chunks
    return chunks * channels <= MAX_ELEMENTS


def _activation_taken(activation: tuple[str, Tensor | None] | None) -> bool:
    if activation is None:
        return True
    if not isinstance(activation, tuple) or len(activation) != 2:
        return False
    kind, parameters = activation
    if kind == "relu":
        return parameters is None
    if kind not in ("piecewise", "smooth") or not isinstance(parameters, Tensor):
        return False
    if parameters.device.type != "cpu" or parameters.dtype != torch.float64 or not parameters.is_contiguous():
        return False
    if parameters.numel() < 2:
        return False
    first, second = (int(v) for v in parameters[:2].tolist())
    if kind == "piecewise":
        return 1 <= first <= _elementwise.MAX_PIECES and second in (2, 4) and parameters.numel() >= 3 + 4 * first
    return second in (0, 1, 2) and first >= 1 and parameters.numel() >= 2 + 2 * first
