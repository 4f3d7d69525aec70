"""Plots for the benchmarks (matplotlib, Agg backend: no display needed).

Functions return PNG bytes; callers write them (atomically) where they want. matplotlib
comes with the ``[demo]`` extra and is imported on use
(:class:`bkn_export.demo.DemoDependencyError` without it).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from bkn_export.demo import missing_dependency

__all__ = ["accuracy_vs_batch_size_png", "require_matplotlib"]


def _agg_classes() -> tuple[Any, Any]:
    """matplotlib's Agg canvas and Figure classes, or DemoDependencyError naming the extra."""
    # The Agg canvas directly (no pyplot): no global backend switch, no display needed.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise missing_dependency("matplotlib", "the accuracy plot (bkn_export.demo.plots)", error) from error
    return FigureCanvasAgg, Figure


def require_matplotlib() -> None:
    """Raise :class:`bkn_export.demo.DemoDependencyError` now if matplotlib is missing (before a long run)."""
    _agg_classes()


def accuracy_vs_batch_size_png(
    summary: Mapping[str, Sequence[tuple[int, float, float]]],
    title: str = "Test accuracy vs batch size (digits)",
) -> bytes:
    """A PNG of test accuracy against batch size, one line per normaliser.

    summary: normaliser -> [(batch_size, mean_accuracy, std_accuracy), ...], accuracies
    as fractions in [0, 1]; plotted in percent with ±1 std error bars on a log2 x-axis.
    """
    FigureCanvasAgg, Figure = _agg_classes()
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    batch_sizes: set[int] = set()
    for name, points in summary.items():
        ordered = sorted(points)
        xs = [p[0] for p in ordered]
        batch_sizes.update(xs)
        axes.errorbar(
            xs,
            [100.0 * p[1] for p in ordered],
            yerr=[100.0 * p[2] for p in ordered],
            marker="o",
            capsize=3,
            label=name,
        )
    axes.set_xscale("log", base=2)
    if batch_sizes:
        ticks = sorted(batch_sizes)
        axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.set_xlabel("batch size (log scale)")
    axes.set_ylabel("test accuracy (%), mean ± std over seeds")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
