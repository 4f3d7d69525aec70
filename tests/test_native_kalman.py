"""The Kalman update's C kernels (``native/csrc/kalman.c``) in the CPU fast path of ``bkn::batch_kalman_norm``.

:mod:`bkn_export.cpu_kernels` runs the per-channel update forward (``kalman_update``) and its
per-channel backward (``kalman_norm_backward``) in C where they take the tensors. Compared here with
the functional reference (:func:`functional.batch_kalman_norm`, :func:`functional.batch_kalman_norm_backward`)
in float64, with the fast path's own PyTorch form (:func:`native.disabled`) to isolate the kernels'
rounding, and in float32 against the float64 reference. Without a C compiler the tests skip with the reason.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from support import native_builds
from torch import Tensor

from bkn_export import cpu_kernels, native
from bkn_export import functional as Fk
from bkn_export.functional import KalmanNormInputs, KalmanStep
from bkn_export.ops import kalman_norm_step

F64 = torch.float64
EPS = 1e-5

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")

FALLBACKS = {  # fallback_ratio, prior variance scale: mean(Σ_pred / S) is about 1, or 1000 where it fires
    "off": (0.0, 1.0),
    "holds": (100.0, 1.0),
    "fires": (100.0, 1000.0),
}


def _inputs(
    shape: tuple[int, ...],
    fallback: str = "off",
    dtype: torch.dtype = F64,
    affine: bool = True,
    seed: int = 0,
    shift: float = 0.5,
) -> KalmanNormInputs:
    """x: N(shift, 1.5²) per channel, the prior mean shift + N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    ratio, scale = FALLBACKS[fallback]
    channels = shape[1]

    def draw(*size: int) -> Tensor:
        return torch.randn(size, generator=generator, dtype=F64)

    def uniform(*size: int) -> Tensor:
        return torch.rand(size, generator=generator, dtype=F64)

    x = draw(*shape) * 1.5 + shift
    prior_weight = uniform(channels) * 0.9  # both sides of lerp's w = q < 0.5 switch
    weight = uniform(channels) + 0.5 if affine else None
    bias = draw(channels) if affine else None
    values = (x, draw(channels) + shift, (uniform(channels) + 0.5) * scale, prior_weight, weight, bias)
    cast = (None if t is None else t.to(dtype) for t in values)
    return KalmanNormInputs(*cast, EPS, ratio)  # type: ignore[call-arg]


def _output_grads(inputs: KalmanNormInputs, seed: int = 1) -> KalmanStep:
    generator = torch.Generator().manual_seed(seed)
    x, channels = inputs.x, inputs.x.shape[1]
    draws = (
        torch.randn(x.shape, generator=generator, dtype=F64),
        *torch.randn((2, channels), generator=generator, dtype=F64),
    )
    return KalmanStep(*(g.to(x.dtype) for g in draws))


def _assert_update_kernel_ran(state: cpu_kernels.ForwardState, dtype: torch.dtype) -> None:
    """The forward ran the kernel (its posterior only), unless this machine's ATen rounds the
    update otherwise (then the PyTorch form, intermediates kept)."""
    kernel_ran = state.terms.batch_weight is cpu_kernels.NOT_KEPT
    assert kernel_ran == cpu_kernels._update_kernel_rounds_as_aten(dtype)


def _fast(inputs: KalmanNormInputs, grads: KalmanStep) -> tuple[Tensor, ...]:
    """cpu_kernels' forward then its backward from the forward's state (the eager path's sequence)."""
    step, state = cpu_kernels.forward_with_state(inputs)
    return (*step, *cpu_kernels.backward_from_state(inputs, state, *grads))


def _reference(inputs: KalmanNormInputs, grads: KalmanStep) -> tuple[Tensor | None, ...]:
    step = Fk.batch_kalman_norm(*inputs)
    x, m, v, p, w, _, eps, ratio = inputs
    return (*step, *Fk.batch_kalman_norm_backward(*grads, x, m, v, p, w, eps, ratio))


def _assert_close_all(got: tuple[Tensor | None, ...], want: tuple[Tensor | None, ...], rtol: float) -> None:
    """Each pair within rtol of the larger of the value and its tensor's largest magnitude (the
    gradients are sums of terms of that size: their small entries carry absolute rounding)."""
    for index, (a, b) in enumerate(zip(got, want)):
        if b is None:
            continue
        assert a is not None, f"output {index}"
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m, i=index: f"output {i}: {m}")


def _kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the C kernels :func:`native.call` runs from here on (this test only), in order."""
    calls: list[str] = []
    call = native.call
    monkeypatch.setattr(native, "call", lambda name, *a, **k: (calls.append(name), call(name, *a, **k))[1])
    return calls


SHAPES = [(4, 3, 5), (2, 64, 4, 4), (2, 37, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_kernels_equal_the_reference_in_float64(shape: tuple[int, ...], fallback: str, affine: bool) -> None:
    """Values and every input gradient; the update's rounding is 1e-15, the reference sums
    (x - μ) / s its own way (x̂ over (N, *)): 1e-12 of the largest entry."""
    inputs = _inputs(shape, fallback, affine=affine)
    grads = _output_grads(inputs)
    _assert_update_kernel_ran(cpu_kernels.forward_state(inputs), F64)
    got = _fast(inputs, grads)
    want = _reference(inputs, grads)
    _assert_close_all(got, want, 1e-13)  # without γ the reference's ∂L/∂γ is None: skipped
    if fallback == "fires":
        assert torch.equal(got[6], torch.zeros_like(got[6]))  # ∂L/∂p where p is the constant 0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fallback", FALLBACKS)
def test_kernels_equal_the_pytorch_form_to_rounding(shape: tuple[int, ...], fallback: str) -> None:
    """Against cpu_kernels' own PyTorch form (same ATen passes): only the per-channel rounding differs."""
    inputs = _inputs(shape, fallback)
    grads = _output_grads(inputs)
    with native.disabled():
        state = cpu_kernels.forward_state(inputs)
        pytorch_form = _fast(inputs, grads)
    assert state.terms.batch_weight is not cpu_kernels.NOT_KEPT
    _assert_close_all(_fast(inputs, grads), pytorch_form, 1e-14)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("fallback", ["off", "fires"])
def test_zero_prior_weight_gives_the_batch_statistics_bit_for_bit(dtype: torch.dtype, fallback: str) -> None:
    inputs = _inputs((3, 40, 5, 5), fallback, dtype=dtype)._replace(prior_weight=torch.zeros(40, dtype=dtype))
    state = cpu_kernels.forward_state(inputs)
    _assert_update_kernel_ran(state, dtype)
    assert torch.equal(state.terms.mean, state.stats.mean)
    assert torch.equal(state.terms.variance, state.stats.variance)


def _update_kernel(dtype: torch.dtype, *per_channel: Tensor) -> tuple[Tensor, Tensor]:
    cast = [t.to(dtype) for t in per_channel]
    mean, variance = torch.empty_like(cast[0]), torch.empty_like(cast[0])
    native.call("kalman_update", *cast, mean, variance)
    return mean, variance


def _update_values(channels: int) -> tuple[Tensor, ...]:
    """(m, Σ_pred, x̄, S, p) in float64, p on both sides of lerp's switch at q = 0.5 and at 0."""
    generator = torch.Generator().manual_seed(channels)
    means = torch.randn((2, channels), generator=generator, dtype=F64) * 3.0
    variances = torch.rand((2, channels), generator=generator, dtype=F64) + 0.01
    prior_weight = torch.rand(channels, generator=generator, dtype=F64)
    prior_weight[::4] = 0.0
    return means[0], variances[0], means[1], variances[1], prior_weight


def test_the_update_kernel_equals_the_reference() -> None:
    """The kernel itself (whatever the probe says): float64 within 2 ulp of the reference, float32
    as accurate as the float32 reference (against float64)."""
    values = _update_values(301)
    exact = Fk.kalman_update_terms(*values)
    torch.testing.assert_close(_update_kernel(F64, *values), (exact.mean, exact.variance), rtol=4e-16, atol=0)
    reference32 = Fk.kalman_update_terms(*(t.float() for t in values))
    for got, ref32, want in zip(_update_kernel(torch.float32, *values), reference32[:2], exact[:2]):
        error, reference_error = ((t.double() - want).abs() for t in (got, ref32))
        assert bool((error <= reference_error + 1e-7 * want.abs()).all())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("channels", [1, 7, 16, 17, 64, 200, 961])
def test_the_update_kernel_rounds_as_aten(dtype: torch.dtype, channels: int) -> None:
    """Where the probe says so (ATen with FMA), the posterior is the PyTorch form's bit for bit on the same batch
    statistics, in ATen's vector loops and their tails."""
    if not cpu_kernels._update_kernel_rounds_as_aten(dtype):
        pytest.skip("this machine's ATen rounds the update otherwise: the PyTorch form runs")
    inputs = _inputs((2, channels, 3), "off", dtype=dtype, seed=channels)
    state = cpu_kernels.forward_state(inputs)
    _assert_update_kernel_ran(state, dtype)
    want = Fk.kalman_update_terms(inputs.prior_mean, inputs.prior_variance, *state.stats[:2], state.prior_weight)
    assert torch.equal(state.terms.mean, want.mean)
    assert torch.equal(state.terms.variance, want.variance)


@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("shift", [0.5, 1e4], ids=["centred", "mean-1e4"])
def test_float32_kernels_are_as_accurate_as_the_float32_pytorch_form(
    fallback: str, shift: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the float64 reference on the same (float32) inputs: each output's and gradient's
    error is at most the float32 PyTorch form's on the same batch statistics (the update rounds as
    it does; the backward computes in double and rounds once), ∂L/∂x's up to one ulp of the offset
    both store. The statistics' own rounding is test_float32_batch_statistics_round_once's. With the
    mean 1e4 the slope and offset of ∂L/∂x cancel."""
    inputs = _inputs((2, 96, 6, 6), fallback, dtype=torch.float32, shift=shift)
    grads = _output_grads(inputs)
    exact = _reference(
        KalmanNormInputs(*(t.double() if isinstance(t, Tensor) else t for t in inputs)),
        KalmanStep(*(g.double() for g in grads)),
    )
    offsets: list[Tensor] = []
    call = native.call
    monkeypatch.setattr(
        native, "call", lambda name, *a, **k: (offsets.append(a[6]) if name == "kalman_input_gradient" else None,
                                               call(name, *a, **k))[1],
    )  # fmt: skip
    kernel = _fast(inputs, grads)
    statistics = cpu_kernels.batch_statistics(inputs.x)
    monkeypatch.setattr(cpu_kernels, "batch_statistics", lambda x: statistics)
    with native.disabled():
        pytorch_form = _fast(inputs, grads)
    # ∂L/∂x = G g + slope x + offset, where offset ≈ -slope x̄ cancels slope x: both paths store the offset in
    # float32, and which of the two roundings of it lands nearer is the draw's. One ulp of it is the margin.
    (offset,) = offsets
    margins = {3: float(offset.double().abs().max()) * 2.0**-23}
    for index, (got, ref32, want) in enumerate(zip(kernel, pytorch_form, exact)):
        assert want is not None and got.dtype == torch.float32
        error, reference_error = ((t.double() - want).abs().max() for t in (got, ref32))
        # 2**-9 of the PyTorch form's own error: its float32 reductions round differently from torch release to
        # release (∂L/∂m at mean 1e4: 1.7752e-3 on 2.13, 1.7743e-3 on 2.11; the kernel's 1.7762e-3 on both).
        bound = reference_error * (1 + 2.0**-9) + 1e-7 * want.abs().max() + margins.get(index, 0.0)
        assert error <= bound, f"output {index}: {error} > {reference_error}"


@pytest.mark.parametrize(
    "wanted", [(True, True, True), (False, False, False), (True, False, True), (False, True, False)]
)
def test_needs_subsets_give_the_same_gradients(wanted: tuple[bool, bool, bool]) -> None:
    """Gradients not wanted come back None, the others are those of the full backward bit for bit."""
    inputs = _inputs((2, 20, 3, 3), "holds")
    grads = _output_grads(inputs)
    state = cpu_kernels.forward_state(inputs)
    full = cpu_kernels.backward_from_state(inputs, state, *grads)
    subset = cpu_kernels.backward_from_state(inputs, state, *grads, needs=wanted)
    for index, (got, want) in enumerate(zip(subset, full)):
        if index in (1, 2, 3) and not wanted[index - 1]:
            assert got is None
        else:
            assert got is not None and want is not None and torch.equal(got, want)


@pytest.mark.parametrize("reaching", ["output only", "posterior mean only", "all"])
def test_outputs_that_do_not_reach_the_loss(reaching: str) -> None:
    """A None posterior gradient (NULL in the kernel) is a zero one; an expanded one (autograd's
    gradient of a sum) is taken after a copy."""
    inputs = _inputs((3, 6, 4), "off")
    grad_output, grad_mean, grad_variance = _output_grads(inputs)
    given = {
        "output only": (None, None),
        "posterior mean only": (torch.ones(1, dtype=F64).expand(6), None),
        "all": (grad_mean, grad_variance),
    }[reaching]
    zeros = torch.zeros(6, dtype=F64)
    state = cpu_kernels.forward_state(inputs)
    got = cpu_kernels.backward_from_state(inputs, state, grad_output, *given)
    defined = [zeros if g is None else g for g in given]
    x, m, v, p, w, _, eps, ratio = inputs
    want = Fk.batch_kalman_norm_backward(grad_output, *defined, x, m, v, p, w, eps, ratio)
    _assert_close_all(got, want, 1e-12)


def test_eager_autograd_with_a_constant_prior_equals_the_op_bit_for_bit() -> None:
    """The eager Function skips the prior's gradients autograd does not need (NULL outputs); the
    others equal the backward op's, which recomputes the state and asks for all three."""
    inputs = _inputs((2, 12, 5, 5), "holds")
    grads = _output_grads(inputs)
    results = []
    for step in (kalman_norm_step, torch.ops.bkn.batch_kalman_norm):
        x, weight, bias = (t.detach().clone().requires_grad_() for t in (inputs.x, inputs.weight, inputs.bias))
        outputs = step(x, *inputs[1:4], weight, bias, inputs.eps, inputs.fallback_ratio)
        torch.autograd.backward(outputs, grads)
        results.append([*outputs, x.grad, weight.grad, bias.grad])
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


def test_disabled_gives_the_pytorch_form() -> None:
    """Under native.disabled the fast path keeps the update's intermediates (the PyTorch form) and
    its values are those of the functional update, bit for bit."""
    inputs = _inputs((2, 9, 4), "holds")
    with native.disabled():
        state = cpu_kernels.forward_state(inputs)
    want = Fk.kalman_update_terms(inputs.prior_mean, inputs.prior_variance, *state.stats[:2], state.prior_weight)
    for got, expected in zip(state.terms, want):
        assert torch.equal(got, expected)


def test_a_pytorch_backward_after_a_kernel_forward_recomputes_the_terms() -> None:
    """A forward by the kernel (terms NOT_KEPT) and a backward without it (disabled since) agree
    with the all-PyTorch sequence to rounding."""
    inputs = _inputs((2, 9, 4), "holds")
    grads = _output_grads(inputs)
    state = cpu_kernels.forward_state(inputs)
    with native.disabled():
        mixed = cpu_kernels.backward_from_state(inputs, state, *grads)
        pytorch_form = cpu_kernels.backward_from_state(inputs, cpu_kernels.forward_state(inputs), *grads)
    _assert_close_all(mixed, pytorch_form, 1e-13)


def test_inputs_the_kernels_do_not_take_run_the_pytorch_form() -> None:
    """A strided prior: the PyTorch form, the reference's values."""
    inputs = _inputs((2, 5, 4), "off")
    strided = torch.stack([inputs.prior_mean, inputs.prior_mean], dim=1)[:, 0]
    inputs = inputs._replace(prior_mean=strided)
    grads = _output_grads(inputs)
    state = cpu_kernels.forward_state(inputs)
    assert state.terms.batch_weight is not cpu_kernels.NOT_KEPT
    _assert_close_all(_fast(inputs, grads), _reference(inputs, grads), 1e-12)


#: (N, C, *) whose planes have no 8-element block, blocks and a tail, or blocks only; 2-D (one value per plane) to 5-D.
ONE_PASS_SHAPES = [(6, 5), (3, 4, 21), (2, 3, 4, 4), (1, 2, 2, 3, 3)]


@pytest.mark.parametrize("shape", ONE_PASS_SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_the_input_gradient_is_one_kernel_pass_equal_to_the_reference(
    shape: tuple[int, ...], affine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """∂L/∂x by ``kalman_input_gradient`` (the eval-mode BatchNorm backward then only reduces): float64
    within 1e-13 of the reference on every plane layout the kernel's 8-lane blocks and scalar tail meet."""
    calls = _kernel_calls(monkeypatch)
    inputs = _inputs(shape, affine=affine)
    grads = _output_grads(inputs)
    got = _fast(inputs, grads)
    assert "kalman_input_gradient" in calls
    _assert_close_all(got, _reference(inputs, grads), 1e-13)


def test_a_strided_output_gradient_takes_aten_passes_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels-last ∂L/∂y is not the kernel's (contiguous planes): ATen's passes run, to the same values."""
    calls = _kernel_calls(monkeypatch)
    inputs = _inputs((2, 6, 5, 3))
    grads = _output_grads(inputs)
    strided = KalmanStep(grads.output.contiguous(memory_format=torch.channels_last), *grads[1:])
    got = _fast(inputs, strided)
    assert "kalman_input_gradient" not in calls
    torch.testing.assert_close(got[3], _fast(inputs, grads)[3], rtol=1e-13, atol=1e-13)


def test_several_threads_leave_large_inputs_to_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is single-threaded: under several torch threads it takes only tensors below ATen's grain size."""
    calls = _kernel_calls(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    large = _inputs((2, 4, 64, 65))  # 33280 elements: above the limit
    _fast(large, _output_grads(large))
    assert "kalman_input_gradient" not in calls
    small = _inputs((2, 4, 8, 8))
    _fast(small, _output_grads(small))
    assert "kalman_input_gradient" in calls


# ------------------------------------------------------------------ the batch statistics: kalman_batch_statistics

#: (N, C, *) whose planes have no 8-element block, a 16-element block, 8-element blocks and tails; 2-D to 5-D.
STATISTICS_SHAPES = [(6, 5), (3, 4, 21), (2, 3, 16), (2, 3, 4, 4), (1, 2, 2, 3, 3), (5, 7, 37)]


@pytest.mark.parametrize("shape", STATISTICS_SHAPES, ids=str)
def test_the_batch_statistics_kernel_equals_the_reference_in_float64(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kalman_batch_statistics``: the reference's mean and biased variance within 1e-14 in float64, on every plane
    layout its 16- and 8-element blocks and scalar tail meet."""
    calls = _kernel_calls(monkeypatch)
    x = _inputs(shape, shift=3.0).x
    got = cpu_kernels.batch_statistics(x)
    assert calls == ["kalman_batch_statistics"]
    want = Fk.batch_statistics(x)
    assert got.count == want.count
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got.variance, want.variance, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shift", [0.0, 1e4, -3e6], ids=["centred", "mean-1e4", "mean--3e6"])
def test_float32_batch_statistics_round_once(shift: float) -> None:
    """float32 inputs whose mean is large against their spread: the kernel's statistics are the exact (float64)
    statistics of the float32 values rounded once, within half an ulp (and a 1e-12 relative share for the double
    sums), more accurate than the PyTorch form's."""
    x = _inputs((4, 24, 9, 7), shift=shift, dtype=torch.float32).x
    exact = Fk.batch_statistics(x.double())
    got = cpu_kernels.batch_statistics(x)
    with native.disabled():
        pytorch_form = cpu_kernels.batch_statistics(x)
    for name in ("mean", "variance"):
        value, want, other = getattr(got, name), getattr(exact, name), getattr(pytorch_form, name)
        assert value.dtype == torch.float32
        error = (value.double() - want).abs()
        assert bool((error <= 2.0**-24 * want.abs() * (1 + 1e-12) + 1e-12 * want.abs()).all()), name
        assert float(error.max()) <= float((other.double() - want).abs().max()), name


def test_batch_statistics_keep_nan_and_inf() -> None:
    """A NaN or an infinity in a channel makes its statistics NaN (or inf), as ATen's, and leaves the others alone."""
    x = _inputs((2, 4, 5, 5)).x.clone()
    x[1, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    got = cpu_kernels.batch_statistics(x)
    with native.disabled():
        want = cpu_kernels.batch_statistics(x)
    for name in ("mean", "variance"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-14, atol=1e-14, equal_nan=True)
    assert bool(got.variance[1].isnan()) and bool(got.variance[2].isnan()) and bool(got.mean[2].isinf())


def test_statistics_the_kernel_does_not_take_run_the_pytorch_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels-last inputs, half types, and large inputs under several torch threads (the kernel is
    single-threaded) keep ATen's statistics; traced code has no kernel to call."""
    calls = _kernel_calls(monkeypatch)
    x = _inputs((2, 6, 5, 3)).x
    cpu_kernels.batch_statistics(x.contiguous(memory_format=torch.channels_last))
    cpu_kernels.batch_statistics(x.to(torch.bfloat16))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    cpu_kernels.batch_statistics(_inputs((2, 4, 64, 65)).x)  # 33280 elements: above the limit
    traced = torch.compile(cpu_kernels.batch_statistics, backend="eager", fullgraph=True)(x)
    assert calls == []
    cpu_kernels.batch_statistics(_inputs((2, 4, 8, 8)).x)
    assert calls == ["kalman_batch_statistics"]
    with native.disabled():
        want = cpu_kernels.batch_statistics(x)
    assert torch.equal(traced.mean, want.mean) and torch.equal(traced.variance, want.variance)


def _kalman_kernels(library: ctypes.CDLL | None, shape: tuple[int, ...], dtype: torch.dtype) -> list[Tensor]:
    """The statistics and ∂L/∂x of ``library``'s kernels (None: the package's) on one case."""
    inputs = _inputs(shape, dtype=dtype, seed=sum(shape))
    x, channels = inputs.x, shape[1]
    inner = x.numel() // (shape[0] * channels)
    grads = _output_grads(inputs)
    mean, variance, slope, offset = (torch.empty(channels, dtype=dtype) for _ in range(4))
    native_builds.call(library, "kalman_batch_statistics", x.numel(), x, native.parameters(channels, inner), mean,
                       variance)  # fmt: skip
    slope.copy_(inputs.prior_mean)
    offset.copy_(inputs.bias)
    grad_x = torch.empty_like(x)
    parameters = native.parameters(EPS, channels, inner)
    native_builds.call(library, "kalman_input_gradient", x.numel(), grads.output, x, inputs.weight,
                       inputs.prior_variance, mean, slope, offset, parameters, grad_x)  # fmt: skip
    return [mean, variance, grad_x]


@native_builds.x86_64_linux
def test_every_kalman_build_gives_the_same_bits(tmp_path: Path) -> None:
    """Lane by lane the same operations and every sum across lanes in a fixed order: each build of kalman.c's
    vector kernels (the batch statistics, ∂L/∂x), compiled alone, returns the library's results bit for bit."""
    native_builds.require_gcc()
    cases = [(shape, dtype) for shape in STATISTICS_SHAPES for dtype in (F64, torch.float32)]
    want = [_kalman_kernels(None, *case) for case in cases]
    for build, attribute in native_builds.runnable_builds().items():
        library = native_builds.compile_alone("kalman.c", f"BKN_KALMAN_BUILDS={attribute}", tmp_path / f"{build}.so")
        for case, expected in zip(cases, want):
            for got, wanted in zip(_kalman_kernels(library, *case), expected):
                assert torch.equal(got, wanted), (build, case)
