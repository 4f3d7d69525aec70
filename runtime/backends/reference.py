"""``onnx.reference.ReferenceEvaluator``: ONNX's own Python implementation of the spec.

Slow but independent of every optimised runtime; it runs model-local functions (so the
training-mode ``ai.bkn::BatchKalmanNorm`` through its function body) as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.backends.base import Availability, Backend
from runtime.errors import RuntimeLimitationError, RuntimeLoadError

__all__ = ["CORRECTED_OPS", "ReferenceEvaluatorBackend", "gather_elements", "reference_limitations"]


def reference_limitations(model: Any) -> list[str]:
    """What in ``model`` (an ``onnx.ModelProto``) the reference evaluator is known to get wrong; [] when nothing.

    ``onnx.reference``'s ConvTranspose with ``group > 1`` slices the weight by output
    channels instead of input channels and adds the whole bias to every group: it crashes
    ("cannot reshape array") or returns wrong values on a valid model.
    """
    found = []
    graphs = [("graph", list(model.graph.node))] + [(f"function {f.name}", list(f.node)) for f in model.functions]
    for where, nodes in graphs:
        for node in nodes:
            if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx"):
                continue
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                found.append(
                    f"ConvTranspose node {node.name or '(unnamed)'} in the {where} has group={group}; onnx.reference "
                    "implements only group=1 (it crashes or computes wrong values); judge this model on the other "
                    "runtimes"
                )
    return found


#: The one op this backend runs by its own implementation instead of onnx.reference's, and why (shown in the
#: runtime's availability line, so every report names it).
CORRECTED_OPS = (
    "GatherElements by numpy.take_along_axis (onnx.reference's raises on a negative axis where the index and data "
    "shapes differ, and on more than 64 choices along the axis beyond 2-D)"
)


def gather_elements(data: np.ndarray, indices: np.ndarray, axis: int = 0) -> np.ndarray:
    """ONNX ``GatherElements`` as the spec states it: ``out[i][j][k] = data[indices[i][j][k]][j][k]`` for
    ``axis`` 0 (likewise along any axis), ``out`` of the indices' shape, negative indices counted from the end.
    The indices may be shorter than the data on the other axes (those elements of data are not read), not longer.
    Raises ValueError for a rank mismatch, an axis or an index out of range, or indices longer than the data."""
    rank = data.ndim
    if indices.ndim != rank or rank < 1:
        raise ValueError(f"GatherElements: data of rank {rank} and indices of rank {indices.ndim}; they must match")
    if not -rank <= axis < rank:
        raise ValueError(f"GatherElements: axis {axis} is outside [-{rank}, {rank - 1}]")
    axis %= rank
    longer = [d for d in range(rank) if d != axis and indices.shape[d] > data.shape[d]]
    if longer:
        raise ValueError(
            f"GatherElements: indices {indices.shape} are longer than data {data.shape} on axis {longer[0]}"
        )
    size = data.shape[axis]
    index = indices.astype(np.int64)
    if index.size and not ((index >= -size).all() and (index < size).all()):
        raise ValueError(f"GatherElements: an index is outside [-{size}, {size - 1}] along axis {axis}")
    read = tuple(slice(None) if d == axis else slice(0, indices.shape[d]) for d in range(rank))
    return np.take_along_axis(data[read], np.where(index < 0, index + size, index), axis=axis)


@functools.cache
def _evaluator_class() -> type:
    """``onnx.reference.ReferenceEvaluator`` running :func:`gather_elements` for GatherElements. A subclass, not
    only ``new_ops``: the evaluator builds the evaluators of model-local functions (the training file's
    BatchKalmanNorm body) and subgraphs as ``self.__class__(...)`` without the caller's ``new_ops``, so the
    corrected op reaches them only this way."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.ops.op_gather_elements import GatherElements as OnnxGatherElements

    class GatherElements(OnnxGatherElements):
        op_domain = ""

        def _run(self, data: np.ndarray, indices: np.ndarray, axis: int | None = None) -> tuple[np.ndarray]:
            return (gather_elements(data, indices, axis or 0),)

    class CorrectedReferenceEvaluator(ReferenceEvaluator):
        def __init__(self, proto: Any, new_ops: list[type] | None = None, **kwargs: Any) -> None:
            super().__init__(proto, new_ops=[*(new_ops or []), GatherElements], **kwargs)

    return CorrectedReferenceEvaluator


class ReferenceEvaluatorBackend(Backend):
    """``reference``: the ONNX reference evaluator."""

    name = "reference"

    def __init__(self) -> None:
        self._evaluator: object | None = None
        self._optional: set[str] = set()

    def available(self) -> Availability:
        try:
            import onnx
            from onnx.reference import ReferenceEvaluator  # noqa: F401
        except ImportError as error:
            return Availability(False, f"onnx.reference does not import: {error}")
        return Availability(True, f"onnx {onnx.__version__}; {CORRECTED_OPS}")

    def load(self, model_path: str) -> None:
        import onnx

        try:
            model = onnx.load(model_path)
        except Exception as error:
            raise RuntimeLoadError(f"{self.name}: cannot read {model_path}: {error}") from error
        limitations = reference_limitations(model)
        if limitations:
            raise RuntimeLimitationError(f"{self.name}: {'; '.join(limitations)}")
        # an optional-typed output comes back as [tensor] (ONNX Runtime returns the tensor itself)
        self._optional = {o.name for o in model.graph.output if o.type.HasField("optional_type")}
        try:
            self._evaluator = _evaluator_class()(model)
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
        return {
            name: np.asarray(value[0] if name in self._optional and isinstance(value, list) and value else value)
            for name, value in zip(names, values)
        }
