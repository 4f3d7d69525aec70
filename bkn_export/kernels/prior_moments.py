"""Triton twins of ``native/csrc/prior.c`` and the running-statistics update: one launch per call.

On CPU, :mod:`bkn_export.fast_prior` runs a source's output variance and a layer's prior
assembly through the C kernels of ``prior.c`` (``native.call(name, *tensors)``). The
launchers here take the same positional arguments, compute the same formulas, and launch
one kernel per call on the data's device, so that CUDA tensors get the fused form too.
All tensors are (C,)-shaped per-channel vectors; ``count`` (default: the first tensor's
``numel()``) is the number of channels, as in ``native.call``::

    output_variance            v = (γ γ) (Σ / (Σ + ε))                   (γ None: Σ / (Σ + ε))
    output_variance_backward   ∂Σ = ∂v (γ γ) ε / (Σ + ε)²,  ∂γ = ∂v 2 γ (Σ / (Σ + ε))
    prior_assembly             v = v_pred + softplus(r),  p = L sigmoid(l) [· k]
    prior_assembly_backward    ∂r = ∂v sigmoid(r)  (∂v for r > 20),  ∂l = ∂p k L s (1 - s),  s = sigmoid(l)

softplus is torch's (β = 1, threshold 20: r > 20 gives r); L = ``params[0]`` (the prior
weight limit), ε = ``params[0]`` of ``output_variance``. A missing γ, k, ∂v or ∂p is
None, exactly where the C code takes NULL (γ = 1, k = 1, ∂v = ∂p = 0; a None output is not
written).

One more launcher has no C twin: :func:`running_statistics_update`, what
:func:`bkn_export.functional.update_running_statistics_` does to the running buffers, in
place and in one launch, with ``momentum=None``'s cumulative average 1 / num_batches_tracked
read from the counter on the device.

Numerics. The ``prior.c`` twins compute in float64 for float32 tensors too and round once
at the store, as the C code does: in float32, s (1 - s) loses every digit once sigmoid(l)
rounds to 1 (l > 17), (Σ + ε)² and γ γ overflow beyond 1.8e19, and sigmoid(l) underflows
below l = -88, where double keeps the value the C kernel returns. The operations are the C
kernel's, in its order, without contraction into FMA (``enable_fp_fusion=False``; C is built
with ``-ffp-contract=off``), so the results equal the C kernel's to the last bit in
float32 almost always and within a few ulp in float64; the differences come from exp and log
(libdevice on a GPU, NumPy in the interpreter, glibc in C) and from log1p, which is
evaluated as ``log(u) · x / (u - 1)``, u = 1 + x (Goldberg's form, a few ulp: Triton's
interpreter has no log1p). One term amplifies them, in C as here: ∂l's 1 - s cancels as
s → 1, so an ulp of exp moves ∂l by up to ulp(1) |∂p k L|. On a GPU the float64 cost is
nothing next to the launch: these are vectors of C ≤ a few thousand channels.

The running-statistics update computes in the buffers' dtype with torch's operator
formulas (lerp as ``fma(w or w - 1, end - self, self or end)``, ``add_(alpha=)`` as an
FMA), as both torch's vectorised CPU kernels and its CUDA kernels evaluate them.

Scalars: ``params`` tensors are the small float64 tables of ``native.parameters`` and may be
CPU tensors while the data is on CUDA. Their values are read on the host (a CPU tensor: no
device synchronisation) and passed as float64 kernel arguments; no launcher reads a value of
a tensor on the data's device, so a train step stays capturable in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from bkn_export.errors import BKNInputError
from bkn_export.kernels.layout import cdiv

__all__ = [
    "LAUNCHERS",
    "LAUNCHES",
    "assembled_prior",
    "assembly_gradients",
    "output_variance",
    "output_variance_backward",
    "prior_assembly",
    "prior_assembly_backward",
    "running_statistics_update",
]

#: Channels per program: a whole layer's C ≤ 1024 in one program (4 warps × 32 threads × 8 channels).
BLOCK = 1024
NUM_WARPS = 4
#: softplus' threshold (torch's default, ``prior.c``'s 20.0).
SOFTPLUS_THRESHOLD: tl.constexpr = tl.constexpr(20.0)

_DATA_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- shared device helpers


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)), prior.c's form."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    """torch's softplus (β 1, threshold 20): x for x > 20, else log1p(exp(x)).

    log1p(e) = log(u) · e / (u - 1), u = 1 + e, and e where u rounds to 1 (Goldberg; a few ulp).
    e = exp(x) ≤ exp(20) here, so u is finite; NaN stays NaN, -inf gives 0.
    """
    e = tl.exp(x)
    u = 1.0 + e
    near_one = u == 1.0
    log1p = tl.where(near_one, e, tl.log(u) * (e / tl.where(near_one, 1.0, u - 1.0)))
    return tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)


@triton.jit
def assembled_prior(v, r, lg, k, limit, HAS_KNOWN: tl.constexpr):
    """(v + softplus(r), L sigmoid(l) [· k]) of float64 values (l: ``lg``): the prior assembly's formulas, in
    ``prior.c``'s order. Also the op's kernels' (``kernels.common.prior_statistics``), so that both evaluate the
    same expression; ``k`` is not read without HAS_KNOWN."""
    variance = v + _softplus(r)
    p = limit * _sigmoid(lg)
    if HAS_KNOWN:
        p = p * k
    return variance, p


@triton.jit
def load_assembly_inputs(raw_ptr, logit_ptr, known_ptr, offsets, mask, HAS_KNOWN: tl.constexpr):
    """(r, l, k) of one channel block in float64, masked lanes 0 and k = 1 without a known-channel mask: what
    :func:`assembled_prior` and :func:`assembly_gradients` take (the twins' kernels and the op's,
    ``kernels.common.prior_statistics`` / ``store_prior_gradients``, load them alike)."""
    r = tl.load(raw_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    logit = tl.load(logit_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    if HAS_KNOWN:
        known = tl.load(known_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
    else:
        known = tl.zeros_like(r) + 1.0
    return r, logit, known


@triton.jit
def assembly_gradients(r, lg, k, gv, gw, limit):
    """(∂r, ∂l) = (∂v sigmoid(r) (∂v for r > 20), ∂p k L s (1 - s)), s = sigmoid(l) (l: ``lg``), of float64
    values (k = 1 without a known-channel mask): the prior assembly's backward, shared with the op's backward
    kernels (``kernels.common.store_prior_gradients``)."""
    grad_raw = tl.where(r > SOFTPLUS_THRESHOLD, gv, gv * _sigmoid(r))
    s = _sigmoid(lg)
    return grad_raw, gw * k * limit * s * (1.0 - s)


@triton.jit
def _channel_block(n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < n


@triton.jit
def _load64(pointer, offsets, mask):
    return tl.load(pointer + offsets, mask=mask).to(tl.float64)


@triton.jit
def _store(pointer, offsets, mask, value):
    tl.store(pointer + offsets, value.to(pointer.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- kernels: prior.c


@triton.jit
def _output_variance_kernel(
    variance_ptr, weight_ptr, out_ptr, n, eps: tl.float64, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr
):
    offsets, mask = _channel_block(n, BLOCK)
    s = _load64(variance_ptr, offsets, mask)
    ratio = s / (s + eps)
    if HAS_WEIGHT:
        g = _load64(weight_ptr, offsets, mask)
        ratio = (g * g) * ratio
    _store(out_ptr, offsets, mask, ratio)


@triton.jit
def _output_variance_backward_kernel(
    variance_ptr,
    weight_ptr,
    grad_ptr,
    grad_variance_ptr,
    grad_weight_ptr,
    n,
    eps: tl.float64,
    HAS_WEIGHT: tl.constexpr,
    WANTS_GRAD_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets, mask = _channel_block(n, BLOCK)
    s = _load64(variance_ptr, offsets, mask)
    d = _load64(grad_ptr, offsets, mask)
    if HAS_WEIGHT:
        g = _load64(weight_ptr, offsets, mask)
    else:
        g = tl.full([BLOCK], 1.0, tl.float64)
    total = s + eps
    _store(grad_variance_ptr, offsets, mask, d * (g * g) * eps / (total * total))
    if WANTS_GRAD_WEIGHT:
        _store(grad_weight_ptr, offsets, mask, d * 2.0 * g * (s / total))


@triton.jit
def _prior_assembly_kernel(
    variance_ptr,
    raw_ptr,
    logit_ptr,
    known_ptr,
    out_variance_ptr,
    out_weight_ptr,
    n,
    limit: tl.float64,
    HAS_KNOWN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets, mask = _channel_block(n, BLOCK)
    v = _load64(variance_ptr, offsets, mask)
    r, logit, k = load_assembly_inputs(raw_ptr, logit_ptr, known_ptr, offsets, mask, HAS_KNOWN)
    variance, p = assembled_prior(v, r, logit, k, limit, HAS_KNOWN)
    _store(out_variance_ptr, offsets, mask, variance)
    _store(out_weight_ptr, offsets, mask, p)


@triton.jit
def _prior_assembly_backward_kernel(
    raw_ptr,
    logit_ptr,
    known_ptr,
    grad_variance_ptr,
    grad_weight_ptr,
    grad_raw_ptr,
    grad_logit_ptr,
    n,
    limit: tl.float64,
    HAS_KNOWN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    HAS_GRAD_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets, mask = _channel_block(n, BLOCK)
    r, logit, k = load_assembly_inputs(raw_ptr, logit_ptr, known_ptr, offsets, mask, HAS_KNOWN)
    if HAS_GRAD_VARIANCE:
        gv = _load64(grad_variance_ptr, offsets, mask)
    else:
        gv = tl.zeros([BLOCK], tl.float64)
    if HAS_GRAD_WEIGHT:
        gw = _load64(grad_weight_ptr, offsets, mask)
    else:
        gw = tl.zeros([BLOCK], tl.float64)
    grad_raw, grad_logit = assembly_gradients(r, logit, k, gv, gw, limit)
    _store(grad_raw_ptr, offsets, mask, grad_raw)
    _store(grad_logit_ptr, offsets, mask, grad_logit)


# --------------------------------------------------------------------------- kernel: running statistics


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp as its vectorised CPU kernel evaluates it (and CUDA's, contracted by nvcc): for
    |w| < 0.5 start + w (end - start), else end - (1 - w)(end - start), each as one FMA."""
    small = tl.abs(weight) < 0.5
    coefficient = tl.where(small, weight, weight - 1.0)
    return tl.fma(coefficient, end - start, tl.where(small, start, end))


@triton.jit
def _running_statistics_kernel(
    running_mean_ptr,
    running_variance_ptr,
    mean_ptr,
    variance_ptr,
    num_batches_tracked_ptr,
    n,
    momentum: tl.float64,
    keep: tl.float64,
    variance_weight: tl.float64,
    unbiased: tl.float64,
    FROM_COUNTER: tl.constexpr,
    LERP_VARIANCE: tl.constexpr,
    COUNT_BATCH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """r_μ ← lerp(r_μ, μ, α), α = momentum, or 1 / num_batches_tracked (FROM_COUNTER: read here, on the
    device). r_Σ ← lerp(r_Σ, Σ · n/max(n-1, 1), α) (LERP_VARIANCE), else fma(Σ, α n/max(n-1, 1), r_Σ (1 - α)).
    Scalars are rounded to the buffers' dtype first, as torch does with a Python scalar. COUNT_BATCH (never
    with FROM_COUNTER: no program reads the counter then): program 0 adds 1 to num_batches_tracked."""
    if COUNT_BATCH:
        if tl.program_id(0) == 0:
            tl.store(num_batches_tracked_ptr, tl.load(num_batches_tracked_ptr) + 1)
    offsets, mask = _channel_block(n, BLOCK)
    dtype = running_mean_ptr.dtype.element_ty
    running_mean = tl.load(running_mean_ptr + offsets, mask=mask)
    running_variance = tl.load(running_variance_ptr + offsets, mask=mask)
    mean = tl.load(mean_ptr + offsets, mask=mask)
    variance = tl.load(variance_ptr + offsets, mask=mask)
    if FROM_COUNTER:
        batches = tl.load(num_batches_tracked_ptr).to(dtype)
        if dtype == tl.float32:
            weight = tl.math.div_rn(1.0, batches)  # IEEE division, as torch's reciprocal (Triton's "/" is not)
        else:
            weight = 1.0 / batches
    else:
        weight = tl.full([], momentum, tl.float64).to(dtype)
    if LERP_VARIANCE:
        new_variance = _lerp(running_variance, variance * tl.full([], unbiased, tl.float64).to(dtype), weight)
    else:
        kept = running_variance * tl.full([], keep, tl.float64).to(dtype)
        new_variance = tl.fma(variance, tl.full([], variance_weight, tl.float64).to(dtype), kept)
    tl.store(running_mean_ptr + offsets, _lerp(running_mean, mean, weight), mask=mask)
    tl.store(running_variance_ptr + offsets, new_variance, mask=mask)


# --------------------------------------------------------------------------- launchers


def _channels(tensors: tuple[Tensor | None, ...], count: int | None, kernel: str) -> int:
    """The channel count n; checks that every tensor is contiguous, of the first one's dtype (float32 or
    float64) and device, with at least n elements (shapes and metadata only: no value is read)."""
    first = tensors[0]
    assert first is not None
    n = first.numel() if count is None else count
    if first.dtype not in _DATA_DTYPES:
        raise BKNInputError(f"{kernel}: tensors must be float32 or float64, got {first.dtype}; use the PyTorch form")
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise BKNInputError(
                f"{kernel}: every tensor must be {first.dtype} on {first.device}, got {tensor.dtype} on "
                f"{tensor.device}; use the PyTorch form for mixed inputs"
            )
        if not tensor.is_contiguous() or tensor.numel() < n:
            raise BKNInputError(
                f"{kernel}: tensors must be contiguous with at least {n} elements, got shape "
                f"{tuple(tensor.shape)} (contiguous: {tensor.is_contiguous()}); pass .contiguous() tensors"
            )
    return n


def _first_parameter(params: Tensor, kernel: str) -> float:
    """params[0] of a ``native.parameters`` table: a CPU float64 tensor, read on the host without a sync."""
    if params.device.type != "cpu":
        raise BKNInputError(
            f"{kernel}: params must be the CPU float64 table of native.parameters (reading a {params.device} "
            "tensor on the host would synchronise the device)"
        )
    return float(params.tolist()[0])


def _grid(n: int) -> tuple[int]:
    return (cdiv(n, BLOCK),)


def output_variance(
    variance: Tensor, weight: Tensor | None, params: Tensor, out: Tensor, count: int | None = None
) -> None:
    """out = (γ γ)(Σ / (Σ + ε)) per channel (γ None: Σ / (Σ + ε)), ε = params[0]; all (C,). One launch."""
    n = _channels((variance, weight, out), count, "output_variance")
    if n == 0:
        return
    eps = _first_parameter(params, "output_variance")
    _output_variance_kernel[_grid(n)](
        variance,
        variance if weight is None else weight,
        out,
        n,
        eps,
        HAS_WEIGHT=weight is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def output_variance_backward(
    variance: Tensor,
    weight: Tensor | None,
    params: Tensor,
    grad: Tensor,
    grad_variance: Tensor,
    grad_weight: Tensor | None,
    count: int | None = None,
) -> None:
    """∂Σ = ∂v (γ γ) ε / (Σ + ε)², ∂γ = ∂v 2 γ (Σ / (Σ + ε)) per channel (γ None: 1); grad_weight None
    is not written. All (C,). One launch."""
    n = _channels((variance, weight, grad, grad_variance, grad_weight), count, "output_variance_backward")
    if n == 0:
        return
    eps = _first_parameter(params, "output_variance_backward")
    _output_variance_backward_kernel[_grid(n)](
        variance,
        variance if weight is None else weight,
        grad,
        grad_variance,
        grad_variance if grad_weight is None else grad_weight,
        n,
        eps,
        HAS_WEIGHT=weight is not None,
        WANTS_GRAD_WEIGHT=grad_weight is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def prior_assembly(
    variance: Tensor,
    raw: Tensor,
    logit: Tensor,
    known: Tensor | None,
    params: Tensor,
    out_variance: Tensor,
    out_weight: Tensor,
    count: int | None = None,
) -> None:
    """out_variance = v_pred + softplus(r), out_weight = L sigmoid(l) [· k], L = params[0]; all (C,).
    One launch."""
    n = _channels((variance, raw, logit, known, out_variance, out_weight), count, "prior_assembly")
    if n == 0:
        return
    limit = _first_parameter(params, "prior_assembly")
    _prior_assembly_kernel[_grid(n)](
        variance,
        raw,
        logit,
        variance if known is None else known,
        out_variance,
        out_weight,
        n,
        limit,
        HAS_KNOWN=known is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def prior_assembly_backward(
    raw: Tensor,
    logit: Tensor,
    known: Tensor | None,
    params: Tensor,
    grad_variance: Tensor | None,
    grad_weight: Tensor | None,
    grad_raw: Tensor,
    grad_logit: Tensor,
    count: int | None = None,
) -> None:
    """grad_raw = ∂v sigmoid(r) (∂v for r > 20), grad_logit = ∂p k L s (1 - s), s = sigmoid(l), L =
    params[0]; a None ∂v or ∂p counts as 0, a None k as 1. All (C,). One launch."""
    tensors = (raw, logit, known, grad_variance, grad_weight, grad_raw, grad_logit)
    n = _channels(tensors, count, "prior_assembly_backward")
    if n == 0:
        return
    limit = _first_parameter(params, "prior_assembly_backward")
    _prior_assembly_backward_kernel[_grid(n)](
        raw,
        logit,
        raw if known is None else known,
        raw if grad_variance is None else grad_variance,
        raw if grad_weight is None else grad_weight,
        grad_raw,
        grad_logit,
        n,
        limit,
        HAS_KNOWN=known is not None,
        HAS_GRAD_VARIANCE=grad_variance is not None,
        HAS_GRAD_WEIGHT=grad_weight is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


def running_statistics_update(
    running_mean: Tensor,
    running_variance: Tensor,
    posterior_mean: Tensor,
    posterior_variance: Tensor,
    momentum: float | int | None,
    count: int,
    num_batches_tracked: Tensor | None = None,
    count_batch: bool = False,
) -> None:
    """:func:`bkn_export.functional.update_running_statistics_` in one launch, in place; with
    ``count_batch`` (a number momentum only) the same launch also adds 1 to ``num_batches_tracked``
    (the module's ``num_batches_tracked += 1``, one launch fewer per layer and step).

    running_mean, running_variance, posterior_mean, posterior_variance: (C,), contiguous, one dtype
    (float32 or float64; the posterior is used as it is, no gradient flows: nothing here records
    autograd). count: n, the elements per channel behind the posterior (its unbiased factor
    n / max(n - 1, 1)). momentum: α, a number; or None for the cumulative average α = 1 /
    num_batches_tracked (what the modules' ``momentum=None`` means), read from that one-element
    int64 counter on the device by the kernel (never on the host), after the caller has counted
    this batch. The reference's formulas, chosen as it chooses them::

        r_μ ← lerp(r_μ, μ, α)
        r_Σ ← r_Σ (1 - α) + (α n / max(n - 1, 1)) Σ       (a Python float α: its mul_ / add_)
        r_Σ ← lerp(r_Σ, Σ n / max(n - 1, 1), α)           (α from num_batches_tracked, or an int)
    """
    kernel = "running_statistics_update"
    n = _channels((running_mean, running_variance, posterior_mean, posterior_variance), None, kernel)
    if count_batch and momentum is None:
        raise BKNInputError(f"{kernel}: count_batch with momentum=None (the update reads the counter: count first)")
    if momentum is None or count_batch:
        if num_batches_tracked is None or num_batches_tracked.numel() != 1:
            raise BKNInputError(
                f"{kernel}: momentum=None and count_batch need the one-element num_batches_tracked counter"
            )
        if num_batches_tracked.device != running_mean.device:
            raise BKNInputError(
                f"{kernel}: num_batches_tracked is on {num_batches_tracked.device}, the buffers on "
                f"{running_mean.device}; keep the counter with the buffers"
            )
    if n == 0:
        if count_batch:
            assert num_batches_tracked is not None
            num_batches_tracked.add_(1)
        return
    unbiased = count / max(count - 1, 1)
    alpha = 0.0 if momentum is None else float(momentum)
    _running_statistics_kernel[_grid(n)](
        running_mean,
        running_variance,
        posterior_mean,
        posterior_variance,
        running_mean if num_batches_tracked is None else num_batches_tracked,
        n,
        alpha,
        1.0 - alpha,
        alpha * count / max(count - 1, 1),
        unbiased,
        FROM_COUNTER=momentum is None,
        # The reference's two-operator form is for a Python float α only (an int α takes its lerp form).
        LERP_VARIANCE=not isinstance(momentum, float),
        COUNT_BATCH=count_batch,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )


#: Each ``prior.c`` kernel name (and the running-statistics update) to its launcher.
LAUNCHERS: dict[str, Callable[..., None]] = {
    "output_variance": output_variance,
    "output_variance_backward": output_variance_backward,
    "prior_assembly": prior_assembly,
    "prior_assembly_backward": prior_assembly_backward,
    "running_statistics_update": running_statistics_update,
}
#: Kernels launched per call (none for zero channels).
LAUNCHES: dict[str, int] = dict.fromkeys(LAUNCHERS, 1)
