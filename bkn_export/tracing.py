"""Whether anything records the current call instead of running it on real memory.

The eager fast paths (the C kernels of :mod:`bkn_export.native`, the Triton one-node step, the cached constants of
:mod:`bkn_export.moments`, the CPU op route) bypass the PyTorch operators that a tracer would record; each asks
:func:`nothing_traces` first and falls back to those operators, so that a graph captured by torch.compile,
torch.export, ``torch.jit.trace`` or a dispatch mode (fake tensors, make_fx, FlopCounterMode) computes what eager
mode does.
"""

from __future__ import annotations

import torch

# Private API: the innermost active TorchDispatchMode (FakeTensorMode, make_fx's proxy mode,
# a FlopCounterMode...), which the eager fast paths must not bypass; torch has no public
# equivalent. Tested with torch 2.13 (this repository's CPU machine); torch 2.11 (the GPU
# machine's) has it too: it exists since torch 2.0.
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["nothing_traces"]


def nothing_traces() -> bool:
    """True when no compile, export, jit trace or dispatch mode records this call (checked in that order:
    under dynamo the first answers and the private dispatch-mode query is never traced)."""
    return (
        not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
    )
