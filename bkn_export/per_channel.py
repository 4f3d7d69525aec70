"""Where the per-channel kernels of the fused eager forms run: C on CPU, Triton on CUDA.

The fused prediction and prior Functions (:mod:`bkn_export.chain.fast`, :mod:`bkn_export.fast_prior`)
evaluate their per-channel formulas in one kernel call per direction where a kernel takes the
tensors, else as PyTorch operators (on a GPU each of those is a kernel launch: 10-60 per formula).
A kernel is named by its C name (``"relu_moments"``, ``"affine_moments_backward"``, ...) and called
with the C kernel's arguments: outputs allocated by the caller, None for NULL, small float64
parameter tensors (:func:`parameters`) on the CPU whatever the data's device.

* CPU tensors: the C kernels of :mod:`bkn_export.native` (``docs/native.md``).
* CUDA tensors: their Triton twins (:func:`bkn_export.kernels.moment_launchers`; the launches per
  call are in each module's ``LAUNCHES``), where Triton imports and ``BKN_DISABLE_TRITON`` is not "1".
  They read no tensor value on the host, so a train step that runs them can be captured in a CUDA graph.
* Testing without a GPU: with ``TRITON_INTERPRET=1`` and ``BKN_TRITON_ON_CPU=1`` set at import
  (:data:`bkn_export.kernels.TRITON_ON_CPU`), CPU tensors take the Triton twins instead, run by Triton's
  interpreter (slow: for tests and for counting the CUDA path's launches on a machine without a GPU,
  ``benchmarks/count_launches.py``).

Callers ask :func:`bkn_export.native.untraced` first (nothing traces the call): under tracing the
PyTorch forms run, so that graphs keep plain operators.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bkn_export import kernels, native

__all__ = ["call", "parameters", "takes", "triton_route", "update_running_statistics_"]

parameters = native.parameters


#: Whether tensors on a tensor's device go to the Triton twins (CUDA; the CPU only under the interpreter
#: switch in the module docstring) rather than the C kernels.
triton_route = kernels.triton_device


def takes(*tensors: Tensor | None, kernel: str) -> bool:
    """Whether :func:`call` can run ``kernel`` on these tensors: every given tensor a contiguous
    float32/float64 plain tensor or parameter of the first one's dtype, shape and device, and the
    kernel available there (the C library built; Triton importable, not disabled), outside
    :func:`bkn_export.native.disabled` (which turns both off)."""
    first = tensors[0]
    assert first is not None
    if triton_route(first):
        return native.enabled() and kernels.moment_kernels_take(kernel, *tensors)
    return native.takes(*tensors)


def call(name: str, *tensors: Tensor | None, count: int | None = None) -> None:
    """Run kernel ``name`` on tensors that :func:`takes` accepted (see :func:`bkn_export.native.call`
    for ``count``); the data's device picks C or Triton."""
    first = tensors[0]
    assert first is not None
    if triton_route(first):
        launchers = kernels.moment_launchers()
        assert launchers is not None, "per_channel.call without per_channel.takes"
        with kernels.launching_on(first):
            launchers[name](*tensors, count=count)
        return
    native.call(name, *tensors, count=count)


def update_running_statistics_(
    running_mean: Tensor,
    running_variance: Tensor,
    posterior_mean: Tensor,
    posterior_variance: Tensor,
    momentum: float | None,
    count: int,
    num_batches_tracked: Tensor | None,
    count_batch: bool = False,
) -> bool:
    """:func:`bkn_export.functional.update_running_statistics_` as one Triton launch on the Triton
    route (instead of three operators), where it takes the tensors; False (nothing done) elsewhere.

    momentum: α, or None for the cumulative average 1 / ``num_batches_tracked`` (the kernel reads the
    counter on the device, after the caller counted this batch). count_batch (a number momentum only):
    the launch also adds 1 to ``num_batches_tracked``; where this returns False nothing was counted. All
    (C,) of one dtype and device."""
    # untraced() first: Dynamo cannot trace enabled()'s ContextVar (a fullgraph compile would fail).
    if not (triton_route(running_mean) and native.untraced() and native.enabled()):
        return False
    mean, variance = posterior_mean.detach(), posterior_variance.detach()
    kernel = "running_statistics_update"
    if not kernels.moment_kernels_take(kernel, running_mean, running_variance, mean, variance):
        return False
    needs_counter = momentum is None or count_batch
    if needs_counter and (num_batches_tracked is None or num_batches_tracked.device != running_mean.device):
        return False
    launchers = kernels.moment_launchers()
    assert launchers is not None
    with kernels.launching_on(running_mean):
        statistics = (running_mean, running_variance, mean, variance)
        launchers[kernel](*statistics, momentum, count, num_batches_tracked, count_batch=count_batch)
    # The kernel writes through the pointers: count the change as torch's in-place operators do, so that a graph
    # that saved a buffer before this update refuses its backward instead of reading the new values.
    written = (running_mean, running_variance, num_batches_tracked) if count_batch else (running_mean, running_variance)
    for buffer in written:  # one at a time: torch 2.6 takes no list
        assert buffer is not None
        torch.autograd.graph.increment_version(buffer)
    return True
