"""Per-channel CPU kernels in C: one call where eager PyTorch dispatches dozens of tiny operators.

A wired BKN layer's prediction and Kalman update are arithmetic on (C,)-sized tensors (moments
of an activation, the update's terms, their gradients). In eager PyTorch every one of those
formulas is 10–60 operators of ~2–4 µs each, whatever C is: at micro-batch that fixed cost is
what a train step pays over BatchNorm. The C sources beside this file (``csrc/*.c``) evaluate the
same formulas per element in one loop, in double precision, reading and writing the tensors'
dtype (float32 or float64); they are what :mod:`bkn_export.chain.fast` and
:mod:`bkn_export.cpu_kernels` call in plain eager CPU execution, each tested against the
functional reference (``tests/test_native.py``).

Build: on first use the sources are compiled with the system C compiler (``$CC``, else ``cc``)
into ``$BKN_NATIVE_CACHE`` (default ``$XDG_CACHE_HOME/bkn_export`` or ``~/.cache/bkn_export``),
named by a hash of the sources, flags and compiler; written to a temporary file and renamed
into place (atomic: a concurrent or interrupted build never leaves a half-written library), then
loaded with :mod:`ctypes`. A few seconds (5 s measured on a 2-core VM), once per machine and version.

Where there is no compiler, the build fails, or ``BKN_NATIVE=0`` is set, :func:`library`
returns None and every caller runs its PyTorch form instead: the same math, op for op the
reference (slower, never different beyond rounding). :func:`status` says which and why;
``bkn doctor``-style diagnostics and the benchmarks print it.

Calling convention (:func:`call`): ``bkn_<name>_f32`` / ``bkn_<name>_f64`` take the element
count, then pointers to contiguous tensors of one dtype (None for an absent optional input: a
NULL pointer; a kernel's constants, such as a piece table, as a float64 tensor). Callers check
dtype, device, contiguity and shapes (:func:`takes`) before calling.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import Tensor

from bkn_export.tracing import nothing_traces

__all__ = ["FLAGS", "SOURCES", "call", "disabled", "library", "parameters", "status", "takes", "untraced"]

#: The C sources of the library, compiled together.
SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.c")))
#: Compiler flags: optimised, strict IEEE (no fast-math, no contraction into FMA: results do not
#: depend on the CPU's FMA units), position-independent, C99.
FLAGS = ("-O2", "-std=c99", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")

_DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
#: Tensor types whose memory the kernels may read: plain tensors and parameters (no subclass
#: that intercepts operations: a fake or traced tensor has no data to read).
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    """A process forked while another thread held the build lock would wait on it forever."""
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)
_STATE: dict[str, object] = {}
_ENABLED: ContextVar[bool] = ContextVar("bkn_native_kernels", default=True)


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block (this thread / task), :func:`takes` is False and so are the Triton twins'
    (:func:`bkn_export.per_channel.takes`): callers run their PyTorch forms (tests and benchmarks
    compare the two)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """False within :func:`disabled`."""
    return _ENABLED.get()


def _compiler() -> list[str] | None:
    """``$CC`` (a command with arguments, e.g. ``ccache gcc``) or ``cc``, its program resolved on PATH."""
    words = shlex.split(os.environ.get("CC") or "cc")
    program = shutil.which(words[0]) if words else None
    return None if program is None else [program, *words[1:]]


def _cache_dir() -> Path:
    explicit = os.environ.get("BKN_NATIVE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bkn_export"


def _target(compiler: list[str]) -> Path:
    """The library's path in the cache: named by a hash of the sources (every file in csrc/),
    the compiler command, the flags and the platform."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "csrc").iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join((*compiler, *FLAGS, sys.platform, platform.machine())).encode())
    return _cache_dir() / f"libbkn_native-{digest.hexdigest()[:16]}.so"


def _build(compiler: list[str], target: Path) -> None:
    """Compile :data:`SOURCES` into ``target``: into a temporary file beside it, renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        command = [*compiler, *FLAGS, "-o", temporary, *map(str, SOURCES), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise OSError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[:2000]}")
        os.chmod(temporary, 0o755)  # mkstemp's 0600: other users of a shared cache could not load it
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _built_and_loaded(compiler: list[str]) -> tuple[ctypes.CDLL, Path]:
    """Load the cached library, building it first where it is missing; a cached file that does not
    load (damaged outside this module: its own writes are atomic) is rebuilt once."""
    target = _target(compiler)
    if not target.exists():
        _build(compiler, target)
        return ctypes.CDLL(str(target)), target
    try:
        return ctypes.CDLL(str(target)), target
    except OSError:
        target.unlink(missing_ok=True)
        _build(compiler, target)
        return ctypes.CDLL(str(target)), target


#: Values of ``$BKN_NATIVE`` that switch the library off (any case; anything else leaves it on).
_OFF = frozenset({"0", "false", "no", "off"})


def _load() -> None:
    setting = os.environ.get("BKN_NATIVE", "1")
    if setting.strip().lower() in _OFF:
        _STATE.update(library=None, status=f"disabled by BKN_NATIVE={setting}: PyTorch forms")
        return
    if sys.platform == "win32":
        _STATE.update(library=None, status="not built on Windows: PyTorch forms")
        return
    if not SOURCES:
        _STATE.update(library=None, status="no C sources in the installed package: PyTorch forms")
        return
    try:
        compiler = _compiler()
    except ValueError as error:  # shlex: an unbalanced quote
        _STATE.update(
            library=None, status=f"$CC={os.environ.get('CC')!r} is not a command line ({error}): PyTorch forms"
        )
        return
    if compiler is None:
        _STATE.update(library=None, status="no C compiler ($CC or cc) found: PyTorch forms")
        return
    try:
        loaded, path = _built_and_loaded(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        _STATE.update(library=None, status=f"build failed, PyTorch forms instead: {error}")
        return
    except (RuntimeError, KeyError) as error:  # Path.home(): no $HOME and no password entry (a container's uid)
        _STATE.update(
            library=None,
            status=f"no cache directory ({error}; set $BKN_NATIVE_CACHE or $XDG_CACHE_HOME): PyTorch forms",
        )
        return
    _STATE.update(library=loaded, status=f"loaded {path}")


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built and loaded on first use; None where unavailable (:func:`status`)."""
    if "status" not in _STATE:
        with _LOCK:
            if "status" not in _STATE:
                _load()
    return _STATE["library"]  # type: ignore[return-value]


def status() -> str:
    """One line: where the library was loaded from, or why the PyTorch forms run instead."""
    library()
    return str(_STATE["status"])


def untraced() -> bool:
    """Whether the kernels may read the tensors' memory in this call: nothing traces it (compile, export,
    jit trace, a dispatch mode: fake tensors, make_fx...) and no torch.func transform is active (the
    Functions that call the kernels have no vmap rule). Callers ask this before :func:`takes`, which
    Dynamo cannot trace (a ContextVar); under make_fx on real tensors a kernel's output would be traced as
    the ``empty_like`` it was written into."""
    return nothing_traces() and not torch._C._are_functorch_transforms_active()


def takes(*tensors: Tensor | None) -> bool:
    """Whether :func:`call` can take these tensors: the library is available and every given
    tensor is a contiguous float32/float64 CPU tensor of the first one's dtype and shape. The kernels
    pair elements by position, so tensors that would broadcast are refused. Plain tensors or
    parameters only, no other subclass; callers check tracing and dispatch modes."""
    first = tensors[0]
    assert first is not None
    dtype, shape = first.dtype, first.shape
    if dtype not in _DTYPE_SUFFIX or not _ENABLED.get() or library() is None:
        return False
    for tensor in tensors:
        if tensor is None:
            continue
        if (
            type(tensor) not in _PLAIN_TYPES
            or tensor.dtype != dtype
            or not tensor.is_cpu
            or tensor.shape != shape
            or not tensor.is_contiguous()
        ):
            return False
    return True


#: :func:`parameters`' tensors per tuple of values (bounded: emptied when full).
_PARAMETERS: dict[tuple[float, ...], Tensor] = {}
_PARAMETERS_SIZE = 512


def parameters(*values: float) -> Tensor:
    """A kernel's scalar constants (an eps, a count, a conv's (B, K, groups)) as the contiguous float64
    CPU tensor :func:`call` passes, built once per tuple of values and usable under any autograd or
    inference mode."""
    table = _PARAMETERS.get(values)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            table = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if len(_PARAMETERS) >= _PARAMETERS_SIZE:
            _PARAMETERS.clear()
        _PARAMETERS[values] = table
    return table


_FUNCTIONS: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}  # type: ignore[name-defined]


def call(name: str, *tensors: Tensor | None, count: int | None = None) -> None:
    """Run ``bkn_<name>_<dtype>(count, pointers...)`` on tensors that :func:`takes` accepts.

    count: the element count passed first (default: the first tensor's numel). Outputs are
    among ``tensors`` (allocated by the caller); None passes NULL."""
    first = tensors[0]
    assert first is not None
    key = (name, first.dtype)
    function = _FUNCTIONS.get(key)
    if function is None:
        loaded = library()
        assert loaded is not None, "native.call without native.takes"
        function = getattr(loaded, f"bkn_{name}_{_DTYPE_SUFFIX[first.dtype]}")
        function.restype = None
        function.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * len(tensors)
        _FUNCTIONS[key] = function
    function(first.numel() if count is None else count, *[None if t is None else t.data_ptr() for t in tensors])
