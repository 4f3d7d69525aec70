"""Exception classes. Messages name the layer, input or file and say what to do.

The parity checker's own errors (UnknownRuntimeError, ParityMismatchError,
RuntimeExecutionError) live in ``runtime.errors``; the ones both packages raise stay here.
"""

from __future__ import annotations

__all__ = [
    "BKNError",
    "BKNInputError",
    "ChainWiringError",
    "CheckpointError",
    "ConversionError",
    "DistributedError",
    "ExportError",
    "FactoryError",
    "FoldError",
    "InvalidStatisticsError",
    "KalmanOptionsError",
    "KernelError",
    "ModelFileError",
    "NonFiniteWeightsError",
    "OptionError",
    "OutputWriteError",
    "PluginLibraryNotFoundError",
    "RecomputationError",
    "RuntimeLoadError",
    "StaticShapeNeededError",
    "UnsupportedLayerError",
    "UnsupportedTransformError",
]


class BKNError(Exception):
    """Base class of every error raised by bkn_export."""


class BKNInputError(BKNError, ValueError):
    """An input tensor has the wrong rank, channel count, dtype or is empty."""


class KalmanOptionsError(BKNError, ValueError):
    """A BKN option is unknown or out of range (transition, prior weight, fallback ratio)."""


class ChainWiringError(BKNError):
    """The Kalman chain cannot be wired, or a saved wiring does not match the model."""


class RecomputationError(BKNError, RuntimeError):
    """A BKN layer is recomputed (activation checkpointing) without the chain its prior comes from."""


class UnsupportedTransformError(BKNError, RuntimeError):
    """A BKN layer's train-mode step runs under a torch.func transform (grad, vmap, jacrev...): not supported."""


class CheckpointError(BKNError):
    """A checkpoint does not fit the model (unexpected or missing keys)."""


class ConversionError(BKNError):
    """``convert_batchnorm`` would change what a module or the model computes; the model is left as it was."""


class ExportError(BKNError):
    """A model cannot be exported in the requested mode."""


class UnsupportedLayerError(ExportError):
    """A layer has no export rule."""


class InvalidStatisticsError(ExportError):
    """Running statistics are NaN/Inf or a running variance is negative."""


class NonFiniteWeightsError(ExportError):
    """A Conv/ConvTranspose/Linear weight or bias holds NaN/Inf: the exported model would compute garbage."""


class FoldError(ExportError):
    """An inference export left a normalization node after an op that should have absorbed it."""


class FactoryError(BKNError, ValueError):
    """A ``pkg.module:factory`` model spec cannot be imported, called, or does not return an nn.Module."""


class ModelFileError(BKNError):
    """An ONNX file is missing, truncated, corrupt or fails ``onnx.checker``."""


class RuntimeLoadError(BKNError):
    """A runtime cannot load a model: a custom-op library / plugin is missing, or an op has no implementation."""


class DistributedError(BKNError, RuntimeError):
    """A synchronized layer cannot combine statistics: no process group, or the ranks disagree on shapes."""


class PluginLibraryNotFoundError(RuntimeLoadError, FileNotFoundError):
    """A native plugin library (e.g. the TensorRT plugin) is not where it was looked for."""


class KernelError(BKNError, RuntimeError):
    """A Triton kernel launch failed (or the interpreter process running it, in tests)."""


class OptionError(BKNError, ValueError):
    """An option is invalid: a non-integer opset, a negative threshold, an unknown input or output name."""


class StaticShapeNeededError(ExportError, OptionError):
    """The model exports, but not with the dynamic batch (or spatial size) asked for: an input whose first axis is not
    the batch (a graph's edge indices), an operator attribute that follows the batch (CondConv's groups). Exit 2, as
    for an option the model cannot take (``--static-batch`` is the remedy); an ExportError and an OptionError for
    API callers."""

    exit_code = 2


class OutputWriteError(BKNError, OSError):
    """A file cannot be written: its directory is missing or read-only, a directory is in the way, the disk is full.

    Raised by :mod:`bkn_export.atomic`; the file at the path is left as it was (no partial file).
    """
