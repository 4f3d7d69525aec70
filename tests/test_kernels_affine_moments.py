"""The Triton twins of ``affine_moments`` / ``affine_moments_backward`` (:mod:`bkn_export.kernels.affine_moments`)
compute what the C kernels (``csrc/affine.c``) and the PyTorch form of :class:`bkn_export.chain.fast._AffineMoments`
compute.

The launchers run under ``TRITON_INTERPRET=1`` in a child process (:class:`InterpreterProcess`; CPU tensors, the
``native.call`` arguments, outputs written in place). Each case compares every output — M, V, T (``taps``) forward,
∂W, ∂μ, ∂σ² backward — with the C kernel on the same arguments and with the PyTorch form (the Function under
:func:`bkn_export.native.disabled`, its gradients by autograd). Cases: every conv geometry of tests/test_speed.py
with and without a zero pad folded in (coverage tables), a Linear, and output / input channel counts 1, 3, 67 and
1030, depthwise and grouped, several input blocks and row chunks, K = 1, 9, 343 (six tap blocks) and 512.
The compiled kernels are checked by Triton's compiler for sm_90 only: nothing here runs on a GPU.

Tolerances (``_close``: |got − want| ≤ rtol |want| + atol · max|want|, elementwise):

* float64 against the C kernel: rtol 1e-12, atol 1e-13. Both compute in double in another summation order
  (tiles and tree sums here, SIMD pairs there). Measured (max |diff| / max|C| over the cases): forward within
  5.3e-15, ∂W within 2.8e-14 and ∂μ within 1.6e-14 (K = 512: gT sums 512 terms of T H), ∂σ² within 2.1e-15.
* float64 against the PyTorch form: tests/test_native_affine.py's 1e-12 values, 1e-11 gradients (measured as
  against the C kernel).
* float32: the kernel computes in double and rounds once, so against the float64 PyTorch form on the same
  (upcast) inputs each float32 output is within half a unit in the last place plus the double error
  (rtol 2⁻²⁴ · 1.01, atol 1e-13; measured ≤ 0.50 ulp), within one unit of the C kernel's float32 result
  (measured: equal), and at least as accurate as the float32 PyTorch form. ∂μ, ∂σ² stay in the float64 buffers
  the caller passes: atol 1e-13 there.
* NaN / ±inf inputs (tests/test_native_hostile.py's rows, plus huge and tiny variances and a mean whose square
  overflows) and tables with a negative spread: the C kernel's NaN and ±inf pattern exactly, its values elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from support.triton_compile import ScalarReads, compile_for_hopper
from support.triton_interpreter import InterpreterProcess
from test_speed import CONVS, SPATIAL
from torch import Tensor, nn

from bkn_export import native
from bkn_export.chain import fast
from bkn_export.errors import BKNInputError

F64, F32 = torch.float64, torch.float32
MODULE = "bkn_export.kernels.affine_moments"

needs_library = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterProcess]:
    pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")
    with InterpreterProcess() as process:
        yield process


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """The arguments of one ``affine_moments`` call: W (rows, inputs, taps), μ, σ² (groups · inputs,), tables."""

    weight: Tensor
    mean: Tensor
    variance: Tensor
    fraction: Tensor | None
    pairs: Tensor | None

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def parameters(self) -> Tensor:
        _, inputs, taps = self.weight.shape
        return native.parameters(inputs, taps, self.mean.numel() // inputs)

    @property
    def coverage(self) -> tuple[Tensor, Tensor] | None:
        return None if self.fraction is None or self.pairs is None else (self.fraction, self.pairs)

    def to(self, dtype: torch.dtype) -> Case:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return Case(self.weight.to(dtype), self.mean.to(dtype), self.variance.to(dtype), *map(cast, self.tables))

    @property
    def tables(self) -> tuple[Tensor | None, Tensor | None]:
        return self.fraction, self.pairs


def _moments(channels: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    mean = torch.randn(channels, generator=generator, dtype=F64)
    return mean, torch.rand(channels, generator=generator, dtype=F64) + 0.05


def layer_case(name: str, padded: bool) -> Case:
    """A layer of tests/test_speed.py (or "linear") with its coverage tables where a zero pad
    folded in before it (or its own padding) makes the borders vary."""
    torch.manual_seed(0)
    make: Callable[[], nn.Module] = {**CONVS, "linear": lambda: nn.Linear(7, 3)}[name]
    layer = make().to(F64)
    generator = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        mean, variance = _moments(layer.in_features, generator)
        return Case(layer.weight.detach().unsqueeze(2).contiguous(), mean, variance, None, None)
    assert isinstance(layer, nn.modules.conv._ConvNd)
    rank = layer.weight.dim() - 2
    padding = ((1, 0),) + ((0, 2),) * (rank - 1) if padded else ((0, 0),) * rank
    coverage = fast._coverage(layer, SPATIAL[rank], padding, F64)
    weight = fast._taps_view(layer.weight.detach()).contiguous()
    mean, variance = _moments(layer.in_channels, generator)
    return Case(weight, mean, variance, *(coverage if coverage is not None else (None, None)))


def synthetic_case(rows: int, inputs: int, taps: int, groups: int, tables: bool, seed: int = 0) -> Case:
    """Random W, μ, σ² and, with ``tables``, coverage tables of a random valid-position mask (f = E[valid_t],
    H = E[valid_t valid_u] over 50 positions: the spread is a variance, ≥ 0 up to rounding)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, inputs, taps, generator=generator, dtype=F64)
    mean, variance = _moments(groups * inputs, generator)
    if not tables:
        return Case(weight, mean, variance, None, None)
    valid = (torch.rand(50, taps, generator=generator, dtype=F64) > 0.2).to(F64)
    return Case(weight, mean, variance, valid.mean(0), valid.t() @ valid / 50)


LAYER_CASES = [(name, padded) for name in CONVS for padded in (False, True)]
LAYER_CASES.append(("linear", False))

#: (rows, inputs per group, taps, groups, coverage tables): channel counts 1, 3, 67, 1030; K = 1, 9, 343, 512.
SYNTHETIC = {
    "one row one input": (1, 1, 9, 1, True),
    "3 to 3 3x3": (3, 3, 9, 1, True),
    "depthwise 67": (67, 1, 9, 67, True),
    "depthwise 1030": (1030, 1, 9, 1030, True),
    "linear 67 to 1030": (1030, 67, 1, 1, False),
    "1x1 1030 to 3 padded": (3, 1030, 1, 1, True),
    "grouped 4, several row chunks": (80, 5, 9, 4, True),
    "48 to 48 3x3 over 160 inputs: two input blocks, six row chunks": (48, 160, 9, 1, True),
    "7x7x7 (K = 343)": (2, 3, 343, 1, True),
    "K = 512": (3, 2, 512, 1, True),
}


# --------------------------------------------------------------------------- the three forms


@dataclass(frozen=True)
class Outputs:
    """M, V, T forward; ∂W, ∂μ, ∂σ² backward."""

    mean: Tensor
    variance: Tensor
    taps: Tensor
    grad_weight: Tensor
    grad_input_mean: Tensor
    grad_input_variance: Tensor

    def named(self) -> dict[str, Tensor]:
        return dict(vars(self))


def _gradients(case: Case, dtype: torch.dtype, seed: int = 7) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(case.rows, generator=generator, dtype=F64).to(dtype) for _ in range(2))  # type: ignore[return-value]


def _buffers(case: Case) -> tuple[Tensor, ...]:
    """taps (float64), out_mean, out_variance; grad_weight, grad_input_mean, grad_input_variance (float64)."""
    rows, _, taps = case.weight.shape
    inputs = case.mean.numel()
    return (
        torch.full((rows, taps), math.nan, dtype=F64),
        torch.full((rows,), math.nan, dtype=case.mean.dtype),
        torch.full((rows,), math.nan, dtype=case.mean.dtype),
        torch.full_like(case.weight, math.nan),
        torch.full((inputs,), math.nan, dtype=F64),
        torch.full((inputs,), math.nan, dtype=F64),
    )


def run_launchers(interpreter: InterpreterProcess, case: Case, grads: tuple[Tensor | None, Tensor | None]) -> Outputs:
    taps, out_mean, out_variance, grad_weight, grad_mean_in, grad_variance_in = _buffers(case)
    arguments = (case.weight, case.mean, case.variance, *case.tables, case.parameters)
    forward = interpreter.call_in_place(
        f"{MODULE}:affine_moments", *arguments, taps, out_mean, out_variance, count=case.rows
    )
    taps, out_mean, out_variance = forward[-3:]
    backward = interpreter.call_in_place(
        f"{MODULE}:affine_moments_backward", *arguments, taps, *grads, grad_weight, grad_mean_in, grad_variance_in,
        count=case.rows,
    )  # fmt: skip
    return Outputs(out_mean, out_variance, taps, *backward[-3:])


def run_c_kernels(case: Case, grads: tuple[Tensor | None, Tensor | None]) -> Outputs:
    taps, out_mean, out_variance, grad_weight, grad_mean_in, grad_variance_in = _buffers(case)
    arguments = (case.weight, case.mean, case.variance, *case.tables, case.parameters)
    native.call("affine_moments", *arguments, taps, out_mean, out_variance, count=case.rows)
    native.call(
        "affine_moments_backward", *arguments, taps, *grads, grad_weight, grad_mean_in, grad_variance_in,
        count=case.rows,
    )  # fmt: skip
    return Outputs(out_mean, out_variance, taps, grad_weight, grad_mean_in, grad_variance_in)


def run_pytorch_form(case: Case, grads: tuple[Tensor | None, Tensor | None]) -> Outputs:
    """The Function's PyTorch form (C kernels off): values, T as its forward keeps it, gradients by autograd."""
    weight, mean, variance = (t.clone().requires_grad_() for t in (case.weight, case.mean, case.variance))
    with native.disabled():
        out_mean, out_variance = fast.affine_moments(weight, None, mean, variance, case.coverage)
        taps = fast._affine_forward(case.weight, case.mean, case.variance, *case.tables)[4]
    pairs = [(o, g) for o, g in zip((out_mean, out_variance), grads) if g is not None]
    found = torch.autograd.grad(
        [o for o, _ in pairs], [weight, mean, variance], [g for _, g in pairs], allow_unused=True
    )
    zeros = (torch.zeros_like(weight), torch.zeros_like(mean), torch.zeros_like(variance))
    grad_weight, grad_mean, grad_variance = (z if g is None else g for g, z in zip(found, zeros))
    return Outputs(
        out_mean.detach(), out_variance.detach(), taps.reshape(case.rows, -1).double(), grad_weight, grad_mean,
        grad_variance,
    )  # fmt: skip


def _close(got: Tensor, want: Tensor, rtol: float, atol: float, what: str) -> None:
    """|got − want| ≤ rtol |want| + atol · max|want| elementwise (NaN fails)."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = float(want.abs().max()) if want.numel() else 0.0
    error = (got - want).abs()
    bound = rtol * want.abs() + atol * scale
    failed = ~(error <= bound)
    if bool(failed.any()):
        worst = int(torch.where(failed, error - bound, torch.zeros_like(error)).flatten().argmax())
        raise AssertionError(
            f"{what}: {int(failed.sum())} of {failed.numel()} out of tolerance; worst at {worst}: got "
            f"{float(got.flatten()[worst]):.17g}, want {float(want.flatten()[worst]):.17g}, scale {scale:.3g}"
        )


def _same_non_finite_pattern(got: Tensor, want: Tensor, what: str) -> None:
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern\n{got}\n{want}"
    assert torch.equal(got.isfinite(), want.isfinite()), f"{what}: finite pattern\n{got}\n{want}"
    assert torch.equal(got[got.isinf()], want[want.isinf()]), f"{what}: infinities\n{got}\n{want}"


# --------------------------------------------------------------------------- float64


def _check_float64(interpreter: InterpreterProcess, case: Case) -> None:
    grads = _gradients(case, F64)
    got = run_launchers(interpreter, case, grads)
    if native.library() is not None:
        for name, value in run_c_kernels(case, grads).named().items():
            _close(got.named()[name], value, 1e-12, 1e-13, f"{name} against the C kernel")
    for name, value in run_pytorch_form(case, grads).named().items():
        rtol, atol = (1e-12, 1e-14) if name in ("mean", "variance", "taps") else (1e-11, 1e-13)
        _close(got.named()[name], value, rtol, atol, f"{name} against the PyTorch form")


@pytest.mark.parametrize(
    ("name", "padded"), LAYER_CASES, ids=[f"{n}{' zero pad before' if p else ''}" for n, p in LAYER_CASES]
)
def test_layers_in_float64(interpreter: InterpreterProcess, name: str, padded: bool) -> None:
    case = layer_case(name, padded)
    assert case.fraction is not None or not padded
    _check_float64(interpreter, case)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_channel_counts_and_tap_counts_in_float64(interpreter: InterpreterProcess, name: str) -> None:
    _check_float64(interpreter, synthetic_case(*SYNTHETIC[name]))


# --------------------------------------------------------------------------- float32


_FLOAT32_CASES = {
    "3x3 zero padding": lambda: layer_case("3x3 zero padding", True),
    "depthwise x2": lambda: layer_case("depthwise x2", True),
    "grouped dilated": lambda: layer_case("grouped dilated", True),
    "conv3d": lambda: layer_case("conv3d", True),
    "linear": lambda: layer_case("linear", False),
    "grouped 4, several row chunks": lambda: synthetic_case(*SYNTHETIC["grouped 4, several row chunks"]),
    "1x1 1030 to 3 padded": lambda: synthetic_case(*SYNTHETIC["1x1 1030 to 3 padded"]),
    "7x7x7 (K = 343)": lambda: synthetic_case(*SYNTHETIC["7x7x7 (K = 343)"]),
}
_HALF_ULP = 2.0**-24 * 1.01


def _relative_error(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("name", _FLOAT32_CASES)
def test_float32_rounds_the_double_result_once(interpreter: InterpreterProcess, name: str) -> None:
    """Each float32 output is the float64 result of the same inputs rounded once (half an ulp), within an ulp of
    the C kernel's, and at least as accurate as the float32 PyTorch form."""
    case32 = _FLOAT32_CASES[name]().to(F32)
    grads32 = _gradients(case32, F32)
    got = run_launchers(interpreter, case32, grads32).named()
    exact = run_pytorch_form(case32.to(F64), tuple(g.double() for g in grads32)).named()  # type: ignore[arg-type]
    pytorch32 = run_pytorch_form(case32, grads32).named()
    c32 = run_c_kernels(case32, grads32).named() if native.library() is not None else None
    for output, value in got.items():
        assert value.dtype == (F64 if output in ("taps", "grad_input_mean", "grad_input_variance") else F32)
        rounded = value.dtype == F32
        _close(value, exact[output], _HALF_ULP if rounded else 1e-12, 1e-13, f"{output} against float64")
        if c32 is not None:
            _close(value, c32[output], 2.0**-23 if rounded else 1e-12, 1e-13, f"{output} against the C kernel")
        assert _relative_error(value, exact[output]) <= _relative_error(pytorch32[output], exact[output]) + 1e-7


@pytest.mark.parametrize("taps_dtype", [F64, F32], ids=["float64 taps", "float32 taps"])
def test_float32_side_buffers_are_accepted(interpreter: InterpreterProcess, taps_dtype: torch.dtype) -> None:
    """∂μ, ∂σ² into float32 buffers: the float64 buffers' values rounded once, bit for bit (the sums stay in double
    until the store), so a float32 caller needs no casts after the kernel. ``taps`` in float32: T rounded to
    float32 forward and read back as such by both kernels, within float32's rounding of the float64 results."""
    case = synthetic_case(*SYNTHETIC["grouped 4, several row chunks"]).to(F32)
    grads = _gradients(case, F32)
    want = run_launchers(interpreter, case, grads).named()
    taps, out_mean, out_variance, grad_weight, grad_mean_in, grad_variance_in = _buffers(case)
    taps, grad_mean_in, grad_variance_in = taps.to(taps_dtype), grad_mean_in.float(), grad_variance_in.float()
    arguments = (case.weight, case.mean, case.variance, *case.tables, case.parameters)
    taps, out_mean, out_variance = interpreter.call_in_place(
        f"{MODULE}:affine_moments", *arguments, taps, out_mean, out_variance, count=case.rows
    )[-3:]
    backward = interpreter.call_in_place(
        f"{MODULE}:affine_moments_backward", *arguments, taps, *grads, grad_weight, grad_mean_in, grad_variance_in,
        count=case.rows,
    )[-3:]  # fmt: skip
    got = Outputs(out_mean, out_variance, taps, *backward).named()
    for name, value in got.items():
        if taps_dtype == F64:
            assert torch.equal(value, want[name].to(value.dtype)), name
        else:
            _close(value, want[name], 1e-6, 1e-6, f"{name} with float32 buffers")


# --------------------------------------------------------------------------- gradients that did not reach the loss


@pytest.mark.parametrize("given", ["mean", "variance", "neither"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "zero pad before"])
def test_a_none_gradient_is_zero(interpreter: InterpreterProcess, given: str, padded: bool) -> None:
    """grad_mean / grad_variance None (NULL to the C kernel): that output's terms are zero."""
    case = layer_case("grouped dilated", padded)
    grad_mean, grad_variance = _gradients(case, F64)
    grads = (grad_mean if given == "mean" else None, grad_variance if given == "variance" else None)
    got = run_launchers(interpreter, case, grads)
    if native.library() is not None:
        for name, value in run_c_kernels(case, grads).named().items():
            _close(got.named()[name], value, 1e-12, 1e-13, f"{name} against the C kernel")
    if given == "neither":
        assert all(bool((t == 0).all()) for t in (got.grad_weight, got.grad_input_mean, got.grad_input_variance))
        return
    for name, value in run_pytorch_form(case, grads).named().items():
        _close(got.named()[name], value, 1e-11, 1e-13, f"{name} against the PyTorch form")


# --------------------------------------------------------------------------- hostile inputs

_NAN, _INF = math.nan, math.inf
#: tests/test_native_hostile.py's rows: NaN and ±inf means, NaN / inf / 0 / negative / tiny variances; then
#: huge and tiny variances, and a huge mean (its square overflows in the spread).
_HOSTILE_MEAN = [0.0, 1.0, _NAN, _INF, -_INF, 0.5, _NAN, 2.0, -1.0, 0.3, -0.7, 1e160]
_HOSTILE_VARIANCE = [1.0, _NAN, 1.0, 1.0, 1.0, _INF, 0.0, -1.0, 1e-20, 1e300, 1e-300, 1.0]


def _hostile_cases() -> dict[str, Case]:
    channels = len(_HOSTILE_MEAN)
    mean, variance = torch.tensor(_HOSTILE_MEAN, dtype=F64), torch.tensor(_HOSTILE_VARIANCE, dtype=F64)
    weight = torch.linspace(-1.0, 1.0, 3 * channels, dtype=F64).reshape(3, channels, 1)
    conv = nn.Conv2d(channels, 2, 3, padding=1, bias=False).double()
    fraction, pairs = fast._coverage(conv, (4, 4), ((0, 0), (0, 0)), F64)  # type: ignore[misc]
    conv_weight = fast._taps_view(conv.weight.detach()).contiguous()
    depthwise = torch.randn(channels, 1, 9, dtype=F64, generator=torch.Generator().manual_seed(2))
    return {
        "linear": Case(weight, mean, variance, None, None),
        "padded conv": Case(conv_weight, mean, variance, fraction, pairs),
        "padded depthwise": Case(depthwise, mean, variance, fraction, pairs),
    }


def _assert_same_values(got: Outputs, want: Outputs, who: str) -> None:
    for name, value in want.named().items():
        actual = got.named()[name]
        _same_non_finite_pattern(actual, value, f"{name} against {who}")
        finite = value.isfinite()
        _close(actual[finite], value[finite], 1e-12, 1e-14, f"{name} against {who}")


@needs_library
@pytest.mark.parametrize("name", ["linear", "padded conv", "padded depthwise"])
def test_nan_inf_and_degenerate_variances_give_the_c_kernels_values(interpreter: InterpreterProcess, name: str) -> None:
    """Every output's NaN and ±inf pattern is the C kernel's (a NaN mean through a padded conv: NaN V, as the
    spread's clamp keeps NaN; its ∂V' gate drops NaN spreads), its values elsewhere."""
    case = _hostile_cases()[name]
    grads = (torch.ones(case.rows, dtype=F64), torch.ones(case.rows, dtype=F64))
    got = run_launchers(interpreter, case, grads)
    _assert_same_values(got, run_c_kernels(case, grads), "the C kernel")
    if name != "linear":
        assert bool(got.variance.isnan().any())
    # As tests/test_native_hostile.py holds the C kernel to the PyTorch form: the finite pattern of every output,
    # the NaN pattern except of ∂μ, ∂σ² at infinite inputs (where the two may differ in which non-finite value).
    pytorch = run_pytorch_form(case, grads).named()
    infinite_input = case.mean.isinf() | case.variance.isinf()
    for output in ("mean", "variance", "grad_input_mean", "grad_input_variance"):
        actual, want = got.named()[output], pytorch[output]
        assert torch.equal(actual.isfinite(), want.isfinite()), (output, actual, want)
        where = ~infinite_input if output.startswith("grad_input") else slice(None)
        assert torch.equal(actual.isnan()[where], want.isnan()[where]), (output, actual, want)
        finite = want.isfinite()
        _close(actual[finite], want[finite], 1e-9, 1e-12, f"{output} against the PyTorch form")


@needs_library
def test_coverage_tables_with_a_negative_spread_clamp_and_gate_as_the_c_kernel(interpreter: InterpreterProcess) -> None:
    """Random symmetric H (not a coverage table): some rows' spread T H Tᵀ − M² < 0 is clamped to 0 in V and its
    ∂V' is 0 in gT; the others keep both."""
    generator = torch.Generator().manual_seed(5)
    case = synthetic_case(40, 6, 9, 2, False, seed=5)
    pairs = torch.rand(9, 9, generator=generator, dtype=F64)
    case = Case(case.weight, case.mean, case.variance, torch.rand(9, generator=generator, dtype=F64), pairs + pairs.t())
    spread = fast._affine_forward(case.weight, case.mean, case.variance, *case.tables)[7]
    assert bool((spread < 0).any()) and bool((spread > 0).any())
    grads = _gradients(case, F64)
    got = run_launchers(interpreter, case, grads)
    _assert_same_values(got, run_c_kernels(case, grads), "the C kernel")
    for name, value in run_pytorch_form(case, grads).named().items():
        _close(got.named()[name], value, 1e-11, 1e-13, f"{name} against the PyTorch form")


def test_no_rows(interpreter: InterpreterProcess) -> None:
    """C_out = 0: nothing forward; ∂μ, ∂σ² are the empty sums, 0 (the C kernel zero-fills them)."""
    weight, ones = torch.empty(0, 4, 9, dtype=F64), torch.ones(8, dtype=F64)
    empty = torch.empty(0, dtype=F64)
    got = interpreter.call_in_place(
        f"{MODULE}:affine_moments_backward", weight, ones, ones, None, None, native.parameters(4, 9, 2),
        torch.empty(0, 9, dtype=F64), empty, empty, torch.empty_like(weight), torch.full((8,), math.nan, dtype=F64),
        torch.full((8,), math.nan, dtype=F64), count=0,
    )  # fmt: skip
    assert bool((got[-1] == 0).all()) and bool((got[-2] == 0).all())


def test_arguments_that_do_not_fit_the_parameters_are_refused() -> None:
    affine = pytest.importorskip(MODULE, reason="the kernels need the triton package (pip install triton)")
    case = synthetic_case(4, 3, 9, 1, True)
    taps, out_mean, out_variance, *_ = _buffers(case)
    with pytest.raises(BKNInputError, match="do not fit"):
        affine.affine_moments(
            case.weight, case.mean[:2], case.variance[:2], *case.tables, case.parameters, taps, out_mean,
            out_variance, count=4,
        )  # fmt: skip
    with pytest.raises(BKNInputError, match="both coverage tables"):
        affine.affine_moments(
            case.weight, case.mean, case.variance, case.fraction, None, case.parameters, taps, out_mean, out_variance,
            count=4,
        )  # fmt: skip


# --------------------------------------------------------------------------- launches, host reads, compilation


def _recorded_launches(
    monkeypatch: pytest.MonkeyPatch, case: Case, grads: tuple[bool, bool], parameters: Tensor | None = None
) -> list[list[tuple[Any, tuple[Any, ...], dict[str, Any]]]]:
    """Both launchers with every kernel replaced by a recorder, the data on the meta device (no values: reading
    one on the host raises), parameters and tables on the CPU as the Function passes them (or ``parameters``);
    returns the (kernel, args, kwargs) of each launch, per launcher."""
    affine = pytest.importorskip(MODULE, reason="the kernels need the triton package (pip install triton)")
    launches: list[list[tuple[Any, tuple[Any, ...], dict[str, Any]]]] = []

    class Recorder:
        def __init__(self, kernel: Any) -> None:
            self.recorded_kernel = kernel

        def __getitem__(self, grid: object) -> Any:
            return lambda *args, **kwargs: launches[-1].append((self.recorded_kernel, args, kwargs))

    for name in ("_affine_forward_kernel", "_affine_backward_kernel", "_affine_input_gradient_kernel"):
        kernel = getattr(affine, name)
        kernel = getattr(kernel, "recorded_kernel", kernel)  # a second recording in one test wraps the kernel once
        monkeypatch.setattr(affine, name, Recorder(kernel))
    weight, mean, variance = (t.to("meta") for t in (case.weight, case.mean, case.variance))
    taps, out_mean, out_variance, grad_weight, grad_mean_in, grad_variance_in = (t.to("meta") for t in _buffers(case))
    arguments = (weight, mean, variance, *case.tables, case.parameters if parameters is None else parameters)
    launches.append([])
    affine.affine_moments(*arguments, taps, out_mean, out_variance, count=case.rows)
    launches.append([])
    given = tuple(out_mean if wanted else None for wanted in grads)
    affine.affine_moments_backward(
        *arguments, taps, *given, grad_weight, grad_mean_in, grad_variance_in, count=case.rows
    )
    return launches


_LAUNCH_CASES = {
    "grouped 4, several row chunks": (SYNTHETIC["grouped 4, several row chunks"], 2),
    "depthwise 67": (SYNTHETIC["depthwise 67"], 1),
    "linear 67 to 1030": (SYNTHETIC["linear 67 to 1030"], 2),
    "3 to 3 3x3": (SYNTHETIC["3 to 3 3x3"], 1),
}


@pytest.mark.parametrize("name", _LAUNCH_CASES)
def test_launches_per_call_and_no_tensor_value_read_on_the_host(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """One forward launch; the backward's one or two (LAUNCHES: at most). No tensor value is read on the host
    (recorded reads, and the data on the meta device). A parameters tensor on the device (not read: B, K, groups
    from the shapes) gives the same launches as the CPU one."""
    affine = pytest.importorskip(MODULE, reason="the kernels need the triton package (pip install triton)")
    shape, backward_launches = _LAUNCH_CASES[name]
    case = synthetic_case(*shape)
    with ScalarReads() as mode:
        forward, backward = _recorded_launches(monkeypatch, case, (True, True))
    assert mode.reads == []
    assert len(forward) == affine.LAUNCHES["affine_moments"] == 1
    assert len(backward) == backward_launches <= affine.LAUNCHES["affine_moments_backward"]
    on_device = case.parameters.to("meta")
    again = _recorded_launches(monkeypatch, case, (True, True), parameters=on_device)

    def plain(launches: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        return [(k, [(a.shape, a.dtype) if isinstance(a, Tensor) else a for a in args], kw) for k, args, kw in launches]

    assert [plain(launches) for launches in again] == [plain(forward), plain(backward)]


def test_cpu_coverage_tables_are_copied_to_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables on the CPU with the data on the device: one copy, reused by both launchers and later calls (also
    through another view of the same table); a table changed in place is copied again."""
    case = synthetic_case(*SYNTHETIC["3 to 3 3x3"])
    first = _recorded_launches(monkeypatch, case, (True, True))
    assert case.fraction is not None and case.pairs is not None
    view = Case(case.weight, case.mean, case.variance, case.fraction.view(-1), case.pairs.detach())
    second = _recorded_launches(monkeypatch, view, (True, True))
    tables = [launches[0][1][3:5] for launches in (*first, *second)]
    assert all(t.device.type == "meta" for pair in tables for t in pair)
    assert all(pair[0] is tables[0][0] and pair[1] is tables[0][1] for pair in tables)
    with torch.no_grad():
        case.pairs.mul_(1.0)
    third = _recorded_launches(monkeypatch, case, (True, True))
    assert third[0][0][1][3] is tables[0][0] and third[0][0][1][4] is not tables[0][1]


#: (case, gradients given (mean, variance), dtype): every kernel variant (tables or not, each gradient present
#: or not, the partials' kernel or not, K = 1 / 9 / 343, float32 / float64).
_COMPILE_CASES = {
    "grouped 3x3 tables f32": (SYNTHETIC["grouped 4, several row chunks"], (True, True), F32),
    "grouped 3x3 tables f64": (SYNTHETIC["grouped 4, several row chunks"], (True, False), F64),
    "depthwise tables f32, grad variance only": (SYNTHETIC["depthwise 67"], (False, True), F32),
    "linear no tables f32": (SYNTHETIC["linear 67 to 1030"], (True, True), F32),
    "linear no tables f64, grad mean only": (SYNTHETIC["linear 67 to 1030"], (True, False), F64),
    "K = 343 tables f32": (SYNTHETIC["7x7x7 (K = 343)"], (True, True), F32),
    "1x1 padded f64": (SYNTHETIC["1x1 1030 to 3 padded"], (False, True), F64),
}


@pytest.mark.parametrize("name", _COMPILE_CASES)
def test_kernels_compile_for_an_h100(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Every kernel the launchers start compiles to an sm_90 cubin (Triton's compiler and ptxas; no GPU)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; kernels are interpreted, not compiled")
    shape, grads, dtype = _COMPILE_CASES[name]
    launches = _recorded_launches(monkeypatch, synthetic_case(*shape).to(dtype), grads)
    for kernel, args, kwargs in (call for calls in launches for call in calls):
        compiled = compile_for_hopper(kernel, args, dict(kwargs))
        assert compiled.asm["cubin"], f"{kernel}: no cubin"
