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
import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support import native_builds
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
def test_large_unpadded_matrices_run_the_pytorch_form(one_thread: None) -> None:
    """A 1×1 conv or Linear without coverage tables beyond _AFFINE_NATIVE_MATRIX: ATen's BLAS products (one torch
    thread: with several, weights beyond _AFFINE_NATIVE_WEIGHTS take them already)."""
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


#: Shapes for the kernels' vector paths (eight doubles a vector): B or K not multiples of eight, so that every
#: tail runs. K = 1: four-row blocks over B = 13 (a vector and five inputs alone), B = 5 (no vector), B = 37, and
#: rows left over after the blocks (10 rows: 4 + 4 + 1 + 1; grouped: 6 rows per group). K > 1 with several rows per
#: group (the flat backward): K = 2 (a vector spans four inputs), 9 with B = 130 (three tiles of inputs, the last
#: partial, W's flat run not a multiple of eight), 16, 17, 25 (depthwise with multiplier 2), 27. One row per group
#: (row by row): depthwise 5×5 (K = 25: three vectors and one tap). (module, input spatial size)
VECTOR_TAILS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "1x1 13 to 10": (lambda: nn.Conv2d(13, 10, 1), (3, 4)),
    "1x1 5 to 6": (lambda: nn.Conv2d(5, 6, 1), (3, 4)),
    "linear 37 to 9": (lambda: nn.Linear(37, 9), ()),
    "grouped 1x1 2 groups of 6 rows": (lambda: nn.Conv2d(22, 12, 1, groups=2), (3, 4)),
    "3x3 130 to 3": (lambda: nn.Conv2d(130, 3, 3, padding=1), (5, 4)),
    "conv1d k2": (lambda: nn.Conv1d(20, 5, 2, padding=1), (6,)),
    "4x4 3 to 5": (lambda: nn.Conv2d(3, 5, 4, padding=1), (6, 5)),
    "conv1d k17": (lambda: nn.Conv1d(9, 4, 17, padding=8), (12,)),
    "depthwise 5x5": (lambda: nn.Conv2d(12, 12, 5, padding=2, groups=12), (6, 5)),
    "depthwise x2 5x5": (lambda: nn.Conv2d(6, 12, 5, padding=2, groups=6), (6, 5)),
    "3x3x3 5 to 4": (lambda: nn.Conv3d(5, 4, 3, padding=1), (4, 3, 5)),
}
#: (name, the conv's own zero padding kept: coverage tables) for every shape (a Linear has none).
VECTOR_CASES = [
    (name, padded)
    for name in VECTOR_TAILS
    for padded in (False, True)
    if not (padded and (name.startswith(("1x1", "linear", "grouped 1x1"))))
]


def _vector_case(name: str, padded: bool, dtype: torch.dtype) -> tuple[Tensor, tuple[Tensor, Tensor] | None, int]:
    """The layer's weight (float64 values, in ``dtype``), its coverage tables (None without padding), its inputs."""
    torch.manual_seed(0)
    factory, spatial = VECTOR_TAILS[name]
    layer = factory().to(F64)
    if not padded and isinstance(layer, nn.modules.conv._ConvNd):
        layer.padding = (0,) * len(spatial)
    coverage = None
    if isinstance(layer, nn.modules.conv._ConvNd):
        coverage = fast._coverage(layer, spatial, ((0, 0),) * len(spatial), dtype)
        assert (coverage is not None) == padded
        return layer.weight.detach().to(dtype), coverage, layer.in_channels
    assert isinstance(layer, nn.Linear)
    return layer.weight.detach().to(dtype), coverage, layer.in_features


def _moments_and_gradients(
    weight: Tensor, mean: Tensor, variance: Tensor, coverage: tuple[Tensor, Tensor] | None, kernel: bool
) -> tuple[Tensor, ...]:
    weight, mean, variance = (t.detach().clone().requires_grad_() for t in (weight, mean, variance))
    with contextlib.nullcontext() if kernel else native.disabled():
        outputs = fast.affine_moments(weight, None, mean, variance, coverage)
    assert _ran_kernel(outputs[1]) == kernel
    generator = torch.Generator().manual_seed(1)  # cotangents that float32 holds exactly: the same in both dtypes
    cotangents = [torch.randn(o.shape, generator=generator).to(o.dtype) for o in outputs]
    return (*(o.detach() for o in outputs), *torch.autograd.grad(outputs, [weight, mean, variance], cotangents))


@needs_library
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("name", "padded"), VECTOR_CASES, ids=[f"{n}{' padded' if p else ''}" for n, p in VECTOR_CASES]
)
def test_every_vector_tail_equals_the_float64_reference(name: str, padded: bool) -> None:
    """Values and gradients (W, μ, σ²): float64 against the PyTorch form at this file's tolerances; float32 against
    the float64 PyTorch form on the same (upcast) inputs: rounded once, within half a float32 ulp of it (plus the
    double-precision error, 1e-13 of the largest magnitude)."""
    weight64, coverage64, in_channels = _vector_case(name, padded, F64)
    mean64, variance64 = (t.detach() for t in _inputs(in_channels))
    exact = _moments_and_gradients(weight64, mean64, variance64, coverage64, kernel=False)
    kernel64 = _moments_and_gradients(weight64, mean64, variance64, coverage64, kernel=True)
    torch.testing.assert_close(kernel64[:2], exact[:2], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kernel64[2:], exact[2:], rtol=1e-11, atol=1e-13)
    weight32, coverage32, _ = _vector_case(name, padded, torch.float32)
    mean32, variance32 = mean64.float(), variance64.float()
    upcast = _moments_and_gradients(
        weight32.double(), mean32.double(), variance32.double(),
        None if coverage32 is None else (coverage32[0].double(), coverage32[1].double()), kernel=False,
    )  # fmt: skip
    kernel32 = _moments_and_gradients(weight32, mean32, variance32, coverage32, kernel=True)
    for what, got, want in zip(("M", "V", "dW", "dmu", "ds2"), kernel32, upcast):
        assert got.dtype == torch.float32, what
        bound = 2.0**-24 * 1.01 * want.abs() + 1e-13 * want.abs().max()
        error = (got.double() - want).abs()
        assert bool((error <= bound).all()), f"{what}: worst {float((error - bound).max()):.3g} beyond the bound"


@needs_library
@native_builds.x86_64_linux
def test_every_build_gives_the_same_bits(tmp_path: Path) -> None:
    """Lane by lane the same operations and every sum across lanes in a fixed order: each build of the kernels,
    compiled alone, returns the library's results bit for bit (forward and backward, float32 and float64, the
    1×1 blocks, the row-by-row and the flat paths, with coverage tables)."""
    native_builds.require_gcc()
    cases = [_vector_case(name, padded, dtype) for name, padded in VECTOR_CASES for dtype in (F64, torch.float32)]
    want = [_raw_kernels(None, *case) for case in cases]
    for build, attribute in native_builds.runnable_builds().items():
        library = native_builds.compile_alone("affine.c", f"BKN_AFFINE_BUILDS={attribute}", tmp_path / f"{build}.so")
        for case, expected in zip(cases, want):
            for got, wanted in zip(_raw_kernels(library, *case), expected):
                assert torch.equal(got, wanted), (build, tuple(case[0].shape), got.dtype)


def _raw_kernels(
    library: ctypes.CDLL | None, weight: Tensor, coverage: tuple[Tensor, Tensor] | None, in_channels: int
) -> list[Tensor]:
    """Forward and backward of the kernels (``library``: another build's; None: the package's) on one case."""
    dtype = weight.dtype
    matrix = fast._taps_view(weight).contiguous()
    rows, inputs, taps_count = matrix.shape
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(in_channels, generator=generator, dtype=F64).to(dtype)
    variance = (torch.rand(in_channels, generator=generator, dtype=F64) + 0.05).to(dtype)
    grad_mean, grad_variance = (torch.randn(rows, generator=generator, dtype=F64).to(dtype) for _ in range(2))
    fraction, pairs = (None, None) if coverage is None else coverage
    parameters = native.parameters(inputs, taps_count, in_channels // inputs)
    taps = torch.empty(rows, taps_count, dtype=F64)
    out_mean, out_variance = torch.empty(rows, dtype=dtype), torch.empty(rows, dtype=dtype)
    grad_weight = torch.empty_like(matrix)
    grad_input_mean, grad_input_variance = torch.empty(in_channels, dtype=F64), torch.empty(in_channels, dtype=F64)
    forward = (matrix, mean, variance, fraction, pairs, parameters)
    calls = [
        ("affine_moments", (*forward, taps, out_mean, out_variance)),
        ("affine_moments_backward", (*forward, taps, grad_mean, grad_variance, grad_weight, grad_input_mean,
                                     grad_input_variance)),
    ]  # fmt: skip
    for name, tensors in calls:
        native_builds.call(library, name, rows, *tensors)
    return [taps, out_mean, out_variance, grad_weight, grad_input_mean, grad_input_variance]
