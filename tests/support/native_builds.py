"""One C source of :mod:`bkn_export.native` compiled alone, for the tests that check every vector build of a kernel
returns the library's bits (GCC's ``target_clones`` picks one build at load time; these tests run each one that this
CPU can)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from bkn_export import native

#: The vector builds are GCC's, on x86-64 Linux.
x86_64_linux = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="the vector builds: x86-64 Linux"
)

#: A source's builds, each alone (its ``*_BUILDS`` macro given on the command line), where this CPU runs them:
#: SSE2 (the default), AVX2, AVX-512.
TARGET_ATTRIBUTES = {
    "default": "",
    "avx2": '__attribute__((target("avx2")))',
    "avx512f": '__attribute__((target("avx512f")))',
}


def cpu_flags() -> set[str]:
    """The flags of this CPU in ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def runnable_builds() -> dict[str, str]:
    """:data:`TARGET_ATTRIBUTES` of the builds this CPU runs."""
    flags = cpu_flags()
    return {name: attribute for name, attribute in TARGET_ATTRIBUTES.items() if name == "default" or name in flags}


def require_gcc() -> list[str]:
    """The library's compiler command; skips the test where it is not GCC (the builds are ``target_clones``)."""
    compiler = native._compiler()
    assert compiler is not None
    macros = subprocess.run([*compiler, "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True).stdout
    if "__GNUC__" not in macros or "__clang__" in macros:
        pytest.skip("the builds are GCC's target_clones")
    return compiler


def compile_alone(source: str, define: str, target: Path) -> ctypes.CDLL:
    """``csrc/<source>`` alone with the library's flags and ``-D<define>``, loaded from ``target``."""
    compiler = native._compiler()
    assert compiler is not None
    csrc = native.SOURCES[0].parent
    command = [*compiler, *native.FLAGS, f"-D{define}", f"-I{csrc}", "-o", str(target), str(csrc / source), "-lm"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(target))


def call(library: ctypes.CDLL | None, name: str, count: int, *tensors: Tensor | None) -> None:
    """``bkn_<name>_<dtype>`` of ``library`` (None: the package's, through :func:`bkn_export.native.call`)."""
    first = tensors[0]
    assert first is not None
    if library is None:
        native.call(name, *tensors, count=count)
        return
    function = getattr(library, f"bkn_{name}_{'f32' if first.dtype == torch.float32 else 'f64'}")
    function.restype = None
    function.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * len(tensors)
    function(count, *[None if t is None else t.data_ptr() for t in tensors])
