"""The CUDA route of a whole train step, run without a GPU: the Triton kernels in Triton's interpreter.

A child process started with ``TRITON_INTERPRET=1 BKN_TRITON_ON_CPU=1``
(:data:`bkn_export.kernels.TRITON_ON_CPU`) sends CPU tensors where CUDA tensors go: the op's Triton
launchers and the prediction's Triton twins (:mod:`bkn_export.per_channel`). It runs one train step
of a converted network whose wired layers cover every fused prediction kind
(``tests/support/triton_steps.py``); this process runs the same step on the CPU route (the C kernels
of :mod:`bkn_export.native`, or the PyTorch forms where the library is not built) and on the PyTorch
forms, and the outputs, every parameter gradient and every running statistic are compared.

Tolerances, relative to each tensor's largest entry (at least 1e-3, for gradients that are 0 in exact
arithmetic, such as a bias before a normalization):

* float64: 1e-10. The op has no float64 Triton kernels (the functional reference runs it on both
  sides); the twins compute in float64 like the C kernels, summing in another order (~1e-15 seen).
* float32 (inputs drawn in float64 and rounded, so that both steps see the same values): the Triton
  route's error against the float64 step may be at most 4× the CPU route's own float32 error, plus
  1e-6: both compute in float32 in different orders (the op's kernels reduce in tiles; their running
  mean is off by ~1e-6 where the CPU op's is off by ~4e-8), so neither is closer to the float64 truth
  by more than rounding.

The child also reports which twins it called: every kind must have run on the Triton route (and
none on the PyTorch-forms step), so that a comparison cannot pass by both sides taking one route.
"""

from __future__ import annotations

import pytest
import torch
from support import triton_steps
from support.triton_interpreter import InterpreterProcess
from support.triton_steps import tensors_of
from torch import Tensor

#: Every twin the step of triton_steps._Net calls (forward and backward).
_EXPECTED_TWINS = {
    "relu_moments", "relu_moments_backward", "piecewise_moments", "piecewise_moments_backward",
    "gauss_hermite_moments", "gauss_hermite_moments_backward", "gate_product", "gate_product_backward",
    "affine_moments", "affine_moments_backward", "prior_assembly", "prior_assembly_backward",
    "running_statistics_update", "path_moments", "path_moments_backward",
}  # fmt: skip
# (Every source's output variance is the first stage of a fused path head here: its own twin does not run.)


#: The smallest scale of a relative error (the step's gradients and statistics are of order 0.01-10).
_SCALE_FLOOR = 1e-3


def _relative_error(actual: Tensor, exact: Tensor) -> float:
    """max |actual - exact| over max(max |exact|, 1e-3): the floor for gradients that are 0 in exact
    arithmetic and rounding noise in practice (a conv or Linear bias before a normalization)."""
    if not actual.numel():
        return 0.0
    scale = max(exact.abs().max().item(), _SCALE_FLOOR)
    return (actual.double() - exact.double()).abs().max().item() / scale


def test_the_child_runs_every_twin_and_this_process_none(route_interpreter: InterpreterProcess) -> None:
    child = route_interpreter.call("support.triton_steps:train_step", "float64")
    assert child["triton_route"] == {"cpu": 1}
    assert set(child["launches"]) == _EXPECTED_TWINS, "a twin did not run (or an unexpected one did)"
    here = triton_steps.train_step("float64")
    assert here["triton_route"] == {"cpu": 0} and here["launches"] == {}
    forms = route_interpreter.call("support.triton_steps:train_step", "float64", 0, "pytorch")
    assert forms["launches"] == {}, "native.disabled() must switch the twins off too"


def test_float64_step_matches_the_cpu_route(route_interpreter: InterpreterProcess) -> None:
    child = tensors_of(route_interpreter.call("support.triton_steps:train_step", "float64", 1))
    here = tensors_of(triton_steps.train_step("float64", 1))
    forms = tensors_of(triton_steps.train_step("float64", 1, "pytorch"))
    assert child.keys() == here.keys() == forms.keys()
    assert len([k for k in child if k.startswith("grad.")]) >= 20
    for name in child:
        assert _relative_error(child[name], here[name]) <= 1e-10, name
        assert _relative_error(child[name], forms[name]) <= 1e-10, name


def test_float32_step_is_as_accurate_as_the_cpu_route(route_interpreter: InterpreterProcess) -> None:
    child = tensors_of(route_interpreter.call("support.triton_steps:train_step", "float32", 2))
    here = tensors_of(triton_steps.train_step("float32", 2))
    exact = tensors_of(triton_steps.train_step("float64", 2))
    for name in child:
        own = _relative_error(here[name], exact[name])
        assert _relative_error(child[name], exact[name]) <= 4 * own + 1e-6, (name, own)


@pytest.mark.parametrize("checkpointing", ["segments", "whole", "unpack-once"])
def test_a_checkpointed_step_is_the_plain_step(route_interpreter: InterpreterProcess, checkpointing: str) -> None:
    """Activation checkpointing on both routes (bkn_export.checkpoint on segments, torch's on the whole wired
    model, and saved tensors that unpack once as a checkpoint's do): the plain step's output, gradients and
    (but for the whole model, recomputed with its running statistics as nn.BatchNorm is) statistics, bit for bit."""
    for run in (route_interpreter.call, _here):
        plain = tensors_of(run("support.triton_steps:train_step", "float32", 3))
        checkpointed = tensors_of(run("support.triton_steps:train_step", "float32", 3, "kernels", "cpu", checkpointing))
        assert plain.keys() == checkpointed.keys()
        for name in plain:
            if checkpointing == "whole" and name.startswith("buffer."):
                continue
            assert torch.equal(plain[name], checkpointed[name]), (run, name)


def _here(target: str, *args: object) -> dict[str, object]:
    assert target == "support.triton_steps:train_step"
    return triton_steps.train_step(*args)  # type: ignore[arg-type, return-value]


def test_running_statistics_with_cumulative_momentum(route_interpreter: InterpreterProcess) -> None:
    """momentum=None: the Triton update reads num_batches_tracked on the device (two steps)."""
    child = route_interpreter.call("support.triton_steps:cumulative_running_statistics", "float64")
    here = triton_steps.cumulative_running_statistics("float64")
    assert child.keys() == here.keys() and len(child) >= 8
    for name in child:
        torch.testing.assert_close(child[name], here[name], rtol=1e-12, atol=1e-14, msg=name)


#: Launches the two converted layers of each probe add to BatchNorm's train step on the CUDA route (forward,
#: backward), as counted by benchmarks/count_launches.py (benchmarks/RESULTS.md): pinned as upper bounds. The first
#: layer (first in its chain) launches as many as its BatchNorm (2 / 1: the op, the running statistics with the
#: batch count / the op's backward), so the wired layer of a fused-head probe launches 2 + 1 = 3 forward and
#: 1 + 3 = 4 backward: issue 18's goal of at most 4 each way.
#: (The max-pool and resampling probes' heads are not fused: their steps run as separate twins.)
LAUNCH_BOUND = {
    "relu_conv3x3": (1, 3),
    "hardswish_dw": (1, 3),
    "silu_conv1x1": (1, 3),
    "relu_maxpool_conv3x3": (8, 12),
    "relu_upsample_conv3x3": (23, 33),
}


@pytest.mark.parametrize("probe", sorted(LAUNCH_BOUND))
def test_a_wired_layer_launches_a_bounded_number_of_kernels(route_interpreter: InterpreterProcess, probe: str) -> None:
    """Issue 18.2's CPU proxy for the GPU launch count: the CUDA route run in the interpreter, every Triton
    launch and every ATen operator that launches a kernel counted; the twins cut the PyTorch forms' count."""
    pytest.importorskip("benchmarks.count_launches")
    base = route_interpreter.call("support.triton_steps:launches", probe, "bn")
    twins = route_interpreter.call("support.triton_steps:launches", probe, "bkn")
    forms = route_interpreter.call("support.triton_steps:launches", probe, "bkn_pytorch_forms")
    added = (twins["forward"] - base["forward"], twins["backward"] - base["backward"])
    assert 0 < added[0] <= LAUNCH_BOUND[probe][0] and 0 < added[1] <= LAUNCH_BOUND[probe][1], added
    assert twins["forward"] < forms["forward"] and twins["backward"] < forms["backward"]


@pytest.mark.gpu
def test_cuda_step_takes_the_twins_and_matches_the_cpu_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: the same step on CUDA runs every twin (compiled, not interpreted) and is as accurate
    as the CPU route (float32 against the float64 CPU step; float64 to 1e-10). TF32 off: the convs
    must compute in float32 like the CPU's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible to torch on this machine")
    pytest.importorskip("triton", reason="the kernels need the triton package")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    step = triton_steps.train_step("float64", 4, device="cuda")
    assert step["triton_route"] == {"cuda": 1}
    assert set(step["launches"]) == _EXPECTED_TWINS
    exact = tensors_of(triton_steps.train_step("float64", 4))
    for name, value in tensors_of(step).items():
        assert _relative_error(value, exact[name]) <= 1e-10, name
    single = tensors_of(triton_steps.train_step("float32", 4, device="cuda"))
    here = tensors_of(triton_steps.train_step("float32", 4))
    for name, value in single.items():
        own = _relative_error(here[name], exact[name])
        assert _relative_error(value, exact[name]) <= 4 * own + 1e-6, (name, own)
