"""The C kernels of :mod:`bkn_export.native` against the reference, and how the library is built and refused.

Each kernel evaluates a reference formula of :mod:`bkn_export.moments` / :mod:`bkn_export.functional`
per element in double precision. Compared with the reference in float64 (values, first derivatives
through the Functions that call them; second derivatives go through the reference by design) and in
float32 against the float64 reference (the kernels compute in double: at least as accurate as the
float32 reference). Without a C compiler every test here that needs the library skips with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.autograd_graph import graph_nodes
from torch import Tensor, nn

from bkn_export import convert_batchnorm, fast_prior, moments, native
from bkn_export.chain import fast
from bkn_export.chain.steps import Elementwise

F64 = torch.float64

needs_library = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")


def _grads(outputs: tuple[Tensor, ...], wrt: list[Tensor], seed: int = 1) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, wrt, cotangents)


def _relu_inputs(scale: float, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """a = μ/σ from -8 to 8 and beyond the ±30 clamp."""
    mean = torch.cat([torch.linspace(-8.0, 8.0, 41, dtype=F64), torch.tensor([-50.0, 50.0], dtype=F64)])
    std = torch.full_like(mean, scale)
    std[-2:] = 1.0
    return (mean * std).to(dtype).requires_grad_(), (std * std).to(dtype).requires_grad_()


@needs_library
@pytest.mark.parametrize("scale", [1e-8, 0.3, 1.0, 30.0])
def test_relu_kernel_equals_the_reference(scale: float) -> None:
    mean, variance = _relu_inputs(scale)
    fused = fast.relu_moments(mean, variance)
    assert type(fused[0].grad_fn).__name__ == "_ReluMomentsBackward"
    reference = moments.elementwise_moments("relu", mean, variance)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-300)
    with native.disabled():
        pytorch_form = fast.relu_moments(mean, variance)
    wrt = [mean, variance]
    kernel_grads = _grads(fused, wrt)
    torch.testing.assert_close(kernel_grads, _grads(reference, wrt), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kernel_grads, _grads(pytorch_form, wrt), rtol=1e-9, atol=1e-12)


@needs_library
def test_relu_kernel_in_float32_is_as_accurate_as_the_float32_reference() -> None:
    """Against the float64 reference: the kernel's error is at most the float32 reference's (it rounds once)."""
    mean64, variance64 = _relu_inputs(1.0)
    exact = moments.elementwise_moments("relu", mean64, variance64)
    mean, variance = (t.detach().float() for t in (mean64, variance64))
    kernel = fast.relu_moments(mean, variance)
    float32_reference = moments.elementwise_moments("relu", mean, variance)
    for got, ref32, want in zip(kernel, float32_reference, exact):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= (ref32.double() - want).abs().max() + 1e-7 * want.abs().max()


@needs_library
def test_second_derivatives_go_through_the_reference() -> None:
    mean, variance = _relu_inputs(1.0)
    fused = fast.relu_moments(mean, variance)
    reference = moments.elementwise_moments("relu", mean, variance)
    first = [torch.autograd.grad((o[0] * o[1]).sum(), [mean, variance], create_graph=True) for o in (fused, reference)]
    second = [torch.autograd.grad(g[0].sum() + g[1].sum(), [mean, variance]) for g in first]
    torch.testing.assert_close(second[0], second[1], rtol=1e-12, atol=1e-14)


@needs_library
def test_inputs_the_kernels_do_not_take_run_the_pytorch_forms() -> None:
    """Another dtype, a non-contiguous or a broadcast pair: the PyTorch form, same values."""
    mean, variance = _relu_inputs(1.0)
    half = mean.detach().half(), variance.detach().half()
    strided = torch.stack([mean, mean], dim=1)[:, 0], torch.stack([variance, variance], dim=1)[:, 0]
    assert not native.takes(*half) and not native.takes(*strided)
    for args in (half, strided):
        torch.testing.assert_close(fast.relu_moments(*args), moments.elementwise_moments("relu", *args), rtol=0, atol=0)
    step = Elementwise("relu")
    assert fast.predict_steps((step,), mean, variance, (), {})[0].dtype == F64


def test_disabled_turns_the_kernels_off() -> None:
    mean, variance = _relu_inputs(1.0)
    with native.disabled():
        assert not native.takes(mean, variance)
        torch.testing.assert_close(
            fast.relu_moments(mean, variance), moments.elementwise_moments("relu", mean, variance), rtol=0, atol=0
        )


def _status_in_subprocess(env: dict[str, str]) -> str:
    """native.status() and whether the library is None, in a fresh process with ``env`` over this one's
    (``BKN_NATIVE=1`` unless ``env`` says otherwise: the suite may run with the kernels off)."""
    code = "from bkn_export import native; print(native.status()); print(native.library() is None)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "BKN_NATIVE": "1", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_bkn_native_0_disables_the_library() -> None:
    out = _status_in_subprocess({"BKN_NATIVE": "0"})
    assert "disabled by BKN_NATIVE=0" in out and out.strip().endswith("True")


def test_a_missing_compiler_falls_back_with_the_reason(tmp_path: Path) -> None:
    out = _status_in_subprocess({"CC": str(tmp_path / "no-such-cc"), "BKN_NATIVE_CACHE": str(tmp_path)})
    assert "no C compiler" in out and out.strip().endswith("True")


def test_a_failing_build_falls_back_and_leaves_no_file(tmp_path: Path) -> None:
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'cc: broken' >&2\nexit 3\n")
    failing.chmod(0o755)
    cache = tmp_path / "cache"
    out = _status_in_subprocess({"CC": str(failing), "BKN_NATIVE_CACHE": str(cache)})
    assert "build failed" in out and "cc: broken" in out and out.strip().endswith("True")
    assert list(cache.iterdir()) == []  # the temporary output was removed, nothing half-written


@needs_library
def test_the_library_is_built_once_into_the_cache(tmp_path: Path) -> None:
    first = _status_in_subprocess({"BKN_NATIVE_CACHE": str(tmp_path)})
    built = list(tmp_path.glob("libbkn_native-*.so"))
    assert len(built) == 1 and str(built[0]) in first
    stamp = built[0].stat().st_mtime_ns
    second = _status_in_subprocess({"BKN_NATIVE_CACHE": str(tmp_path)})
    assert str(built[0]) in second and built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built[0].name]
    # readable by the other users of a shared cache (mkstemp's 0600 plus the linker's bits gave 0711: an install QA)
    assert built[0].stat().st_mode & 0o777 == 0o755


def test_no_home_directory_falls_back_with_the_reason(tmp_path: Path) -> None:
    """A container run as a uid without a password entry and without $HOME: ``Path.home()`` raises RuntimeError,
    which escaped ``native.status()`` and every ``convert_batchnorm`` (an install QA, 2026-12-07's sixth session)."""
    code = (
        "import pathlib\n"
        "def no_home(): raise RuntimeError('Could not determine home directory.')\n"
        "pathlib.Path.home = staticmethod(no_home)\n"
        "from bkn_export import native; print(native.status()); print(native.library() is None)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", "BKN_NATIVE_CACHE")}
    result = subprocess.run(
        [sys.executable, "-c", code], env={**env, "BKN_NATIVE": "1"}, capture_output=True, text=True, check=True
    )
    assert "no cache directory (Could not determine home directory." in result.stdout
    assert result.stdout.strip().endswith("True")


@needs_library
def test_a_damaged_cached_library_is_rebuilt(tmp_path: Path) -> None:
    _status_in_subprocess({"BKN_NATIVE_CACHE": str(tmp_path)})
    (built,) = tmp_path.glob("libbkn_native-*.so")
    built.write_bytes(b"not a shared object")
    out = _status_in_subprocess({"BKN_NATIVE_CACHE": str(tmp_path)})
    assert f"loaded {built}" in out and out.strip().endswith("False")
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_an_unwritable_cache_falls_back_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache directory cannot be created under a file")
    out = _status_in_subprocess({"BKN_NATIVE_CACHE": str(blocker / "cache")})
    assert "build failed" in out and out.strip().endswith("True")


@needs_library
def test_concurrent_first_builds_leave_one_whole_library(tmp_path: Path) -> None:
    """Four processes building into an empty cache at once: each loads, one library is left, no temporary."""
    code = "from bkn_export import native; print(native.library() is not None)"
    env = {**os.environ, "BKN_NATIVE_CACHE": str(tmp_path)}
    processes = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    outputs = [process.communicate(timeout=300)[0].strip() for process in processes]
    assert outputs == ["True"] * 4
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


@pytest.mark.skipif(shutil.which("env") is None or shutil.which("cc") is None, reason="needs `env` and `cc` on PATH")
def test_cc_may_be_a_command_with_arguments(tmp_path: Path) -> None:
    """``CC="env cc"`` (as ``ccache gcc`` would be): the program resolved on PATH, its arguments kept."""
    out = _status_in_subprocess({"CC": "env cc", "BKN_NATIVE_CACHE": str(tmp_path)})
    assert f"loaded {tmp_path}" in out and out.strip().endswith("False")


# --------------------------------------------------------------------------- the prior's glue (fast_prior)


def _channels(seed: int, dtype: torch.dtype = F64, low: float = 0.0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(7, generator=generator, dtype=F64) * 3.0 + low).to(dtype).requires_grad_()


@needs_library
@pytest.mark.parametrize("affine", [True, False])
def test_output_moments_kernel_equals_the_reference(affine: bool) -> None:
    mean, variance = _channels(0) - 1.5, _channels(1, low=1e-6)
    weight, bias = (_channels(2) - 1.0, _channels(3)) if affine else (None, None)
    fused = fast_prior.normalized_output_moments(mean, variance, weight, bias, 1e-3)
    assert type(fused[1].grad_fn).__name__ == "_OutputVarianceBackward"
    reference = moments.normalized_output_moments(mean, variance, weight, bias, 1e-3)
    torch.testing.assert_close(fused, reference, rtol=0, atol=0)  # same operations in the same order, in double
    wrt = [variance] + ([weight, bias] if affine else [])
    outputs = slice(0 if affine else 1, 2)  # without affine the mean is a constant 0
    cotangents = [torch.randn(7, dtype=F64) for _ in range(2)][outputs]
    kernel = torch.autograd.grad(fused[outputs], wrt, cotangents)
    expected = torch.autograd.grad(reference[outputs], wrt, cotangents)
    torch.testing.assert_close(kernel, expected, rtol=1e-14, atol=1e-15)


@needs_library
@pytest.mark.parametrize("known", [False, True], ids=["", "known mask"])
def test_prior_assembly_kernel_equals_the_reference(known: bool) -> None:
    """Raw noise parameters across softplus' threshold (20) and gains far into both tails."""
    variance = _channels(0, low=0.1)
    raw = torch.tensor([-30.0, -2.0, 0.0, 0.5, 19.9, 20.1, 40.0], dtype=F64, requires_grad=True)
    logit = torch.tensor([-40.0, -3.0, 0.0, 0.2, 2.0, 9.0, 35.0], dtype=F64, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0], dtype=F64) if known else None
    fused = fast_prior.assembled_prior(variance, raw, logit, mask)
    assert fused is not None and type(fused[0].grad_fn).__name__ == "_PriorAssemblyBackward"
    reference = fast_prior._reference_assembly(variance, raw, logit, mask)
    torch.testing.assert_close(fused, reference, rtol=1e-15, atol=0)
    cotangents = [torch.randn(7, dtype=F64) for _ in range(2)]
    wrt = [variance, raw, logit]
    kernel = torch.autograd.grad(fused, wrt, cotangents, retain_graph=True)
    expected = torch.autograd.grad(reference, wrt, cotangents, retain_graph=True)
    torch.testing.assert_close(kernel, expected, rtol=1e-14, atol=1e-300)
    second = [torch.autograd.grad(o[1].sum() + o[0].sum(), [raw, logit], create_graph=True) for o in (fused, reference)]
    third = [torch.autograd.grad(g[0].square().sum() + g[1].square().sum(), [raw, logit]) for g in second]
    torch.testing.assert_close(third[0], third[1], rtol=1e-13, atol=1e-300)


@needs_library
def test_the_glue_in_float32_is_as_accurate_as_the_float32_reference() -> None:
    variance64, raw64, logit64 = _channels(0, low=1e-3), _channels(1) * 4 - 6, _channels(2) * 4 - 6
    exact = fast_prior._reference_assembly(variance64, raw64, logit64, None)
    args32 = [t.detach().float() for t in (variance64, raw64, logit64)]
    kernel = fast_prior.assembled_prior(*args32, None)
    assert kernel is not None
    float32_reference = fast_prior._reference_assembly(*args32, None)
    for got, ref32, want in zip(kernel, float32_reference, exact):
        assert (got.double() - want).abs().max() <= (ref32.double() - want).abs().max() + 1e-7 * want.abs().max()


@needs_library
def test_a_converted_network_trains_the_same_with_and_without_the_kernels() -> None:
    """One float64 train step of a converted residual network (ReLU, hardswish, pooling, a residual
    sum; learned gain and process noise): loss, every parameter gradient and the running statistics
    agree between the C kernels and the PyTorch forms."""
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(),
        nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).double()  # fmt: skip
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    converted = convert_batchnorm(block, x)
    results = []
    for use_kernels in (True, False):
        model = copy.deepcopy(converted).train()
        with contextlib.ExitStack() as stack:
            if not use_kernels:
                stack.enter_context(native.disabled())
            loss = model(x).square().sum()
            loss.backward()
        grads = [p.grad for p in model.parameters()]
        buffers = [b.clone() for b in model.buffers()]
        results.append((loss.detach(), grads, buffers))
    (loss, grads, buffers), (loss_ref, grads_ref, buffers_ref) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-13, atol=0)
    for got, want in zip(grads, grads_ref):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(buffers, buffers_ref, rtol=1e-13, atol=1e-15)


@needs_library
def test_a_converted_network_step_runs_the_fused_nodes() -> None:
    """The autograd graph of a converted network's step holds the fused nodes and none of the unfused
    glue: a fallback to the PyTorch forms or the reference would be silent otherwise (only slower)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    x = torch.randn(2, 3, 8, 8)
    loss = convert_batchnorm(model, x).train()(x).square().mean()
    nodes = graph_nodes(loss)
    names = {type(node).__name__ for node in nodes}
    heads = [node for node in nodes if type(node).__name__ == "_PathMomentsBackward"]
    # The source's output variance, ReLU's and the conv's moments: one node (chain/path_moments.py) whose
    # stages ran their kernels.
    assert {"_PathMomentsBackward", "_PriorAssemblyBackward"} <= names
    assert len(heads) == 1
    outvar, relu, conv = heads[0].stages
    assert outvar is not None and relu.native and conv.parameters is not None
    assert not names & {"SigmoidBackward0", "SoftplusBackward0", "ErfcBackward0", "DivBackward0"}


@pytest.mark.parametrize("kernels", [True, False], ids=["C kernels", "PyTorch forms"])
def test_second_derivatives_through_a_gate_whose_moments_depend_on_the_input(kernels: bool) -> None:
    """A squeeze-and-excitation gate's moments are computed from the input's: the create_graph
    backward must not count that path twice (it did before the fused forms differentiated aliases)."""
    mean = torch.linspace(-1.0, 2.0, 6, dtype=F64).requires_grad_()
    variance = torch.linspace(0.2, 1.5, 6, dtype=F64).requires_grad_()

    def through(product: object) -> Tensor:
        gate_mean, gate_variance = torch.sigmoid(mean * 0.7), variance * 0.3 + mean * mean * 0.1
        out = product(mean, variance, gate_mean, gate_variance)  # type: ignore[operator]
        return (out[0] * out[1]).sum() + out[1].square().sum()

    def reference(m: Tensor, v: Tensor, gm: Tensor, gv: Tensor) -> tuple[Tensor, Tensor]:
        out_mean = m * gm
        return out_mean, ((v + m * m) * (gv + gm * gm) - out_mean * out_mean).clamp_min(0.0)

    with contextlib.nullcontext() if kernels else native.disabled():
        first = torch.autograd.grad(through(fast.gate_product), [mean, variance], create_graph=True)
        second = torch.autograd.grad(first[0].sum() + first[1].square().sum(), [mean, variance])
    first_ref = torch.autograd.grad(through(reference), [mean, variance], create_graph=True)
    second_ref = torch.autograd.grad(first_ref[0].sum() + first_ref[1].square().sum(), [mean, variance])
    torch.testing.assert_close(first, first_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(second, second_ref, rtol=1e-12, atol=1e-14)


@needs_library
def test_a_gain_replaced_on_the_instance_is_honoured() -> None:
    """``conversion_guard.prior_off`` shadows ``prior_weight`` on the layer: the fused prior assembly
    (which reads the gain's logit itself) must step aside, and the layer computes BatchNorm."""
    from bkn_export.conversion_guard import prior_off

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    x = torch.randn(2, 3, 6, 6)
    converted = convert_batchnorm(copy.deepcopy(model), x).train()
    with prior_off([converted[4]]):
        y = converted(x)
    batchnorm = model.train()(x)
    torch.testing.assert_close(y, batchnorm, rtol=1e-5, atol=1e-5)
    assert (converted(x) - batchnorm).abs().max() > 1e-3  # the prior back on
