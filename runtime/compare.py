"""Judge one runtime's output against the reference: errors, tolerances, verdict.

An element passes when ``|actual - reference| <= atol + rtol * |reference|`` (NumPy's
``allclose`` rule). An output passes when every element passes, the shapes agree and
neither side holds NaN or Inf: a non-finite value fails loudly, also in the reference,
because a NaN compares unequal to everything and would otherwise hide a broken layer.

Errors are computed in float64 whatever the dtype, so the judgement does not itself
round. Tolerances default per dtype (:data:`DEFAULT_TOLERANCES`) and can be overridden
per output name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_TOLERANCES",
    "HISTOGRAM_EDGES",
    "OutputComparison",
    "Tolerance",
    "compare_output",
    "default_tolerance",
    "nonfinite_count",
    "resolve_tolerance",
]


@dataclass(frozen=True)
class Tolerance:
    """``|a - r| <= atol + rtol * |r|`` element-wise."""

    atol: float
    rtol: float


#: Defaults by dtype name. float32: a few ulps of a unit-scale activation after a handful
#: of reductions (normalisation divides by a standard deviation, which amplifies rounding
#: of the centred input). Half types: their 10 / 7 mantissa bits.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-10, 1e-8),
    "float32": Tolerance(1e-5, 1e-4),
    "float16": Tolerance(1e-3, 1e-3),
    "bfloat16": Tolerance(1e-2, 1e-2),
}

#: Absolute-error histogram: one bin per decade from 1e-12 to 1e2; exact zeros are
#: counted in the first bin, larger errors in the last.
HISTOGRAM_EDGES: tuple[float, ...] = tuple(10.0**e for e in range(-12, 3))


def default_tolerance(dtype_name: str) -> Tolerance:
    """The default tolerance of a dtype name (``"float32"``...); integers and bools are exact."""
    return DEFAULT_TOLERANCES.get(dtype_name, Tolerance(0.0, 0.0))


def resolve_tolerance(
    output: str,
    dtype_name: str,
    atol: float | None = None,
    rtol: float | None = None,
    per_output: Mapping[str, Tolerance] | None = None,
) -> Tolerance:
    """Per-output override, else global ``atol``/``rtol`` where given, else the dtype default."""
    if per_output and output in per_output:
        return per_output[output]
    base = default_tolerance(dtype_name)
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol)


@dataclass
class OutputComparison:
    """The verdict on one output of one runtime against the reference.

    max_abs_error: max |a - r|; max_rel_error: max |a - r| / max(|r|, tiny);
    mismatch_fraction: share of elements outside the tolerance; cosine_similarity of the
    flattened tensors (1.0 for two zero tensors); histogram: counts of |a - r| per bin of
    :data:`HISTOGRAM_EDGES`. ``message`` says why it failed (empty when it passed).
    """

    output: str
    dtype: str
    shape: list[int]
    reference_shape: list[int]
    tolerance: Tolerance
    passed: bool
    max_abs_error: float = float("nan")
    max_rel_error: float = float("nan")
    mismatch_fraction: float = float("nan")
    cosine_similarity: float = float("nan")
    histogram: list[int] = field(default_factory=list)
    nonfinite_reference: int = 0
    nonfinite_actual: int = 0
    message: str = ""


def nonfinite_count(array: np.ndarray) -> int:
    """How many NaN/Inf elements ``array`` holds (0 for integer and bool arrays)."""
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _histogram(abs_error: np.ndarray) -> list[int]:
    edges = np.asarray(HISTOGRAM_EDGES)
    # bin i holds errors in [edges[i], edges[i+1]); below edges[0] (and zeros) go to bin 0
    indices = np.clip(np.searchsorted(edges, abs_error.ravel(), side="right") - 1, 0, len(edges) - 2)
    return np.bincount(indices, minlength=len(edges) - 1).astype(int).tolist()


def compare_output(
    name: str, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance, runtime: str = "runtime"
) -> OutputComparison:
    """Compare ``actual`` with ``reference`` (any shapes); never raises, the verdict says why."""
    reference = np.asarray(reference)
    actual = np.asarray(actual)
    result = OutputComparison(
        output=name,
        dtype=str(actual.dtype),
        shape=list(actual.shape),
        reference_shape=list(reference.shape),
        tolerance=tolerance,
        passed=False,
        nonfinite_reference=nonfinite_count(reference),
        nonfinite_actual=nonfinite_count(actual),
    )
    if reference.shape != actual.shape:
        result.message = f"shape {tuple(actual.shape)} differs from the reference shape {tuple(reference.shape)}"
        return result
    ref64 = reference.astype(np.float64)
    act64 = actual.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        abs_error = np.abs(act64 - ref64)
    finite = np.isfinite(abs_error)
    if ref64.size:
        finite_error = np.where(finite, abs_error, 0.0)
        result.max_abs_error = float(abs_error.max()) if not finite.all() else float(finite_error.max())
        with np.errstate(over="ignore"):  # a non-zero error over a zero reference is an infinite relative error
            result.max_rel_error = float(np.max(finite_error / np.maximum(np.abs(ref64), np.finfo(np.float64).tiny)))
        limit = tolerance.atol + tolerance.rtol * np.abs(ref64)
        outside = ~(abs_error <= limit)  # NaN errors count as outside
        result.mismatch_fraction = float(np.count_nonzero(outside) / ref64.size)
        result.histogram = _histogram(np.where(finite, abs_error, np.inf))
        norms = float(np.linalg.norm(np.where(finite, ref64, 0.0)) * np.linalg.norm(np.where(finite, act64, 0.0)))
        dot = float(np.sum(np.where(finite, ref64 * act64, 0.0)))
        result.cosine_similarity = dot / norms if norms > 0 else (1.0 if dot == 0 else float("nan"))
    else:
        result.max_abs_error = result.max_rel_error = result.mismatch_fraction = 0.0
        result.cosine_similarity = 1.0
        result.histogram = [0] * (len(HISTOGRAM_EDGES) - 1)
    if result.nonfinite_reference:
        result.message = (
            f"the PyTorch reference output {name!r} holds {result.nonfinite_reference} NaN/Inf values: "
            "the model itself is broken for these inputs (check the inputs and the checkpoint)"
        )
    elif result.nonfinite_actual:
        result.message = f"{runtime} output {name!r} holds {result.nonfinite_actual} NaN/Inf values"
    elif result.mismatch_fraction > 0:
        result.message = (
            f"{result.mismatch_fraction:.2%} of {name!r} outside atol={tolerance.atol:g} rtol={tolerance.rtol:g} "
            f"(max abs error {result.max_abs_error:.3g})"
        )
    else:
        result.passed = True
    return result
