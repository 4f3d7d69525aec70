"""The fused path-head kernels (``bkn_export.kernels.path_moments``) compute what the sequence of the Triton twins
computes: ``output_variance`` → the activation's moments → ``affine_moments`` → + bias, and backward the twins'
backwards in reverse.

Both run under ``TRITON_INTERPRET=1`` in a child process (:class:`support.triton_interpreter.InterpreterProcess`)
on the same CPU tensors: the fused launchers, and the twins one launcher at a time with the arguments the
Functions pass (float64 ``kept`` and ``taps``; the affine backward's sums in the data's dtype, as on CUDA).

Cases: every activation kind the fused forms take (none, relu, hardswish (order 4), relu6 (order 2), silu,
sigmoid, tanh), each with the output-variance stage (γ given) and without it, through a padded 3×3 conv (coverage
tables) with a bias; γ None; a 1×1 conv, a depthwise conv (the affine backward's groups-as-lanes form), a grouped
conv whose rows take several backward programs (partials), a Linear (K = 1), and no affine stage; output gradients
None.

Tolerances (max |fused − sequence| / max |sequence| per output):

* float64: 1e-12. The fused kernels run the twins' own device functions on the same float64 values (the
  sequence's intermediates are float64 too), the affine sums in the same tiles: measured 0 for every output of
  every float64 case here (bit for bit under the interpreter; compiled, the affine twin's sums may contract into
  FMAs where the fused kernels, launched without fp fusion, do not: a rounding difference).
* float32: the fused kernels keep the intermediates in float64 and round once, so each output is the float64
  fused result on the upcast inputs rounded to float32 (checked: within half an ulp elementwise; measured
  ≤ 0.48 ulp). The sequence rounds v0, (m1, v1) and the gradients to float32 between its stages, so the two
  differ by a few float32 ulps of the largest magnitude: bound 2⁻²¹ (4 ulps of 1) relative to the largest,
  measured ≤ 9.4e-8 (0.78 · 2⁻²³).

Also: one forward launch and at most two backward (recorded, data on the meta device: no tensor value read on the
host), :func:`path_moments_take`'s refusals, and every kernel variant compiles to an sm_90 cubin (no GPU needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from support.triton_compile import ScalarReads, compile_for_hopper, resource_usage
from support.triton_interpreter import InterpreterProcess
from torch import Tensor, nn

from bkn_export import moments, native
from bkn_export.chain import fast

pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")

F32, F64 = torch.float32, torch.float64
MODULE = "bkn_export.kernels.path_moments"
PRIOR = "bkn_export.kernels.prior_moments"
ELEMENTWISE = "bkn_export.kernels.elementwise_moments"
AFFINE = "bkn_export.kernels.affine_moments"
EPS = 1e-3

ACTIVATIONS = ("none", "relu", "hardswish", "relu6", "silu", "sigmoid", "tanh")


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterProcess]:
    with InterpreterProcess() as process:
        yield process


# --------------------------------------------------------------------------- cases


def _activation(name: str) -> tuple[str, Tensor | None] | None:
    """The fused launcher's activation argument: the twins' CPU float64 tables, as the Functions build them."""
    if name == "none":
        return None
    if name == "relu":
        return ("relu", None)
    if name in ("silu", "sigmoid", "tanh"):
        return ("smooth", fast._hermite_parameters(name, moments.GAUSS_HERMITE_NODES[name]))
    plan = fast._plan(name, ())
    assert plan is not None and plan[0] == "piecewise"
    table = fast._piecewise_table(plan[1], F64, torch.device("cpu"), 1)
    assert table.native is not None
    return ("piecewise", table.native)


@dataclass(frozen=True)
class Path:
    """One call's arguments: the source Gaussian, the stages' constants, the affine layer (or none)."""

    mean: Tensor
    variance: Tensor
    source_weight: Tensor | None
    eps: float | None
    activation: str
    weight: Tensor | None
    fraction: Tensor | None
    pairs: Tensor | None
    bias: Tensor | None

    @property
    def parameters(self) -> Tensor | None:
        if self.weight is None:
            return None
        _, inputs, taps = self.weight.shape
        return native.parameters(inputs, taps, self.mean.numel() // inputs)

    @property
    def rows(self) -> int:
        return 0 if self.weight is None else self.weight.shape[0]

    def arguments(self) -> tuple[Any, ...]:
        return (
            self.mean, self.variance, self.source_weight, self.eps, _activation(self.activation), self.weight,
            self.fraction, self.pairs, self.parameters, self.bias,
        )  # fmt: skip

    def to(self, dtype: torch.dtype) -> Path:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return replace(
            self, mean=self.mean.to(dtype), variance=self.variance.to(dtype), source_weight=cast(self.source_weight),
            weight=cast(self.weight), fraction=cast(self.fraction), pairs=cast(self.pairs), bias=cast(self.bias),
        )  # fmt: skip


#: The affine layers: (layer, spatial size); None: no affine stage.
LAYERS: dict[str, Any] = {
    "3x3 padded": lambda: (nn.Conv2d(6, 5, 3, padding=1), (5, 4)),
    "1x1": lambda: (nn.Conv2d(6, 5, 1), (5, 4)),
    "depthwise 3x3 padded": lambda: (nn.Conv2d(6, 6, 3, padding=1, groups=6), (5, 4)),
    "grouped 3x3, row chunks": lambda: (nn.Conv2d(6, 36, 3, padding=1, groups=2, bias=False), (5, 4)),
    "linear": lambda: (nn.Linear(7, 5), None),
    "no affine": lambda: (None, None),
}


def make_path(layer_name: str, activation: str, eps: str, seed: int = 0) -> Path:
    """eps: "gamma" (the output-variance stage with γ), "no gamma" (γ None), "none" (no output-variance stage)."""
    torch.manual_seed(seed)
    layer, spatial = LAYERS[layer_name]()
    generator = torch.Generator().manual_seed(seed + 1)
    channels = 7 if isinstance(layer, nn.Linear) else 6
    # Means a few σ either side of the activations' breakpoints; variances from 0.01 to 4.
    mean = torch.randn(channels, generator=generator, dtype=F64) * 2.0
    variance = torch.exp(torch.empty(channels, dtype=F64).uniform_(math.log(0.01), math.log(4.0), generator=generator))
    gamma = torch.randn(channels, generator=generator, dtype=F64) + 0.5
    weight = fraction = pairs = bias = None
    if layer is not None:
        layer = layer.to(F64)
        weight = fast._taps_view(layer.weight.detach()).contiguous()
        bias = None if layer.bias is None else layer.bias.detach().clone()
        if isinstance(layer, nn.modules.conv._ConvNd):
            coverage = fast._coverage(layer, spatial, ((0, 0),) * len(spatial), F64)
            fraction, pairs = coverage if coverage is not None else (None, None)
    return Path(
        mean, variance, gamma if eps == "gamma" else None, None if eps == "none" else EPS, activation, weight,
        fraction, pairs, bias,
    )  # fmt: skip


@dataclass(frozen=True)
class Gradients:
    mean: Tensor | None
    variance: Tensor | None
    gaussian: Tensor | None


def _gradients(path: Path, which: str = "all", seed: int = 7) -> Gradients:
    generator = torch.Generator().manual_seed(seed)
    rows = path.rows or path.mean.numel()
    dtype = path.mean.dtype
    grad_mean = torch.randn(rows, generator=generator, dtype=F64).to(dtype)
    grad_variance = torch.randn(rows, generator=generator, dtype=F64).to(dtype)
    grad_gaussian = torch.randn(path.mean.numel(), generator=generator, dtype=F64).to(dtype)
    return Gradients(
        grad_mean if which in ("all", "mean") else None,
        grad_variance if which in ("all", "variance") else None,
        grad_gaussian if which in ("all", "gaussian") and path.eps is not None else None,
    )


# --------------------------------------------------------------------------- the fused launchers and the sequence


def run_fused(interpreter: InterpreterProcess, path: Path, grads: Gradients) -> dict[str, Tensor]:
    out_mean, out_variance, gaussian, taps = interpreter.call(f"{MODULE}:path_moments", *path.arguments())
    backward = interpreter.call(
        f"{MODULE}:path_moments_backward", *path.arguments(), taps, grads.mean, grads.variance, grads.gaussian
    )
    return _named(out_mean, out_variance, gaussian, taps if path.weight is not None else None, *backward)


def _named(*values: Tensor | None) -> dict[str, Tensor]:
    names = ("mean", "variance", "gaussian", "taps", "grad_mean", "grad_variance", "grad_source_weight",
             "grad_weight", "grad_bias")  # fmt: skip
    return {name: value for name, value in zip(names, values) if value is not None}


def run_sequence(interpreter: InterpreterProcess, path: Path, grads: Gradients) -> dict[str, Tensor]:
    """The twins one launcher at a time, as :class:`bkn_export.chain.path_moments._PathMoments` runs them."""
    call = interpreter.call_in_place
    mean, variance = path.mean, path.variance
    channels = mean.numel()

    def empty(n: int = channels) -> Tensor:
        return torch.full((n,), math.nan, dtype=mean.dtype)

    gaussian = None
    if path.eps is not None:
        gaussian = call(f"{PRIOR}:output_variance", variance, path.source_weight, native.parameters(path.eps), empty())[
            -1
        ]
    v0 = variance if gaussian is None else gaussian
    activation = _activation(path.activation)
    kernel, leading = None, (mean, v0)
    m1, v1 = mean, v0
    if activation is not None:
        kind, table = activation
        kernel = {"relu": "relu_moments", "piecewise": "piecewise_moments", "smooth": "gauss_hermite_moments"}[kind]
        if table is not None:
            first, second = (int(v) for v in table[:2].tolist())
            kept = torch.full((channels, first if kind == "smooth" else (second + 1) * first), math.nan, dtype=F64)
            leading = (mean, v0, table, kept)
        after = call(f"{ELEMENTWISE}:{kernel}", *leading, empty(), empty())
        if table is not None:
            leading = (mean, v0, table, after[3])
        m1, v1 = after[-2:]
    taps = None
    if path.weight is not None:
        rows, _, k = path.weight.shape
        arguments = (path.weight, m1, v1, path.fraction, path.pairs, path.parameters)
        taps = torch.full((rows, k), math.nan, dtype=F64)
        taps, out_mean, out_variance = call(f"{AFFINE}:affine_moments", *arguments, taps, empty(rows), empty(rows),
                                            count=rows)[-3:]  # fmt: skip
        if path.bias is not None:
            out_mean = out_mean + path.bias
        grad_weight, grad_m1, grad_v1 = call(
            f"{AFFINE}:affine_moments_backward", *arguments, taps, grads.mean, grads.variance,
            torch.full_like(path.weight, math.nan), empty(), empty(), count=rows,
        )[-3:]  # fmt: skip
    else:
        out_mean, out_variance = m1, v1
        grad_weight = None
        zeros = torch.zeros_like(mean)
        grad_m1 = zeros if grads.mean is None else grads.mean
        grad_v1 = zeros if grads.variance is None else grads.variance
    grad_m0, grad_v0 = grad_m1, grad_v1
    if kernel is not None:
        grad_m0, grad_v0 = call(f"{ELEMENTWISE}:{kernel}_backward", *leading, grad_m1, grad_v1, empty(), empty())[-2:]
    grad_source_weight = None
    grad_variance_in = grad_v0
    if path.eps is not None:
        if grads.gaussian is not None:
            grad_v0 = grad_v0 + grads.gaussian
        grad_gamma = None if path.source_weight is None else empty()
        after = call(f"{PRIOR}:output_variance_backward", variance, path.source_weight,
                     native.parameters(path.eps), grad_v0, empty(), grad_gamma)  # fmt: skip
        grad_variance_in, grad_source_weight = after[-2], after[-1]
    grad_bias = grads.mean if path.bias is not None else None
    return _named(out_mean, out_variance, gaussian, taps, grad_m0, grad_variance_in, grad_source_weight, grad_weight,
                  grad_bias)  # fmt: skip


def _relative(got: Tensor, want: Tensor) -> float:
    """max |got − want| / max |want| (0 for empty or all-zero ``want`` equal to ``got``)."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert bool(got.isfinite().all()) and bool(want.isfinite().all())
    scale = float(want.abs().max()) if want.numel() else 0.0
    error = float((got - want).abs().max()) if want.numel() else 0.0
    return error if scale == 0.0 else error / scale


def _compare(got: dict[str, Tensor], want: dict[str, Tensor], bound: float, what: str) -> float:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    worst = 0.0
    for name, value in want.items():
        assert got[name].dtype == value.dtype, (name, got[name].dtype, value.dtype)
        error = _relative(got[name], value)
        assert error <= bound, f"{what}: {name} differs by {error:.3g} of its largest magnitude (bound {bound:.3g})"
        worst = max(worst, error)
    return worst


# --------------------------------------------------------------------------- float64


@pytest.mark.parametrize("eps", ["gamma", "none"], ids=["output variance", "no output variance"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation_through_a_padded_conv_in_float64(
    interpreter: InterpreterProcess, activation: str, eps: str
) -> None:
    path = make_path("3x3 padded", activation, eps)
    grads = _gradients(path)
    _compare(run_fused(interpreter, path, grads), run_sequence(interpreter, path, grads), 1e-12, activation)


_LAYER_CASES = {
    "1x1": ("silu", "gamma"),
    "depthwise 3x3 padded": ("hardswish", "no gamma"),
    "grouped 3x3, row chunks": ("relu", "gamma"),
    "linear": ("tanh", "no gamma"),
    "no affine": ("relu6", "gamma"),
    "3x3 padded": ("sigmoid", "no gamma"),
}


@pytest.mark.parametrize("layer", _LAYER_CASES)
def test_each_layer_in_float64(interpreter: InterpreterProcess, layer: str) -> None:
    path = make_path(layer, *_LAYER_CASES[layer])
    grads = _gradients(path)
    _compare(run_fused(interpreter, path, grads), run_sequence(interpreter, path, grads), 1e-12, layer)


@pytest.mark.parametrize("which", ["mean", "variance", "gaussian", "none"])
@pytest.mark.parametrize("layer", ["3x3 padded", "no affine"])
def test_output_gradients_that_did_not_reach_the_loss(interpreter: InterpreterProcess, layer: str, which: str) -> None:
    path = make_path(layer, "hardswish", "gamma")
    grads = _gradients(path, which)
    _compare(run_fused(interpreter, path, grads), run_sequence(interpreter, path, grads), 1e-12, which)


# --------------------------------------------------------------------------- hostile inputs

#: tests/test_native_hostile.py's kinds of rows: NaN and ±inf means, NaN / inf / 0 / negative / tiny variances, a
#: variance at the 1e-12 floor, means far beyond ±30 σ.
_HOSTILE_MEAN = [0.0, 1.0, math.nan, math.inf, -math.inf, 0.5, 2.0, -1.0, 0.3, -50.0, 50.0, 1.0]
_HOSTILE_VARIANCE = [1.0, math.nan, 1.0, 1.0, 1.0, math.inf, 0.0, -1.0, 1e-20, 1.0, 1.0, 1e-12]


def _same_values(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    """The same NaN and ±inf pattern, the finite values within 1e-12 of the largest finite magnitude."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        actual = got[name]
        assert torch.equal(actual.isnan(), value.isnan()), f"{what}: {name} NaN pattern\n{actual}\n{value}"
        assert torch.equal(actual.isinf(), value.isinf()), f"{what}: {name} inf pattern\n{actual}\n{value}"
        assert torch.equal(actual[actual.isinf()], value[value.isinf()]), f"{what}: {name} infinities"
        finite = value.isfinite()
        assert _relative(actual[finite], value[finite]) <= 1e-12, f"{what}: {name}"


@pytest.mark.parametrize("eps", ["none", "gamma"], ids=["no output variance", "output variance"])
@pytest.mark.parametrize("activation", ["relu", "hardswish", "relu6", "silu", "tanh"])
def test_nan_inf_and_degenerate_variances_as_the_sequence(
    interpreter: InterpreterProcess, activation: str, eps: str
) -> None:
    """No affine stage (a non-finite input reaches every row of a layer): each channel's outputs and gradients,
    NaN and ±inf where the twins' sequence has them."""
    path = make_path("no affine", activation, eps)
    channels = len(_HOSTILE_MEAN)
    generator = torch.Generator().manual_seed(3)
    path = replace(
        path, mean=torch.tensor(_HOSTILE_MEAN, dtype=F64), variance=torch.tensor(_HOSTILE_VARIANCE, dtype=F64),
        source_weight=None if path.source_weight is None else torch.randn(channels, generator=generator, dtype=F64),
    )  # fmt: skip
    grads = _gradients(path)
    _same_values(run_fused(interpreter, path, grads), run_sequence(interpreter, path, grads), activation)


# --------------------------------------------------------------------------- float32

_FLOAT32_CASES = {
    "hardswish 3x3 padded": ("3x3 padded", "hardswish", "gamma"),
    "silu grouped": ("grouped 3x3, row chunks", "silu", "gamma"),
    "relu linear": ("linear", "relu", "no gamma"),
    "tanh depthwise": ("depthwise 3x3 padded", "tanh", "none"),
    "relu6 no affine": ("no affine", "relu6", "gamma"),
}
_HALF_ULP = 2.0**-24 * 1.01


@pytest.mark.parametrize("name", _FLOAT32_CASES)
def test_float32_rounds_the_double_result_once(interpreter: InterpreterProcess, name: str) -> None:
    """Each float32 output is the float64 result on the same (upcast) inputs rounded once; the twins' sequence,
    which rounds between its stages, is within a few float32 ulps of the largest magnitude."""
    path32 = make_path(*_FLOAT32_CASES[name]).to(F32)
    grads32 = _gradients(path32)
    got = run_fused(interpreter, path32, grads32)
    path64 = path32.to(F64)
    grads64 = Gradients(*(None if g is None else g.double() for g in vars(grads32).values()))
    exact = run_fused(interpreter, path64, grads64)
    for output, value in got.items():
        want = exact[output]
        if value.dtype == F64:  # taps: float64 either way, from the same float64 stage values
            assert torch.equal(value, want), output
            continue
        bound = _HALF_ULP * want.abs() + 1e-30
        assert bool(((value.double() - want).abs() <= bound).all()), output
    _compare(got, run_sequence(interpreter, path32, grads32), 2.0**-21, f"{name} against the float32 sequence")


# --------------------------------------------------------------------------- launches, host reads, refusals


_RECORDED = ("_path_forward_kernel", "_path_rows_backward_kernel", "_path_inputs_backward_kernel")


def _recorded_launches(path: Path, grads: Gradients) -> list[list[tuple[Any, tuple[Any, ...], dict[str, Any]]]]:
    """Both launchers with their kernels replaced by recorders, the data on the meta device (reading a value
    raises), the parameter tables on the CPU as the Function passes them; (kernel, args, kwargs) per launcher."""
    fused = pytest.importorskip(MODULE)
    launches: list[list[tuple[Any, tuple[Any, ...], dict[str, Any]]]] = []

    class Recorder:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: object) -> Any:
            return lambda *args, **kwargs: launches[-1].append((self.kernel, args, kwargs))

    def meta(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to("meta")

    with pytest.MonkeyPatch.context() as patch:
        for name in _RECORDED:
            patch.setattr(fused, name, Recorder(getattr(fused, name)))
        on_meta = replace(
            path, mean=path.mean.to("meta"), variance=path.variance.to("meta"), source_weight=meta(path.source_weight),
            weight=meta(path.weight), bias=meta(path.bias),
        )  # fmt: skip
        arguments = (*on_meta.arguments()[:-1], on_meta.bias)
        launches.append([])
        taps = fused.path_moments(*arguments)[3]
        launches.append([])
        fused.path_moments_backward(*arguments, taps, meta(grads.mean), meta(grads.variance), meta(grads.gaussian))
    return launches


@pytest.mark.parametrize("layer", list(LAYERS))
def test_one_launch_forward_two_backward_no_value_read_on_the_host(layer: str) -> None:
    path = make_path(layer, "silu", "gamma")
    with ScalarReads() as mode:
        forward, backward = _recorded_launches(path, _gradients(path))
    assert mode.reads == []
    assert len(forward) == 1
    assert len(backward) == (1 if layer == "no affine" else 2)
    fused = pytest.importorskip(MODULE)
    assert len(forward) <= fused.LAUNCHES["path_moments"] and len(backward) <= fused.LAUNCHES["path_moments_backward"]
    for kernel, args, _ in (*forward, *backward):
        assert all(t.device.type == "meta" for t in args if isinstance(t, Tensor)), kernel


def test_take_covers_the_cases_and_refuses_the_rest() -> None:
    fused = pytest.importorskip(MODULE)
    for layer in LAYERS:
        for dtype in (F32, F64):
            assert fused.path_moments_take(*make_path(layer, "hardswish", "gamma").to(dtype).arguments()), layer
    path = make_path("3x3 padded", "silu", "gamma")
    refused = {
        "float16": path.to(torch.float16),
        "mixed dtypes": replace(path, bias=path.bias.float() if path.bias is not None else None),
        "strided mean": replace(path, mean=torch.randn(12, dtype=F64)[::2]),
        "K > 512": make_path("1x1", "relu", "none"),
    }
    k_wide = refused["K > 512"]
    assert k_wide.weight is not None
    refused["K > 512"] = replace(k_wide, weight=torch.randn(5, 6, 513, dtype=F64))
    for name, case in refused.items():
        assert not fused.path_moments_take(*case.arguments()), name
    arguments = list(path.arguments())
    arguments[4] = ("piecewise", torch.tensor([9.0, 2.0, *([0.0] * 40)], dtype=F64))  # 9 pieces
    assert not fused.path_moments_take(*arguments)
    arguments[4] = ("smooth", fast._hermite_parameters("silu", 64).float())  # not float64
    assert not fused.path_moments_take(*arguments)


#: Every kernel variant: each activation code (and piecewise order, Gauss–Hermite kind), the output-variance stage
#: with and without γ, coverage tables or none, groups as lanes or row chunks, a bias or none, no affine stage,
#: float32 and float64, output gradients given or not.
_COMPILE_CASES = {
    "hardswish 3x3 padded f32": ("3x3 padded", "hardswish", "gamma", F32, "all"),
    "relu6 depthwise f64": ("depthwise 3x3 padded", "relu6", "no gamma", F64, "variance"),
    "silu grouped f32": ("grouped 3x3, row chunks", "silu", "none", F32, "mean"),
    "tanh linear f64": ("linear", "tanh", "gamma", F64, "all"),
    "sigmoid no affine f32": ("no affine", "sigmoid", "gamma", F32, "gaussian"),
    "relu 1x1 f32": ("1x1", "relu", "gamma", F32, "all"),
    "none 3x3 padded f64": ("3x3 padded", "none", "no gamma", F64, "all"),
}


@pytest.mark.parametrize("name", _COMPILE_CASES)
def test_kernels_compile_for_an_h100(name: str) -> None:
    """Every kernel the launchers start compiles to an sm_90 cubin (Triton's compiler and ptxas; no GPU) without
    spilling registers (cuobjdump's resource usage, where Triton ships cuobjdump)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; kernels are interpreted, not compiled")
    layer, activation, eps, dtype, which = _COMPILE_CASES[name]
    path = make_path(layer, activation, eps).to(dtype)
    for kernel, args, kwargs in (call for calls in _recorded_launches(path, _gradients(path, which)) for call in calls):
        compiled = compile_for_hopper(kernel, args, dict(kwargs))
        assert compiled.asm["cubin"], f"{kernel}: no cubin"
        usage = resource_usage(compiled.asm["cubin"])
        assert usage is None or ("STACK:0" in usage and "LOCAL:0" in usage), f"{kernel} spills: {usage}"
