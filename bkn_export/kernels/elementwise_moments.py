"""Triton twins of the per-element moment kernels in C: ReLU, gate product, Gauss–Hermite, piecewise quadratic.

Each launcher mirrors one C kernel of ``bkn_export/native/csrc`` (``relu.c``, ``gate.c``, ``gauss_hermite.c``,
``piecewise.c``): the same name, the same positional arguments as its ``native.call(name, *tensors)`` site in
:mod:`bkn_export.chain.fast`, the same formulas, and **one kernel launch per call** (none when the element count
is 0). Outputs are among the arguments, allocated by the caller; ``None`` stands for NULL exactly where the C
kernel accepts NULL (the output gradients ∂L/∂E, ∂L/∂Var of a backward: that output did not reach the loss).

Tensors: the per-element data (``mean``, ``variance``, gradients, outputs) are contiguous, of one float dtype
(float32 or float64) and on one device (CUDA; CPU under ``TRITON_INTERPRET=1``); ``count`` elements are read
(default: the first tensor's numel). The kernels' constants (``parameters``: the Gauss–Hermite rule
``[n, kind, z_0 … z_{n-1}, w_0 … w_{n-1}]`` of ``fast._hermite_parameters``, the piece table
``[P, order, b_0 … b_P, c0, c1, c2]`` of ``fast._PiecewiseTable.native``) are float64 tensors on the **CPU**:
their header (n and kind, or P and order) is read on the host (a CPU read, no device synchronisation) and the
table is copied to the data's device once and cached. The ``kept`` buffers (Gauss–Hermite: (count, n), the
sigmoid or tanh per node; piecewise: (count, (order + 1) P), the truncated moments) are written and read in
whatever float dtype the caller allocates; float64, as the C kernels, keeps the backward's inputs exact.

Numerics: every kernel computes in float64, for float32 data too, and rounds once when it stores, as the C
kernels do. Each formula cancels where float32 would lose what double keeps: ReLU's and the gate's variance
(E[x²] − E[x]²-like differences), the Gauss–Hermite variance Σ w (f − E)² at small σ, the piecewise truncated
moments (differences of erfc). The arguments are (C,)-sized vectors, so float64 costs launch-bound kernels
nothing that matters. erfc is written here (the interpreter has no libdevice, so a libdevice erfc could not be
tested), from two textbook identities on ``tl.erf`` and ``tl.exp`` (float64: libdevice's ``__nv_erf`` and
``__nv_exp`` when compiled, libm's erf and NumPy's exp interpreted). For |x| < 1.5, erfc(x) = 1 − erf(x): the
subtraction is exact (Sterbenz) or rounds once, so the error is erf's, ≤ 2 ulp(1/2) = 2.2e-16 absolute for
libdevice's erf (documented: 2 ulps), so ≤ 2.2e-16 / erfc(x) + 2⁻⁵³ relative: ≤ 3.3e-16 for x ≤ 0 (erfc ≥ 1),
6.6e-15 at the switch (erfc(1.5) = 0.034). For x ≥ 1.5, erfc(x) = e^(−x²) 2x / (√π t₀), t₀ the continued fraction
of DLMF 7.9.2 (the even part of Laplace's, 7.9.1) cut after 48 levels, evaluated backwards without divisions but
the last (``_erfc_upper``). It converges faster as x grows; at x = 1.5, measured against math.erfc, 35 levels give
1.1e-14, 40 give 1.3e-15, 45 and more 4.2e-16 (the rounding floor): 48 keep the cut below that floor. e^(−x²) is
e^(−h²) e^(−(x − h)(x + h)), h = x to 26 significant bits, so that h² is exact and the large exponent carries no
rounding (a rounded x² would cost up to half an ulp of 745, 5.7e-14 relative, in the deep tail). For x ≤ −1.5,
erfc(x) = 2 − erfc(−x) (one rounding of a value ≥ 1.96). NaN gives NaN, ±inf 0 and 2; results are subnormal from
x ≈ 26.55 and 0 from ≈ 27.23, as libm's. Measured against Python's math.erfc (libm's, within about an ulp) over
[−30, 30] in steps of 1e-4, interpreted: relative error ≤ 2.3e-16 for x < 0.5, 3.6e-16 on [0.5, 1), 7.2e-16 on
[1, 1.25), 1.6e-15 on [1.25, 1.5) (erf's rounding, as above), ≤ 7.9e-16 from 1.5 to where erfc leaves the normal
range; within two units of the smallest subnormal (1e-323) below it (tests/test_kernels_elementwise_moments.py
asserts 1e-14 where erfc > 1e-300). The C kernels call glibc's erfc (< 1 ulp): the two differ by about those
errors.
φ is ``tl.exp``. The Gauss–Hermite sigmoid and tanh use ``_exp_parts``, the C kernel's own e^x
(``csrc/gauss_hermite.c``: degree-13 Taylor polynomial, 2^k written into the exponent bits), so the kept u are the
C kernel's bit for bit under the interpreter. The kernels are launched with ``enable_fp_fusion=False``, as
the C library is built with -ffp-contract=off: the same roundings on a GPU, where libdevice's exp may still
differ from libm's by an ulp.

Formulas (s = sqrt(max(v, 1e-12)), standardized values clamped to ±30, φ / Φ the standard normal pdf / cdf,
gV passing where the unclamped variance is ≥ 0, dL/dv = dL/ds / (2 s) where v ≥ 1e-12, else 0): see each
kernel's docstring and the C headers it mirrors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from bkn_export.errors import BKNInputError
from bkn_export.kernels.layout import cdiv, next_power_of_2

__all__ = [
    "LAUNCHERS",
    "LAUNCHES",
    "gate_product",
    "gate_product_backward",
    "gauss_hermite_moments",
    "gauss_hermite_moments_backward",
    "piecewise_moments",
    "piecewise_moments_backward",
    "relu_moments",
    "relu_moments_backward",
]

#: Elements per program of the one-value-per-element kernels (ReLU, gate): 2 per thread at 4 warps.
BLOCK = 256
#: (element, node) pairs per program of the Gauss–Hermite kernels: 8 float64 values per thread and temporary at
#: 4 warps; at most 156 registers (silu backward, float64). 2048 made that one spill (255 registers and
#: 128 bytes of stack in its sm_90 cubin).
HERMITE_TILE = 1024
#: (element, piece) pairs per program of the piecewise kernels, 2 per thread: each evaluates both branches of
#: erfc twice (111-122 registers here, 163-212 at 512 pairs; sm_90 cubins).
PIECEWISE_TILE = 256
#: Pieces the piecewise kernel takes (BKN_MAX_PIECES in csrc/piecewise.c).
MAX_PIECES = 8
NUM_WARPS = 4
#: Launch options of every kernel: no contraction of a·b + c into an FMA, as the C library is built
#: (-ffp-contract=off): the same roundings, and the exp's argument splittings as designed.
_LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

_HERMITE_KINDS = {0: "silu", 1: "sigmoid", 2: "tanh"}


# --------------------------------------------------------------------------- shared device functions


@triton.jit
def _variance_floor():
    """The variance floor 1e-12 as a float64 constant: Triton 3.6 compares a float64 tensor with a bare float
    literal at float32 precision (1e-12 becomes 9.99999996e-13, so v = float32(1e-12) passed the floor)."""
    return tl.full([], 1e-12, tl.float64)


@triton.jit
def _std(variance):
    """sqrt(max(v, 1e-12)); NaN stays NaN (as clamp_min and the C bkn_std)."""
    floor = _variance_floor()
    return tl.sqrt(tl.where(variance < floor, floor, variance))


@triton.jit
def _clamp_z(z):
    """Clamp to ±30, NaN passing (bkn_clamp_z)."""
    return tl.where(z < -30.0, -30.0, tl.where(z > 30.0, 30.0, z))


@triton.jit
def _exp_parts(x):
    """(r Q(r), 2^k, k) with e^x = 2^k (1 + r Q(r)), x clamped to [-708, 709]: csrc/gauss_hermite.c's
    bkn_exp_parts (x = k ln2 + r, |r| ≤ ln2 / 2, ln2 split so that k ln2_hi is exact, 1 + r Q(r) the
    degree-13 Taylor polynomial of e^r, 2^k written into the exponent bits)."""
    x = tl.where(x < -708.0, -708.0, tl.where(x > 709.0, 709.0, x))
    shifted = x * 1.4426950408889634074 + 6755399441055744.0
    k = shifted - 6755399441055744.0
    r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
    q = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0
    q = q * r + 1.0 / 39916800.0
    q = q * r + 1.0 / 3628800.0
    q = q * r + 1.0 / 362880.0
    q = q * r + 1.0 / 40320.0
    q = q * r + 1.0 / 5040.0
    q = q * r + 1.0 / 720.0
    q = q * r + 1.0 / 120.0
    q = q * r + 1.0 / 24.0
    q = q * r + 1.0 / 6.0
    q = q * r + 0.5
    q = q * r + 1.0
    scale = ((shifted.to(tl.int64, bitcast=True) + 1023) << 52).to(tl.float64, bitcast=True)
    return q * r, scale, k


@triton.jit
def _exp(x):
    """e^x within ~1 ulp for x in [-708, 709] (clamped there; bkn_exp_lanes)."""
    rq, scale, _k = _exp_parts(x)
    return (rq + 1.0) * scale


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (−m / (2 + m)), m = e^(−2|x|) − 1, exact near 0 where k = 0 (bkn_tanh_lanes)."""
    magnitude = tl.where(x < 0.0, -x, x)
    rq, scale, k = _exp_parts(-2.0 * magnitude)
    m = tl.where(k == 0.0, rq, (rq + 1.0) * scale - 1.0)
    t = -m / (2.0 + m)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _output_gradients(
    grad_mean_ptr,
    grad_variance_ptr,
    index,
    inside,
    spread,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
):
    """(∂L/∂E, ∂L/∂Var) at ``index``, in float64: 0 for a NULL gradient (its output did not reach the loss),
    ∂L/∂Var passing only where the variance before its clamp at 0 (``spread``) is ≥ 0."""
    grad_mean = tl.zeros_like(spread)
    if HAS_GRAD_MEAN:
        grad_mean = tl.load(grad_mean_ptr + index, mask=inside, other=0.0).to(tl.float64)
    grad_variance = tl.zeros_like(spread)
    if HAS_GRAD_VARIANCE:
        grad_variance = tl.load(grad_variance_ptr + index, mask=inside, other=0.0).to(tl.float64)
        grad_variance = tl.where(spread >= 0.0, grad_variance, 0.0)
    return grad_mean, grad_variance


@triton.jit
def _pdf(z):
    """φ(z) = e^(−z²/2) / sqrt(2π)."""
    return tl.exp(-0.5 * z * z) * 0.3989422804014326779399460599343818684758586311649346576659


@triton.jit
def _erfc_upper(ax):
    """erfc(x) for x = ``ax`` in [1.5, 27.5] (lanes outside clamped there by the caller), as
    e^(−x²) · 2x / (√π t₀) with t₀ the continued fraction of DLMF 7.9.2,

        √π e^(x²) erfc(x) = 2x / t₀,   t_n = 2x² + 4n + 1 − (2n + 1)(2n + 2) / t_(n+1),

    cut at t_48 = 2x² + 193 and evaluated backwards as t_n = p_n / q_n, so with multiplications only and one
    division: p_n = (2x² + 4n + 1) p_(n+1) − (2n + 1)(2n + 2) q_(n+1), q_n = p_(n+1) (p_48 = 2x² + 193,
    q_48 = 1; p_0 ≈ 1.2e157 at x = 27.5, far from overflow). e^(−x²) = e^(−h²) e^(−(x − h)(x + h)), h = x with
    the low 27 bits of its significand cleared: h² (≤ 52 bits) and x − h are exact, so the large exponent is
    exact and the small one below 5e-5; e^(−h²) is multiplied in last (the product is subnormal from
    x ≈ 26.55, e^(−h²) from 26.62)."""
    y = 2.0 * ax * ax
    q = y + 193.0
    p = (y + 189.0) * q - 9120.0  # n = 47: 4n + 1 = 189, (2n + 1)(2n + 2) = 9120
    for k in tl.static_range(47):
        n = 46 - k
        p, q = (y + (4 * n + 1)) * p - ((2 * n + 1) * (2 * n + 2)) * q, p
    high = (ax.to(tl.int64, bitcast=True) & -134217728).to(tl.float64, bitcast=True)
    low = (ax - high) * (ax + high)
    return tl.exp(-high * high) * (tl.exp(-low) * (1.1283791670955125738961589031215451716881012586580 * ax * q / p))


@triton.jit
def _erfc(x):
    """erfc(x) in float64: 1 − erf(x) for |x| < 1.5, :func:`_erfc_upper` for x ≥ 1.5 and 2 − that for
    x ≤ −1.5 (see the module docstring for the error); NaN gives NaN, erfc(+inf) = 0, erfc(−inf) = 2, 0 from
    x ≈ 27.23 on (underflow)."""
    ax = tl.where(x < 0.0, -x, x)
    upper = _erfc_upper(tl.where(ax < 1.5, 1.5, tl.where(ax > 27.5, 27.5, ax)))
    value = tl.where(ax < 1.5, 1.0 - tl.erf(x), tl.where(x < 0.0, 2.0 - upper, upper))
    return tl.where(x != x, x, value)


@triton.jit
def _cdf(z):
    """Φ(z) = erfc(−z/√2) / 2 (accurate in the lower tail)."""
    return 0.5 * _erfc(-z * 0.7071067811865475244008443621048490392848359376884740365883)


@triton.jit
def _erfc_kernel(x_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """out = erfc(x) per element, computed in float64 (:func:`_erfc_values`)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    tl.store(out_ptr + offsets, _erfc(x), mask=inside)


# --------------------------------------------------------------------------- ReLU (csrc/relu.c)


@triton.jit
def _relu_terms(mean, variance):
    s = _std(variance)
    a = _clamp_z(mean / s)
    pdf = _pdf(a)
    below = _cdf(a)
    above = _cdf(-a)
    out_mean = mean * below + s * pdf
    ratio = a * a * below * above + below + a * pdf * (above - below) - pdf * pdf
    return s, pdf, below, above, out_mean, s * s * ratio


@triton.jit
def _relu_forward_kernel(mean_ptr, variance_ptr, out_mean_ptr, out_variance_ptr, count, BLOCK: tl.constexpr):
    """E = μ Φ(a) + s φ(a), Var = max(0, s² (a² Φ(a) Φ(−a) + Φ(a) + a φ(a) (Φ(−a) − Φ(a)) − φ(a)²)),
    a = clamp(μ / s, ±30)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    mean = tl.load(mean_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    variance = tl.load(variance_ptr + offsets, mask=inside, other=1.0).to(tl.float64)
    _s, _pdf, _below, _above, out_mean, spread = _relu_terms(mean, variance)
    tl.store(out_mean_ptr + offsets, out_mean, mask=inside)
    tl.store(out_variance_ptr + offsets, tl.where(spread < 0.0, 0.0, spread), mask=inside)


@triton.jit
def _relu_backward_kernel(
    mean_ptr,
    variance_ptr,
    grad_mean_ptr,
    grad_variance_ptr,
    grad_input_mean_ptr,
    grad_input_variance_ptr,
    count,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dμ = gE Φ(a) + 2 gV E Φ(−a), ds = gE φ(a) + 2 gV (s Φ(a) − E φ(a)), dv = ds / (2 s)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    mean = tl.load(mean_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    variance = tl.load(variance_ptr + offsets, mask=inside, other=1.0).to(tl.float64)
    s, pdf, below, above, out_mean, spread = _relu_terms(mean, variance)
    grad_mean, grad_variance = _output_gradients(
        grad_mean_ptr, grad_variance_ptr, offsets, inside, spread, HAS_GRAD_MEAN, HAS_GRAD_VARIANCE
    )
    twice = 2.0 * grad_variance
    tl.store(grad_input_mean_ptr + offsets, grad_mean * below + twice * out_mean * above, mask=inside)
    grad_std = grad_mean * pdf + twice * (s * below - out_mean * pdf)
    grad_input_variance = tl.where(variance >= _variance_floor(), grad_std / (2.0 * s), 0.0)
    tl.store(grad_input_variance_ptr + offsets, grad_input_variance, mask=inside)


# --------------------------------------------------------------------------- gate product (csrc/gate.c)


@triton.jit
def _gate_forward_kernel(
    mean_ptr, variance_ptr, gate_mean_ptr, gate_variance_ptr, out_mean_ptr, out_variance_ptr, count, BLOCK: tl.constexpr
):
    """E = m m_g, Var = max(0, (v + m²)(v_g + m_g²) − E²)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    m = tl.load(mean_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    v = tl.load(variance_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    mg = tl.load(gate_mean_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    vg = tl.load(gate_variance_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    e = m * mg
    spread = (v + m * m) * (vg + mg * mg) - e * e
    tl.store(out_mean_ptr + offsets, e, mask=inside)
    tl.store(out_variance_ptr + offsets, tl.where(spread < 0.0, 0.0, spread), mask=inside)


@triton.jit
def _gate_backward_kernel(
    mean_ptr,
    variance_ptr,
    gate_mean_ptr,
    gate_variance_ptr,
    grad_mean_ptr,
    grad_variance_ptr,
    grad_input_mean_ptr,
    grad_input_variance_ptr,
    grad_gate_mean_ptr,
    grad_gate_variance_ptr,
    count,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dm = gE m_g + 2 gV m v_g, dv = gV (v_g + m_g²), dm_g = gE m + 2 gV m_g v, dv_g = gV (v + m²)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    m = tl.load(mean_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    v = tl.load(variance_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    mg = tl.load(gate_mean_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    vg = tl.load(gate_variance_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
    second_input = v + m * m
    second_gate = vg + mg * mg
    e = m * mg
    spread = second_input * second_gate - e * e
    grad_mean, grad_variance = _output_gradients(
        grad_mean_ptr, grad_variance_ptr, offsets, inside, spread, HAS_GRAD_MEAN, HAS_GRAD_VARIANCE
    )
    twice = 2.0 * grad_variance
    tl.store(grad_input_mean_ptr + offsets, grad_mean * mg + twice * m * vg, mask=inside)
    tl.store(grad_input_variance_ptr + offsets, grad_variance * second_gate, mask=inside)
    tl.store(grad_gate_mean_ptr + offsets, grad_mean * m + twice * mg * v, mask=inside)
    tl.store(grad_gate_variance_ptr + offsets, grad_variance * second_input, mask=inside)


# --------------------------------------------------------------------------- Gauss–Hermite (csrc/gauss_hermite.c)


@triton.jit
def _hermite_kept(x, KIND: tl.constexpr):
    """u = sigmoid(x) = 1 / (1 + e^−x) (silu, sigmoid) or tanh(x) (KIND 2)."""
    if KIND == 2:
        return _tanh(x)
    else:
        return 1.0 / (1.0 + _exp(-x))


@triton.jit
def _hermite_value(x, u, KIND: tl.constexpr):
    """f(x) from u: silu x u, else u."""
    if KIND == 0:
        return x * u
    else:
        return u


@triton.jit
def _hermite_moments(x, u, weights, nodes_inside, KIND: tl.constexpr):
    """(E, the unclamped Var, S = Σ_j w_j c_j, c = f(x) − E) of a (rows, nodes) tile; padded nodes count 0."""
    f = _hermite_value(x, u, KIND)
    mean = tl.sum(tl.where(nodes_inside, weights * f, 0.0), axis=1)
    centred = f - mean[:, None]
    spread = tl.sum(tl.where(nodes_inside, weights * (centred * centred), 0.0), axis=1)
    total = tl.sum(tl.where(nodes_inside, weights * centred, 0.0), axis=1)
    return mean, spread, total, centred


@triton.jit
def _hermite_forward_kernel(
    mean_ptr,
    variance_ptr,
    points_ptr,
    weights_ptr,
    kept_ptr,
    out_mean_ptr,
    out_variance_ptr,
    count,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    NODE_BLOCK: tl.constexpr,
):
    """x_j = μ + s z_j, E = Σ_j w_j f(x_j), Var = max(0, Σ_j w_j (f(x_j) − E)²); kept (count, NODES) = u."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < count
    nodes = tl.arange(0, NODE_BLOCK)
    nodes_inside = (nodes < NODES)[None, :]
    points = tl.load(points_ptr + nodes, mask=nodes < NODES, other=0.0).to(tl.float64)[None, :]
    weights = tl.load(weights_ptr + nodes, mask=nodes < NODES, other=0.0).to(tl.float64)[None, :]
    mean = tl.load(mean_ptr + rows, mask=inside, other=0.0).to(tl.float64)
    s = _std(tl.load(variance_ptr + rows, mask=inside, other=1.0).to(tl.float64))
    x = mean[:, None] + s[:, None] * points
    u = _hermite_kept(x, KIND)
    tl.store(kept_ptr + rows[:, None] * NODES + nodes[None, :], u, mask=inside[:, None] & nodes_inside)
    out_mean, spread, _total, _centred = _hermite_moments(x, u, weights, nodes_inside, KIND)
    tl.store(out_mean_ptr + rows, out_mean, mask=inside)
    tl.store(out_variance_ptr + rows, tl.where(spread < 0.0, 0.0, spread), mask=inside)


@triton.jit
def _hermite_gradients(x, u, points, weights, nodes_inside, centred, total, twice, grad_mean, KIND: tl.constexpr):
    """The Gauss–Hermite backward (:class:`bkn_export.chain.fast._GaussHermiteMoments`) summed over the nodes:
    (∂L/∂μ, ∂L/∂σ) from the nodes x, u = sigmoid / tanh of them, the centred values and their weighted sum,
    twice = 2 ∂Var (where the clamp passes) and ∂E, per row."""
    shared = grad_mean - twice * total
    if KIND == 0:
        derivative = u * (1.0 + x * (1.0 - u))
    elif KIND == 1:
        derivative = u * (1.0 - u)
    else:
        derivative = 1.0 - u * u
    grad_x = (centred * twice[:, None] + shared[:, None]) * weights * derivative
    along_mean = tl.sum(tl.where(nodes_inside, grad_x, 0.0), axis=1)
    along_std = tl.sum(tl.where(nodes_inside, grad_x * points, 0.0), axis=1)
    return along_mean, along_std


@triton.jit
def _hermite_backward_kernel(
    mean_ptr,
    variance_ptr,
    points_ptr,
    weights_ptr,
    kept_ptr,
    grad_mean_ptr,
    grad_variance_ptr,
    grad_input_mean_ptr,
    grad_input_variance_ptr,
    count,
    NODES: tl.constexpr,
    KIND: tl.constexpr,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    BLOCK: tl.constexpr,
    NODE_BLOCK: tl.constexpr,
):
    """dL/dx_j = (2 gV c_j + gE − 2 gV S) w_j f'(x_j) (f' = u (1 + x (1 − u)), u (1 − u), 1 − u²),
    dμ = Σ_j dL/dx_j, ds = Σ_j dL/dx_j z_j, from the forward's u (no exponential)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < count
    nodes = tl.arange(0, NODE_BLOCK)
    nodes_inside = (nodes < NODES)[None, :]
    points = tl.load(points_ptr + nodes, mask=nodes < NODES, other=0.0).to(tl.float64)[None, :]
    weights = tl.load(weights_ptr + nodes, mask=nodes < NODES, other=0.0).to(tl.float64)[None, :]
    mean = tl.load(mean_ptr + rows, mask=inside, other=0.0).to(tl.float64)
    variance = tl.load(variance_ptr + rows, mask=inside, other=1.0).to(tl.float64)
    s = _std(variance)
    x = mean[:, None] + s[:, None] * points
    kept_mask = inside[:, None] & nodes_inside
    u = tl.load(kept_ptr + rows[:, None] * NODES + nodes[None, :], mask=kept_mask, other=0.0).to(tl.float64)
    _out_mean, spread, total, centred = _hermite_moments(x, u, weights, nodes_inside, KIND)
    grad_mean, grad_variance = _output_gradients(
        grad_mean_ptr, grad_variance_ptr, rows, inside, spread, HAS_GRAD_MEAN, HAS_GRAD_VARIANCE
    )
    along_mean, along_std = _hermite_gradients(
        x, u, points, weights, nodes_inside, centred, total, 2.0 * grad_variance, grad_mean, KIND
    )
    tl.store(grad_input_mean_ptr + rows, along_mean, mask=inside)
    grad_input_variance = tl.where(variance >= _variance_floor(), along_std / (2.0 * s), 0.0)
    tl.store(grad_input_variance_ptr + rows, grad_input_variance, mask=inside)


# --------------------------------------------------------------------------- piecewise quadratic (csrc/piecewise.c)


@triton.jit
def _edge_z(edge, mean, s):
    """clamp((b − μ) / s, ±30); ±30 at an infinite edge whatever μ and s."""
    z = _clamp_z((edge - mean) / s)
    z = tl.where(edge < -1.7976931348623157e308, -30.0, z)
    return tl.where(edge > 1.7976931348623157e308, 30.0, z)


@triton.jit
def _piecewise_truncated(mean, s, lo_edge, hi_edge, ORDER: tl.constexpr):
    """The truncated moments (I_0, I_1, I_2, I_3, I_4) of a (rows, pieces) tile (I_3 = I_4 = I_2 for ORDER 2,
    unused there): :func:`_piecewise_forward_kernel`'s, also run by ``kernels.path_moments``."""
    lo = _edge_z(lo_edge, mean, s)
    hi = _edge_z(hi_edge, mean, s)
    # erfc(±z/√2) on the side of the tail: 2Φ(−z) where lo > 0, else 2Φ(z).
    sign = tl.where(lo > 0.0, 1.0, -1.0)
    tail_lo = _erfc(sign * lo * 0.7071067811865475244008443621048490392848359376884740365883)
    tail_hi = _erfc(sign * hi * 0.7071067811865475244008443621048490392848359376884740365883)
    i0 = 0.5 * tl.where(lo > 0.0, tail_lo - tail_hi, tail_hi - tail_lo)
    edge_lo = _pdf(lo)
    edge_hi = _pdf(hi)
    i1 = edge_lo - edge_hi
    edge_lo = edge_lo * lo
    edge_hi = edge_hi * hi
    i2 = i0 + edge_lo - edge_hi
    i3 = i2
    i4 = i2
    if ORDER == 4:
        edge_lo = edge_lo * lo
        edge_hi = edge_hi * hi
        i3 = 2.0 * i1 + edge_lo - edge_hi
        edge_lo = edge_lo * lo
        edge_hi = edge_hi * hi
        i4 = 3.0 * i2 + edge_lo - edge_hi
    return i0, i1, i2, i3, i4


@triton.jit
def _piecewise_combine(mean, s, c0, c1, c2, i0, i1, i2, i3, i4, pieces_inside, ORDER: tl.constexpr):
    """(E, the unclamped Var, d0 − E, d1, d2) of a (rows, pieces) tile from its truncated moments."""
    d0 = c0 + c1 * mean
    d1 = c1 * s
    if ORDER == 4:
        d0 = d0 + c2 * mean * mean
        d1 = d1 + 2.0 * c2 * mean * s
        d2 = c2 * s * s
        part = d0 * i0 + d1 * i1 + d2 * i2
    else:
        d2 = tl.zeros_like(d1)
        part = d0 * i0 + d1 * i1
    out_mean = tl.sum(tl.where(pieces_inside, part, 0.0), axis=1)
    centred = d0 - out_mean[:, None]
    terms = centred * centred * i0 + 2.0 * centred * d1 * i1 + d1 * d1 * i2
    if ORDER == 4:
        terms = terms + 2.0 * centred * d2 * i2 + 2.0 * d1 * d2 * i3 + d2 * d2 * i4
    spread = tl.sum(tl.where(pieces_inside, terms, 0.0), axis=1)
    return out_mean, spread, centred, d1, d2


@triton.jit
def _piecewise_forward_kernel(
    mean_ptr,
    variance_ptr,
    table_ptr,
    kept_ptr,
    out_mean_ptr,
    out_variance_ptr,
    count,
    PIECES: tl.constexpr,
    ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
    PIECE_BLOCK: tl.constexpr,
):
    """On piece p (lo = z_p, hi = z_{p+1}): I_0 = Φ(hi) − Φ(lo) by erfc in the tail where lo > 0,
    I_1 = φ(lo) − φ(hi), I_k = (k − 1) I_{k−2} + lo^{k−1} φ(lo) − hi^{k−1} φ(hi); f = d0 + d1 Z + d2 Z²,
    E = Σ_p d0 I_0 + d1 I_1 + d2 I_2, Var = max(0, Σ_p E[(d0 − E + d1 Z + d2 Z²)² 1_p]);
    kept (count, (ORDER + 1) PIECES): I_k of piece p at k PIECES + p."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < count
    pieces = tl.arange(0, PIECE_BLOCK)
    on_piece = pieces < PIECES
    pieces_inside = on_piece[None, :]
    lo_edge = tl.load(table_ptr + 2 + pieces, mask=on_piece, other=0.0)[None, :]
    hi_edge = tl.load(table_ptr + 3 + pieces, mask=on_piece, other=0.0)[None, :]
    c0 = tl.load(table_ptr + 3 + PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    c1 = tl.load(table_ptr + 3 + 2 * PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    c2 = tl.load(table_ptr + 3 + 3 * PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    mean = tl.load(mean_ptr + rows, mask=inside, other=0.0).to(tl.float64)
    s = _std(tl.load(variance_ptr + rows, mask=inside, other=1.0).to(tl.float64))
    i0, i1, i2, i3, i4 = _piecewise_truncated(mean[:, None], s[:, None], lo_edge, hi_edge, ORDER)
    kept = kept_ptr + rows[:, None] * ((ORDER + 1) * PIECES) + pieces[None, :]
    kept_mask = inside[:, None] & pieces_inside
    tl.store(kept, i0, mask=kept_mask)
    tl.store(kept + PIECES, i1, mask=kept_mask)
    tl.store(kept + 2 * PIECES, i2, mask=kept_mask)
    if ORDER == 4:
        tl.store(kept + 3 * PIECES, i3, mask=kept_mask)
        tl.store(kept + 4 * PIECES, i4, mask=kept_mask)
    out_mean, spread, _centred, _d1, _d2 = _piecewise_combine(
        mean[:, None], s[:, None], c0, c1, c2, i0, i1, i2, i3, i4, pieces_inside, ORDER
    )
    tl.store(out_mean_ptr + rows, out_mean, mask=inside)
    tl.store(out_variance_ptr + rows, tl.where(spread < 0.0, 0.0, spread), mask=inside)


@triton.jit
def _piecewise_stein(
    m, s, c1, c2, centred, d1, d2, i0, i1, i2, i3, i4, twice, grad_mean, pieces_inside, ORDER: tl.constexpr
):
    """Stein's backward of the piecewise moments (:class:`bkn_export.chain.fast._PiecewiseMoments`), summed over
    the pieces: (∂L/∂μ, ∂L/∂σ) from the truncated moments I_k, twice = 2 ∂Var (where the clamp passes) and ∂E,
    all (·, 1) or (·, pieces) as the callers lay them out."""
    e0 = c1 + 2.0 * c2 * m
    shared = grad_mean + twice * centred
    a0 = e0 * shared
    a1 = twice * d1 * e0
    piece_mean = a0 * i0
    piece_std = a0 * i1
    if ORDER == 4:
        e1 = 2.0 * c2 * s
        a1 = a1 + e1 * shared
        a2 = twice * (d1 * e1 + d2 * e0)
        a3 = twice * d2 * e1
        piece_mean = piece_mean + a1 * i1
        piece_std = piece_std + a1 * i2
        piece_mean = piece_mean + a2 * i2
        piece_std = piece_std + a2 * i3
        piece_mean = piece_mean + a3 * i3
        piece_std = piece_std + a3 * i4
    else:
        piece_mean = piece_mean + a1 * i1
        piece_std = piece_std + a1 * i2
    along_mean = tl.sum(tl.where(pieces_inside, piece_mean, 0.0), axis=1)
    along_std = tl.sum(tl.where(pieces_inside, piece_std, 0.0), axis=1)
    return along_mean, along_std


@triton.jit
def _piecewise_backward_kernel(
    mean_ptr,
    variance_ptr,
    table_ptr,
    kept_ptr,
    grad_mean_ptr,
    grad_variance_ptr,
    grad_input_mean_ptr,
    grad_input_variance_ptr,
    count,
    PIECES: tl.constexpr,
    ORDER: tl.constexpr,
    HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_VARIANCE: tl.constexpr,
    BLOCK: tl.constexpr,
    PIECE_BLOCK: tl.constexpr,
):
    """Stein: with e0 = c1 + 2 c2 μ, e1 = 2 c2 s, d0' = d0 − E, per power of Z
    a_0 = e0 (gE + 2 gV d0'), a_1 = 2 gV d1 e0 + e1 (gE + 2 gV d0'), a_2 = 2 gV (d1 e1 + d2 e0), a_3 = 2 gV d2 e1;
    dμ = Σ_p Σ_k a_k I_k, ds = Σ_p Σ_k a_k I_{k+1}, from the forward's truncated moments (no erfc, no exp)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < count
    pieces = tl.arange(0, PIECE_BLOCK)
    on_piece = pieces < PIECES
    pieces_inside = on_piece[None, :]
    c0 = tl.load(table_ptr + 3 + PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    c1 = tl.load(table_ptr + 3 + 2 * PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    c2 = tl.load(table_ptr + 3 + 3 * PIECES + pieces, mask=on_piece, other=0.0)[None, :]
    mean = tl.load(mean_ptr + rows, mask=inside, other=0.0).to(tl.float64)
    variance = tl.load(variance_ptr + rows, mask=inside, other=1.0).to(tl.float64)
    s = _std(variance)
    kept = kept_ptr + rows[:, None] * ((ORDER + 1) * PIECES) + pieces[None, :]
    kept_mask = inside[:, None] & pieces_inside
    i0 = tl.load(kept, mask=kept_mask, other=0.0).to(tl.float64)
    i1 = tl.load(kept + PIECES, mask=kept_mask, other=0.0).to(tl.float64)
    i2 = tl.load(kept + 2 * PIECES, mask=kept_mask, other=0.0).to(tl.float64)
    i3 = i2
    i4 = i2
    if ORDER == 4:
        i3 = tl.load(kept + 3 * PIECES, mask=kept_mask, other=0.0).to(tl.float64)
        i4 = tl.load(kept + 4 * PIECES, mask=kept_mask, other=0.0).to(tl.float64)
    m = mean[:, None]
    _out_mean, spread, centred, d1, d2 = _piecewise_combine(
        m, s[:, None], c0, c1, c2, i0, i1, i2, i3, i4, pieces_inside, ORDER
    )
    grad_mean, grad_variance = _output_gradients(
        grad_mean_ptr, grad_variance_ptr, rows, inside, spread, HAS_GRAD_MEAN, HAS_GRAD_VARIANCE
    )
    twice = (2.0 * grad_variance)[:, None]
    along_mean, along_std = _piecewise_stein(
        m, s[:, None], c1, c2, centred, d1, d2, i0, i1, i2, i3, i4, twice, grad_mean[:, None], pieces_inside, ORDER
    )
    tl.store(grad_input_mean_ptr + rows, along_mean, mask=inside)
    grad_input_variance = tl.where(variance >= _variance_floor(), along_std / (2.0 * s), 0.0)
    tl.store(grad_input_variance_ptr + rows, grad_input_variance, mask=inside)


# --------------------------------------------------------------------------- launchers


def _data(name: str, count: int | None, *tensors: Tensor | None) -> int:
    """The element count of a call, after checking the data tensors: one float32/float64 dtype, one device,
    contiguous, at least ``count`` elements each (shapes and strides only: no value is read)."""
    first = tensors[0]
    assert first is not None
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.dtype not in (torch.float32, torch.float64) or tensor.dtype != first.dtype:
            raise BKNInputError(
                f"kernels.elementwise_moments.{name}: tensors must be float32 or float64 of one dtype, got "
                f"{tensor.dtype} beside {first.dtype}"
            )
        if tensor.device != first.device or not tensor.is_contiguous():
            raise BKNInputError(
                f"kernels.elementwise_moments.{name}: tensors must be contiguous and on {first.device}, got one "
                f"on {tensor.device} (contiguous: {tensor.is_contiguous()}); pass .contiguous() tensors of one device"
            )
    n = first.numel() if count is None else count
    if any(t is not None and t.numel() < n for t in tensors):
        raise BKNInputError(f"kernels.elementwise_moments.{name}: count {n} exceeds a tensor's numel")
    return n


def _kept(name: str, kept: Tensor, device: torch.device, count: int, per_element: int) -> None:
    """Check a kept buffer: contiguous, float, on the data's device, count x per_element values, indexable
    with 32 bits (the kernels' offsets)."""
    if count * per_element >= 2**31:
        raise BKNInputError(
            f"kernels.elementwise_moments.{name}: {count} x {per_element} kept values exceed 32-bit indexing; "
            "split the call"
        )
    if kept.device != device or not kept.is_floating_point() or not kept.is_contiguous():
        raise BKNInputError(
            f"kernels.elementwise_moments.{name}: kept must be a contiguous float tensor on {device}, got "
            f"{kept.dtype} on {kept.device}"
        )
    if kept.numel() < count * per_element:
        raise BKNInputError(
            f"kernels.elementwise_moments.{name}: kept holds {kept.numel()} values, needs {count} x {per_element}"
        )


class _Table:
    """A kernel's constants: its header read on the host and the float64 table on the data's device."""

    __slots__ = ("device_table", "header", "source")

    def __init__(self, source: Tensor, header: tuple[int, int], device_table: Tensor) -> None:
        self.source, self.header, self.device_table = source, header, device_table


#: Per (data_ptr, dtype, device) of a CPU parameters tensor; each entry holds its source, so the key stays
#: valid (the callers cache their tables for the process: this holds as many).
_TABLES: dict[tuple[int, torch.dtype, torch.device], _Table] = {}
_TABLES_SIZE = 512


def _table(name: str, parameters: Tensor, device: torch.device) -> _Table:
    """The header (two counts) of a float64 CPU parameters tensor and its copy on ``device``, cached: the
    first call per table and device reads the CPU tensor and copies it (before any CUDA graph capture),
    later calls touch neither."""
    key = (parameters.data_ptr(), parameters.dtype, device)
    table = _TABLES.get(key)
    if table is not None and table.source is parameters:
        return table
    if parameters.device.type != "cpu" or parameters.dtype != torch.float64 or not parameters.is_contiguous():
        raise BKNInputError(
            f"kernels.elementwise_moments.{name}: parameters must be a contiguous float64 CPU tensor (the "
            f"Function's table: its header is read on the host), got {parameters.dtype} on {parameters.device}"
        )
    first, second = (int(v) for v in parameters[:2].tolist())
    device_table = parameters.to(device)
    table = _Table(parameters, (first, second), device_table)
    if len(_TABLES) >= _TABLES_SIZE:
        _TABLES.clear()
    _TABLES[key] = table
    return table


def _grid(count: int, block: int) -> tuple[int]:
    return (cdiv(count, block),)


def relu_moments(
    mean: Tensor, variance: Tensor, out_mean: Tensor, out_variance: Tensor, count: int | None = None
) -> None:
    """relu.c's ``relu_moments``: (E, Var) of ReLU(X), X ~ N(μ, v), per element. All (count,)."""
    n = _data("relu_moments", count, mean, variance, out_mean, out_variance)
    if n:
        _relu_forward_kernel[_grid(n, BLOCK)](mean, variance, out_mean, out_variance, n, BLOCK=BLOCK, **_LAUNCH)


def relu_moments_backward(
    mean: Tensor,
    variance: Tensor,
    grad_mean: Tensor | None,
    grad_variance: Tensor | None,
    grad_input_mean: Tensor,
    grad_input_variance: Tensor,
    count: int | None = None,
) -> None:
    """relu.c's ``relu_moments_backward``: ∂L/∂(μ, v) from ∂L/∂(E, Var) (None: zero). All (count,)."""
    tensors = (mean, variance, grad_mean, grad_variance, grad_input_mean, grad_input_variance)
    n = _data("relu_moments_backward", count, *tensors)
    if n:
        _relu_backward_kernel[_grid(n, BLOCK)](
            mean,
            variance,
            mean if grad_mean is None else grad_mean,
            mean if grad_variance is None else grad_variance,
            grad_input_mean,
            grad_input_variance,
            n,
            HAS_GRAD_MEAN=grad_mean is not None,
            HAS_GRAD_VARIANCE=grad_variance is not None,
            BLOCK=BLOCK,
            **_LAUNCH,
        )


def gate_product(
    mean: Tensor,
    variance: Tensor,
    gate_mean: Tensor,
    gate_variance: Tensor,
    out_mean: Tensor,
    out_variance: Tensor,
    count: int | None = None,
) -> None:
    """gate.c's ``gate_product``: (E, Var) of x g for independent x ~ (m, v), g ~ (m_g, v_g). All (count,)."""
    n = _data("gate_product", count, mean, variance, gate_mean, gate_variance, out_mean, out_variance)
    if n:
        _gate_forward_kernel[_grid(n, BLOCK)](
            mean, variance, gate_mean, gate_variance, out_mean, out_variance, n, BLOCK=BLOCK, **_LAUNCH
        )


def gate_product_backward(
    mean: Tensor,
    variance: Tensor,
    gate_mean: Tensor,
    gate_variance: Tensor,
    grad_mean: Tensor | None,
    grad_variance: Tensor | None,
    grad_input_mean: Tensor,
    grad_input_variance: Tensor,
    grad_gate_mean: Tensor,
    grad_gate_variance: Tensor,
    count: int | None = None,
) -> None:
    """gate.c's ``gate_product_backward``: ∂L/∂(m, v, m_g, v_g) from ∂L/∂(E, Var) (None: zero). All (count,)."""
    inputs = (mean, variance, gate_mean, gate_variance)
    outputs = (grad_input_mean, grad_input_variance, grad_gate_mean, grad_gate_variance)
    n = _data("gate_product_backward", count, *inputs, grad_mean, grad_variance, *outputs)
    if n:
        _gate_backward_kernel[_grid(n, BLOCK)](
            *inputs,
            mean if grad_mean is None else grad_mean,
            mean if grad_variance is None else grad_variance,
            *outputs,
            n,
            HAS_GRAD_MEAN=grad_mean is not None,
            HAS_GRAD_VARIANCE=grad_variance is not None,
            BLOCK=BLOCK,
            **_LAUNCH,
        )


def _hermite_launch(name: str, parameters: Tensor, mean: Tensor, kept: Tensor, n: int) -> tuple[_Table, dict]:
    table = _table(name, parameters, mean.device)
    nodes, kind = table.header
    if kind not in _HERMITE_KINDS or nodes < 1 or parameters.numel() < 2 + 2 * nodes:
        raise BKNInputError(f"kernels.elementwise_moments.{name}: parameters {nodes=} {kind=} are not a rule")
    _kept(name, kept, mean.device, n, nodes)
    node_block = next_power_of_2(nodes)
    options = {
        "NODES": nodes,
        "KIND": kind,
        "BLOCK": max(1, min(64, HERMITE_TILE // node_block)),
        "NODE_BLOCK": node_block,
        **_LAUNCH,
    }
    return table, options


def gauss_hermite_moments(
    mean: Tensor,
    variance: Tensor,
    parameters: Tensor,
    kept: Tensor,
    out_mean: Tensor,
    out_variance: Tensor,
    count: int | None = None,
) -> None:
    """gauss_hermite.c's ``gauss_hermite_moments``: (E, Var) of f(X), f = silu / sigmoid / tanh, by the n-node
    rule in ``parameters`` (CPU float64 [n, kind, z, w]); writes u (count, n) into ``kept`` for the backward."""
    n = _data("gauss_hermite_moments", count, mean, variance, out_mean, out_variance)
    table, options = _hermite_launch("gauss_hermite_moments", parameters, mean, kept, n)
    if n:
        rule = table.device_table
        nodes = options["NODES"]
        _hermite_forward_kernel[_grid(n, options["BLOCK"])](
            mean, variance, rule[2:], rule[2 + nodes :], kept, out_mean, out_variance, n, **options
        )


def gauss_hermite_moments_backward(
    mean: Tensor,
    variance: Tensor,
    parameters: Tensor,
    kept: Tensor,
    grad_mean: Tensor | None,
    grad_variance: Tensor | None,
    grad_input_mean: Tensor,
    grad_input_variance: Tensor,
    count: int | None = None,
) -> None:
    """gauss_hermite.c's ``gauss_hermite_moments_backward``: ∂L/∂(μ, v) from ∂L/∂(E, Var) (None: zero) and the
    forward's ``kept`` (count, n)."""
    tensors = (mean, variance, grad_mean, grad_variance, grad_input_mean, grad_input_variance)
    n = _data("gauss_hermite_moments_backward", count, *tensors)
    table, options = _hermite_launch("gauss_hermite_moments_backward", parameters, mean, kept, n)
    if n:
        rule = table.device_table
        nodes = options["NODES"]
        _hermite_backward_kernel[_grid(n, options["BLOCK"])](
            mean,
            variance,
            rule[2:],
            rule[2 + nodes :],
            kept,
            mean if grad_mean is None else grad_mean,
            mean if grad_variance is None else grad_variance,
            grad_input_mean,
            grad_input_variance,
            n,
            HAS_GRAD_MEAN=grad_mean is not None,
            HAS_GRAD_VARIANCE=grad_variance is not None,
            **options,
        )


def _piecewise_launch(name: str, parameters: Tensor, mean: Tensor, kept: Tensor, n: int) -> tuple[_Table, dict]:
    table = _table(name, parameters, mean.device)
    pieces, order = table.header
    if not 1 <= pieces <= MAX_PIECES or order not in (2, 4) or parameters.numel() < 3 + 4 * pieces:
        raise BKNInputError(
            f"kernels.elementwise_moments.{name}: parameters {pieces=} {order=} are not a piece table "
            f"(1 to {MAX_PIECES} pieces, order 2 or 4)"
        )
    _kept(name, kept, mean.device, n, (order + 1) * pieces)
    piece_block = next_power_of_2(pieces)
    options = {
        "PIECES": pieces,
        "ORDER": order,
        "BLOCK": PIECEWISE_TILE // piece_block,
        "PIECE_BLOCK": piece_block,
        **_LAUNCH,
    }
    return table, options


def piecewise_moments(
    mean: Tensor,
    variance: Tensor,
    parameters: Tensor,
    kept: Tensor,
    out_mean: Tensor,
    out_variance: Tensor,
    count: int | None = None,
) -> None:
    """piecewise.c's ``piecewise_moments``: (E, Var) of a continuous piecewise-quadratic f(X) by the piece
    table ``parameters`` (CPU float64 [P, order, b, c0, c1, c2]); writes the truncated moments
    (count, (order + 1) P) into ``kept`` for the backward."""
    n = _data("piecewise_moments", count, mean, variance, out_mean, out_variance)
    table, options = _piecewise_launch("piecewise_moments", parameters, mean, kept, n)
    if n:
        _piecewise_forward_kernel[_grid(n, options["BLOCK"])](
            mean, variance, table.device_table, kept, out_mean, out_variance, n, **options
        )


def piecewise_moments_backward(
    mean: Tensor,
    variance: Tensor,
    parameters: Tensor,
    kept: Tensor,
    grad_mean: Tensor | None,
    grad_variance: Tensor | None,
    grad_input_mean: Tensor,
    grad_input_variance: Tensor,
    count: int | None = None,
) -> None:
    """piecewise.c's ``piecewise_moments_backward``: ∂L/∂(μ, v) from ∂L/∂(E, Var) (None: zero) and the
    forward's ``kept``."""
    tensors = (mean, variance, grad_mean, grad_variance, grad_input_mean, grad_input_variance)
    n = _data("piecewise_moments_backward", count, *tensors)
    table, options = _piecewise_launch("piecewise_moments_backward", parameters, mean, kept, n)
    if n:
        _piecewise_backward_kernel[_grid(n, options["BLOCK"])](
            mean,
            variance,
            table.device_table,
            kept,
            mean if grad_mean is None else grad_mean,
            mean if grad_variance is None else grad_variance,
            grad_input_mean,
            grad_input_variance,
            n,
            HAS_GRAD_MEAN=grad_mean is not None,
            HAS_GRAD_VARIANCE=grad_variance is not None,
            **options,
        )


def _erfc_values(x: Tensor, out: Tensor, count: int | None = None, block: int = BLOCK) -> None:
    """out = erfc(x) by the kernels' erfc (:func:`_erfc`), one launch of ``block`` elements per program: no C
    kernel mirrors it (it is not in ``LAUNCHERS``); the tests measure the device erfc through it."""
    n = _data("erfc_values", count, x, out)
    if n:
        _erfc_kernel[_grid(n, block)](x, out, n, BLOCK=block, **_LAUNCH)


#: Each C kernel name this module mirrors, to its launcher (the ``native.call`` arguments, ``count=None``).
LAUNCHERS: dict[str, Callable[..., None]] = {
    "relu_moments": relu_moments,
    "relu_moments_backward": relu_moments_backward,
    "gate_product": gate_product,
    "gate_product_backward": gate_product_backward,
    "gauss_hermite_moments": gauss_hermite_moments,
    "gauss_hermite_moments_backward": gauss_hermite_moments_backward,
    "piecewise_moments": piecewise_moments,
    "piecewise_moments_backward": piecewise_moments_backward,
}

#: Kernels launched per call (0 when the count is 0).
LAUNCHES: dict[str, int] = dict.fromkeys(LAUNCHERS, 1)
