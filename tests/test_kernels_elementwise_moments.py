"""The Triton twins of the per-element C kernels (``bkn_export.kernels.elementwise_moments``) compute what the C
kernels and the PyTorch forms of :mod:`bkn_export.chain.fast` compute.

Kernels: ``relu_moments`` (relu.c), ``gate_product`` (gate.c), ``gauss_hermite_moments`` (gauss_hermite.c:
silu, sigmoid, tanh), ``piecewise_moments`` (piecewise.c: hardswish, hardsigmoid, relu6, leaky_relu,
hardtanh), each with its backward. They run under ``TRITON_INTERPRET=1`` in a child process
(:class:`support.triton_interpreter.InterpreterProcess`, which says why a child) on CPU tensors, with the
launchers' arguments exactly as the ``native.call`` sites pass them; outputs are written in place.

Checked, for float64 and float32, element counts 1, 3, 67 and 1031, hostile rows (variance 0, below and at
the 1e-12 floor, negative, huge, NaN and ±inf means and variances) and None output gradients:

* against the C kernel (``native.call``, same arguments; its backward reading the Triton forward's kept):
  every output, the ``kept`` buffers, NaN in the same places. Both compute in double and differ only where
  φ's exp differs by an ulp (NumPy's against libm's), where the kernels' own erfc differs from glibc's
  (≤ 1.6e-15 relative, below) and by the order of the sums over nodes and pieces. Measured (1031 elements with
  the hostile rows), |Δ| / (|C| + 1e-3 max |C|): ≤ 3e-13 in float64 (relu6; ≤ 3e-14 for the others) except
  Gauss–Hermite's ∂L/∂v at the variance floor (σ = 1e-6: sums of terms ~1e6 larger than the result, 2e-10);
  bounds 1e-11 relative + 1e-13 of the largest (1e-9 + 1e-11 for Gauss–Hermite gradients). In float32 both
  round the same double once: equal up to one float32 ulp (bound 2⁻²³ relative; measured: equal).
* against the PyTorch form (the Function under ``native.disabled()``: values by its forward, gradients
  by its closed-form backward through autograd): in float64 to 1e-9 relative plus 1e-12 of the largest
  magnitude (Gauss–Hermite: 1e-10, the f(x_j) − E rounding the C tests describe; piecewise: plus what two
  ulps in the kept truncated moments do to the gradients, where σ = 1e4 makes them ill-conditioned),
  non-finite where it is non-finite, NaN where it is NaN except where an input is infinite (silu(−inf):
  −inf against NaN, as tests/test_native_hostile.py allows); measured ≤ 7e-9 (Gauss–Hermite at small σ),
  2e-10 (relu6), ≤ 4e-14 for the others. In float32 the kernels compute in double and round once, so against the
  float64 form they are at least as accurate as the float32 form (+ 1e-7 of the largest magnitude, as
  tests/test_native*.py require of the C kernels); measured ≤ 6e-8 relative (float32 rounding).

Plus: the kernels' erfc against math.erfc over [−30, 30] (relative error ≤ 1e-14, special values exact), ReLU
over a dense grid of μ/σ (both branches of the kernels' erfc), ``count``, a float32 ``kept``, the
launchers' input checks; every kernel variant the launchers start compiles to an sm_90 cubin with Triton's own
compiler without spilling (no GPU needed); the launchers read no tensor value on the host (data on the meta
device) and launch ``LAUNCHES[name]`` kernels per call. Nothing here ran on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from support.triton_compile import Launch, ScalarReads, compile_for_hopper, record_kernels, resource_usage
from support.triton_interpreter import InterpreterProcess
from torch import Tensor

from bkn_export import moments, native
from bkn_export.chain import fast
from bkn_export.errors import BKNInputError

pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")

F32, F64 = torch.float32, torch.float64
MODULE = "bkn_export.kernels.elementwise_moments"
COUNTS = (1, 3, 67, 1031)
needs_library = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")


@dataclass(frozen=True)
class Kind:
    """One Function of chain.fast and the C kernel pair it calls: relu, gate, hermite (silu / sigmoid /
    tanh) or piecewise (with the activation's parameters)."""

    name: str
    family: str
    params: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        return self.name

    @property
    def kernel(self) -> str:
        return {
            "relu": "relu_moments",
            "gate": "gate_product",
            "hermite": "gauss_hermite_moments",
            "piecewise": "piecewise_moments",
        }[self.family]


KINDS = (
    Kind("relu", "relu"),
    Kind("gate", "gate"),
    Kind("silu", "hermite"),
    Kind("sigmoid", "hermite"),
    Kind("tanh", "hermite"),
    Kind("hardswish", "piecewise"),
    Kind("hardsigmoid", "piecewise"),
    Kind("relu6", "piecewise"),
    Kind("leaky_relu", "piecewise", (("negative_slope", 0.2),)),
    Kind("hardtanh", "piecewise", (("max_val", 2.0), ("min_val", -1.0))),
)


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterProcess]:
    with InterpreterProcess() as process:
        yield process


# --------------------------------------------------------------------------- inputs and the three implementations

#: (mean, variance) rows of every hostile kind: NaN / ±inf mean and variance, variance 0, below and at the
#: floor, negative, huge; a mean far beyond ±30 σ.
_HOSTILE = (
    (0.0, 1.0),
    (1.0, math.nan),
    (math.nan, 1.0),
    (math.inf, 1.0),
    (-math.inf, 1.0),
    (0.5, math.inf),
    (2.0, 0.0),
    (2.0, -1.0),
    (-1.0, 1e-20),
    (0.3, 1e-12),
    (-4.0, 1e8),
    (-50.0, 1.0),
    (50.0, 1.0),
)


def _data(count: int, dtype: torch.dtype, hostile: bool, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, variance, gate mean, gate variance) of ``count`` elements, with the hostile rows first where asked
    (count ≥ their number). Even elements: σ from 0.2 to 4 and μ = a σ, a from −9 to 9 (every branch of erfc,
    every breakpoint of the piecewise kinds within a few σ); odd ones: μ ~ 3 N(0, 1), σ from 1e-7 to 4."""
    generator = torch.Generator().manual_seed(seed)
    std = torch.exp(torch.empty(count, dtype=F64).uniform_(math.log(1e-7), math.log(4.0), generator=generator))
    std[::2] = torch.empty_like(std[::2]).uniform_(0.2, 4.0, generator=generator)
    mean = torch.randn(count, generator=generator, dtype=F64) * 3.0
    mean[::2] = torch.empty_like(mean[::2]).uniform_(-9.0, 9.0, generator=generator) * std[::2]
    variance = std * std
    if hostile:
        rows = torch.tensor(_HOSTILE, dtype=F64)
        mean[: len(rows)], variance[: len(rows)] = rows[:, 0], rows[:, 1]
    gate_mean = torch.rand(count, generator=generator, dtype=F64)
    gate_variance = torch.rand(count, generator=generator, dtype=F64) * 0.1
    gate_variance[::3] = 0.0  # point masses: with variance 0 too (row 6) the product's variance is exactly 0
    return tuple(t.to(dtype) for t in (mean, variance, gate_mean, gate_variance))  # type: ignore[return-value]


def _constants(kind: Kind, dtype: torch.dtype) -> Tensor | None:
    """The kernel's parameters tensor, as the Function builds it (CPU float64)."""
    if kind.family == "hermite":
        return fast._hermite_parameters(kind.name, moments.GAUSS_HERMITE_NODES[kind.name])
    if kind.family == "piecewise":
        plan = fast._plan(kind.name, kind.params)
        assert plan is not None and plan[0] == "piecewise"
        table = fast._piecewise_table(plan[1], dtype, torch.device("cpu"), 1)
        assert table.native is not None
        return table.native
    return None


def _kept_per_element(kind: Kind, parameters: Tensor | None) -> int:
    assert parameters is not None
    header = [int(v) for v in parameters[:2].tolist()]
    return header[0] if kind.family == "hermite" else (header[1] + 1) * header[0]


def _leading(kind: Kind, data: tuple[Tensor, ...], kept: Tensor | None) -> tuple[Tensor, ...]:
    """The inputs both kernels of ``kind`` take first (``native.call``'s order)."""
    mean, variance, gate_mean, gate_variance = data
    if kind.family == "relu":
        return (mean, variance)
    if kind.family == "gate":
        return (mean, variance, gate_mean, gate_variance)
    parameters = _constants(kind, mean.dtype)
    assert parameters is not None and kept is not None
    return (mean, variance, parameters, kept)


def _run(
    kind: Kind,
    data: tuple[Tensor, ...],
    grads: tuple[Tensor | None, Tensor | None],
    launch: Any,
    backward_kept: Tensor | None = None,
) -> dict[str, Tensor]:
    """Both kernels of ``kind`` through ``launch(name, *tensors) -> tensors after the call``: "mean",
    "variance", "kept" (Gauss–Hermite, piecewise), "grad_0" … (one per input with a gradient). The backward
    reads the forward's kept, or ``backward_kept``."""
    mean = data[0]
    parameters = _constants(kind, mean.dtype)
    kept = None
    if parameters is not None:
        kept = torch.full((mean.numel(), _kept_per_element(kind, parameters)), math.pi, dtype=F64)
    after = launch(kind.kernel, *_leading(kind, data, kept), torch.empty_like(mean), torch.empty_like(mean))
    results = {"mean": after[-2], "variance": after[-1]}
    if kept is not None:
        results["kept"] = after[3]
    results.update(
        _backward(kind, data, grads, launch, results.get("kept") if backward_kept is None else backward_kept)
    )
    return results


def _backward(
    kind: Kind, data: tuple[Tensor, ...], grads: tuple[Tensor | None, Tensor | None], launch: Any, kept: Tensor | None
) -> dict[str, Tensor]:
    """The backward kernel alone, reading ``kept`` (a copy: the kernels must not write it)."""
    inputs = 4 if kind.family == "gate" else 2
    outputs = [torch.empty_like(data[0]) for _ in range(inputs)]
    leading = _leading(kind, data, None if kept is None else kept.clone())
    after = launch(kind.kernel + "_backward", *leading, *grads, *outputs)
    return {f"grad_{i}": t for i, t in enumerate(after[-inputs:])}


def _c_kernel(name: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    native.call(name, *tensors)
    return tensors


def _pytorch_form(
    kind: Kind, data: tuple[Tensor, ...], grads: tuple[Tensor | None, Tensor | None]
) -> dict[str, Tensor]:
    """The Function's values and closed-form gradients with the C kernels off."""
    inputs = [t.clone().requires_grad_() for t in (data if kind.family == "gate" else data[:2])]
    with native.disabled():
        if kind.family == "relu":
            outputs = fast.relu_moments(*inputs)
        elif kind.family == "gate":
            outputs = fast.gate_product(*inputs)
        elif kind.family == "hermite":
            outputs = fast.gauss_hermite_moments(kind.name, *inputs)  # type: ignore[assignment]
        else:
            outputs = fast.piecewise_moments(kind.name, *inputs, **dict(kind.params))  # type: ignore[assignment]
        assert outputs is not None and not outputs[0].grad_fn.native  # type: ignore[union-attr]
        reached = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        gradients = torch.autograd.grad(
            [o for o, _ in reached], inputs, [g for _, g in reached], materialize_grads=True
        )
    results = {"mean": outputs[0].detach(), "variance": outputs[1].detach()}
    results.update({f"grad_{i}": g for i, g in enumerate(gradients)})
    return results


def _double(tensors: tuple[Tensor | None, ...]) -> tuple[Any, ...]:
    return tuple(None if t is None else t.double() for t in tensors)


def _kept_sensitivity(
    interpreter: InterpreterProcess,
    kind: Kind,
    data: tuple[Tensor, ...],
    grads: tuple[Tensor | None, Tensor | None],
    kept: Tensor | None,
) -> dict[str, Tensor]:
    """How much the float64 gradients move when each kept value moves by 2 ulps of its row's largest (signs
    alternating): what an ulp of exp or erfc inside the forward may do to them. Where a formula is
    ill-conditioned (piecewise gradients at σ = 1e4: I_1 = φ(lo) − φ(hi) ~ 1e-7 from values ~0.4, times
    d1 = c1 σ ~ 1e4) that is the size of a rounding difference between two correct implementations (the
    kernels' exp is NumPy's here, the PyTorch form's ATen's), not an error."""
    if kind.family != "piecewise" or kept is None or kept.dtype != F64:
        return {}  # (Gauss–Hermite's kept u are the C kernel's bit for bit: no such effect)
    signs = 1.0 - 2.0 * (torch.arange(kept.numel()) % 2).reshape(kept.shape).to(F64)
    row_scale = kept.abs().amax(dim=1, keepdim=True)
    moved = kept + 2.0 * torch.finfo(F64).eps * row_scale * signs
    launch = lambda name, *t: interpreter.call_in_place(f"{MODULE}:{name}", *t)  # noqa: E731
    own = _backward(kind, data, grads, launch, kept)
    other = _backward(kind, data, grads, launch, moved)
    return {key: (own[key] - other[key]).abs() for key in own if key.startswith("grad")}


def _cotangents(count: int, dtype: torch.dtype, which: str) -> tuple[Tensor | None, Tensor | None]:
    generator = torch.Generator().manual_seed(7)
    grad_mean, grad_variance = (torch.randn(count, generator=generator, dtype=F64).to(dtype) for _ in range(2))
    return (grad_mean if which != "variance" else None, grad_variance if which != "mean" else None)


# --------------------------------------------------------------------------- comparisons


def _assert_close(
    got: Tensor,
    want: Tensor,
    rtol: float,
    scaled: float,
    what: str,
    nan_where: Tensor | None = None,
    sensitivity: Tensor | None = None,
) -> None:
    """Non-finite where ``want`` is, NaN where it is NaN (on ``nan_where``), and elsewhere
    |got − want| ≤ rtol |want| + scaled · max |want| (+ 4 · sensitivity) over the finite entries."""
    got, want = got.double(), want.double()
    allowance = torch.zeros_like(want) if sensitivity is None else 4.0 * torch.nan_to_num(sensitivity, 0.0, 0.0, 0.0)
    assert got.shape == want.shape, what
    where = torch.ones_like(want, dtype=torch.bool) if nan_where is None else nan_where
    assert torch.equal(got.isnan()[where], want.isnan()[where]), f"{what}: NaN pattern {got} != {want}"
    assert torch.equal(got.isfinite(), want.isfinite()), f"{what}: non-finite pattern {got} != {want}"
    finite = want.isfinite()
    if not bool(finite.any()):
        return
    got, want = got[finite], want[finite]
    bound = rtol * want.abs() + scaled * float(want.abs().max()) + allowance[finite]
    excess = (got - want).abs() - bound
    worst = int(excess.argmax())
    assert float(excess[worst]) <= 0, (
        f"{what}: {float(got[worst]):.17g} against {float(want[worst]):.17g} (allowed {float(bound[worst]):.3g})"
    )


CASES = [
    pytest.param(kind, count, dtype, id=f"{kind}-{count}-{str(dtype).removeprefix('torch.')}")
    for kind in KINDS
    for count in COUNTS
    for dtype in (F64, F32)
]


@needs_library
@pytest.mark.parametrize(("kind", "count", "dtype"), CASES)
def test_kernels_equal_the_c_kernels(
    interpreter: InterpreterProcess, kind: Kind, count: int, dtype: torch.dtype
) -> None:
    """Values, kept buffers and gradients (both, or one output reaching the loss) as the C kernels', the
    backwards reading the same kept."""
    data = _data(count, dtype, hostile=count > len(_HOSTILE))
    for which in ("both", "mean", "variance") if count == 67 else ("both",):
        grads = _cotangents(count, dtype, which)
        got = _run(kind, data, grads, lambda name, *t: interpreter.call_in_place(f"{MODULE}:{name}", *t))
        # The C backward reads the Triton forward's kept: piecewise gradients at σ = 1e4 amplify an ulp of φ in
        # the truncated moments (I_1 = φ(lo) − φ(hi) ~ 1e-7) by 1e4 (d1 = c1 σ); the kept are compared apart.
        want = _run(kind, data, grads, _c_kernel, got.get("kept"))
        assert got.keys() == want.keys()
        for key in want:
            rtol, scaled = (1e-11, 1e-13) if dtype == F64 or key == "kept" else (2.0**-23, 1e-13)
            if kind.family == "hermite" and key.startswith("grad"):
                # Σ_j ∂L/∂x_j z_j / (2σ) at σ = 1e-6 (the floor): terms ~1e6 larger than the sum, summed in another
                # order (a tree here, 8 lanes in C); measured 4e-11 relative.
                rtol, scaled = max(rtol, 1e-9), 1e-11
            _assert_close(got[key], want[key], rtol, scaled, f"{kind} {key} ({which})")


@pytest.mark.parametrize(("kind", "count", "dtype"), CASES)
def test_kernels_equal_the_pytorch_forms(
    interpreter: InterpreterProcess, kind: Kind, count: int, dtype: torch.dtype
) -> None:
    """Values and gradients (both, or one output reaching the loss) as the Function's PyTorch form (float64),
    at least as accurate as it (float32)."""
    data = _data(count, dtype, hostile=count > len(_HOSTILE))
    infinite = torch.zeros(count, dtype=torch.bool)
    for t in data:
        infinite |= t.isinf()
    for which in ("both", "mean", "variance") if count == 67 else ("both",):
        grads = _cotangents(count, dtype, which)
        got = _run(kind, data, grads, lambda name, *t: interpreter.call_in_place(f"{MODULE}:{name}", *t))
        kept = got.pop("kept", None)
        if dtype == F64:
            want = _pytorch_form(kind, data, grads)
            scaled = 1e-10 if kind.family == "hermite" else 1e-12
            sensitivity = _kept_sensitivity(interpreter, kind, data, grads, kept)
            for key in want:
                _assert_close(
                    got[key], want[key], 1e-9, scaled, f"{kind} {key} ({which})", ~infinite, sensitivity.get(key)
                )
            continue
        exact = _pytorch_form(kind, _double(data), _double(grads))
        same = _pytorch_form(kind, data, grads)
        finite = torch.ones(count, dtype=torch.bool)
        for t in exact.values():
            finite &= t.isfinite()
        for key in exact:
            assert got[key].dtype == F32
            error = (got[key].double() - exact[key])[finite].abs().max()
            same_error = (same[key].double() - exact[key])[finite].abs().max()
            assert error <= same_error + 1e-7 * exact[key][finite].abs().max(), f"{kind} {key} ({which})"


def test_relu_covers_every_branch_of_erfc(interpreter: InterpreterProcess) -> None:
    """ReLU's moments and gradients over a = μ/σ from −45 to 45 in steps of 0.01 (Φ(±a) = erfc(∓a/√2)/2:
    erfc's arguments cover ±21.2, both branches of the kernels' erfc (the switch at |x| = 1.5), and the clamp
    at ±30), as torch.special.erfc's (the float64 PyTorch form) to 1e-12 relative (measured: 3e-14)."""
    mean = torch.arange(-4500, 4501, dtype=F64) / 100.0
    variance = torch.ones_like(mean)
    grads = _cotangents(mean.numel(), F64, "both")
    got = _run(
        Kind("relu", "relu"),
        (mean, variance, mean, mean),
        grads,
        lambda name, *t: interpreter.call_in_place(f"{MODULE}:{name}", *t),
    )
    want = _pytorch_form(Kind("relu", "relu"), (mean, variance, mean, mean), grads)
    for key in want:
        _assert_close(got[key], want[key], 1e-12, 1e-15, f"relu {key}")


#: Edge points of the erfc test: ±0, the smallest subnormal, tiny arguments, either side of the switch at
#: |x| = 1.5, the underflow (from x ≈ 27.2 libm's erfc is subnormal, from 27.3 it is 0), huge, ±inf.
_ERFC_EDGES = (
    0.0,
    5e-324,
    2.2250738585072014e-308,
    1e-300,
    1e-20,
    2.0**-56,
    1e-8,
    0.5,
    1.0,
    math.nextafter(1.5, 0.0),
    1.5,
    math.nextafter(1.5, 2.0),
    2.0,
    26.5,
    26.6,
    27.0,
    27.2,
    27.22,
    27.23,
    27.25,
    27.3,
    27.5,
    28.0,
    30.0,
    1e10,
    1e300,
    math.inf,
)

#: Arguments whose erfc the kernels' erfc must return exactly: 1 at ±0 and where |x| < 2^-56, 0 from 27.3
#: (underflow) and at +inf, 2 from x = −6 (erfc(−6) = 2 − 2e-17) and at −inf, NaN at NaN.
_ERFC_EXACT = (
    (0.0, 1.0),
    (-0.0, 1.0),
    (5e-324, 1.0),
    (-5e-324, 1.0),
    (1e-20, 1.0),
    (-1e-20, 1.0),
    (27.3, 0.0),
    (28.0, 0.0),
    (1e300, 0.0),
    (math.inf, 0.0),
    (-6.0, 2.0),
    (-27.3, 2.0),
    (-1e300, 2.0),
    (-math.inf, 2.0),
)


def test_erfc_is_accurate(interpreter: InterpreterProcess) -> None:
    """The kernels' erfc (``_erfc``, through ``_erfc_values``) against Python's math.erfc (libm's, within about
    an ulp) over [−30, 30] in steps of 1e-4 and at the edge points: relative error ≤ 1e-14 where erfc > 1e-300
    (the bound the module docstring derives for a libdevice erf of 2 ulps; measured under the interpreter,
    NumPy's exp and libm's erf: 1.6e-15 on [1.25, 1.5), where erf's rounding is the largest share of
    1 − erf(x), ≤ 7.2e-16 on [0, 1.25), ≤ 7.9e-16 from 1.5 to the subnormals, ≤ 2.3e-16 for x < 0); below
    1e-300 that plus two units of the smallest subnormal (1e-323); exact at ±0, tiny, ±inf, NaN and in the
    saturated tails (_ERFC_EXACT)."""
    grid = torch.arange(-300000, 300001, dtype=F64) / 10000.0
    edges = torch.tensor(_ERFC_EDGES, dtype=F64)
    x = torch.cat([grid, edges, -edges, torch.tensor([math.nan], dtype=F64)])
    got = interpreter.call_in_place(f"{MODULE}:_erfc_values", x, torch.empty_like(x), block=65536)[1]
    want = torch.tensor([math.erfc(v) for v in x.tolist()], dtype=F64)
    assert torch.equal(got.isnan(), want.isnan()), "erfc: NaN pattern"
    finite = ~want.isnan()
    got, want, x = got[finite], want[finite], x[finite]
    error = (got - want).abs()
    normal = want > 1e-300
    relative = error[normal] / want[normal]
    worst = int(relative.argmax())
    at, value, libm = (float(t[normal][worst]) for t in (x, got, want))
    assert float(relative[worst]) <= 1e-14, f"erfc({at!r}) = {value!r}, math.erfc: {libm!r}"
    excess = error[~normal] - (1e-14 * want[~normal] + 1e-323)
    assert float(excess.max()) <= 0, "erfc: more than 1e-14 relative plus two subnormal units off below 1e-300"
    points = torch.tensor([p for p, _ in _ERFC_EXACT] + [math.nan], dtype=F64)
    exact = interpreter.call_in_place(f"{MODULE}:_erfc_values", points, torch.empty_like(points))[1]
    assert exact[:-1].tolist() == [v for _, v in _ERFC_EXACT] and math.isnan(exact[-1]), exact.tolist()


# --------------------------------------------------------------------------- count, None, checks


def test_count_limits_the_elements_written(interpreter: InterpreterProcess) -> None:
    """``count`` elements are read and written (the C convention); 0 launches nothing."""
    mean, variance, *_ = _data(67, F64, hostile=False)
    full = interpreter.call_in_place(f"{MODULE}:relu_moments", mean, variance, *(torch.empty_like(mean) for _ in "ab"))
    untouched = [torch.full_like(mean, -7.0) for _ in range(2)]
    after = interpreter.call_in_place(f"{MODULE}:relu_moments", mean, variance, *untouched, count=40)
    for got, want in zip(after[2:], full[2:]):
        assert torch.equal(got[:40], want[:40]) and (got[40:] == -7.0).all()
    after = interpreter.call_in_place(f"{MODULE}:relu_moments", mean, variance, *untouched, count=0)
    assert all((t == -7.0).all() for t in after[2:])


def test_parameters_must_be_a_cpu_float64_table() -> None:
    from bkn_export.kernels import elementwise_moments as kernels

    mean = torch.zeros(3, device="meta")
    parameters = fast._hermite_parameters("silu", 64)
    kept = torch.empty(3, 64, dtype=F64, device="meta")
    with pytest.raises(BKNInputError, match="float64 CPU tensor"):
        kernels.gauss_hermite_moments(mean, mean, parameters.to("meta"), kept, mean, mean)
    with pytest.raises(BKNInputError, match="one dtype"):
        kernels.relu_moments(mean, mean.double(), mean, mean)
    with pytest.raises(BKNInputError, match="kept holds"):
        kernels.gauss_hermite_moments(mean, mean, parameters, kept[:2], mean, mean)


@pytest.mark.parametrize("kind", [Kind("tanh", "hermite"), Kind("hardswish", "piecewise")], ids=str)
def test_kept_in_float32(interpreter: InterpreterProcess, kind: Kind) -> None:
    """A float32 ``kept`` (the caller's choice) is written and read as float32: the same moments, the float64
    kept rounded, gradients within that rounding's effect at σ ≥ 0.2 (1e-6 of the largest). (At small σ
    Gauss–Hermite's ∂L/∂v amplifies u's float32 rounding by ~1/σ: 3 % at σ = 1e-7. Pass float64 kept.)"""
    data = _data(67, F64, hostile=False)
    std = torch.linspace(0.2, 4.0, 67, dtype=F64)
    data = (data[0], std * std, *data[2:])
    grads = _cotangents(67, F64, "both")
    launch = lambda name, *t: interpreter.call_in_place(f"{MODULE}:{name}", *t)  # noqa: E731
    wide = _run(kind, data, grads, launch)
    parameters = _constants(kind, F64)
    kept = torch.zeros(67, _kept_per_element(kind, parameters), dtype=F32)
    after = launch(kind.kernel, *_leading(kind, data, kept), torch.empty(67, dtype=F64), torch.empty(67, dtype=F64))
    assert after[3].dtype == F32
    assert torch.equal(after[3], wide["kept"].float())
    assert torch.equal(after[-2], wide["mean"]) and torch.equal(after[-1], wide["variance"])
    narrow = _backward(kind, data, grads, launch, after[3])
    for key, value in narrow.items():
        _assert_close(value, wide[key], 0.0, 1e-6, f"{kind} {key}")


# --------------------------------------------------------------------------- no host reads, launches, sm_90


#: Every constexpr branch of the kernels: each family, each Gauss–Hermite kind (at its default node count),
#: both piecewise orders (quadratic: hardswish; linear: relu6, as leaky_relu and hardtanh).
_VARIANTS = [
    Kind("relu", "relu"),
    Kind("gate", "gate"),
    Kind("silu", "hermite"),
    Kind("sigmoid", "hermite"),
    Kind("tanh", "hermite"),
    Kind("hardswish", "piecewise"),
    Kind("relu6", "piecewise"),
]


def _recorded_launches(
    kind: Kind, dtype: torch.dtype, which: str, device: str = "meta"
) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """Both launchers of ``kind`` with every kernel replaced by a recorder, on data tensors of ``device``
    (meta: no value to read) and the CPU parameters the Functions pass; (kernel, args, kwargs) per launch."""
    from bkn_export.kernels import elementwise_moments as kernels

    calls: list[Launch] = []
    with pytest.MonkeyPatch.context() as patch:
        record_kernels(patch, (kernels,), calls)
        _launch_both(kernels, kind, dtype, which, device, calls)
    return calls


def _launch_both(kernels: Any, kind: Kind, dtype: torch.dtype, which: str, device: str, calls: list[Any]) -> None:
    data = tuple(torch.empty(37, dtype=dtype, device=device) for _ in range(4))
    grads = tuple(
        torch.empty(37, dtype=dtype, device=device) if which in (w, "both") else None for w in ("mean", "variance")
    )
    parameters = _constants(kind, dtype)
    kept = (
        None if parameters is None else torch.empty(37, _kept_per_element(kind, parameters), dtype=F64, device=device)
    )
    leading = _leading(kind, data, kept)
    outputs = [torch.empty(37, dtype=dtype, device=device) for _ in range(4)]
    kernels.LAUNCHERS[kind.kernel](*leading, *outputs[:2])
    assert len(calls) == kernels.LAUNCHES[kind.kernel]
    kernels.LAUNCHERS[kind.kernel + "_backward"](*leading, *grads, *outputs[: 4 if kind.family == "gate" else 2])
    assert len(calls) == kernels.LAUNCHES[kind.kernel] + kernels.LAUNCHES[kind.kernel + "_backward"]


@pytest.mark.parametrize("kind", _VARIANTS, ids=str)
def test_launchers_read_no_tensor_value_on_the_host(kind: Kind) -> None:
    """Launch decisions use shapes, dtypes and the CPU parameters' header only (on a GPU a device read would
    synchronise and break CUDA-graph capture): with the data on the meta device (any read raises) and the
    kernels recorded, nothing is read back, one launch per call (``LAUNCHES``)."""
    for which in ("both", "mean", "variance"):
        with ScalarReads() as mode:
            calls = _recorded_launches(kind, F32, which)
        assert mode.reads == []
        assert all(t.device.type == "meta" for _, args, _ in calls for t in args if isinstance(t, Tensor))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", _VARIANTS, ids=str)
def test_kernels_compile_for_an_h100(kind: Kind, dtype: torch.dtype) -> None:
    """Every kernel variant (family, kind, order, dtype; which gradients reach the loss) compiles to an
    sm_90 cubin with Triton's own compiler and ptxas (the interpreter accepts code the compiler rejects),
    without spilling registers (cuobjdump's resource usage, where Triton ships cuobjdump)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; kernels are interpreted, not compiled")
    seen: set[tuple[str, tuple[tuple[str, Any], ...]]] = set()
    # Which gradients reach the loss changes only constexpr branches common to both dtypes: all three in float32.
    for which in ("both", "mean", "variance") if dtype == F32 else ("both",):
        for kernel, args, kwargs in _recorded_launches(kind, dtype, which):
            key = (kernel.__name__, tuple(sorted((k, v) for k, v in kwargs.items() if k.isupper())))
            if key in seen:
                continue
            seen.add(key)
            compiled = compile_for_hopper(kernel, args, dict(kwargs))
            assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"
            usage = resource_usage(compiled.asm["cubin"])
            assert usage is None or ("STACK:0" in usage and "LOCAL:0" in usage), f"{kernel.__name__} spills: {usage}"
