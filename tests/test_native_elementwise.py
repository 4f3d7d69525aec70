"""The C kernels of the piecewise, Gauss–Hermite and gate-product Functions of :mod:`bkn_export.chain.fast`.

Each kernel (``csrc/piecewise.c``, ``csrc/gauss_hermite.c``, ``csrc/gate.c``) evaluates its Function's
formulas per element in double precision. Compared in float64 with the reference
(:class:`~bkn_export.chain.steps.Elementwise` ``.predict``, i.e. :mod:`bkn_export.moments`, and
:class:`~bkn_export.chain.steps.Gate`'s product): values, first derivatives against the reference's
autograd and against the Function's PyTorch form (the same closed form); in float32 against the float64
reference (at least as accurate as the float32 reference). ``grad_fn.native`` (the Function's context)
says that the kernel ran. Second derivatives go through the reference by design.

Measured in float64 (these inputs), kernel against reference: values within 1e-15 of the output's
largest magnitude; elementwise relative error below 1e-12 except (a) piecewise values below 1e-50, in the
Gaussian's far tail (3e-10 there: erfc's tail and the truncated moments' cancellation, reference and
kernel alike) and (b) the Gauss–Hermite variance and gradients where f(x_j) − E cancels (σ ≤ 1e-5: to ~σ f';
tanh's flat tails) and carries f's rounding of a few ulp (up to 3e-7 relative; bounded here by that rounding).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support import native_builds
from torch import Tensor

from bkn_export import moments, native
from bkn_export.chain import fast
from bkn_export.chain.steps import Affine, Elementwise, Gate, Pool
from bkn_export.chain.steps import predict_steps as predict_reference

F64 = torch.float64
EPS = torch.finfo(F64).eps

needs_library = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")

PIECEWISE: dict[str, tuple[tuple[str, Any], ...]] = {
    "hardswish": (),
    "hardsigmoid": (),
    "relu6": (),
    "leaky_relu": (("negative_slope", 0.2),),
    "hardtanh": (("max_val", 2.0), ("min_val", -1.0)),
}
SMOOTH = ("silu", "sigmoid", "tanh")
#: σ below the 1e-12 variance floor (1e-7), a near-point mass, moderate, wide.
SCALES = (1e-7, 1e-5, 0.3, 1.0, 4.0)


def _grads(outputs: tuple[Tensor, ...], wrt: list[Tensor], seed: int = 1) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, wrt, cotangents)


def _assert_scaled_close(actual: Tensor, expected: Tensor, rtol: float, scaled: float) -> None:
    """|actual − expected| ≤ rtol |expected| + scaled · max |expected|, elementwise."""
    bound = rtol * expected.abs() + scaled * expected.abs().max()
    excess = (actual - expected).abs() - bound
    assert excess.max() <= 0, f"worst excess {excess.max().item():.3g} at {excess.argmax().item()}"


def _piecewise_inputs(scale: float, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """μ from −9 to 9 (every breakpoint, far and at), and half a σ either side of each breakpoint."""
    breakpoints = torch.tensor([-3.0, -1.0, 0.0, 2.0, 3.0, 6.0], dtype=F64)
    mean = torch.cat([torch.linspace(-9.0, 9.0, 37, dtype=F64), breakpoints - scale / 2, breakpoints + scale / 2])
    variance = torch.full_like(mean, scale * scale)
    return mean.to(dtype).requires_grad_(), variance.to(dtype).requires_grad_()


def _smooth_inputs(scale: float, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """13 means: 13 × 256 nodes (tanh) is within the kernels' node budget (fast._HERMITE_NATIVE_NODES)."""
    mean = torch.linspace(-6.0, 6.0, 13, dtype=F64)
    variance = torch.full_like(mean, scale * scale)
    return mean.to(dtype).requires_grad_(), variance.to(dtype).requires_grad_()


def _ran_kernel(output: Tensor, name: str) -> bool:
    node = output.grad_fn
    assert type(node).__name__ == name + "Backward"
    return bool(node.native)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- piecewise


@needs_library
@pytest.mark.parametrize("kind", sorted(PIECEWISE))
@pytest.mark.parametrize("scale", SCALES)
def test_piecewise_kernel_equals_the_reference(kind: str, scale: float) -> None:
    mean, variance = _piecewise_inputs(scale)
    step = Elementwise(kind, PIECEWISE[kind])
    fused = fast.predict_steps((step,), mean, variance, (), {})[:2]
    assert _ran_kernel(fused[0], "_PiecewiseMoments")
    reference = step.predict(mean, variance, (), {})[:2]
    for got, want in zip(fused, reference):
        _assert_scaled_close(got, want, rtol=1e-12, scaled=1e-14)
    with native.disabled():
        pytorch_form = fast.predict_steps((step,), mean, variance, (), {})[:2]
    assert not _ran_kernel(pytorch_form[0], "_PiecewiseMoments")
    wrt = [mean, variance]
    kernel_grads = _grads(fused, wrt)
    for got, want in zip(kernel_grads, _grads(pytorch_form, wrt)):  # the same closed form
        _assert_scaled_close(got, want, rtol=1e-12, scaled=1e-14)
    if scale > 1e-6:  # below the floor Stein's and autograd's derivatives differ by ~1e-9 (tests/test_speed.py)
        torch.testing.assert_close(kernel_grads, _grads(reference, wrt), rtol=1e-9, atol=1e-12)


def _assert_float32_as_accurate(step: Elementwise, inputs: Callable[[float], tuple[Tensor, Tensor]]) -> None:
    """The kernel in float32 against the float64 reference: no worse than the float32 reference (+1e-7 of the scale)."""
    for scale in (1e-3, 0.3, 1.0, 4.0):
        mean64, variance64 = (t.detach() for t in inputs(scale))
        exact = step.predict(mean64, variance64, (), {})[:2]
        mean, variance = mean64.float(), variance64.float()
        kernel = fast.predict_steps((step,), mean, variance, (), {})[:2]
        float32_reference = step.predict(mean, variance, (), {})[:2]
        for got, ref32, want in zip(kernel, float32_reference, exact):
            assert got.dtype == torch.float32
            kernel_error = (got.double() - want).abs().max()
            assert kernel_error <= (ref32.double() - want).abs().max() + 1e-7 * want.abs().max()


@needs_library
@pytest.mark.parametrize("kind", sorted(PIECEWISE))
def test_piecewise_kernel_in_float32_is_as_accurate_as_the_float32_reference(kind: str) -> None:
    _assert_float32_as_accurate(Elementwise(kind, PIECEWISE[kind]), _piecewise_inputs)


# --------------------------------------------------------------------------- Gauss–Hermite


@needs_library
@pytest.mark.parametrize("kind", SMOOTH)
@pytest.mark.parametrize("scale", SCALES)
def test_gauss_hermite_kernel_equals_the_reference(kind: str, scale: float) -> None:
    mean, variance = _smooth_inputs(scale)
    step = Elementwise(kind)
    fused = fast.predict_steps((step,), mean, variance, (), {})[:2]
    assert _ran_kernel(fused[0], "_GaussHermiteMoments")
    reference = step.predict(mean, variance, (), {})[:2]
    _assert_scaled_close(fused[0], reference[0], rtol=1e-12, scaled=1e-14)
    # Var = Σ w_j (f(x_j) − E)²: each f(x_j) rounds by ≤ ε |f|, so Var moves by up to ~4 ε |f| √Var in each
    # evaluation (the reference's own error where σ ≪ 1: f(x_j) − E ~ σ f').
    rounding = 8.0 * EPS * (reference[0].abs() + 1.0) * reference[1].sqrt()
    assert ((fused[1] - reference[1]).abs() <= 1e-12 * reference[1] + rounding).all()
    with native.disabled():
        pytorch_form = fast.predict_steps((step,), mean, variance, (), {})[:2]
    wrt = [mean, variance]
    kernel_grads = _grads(fused, wrt)
    # Gradients carry the same rounding of f(x_j) − E (through 2 gV (f(x_j) − E)): up to 1e-11 of the largest
    # gradient at σ ≤ 1e-5, 1e-15 at σ ≥ 0.3 (measured).
    tolerance = 1e-10 if scale < 1e-3 else 1e-13
    for got, reference_grad, pytorch_grad in zip(kernel_grads, _grads(reference, wrt), _grads(pytorch_form, wrt)):
        _assert_scaled_close(got, reference_grad, rtol=1e-11, scaled=tolerance)
        _assert_scaled_close(got, pytorch_grad, rtol=1e-11, scaled=tolerance)


@needs_library
@pytest.mark.parametrize("kind", SMOOTH)
def test_gauss_hermite_kernel_in_float32_is_as_accurate_as_the_float32_reference(kind: str) -> None:
    _assert_float32_as_accurate(Elementwise(kind), _smooth_inputs)


@needs_library
def test_gauss_hermite_beyond_the_node_budget_runs_the_pytorch_form() -> None:
    """More nodes in all than fast._HERMITE_NATIVE_NODES: PyTorch's vectorized form, the reference's values."""
    mean = torch.linspace(-4.0, 4.0, fast._HERMITE_NATIVE_NODES // 64 + 1, dtype=F64)
    variance = torch.full_like(mean, 0.5)
    fused = fast.gauss_hermite_moments("silu", mean.requires_grad_(), variance)
    assert fused is not None and not _ran_kernel(fused[0], "_GaussHermiteMoments")
    torch.testing.assert_close(fused, moments.elementwise_moments("silu", mean, variance), rtol=0, atol=0)


# --------------------------------------------------------------------------- gate product


def _gate_inputs(dtype: torch.dtype = F64) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(40, generator=generator, dtype=F64) * 3.0
    gate_mean = torch.rand(40, generator=generator, dtype=F64)
    variance = torch.rand(40, generator=generator, dtype=F64) * 2.0
    gate_variance = torch.rand(40, generator=generator, dtype=F64) * 0.1
    variance[:4] = 0.0  # point masses: Var's clamp at 0 (the product's cancellation) is exercised
    gate_variance[:4] = 0.0
    return tuple(t.to(dtype).requires_grad_() for t in (mean, variance, gate_mean, gate_variance))


def _gate_reference(mean: Tensor, variance: Tensor, gate_mean: Tensor, gate_variance: Tensor) -> tuple[Tensor, Tensor]:
    """Gate.predict's product, as written there."""
    out_mean = mean * gate_mean
    second = (variance + mean * mean) * (gate_variance + gate_mean * gate_mean)
    return out_mean, (second - out_mean * out_mean).clamp_min(0.0)


@needs_library
def test_gate_kernel_equals_the_reference() -> None:
    inputs = _gate_inputs()
    fused = fast.gate_product(*inputs)
    assert _ran_kernel(fused[0], "_GateProduct")
    reference = _gate_reference(*inputs)
    torch.testing.assert_close(fused, reference, rtol=1e-15, atol=0)
    wrt = list(inputs)
    torch.testing.assert_close(_grads(fused, wrt), _grads(reference, wrt), rtol=1e-14, atol=1e-15)


@needs_library
def test_gate_kernel_in_float32_is_as_accurate_as_the_float32_reference() -> None:
    exact = _gate_reference(*(t.detach() for t in _gate_inputs()))
    inputs = [t.detach().float() for t in _gate_inputs()]
    kernel, float32_reference = fast.gate_product(*inputs), _gate_reference(*inputs)
    for got, ref32, want in zip(kernel, float32_reference, exact):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= (ref32.double() - want).abs().max()


# --------------------------------------------------------------------------- what the kernels do not take


def _gate_of(mean: Tensor) -> tuple[Tensor, Tensor]:
    """A gate's (mean, variance) of mean's shape and dtype, independent of it (constants)."""
    gate_mean = torch.linspace(0.1, 0.9, mean.numel(), dtype=F64).reshape(mean.shape).to(mean.dtype)
    return gate_mean, (gate_mean * 0.2).to(mean.dtype)


def _every_form(mean: Tensor, variance: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    forms: dict[str, Any] = {
        kind: fast.piecewise_moments(kind, mean, variance, **dict(PIECEWISE[kind])) for kind in PIECEWISE
    }
    forms.update({kind: fast.gauss_hermite_moments(kind, mean, variance) for kind in SMOOTH})
    forms["gate"] = fast.gate_product(mean, variance, *_gate_of(mean))
    return forms


def _every_reference(mean: Tensor, variance: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    forms: dict[str, Any] = {
        kind: moments.elementwise_moments(kind, mean, variance, **dict(PIECEWISE[kind])) for kind in PIECEWISE
    }
    forms.update({kind: moments.elementwise_moments(kind, mean, variance) for kind in SMOOTH})
    forms["gate"] = _gate_reference(mean, variance, *_gate_of(mean))
    return forms


@needs_library
def test_inputs_the_kernels_do_not_take_run_the_pytorch_forms() -> None:
    """Another dtype, non-contiguous inputs: the PyTorch forms (the values of :func:`native.disabled`'s),
    the reference's values up to the dtype's rounding."""
    mean, variance = _smooth_inputs(1.0)
    half = mean.detach().half().requires_grad_(), variance.detach().half().requires_grad_()
    strided = torch.stack([mean, mean], dim=1)[:, 0], torch.stack([variance, variance], dim=1)[:, 0]
    for args in (half, strided):
        assert not native.takes(*args)
        forms, references = _every_form(*args), _every_reference(*args)
        with native.disabled():
            pytorch_forms = _every_form(*args)
        for kind, form in forms.items():
            assert not form[0].grad_fn.native, kind  # type: ignore[union-attr]
            torch.testing.assert_close(form, pytorch_forms[kind], rtol=0, atol=0, msg=kind)
            torch.testing.assert_close(form, references[kind], msg=kind)


@needs_library
def test_broadcast_shapes_run_the_pytorch_forms() -> None:
    """mean (C, 1, 1), variance (C,) broadcast: no kernel (one shape each), the reference's values."""
    mean, variance = (t.detach() for t in _smooth_inputs(1.0))
    mean = mean[:4].reshape(4, 1, 1).requires_grad_()
    variance = variance[:4].requires_grad_()
    for kind in ("hardswish", "silu"):
        fused = fast.elementwise_moments(kind, PIECEWISE.get(kind, ()), mean, variance)
        assert fused is not None and not fused[0].grad_fn.native  # type: ignore[union-attr]
        torch.testing.assert_close(fused, moments.elementwise_moments(kind, mean, variance), rtol=0, atol=0)


def test_disabled_turns_the_kernels_off() -> None:
    mean, variance = _smooth_inputs(1.0)
    with native.disabled():
        forms = _every_form(mean, variance)
    references = _every_reference(mean, variance)
    for kind, form in forms.items():
        assert not form[0].grad_fn.native, kind  # type: ignore[union-attr]
        torch.testing.assert_close(form, references[kind], rtol=0, atol=0, msg=kind)


@needs_library
@pytest.mark.parametrize("kind", ["hardswish", "relu6", "silu", "sigmoid", "gate"])
def test_second_derivatives_go_through_the_reference(kind: str) -> None:
    mean, variance = _smooth_inputs(1.0)
    fused = _every_form(mean, variance)[kind]
    assert fused[0].grad_fn.native  # type: ignore[union-attr]
    reference = _every_reference(mean, variance)[kind]
    first = [torch.autograd.grad((o[0] * o[1]).sum(), [mean, variance], create_graph=True) for o in (fused, reference)]
    second = [torch.autograd.grad(g[0].sum() + g[1].sum(), [mean, variance], materialize_grads=True) for g in first]
    torch.testing.assert_close(second[0], second[1], rtol=1e-11, atol=1e-13)


@needs_library
def test_only_one_output_reaching_the_loss() -> None:
    """A gradient for E alone, or Var alone (the other is NULL in the kernel): the reference's."""
    mean, variance = _piecewise_inputs(0.5)
    for kind in ("hardswish", "silu", "gate"):
        fused = _every_form(mean, variance)[kind]
        reference = _every_reference(mean, variance)[kind]
        for index in (0, 1):
            got, want = (
                torch.autograd.grad(o[index].sum(), [mean, variance], retain_graph=True, materialize_grads=True)
                for o in (fused, reference)
            )
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{kind} output {index}")


@needs_library
@pytest.mark.parametrize("kind", ["hardswish", "leaky_relu", "silu", "tanh", "gate"])
def test_a_backward_without_the_kernels_recomputes_the_pytorch_form(kind: str) -> None:
    """The forward ran the kernel, the backward cannot (here: under native.disabled()): the PyTorch form
    recomputes what its backward needs, the same gradient."""
    mean, variance = _smooth_inputs(0.7)
    fused = _every_form(mean, variance)[kind]
    assert fused[0].grad_fn.native  # type: ignore[union-attr]
    with native.disabled():
        pytorch_form = _every_form(mean, variance)[kind]
        wrt = [mean, variance]
        torch.testing.assert_close(_grads(fused, wrt), _grads(pytorch_form, wrt), rtol=1e-12, atol=1e-14)


def _kernels_in_graph(output: Tensor) -> dict[str, int]:
    """How many nodes of each Function in output's autograd graph ran their kernel."""
    found: dict[str, int] = {}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "native", False):
            name = type(node).__name__.removesuffix("Backward")
            found[name] = found.get(name, 0) + 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@needs_library
def test_a_chain_with_hardswish_and_a_squeeze_excitation_gate_equals_the_reference() -> None:
    """conv → hardswish → gate (global mean → conv → silu → conv → sigmoid) → conv 1×1 through
    fast.predict_steps, every kernel here running: the reference's values and gradients (into μ, σ², W, b)."""
    torch.manual_seed(0)
    modules = {
        "conv": torch.nn.Conv2d(6, 6, 3, padding=1).to(F64),
        "se_reduce": torch.nn.Conv2d(6, 3, 1).to(F64),
        "se_expand": torch.nn.Conv2d(3, 6, 1).to(F64),
        "conv_1x1": torch.nn.Conv2d(6, 4, 1).to(F64),
    }
    squeeze = Pool(moments.PoolSpec.create("adaptive_avg", 2, output_size=1))
    gate = Gate((squeeze, Affine("se_reduce"), Elementwise("silu"), Affine("se_expand"), Elementwise("sigmoid")))
    steps = (Affine("conv"), Elementwise("hardswish"), gate, Affine("conv_1x1"))
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(6, generator=generator, dtype=F64).requires_grad_()
    variance = (torch.rand(6, generator=generator, dtype=F64) + 0.1).requires_grad_()
    fused = fast.predict_steps(steps, mean, variance, (5, 5), modules)[:2]
    assert _kernels_in_graph(fused[1]) == {"_PiecewiseMoments": 1, "_GaussHermiteMoments": 2, "_GateProduct": 1}
    reference = predict_reference(steps, mean, variance, (5, 5), modules)[:2]
    _assert_scaled_close(fused[0], reference[0], rtol=1e-12, scaled=1e-14)
    _assert_scaled_close(fused[1], reference[1], rtol=1e-12, scaled=1e-14)
    wrt = [mean, variance, *(p for m in modules.values() for p in m.parameters())]
    torch.testing.assert_close(_grads(fused, wrt), _grads(reference, wrt), rtol=1e-9, atol=1e-12)


#: The builds of gauss_hermite.c, each alone (BKN_HERMITE_LANES given on the command line: the lanes of its vectors),
#: and the CPU flag it needs: SSE2 (two lanes, every x86-64 CPU), AVX2 (four), AVX-512 (eight).
_HERMITE_BUILDS = {2: None, 4: "avx2", 8: "avx512f"}


def _hermite_kernels(
    library: ctypes.CDLL | None, kind: str, count: int, nodes: int, dtype: torch.dtype
) -> list[Tensor]:
    """kept, E, Var (forward) and the two input gradients (backward) of ``library``'s kernels (None: the package's)."""
    generator = torch.Generator().manual_seed(count * 1000 + nodes)
    mean = (3.0 * torch.randn(count, generator=generator, dtype=F64)).to(dtype)
    variance = (4.0 * torch.rand(count, generator=generator, dtype=F64)).to(dtype)
    variance[::5] = 0.0  # below the variance floor
    grad_mean, grad_variance = (torch.randn(count, generator=generator, dtype=F64).to(dtype) for _ in range(2))
    parameters = fast._hermite_parameters(kind, nodes)
    kept = torch.empty(count, nodes, dtype=F64)
    out_mean, out_variance, grad_input_mean, grad_input_variance = (torch.empty(count, dtype=dtype) for _ in range(4))
    calls = [
        ("gauss_hermite_moments", (mean, variance, parameters, kept, out_mean, out_variance)),
        ("gauss_hermite_moments_backward", (mean, variance, parameters, kept, grad_mean, grad_variance,
                                            grad_input_mean, grad_input_variance)),
    ]  # fmt: skip
    for name, tensors in calls:
        native_builds.call(library, name, count, *tensors)
    return [kept, out_mean, out_variance, grad_input_mean, grad_input_variance]


@needs_library
@native_builds.x86_64_linux
def test_every_gauss_hermite_build_gives_the_same_bits(tmp_path: Path) -> None:
    """Lane by lane the same operations and the sums across the eight lanes of a block in a fixed order: each build
    of gauss_hermite.c that this CPU runs, compiled alone, returns the library's results bit for bit (forward and
    backward, float32 and float64, silu / sigmoid / tanh, element and node counts that are not multiples of 8)."""
    flags = native_builds.cpu_flags()
    builds = [lanes for lanes, flag in _HERMITE_BUILDS.items() if flag is None or flag in flags]
    cases = [
        (kind, count, nodes, dtype)
        for kind in SMOOTH
        for count, nodes in ((1, 3), (13, 8), (13, 20), (37, 64), (240, 65), (9, 1))
        for dtype in (F64, torch.float32)
    ]
    want = [_hermite_kernels(None, *case) for case in cases]
    for lanes in builds:
        library = native_builds.compile_alone("gauss_hermite.c", f"BKN_HERMITE_LANES={lanes}", tmp_path / f"{lanes}.so")
        for case, expected in zip(cases, want):
            for got, wanted in zip(_hermite_kernels(library, *case), expected):
                assert torch.equal(got, wanted), (lanes, case)
