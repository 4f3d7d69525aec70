"""The interface every runtime backend implements (one file per runtime, as Polygraphy does).

A backend is constructed cheaply (nothing heavy imported), answers ``available()``
with a reason, and only imports its runtime in ``load``. ``run`` takes and returns
numpy arrays keyed by ONNX input/output name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Availability", "Backend"]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` says why not (or what it is)."""

    ok: bool
    reason: str = ""
    applicable: bool = True  # False: not a compute backend on this machine (e.g. ORT's Azure EP)

    def __bool__(self) -> bool:
        return self.ok


class Backend(ABC):
    """One runtime configuration, e.g. ``onnxruntime[CPUExecutionProvider, ORT_ENABLE_ALL]``."""

    #: Stable, human-readable identifier used in reports and on the command line.
    name: str

    @abstractmethod
    def available(self) -> Availability:
        """Can this backend run on this machine? Must be cheap and never raise."""

    @abstractmethod
    def load(self, model_path: str) -> None:
        """Prepare to run the ONNX model at ``model_path`` (build a session / engine)."""

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; inputs and outputs keyed by ONNX value name."""

    def failure_notes(self) -> list[str]:
        """What this runtime is known to compute less accurately than float32 rounding in the loaded model, in
        words, for a report to show beside a failed comparison (none by default)."""
        return []
