"""The C kernels' callers under hostile inputs and execution contexts: what they must refuse, and what they
must compute exactly as the PyTorch forms do.

The kernels read and write raw memory through ctypes, so a wrong assumption about a tensor (layout, dtype,
a traced or wrapped tensor) is garbage or memory corruption, not an error. Each test pins one of: NaN / Inf
patterns equal the PyTorch forms'; traced, transformed or wrapped calls never run a kernel (``native.call``
spied); odd layouts, empty tensors and huge kernels run a form that is right; autograd's checks (saved
tensors modified in place) still hold; threads and forked workers; and the loader's handling of its
environment.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from bkn_export import fast_prior, moments, native
from bkn_export.chain import fast

F64 = torch.float64

needs_library = pytest.mark.skipif(native.library() is None, reason=f"bkn_export.native: {native.status()}")

Moments = Callable[[Tensor, Tensor], tuple[Tensor, ...]]

_WEIGHT = torch.linspace(-1.0, 1.0, 27, dtype=F64).reshape(3, 9)
_CONV = nn.Conv2d(9, 2, 3, padding=1, bias=False).double()  # padded: coverage tables, the kernel's spread term
_COVERAGE = fast._conv_geometry(_CONV, (4, 4), ((0, 0), (0, 0)), F64)[0]

#: Each kernel's caller as a function of (mean, variance) of 9 channels; all of them run a kernel on plain
#: float64 CPU tensors.
CASES: dict[str, Moments] = {
    "relu": fast.relu_moments,
    "silu": lambda m, v: fast.gauss_hermite_moments("silu", m, v),  # type: ignore[arg-type,return-value]
    "tanh": lambda m, v: fast.gauss_hermite_moments("tanh", m, v),  # type: ignore[arg-type,return-value]
    "hardswish": lambda m, v: fast.piecewise_moments("hardswish", m, v),  # type: ignore[arg-type,return-value]
    "relu6": lambda m, v: fast.piecewise_moments("relu6", m, v),  # type: ignore[arg-type,return-value]
    "gate": lambda m, v: fast.gate_product(m, v, v.flip(0), m.flip(0).abs()),
    "linear": lambda m, v: fast.affine_moments(_WEIGHT, None, m, v, None),
    "conv": lambda m, v: fast.affine_moments(_CONV.weight, None, m, v, _COVERAGE),
    "output_variance": lambda m, v: fast_prior.normalized_output_moments(m, v, m.flip(0), None, 1e-5)[1:],
    "prior_assembly": lambda m, v: (
        fast_prior.assembled_prior(v, m, m.flip(0), None)  # type: ignore[return-value]
        or fast_prior._reference_assembly(v, m, m.flip(0), None)
    ),
}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernels ``native.call`` runs during the test, by name."""
    called: list[str] = []
    real = native.call

    def spy(name: str, *tensors: Tensor | None, count: int | None = None) -> None:
        called.append(name)
        real(name, *tensors, count=count)

    monkeypatch.setattr(native, "call", spy)
    return called


def _values_and_grads(function: Moments, mean: Tensor, variance: Tensor) -> list[Tensor | None]:
    mean, variance = mean.clone().requires_grad_(), variance.clone().requires_grad_()
    outputs = function(mean, variance)
    grads = torch.autograd.grad(outputs, [mean, variance], [torch.ones_like(o) for o in outputs], allow_unused=True)
    return [o.detach() for o in outputs] + list(grads)


def _pytorch_form(function: Moments, *args: Tensor) -> list[Tensor | None]:
    with native.disabled(), fast_prior.unfused():
        return _values_and_grads(function, *args)


# --------------------------------------------------------------------------- NaN, Inf, variance 0 and < 0


@needs_library
@pytest.mark.parametrize("name", sorted(CASES))
def test_nan_inf_and_degenerate_variances_give_the_pytorch_forms_pattern(name: str, calls: list[str]) -> None:
    """NaN where the PyTorch form has NaN, non-finite where it is non-finite, its values elsewhere (a NaN
    variance once came out finite: the floor max(v, 1e-12) dropped it; as did ReLU's and conv's clamp at 0).
    Where an input is infinite the two may differ in which non-finite value (silu(-inf): -inf against NaN)."""
    nan, inf = math.nan, math.inf
    mean = torch.tensor([0.0, 1.0, nan, inf, -inf, 0.5, nan, 2.0, -1.0], dtype=F64)
    variance = torch.tensor([1.0, nan, 1.0, 1.0, 1.0, inf, 0.0, -1.0, 1e-20], dtype=F64)
    kernel = _values_and_grads(CASES[name], mean, variance)
    assert calls, "the kernels did not run"
    pytorch = _pytorch_form(CASES[name], mean, variance)
    infinite_input = mean.isinf() | variance.isinf() | mean.flip(0).isinf() | variance.flip(0).isinf()
    for got, want in zip(kernel, pytorch, strict=True):
        assert (got is None) == (want is None)
        if got is None or want is None:
            continue
        where = slice(None) if got.shape != mean.shape else ~infinite_input
        assert torch.equal(got.isnan()[where], want.isnan()[where]), (got, want)
        assert torch.equal(got.isfinite(), want.isfinite()), (got, want)
        finite = want.isfinite()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-9, atol=1e-12)


@needs_library
def test_a_nan_mean_through_a_padded_conv_gives_a_nan_variance(calls: list[str]) -> None:
    """Only the spread term (Σ T H T − M², clamped at 0) sees the mean: its clamp must keep a NaN, as clamp_min."""
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64)
    mean[4] = math.nan
    got = CASES["conv"](mean, variance)
    assert calls
    assert got[0].isnan().all() and got[1].isnan().all()
    with native.disabled():
        assert CASES["conv"](mean, variance)[1].isnan().all()


# --------------------------------------------------------------------------- tracing, transforms, wrappers


@needs_library
@pytest.mark.parametrize("name", ["relu", "silu", "hardswish", "gate", "linear"])
def test_make_fx_of_a_public_fused_function_traces_the_pytorch_form(name: str, calls: list[str]) -> None:
    """On real tensors a kernel's output would be traced as the ``empty_like`` it was written into."""
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64) + 0.1
    graph = make_fx(CASES[name], tracing_mode="real")(mean, variance)
    assert calls == []
    with native.disabled():
        want = CASES[name](mean, variance)
    torch.testing.assert_close(graph(mean, variance), want, rtol=1e-12, atol=1e-14)
    assert "empty_like" not in graph.code


@needs_library
def test_torch_compile_traces_the_pytorch_forms_in_one_graph(calls: list[str]) -> None:
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64) + 0.1

    def both(m: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        return (*fast.relu_moments(m, v), *fast.gate_product(m, v, m, v))

    compiled = torch.compile(both, backend="eager", fullgraph=True)
    got = compiled(mean, variance)
    assert calls == []
    with native.disabled():
        torch.testing.assert_close(got, both(mean, variance), rtol=0, atol=0)


@needs_library
def test_fake_tensors_and_torch_func_never_reach_a_kernel(calls: list[str]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        mean = mode.from_tensor(torch.randn(9, dtype=F64))
        variance = mode.from_tensor(torch.rand(9, dtype=F64))
        for name in ("relu", "gate"):  # (the cached constants of the others are real tensors: fake mode refuses)
            CASES[name](mean, variance)
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64) + 0.1
    for name in ("relu", "gate"):  # these Functions have no vmap rule: torch.func refuses them, loudly
        with pytest.raises(RuntimeError, match="functorch"):
            torch.func.grad(lambda m, f=CASES[name]: f(m, variance)[0].sum())(mean)  # type: ignore[misc]
    grad = torch.func.grad(lambda v: CASES["output_variance"](mean, v)[0].sum())(variance)
    with fast_prior.unfused():
        torch.testing.assert_close(
            grad, torch.func.grad(lambda v: CASES["output_variance"](mean, v)[0].sum())(variance)
        )
    assert calls == []


class _Logged(Tensor):
    """A subclass that intercepts every operation (as a logging or quantization wrapper would)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def,override]
        return super().__torch_function__(func, types, args, kwargs or {})


@needs_library
@pytest.mark.parametrize("name", ["relu", "hardswish", "gate"])
def test_a_tensor_subclass_runs_the_pytorch_form(name: str, calls: list[str]) -> None:
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64) + 0.1
    got = CASES[name](mean.as_subclass(_Logged), variance.as_subclass(_Logged))
    assert calls == []
    with native.disabled():
        torch.testing.assert_close([t.as_subclass(Tensor) for t in got], CASES[name](mean, variance), rtol=0, atol=0)


# --------------------------------------------------------------------------- layouts, dtypes, empty, huge


def _through_views(function: Moments, view: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> list[Tensor]:
    """The outputs and the gradients of their sum with respect to the bases the views are taken of."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(40, dtype=F64, generator=generator).requires_grad_()
    positive = (torch.rand(40, dtype=F64, generator=generator) + 0.1).requires_grad_()
    outputs = function(*view(base, positive))
    grads = torch.autograd.grad(outputs, [base, positive], [torch.ones_like(o) for o in outputs], allow_unused=True)
    return [o.detach() for o in outputs] + [torch.zeros_like(base) if g is None else g for g in grads]


_VIEWS: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "offset": lambda m, v: (m[5:14], v[20:29]),
    "expanded": lambda m, v: (m[3:4].expand(9), v[:9]),
    "strided": lambda m, v: (m[::4][:9], v[1::4][:9]),
    "as_strided": lambda m, v: (m.as_strided((9,), (3,), 2), v.as_strided((9,), (2,), 7)),
}


@needs_library
@pytest.mark.parametrize("view", sorted(_VIEWS))
@pytest.mark.parametrize("name", ["relu", "silu", "hardswish", "gate", "linear", "output_variance", "prior_assembly"])
def test_views_offsets_and_strides_read_the_right_elements(name: str, view: str, calls: list[str]) -> None:
    """A contiguous slice at a storage offset runs the kernel on its own elements; an expanded (stride 0),
    a strided and an ``as_strided`` view run the PyTorch form; all give the PyTorch form's values."""
    got = _through_views(CASES[name], _VIEWS[view])
    # (the output variance's kernel reads the variance and a flipped copy of the mean: contiguous)
    assert bool(calls) == (view == "offset" or (name, view) == ("output_variance", "expanded"))
    with native.disabled(), fast_prior.unfused():
        want = _through_views(CASES[name], _VIEWS[view])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@needs_library
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_channels_last_or_transposed_weight_gives_the_reference(memory_format: torch.memory_format) -> None:
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double().to(memory_format=memory_format)
    mean, variance = torch.randn(4, dtype=F64, generator=generator), torch.rand(4, dtype=F64, generator=generator)
    coverage, _ = fast._conv_geometry(conv, (5, 5), ((0, 0), (0, 0)), F64)
    linear_weight = torch.randn(4, 6, dtype=F64, generator=generator).t().requires_grad_()  # (6, 4), transposed
    for weight, tables in ((conv.weight, coverage), (linear_weight, None)):
        inputs = (weight, mean.clone().requires_grad_(), variance.clone().requires_grad_())
        got = fast.affine_moments(inputs[0], None, inputs[1], inputs[2], tables)
        with native.disabled():
            want = fast.affine_moments(inputs[0], None, inputs[1], inputs[2], tables)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        cotangents = [torch.ones_like(o) for o in got]
        torch.testing.assert_close(
            torch.autograd.grad(got, inputs, cotangents), torch.autograd.grad(want, inputs, cotangents),
            rtol=1e-10, atol=1e-12,
        )  # fmt: skip


@needs_library
def test_mixed_and_unsupported_dtypes_run_the_pytorch_forms(calls: list[str]) -> None:
    """float32 with float64 (the PyTorch form's promotion, or its error), bfloat16, float16."""
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64) + 0.1
    for name in ("relu", "silu", "hardswish", "gate"):
        for args in ((mean.float(), variance), (mean.bfloat16(), variance.bfloat16()), (mean.half(), variance.half())):
            try:
                got = CASES[name](*args)
            except RuntimeError as error:
                with native.disabled(), pytest.raises(RuntimeError, match=str(error)[:40]):
                    CASES[name](*args)
                continue
            with native.disabled():
                torch.testing.assert_close(got, CASES[name](*args), rtol=0, atol=0)
    assert calls == []


@needs_library
@pytest.mark.parametrize("name", sorted(set(CASES) - {"linear", "conv"}))
def test_empty_channels(name: str) -> None:
    mean, variance = torch.empty(0, dtype=F64), torch.empty(0, dtype=F64)
    for tensor in _values_and_grads(CASES[name], mean, variance):
        assert tensor is not None and tensor.shape == (0,)


def test_a_linear_without_outputs_gives_empty_moments() -> None:
    ones = torch.ones(9, dtype=F64)
    got = fast.affine_moments(torch.empty(0, 9, dtype=F64), None, ones, ones, None)
    assert [o.shape for o in got] == [(0,), (0,)]


def test_a_linear_without_inputs_gives_zero_moments_as_the_reference() -> None:
    """Linear(0, 3): W μ = 0, (W∘W) σ² = 0 (moments.linear_moments). The fused form had divided C_in / B by
    B = 0 (``_affine_forward``: ``groups = mean.shape[0] // inputs``); it now returns the empty sums."""
    empty = torch.empty(0, dtype=F64)
    got = fast.affine_moments(torch.empty(3, 0, dtype=F64), None, empty, empty, None)
    torch.testing.assert_close(got, moments.linear_moments(torch.empty(3, 0, dtype=F64), None, empty, empty))


@needs_library
def test_a_huge_kernel_runs_the_pytorch_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels keep O(K) doubles per row on the C stack: a 2¹⁹-tap Conv1d (one torch thread) overflowed it
    (a segfault); beyond :data:`fast._AFFINE_NATIVE_TAPS` taps the PyTorch form runs."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    taps = 1 << 19
    weight = torch.randn(1, 1, taps, dtype=F64)
    mean, variance = torch.randn(1, dtype=F64), torch.rand(1, dtype=F64)
    assert fast._native_affine(weight, mean, variance, None, None) is None
    limit = fast._AFFINE_NATIVE_TAPS
    assert fast._native_affine(weight[..., :limit].contiguous(), mean, variance, None, None) is not None
    got = fast.affine_moments(weight.requires_grad_(), None, mean, variance, None)
    with native.disabled():
        torch.testing.assert_close(got, fast.affine_moments(weight, None, mean, variance, None), rtol=1e-12, atol=0)
    (got[0] + got[1]).backward()  # the backward of the PyTorch form, too


# --------------------------------------------------------------------------- autograd semantics


@needs_library
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_saved_input_modified_in_place_is_caught(name: str, calls: list[str]) -> None:
    mean = torch.randn(9, dtype=F64).requires_grad_() * 1.0
    variance = torch.rand(9, dtype=F64).add(0.1).requires_grad_() * 1.0
    outputs = CASES[name](mean, variance)
    assert calls
    with torch.no_grad():
        mean.add_(1.0)
        variance.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(outputs, [mean, variance], [torch.ones_like(o) for o in outputs], allow_unused=True)


@needs_library
def test_a_weight_stepped_in_place_before_backward_is_caught() -> None:
    weight = _WEIGHT.clone().requires_grad_()
    out = fast.affine_moments(weight, None, torch.randn(9, dtype=F64), torch.rand(9, dtype=F64), None)
    with torch.no_grad():
        weight.sub_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out[0] + out[1]).sum().backward()


def _variance_grad_twice(function: Moments, mean: Tensor, variance: Tensor, output: int) -> tuple[Tensor, Tensor]:
    loss = function(mean, variance)[output].sum()
    (first,) = torch.autograd.grad(loss, variance, retain_graph=True)
    (second,) = torch.autograd.grad(loss, variance)
    return first, second


@needs_library
@pytest.mark.parametrize("name", sorted(CASES))
def test_partial_requires_grad_unused_outputs_and_retained_graphs(name: str, calls: list[str]) -> None:
    """Only the variance requires grad; one output reaches the loss through an expanded (stride-0) gradient;
    a retained graph's second backward gives the first's gradient again."""
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(9, dtype=F64, generator=generator)
    variance = (torch.rand(9, dtype=F64, generator=generator) + 0.1).requires_grad_()
    output = 0 if name == "prior_assembly" else -1  # an output that depends on the variance; the other unused
    first, second = _variance_grad_twice(CASES[name], mean, variance, output)
    assert calls
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with native.disabled(), fast_prior.unfused():
        want, _ = _variance_grad_twice(CASES[name], mean, variance, output)
    torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-12)


@needs_library
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode_run_the_kernels(mode: str, calls: list[str]) -> None:
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64) + 0.1
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        got = {name: CASES[name](mean, variance) for name in ("relu", "silu", "hardswish", "gate", "linear")}
    assert len(calls) == 5
    with native.disabled():
        for name, value in got.items():
            torch.testing.assert_close(value, CASES[name](mean, variance), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- threads and processes


def _step(seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(64, dtype=F64, generator=generator).requires_grad_()
    variance = (torch.rand(64, dtype=F64, generator=generator) + 0.1).requires_grad_()
    weight = torch.randn(32, 64, dtype=F64, generator=generator).requires_grad_()
    m, v = fast.affine_moments(weight, None, mean, variance, None)
    m, v = fast.piecewise_moments("hardswish", m, v)  # type: ignore[misc]
    m, v = fast.gauss_hermite_moments("silu", m, v)  # type: ignore[misc]
    m, v = fast.gate_product(*fast.relu_moments(m, v), m, v)
    return list(torch.autograd.grad((m * v).sum(), [mean, variance, weight]))


@needs_library
def test_threads_running_steps_at_once_get_the_serial_results() -> None:
    """ctypes releases the GIL: the kernels of two threads run at once, each on its own tensors."""
    want = {seed: _step(seed) for seed in range(4)}
    got: dict[int, list[list[Tensor]]] = {seed: [] for seed in range(4)}

    def worker(seed: int) -> None:
        for _ in range(20):
            got[seed].append(_step(seed))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, runs in got.items():
        assert len(runs) == 20
        for run in runs:
            torch.testing.assert_close(run, want[seed], rtol=0, atol=0)


@needs_library
def test_disabled_in_one_thread_leaves_another_thread_on() -> None:
    mean, variance = torch.randn(9, dtype=F64), torch.rand(9, dtype=F64)
    entered, checked = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def off() -> None:
        with native.disabled():
            entered.set()
            checked.wait(10)
            seen["off"] = native.takes(mean, variance)

    thread = threading.Thread(target=off)
    thread.start()
    entered.wait(10)
    seen["on"] = native.takes(mean, variance)
    checked.set()
    thread.join()
    assert seen == {"on": True, "off": False}


def _relu_in_child(values: list[float]) -> list[float]:
    mean = torch.tensor(values, dtype=F64)
    return fast.relu_moments(mean, mean.abs())[1].tolist()


@needs_library
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_a_forked_worker_uses_the_loaded_library() -> None:
    """A DataLoader worker (fork) inherits the loaded library: its results are the parent's."""
    values = [-1.0, 0.0, 0.5, 2.0]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply(_relu_in_child, (values,))
    assert got == _relu_in_child(values)


# --------------------------------------------------------------------------- the loader


@pytest.mark.parametrize(
    ("env", "status"),
    [
        ({"CC": 'gcc "-O2'}, "is not a command line"),  # shlex: no closing quotation (was a ValueError)
        ({"BKN_NATIVE": "false"}, "disabled by BKN_NATIVE=false"),
        ({"BKN_NATIVE": " Off "}, "disabled by BKN_NATIVE= Off "),
        ({"BKN_NATIVE": "no"}, "disabled by BKN_NATIVE=no"),
    ],
)
def test_the_loader_falls_back_on_odd_settings(
    env: dict[str, str], status: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("BKN_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("BKN_NATIVE", "1")  # whatever the suite runs with: the settings below decide
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert native.library() is None
    assert status in native.status()
    assert list(tmp_path.iterdir()) == []


def test_changed_sources_name_another_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process with edited sources (any file in csrc/, headers too) builds and loads its own file."""
    package = Path(native.__file__).parent
    copy = tmp_path / "native"
    shutil.copytree(package / "csrc", copy / "csrc")
    shutil.copy(package / "__init__.py", copy / "__init__.py")
    spec = importlib.util.spec_from_file_location("bkn_native_copy", copy / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("BKN_NATIVE_CACHE", str(tmp_path / "cache"))
    compiler = ["cc"]
    before = module._target(compiler)
    assert before == native._target(compiler)
    header = copy / "csrc" / "common.h"
    header.write_text(header.read_text() + "\n/* edited */\n")
    assert module._target(compiler) != before
