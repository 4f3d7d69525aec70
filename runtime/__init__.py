"""runtime: run one model under every runtime, compare with PyTorch, localise, report.

Public API (imported lazily, so ``import runtime`` stays cheap; the pytest plugin relies
on that): :func:`assert_parity`, :func:`run_parity`, :class:`ParityReport`,
:class:`Status`, :class:`Tolerance`, :class:`TolerancePolicy`, :class:`Criteria`,
:data:`DEFAULT_TOLERANCES`, :func:`discover`, :func:`input_sets`, the reports
:func:`print_report`, :func:`write_json`, :func:`write_html`, the reference-noise floor
for deep float32 networks :func:`reference_noise` / :func:`noise_tolerance`
(:mod:`runtime.noise`), and :mod:`runtime.polygraphy_io` (Polygraphy's inputs / outputs JSON).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DEFAULT_TOLERANCES",
    "Criteria",
    "ParityReport",
    "Status",
    "Tolerance",
    "TolerancePolicy",
    "assert_parity",
    "discover",
    "input_sets",
    "noise_tolerance",
    "print_report",
    "reference_noise",
    "run_parity",
    "write_html",
    "write_json",
]

_LOCATIONS = {
    "assert_parity": "runtime.assertions",
    "run_parity": "runtime.parity",
    "ParityReport": "runtime.parity",
    "Status": "runtime.parity",
    "Tolerance": "runtime.compare",
    "TolerancePolicy": "runtime.compare",
    "Criteria": "runtime.compare",
    "input_sets": "runtime.model_io",
    "DEFAULT_TOLERANCES": "runtime.compare",
    "discover": "runtime.registry",
    "reference_noise": "runtime.noise",
    "noise_tolerance": "runtime.noise",
    "print_report": "runtime.report",
    "write_json": "runtime.report",
    "write_html": "runtime.report",
}


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
