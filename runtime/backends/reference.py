"""``onnx.reference.ReferenceEvaluator``: ONNX's own Python implementation of the spec.

Slow but independent of every optimised runtime; it runs model-local functions (so the
training-mode ``ai.bkn::BatchKalmanNorm`` through its function body) as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtime.backends.base import Availability, Backend
from runtime.errors import RuntimeLoadError

__all__ = ["ReferenceEvaluatorBackend"]


class ReferenceEvaluatorBackend(Backend):
    """``reference``: the ONNX reference evaluator."""

    name = "reference"

    def __init__(self) -> None:
        self._evaluator: object | None = None

    def available(self) -> Availability:
        try:
            import onnx
            from onnx.reference import ReferenceEvaluator  # noqa: F401
        except ImportError as error:
            return Availability(False, f"onnx.reference does not import: {error}")
        return Availability(True, f"onnx {onnx.__version__}")

    def load(self, model_path: str) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            self._evaluator = ReferenceEvaluator(onnx.load(model_path))
        except Exception as error:
            raise RuntimeLoadError(
                f"{self.name}: the ONNX reference evaluator cannot load {model_path}: {error}"
            ) from error

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._evaluator is None:
            raise RuntimeError(f"{self.name}: call load() before run()")
        evaluator = self._evaluator
        names = list(evaluator.output_names)  # type: ignore[attr-defined]
        values = evaluator.run(None, dict(inputs))  # type: ignore[attr-defined]
        return dict(zip(names, (np.asarray(v) for v in values)))
