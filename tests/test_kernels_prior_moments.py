"""The Triton twins of ``prior.c`` (``bkn_export.kernels.prior_moments``) compute what the C kernels and the
PyTorch forms compute, and the running-statistics kernel what ``functional.update_running_statistics_`` does.

The launchers run under ``TRITON_INTERPRET=1`` in a child process (``support.triton_interpreter``), on CPU
tensors, with the positional arguments of the ``native.call`` sites in ``bkn_export/fast_prior.py``. Each is
compared with

* the C kernel (``native.call``; skipped where the library is not built): the same formulas in double in the
  same order, so float32 results agree to one ulp (observed: bit for bit) and float64 ones to a few ulp (exp
  and log are NumPy's in the interpreter, glibc's in C, and log1p is Goldberg's form: observed ≤ 3e-16
  relative);
* the PyTorch form (``moments.normalized_output_moments`` / ``fast_prior._reference_assembly`` and autograd
  through them): float64 to 1e-13 relative; float32 within one float32 ulp of the float64 reference (the
  kernels compute in double and round once, so they are at least as accurate as the float32 form);
* NaN / inf / zero / tiny / huge / negative variances: NaN and non-finite where the C kernel has them
  (``tests/test_native_hostile.py``'s rows and more), equal elsewhere to the tolerances above.

The running-statistics kernel equals ``update_running_statistics_`` bit for bit on CPUs whose torch kernels
are vectorised (AVX2 / AVX512: lerp and ``add_(alpha=)`` are FMAs there, as in the kernel), else to one ulp.
Plus: every kernel variant compiles to an sm_90 cubin (Triton's compiler, no GPU needed), and no launcher
reads a value of a data tensor on the host (meta tensors: a read would fail).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.triton_compile import ScalarReads, compile_for_hopper
from support.triton_interpreter import InterpreterProcess
from torch import Tensor

from bkn_export import errors, fast_prior, moments, native
from bkn_export import functional as Fk

F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64]
CHANNELS = [1, 3, 67, 1031]  # 1031: two programs of 1024, the second one partial
MODULE = "bkn_export.kernels.prior_moments"
LIMIT = Fk.PRIOR_WEIGHT_LIMIT

needs_library = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")

#: Against the C kernel (same double formulas): (rtol, atol) per dtype; atol only admits subnormals.
C_TOLERANCE = {F32: (2.0**-23, 1e-44), F64: (1e-15, 1e-300)}
#: Against the float64 PyTorch form: one float32 ulp for float32 results. In float64 the reference is the less
#: accurate side: autograd differentiates Σ/(Σ+ε) as 1/(Σ+ε) - Σ/(Σ+ε)², which cancels log10(Σ/ε) digits (3e-13
#: observed at Σ/ε = 3000), where the kernel evaluates ε/(Σ+ε)².
REFERENCE_TOLERANCE = {F32: (2.0**-23, 1e-44), F64: (1e-11, 1e-300)}


@pytest.fixture(scope="module")
def interpreter() -> Iterator[InterpreterProcess]:
    pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")
    with InterpreterProcess() as process:
        yield process


def kernel(interpreter: InterpreterProcess, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Run the launcher ``name`` (a function of the module, named as its C kernel) in the interpreter; returns
    its positional arguments after the call."""
    return interpreter.call_in_place(f"{MODULE}:{name}", *args, **kwargs)


def c_kernel(name: str, *args: Tensor | None) -> tuple[Tensor | None, ...]:
    """The C kernel on clones of the arguments; returns them after the call."""
    cloned = tuple(None if a is None else a.clone() for a in args)
    native.call(name, *cloned)
    return cloned


def assert_close(
    actual: Tensor, expected: Tensor, tolerance: tuple[float, float], what: str, slack: Tensor | None = None
) -> None:
    """|actual - expected| ≤ rtol |expected| + atol (+ ``slack``, elementwise), with NaN where ``expected`` has
    NaN and equal infinities."""
    rtol, atol = tolerance
    expected = expected.to(actual.dtype)
    if slack is None:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda message: f"{what}: {message}")  # fmt: skip
        return
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN at other elements"
    infinite = expected.isinf()
    assert torch.equal(actual.isinf(), infinite) and torch.equal(actual[infinite], expected[infinite]), what
    finite = expected.isfinite()
    error = (actual.double() - expected.double()).abs()[finite]
    bound = (rtol * expected.double().abs() + atol + slack.double())[finite]
    worst = int((error - bound).argmax()) if error.numel() else 0
    assert bool((error <= bound).all()), f"{what}: error {float(error[worst]):.3g} > bound {float(bound[worst]):.3g}"


def logit_slack(inputs: dict[str, Tensor | None], grads: tuple[bool, bool] = (True, True)) -> Tensor:
    """∂l = ∂p k L s (1 - s): 1 - s cancels as s → 1, so exp's last bit (glibc, NumPy, libdevice and torch
    differ by an ulp) moves ∂l by up to ulp(1) |∂p k L|; two of those are allowed on top of the tolerance."""
    grad_weight, known = inputs["grad_weight"], inputs["known"]
    assert grad_weight is not None
    scale = grad_weight.double().abs() * LIMIT * (1.0 if known is None else known.double().abs())
    return 2.0**-51 * scale * float(grads[1])


def random(channels: int, dtype: torch.dtype, seed: int, scale: float = 1.0, low: float = 0.0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(channels, generator=generator, dtype=F64) * scale + low).to(dtype)


def positive(channels: int, dtype: torch.dtype, seed: int) -> Tensor:
    """Variances across six decades, 1e-6 to 3."""
    generator = torch.Generator().manual_seed(seed)
    return (3.0 * 10.0 ** (-6.0 * torch.rand(channels, generator=generator, dtype=F64))).to(dtype)


def mask(channels: int, dtype: torch.dtype, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(channels, generator=generator) < 0.7).to(dtype)


def empty(like: Tensor) -> Tensor:
    """An output buffer full of a sentinel, so that an unwritten element shows."""
    return torch.full_like(like, -12345.0)


# --------------------------------------------------------------------------- inputs per kernel


def output_variance_inputs(channels: int, dtype: torch.dtype, affine: bool) -> dict[str, Tensor | None]:
    return {
        "variance": positive(channels, dtype, 1),
        "weight": random(channels, dtype, 2) if affine else None,
        "grad": random(channels, dtype, 3),
    }


def prior_assembly_inputs(channels: int, dtype: torch.dtype, known: bool) -> dict[str, Tensor | None]:
    """Raw noise across softplus' threshold (20) and logits far into both tails of the sigmoid."""
    return {
        "variance": positive(channels, dtype, 4),
        "raw": random(channels, dtype, 5, scale=12.0, low=5.0),
        "logit": random(channels, dtype, 6, scale=12.0),
        "known": mask(channels, dtype, 7) if known else None,
        "grad_variance": random(channels, dtype, 8),
        "grad_weight": random(channels, dtype, 9),
    }


# Rows of tests/test_native_hostile.py (mean, variance) and more: zero, tiny, huge, negative, -ε, NaN, ±inf.
_NAN, _INF = math.nan, math.inf
HOSTILE_MEAN = [0.0, 1.0, _NAN, _INF, -_INF, 0.5, _NAN, 2.0, -1.0, 19.9, 20.1, 40.0, -30.0, -800.0, 800.0, 1e30, 20.0]
HOSTILE_VARIANCE = [1.0, _NAN, 1.0, 1.0, 1.0, _INF, 0.0, -1.0, 1e-20, 1e-30, 1e30, -1e-5, 3e-39, 1e19, 4e19, 2.0, 1e-12]
EPS = 1e-5


def hostile(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.tensor(HOSTILE_MEAN, dtype=dtype), torch.tensor(HOSTILE_VARIANCE, dtype=dtype)


# --------------------------------------------------------------------------- output_variance


def run_output_variance(
    interpreter: InterpreterProcess, inputs: dict[str, Tensor | None], eps: float, wants_grad_weight: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    variance, weight, grad = inputs["variance"], inputs["weight"], inputs["grad"]
    assert variance is not None and grad is not None
    params = native.parameters(eps)
    out = kernel(interpreter, "output_variance", variance, weight, params, empty(variance))[3]
    grad_weight = empty(variance) if wants_grad_weight else None
    backward = kernel(
        interpreter, "output_variance_backward", variance, weight, params, grad, empty(variance), grad_weight
    )
    return out, backward[4], backward[5]


def output_variance_reference(
    inputs: dict[str, Tensor | None], eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The PyTorch form (moments.normalized_output_moments) and its autograd gradients, in ``dtype``."""
    variance, weight, grad = (None if t is None else t.to(dtype) for t in inputs.values())
    assert variance is not None and grad is not None
    leaves = [t.detach().requires_grad_() for t in (variance, weight) if t is not None]
    value = moments.normalized_output_moments(
        leaves[0], leaves[0], leaves[1] if weight is not None else None, None, eps
    )
    found = torch.autograd.grad(value[1], leaves, grad)
    return value[1].detach(), found[0], found[1] if weight is not None else None


@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
def test_output_variance_matches_the_pytorch_form(
    interpreter: InterpreterProcess, channels: int, dtype: torch.dtype, affine: bool
) -> None:
    inputs = output_variance_inputs(channels, dtype, affine)
    got = run_output_variance(interpreter, inputs, 1e-3)
    exact = output_variance_reference(inputs, 1e-3, F64)
    for name, actual, expected in zip(("variance", "grad_variance", "grad_weight"), got, exact):
        if expected is None:  # no γ: the kernel still writes ∂γ = ∂v 2 Σ/(Σ+ε) where asked, as prior.c does
            assert actual is not None and name == "grad_weight"
            variance, grad = inputs["variance"], inputs["grad"]
            assert variance is not None and grad is not None
            expected = grad.double() * 2.0 * (variance.double() / (variance.double() + 1e-3))
        assert actual is not None and actual.dtype == dtype
        assert_close(actual, expected, REFERENCE_TOLERANCE[dtype], f"output_variance {name}")


@needs_library
@pytest.mark.parametrize("wants_grad_weight", [True, False], ids=["grad-weight", "no-grad-weight"])
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
def test_output_variance_matches_the_c_kernel(
    interpreter: InterpreterProcess, channels: int, dtype: torch.dtype, affine: bool, wants_grad_weight: bool
) -> None:
    inputs = output_variance_inputs(channels, dtype, affine)
    variance, weight, grad = inputs["variance"], inputs["weight"], inputs["grad"]
    assert variance is not None and grad is not None
    got = run_output_variance(interpreter, inputs, EPS, wants_grad_weight)
    params = native.parameters(EPS)
    out = c_kernel("output_variance", variance, weight, params, empty(variance))[3]
    grad_weight = empty(variance) if wants_grad_weight else None
    backward = c_kernel("output_variance_backward", variance, weight, params, grad, empty(variance), grad_weight)
    assert out is not None and backward[4] is not None
    assert_close(got[0], out, C_TOLERANCE[dtype], "variance")
    assert_close(got[1], backward[4], C_TOLERANCE[dtype], "grad_variance")
    if wants_grad_weight:
        assert got[2] is not None and backward[5] is not None
        assert_close(got[2], backward[5], C_TOLERANCE[dtype], "grad_weight")
    else:
        assert got[2] is None


# --------------------------------------------------------------------------- prior_assembly


def run_prior_assembly(
    interpreter: InterpreterProcess, inputs: dict[str, Tensor | None], grads: tuple[bool, bool] = (True, True)
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    variance, raw, logit, known = (inputs[k] for k in ("variance", "raw", "logit", "known"))
    assert variance is not None and raw is not None and logit is not None
    params = native.parameters(LIMIT)
    forward = kernel(interpreter, "prior_assembly", variance, raw, logit, known, params, empty(raw), empty(raw))
    grad_variance = inputs["grad_variance"] if grads[0] else None
    grad_weight = inputs["grad_weight"] if grads[1] else None
    backward = kernel(
        interpreter, "prior_assembly_backward", raw, logit, known, params, grad_variance, grad_weight,
        empty(raw), empty(raw),
    )  # fmt: skip
    return forward[5], forward[6], backward[6], backward[7]


def prior_assembly_reference(
    inputs: dict[str, Tensor | None], dtype: torch.dtype, grads: tuple[bool, bool] = (True, True)
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fast_prior._reference_assembly (the module's own operators) and its autograd gradients, in ``dtype``."""
    variance, raw, logit, known, grad_variance, grad_weight = (
        None if t is None else t.detach().clone().to(dtype) for t in inputs.values()
    )
    assert variance is not None and raw is not None and logit is not None
    raw, logit = raw.requires_grad_(), logit.requires_grad_()
    outputs = fast_prior._reference_assembly(variance, raw, logit, known)
    wanted = [(o, g) for o, g, w in zip(outputs, (grad_variance, grad_weight), grads) if w]
    found: tuple[Tensor | None, ...] = (None, None)
    if wanted:
        found = torch.autograd.grad([o for o, _ in wanted], [raw, logit], [g for _, g in wanted], allow_unused=True)
    grad_raw, grad_logit = (torch.zeros_like(raw) if g is None else g for g in found)
    return outputs[0].detach(), outputs[1].detach(), grad_raw.detach(), grad_logit.detach()


_ASSEMBLY_NAMES = ("variance", "weight", "grad_raw", "grad_logit")


@pytest.mark.parametrize("known", [True, False], ids=["known", "no-known"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
def test_prior_assembly_matches_the_pytorch_form(
    interpreter: InterpreterProcess, channels: int, dtype: torch.dtype, known: bool
) -> None:
    inputs = prior_assembly_inputs(channels, dtype, known)
    got = run_prior_assembly(interpreter, inputs)
    exact = prior_assembly_reference(inputs, F64)
    for name, actual, expected in zip(_ASSEMBLY_NAMES, got, exact):
        assert actual.dtype == dtype
        slack = logit_slack(inputs) if name == "grad_logit" else None
        assert_close(actual, expected, REFERENCE_TOLERANCE[dtype], f"prior_assembly {name}", slack)


@needs_library
@pytest.mark.parametrize("known", [True, False], ids=["known", "no-known"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
def test_prior_assembly_matches_the_c_kernel(
    interpreter: InterpreterProcess, channels: int, dtype: torch.dtype, known: bool
) -> None:
    inputs = prior_assembly_inputs(channels, dtype, known)
    got = run_prior_assembly(interpreter, inputs)
    assert_close_to_c_assembly(got, inputs, dtype, (True, True))


def assert_close_to_c_assembly(
    got: tuple[Tensor, ...], inputs: dict[str, Tensor | None], dtype: torch.dtype, grads: tuple[bool, bool]
) -> None:
    variance, raw, logit, known = (inputs[k] for k in ("variance", "raw", "logit", "known"))
    assert variance is not None and raw is not None and logit is not None
    params = native.parameters(LIMIT)
    forward = c_kernel("prior_assembly", variance, raw, logit, known, params, empty(raw), empty(raw))
    grad_variance = inputs["grad_variance"] if grads[0] else None
    grad_weight = inputs["grad_weight"] if grads[1] else None
    backward = c_kernel(
        "prior_assembly_backward", raw, logit, known, params, grad_variance, grad_weight, empty(raw), empty(raw)
    )
    for name, actual, expected in zip(_ASSEMBLY_NAMES, got, (*forward[5:7], *backward[6:8])):
        assert expected is not None
        slack = logit_slack(inputs, grads) if name == "grad_logit" else None
        assert_close(actual, expected, C_TOLERANCE[dtype], f"prior_assembly {name}", slack)


@pytest.mark.parametrize("grads", [(True, False), (False, True), (False, False)], ids=["dv", "dp", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prior_assembly_backward_takes_none_gradients_as_zero(
    interpreter: InterpreterProcess, dtype: torch.dtype, grads: tuple[bool, bool]
) -> None:
    inputs = prior_assembly_inputs(67, dtype, known=True)
    got = run_prior_assembly(interpreter, inputs, grads)
    exact = prior_assembly_reference(inputs, F64, grads)
    assert_close(got[2], exact[2], REFERENCE_TOLERANCE[dtype], "grad_raw")
    assert_close(got[3], exact[3], REFERENCE_TOLERANCE[dtype], "grad_logit", logit_slack(inputs, grads))
    assert bool((got[2] == 0).all()) == (not grads[0])
    assert bool((got[3] == 0).all()) == (not grads[1])
    if native.library() is not None:
        assert_close_to_c_assembly(got, inputs, dtype, grads)


# --------------------------------------------------------------------------- hostile inputs


def _assert_pytorch_pattern(got: Tensor, exact: Tensor, infinite_input: Tensor, what: str) -> None:
    """tests/test_native_hostile.py's rule, on the rows without an infinite input: NaN where the float64 PyTorch
    form rounded to the kernel's dtype has NaN, non-finite where it is non-finite (float32: where the value
    overflows; the float32 PyTorch form may give NaN there, e.g. inf · 0 in γ γ ∂[Σ/(Σ+ε)]), and its values
    elsewhere (rtol 1e-9, atol 1e-12 as there; float32: one ulp). Rows with an infinite input are pinned against
    the C kernel only: its closed forms and autograd may disagree there (Σ = inf gives ∂Σ = 0 in C, NaN through
    autograd's 1/(Σ+ε) - Σ/(Σ+ε)²)."""
    rows, rounded = ~infinite_input, exact.to(got.dtype)
    assert torch.equal(got.isnan()[rows], rounded.isnan()[rows]), (what, got, exact)
    assert torch.equal(got.isfinite()[rows], rounded.isfinite()[rows]), (what, got, exact)
    finite = rows & rounded.isfinite()
    rtol = 1e-9 if got.dtype == F64 else 2.0**-23
    torch.testing.assert_close(got[finite].double(), exact[finite], rtol=rtol, atol=1e-12, msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_variance_on_hostile_rows(interpreter: InterpreterProcess, dtype: torch.dtype) -> None:
    """NaN, ±inf, zero, tiny, huge (where (Σ+ε)² overflows float32) and negative variances, Σ = -ε."""
    mean, variance = hostile(dtype)
    inputs: dict[str, Tensor | None] = {"variance": variance, "weight": mean.flip(0), "grad": torch.ones_like(mean)}
    got = run_output_variance(interpreter, inputs, EPS)
    if native.library() is not None:
        params = native.parameters(EPS)
        out = c_kernel("output_variance", variance, mean.flip(0), params, empty(mean))[3]
        backward = c_kernel("output_variance_backward", variance, mean.flip(0), params, inputs["grad"], empty(mean),
                            empty(mean))  # fmt: skip
        for name, actual, expected in zip(("variance", "grad_variance", "grad_weight"), got, (out, *backward[4:6])):
            assert actual is not None and expected is not None
            assert_close(actual, expected, C_TOLERANCE[dtype], f"hostile {name}")
    exact = output_variance_reference(inputs, EPS, F64)
    infinite_input = variance.isinf() | mean.flip(0).isinf()
    for name, actual, expected in zip(("variance", "grad_variance", "grad_weight"), got, exact):
        assert actual is not None and expected is not None
        _assert_pytorch_pattern(actual, expected, infinite_input, f"hostile {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prior_assembly_on_hostile_rows(interpreter: InterpreterProcess, dtype: torch.dtype) -> None:
    """softplus at and beyond its threshold, ±inf and NaN noise, sigmoid's tails (±800: exp overflows)."""
    mean, variance = hostile(dtype)
    inputs: dict[str, Tensor | None] = {
        "variance": variance,
        "raw": mean,
        "logit": mean.flip(0),
        "known": None,
        "grad_variance": torch.ones_like(mean),
        "grad_weight": torch.ones_like(mean),
    }
    got = run_prior_assembly(interpreter, inputs)
    if native.library() is not None:
        assert_close_to_c_assembly(got, inputs, dtype, (True, True))
    exact = prior_assembly_reference(inputs, F64)
    infinite_input = variance.isinf() | mean.isinf() | mean.flip(0).isinf()
    for name, actual, expected in zip(_ASSEMBLY_NAMES, got, exact):
        _assert_pytorch_pattern(actual, expected, infinite_input, f"hostile {name}")


def test_float32_keeps_what_double_keeps(interpreter: InterpreterProcess) -> None:
    """Where float32 arithmetic would give 0 (s (1 - s) once sigmoid(l) rounds to 1; (Σ+ε)² overflowing),
    the kernels return the double result rounded, as prior.c does: the float64 form to one ulp."""
    dtype = F32
    logit = torch.tensor([17.0, 25.0, 30.0, -95.0], dtype=dtype)
    inputs: dict[str, Tensor | None] = {
        "variance": torch.ones(4, dtype=dtype),
        "raw": torch.zeros(4, dtype=dtype),
        "logit": logit,
        "known": None,
        "grad_variance": torch.ones(4, dtype=dtype),
        "grad_weight": torch.ones(4, dtype=dtype),
    }
    got = run_prior_assembly(interpreter, inputs)
    exact = prior_assembly_reference(inputs, F64)
    assert bool((got[3] > 0).all()) and bool((got[1] > 0).all())  # float32 operators give 0 for most of these
    assert_close(got[3], exact[3], REFERENCE_TOLERANCE[dtype], "grad_logit", logit_slack(inputs))
    variance = torch.tensor([2e19, 1e19], dtype=dtype)
    overflow: dict[str, Tensor | None] = {"variance": variance, "weight": None, "grad": torch.ones(2, dtype=dtype)}
    got_variance = run_output_variance(interpreter, overflow, EPS)
    assert bool((got_variance[1] > 0).all())
    closed_form = EPS / (variance.double() + EPS) ** 2  # autograd's form cancels to 0 here, in any precision
    assert_close(got_variance[1], closed_form, (2.0**-23, 1.5e-45), "grad_variance")


def test_count_limits_the_channels_written(interpreter: InterpreterProcess) -> None:
    """``count`` as in native.call: only the first ``count`` elements are read and written."""
    inputs = output_variance_inputs(9, F64, affine=True)
    variance, weight = inputs["variance"], inputs["weight"]
    assert variance is not None and weight is not None
    out = kernel(interpreter, "output_variance", variance, weight, native.parameters(EPS), empty(variance), count=5)[3]
    expected = moments.normalized_output_moments(variance, variance, weight, None, EPS)[1]
    torch.testing.assert_close(out[:5], expected[:5], rtol=1e-15, atol=0.0)
    assert bool((out[5:] == -12345.0).all())


def test_output_variance_backward_leaves_a_none_output_unwritten(interpreter: InterpreterProcess) -> None:
    """grad_weight None (no γ, or its gradient not wanted): only ∂Σ is written, as with prior.c's NULL."""
    inputs = output_variance_inputs(67, F32, affine=True)
    got = run_output_variance(interpreter, inputs, EPS, wants_grad_weight=False)
    exact = output_variance_reference(inputs, EPS, F64)
    assert got[2] is None
    assert_close(got[1], exact[1], REFERENCE_TOLERANCE[F32], "grad_variance")


# --------------------------------------------------------------------------- running statistics


def _exact_fma_torch() -> bool:
    """torch's CPU lerp / add(alpha) are FMAs in its vectorised kernels (AVX2, AVX512), as in the kernel."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _skip_unless_the_interpreter_fuses_fma(interpreter: InterpreterProcess) -> None:
    """These comparisons take the kernel's tl.fma as one rounding, as on the GPU; Triton < 3.9's interpreter
    (torch 2.11 pins 3.6) multiplies, then adds, which no tolerance of these tests' form bounds (lerp cancels)."""
    if not interpreter.call("support.triton_interpreter:fma_rounds_once"):
        pytest.skip("this Triton's interpreter rounds tl.fma twice (Triton < 3.9); the GPU tests cover the kernel")


def run_running_statistics(
    interpreter: InterpreterProcess,
    channels: int,
    dtype: torch.dtype,
    momentum: float | int | None,
    count: int,
    batches: int,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(kernel, functional.update_running_statistics_) on the same buffers and posterior."""
    running_mean, running_variance = random(channels, dtype, 11), positive(channels, dtype, 12)
    posterior_mean, posterior_variance = random(channels, dtype, 13, scale=3.0), positive(channels, dtype, 14)
    counter = torch.tensor(batches, dtype=torch.long)
    got = kernel(
        interpreter, "running_statistics_update", running_mean, running_variance, posterior_mean, posterior_variance,
        momentum, count, counter,
    )  # fmt: skip
    expected_mean, expected_variance = running_mean.clone(), running_variance.clone()
    alpha = momentum if momentum is not None else counter.to(dtype).reciprocal()  # what nn._momentum() passes
    Fk.update_running_statistics_(expected_mean, expected_variance, posterior_mean, posterior_variance, alpha, count)
    assert torch.equal(got[6], counter), "the counter is read, never written"
    return (got[0], got[1]), (expected_mean, expected_variance)


@pytest.mark.parametrize(("momentum", "count"), [(0.1, 37), (0.6, 2), (0.25, 1), (None, 37), (None, 1), (2, 5)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
def test_running_statistics_update_matches_the_functional_update(
    interpreter: InterpreterProcess, channels: int, dtype: torch.dtype, momentum: float | int | None, count: int
) -> None:
    """Float α on both sides of lerp's 0.5 switch; α = 1 / num_batches_tracked; n = 1 (no unbiasing); an int α
    takes the reference's lerp form for the variance (α = 2: for 0 and 1 both forms give the same bits)."""
    _skip_unless_the_interpreter_fuses_fma(interpreter)
    got, expected = run_running_statistics(interpreter, channels, dtype, momentum, count, batches=7)
    tolerance = (0.0, 0.0) if _exact_fma_torch() else (2.0 ** -(23 if dtype == F32 else 52), 0.0)
    assert_close(got[0], expected[0], tolerance, "running_mean")
    assert_close(got[1], expected[1], tolerance, "running_variance")


@pytest.mark.parametrize("batches", [1, 2, 3, 1000, 2**40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cumulative_average_reads_the_counter_on_the_device(
    interpreter: InterpreterProcess, dtype: torch.dtype, batches: int
) -> None:
    """momentum=None: α = 1 / num_batches_tracked from the counter tensor; 1 replaces the buffers, 2 averages."""
    _skip_unless_the_interpreter_fuses_fma(interpreter)
    got, expected = run_running_statistics(interpreter, 67, dtype, None, 9, batches)
    tolerance = (0.0, 0.0) if _exact_fma_torch() else (2.0 ** -(23 if dtype == F32 else 52), 0.0)
    assert_close(got[0], expected[0], tolerance, "running_mean")
    assert_close(got[1], expected[1], tolerance, "running_variance")


def test_running_statistics_keep_nan_and_inf_as_the_functional_update(interpreter: InterpreterProcess) -> None:
    _skip_unless_the_interpreter_fuses_fma(interpreter)
    mean, variance = hostile(F32)
    for momentum in (0.1, 0.7, None):
        running_mean, running_variance = variance.flip(0).clone(), mean.abs().clone()
        counter = torch.tensor(4)
        got = kernel(
            interpreter, "running_statistics_update", running_mean, running_variance, mean, variance, momentum, 5,
            counter,
        )  # fmt: skip
        alpha = momentum if momentum is not None else counter.float().reciprocal()
        Fk.update_running_statistics_(running_mean, running_variance, mean, variance, alpha, 5)
        tolerance = (0.0, 0.0) if _exact_fma_torch() else (2.0**-23, 0.0)
        assert_close(got[0], running_mean, tolerance, f"running_mean, momentum {momentum}")
        assert_close(got[1], running_variance, tolerance, f"running_variance, momentum {momentum}")


def test_cumulative_average_needs_the_counter(interpreter: InterpreterProcess) -> None:
    buffers = [torch.zeros(3) for _ in range(4)]
    with pytest.raises(errors.BKNInputError, match="num_batches_tracked"):
        kernel(interpreter, "running_statistics_update", *buffers, None, 4, None)


def test_mixed_dtypes_are_refused(interpreter: InterpreterProcess) -> None:
    """One dtype per call (the caller runs the PyTorch form otherwise), never a silent reinterpretation."""
    with pytest.raises(errors.BKNInputError, match="float32"):
        kernel(interpreter, "output_variance", torch.ones(3), torch.ones(3, dtype=F64), native.parameters(EPS),
               torch.empty(3))  # fmt: skip
    with pytest.raises(errors.BKNInputError, match="float32"):
        kernel(interpreter, "running_statistics_update", torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=F64),
               torch.zeros(3), 0.1, 4)  # fmt: skip


# --------------------------------------------------------------------------- contract: names, launches


def test_launchers_mirror_every_prior_c_kernel() -> None:
    """LAUNCHERS names every kernel prior.c defines (and the running-statistics update), one launch each."""
    prior_moments = pytest.importorskip(MODULE, reason="the launchers import triton (pip install triton)")
    source = (Path(native.__file__).parent / "csrc" / "prior.c").read_text()
    c_kernels = set(re.findall(r"BKN_BOTH_DTYPES\(\w+, (\w+)\)", source))
    assert c_kernels == {"output_variance", "output_variance_backward", "prior_assembly", "prior_assembly_backward"}
    assert set(prior_moments.LAUNCHERS) == c_kernels | {"running_statistics_update"}
    assert prior_moments.LAUNCHES == dict.fromkeys(prior_moments.LAUNCHERS, 1)


# --------------------------------------------------------------------------- host reads and compilation

_META = torch.device("meta")


def _launch_arguments() -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Every launcher with every combination of its optional tensors, for both dtypes: data tensors on the
    meta device (no values: a host read would raise), parameter tables on the CPU, as the callers pass them."""
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    eps, limit = native.parameters(EPS), native.parameters(LIMIT)
    for dtype in DTYPES:
        data = functools.partial(torch.empty, 1031, dtype=dtype, device=_META)
        for weight in (data(), None):
            calls.append(("output_variance", (data(), weight, eps, data()), {}))
            for grad_weight in (data(), None):
                calls.append(("output_variance_backward", (data(), weight, eps, data(), data(), grad_weight), {}))
        for known in (data(), None):
            calls.append(("prior_assembly", (data(), data(), data(), known, limit, data(), data()), {}))
            for grad_variance in (data(), None):
                for grad_weight in (data(), None):
                    arguments = (data(), data(), known, limit, grad_variance, grad_weight, data(), data())
                    calls.append(("prior_assembly_backward", arguments, {}))
        counter = torch.zeros((), dtype=torch.long, device=_META)
        for momentum in (0.1, 1, None):
            calls.append(("running_statistics_update", (data(), data(), data(), data(), momentum, 37, counter), {}))
        arguments = (data(), data(), data(), data(), 0.1, 37, counter)
        calls.append(("running_statistics_update", arguments, {"count_batch": True}))
    return calls


def _recorded_launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, tuple[Any, ...], dict[str, Any]]]:
    """Run every launcher of _launch_arguments with its kernels recorded instead of launched."""
    prior_moments = pytest.importorskip(MODULE, reason="the launchers import triton (pip install triton)")
    launches: list[tuple[str, Any, tuple[Any, ...], dict[str, Any]]] = []
    current = [""]

    class Recorder:
        def __init__(self, jit_kernel: Any) -> None:
            self.kernel = jit_kernel

        def __getitem__(self, grid: object) -> Any:
            return lambda *args, **kwargs: launches.append((current[0], self.kernel, args, kwargs))

    for name, value in list(vars(prior_moments).items()):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(prior_moments, name, Recorder(value))
    for name, args, kwargs in _launch_arguments():
        current[0] = name
        before = len(launches)
        prior_moments.LAUNCHERS[name](*args, **kwargs)
        assert len(launches) - before == prior_moments.LAUNCHES[name], name
    return launches


def test_launchers_read_no_tensor_value_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grids and flags come from shapes, dtypes and the CPU parameter tables; the counter of momentum=None is
    handed to the kernel. On meta data tensors any read of a value would raise; none is recorded either."""
    with ScalarReads() as mode:
        launches = _recorded_launches(monkeypatch)
    assert mode.reads == []
    assert len(launches) == len(_launch_arguments())


def test_parameters_on_the_device_are_refused() -> None:
    """A parameters table on the data's device would be read with a synchronisation: refused, with the fix."""
    prior_moments = pytest.importorskip(MODULE, reason="the launchers import triton (pip install triton)")
    data = torch.empty(3, device=_META)
    with pytest.raises(errors.BKNInputError, match="CPU float64 table"):
        prior_moments.output_variance(data, None, torch.ones(1, dtype=F64, device=_META), data)


def test_every_kernel_variant_compiles_for_an_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kernel, for both dtypes and every combination of its optional tensors, compiles to an sm_90 cubin
    (Triton's own compiler and ptxas: no GPU needed); the interpreter does not check Triton's typing rules, nor
    which division the GPU gets (the interpreter's is NumPy's, IEEE)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process; kernels are interpreted, not compiled")
    compiled: set[str] = set()
    for name, jit_kernel, args, kwargs in _recorded_launches(monkeypatch):
        binary = compile_for_hopper(jit_kernel, args, dict(kwargs))
        assert binary.asm["cubin"], f"{name}: no cubin"
        # Every division IEEE-rounded, as in C and torch (Triton's float32 "/" is div.full: 2 ulp).
        assert not re.search(r"div\.(full|approx)", binary.asm["ptx"]), f"{name}: an approximate division"
        compiled.add(name)
    assert compiled == {name for name, _, _ in _launch_arguments()}


@pytest.mark.parametrize("channels", [0, 3, 2500], ids=["none", "one-program", "three-programs"])
def test_count_batch_adds_one_to_the_counter_once(interpreter: InterpreterProcess, channels: int) -> None:
    """count_batch: the same launch counts the batch (program 0 only, however many programs run; with no
    channel, no launch: the counter is still counted); the statistics are those without it."""
    generator = torch.Generator().manual_seed(5)
    buffers = [torch.rand(channels, generator=generator, dtype=F32) + 0.5 for _ in range(4)]
    counter = torch.tensor(41)
    got = interpreter.call_in_place(
        f"{MODULE}:running_statistics_update", *[b.clone() for b in buffers], 0.1, 6, counter, count_batch=True
    )
    assert int(got[6]) == 42
    plain = kernel(interpreter, "running_statistics_update", *[b.clone() for b in buffers], 0.1, 6, torch.tensor(41))
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


def test_count_batch_refuses_the_cumulative_average(interpreter: InterpreterProcess) -> None:
    buffers = [torch.zeros(3) for _ in range(4)]
    with pytest.raises(errors.BKNInputError, match="count_batch"):
        interpreter.call_in_place(
            f"{MODULE}:running_statistics_update", *buffers, None, 4, torch.tensor(2), count_batch=True
        )
