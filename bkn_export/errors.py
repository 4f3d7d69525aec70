"""Exception classes. Messages name the layer, input or file and say what to do."""

from __future__ import annotations

__all__ = [
    "BKNError",
    "BKNInputError",
    "ChainWiringError",
    "CheckpointError",
    "DistributedError",
    "ExportError",
    "FactoryError",
    "FoldError",
    "InvalidStatisticsError",
    "KalmanOptionsError",
    "KernelError",
    "ModelFileError",
    "ParityMismatchError",
    "PluginLibraryNotFoundError",
    "RuntimeExecutionError",
    "RuntimeLoadError",
    "UnknownRuntimeError",
    "UnsupportedLayerError",
]


class BKNError(Exception):
    """Base class of every error raised by bkn_export."""


class BKNInputError(BKNError, ValueError):
    """An input tensor has the wrong rank, channel count, dtype or is empty."""


class KalmanOptionsError(BKNError, ValueError):
    """A BKN option is unknown or out of range (transition, prior weight, fallback ratio)."""


class ChainWiringError(BKNError):
    """The Kalman chain cannot be wired, or a saved wiring does not match the model."""


class CheckpointError(BKNError):
    """A checkpoint does not fit the model (unexpected or missing keys)."""


class ExportError(BKNError):
    """A model cannot be exported in the requested mode."""


class UnsupportedLayerError(ExportError):
    """A layer has no export rule."""


class InvalidStatisticsError(ExportError):
    """Running statistics are NaN/Inf or a running variance is negative."""


class FoldError(ExportError):
    """An inference export left a normalization node after an op that should have absorbed it."""


class FactoryError(BKNError, ValueError):
    """A ``pkg.module:factory`` model spec cannot be imported, called, or does not return an nn.Module."""


class ModelFileError(BKNError):
    """An ONNX file is missing, truncated, corrupt or fails ``onnx.checker``."""


class UnknownRuntimeError(BKNError, ValueError):
    """A runtime name (``bkn parity --runtimes``) matches no known runtime."""


class RuntimeLoadError(BKNError):
    """A runtime cannot load a model: a custom-op library / plugin is missing, or an op has no implementation."""


class ParityMismatchError(BKNError, AssertionError):
    """A runtime's outputs differ from the PyTorch reference beyond tolerance (``runtime.assert_parity``)."""


class DistributedError(BKNError, RuntimeError):
    """A synchronized layer cannot combine statistics: no process group, or the ranks disagree on shapes."""


class PluginLibraryNotFoundError(RuntimeLoadError, FileNotFoundError):
    """A native plugin library (e.g. the TensorRT plugin) is not where it was looked for."""


class KernelError(BKNError, RuntimeError):
    """A Triton kernel launch failed (or the interpreter process running it, in tests)."""


class RuntimeExecutionError(BKNError, RuntimeError):
    """A runtime loaded a model but failed while running it (e.g. a TensorRT enqueue error)."""
