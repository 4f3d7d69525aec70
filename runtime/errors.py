"""Exceptions of ``runtime``, one hierarchy with ``bkn_export``'s (the CLI maps them to exit codes).

Shared with ``bkn_export`` (both raise them; through :mod:`runtime._bkn`):
:class:`BKNInputError` (bad inputs or options), :class:`ModelFileError` (a missing,
corrupt or wrong-kind ONNX file), :class:`RuntimeLoadError` (a custom-op library or plugin
is missing), :class:`PluginLibraryNotFoundError`.

Raised by ``runtime`` only: :class:`UnknownRuntimeError`, :class:`ParityMismatchError`,
:class:`RuntimeExecutionError`, :class:`RuntimeLimitationError` (a runtime's own known
limit on a valid model) and :class:`SavedDataError` (an inputs/outputs file that cannot be read).
"""

from __future__ import annotations

from runtime._bkn import BKNError, BKNInputError, ModelFileError, PluginLibraryNotFoundError, RuntimeLoadError

__all__ = [
    "BKNError",
    "BKNInputError",
    "ModelFileError",
    "NoRuntimeRanError",
    "ParityMismatchError",
    "PluginLibraryNotFoundError",
    "RuntimeExecutionError",
    "RuntimeLimitationError",
    "RuntimeLoadError",
    "SavedDataError",
    "UnknownRuntimeError",
]


class UnknownRuntimeError(BKNError, ValueError):
    """A runtime selection (``bkn parity --runtimes``) names no known runtime, or nothing at all."""

    exit_code = 2  # bad input (bkn_export.commands.exit_codes reads this)


class ParityMismatchError(BKNError, AssertionError):
    """A runtime's outputs differ from the reference beyond tolerance (``runtime.assert_parity``)."""

    exit_code = 1  # a problem with the model


class NoRuntimeRanError(ParityMismatchError):
    """None of the chosen runtimes could run the model here (all unavailable); nothing was compared. The
    ``bkn_parity`` fixture skips the test on it, with the reasons."""

    exit_code = 2  # the environment, as `bkn parity` with no runnable runtime


class RuntimeExecutionError(BKNError, RuntimeError):
    """A runtime loaded a model but failed while running it (e.g. a TensorRT enqueue error)."""

    exit_code = 1


class RuntimeLimitationError(BKNError, RuntimeError):
    """A runtime cannot run this valid model because of a known limitation of its own.

    Raised by a backend's ``load`` for a construct it is known to compute wrongly or not at
    all (the ONNX reference evaluator's grouped ConvTranspose); :func:`runtime.run_parity`
    reports that runtime unavailable for the model with this message, not as a mismatch.
    Only named limitations raise it: any other failure of a runtime stays a failure.
    """

    exit_code = 2


class SavedDataError(BKNInputError):
    """An inputs or outputs file (``.npz``, Polygraphy JSON) is missing, corrupt or does not fit the model."""

    exit_code = 2
