"""Checks of Triton kernels that need no GPU: compile a recorded launch for sm_90, record host reads.

Test infrastructure, not part of the shipped package; shared by ``tests/test_kernels.py`` (the op's
kernels) and ``tests/test_kernels_*_moments.py`` (the per-channel twins).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KernelRecorder", "Launch", "ScalarReads", "compile_for_hopper", "record_kernels", "resource_usage"]

#: Pointer types of the tensors the kernels take.
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
}
#: Launch keywords that are compile options, not kernel arguments.
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


#: One recorded launch: (the jit kernel, its positional arguments, its keyword arguments).
Launch = tuple[Any, tuple[Any, ...], dict[str, Any]]


class KernelRecorder:
    """Stands in for a jit kernel: ``kernel[grid](*args, **kwargs)`` appends (kernel, args, kwargs) to ``calls``
    instead of launching."""

    def __init__(self, kernel: Any, calls: list[Launch]) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid: object) -> Any:
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def record_kernels(monkeypatch: pytest.MonkeyPatch, modules: tuple[ModuleType, ...], calls: list[Launch]) -> None:
    """Replace every jit kernel of ``modules`` (the ``_*_kernel`` names) by a :class:`KernelRecorder` appending to
    ``calls`` (a kernel recorded by an earlier call in the same test is recorded once, as itself)."""
    for module in modules:
        for name, value in list(vars(module).items()):
            if name.startswith("_") and name.endswith("_kernel"):
                kernel = value.kernel if isinstance(value, KernelRecorder) else value
                monkeypatch.setattr(module, name, KernelRecorder(kernel, calls))


def compile_for_hopper(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``triton.compile`` for sm_90 with the signature and specializations a launch with these arguments
    gets: constexprs and ints equal to 1 (which Triton specializes) as constants, tensors as pointers of
    their dtype, annotated scalars (``x: tl.float64``) as annotated, other scalars as i32 / fp32. ``kwargs``
    loses its compile options (num_warps, num_stages, enable_fp_fusion)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature: dict[str, str] = {}
    constants: dict[str, Any] = {}
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    for name, value in [*zip(kernel.arg_names, args), *kwargs.items()]:
        param = kernel.params[kernel.arg_names.index(name)]
        if param.is_constexpr or (type(value) is int and value == 1):  # Triton specializes ints equal to 1
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
        elif param.annotation_type:
            signature[name] = param.annotation_type
        else:
            signature[name] = {int: "i32", float: "fp32"}[type(value)]
    source = ASTSource(kernel, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


class ScalarReads(TorchDispatchMode):
    """Records every read of a tensor value by the host (``.item()``, ``bool(t)``, ``float(t)``): on a GPU
    each would be a synchronisation."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def resource_usage(cubin: bytes) -> str | None:
    """cuobjdump -res-usage of a cubin (registers, stack, local memory), or None without Triton's cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else None
