"""The CUDA route of :mod:`bkn_export.per_channel` on awkward networks, modes and inputs, run without a GPU.

As tests/test_triton_route.py: a child process started with ``TRITON_INTERPRET=1 BKN_TRITON_ON_CPU=1`` sends CPU
tensors where CUDA tensors go (the Triton twins of the per-channel C kernels, in Triton's interpreter); this
process runs the same step on the CPU route (the C kernels, or the PyTorch forms where the library is not built)
and on the PyTorch forms (``native.disabled()``). The networks and modes (``tests/support/triton_hostile.py``):
grouped and depthwise convs, 512 taps, more than 1024 channels, one source feeding three convs, γ None,
``momentum=None``, no running statistics, frozen parameters, channels_last, no_grad / inference_mode forwards, a
``create_graph`` double backward, ±inf / NaN inputs, the meta device, ``torch.compile(fullgraph=True)``.

Tolerances, relative to max(|exact| of the tensor, 1e-3 × the step's largest value), the floor for entries that
are 0 in exact arithmetic and rounding noise in practice (a conv bias before a normalisation; in a double backward
the gradients reach 1e4):

* float64: 1e-10 (the twins and the C kernels compute in double, summing in other orders: ~1e-14 seen);
* float32: the Triton route's error against the float64 CPU step at most 4× that of the child's PyTorch forms
  (the same op kernels, which sum in float32 tiles where the CPU op sums in double), plus 1e-6; inputs are drawn
  in float64 and rounded, so that both steps see the same numbers;
* NaN where the CPU route has NaN, nowhere else.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support import triton_hostile
from support.triton_interpreter import InterpreterProcess
from torch import Tensor


def _tensors(step: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in step.items() if isinstance(v, Tensor) and v.is_floating_point()}


def _errors(actual: dict[str, Tensor], exact: dict[str, Tensor]) -> dict[str, float]:
    """Per tensor: max |actual - exact| over max(max |exact|, 1e-3 × the largest finite |exact| of the step);
    inf where the NaN patterns differ."""
    assert actual.keys() == exact.keys()
    largest = max((float(v.double().nan_to_num(0, 0, 0).abs().max()) for v in exact.values() if v.numel()), default=1)
    errors = {}
    for name, value in actual.items():
        truth = exact[name].double()
        if not value.numel():
            errors[name] = 0.0
        elif not torch.equal(value.isnan(), truth.isnan()):
            errors[name] = float("inf")
        else:
            scale = max(float(truth.nan_to_num(0, 0, 0).abs().max()), 1e-3 * largest) or 1.0
            difference = (value.double() - truth).nan_to_num(0, 0, 0).abs().max()
            errors[name] = float(difference) / scale
    return errors


#: (case, dtype, options of triton_hostile.network_step), and the twin calls the child must show.
_STEPS: dict[str, tuple[str, str, dict[str, Any], set[str]]] = {
    "grouped convs, float64": ("grouped", "float64", {}, {"affine B=4 K=25 groups=2", "affine B=3 K=9 groups=2"}),
    "grouped convs channels_last, float32": ("grouped", "float32", {"layout": "channels_last"}, {"piecewise_moments"}),
    "γ None, momentum None, no running statistics: two steps": (
        "plain_norms", "float64", {"steps": 2}, {"running_statistics_update", "output_variance_backward"},
    ),
    "frozen γ and W, float32": ("plain_norms", "float32", {"frozen": "weight"}, {"affine_moments_backward"}),
    "every parameter frozen": ("grouped", "float64", {"frozen": "all"}, {"prior_assembly_backward"}),
    "one source, three convs, inference_mode": ("shared_source", "float64", {"mode": "inference", "steps": 2}, set()),
    "one source, three convs, no_grad, float32": ("shared_source", "float32", {"mode": "no_grad"}, set()),
    "double backward": ("grouped", "float64", {"mode": "double"}, {"affine_moments"}),
    "512 taps, depthwise, one channel, conv3d": ("long_kernels", "float64", {}, {"affine B=3 K=512 groups=1"}),
    "more than 1024 channels, float32": ("wide", "float32", {}, {"affine B=1030 K=1 groups=1"}),
    "an infinite input": ("plain_norms", "float64", {"poison": float("inf")}, {"relu_moments"}),
    "a NaN input, float32": ("grouped", "float32", {"poison": float("nan")}, {"relu_moments"}),
}  # fmt: skip


@pytest.mark.parametrize("heads", ["separate", "fused"])
@pytest.mark.parametrize("name", _STEPS)
def test_step_on_the_triton_route_matches_the_cpu_route(
    route_interpreter: InterpreterProcess, name: str, heads: str
) -> None:
    """Each case with every path head's stages as their own twins ("separate": the twins named in _STEPS must run)
    and with the fused path-head kernels ("fused": they must run, and the heads' twins then need not)."""
    case, dtype, options, twins = _STEPS[name]
    options = {**options, "heads": heads}
    child = route_interpreter.call("support.triton_hostile:network_step", case, dtype, 1, **options)
    launches = child["launches"]
    forward_only = options.get("mode") in ("no_grad", "inference")
    if heads == "separate":
        assert "affine_moments" in launches and "relu_moments" in launches, "the twins did not run"
        assert forward_only != ("relu_moments_backward" in launches)
        assert twins <= set(launches), sorted(launches)
    else:
        assert "path_moments" in launches, "the fused heads did not run"
        if options.get("mode", "grad") == "grad":
            assert "path_moments_backward" in launches, sorted(launches)
        elif forward_only:
            assert "path_moments_backward" not in launches, sorted(launches)
    here = triton_hostile.network_step(case, dtype, 1, **options)
    assert here["launches"] == {}
    if dtype == "float64":
        forms = triton_hostile.network_step(case, dtype, 1, forms="pytorch", **options)
        for reference in (here, forms):
            errors = _errors(_tensors(child), _tensors(reference))
            assert max(errors.values()) <= 1e-10, {k: e for k, e in errors.items() if e > 1e-10}
        return
    # The op's float32 Triton kernels sum in float32 tiles (the CPU op's in double): the child's own PyTorch forms,
    # behind the same op, are the float32 accuracy the twins must keep.
    forms = route_interpreter.call("support.triton_hostile:network_step", case, dtype, 1, forms="pytorch", **options)
    exact = _tensors(triton_hostile.network_step(case, "float64", 1, **options))
    own = _errors(_tensors(forms), exact)
    errors = _errors(_tensors(child), exact)
    bad = {k: (errors[k], own[k]) for k in errors if errors[k] > 4 * own[k] + 1e-6}
    assert not bad, bad


#: (C_out, B, K, groups, coverage tables) of fast.affine_moments: grouped 1×1 (ShuffleNet), padded or not; a
#: depthwise conv with multiplier 2; 147 taps depthwise (several tap blocks, lanes as groups); two groups of 32 rows
#: over 100 inputs (several row chunks: the second kernel adds the partial sums).
_GEOMETRIES = [(8, 2, 1, 4, False), (8, 2, 1, 4, True), (134, 1, 9, 67, True), (10, 1, 147, 10, True),
               (64, 100, 9, 2, True)]  # fmt: skip


@pytest.mark.parametrize("geometry", _GEOMETRIES, ids=str)
def test_affine_geometries_match_the_cpu_route(
    route_interpreter: InterpreterProcess, geometry: tuple[int, int, int, int, bool]
) -> None:
    """M, V, ∂W, ∂μ, ∂σ² of the affine twin through the Function, in float64, against the C route and the
    PyTorch forms."""
    child = route_interpreter.call("support.triton_hostile:affine_step", *geometry, "float64")
    assert int(child.pop("twin")) == 1
    for forms in ("kernels", "pytorch"):
        reference = triton_hostile.affine_step(*geometry, "float64", forms)
        assert int(reference.pop("twin")) == 0
        errors = _errors(child, reference)
        assert max(errors.values()) <= 1e-12, errors


def test_compiled_train_step_leaves_the_triton_route(route_interpreter: InterpreterProcess) -> None:
    """torch.compile(fullgraph=True) of a train step whose tensors take the Triton route traces the PyTorch forms:
    the running-statistics update asks whether anything traces before reading native.disabled()'s ContextVar,
    which Dynamo cannot trace (it raised there)."""
    child = route_interpreter.call("support.triton_hostile:compiled_step")
    here = triton_hostile.compiled_step()
    errors = _errors(_tensors(child), _tensors(here))
    assert len(errors) >= 7 and max(errors.values()) <= 1e-10, errors


def test_running_statistics_updated_by_the_kernel_count_as_changed_in_place(
    route_interpreter: InterpreterProcess,
) -> None:
    """A graph that saved a running mean refuses its backward after a train step updated the buffer, on both
    routes (the kernel writes through the pointer: it computed ∂/∂scale from the new values, silently)."""
    stale = "modified by an inplace operation"
    assert stale in triton_hostile.stale_running_statistics()
    assert stale in route_interpreter.call("support.triton_hostile:stale_running_statistics")


def test_meta_tensors_take_the_pytorch_forms(route_interpreter: InterpreterProcess) -> None:
    assert route_interpreter.call("support.triton_hostile:meta_step") == triton_hostile.meta_step() == (2, 40, 5, 5)


def test_train_steps_read_no_data_on_the_host(route_interpreter: InterpreterProcess) -> None:
    """Two float32 train steps on the Triton route (the op's Triton launchers and the twins) read tensor values
    on the host only from the CPU float64 parameter tables the launchers take (a CUDA graph can capture them)."""
    allowed = {
        ("kernels/affine_moments.py", "_geometry"),
        ("kernels/elementwise_moments.py", "_table"),
        ("kernels/prior_moments.py", "_first_parameter"),
        ("kernels/path_moments.py", "_activation_taken"),  # the header of a CPU piece / Gauss–Hermite table
        ("kernels/path_moments.py", "path_moments_take"),  # the CPU [B, K, groups] of an affine stage
    }
    for case in ("grouped", "plain_norms"):
        reads = route_interpreter.call("support.triton_hostile:host_reads", case)
        assert reads, "the recorder saw no read (the launchers read their CPU tables)"
        for method, dtype, dims, file, function in reads:
            where = (method, dtype, file, function)
            assert dtype == "torch.float64" and dims == 1 and (file, function) in allowed, where


#: Momenta, counts and counters of functional.update_running_statistics_'s branches: an int α takes the lerp
#: form, a float α the two operators; α 0 and 1, negative; n = 0 and 1 (the unbiased factor's max(n - 1, 1));
#: momentum=None from counters 0 (α = inf), 1, 3 and 2²⁵ + 1 (not a float32).
_UPDATES = [
    (0.1, 8, None), (0, 8, None), (1, 8, None), (0.0, 8, None), (1.0, 8, None), (True, 5, None), (-0.3, 5, None),
    (2, 5, None), (0.5, 1, None), (0.1, 0, None), (None, 8, 0), (None, 8, 1), (None, 8, 3), (None, 8, 2**25 + 1),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_statistics_update_equals_the_functional_form_bit_for_bit(
    route_interpreter: InterpreterProcess, dtype: torch.dtype
) -> None:
    """1100 channels (two programs) with NaN, ±inf and 1e38 in the posterior, every momentum form."""
    from bkn_export import functional

    generator = torch.Generator().manual_seed(0)

    def draw() -> list[Tensor]:
        return [torch.randn(1100, generator=generator, dtype=dtype), torch.rand(1100, generator=generator, dtype=dtype)]

    if not route_interpreter.call("support.triton_interpreter:fma_rounds_once"):
        pytest.skip("this Triton's interpreter rounds tl.fma twice (Triton < 3.9): no bit-for-bit comparison")
    running, posterior = draw(), draw()
    posterior[0][:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38])
    posterior[1][:4] = torch.tensor([float("inf"), float("nan"), 0.0, 1e38])
    for momentum, count, batches in _UPDATES:
        counter = None if batches is None else torch.tensor(batches)
        mean, variance, *_ = route_interpreter.call_in_place(
            "bkn_export.kernels.prior_moments:running_statistics_update",
            *(t.clone() for t in running), *posterior, momentum, count, counter,
        )  # fmt: skip
        expected = [t.clone() for t in running]
        alpha: float | Tensor | None = momentum
        if alpha is None:  # what the modules pass for momentum=None: 1 / num_batches_tracked as a tensor
            assert counter is not None
            alpha = counter.to(dtype).reciprocal()
        functional.update_running_statistics_(expected[0], expected[1], posterior[0], posterior[1], alpha, count)
        for actual, wanted in zip((mean, variance), expected):
            assert torch.equal(actual.isnan(), wanted.isnan()), (momentum, count, batches)
            assert torch.equal(actual.nan_to_num(0), wanted.nan_to_num(0)), (momentum, count, batches)


def test_a_coverage_table_built_in_inference_mode_is_copied_to_the_device() -> None:
    """An inference tensor has no version counter: the device copy of a table must not ask for one (it raised
    'Inference tensors do not track version counter'), and an in-place change of it must reach the copy."""
    pytest.importorskip("triton", reason="the kernels need the triton package (pip install triton)")
    from bkn_export.kernels import affine_moments

    with torch.inference_mode():
        table = torch.zeros(3)
    like = torch.empty(3, dtype=torch.float64)
    assert torch.equal(affine_moments._on_device(table, like), torch.zeros(3, dtype=torch.float64))
    with torch.inference_mode():
        table.add_(1.0)
    assert torch.equal(affine_moments._on_device(table, like), torch.ones(3, dtype=torch.float64))
    assert affine_moments._on_device(table, torch.empty(3, device="meta")).device.type == "meta"
