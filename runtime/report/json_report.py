"""The JSON report: ``report_to_dict`` / ``write_json``; layout in ``runtime/report_schema.json``.

Non-finite floats (a NaN error when an output holds NaN) are written as ``null`` so the
file is strict JSON that every parser reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime._bkn import create_directories, write_text_atomic
from runtime.compare import HISTOGRAM_EDGES, OutputComparison
from runtime.localize import BoundaryCheck, Localisation
from runtime.parity import SCHEMA_VERSION, ParityReport

__all__ = ["SCHEMA_PATH", "load_schema", "report_to_dict", "write_json"]

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "report_schema.json"


def _number(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _comparison(c: OutputComparison) -> dict[str, Any]:
    return {
        "output": c.output,
        "passed": c.passed,
        "dtype": c.dtype,
        "shape": c.shape,
        "reference_shape": c.reference_shape,
        "atol": c.tolerance.atol,
        "rtol": c.tolerance.rtol,
        "max_abs_error": _number(c.max_abs_error),
        "max_rel_error": _number(c.max_rel_error),
        "mismatch_fraction": _number(c.mismatch_fraction),
        "cosine_similarity": _number(c.cosine_similarity),
        "nonfinite_reference": c.nonfinite_reference,
        "nonfinite_actual": c.nonfinite_actual,
        "histogram": list(c.histogram),
        "message": c.message,
        "error_stat": c.criteria.error_stat,
        "stat_abs_error": _number(c.stat_abs_error),
        "stat_rel_error": _number(c.stat_rel_error),
        "mean_abs_error": _number(c.mean_abs_error),
        "median_abs_error": _number(c.median_abs_error),
        "tolerance_source": c.tolerance_source,
    }


def _check(check: BoundaryCheck) -> dict[str, Any]:
    data = asdict(check)
    for key in ("max_abs_error", "max_rel_error", "mismatch_fraction", "cosine_similarity"):
        data[key] = _number(data[key])
    return data


def _localisation(loc: Localisation | None) -> dict[str, Any] | None:
    if loc is None:
        return None
    return {
        "status": loc.status,
        "method": loc.method,
        "reproduced": loc.reproduced,
        "confirmed": loc.confirmed,
        "first_diverging_module": loc.first_module,
        "first": _check(loc.first) if loc.first else None,
        "last_passing_module": loc.last_passing,
        "own_code_of": loc.own_code_of,
        "prefix_runs": loc.prefix_runs,
        "checks": [_check(c) for c in loc.checks],
        "message": loc.message,
    }


def report_to_dict(report: ParityReport) -> dict[str, Any]:
    """The report as plain JSON types (see the schema for every field)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": report.created,
        "passed": report.passed,
        "model": {
            "onnx_path": report.onnx_path,
            "onnx_sha256": report.onnx_sha256,
            "mode": report.mode,
            "description": report.model_description,
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in report.inputs],
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in report.outputs],
            "uncompared_outputs": list(report.uncompared_outputs),
        },
        "reference": report.reference,
        "reference_problems": list(report.reference_problems),
        "criteria": {
            "check_error_stat": report.criteria.error_stat,
            "error_quantile": report.criteria.error_quantile,
            "cosine_min": report.criteria.cosine_min,
            "max_mismatch": report.criteria.max_mismatch,
            "equal_nan": report.criteria.equal_nan,
            "description": report.criteria.describe(),
        },
        "seed": report.seed,
        "iterations": report.iterations,
        "input_sets": [
            [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in f] for f in report.input_sets
        ],
        "notes": list(report.notes),
        "environment": dict(report.environment),
        "histogram_edges": list(HISTOGRAM_EDGES),
        "runtimes": [
            {
                "runtime": r.runtime,
                "status": str(r.status),
                "failing_iteration": r.failing_iteration,
                "reason": r.reason,
                "seconds": round(r.seconds, 6),
                "outputs": [_comparison(c) for c in r.outputs],
                "localisation": _localisation(r.localisation),
            }
            for r in report.runtimes
        ],
    }


def write_json(report: ParityReport, path: str | os.PathLike[str]) -> Path:
    """Write the report to ``path`` atomically (parent directories created); returns the path. Raises OSError."""
    target = Path(path)
    text = json.dumps(report_to_dict(report), indent=2, allow_nan=False) + "\n"
    create_directories(target.parent)
    return write_text_atomic(target, text)


def load_schema() -> dict[str, Any]:
    """The JSON schema of the report (draft 2020-12)."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema
