"""The one check of runtime inputs ("feeds") against an ONNX graph's inputs.

Used by the training-mode helper :func:`bkn_export.export.training.check_feeds` and by
``runtime`` (through its adapter, ``runtime/_bkn.py``): names, dtypes, ranks, fixed dims,
NaN/Inf and (optionally) empty inputs, each a :class:`~bkn_export.errors.BKNInputError`
naming the input and what was expected. :func:`tensor_spec` describes one graph input
or output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from bkn_export.errors import BKNInputError

__all__ = ["TensorSpec", "check_feeds", "graph_input_specs", "nonfinite_count", "tensor_spec"]


@dataclass(frozen=True)
class TensorSpec:
    """name, dtype (NumPy name; "bfloat16" for ml_dtypes' type) and shape (ints fixed, strings symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def shape_text(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"


def tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """The :class:`TensorSpec` of a graph input or output (no element type: float32)."""
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
        dtype = "bfloat16"
    elif tensor_type.elem_type:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    else:
        dtype = "float32"
    dims: list[int | str] = [
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim
    ]
    return TensorSpec(value.name, dtype, tuple(dims))


def graph_input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph's inputs in order; initializers listed as inputs (old exporters) are left out."""
    initializers = {t.name for t in model.graph.initializer}
    return [tensor_spec(v) for v in model.graph.input if v.name not in initializers]


def nonfinite_count(array: np.ndarray) -> int:
    """How many NaN/Inf elements ``array`` holds (0 for integer and bool arrays)."""
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 is not kind "f" to NumPy
        array = array.astype(np.float32)
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_feeds(
    specs: Sequence[TensorSpec] | onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, allow_empty: bool = True
) -> dict[str, np.ndarray]:
    """Check ``feeds`` against the graph inputs ``specs``; return them as arrays, in graph order.

    Raises :class:`BKNInputError` for an unknown or missing name, a wrong dtype, rank or
    fixed dim, NaN/Inf values, and with ``allow_empty=False`` an input with no elements
    (training-mode BKN needs batch statistics of at least one sample; ONNX Runtime would
    return NaN, not an error).
    """
    if isinstance(specs, onnx.ModelProto):
        specs = graph_input_specs(specs)
    expected = [s.name for s in specs]
    unknown = [name for name in feeds if name not in expected]
    if unknown:
        raise BKNInputError(f"unknown input(s) {unknown}; the model's inputs are {expected}")
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in feeds:
            raise BKNInputError(f"input {spec.name!r} is missing: expected shape {spec.shape_text()} {spec.dtype}")
        array = np.asarray(feeds[spec.name])
        if array.dtype.name != spec.dtype:
            raise BKNInputError(
                f"input {spec.name!r} has dtype {array.dtype.name}; "
                f"expected {spec.dtype} with shape {spec.shape_text()}"
            )
        wrong_rank = array.ndim != len(spec.shape)
        wrong_dim = not wrong_rank and any(isinstance(d, int) and d != a for d, a in zip(spec.shape, array.shape))
        if wrong_rank or wrong_dim:
            raise BKNInputError(
                f"input {spec.name!r} has shape {tuple(array.shape)}; expected {spec.shape_text()} "
                "(named dims may take any size)"
            )
        if not allow_empty and array.size == 0:
            raise BKNInputError(
                f"input {spec.name!r} is empty (shape {tuple(array.shape)}); training-mode BKN needs batch "
                "statistics of at least one sample"
            )
        bad = nonfinite_count(array)
        if bad:
            raise BKNInputError(f"input {spec.name!r} holds {bad} NaN/Inf value(s); give finite inputs")
        checked[spec.name] = array
    return checked
