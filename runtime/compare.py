"""Judge one runtime's output against the reference: errors, tolerances, verdict.

Criteria (:class:`Criteria`, one per run, the same for every output):

* ``elementwise`` (default): an element passes when ``|a - r| <= atol + rtol * |r|``
  (NumPy's ``allclose`` rule); the output passes when the share of failing elements is at
  most ``max_mismatch`` (0 by default: every element). Note: Polygraphy's ``elemwise``
  fails an element when it exceeds *both* atol and rtol·|r| (it passes up to
  ``max(atol, rtol·|r|)``), so at equal tolerances this rule is looser by at most 2x.
* ``max`` / ``mean`` / ``median`` / ``quantile``: Polygraphy's semantics: the output
  passes when ``stat(|a - r|) <= atol`` or ``stat(|a - r| / |r|) <= rtol``, with exact
  zeros of r replaced by 2.22e-16 in the relative error (as Polygraphy does); quantile
  is NumPy's linear-interpolation quantile at ``error_quantile``.
* ``cosine_min``: additionally, the cosine similarity of the flattened tensors must be at
  least this.

Whatever the criterion, an output fails when the shapes differ or either side holds NaN
or Inf: a non-finite value fails loudly, also in the reference, because a NaN compares
unequal to everything and would otherwise hide a broken layer. ``equal_nan`` (off by
default; ``bkn parity --equal-nan``) is the opt-in for a model whose expected output holds
them (a masked attention row, ``log(0)``): then a NaN matches a NaN at the same position,
+Inf a +Inf and -Inf a -Inf (NumPy's ``isclose(equal_nan=True)`` / ``torch.testing.assert_close``:
same-signed infinities are equal there in any case), a NaN or Inf on one side only still
fails, and every error statistic covers the other elements only.

Errors are computed in float64 whatever the dtype, so the judgement does not itself
round. Tolerances default per dtype (:data:`DEFAULT_TOLERANCES`) and can be overridden
per output name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from runtime._bkn import nonfinite_count

__all__ = [
    "DEFAULT_TOLERANCES",
    "ERROR_STATS",
    "FLOAT_PRECISION",
    "HISTOGRAM_EDGES",
    "Criteria",
    "OutputComparison",
    "Tolerance",
    "TolerancePolicy",
    "compare_output",
    "default_tolerance",
    "nonfinite_count",
    "resolve_tolerance",
]

#: The error statistics a run can judge by (``elemwise``, Polygraphy's spelling, is accepted).
ERROR_STATS = ("elementwise", "max", "mean", "median", "quantile")
#: What Polygraphy adds to zero reference values before dividing (``compare.py``).
_RELATIVE_EPSILON = 2.220446049250313e-16


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

#: Significand bits per float dtype name: what "narrower" means (:mod:`runtime.precision`).
FLOAT_PRECISION: Mapping[str, int] = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}

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


@dataclass(frozen=True)
class Criteria:
    """How an output is judged (see the module docstring); validated on construction."""

    error_stat: str = "elementwise"
    error_quantile: float = 0.99
    cosine_min: float | None = None
    max_mismatch: float = 0.0
    #: A NaN / ±Inf in the reference matches the same value at the same position (module docstring).
    equal_nan: bool = False

    def __post_init__(self) -> None:
        from runtime.errors import BKNInputError

        if self.error_stat == "elemwise":
            object.__setattr__(self, "error_stat", "elementwise")
        if self.error_stat not in ERROR_STATS:
            raise BKNInputError(f"check_error_stat must be one of {', '.join(ERROR_STATS)}; got {self.error_stat!r}")
        if not 0.0 <= self.error_quantile <= 1.0:
            raise BKNInputError(f"error_quantile must be in [0, 1]; got {self.error_quantile}")
        if not 0.0 <= self.max_mismatch <= 1.0:
            raise BKNInputError(f"max_mismatch is a fraction in [0, 1]; got {self.max_mismatch}")
        if self.cosine_min is not None and not -1.0 <= self.cosine_min <= 1.0:
            raise BKNInputError(f"cosine_min must be in [-1, 1]; got {self.cosine_min}")

    def describe(self) -> str:
        """e.g. ``elementwise, max mismatch 0`` or ``quantile 0.99 (abs ≤ atol or rel ≤ rtol)``."""
        if self.error_stat == "elementwise":
            text = f"elementwise |a-r| <= atol + rtol*|r|, max mismatch {self.max_mismatch:g}"
        else:
            stat = f"quantile {self.error_quantile:g}" if self.error_stat == "quantile" else self.error_stat
            text = f"{stat} error: abs <= atol or rel <= rtol (Polygraphy's rule)"
        if self.cosine_min is not None:
            text += f"; cosine >= {self.cosine_min:g}"
        if self.equal_nan:
            text += "; equal NaN/Inf at the same position (statistics over the other elements)"
        return text


@dataclass(frozen=True)
class TolerancePolicy:
    """The run's tolerances and criteria, built once: per-output override, else global, else the dtype default.

    The dtype is the ONNX output's (the runtime's), so a float16 file is judged with the
    float16 tolerances even though the PyTorch reference is float32.
    """

    atol: float | None = None
    rtol: float | None = None
    per_output: Mapping[str, Tolerance] = field(default_factory=dict)
    criteria: Criteria = field(default_factory=Criteria)
    #: Per output, an atol below which no tolerance goes: the reference's own float32 error measured
    #: against float64, times :data:`runtime.noise.NOISE_FACTOR` (``run_parity(noise_floor=True)``).
    floors: Mapping[str, float] = field(default_factory=dict)
    #: Per output, the narrower float type its value was computed in (:func:`runtime.precision.computed_precision`:
    #: a float64 output of a float32 graph): its defaults are that type's.
    computed_in: Mapping[str, str] = field(default_factory=dict)
    #: Per output, the dtype name the ONNX file declares: a runtime output that is not an integer / bool where the
    #: file declares one is a wrong dtype, failed as such rather than judged within a float tolerance.
    declared: Mapping[str, str] = field(default_factory=dict)

    def _defaults_dtype(self, output: str, dtype_name: str) -> str:
        computed = self.computed_in.get(output)
        if computed is None or dtype_name not in FLOAT_PRECISION:
            return dtype_name
        return computed if FLOAT_PRECISION[computed] < FLOAT_PRECISION[dtype_name] else dtype_name

    def __post_init__(self) -> None:
        from runtime.errors import BKNInputError

        values = [("atol", self.atol), ("rtol", self.rtol)]
        values += [(f"{name} atol", t.atol) for name, t in self.per_output.items()]
        values += [(f"{name} rtol", t.rtol) for name, t in self.per_output.items()]
        values += [(f"{name} noise floor", floor) for name, floor in self.floors.items()]
        for label, value in values:
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise BKNInputError(f"tolerance {label} must be a finite number >= 0; got {value}")

    def _given(self, output: str, dtype_name: str) -> Tolerance:
        """The tolerance before any noise floor: per output, else global, else the computed dtype's defaults."""
        return resolve_tolerance(
            output, self._defaults_dtype(output, dtype_name), self.atol, self.rtol, self.per_output
        )

    def tolerance(self, output: str, dtype_name: str) -> Tolerance:
        given = self._given(output, dtype_name)
        floor = self.floors.get(output)
        return given if floor is None or floor <= given.atol else Tolerance(floor, given.rtol)

    def uses_defaults(self, output: str, dtype_name: str) -> bool:
        """Whether ``output`` is judged by its computed dtype's defaults as they are: no per-output or global
        atol / rtol given, no noise floor above the default atol."""
        if output in self.per_output or self.atol is not None or self.rtol is not None:
            return False
        floor = self.floors.get(output)
        return floor is None or floor <= self._given(output, dtype_name).atol

    def source(self, output: str, dtype_name: str) -> str:
        """Where an output's tolerance comes from, for the report."""
        if output in self.per_output:
            text = "per-output tolerance"
        elif self.atol is not None and self.rtol is not None:
            text = "atol/rtol given"
        else:
            defaults = self._defaults_dtype(output, dtype_name)
            text = f"{defaults} defaults" + ("" if self.atol is None and self.rtol is None else " + atol/rtol given")
            if defaults != dtype_name:
                text += f" (a {dtype_name} output computed in {defaults} in the file)"
        floor = self.floors.get(output)
        if floor is not None and floor > self._given(output, dtype_name).atol:
            text += f", atol raised to the measured noise floor {floor:.2g}"
        return text

    def judge(self, name: str, reference: np.ndarray, actual: np.ndarray, runtime: str = "runtime") -> OutputComparison:
        """:func:`compare_output` with this policy's tolerance and criteria.

        The tolerance is that of the narrower float type of the output and ``reference``: the output's type is the
        one the file declares (:attr:`declared`), else ``actual``'s, so that a runtime returning a narrower float
        than the file declares (float16 for a float32 output) is held to the declared type's tolerance rather than
        passed within its own rounding; a reference saved in bfloat16 carries bfloat16's rounding, so a float32
        output is judged against it at bfloat16's defaults. An output the file declares integer / bool that
        ``actual`` is not fails as a wrong dtype, and so does a float output returned as integers; an integer
        output returned in another integer type is compared exactly, the tolerance source naming what came back.
        """
        actual = np.asarray(actual)
        returned_dtype = _dtype_name(actual)
        reference_dtype = _dtype_name(np.asarray(reference))
        declared = self.declared.get(name, "")
        if (_is_exact_dtype(declared) and actual.dtype.kind not in "iub") or (
            declared in FLOAT_PRECISION and actual.dtype.kind in "iub"
        ):
            return _wrong_dtype(name, reference, actual, declared, runtime, self.tolerance(name, declared))
        output_dtype = declared or returned_dtype
        judged_as = _narrower(output_dtype, reference_dtype)
        result = compare_output(name, reference, actual, self.tolerance(name, judged_as), runtime, self.criteria)
        result.tolerance_source = self.source(name, judged_as)
        if reference_dtype != output_dtype:
            result.tolerance_source += f" ({output_dtype} ONNX output vs {reference_dtype} reference)"
        if returned_dtype != output_dtype:
            result.tolerance_source += f" ({runtime} returned {returned_dtype} for this {output_dtype} output)"
        return result


def _dtype_name(array: np.ndarray) -> str:
    return "bfloat16" if array.dtype.name in ("bfloat16", "void16") else array.dtype.name


def _narrower(dtype_name: str, other: str) -> str:
    """``other`` where both are float types and it has fewer significand bits, else ``dtype_name``."""
    if (
        dtype_name in FLOAT_PRECISION
        and other in FLOAT_PRECISION
        and FLOAT_PRECISION[other] < FLOAT_PRECISION[dtype_name]
    ):
        return other
    return dtype_name


def _is_exact_dtype(dtype_name: str) -> bool:
    """Whether an ONNX dtype name is an integer or bool one (compared exactly)."""
    return dtype_name == "bool" or dtype_name.startswith(("int", "uint"))


def _wrong_dtype(
    name: str, reference: np.ndarray, actual: np.ndarray, declared: str, runtime: str, tolerance: Tolerance
) -> OutputComparison:
    """The failed verdict on a runtime output of the wrong kind: not integer / bool where the file declares one, or
    integer / bool where it declares a float."""
    reference = np.asarray(reference)
    return OutputComparison(
        output=name, dtype=str(actual.dtype), shape=list(actual.shape), reference_shape=list(reference.shape),
        tolerance=tolerance, passed=False, nonfinite_reference=nonfinite_count(reference),
        nonfinite_actual=nonfinite_count(actual),
        tolerance_source="exact (an integer / bool output)" if _is_exact_dtype(declared) else f"{declared} (declared)",
        message=(
            f"{runtime} returned {actual.dtype} for {name!r}, which the ONNX file declares {declared}: a wrong "
            + (
                "dtype (an integer / bool output is compared exactly, never within a float tolerance)"
                if _is_exact_dtype(declared)
                else "dtype (a float output returned as integers has lost its fractions)"
            )
        ),
    )  # fmt: skip


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
    criteria: Criteria = field(default_factory=Criteria)
    #: The chosen statistic of |a - r| and of |a - r| / |r| (max for elementwise).
    stat_abs_error: float = float("nan")
    stat_rel_error: float = float("nan")
    mean_abs_error: float = float("nan")
    median_abs_error: float = float("nan")
    tolerance_source: str = ""


def _histogram(abs_error: np.ndarray) -> list[int]:
    edges = np.asarray(HISTOGRAM_EDGES)
    # bin i holds errors in [edges[i], edges[i+1]); below edges[0] (and zeros) go to bin 0
    indices = np.clip(np.searchsorted(edges, abs_error.ravel(), side="right") - 1, 0, len(edges) - 2)
    return np.bincount(indices, minlength=len(edges) - 1).astype(int).tolist()


def _statistic(values: np.ndarray, criteria: Criteria) -> float:
    if values.size == 0:
        return 0.0
    stat = criteria.error_stat
    if stat in ("elementwise", "max"):
        return float(values.max())
    if stat == "mean":
        return float(values.mean())
    if stat == "median":
        return float(np.median(values))
    return float(np.quantile(values, criteria.error_quantile))


#: dtype kinds compared element by element for equality: signed / unsigned integers, bool, strings, objects.
_EXACT_KINDS = "iubUSO"


def _percent(fraction: float) -> str:
    """A share as a percentage that is not 0.00% when it is not zero (one element in a million: 0.0001%)."""
    return f"{fraction:.2%}" if fraction == 0 or fraction >= 1e-4 else f"{fraction * 100:.2g}%"


def _compare_exactly(
    result: OutputComparison, name: str, reference: np.ndarray, actual: np.ndarray, allowed: float
) -> OutputComparison:
    """Integer, bool and string outputs: equal element by element, with no tolerance and no float conversion (a
    float64 view of int64 values above 2^53 would round distinct values to one). allowed: the share of elements
    that may differ (the elementwise criterion's ``max_mismatch``; a half-precision file's mask can flip an
    element that lies within rounding of its threshold)."""
    differ = np.asarray(reference != actual, dtype=bool)
    count = int(np.count_nonzero(differ))
    numeric = reference.dtype.kind in "iub" and actual.dtype.kind in "iub"
    errors = (
        [abs(int(a) - int(r)) for r, a in zip(reference[differ].tolist(), actual[differ].tolist())] if numeric else []
    )
    result.max_abs_error = float(max(errors, default=0)) if numeric else float(count > 0)
    result.mismatch_fraction = count / reference.size if reference.size else 0.0
    result.max_rel_error = result.mean_abs_error = result.median_abs_error = 0.0
    if numeric and count:  # the statistics of |a - r| over every element (the verdict above is exact)
        distance = np.zeros(reference.shape, dtype=np.float64)
        distance[differ] = errors
        scale = np.maximum(np.abs(reference.astype(np.float64)), 1.0)
        result.mean_abs_error, result.median_abs_error = float(distance.mean()), float(np.median(distance))
        result.max_rel_error = float((distance / scale).max())
    # what the stat columns show: the largest (an exact comparison has no error statistic of its own)
    result.stat_abs_error, result.stat_rel_error = result.max_abs_error, result.max_rel_error
    result.cosine_similarity = 1.0 if count == 0 else float("nan")
    result.histogram = [0] * (len(HISTOGRAM_EDGES) - 1)
    if count and result.mismatch_fraction > allowed:
        largest = f", max abs error {max(errors)}" if errors else ""
        also = f", allowed {_percent(allowed)}" if allowed else ""
        result.message = (
            f"{count} of {reference.size} elements of {name!r} differ ({_percent(result.mismatch_fraction)}; "
            f"{actual.dtype} output, compared exactly{largest}{also})"
        )
    else:
        result.passed = True
    return result


def compare_output(
    name: str,
    reference: np.ndarray,
    actual: np.ndarray,
    tolerance: Tolerance,
    runtime: str = "runtime",
    criteria: Criteria | None = None,
    atol_floor: np.ndarray | None = None,
) -> OutputComparison:
    """Compare ``actual`` with ``reference`` (any shapes) under ``criteria``; never raises, the verdict says why.

    atol_floor: an atol per element, broadcastable to the reference (the localisation's per-channel noise floors),
    below which ``tolerance.atol`` is not lowered; a statistic criterion takes its largest value."""
    criteria = criteria or Criteria()
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
        criteria=criteria,
    )
    if reference.shape != actual.shape:
        result.message = (
            f"shape {tuple(actual.shape)} differs from the parity reference's shape {tuple(reference.shape)}"
        )
        return result
    if reference.dtype.kind in _EXACT_KINDS and actual.dtype.kind in _EXACT_KINDS:
        share = criteria.max_mismatch if criteria.error_stat == "elementwise" else 0.0
        return _compare_exactly(result, name, reference, actual, share)
    if reference.dtype.kind == "c" or actual.dtype.kind == "c":  # complex: its real and imaginary parts
        reference = reference.astype(np.complex128).view(np.float64).reshape(*reference.shape, 2)
        actual = actual.astype(np.complex128).view(np.float64).reshape(*actual.shape, 2)
    ref64 = reference.astype(np.float64)
    act64 = actual.astype(np.float64)
    atol: float | np.ndarray = tolerance.atol
    if atol_floor is not None and atol_floor.size:
        try:
            atol = np.maximum(tolerance.atol, np.broadcast_to(np.asarray(atol_floor, np.float64), ref64.shape))
        except ValueError:  # a floor of another shape (a complex output's parts): the plain atol
            atol = tolerance.atol
    nonfinite_reference, nonfinite_actual = result.nonfinite_reference, result.nonfinite_actual
    if criteria.equal_nan:  # the matching NaN / Inf pairs leave the comparison; the rest is judged as always
        matched = (np.isnan(ref64) & np.isnan(act64)) | (np.isinf(ref64) & (ref64 == act64))
        ref64, act64 = ref64[~matched], act64[~matched]
        atol = atol[~matched] if isinstance(atol, np.ndarray) else atol
        nonfinite_reference, nonfinite_actual = nonfinite_count(ref64), nonfinite_count(act64)
    with np.errstate(invalid="ignore", over="ignore"):
        abs_error = np.abs(act64 - ref64)
    finite = np.isfinite(abs_error)
    if ref64.size:
        finite_error = np.where(finite, abs_error, 0.0)
        result.max_abs_error = float(abs_error.max()) if not finite.all() else float(finite_error.max())
        with np.errstate(over="ignore"):  # a non-zero error over a zero reference is an infinite relative error
            result.max_rel_error = float(np.max(finite_error / np.maximum(np.abs(ref64), np.finfo(np.float64).tiny)))
        if not finite.all():  # like the absolute error: a NaN/Inf difference is not a relative error of 0
            result.max_rel_error = result.max_abs_error
        limit = atol + tolerance.rtol * np.abs(ref64)
        # NaN errors count as outside; an infinity counts as inside where the other side holds the same one, and as
        # outside where it does not (+inf against -inf has an infinite limit too).
        with np.errstate(invalid="ignore"):
            outside = ~np.where(np.isinf(ref64), act64 == ref64, abs_error <= limit)
        result.mismatch_fraction = float(np.count_nonzero(outside) / ref64.size)
        result.histogram = _histogram(np.where(finite, abs_error, np.inf))
        # Scaled by the largest magnitude first, so that neither the norms nor the dot product over- or underflow.
        scale = float(np.max(np.abs(np.where(finite, np.maximum(np.abs(ref64), np.abs(act64)), 0.0))))
        scaled_ref, scaled_act = (ref64 / scale, act64 / scale) if scale > 0 else (ref64, act64)
        norm_ref = float(np.linalg.norm(np.where(finite, scaled_ref, 0.0)))
        norm_act = float(np.linalg.norm(np.where(finite, scaled_act, 0.0)))
        dot = float(np.sum(np.where(finite, scaled_ref * scaled_act, 0.0)))
        if not finite.any():  # nothing finite to compare: no similarity to show
            result.cosine_similarity = float("nan")
        elif norm_ref > 0 and norm_act > 0:
            # Rounding in the norms can put identical tensors a few ulps past 1 (1.0000000000000004): clipped.
            result.cosine_similarity = min(1.0, max(-1.0, dot / (norm_ref * norm_act)))
        else:  # zeros against values within atol of zero (a flushed denormal) agree; against anything else the
            # cosine is undefined, which no cosine_min passes
            result.cosine_similarity = 1.0 if scale <= tolerance.atol else float("nan")
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            relative = abs_error / np.abs(np.where(ref64 == 0, _RELATIVE_EPSILON, ref64))
        result.mean_abs_error = float(abs_error.mean())
        result.median_abs_error = float(np.median(abs_error))
        result.stat_abs_error = _statistic(abs_error, criteria)
        result.stat_rel_error = _statistic(relative, criteria)
    else:
        result.max_abs_error = result.max_rel_error = result.mismatch_fraction = 0.0
        result.mean_abs_error = result.median_abs_error = result.stat_abs_error = result.stat_rel_error = 0.0
        result.cosine_similarity = 1.0
        result.histogram = [0] * (len(HISTOGRAM_EDGES) - 1)
    if nonfinite_reference and criteria.equal_nan:
        result.message = (
            f"the parity reference's output {name!r} holds {nonfinite_reference} NaN/Inf values that {runtime}'s "
            "output does not hold at the same positions (equal_nan matches only the same value)"
        )
    elif nonfinite_reference:
        result.message = (
            f"the parity reference's output {name!r} holds {nonfinite_reference} NaN/Inf values: the model (or "
            "the saved outputs) is broken for these inputs (check the inputs and the checkpoint; --equal-nan "
            "if they are expected)"
        )
    elif nonfinite_actual:
        where = " where the reference is finite" if criteria.equal_nan else ""
        result.message = f"{runtime} output {name!r} holds {nonfinite_actual} NaN/Inf values{where}"
    elif criteria.error_stat == "elementwise" and result.mismatch_fraction > criteria.max_mismatch:
        allowed = f" (allowed {criteria.max_mismatch:.2%})" if criteria.max_mismatch else ""
        result.message = (
            f"{_percent(result.mismatch_fraction)} of {name!r} outside atol={tolerance.atol:g} rtol={tolerance.rtol:g}"
            f"{allowed} (max abs error {result.max_abs_error:.3g})"
        )
    elif criteria.error_stat != "elementwise" and not (
        result.stat_abs_error <= np.max(atol, initial=tolerance.atol) or result.stat_rel_error <= tolerance.rtol
    ):
        stat = f"quantile {criteria.error_quantile:g}" if criteria.error_stat == "quantile" else criteria.error_stat
        result.message = (
            f"{stat} error of {name!r}: abs {result.stat_abs_error:.3g} > atol={tolerance.atol:g} and "
            f"rel {result.stat_rel_error:.3g} > rtol={tolerance.rtol:g}"
        )
    elif criteria.cosine_min is not None and not result.cosine_similarity >= criteria.cosine_min:
        result.message = (  # repr: 0.9999999999 must not print as "1.000000 < 1"
            f"cosine similarity of {name!r} {float(result.cosine_similarity)!r} < {float(criteria.cosine_min)!r}"
        )
    else:
        result.passed = True
    return result
