"""Run the Triton launchers under ``TRITON_INTERPRET=1`` in a child process, on CPU tensors.

Why a child process: ``@triton.jit`` decides when a kernel module is *imported*
whether it builds a compiled kernel or an interpreted one (it reads
``TRITON_INTERPRET`` at decoration time). One process can hold only one kind, and
flipping the variable inside the test process would depend on import order and turn
the real CUDA kernels of the same session (the ``gpu`` tests on a GPU machine) into
interpreted ones. So :class:`InterpreterProcess` runs this file as a script with the
variable set in its environment from the first instruction, checks there that the
kernels really are interpreted, and calls the launchers over a pipe. The calling
process never imports Triton for this.

Test infrastructure, not part of the shipped package: the child patches one Triton
interpreter internal (:func:`_patch_scalar_index`).

Protocol: each message is an 8-byte little-endian length and a ``torch.save``
payload (loaded with ``weights_only=True``): request ``(launcher name, args, kwargs)``, reply
``("ok", result)`` or ``("error", exception class name, message, traceback)``. The
child's stdout is redirected to stderr so that stray prints cannot corrupt replies.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from typing import IO, Any

import torch

from bkn_export import errors

__all__ = ["InterpreterProcess"]

_HEADER = struct.Struct("<Q")


def _send(stream: IO[bytes], payload: Any) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    return torch.load(io.BytesIO(stream.read(length)), weights_only=True)


class InterpreterProcess:
    """A child Python process that runs the launchers under the Triton interpreter.

    Use as a context manager; :meth:`call` takes CPU tensors and returns CPU tensors.
    Errors from ``bkn_export.errors`` raised in the child are raised again with the
    same class; anything else raises :class:`bkn_export.errors.KernelError`.
    """

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **(env or {}), "TRITON_INTERPRET": "1"}
        self._process = subprocess.Popen(
            [python, os.path.abspath(__file__)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )

    def call(self, launcher: str, *args: Any, **kwargs: Any) -> Any:
        """Run a launcher in the child and return its result: "forward" or "backward" (``bkn_export.kernels``),
        or any function named "module:attribute" (imported in the child under the interpreter)."""
        return self._request(launcher, args, kwargs, False)

    def call_in_place(self, launcher: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Run a launcher that writes into some of its arguments (the ``native.call`` convention: outputs
        allocated by the caller) and return the positional arguments as they are after the call."""
        return self._request(launcher, args, kwargs, True)  # type: ignore[no-any-return]

    def _request(self, launcher: str, args: tuple[Any, ...], kwargs: dict[str, Any], in_place: bool) -> Any:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        _send(stdin, (launcher, args, kwargs, in_place))
        reply = _receive(stdout)
        if reply is None:
            raise errors.KernelError(
                f"Triton interpreter process exited with code {self._process.poll()} while running "
                f"'{launcher}'; see its stderr above"
            )
        if reply[0] == "ok":
            return reply[1]
        _, name, message, trace = reply
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, errors.BKNError):
            raise cls(message)
        raise errors.KernelError(f"Triton launcher '{launcher}' failed under TRITON_INTERPRET=1:\n{trace}")

    def close(self) -> None:
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> InterpreterProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _patch_scalar_index() -> None:
    """Make ``range(<scalar kernel argument>)`` work in Triton 3.6's interpreter with NumPy ≥ 2.4.

    The interpreter holds a scalar argument as a NumPy array of shape (1,) and Triton ≤ 3.6
    converts it with ``int(array)``, which NumPy 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars"); Triton 3.9 squeezes first. We re-patch
    ``tensor.__index__`` the 3.9 way after Triton's own patching, so the interpreted
    kernels run on both (the compiled kernels are untouched).
    """
    from triton.runtime import interpreter as triton_interpreter

    patch_tensor = getattr(triton_interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patch_with_scalar_index(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    triton_interpreter._patch_lang_tensor = patch_with_scalar_index


def _serve() -> None:
    """Child side: answer requests until stdin closes."""
    import traceback

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed from here on goes to stderr
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("tests/support/triton_interpreter.py must run with TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    _patch_scalar_index()

    from bkn_export.kernels import backward, forward

    if not isinstance(forward._normalize_kernel, InterpretedFunction):
        raise SystemExit("bkn_export.kernels were imported before TRITON_INTERPRET=1 took effect")
    launchers = {"forward": forward.batch_kalman_norm_forward, "backward": backward.batch_kalman_norm_backward}
    requests = sys.stdin.buffer
    while (request := _receive(requests)) is not None:
        name, args, kwargs, in_place = request
        try:
            launcher: Any = launchers[name] if name in launchers else _resolve(name)
            result = launcher(*args, **kwargs)
            reply: tuple[Any, ...] = ("ok", tuple(args) if in_place else result)
        except Exception as error:
            reply = ("error", type(error).__name__, str(error), traceback.format_exc())
        _send(replies, reply)


def fma_rounds_once() -> bool:
    """Child side (``call("support.triton_interpreter:fma_rounds_once")``): whether this Triton's interpreter
    computes ``tl.fma`` with one rounding, as the GPU does. Triton 3.9's does (``fma_fp32``/``fma_fp64`` in its
    native interpreter module); 3.6 (torch 2.11's) and 3.2 (torch 2.6's) multiply, then add: two roundings."""
    from triton._C import libtriton

    return hasattr(getattr(libtriton, "interpreter", None), "fma_fp32")


def _resolve(name: str) -> Any:
    """The function "module:attribute", imported here (so its kernels are interpreted ones)."""
    import importlib

    module_name, _, attribute = name.partition(":")
    if not module_name.startswith(("bkn_export.", "support.", "benchmarks.")) or not attribute:
        raise ValueError(f"launcher {name!r}: expected '<bkn_export|support|benchmarks>.<module>:<function>'")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (tests, os.path.dirname(tests)):  # support.<module> of the test suite, benchmarks.<module>
        if folder not in sys.path:
            sys.path.insert(0, folder)
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


if __name__ == "__main__":
    _serve()
