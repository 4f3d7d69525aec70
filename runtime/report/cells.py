"""The cells the terminal table and the HTML table share: column names and number formats."""

from __future__ import annotations

import math

from runtime.compare import OutputComparison

__all__ = ["COLUMNS", "comparison_cells", "fmt", "note"]

#: Columns of the runtimes × outputs table; the numeric ones are :func:`comparison_cells`.
COLUMNS = (
    "runtime",
    "output",
    "status",
    "max abs",
    "max rel",
    "mismatch",
    "cosine",
    "stat abs / rel",
    "atol / rtol",
    "note",
)


def fmt(value: float | None, spec: str = ".2e") -> str:
    """``value`` formatted with ``spec``; a dash for None, NaN or Inf."""
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def comparison_cells(c: OutputComparison) -> list[str]:
    """max abs, max rel, mismatch, cosine, the judged statistic and atol / rtol of one output, as text."""
    stat = c.criteria.error_stat
    label = "max" if stat == "elementwise" else (f"q{c.criteria.error_quantile:g}" if stat == "quantile" else stat)
    return [
        fmt(c.max_abs_error),
        fmt(c.max_rel_error),
        fmt(c.mismatch_fraction, ".2%"),
        fmt(c.cosine_similarity, ".6f"),
        f"{label} {fmt(c.stat_abs_error)} / {fmt(c.stat_rel_error)}",
        f"{c.tolerance.atol:g} / {c.tolerance.rtol:g}",
    ]


def note(c: OutputComparison) -> str:
    """The message of a failing output, else where its tolerance came from."""
    return c.message or c.tolerance_source
