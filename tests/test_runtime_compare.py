"""Specification of the per-output verdict (runtime.compare)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.compare import (
    HISTOGRAM_EDGES,
    Criteria,
    Tolerance,
    compare_output,
    default_tolerance,
    resolve_tolerance,
)


def test_identical_outputs_pass_with_zero_error() -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    result = compare_output("y", x, x.copy(), Tolerance(0.0, 0.0))
    assert result.passed
    assert result.max_abs_error == 0.0
    assert result.mismatch_fraction == 0.0
    assert result.cosine_similarity == pytest.approx(1.0)
    assert result.histogram[0] == x.size  # zero errors land in the first bin


def test_errors_follow_numpy_allclose_rule() -> None:
    reference = np.array([1.0, 10.0, 100.0, 0.0], dtype=np.float32)
    actual = reference + np.array([1e-5, 5e-4, 2e-2, 2e-5], dtype=np.float32)
    tolerance = Tolerance(1e-5, 1e-4)
    result = compare_output("y", reference, actual, tolerance)
    expected_outside = ~np.isclose(actual, reference, rtol=1e-4, atol=1e-5)
    assert result.mismatch_fraction == pytest.approx(expected_outside.mean())
    assert result.max_abs_error == pytest.approx(float(np.abs(actual.astype(np.float64) - reference).max()))
    assert not result.passed and "outside atol=1e-05 rtol=0.0001" in result.message


def test_cosine_and_relative_error_match_an_independent_computation() -> None:
    rng = np.random.default_rng(1)
    reference = rng.standard_normal(100)
    actual = reference + 1e-3 * rng.standard_normal(100)
    result = compare_output("y", reference, actual, Tolerance(1.0, 0.0))
    cosine = reference @ actual / (np.linalg.norm(reference) * np.linalg.norm(actual))
    assert result.cosine_similarity == pytest.approx(cosine, rel=1e-12)
    assert result.max_rel_error == pytest.approx(np.max(np.abs(actual - reference) / np.abs(reference)))


def test_histogram_counts_every_element_by_decade() -> None:
    reference = np.zeros(4)
    actual = np.array([0.0, 3e-7, 3e-3, 1e6])
    result = compare_output("y", reference, actual, Tolerance(1e-5, 0.0))
    assert sum(result.histogram) == 4
    edges = np.asarray(HISTOGRAM_EDGES)
    assert result.histogram[int(np.searchsorted(edges, 3e-7, "right")) - 1] == 1
    assert result.histogram[int(np.searchsorted(edges, 3e-3, "right")) - 1] == 1
    assert result.histogram[-1] == 1  # above the last edge


@pytest.mark.parametrize("side", ["reference", "actual"])
def test_nan_or_inf_fails_loudly_on_either_side(side: str) -> None:
    good = np.ones(5, dtype=np.float32)
    bad = good.copy()
    bad[2] = np.nan
    bad[3] = np.inf
    reference, actual = (bad, good) if side == "reference" else (good, bad)
    # even a tolerance that accepts anything finite cannot accept NaN/Inf
    result = compare_output("logits", reference, actual, Tolerance(1e30, 1e30), runtime="ort:cpu:all")
    assert not result.passed
    assert "NaN/Inf" in result.message and "'logits'" in result.message
    if side == "reference":
        assert result.nonfinite_reference == 2 and "the parity reference's output" in result.message
    else:
        assert result.nonfinite_actual == 2 and "ort:cpu:all" in result.message
    # a NaN difference shows as NaN in both error figures, not as a relative error of 0
    assert np.isnan(result.max_abs_error) and np.isnan(result.max_rel_error)


def test_shape_mismatch_fails_with_both_shapes() -> None:
    result = compare_output("y", np.zeros((2, 3)), np.zeros((3, 2)), Tolerance(1.0, 1.0))
    assert not result.passed
    assert "(3, 2)" in result.message and "(2, 3)" in result.message


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"), [("float32", 1e-5, 1e-4), ("float16", 1e-3, 1e-3), ("bfloat16", 1e-2, 1e-2)]
)
def test_default_tolerances_are_dtype_aware(dtype: str, atol: float, rtol: float) -> None:
    assert default_tolerance(dtype) == Tolerance(atol, rtol)


def test_float16_output_within_its_tolerance_passes_where_float32_would_fail() -> None:
    reference = np.linspace(-2, 2, 50).astype(np.float16)
    actual = (reference.astype(np.float32) + 5e-4).astype(np.float16)
    assert compare_output("y", reference, actual, default_tolerance("float16")).passed
    assert not compare_output("y", reference, actual, default_tolerance("float32")).passed


def test_integer_outputs_must_be_exact() -> None:
    assert default_tolerance("int64") == Tolerance(0.0, 0.0)
    assert not compare_output("idx", np.array([1, 2]), np.array([1, 3]), default_tolerance("int64")).passed


def test_per_output_override_beats_global_and_dtype_default() -> None:
    per_output = {"logits": Tolerance(0.5, 0.0)}
    assert resolve_tolerance("logits", "float32", atol=1e-3, per_output=per_output) == Tolerance(0.5, 0.0)
    assert resolve_tolerance("other", "float32", atol=1e-3, per_output=per_output) == Tolerance(1e-3, 1e-4)
    assert resolve_tolerance("other", "float16") == Tolerance(1e-3, 1e-3)


def test_localisation_judges_with_the_runs_per_output_tolerances() -> None:
    """Localisation uses the same tolerance rule as the parity verdict: override, else atol/rtol, else dtype."""
    import numpy as np

    from runtime.compare import Tolerance, TolerancePolicy

    policy = TolerancePolicy(atol=1e-3, rtol=None, per_output={"logits": Tolerance(0.5, 0.0)})
    value = np.zeros(3, dtype=np.float32)
    assert policy.tolerance("logits", value.dtype.name) == Tolerance(0.5, 0.0)
    assert policy.tolerance("other", value.dtype.name).atol == 1e-3


def test_integers_compare_exactly_beyond_float64s_53_bits() -> None:
    """int64 2^53 + 1 against 2^53 passed: both became the same float64 before the comparison."""
    reference = np.array([2**53, 7], dtype=np.int64)
    result = compare_output("ids", reference, reference + np.array([1, 0]), Tolerance(0.0, 0.0))
    assert not result.passed and result.max_abs_error == 1.0 and result.mismatch_fraction == 0.5
    assert "1 of 2 elements of 'ids' differ" in result.message and "compared exactly" in result.message
    big = np.array([2**64 - 1], dtype=np.uint64)
    assert not compare_output("u", big, big - np.uint64(1000), Tolerance(1.0, 1.0)).passed  # no tolerance applies
    assert compare_output("ids", reference, reference.copy(), Tolerance(0.0, 0.0)).passed


def test_strings_compare_exactly_and_do_not_crash() -> None:
    """A string output crashed compare_output (float conversion); numeric strings '1' and '1.0' passed as equal."""
    reference = np.array(["1", "b"], dtype=object)
    assert compare_output("s", reference, reference.copy(), Tolerance(1e-5, 1e-4)).passed
    result = compare_output("s", reference, np.array(["1.0", "b"], dtype=object), Tolerance(1e-5, 1e-4))
    assert not result.passed and "1 of 2 elements of 's' differ" in result.message


def test_complex_outputs_compare_both_parts() -> None:
    """Only the real parts were compared (numpy's ComplexWarning): 1+1j passed against 1-5j."""
    reference = np.array([1 - 5j, 2 + 3j], dtype=np.complex64)
    assert not compare_output("z", reference, np.array([1 + 1j, 2 + 3j], dtype=np.complex64), Tolerance(0, 0)).passed
    assert compare_output("z", reference, reference.copy(), Tolerance(0, 0)).passed


@pytest.mark.parametrize("magnitude", [1e200, 1e-200])
def test_cosine_similarity_neither_overflows_nor_underflows(magnitude: float) -> None:
    """Identical 1e200 values failed (cosine NaN); opposite 1e-200 values had cosine 1.0."""
    criteria = Criteria(cosine_min=0.99, max_mismatch=1.0)
    values = np.full(2, magnitude)
    same = compare_output("y", values, values.copy(), Tolerance(0.0, 0.0), criteria=criteria)
    assert same.passed and same.cosine_similarity == pytest.approx(1.0)
    opposite = compare_output("y", values, -values, Tolerance(0.0, 0.0), criteria=criteria)
    assert not opposite.passed and opposite.cosine_similarity == pytest.approx(-1.0)


@pytest.mark.parametrize("zero_side", ["reference", "actual"])
def test_a_zero_tensor_has_no_cosine_with_a_nonzero_one(zero_side: str) -> None:
    """An all-zero reference had cosine 1.0 with any output, so --max-mismatch 1 --cosine-min 0.99 passed it."""
    criteria = Criteria(cosine_min=0.99, max_mismatch=1.0)
    zeros, values = np.zeros(4, dtype=np.float32), np.array([0.1, 0.96, 0.0, 0.5], dtype=np.float32)
    reference, actual = (zeros, values) if zero_side == "reference" else (values, zeros)
    result = compare_output("y", reference, actual, Tolerance(1e-5, 1e-4), criteria=criteria)
    assert not result.passed and np.isnan(result.cosine_similarity)
    both = compare_output("y", zeros, zeros.copy(), Tolerance(1e-5, 1e-4), criteria=criteria)
    assert both.passed and both.cosine_similarity == 1.0
    # a runtime that flushes denormals to zero is within atol of zero: no undefined cosine for it
    denormals = np.full(4, 9e-40, dtype=np.float32)
    flushed = compare_output("y", denormals, zeros.copy(), Tolerance(1e-5, 1e-4), criteria=criteria)
    assert flushed.passed and flushed.cosine_similarity == 1.0


def test_one_element_in_a_million_is_not_reported_as_zero_percent() -> None:
    reference = np.zeros(1_000_000, dtype=np.float32)
    actual = reference.copy()
    actual[123] = 5.0
    result = compare_output("y", reference, actual, Tolerance(1e-5, 1e-4))
    assert not result.passed and result.message.startswith("0.0001% of 'y' outside")


def test_the_mismatch_share_counts_infinities_by_whether_they_agree() -> None:
    """+inf against -inf counted as inside (an infinite limit); a reproduced inf counted as outside. The verdict
    fails on any non-finite value either way; the share now says which elements differ."""
    reference = np.array([np.inf, 1.0, 2.0], dtype=np.float32)
    flipped = compare_output("y", reference, np.array([-np.inf, 1.0, 2.0], dtype=np.float32), Tolerance(1e-5, 1e-4))
    reproduced = compare_output("y", reference, reference.copy(), Tolerance(1e-5, 1e-4))
    assert flipped.mismatch_fraction == pytest.approx(1 / 3) and reproduced.mismatch_fraction == 0.0
    assert not flipped.passed and not reproduced.passed  # non-finite values fail the verdict


def test_equal_nan_matches_nan_and_same_signed_inf_at_the_same_position() -> None:
    """NumPy's isclose(equal_nan=True): NaN = NaN, +inf = +inf, -inf = -inf where both sides hold them; the error
    statistics cover the finite elements only (an independent computation over them)."""
    reference = np.array([np.nan, np.inf, -np.inf, 1.0, 2.0, 4.0], dtype=np.float32)
    actual = np.array([np.nan, np.inf, -np.inf, 1.0 + 1e-6, 2.0, 4.0 - 2e-6], dtype=np.float32)
    strict = compare_output("y", reference, actual, Tolerance(1e-5, 1e-4))
    result = compare_output("y", reference, actual, Tolerance(1e-5, 1e-4), criteria=Criteria(equal_nan=True))
    assert not strict.passed and result.passed, result.message
    finite = np.isfinite(reference)
    errors = np.abs(actual[finite].astype(np.float64) - reference[finite].astype(np.float64))
    assert result.max_abs_error == pytest.approx(float(errors.max()))
    assert result.mean_abs_error == pytest.approx(float(errors.mean()))
    assert result.mismatch_fraction == 0.0 and sum(result.histogram) == finite.sum()
    assert result.nonfinite_reference == 3 and result.nonfinite_actual == 3  # still counted, for the report


@pytest.mark.parametrize(
    ("reference_value", "actual_value"),
    [(np.nan, 1.0), (1.0, np.nan), (np.inf, -np.inf), (np.inf, np.nan), (np.inf, 1e30), (1.0, np.inf)],
)
def test_equal_nan_still_fails_a_nonfinite_value_on_one_side_only(reference_value: float, actual_value: float) -> None:
    reference = np.array([np.nan, reference_value, 3.0], dtype=np.float32)
    actual = np.array([np.nan, actual_value, 3.0], dtype=np.float32)
    result = compare_output("y", reference, actual, Tolerance(1e30, 1e30), "ort", Criteria(equal_nan=True))
    assert not result.passed and "NaN/Inf" in result.message and "'y'" in result.message


def test_equal_nan_is_named_in_the_criteria_description() -> None:
    assert "equal NaN" in Criteria(equal_nan=True).describe() and "NaN" not in Criteria().describe()


def test_a_runtime_returning_a_narrower_float_is_held_to_the_declared_types_tolerance() -> None:
    """A runtime that returns float16 for an output the file declares float32 was judged at float16's tolerance, so
    its rounding (0.2 at 1000) passed; it is held to float32's and fails, the source saying what it returned. An
    undeclared output keeps the returned type's tolerance, and a wider return (float64 for float32) is judged as
    the declared float32."""
    from runtime.compare import TolerancePolicy

    reference = np.array([1000.3, 1.0], dtype=np.float32)
    narrowed = reference.astype(np.float16)
    declared = TolerancePolicy(declared={"y": "float32"})
    verdict = declared.judge("y", reference, narrowed, runtime="lossy")
    assert not verdict.passed and verdict.tolerance == Tolerance(1e-5, 1e-4)
    assert verdict.tolerance_source == "float32 defaults (lossy returned float16 for this float32 output)"
    assert TolerancePolicy().judge("y", reference, narrowed).passed  # nothing declared: its own type's
    widened = declared.judge("y", reference, reference.astype(np.float64) + 1e-9)
    assert widened.passed and widened.tolerance == Tolerance(1e-5, 1e-4)


def test_a_float_output_returned_as_integers_fails_and_another_integer_type_is_named() -> None:
    """Integers returned for a float32 output passed when they happened to match (compared exactly as integers);
    int32 for an int64 output was reported as an int32 output."""
    from runtime.compare import TolerancePolicy

    policy = TolerancePolicy(declared={"y": "float32", "ids": "int64"})
    floats = np.array([1.0, 2.0], dtype=np.float32)
    verdict = policy.judge("y", floats, floats.astype(np.int64), runtime="rt")
    assert not verdict.passed and "rt returned int64 for 'y', which the ONNX file declares float32" in verdict.message
    ids = np.array([3, 4], dtype=np.int64)
    narrowed = policy.judge("ids", ids, ids.astype(np.int32), runtime="rt")
    assert narrowed.passed and narrowed.tolerance == Tolerance(0.0, 0.0)
    assert narrowed.tolerance_source.endswith("(rt returned int32 for this int64 output)")
    assert not policy.judge("ids", ids, np.array([3, 5], dtype=np.int32)).passed


def test_a_cosine_just_below_the_minimum_is_not_printed_as_rounded_to_it() -> None:
    """'cosine similarity 1.000000 < 1' read as a contradiction: both numbers are printed in full."""
    criteria = Criteria(cosine_min=0.9999999999, max_mismatch=1.0)
    reference = np.array([1.0, 0.0])
    actual = np.array([1.0, 1e-4])
    result = compare_output("y", reference, actual, Tolerance(1.0, 1.0), criteria=criteria)
    assert not result.passed
    assert f"{result.cosine_similarity!r} < 0.9999999999" in result.message
    assert "1.000000" not in result.message


def test_the_cosine_of_identical_tensors_is_at_most_1() -> None:
    """Rounding in the norms put this pair's cosine at 1.0000000000000002 (a report showed 1.0000000000000004)."""
    reference = np.random.default_rng(5).standard_normal(1000)
    result = compare_output("y", reference, reference.copy(), Tolerance(0.0, 0.0))
    assert result.cosine_similarity == 1.0
    assert compare_output("y", reference, -reference, Tolerance(0.0, 0.0)).cosine_similarity >= -1.0
