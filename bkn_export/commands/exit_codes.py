"""The one exit-code rule of every ``bkn`` command, and the wrapper that applies it.

==== =====================================================================================
code meaning
==== =====================================================================================
0    success
1    the command ran and found a problem with the model: a runtime differs from PyTorch,
     returns NaN/Inf or cannot run the model; the model cannot be exported (an unsupported
     layer, non-finite weights or statistics, a failed fold guarantee or onnx.checker)
2    the command could not do its job because of its input or environment: a missing,
     corrupt or wrong-kind file, a bad option or name, an unloadable factory or checkpoint,
     a missing plugin or library, an unwritable path, a full disk
==== =====================================================================================

A failure prints one line on stderr, ``bkn <command>: <ErrorClass>: <message>``, and no
traceback; so does an argparse usage error (``OptionError``, exit 2: ``bkn_export.cli``). An
exception the rule does not know (a bug) propagates with its traceback, so that it can be
reported.

API (for every command module's ``run``)::

    from bkn_export.commands.exit_codes import run_command

    def run(args: argparse.Namespace) -> int:
        return run_command("parity", lambda: _run(args))   # _run returns 0 or 1 itself

* :func:`run_command` calls the function, returns its int, or maps an exception by
  :func:`exit_code_for` and prints :func:`error_line`. Ctrl-C gives 130.
* :func:`exit_code_for` walks the exception's class hierarchy (most specific first): a
  class attribute ``exit_code`` (1 or 2) declared on a class wins, so errors defined
  outside ``bkn_export.errors`` (e.g. ``runtime``'s own) declare their code where they are
  defined; otherwise the table :data:`EXIT_CODES` decides. ``None``: not covered by the rule.
* :data:`EXIT_OK`, :data:`EXIT_MODEL_PROBLEM`, :data:`EXIT_BAD_INPUT` name the codes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bkn_export.errors import (
    BKNInputError,
    ChainWiringError,
    CheckpointError,
    DistributedError,
    ExportError,
    FactoryError,
    KalmanOptionsError,
    KernelError,
    ModelFileError,
    OptionError,
    OutputWriteError,
    RuntimeLoadError,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CODES",
    "EXIT_INTERRUPTED",
    "EXIT_MODEL_PROBLEM",
    "EXIT_OK",
    "error_line",
    "exit_code_for",
    "run_command",
]

EXIT_OK = 0
EXIT_MODEL_PROBLEM = 1
EXIT_BAD_INPUT = 2
#: Ctrl-C, as shells report SIGINT (128 + 2).
EXIT_INTERRUPTED = 130

#: Exception class -> exit code. Looked up along the raised class's MRO, so a subclass listed
#: here (OutputWriteError) overrides a base listed here (OSError) and unlisted subclasses
#: (UnsupportedLayerError, InvalidStatisticsError, NonFiniteWeightsError, FoldError) take
#: their base's code (ExportError: 1).
EXIT_CODES: dict[type[BaseException], int] = {
    # the command ran and found a problem with the model
    ExportError: EXIT_MODEL_PROBLEM,
    # (runtime.errors' ParityMismatchError / RuntimeExecutionError declare exit_code = 1 themselves)
    # input or environment
    BKNInputError: EXIT_BAD_INPUT,
    OptionError: EXIT_BAD_INPUT,
    KalmanOptionsError: EXIT_BAD_INPUT,
    FactoryError: EXIT_BAD_INPUT,
    CheckpointError: EXIT_BAD_INPUT,
    ChainWiringError: EXIT_BAD_INPUT,  # raised while building/loading the model (factory, saved wiring)
    ModelFileError: EXIT_BAD_INPUT,
    # (runtime.errors' UnknownRuntimeError declares exit_code = 2)
    RuntimeLoadError: EXIT_BAD_INPUT,  # a custom-op library / plugin is missing
    DistributedError: EXIT_BAD_INPUT,
    KernelError: EXIT_BAD_INPUT,  # the GPU/Triton environment, not the model
    OutputWriteError: EXIT_BAD_INPUT,
    OSError: EXIT_BAD_INPUT,  # a file or device the command needed
    MemoryError: EXIT_BAD_INPUT,  # an input too large for this machine
}


def exit_code_for(error: BaseException) -> int | None:
    """The exit code for ``error`` under the rule, or None when the rule does not cover it (a bug)."""
    for cls in type(error).__mro__:
        declared = cls.__dict__.get("exit_code")
        if isinstance(declared, int):
            return declared
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return None


def error_line(command: str, error: BaseException) -> str:
    """``bkn <command>: <ErrorClass>: <message>`` on one line (newlines in the message become '; ')."""
    message = "; ".join(part.strip() for part in str(error).splitlines() if part.strip())
    if isinstance(error, MemoryError) and not message:
        message = "out of memory (an input or option asks for more memory than this machine has)"
    return f"bkn {command}: {type(error).__name__}: {message}"


def run_command(command: str, func: Callable[[], int]) -> int:
    """Run ``func`` (a command's body, returning 0 or 1) and apply the exit-code rule to what it raises."""
    try:
        return int(func())
    except KeyboardInterrupt:
        print(f"bkn {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        code = exit_code_for(error)
        if code is None:
            raise
        print(error_line(command, error), file=sys.stderr)
        return code
