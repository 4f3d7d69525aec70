"""Exception classes. Messages name the layer, input or file and say what to do."""

from __future__ import annotations

__all__ = [
    "BKNError",
    "BKNInputError",
    "ChainWiringError",
    "CheckpointError",
    "ExportError",
    "UnsupportedLayerError",
    "InvalidStatisticsError",
]


class BKNError(Exception):
    """Base class of every error raised by bkn_export."""


class BKNInputError(BKNError, ValueError):
    """An input tensor has the wrong rank, channel count, dtype or is empty."""


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
