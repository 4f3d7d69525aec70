"""The C kernels of :class:`bkn_export.chain.fast._AffineMoments` (``csrc/affine.c``): conv / linear moments
with one pass over the weight forward and one backward.

Compared in float64 with the reference (:class:`~bkn_export.chain.steps.Affine` ``.predict``, i.e.
:func:`bkn_export.moments.conv_moments` / :func:`~bkn_export.moments.linear_moments`) on every conv geometry
of ``tests/test_speed.py`` (with and without a zero pad folded in: coverage tables), a Linear, a large
conv and a padded 1×1: values, first derivatives into W, b, μ, σ² against the reference's autograd and
against the Function's PyTorch form; in float32 against the float64 reference (at least as accurate as
the float32 reference). ``grad_fn.parameters`` (the Function's context) says that the kernel ran.
Second derivatives go through the reference by design.

Measured in float64 (these inputs), kernel against reference: values within 3e-15 and gradients within
2e-15 of their largest magnitude; elementwise, values within 4e-15 relative except where T's sum over
inputs cancels (the 256-input conv's near-zero means: 2e-13 relative, 1e-16 of the scale; the summation
order differs, both in double). The tolerances below are test_speed.py's (1e-12 / 1e-11 relative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from test_speed import CONVS, SPATIAL
from torch import Tensor, nn

from bkn_export import native
from bkn_export.chain import fast
from bkn_export.chain.steps import Affine

F64 = torch.float64

needs_library = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")

#: Beyond test_speed.py's geometries: a large 3×3 conv (W above the threshold for several threads), a
#: padded 1×1 with more than four output rows (the kernel's four-row blocks and a remainder), a 1×1
#: with a group of two rows.
LARGE: dict[str, Callable[[], nn.Module]] = {
    "256 to 256 3x3": lambda: nn.Conv2d(256, 256, 3, padding=1),
    "1x1 padded 9 rows": lambda: nn.Conv2d(7, 9, 1, padding=1),
    "grouped 1x1": lambda: nn.Conv2d(8, 4, 1, groups=2),
}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the kernels run whatever the weight's size (the benchmarks' setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inputs(channels: int, dtype: torch.dtype = F64, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(channels, generator=generator, dtype=F64)
    variance = torch.rand(channels, generator=generator, dtype=F64) + 0.05
    return mean.to(dtype).requires_grad_(), variance.to(dtype).requires_grad_()


def _grads(outputs: tuple[Tensor, ...], wrt: list[Tensor], seed: int = 1) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=generator, dtype=F64).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, wrt, cotangents)


def _ran_kernel(variance: Tensor) -> bool:
    """Whether the Function that computed this output variance ran the kernels (its bias-free output)."""
    node = variance.grad_fn
    assert type(node).__name__ == "_AffineMomentsBackward"
    return node.parameters is not None  # type: ignore[union-attr]


def _step(layer: nn.Module, padded: bool) -> tuple[Affine, tuple[int, ...]]:
    if isinstance(layer, nn.Linear):
        return Affine("layer", "linear"), ()
    rank = layer.weight.dim() - 2
    input_padding = ((1, 0),) + ((0, 2),) * (rank - 1) if padded else None
    return Affine("layer", "conv", input_padding), SPATIAL[rank]


GEOMETRIES = {**CONVS, **LARGE, "linear": lambda: nn.Linear(7, 3)}
#: (geometry, a zero pad folded in before it: coverage tables).
CASES = [(name, padded) for name in GEOMETRIES for padded in (False, True) if not (padded and name == "linear")]


@needs_library
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("name", "padded"), CASES, ids=[f"{n}{' zero pad before' if p else ''}" for n, p in CASES])
def test_affine_kernel_equals_the_reference(name: str, padded: bool) -> None:
    torch.manual_seed(0)
    layer = GEOMETRIES[name]().to(F64)
    step, spatial = _step(layer, padded)
    in_channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    mean, variance = _inputs(in_channels)
    modules = {"layer": layer}
    reference = step.predict(mean, variance, spatial, modules)
    fused = fast.predict_steps((step,), mean, variance, spatial, modules)
    assert _ran_kernel(fused[1])
    assert fused[2] == reference[2]
    torch.testing.assert_close(fused[:2], reference[:2], rtol=1e-12, atol=1e-14)
    with native.disabled():
        pytorch_form = fast.predict_steps((step,), mean, variance, spatial, modules)
    assert not _ran_kernel(pytorch_form[1])
    wrt = [mean, variance, *layer.parameters()]
    kernel_grads = _grads(fused[:2], wrt)
    torch.testing.assert_close(kernel_grads, _grads(reference[:2], wrt), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(kernel_grads, _grads(pytorch_form[:2], wrt), rtol=1e-11, atol=1e-13)


@needs_library
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("wanted", ["mean", "variance"])
def test_one_output_reaching_the_loss(wanted: str) -> None:
    """The other output's gradient is None (NULL to the kernel): its terms are zero."""
    conv = nn.Conv2d(6, 5, 3, padding=1).to(F64)
    mean, variance = _inputs(6)
    coverage = fast._coverage(conv, (5, 4), ((0, 0), (0, 0)), F64)
    with torch.no_grad():
        weight = conv.weight.clone()
    weight.requires_grad_()
    wrt = [weight, mean, variance]
    outputs = {}
    for form in ("kernel", "pytorch"):
        with native.disabled() if form == "pytorch" else contextlib.nullcontext():
            out_mean, out_variance = fast.affine_moments(weight, None, mean, variance, coverage)
        assert _ran_kernel(out_variance) == (form == "kernel")
        chosen = out_mean if wanted == "mean" else out_variance
        outputs[form] = torch.autograd.grad(chosen.sum(), wrt, allow_unused=True)
    torch.testing.assert_close(outputs["kernel"], outputs["pytorch"], rtol=1e-12, atol=1e-14)


def _error(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> list[float]:
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@needs_library
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["3x3 zero padding", "depthwise x2", "grouped dilated", "1x1 padded", "conv3d"])
def test_affine_kernel_in_float32_is_as_accurate_as_the_float32_reference(name: str) -> None:
    """Against the float64 reference, values and gradients: the kernel accumulates in double."""
    torch.manual_seed(0)
    layer64 = CONVS[name]().to(F64)
    step, spatial = _step(layer64, True)
    mean64, variance64 = _inputs(layer64.in_channels)
    exact = step.predict(mean64, variance64, spatial, {"layer": layer64})
    exact_grads = _grads(exact[:2], [mean64, variance64, layer64.weight])
    layer32 = CONVS[name]().float()
    layer32.load_state_dict(layer64.state_dict())
    mean32, variance32 = (t.detach().float().requires_grad_() for t in (mean64, variance64))
    modules32 = {"layer": layer32}
    kernel = fast.predict_steps((step,), mean32, variance32, spatial, modules32)
    assert _ran_kernel(kernel[1]) and kernel[0].dtype == torch.float32
    float32_reference = step.predict(mean32, variance32, spatial, modules32)
    wrt = [mean32, variance32, layer32.weight]
    kernel_errors = _error((*kernel[:2], *_grads(kernel[:2], wrt)), (*exact[:2], *exact_grads))
    reference_errors = _error((*float32_reference[:2], *_grads(float32_reference[:2], wrt)), (*exact[:2], *exact_grads))
    for got, ref32 in zip(kernel_errors, reference_errors):
        assert got <= ref32 + 1e-7


@needs_library
def test_large_weights_with_several_threads_run_the_pytorch_form() -> None:
    """The kernels use one thread: beyond the threshold, ATen's threaded ops (same values as the reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mean, variance = _inputs(64)
        small = torch.randn(8, 64, 9, dtype=F64)
        large = torch.randn(fast._AFFINE_NATIVE_WEIGHTS // 576 + 1, 64, 9, dtype=F64)
        assert _ran_kernel(fast.affine_moments(small, None, mean, variance, None)[1])
        assert not _ran_kernel(fast.affine_moments(large, None, mean, variance, None)[1])
        torch.set_num_threads(1)
        assert _ran_kernel(fast.affine_moments(large, None, mean, variance, None)[1])
    finally:
        torch.set_num_threads(threads)


@needs_library
def test_large_unpadded_matrices_run_the_pytorch_form() -> None:
    """A 1×1 conv or Linear without coverage tables beyond _AFFINE_NATIVE_MATRIX: ATen's BLAS products."""
    mean, variance = _inputs(256)
    rows = fast._AFFINE_NATIVE_MATRIX // 256
    fits, beyond = torch.randn(rows, 256, 1, dtype=F64), torch.randn(rows + 1, 256, 1, dtype=F64)
    assert _ran_kernel(fast.affine_moments(fits, None, mean, variance, None)[1])
    assert not _ran_kernel(fast.affine_moments(beyond, None, mean, variance, None)[1])


@needs_library
def test_inputs_the_kernels_do_not_take_run_the_pytorch_form() -> None:
    """A channels-last weight (not contiguous as (C_out, B, K)), a half-precision input: the PyTorch form."""
    conv = nn.Conv2d(6, 5, 3, padding=1).to(F64)
    mean, variance = _inputs(6)
    step = Affine("conv")
    reference = step.predict(mean, variance, (5, 4), {"conv": conv})
    channels_last = conv.to(memory_format=torch.channels_last)
    fused = fast.predict_steps((step,), mean, variance, (5, 4), {"conv": channels_last})
    assert not _ran_kernel(fused[1])
    torch.testing.assert_close(fused[:2], reference[:2], rtol=1e-12, atol=1e-14)
    half = fast.affine_moments(conv.weight.half(), None, mean.detach().half(), variance.detach().half(), None)
    assert not _ran_kernel(half[1])


@needs_library
def test_second_derivatives_go_through_the_reference() -> None:
    conv = nn.Conv2d(4, 3, 3, padding=1).to(F64)
    mean, variance = _inputs(4)
    coverage = fast._coverage(conv, (4, 3), ((0, 0), (0, 0)), F64)
    weight = conv.weight.detach().requires_grad_()
    assert _ran_kernel(fast.affine_moments(weight, None, mean, variance, coverage)[1])
    assert torch.autograd.gradgradcheck(
        lambda w, m, v: fast.affine_moments(w, None, m, v, coverage), (weight, mean, variance)
    )


@needs_library
@pytest.mark.parametrize("padded", [False, True], ids=["", "zero pad before"])
def test_a_backward_the_kernel_cannot_take_recomputes_the_pytorch_form(
    padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradients the kernel refuses (:func:`~bkn_export.chain.fast._native_affine_backward` returns None)."""
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2).to(F64)
    mean, variance = _inputs(6)
    coverage = fast._coverage(conv, (5, 4), ((1, 0), (0, 2)), F64) if padded else None
    weight = conv.weight.detach().requires_grad_()
    wrt = [weight, mean, variance]
    with native.disabled():
        expected = _grads(fast.affine_moments(weight, None, mean, variance, coverage), wrt)
    fused = fast.affine_moments(weight, None, mean, variance, coverage)
    assert _ran_kernel(fused[1])
    monkeypatch.setattr(fast, "_native_affine_backward", lambda *args: None)
    torch.testing.assert_close(_grads(fused, wrt), expected, rtol=0, atol=0)


@needs_library
@pytest.mark.usefixtures("one_thread")
def test_the_weight_gradient_comes_back_in_the_weights_shape_not_as_a_view() -> None:
    """So that autograd adds the conv's own ∂W to it in place (onto a view it allocates a W-sized sum)."""
    conv = nn.Conv2d(6, 5, 3, padding=1).to(F64)
    mean, variance = _inputs(6)
    out_mean, out_variance = fast.affine_moments(conv.weight, None, mean, variance, None)
    assert _ran_kernel(out_variance)
    (grad_weight,) = torch.autograd.grad(out_mean.sum() + out_variance.sum(), [conv.weight])
    assert grad_weight.shape == conv.weight.shape and grad_weight._base is None
