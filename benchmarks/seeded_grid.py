"""What the seeded micro-batch benchmarks (``bench_microbatch_tabular.py``, ``bench_microbatch_segmentation.py``)
share: their list arguments, and the summary and JSON of one metric per (group, normalization, batch, seed) row,
summarised over seeds."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from bkn_export.atomic import write_text_atomic

__all__ = ["integers", "names", "print_summary", "write_results"]


def names(text: str) -> list[str]:
    """An argument's comma- or space-separated names."""
    return [part for part in text.replace(",", " ").split() if part]


def integers(text: str) -> list[int]:
    """An argument's comma- or space-separated integers (argparse's error naming the text otherwise)."""
    try:
        return [int(part) for part in names(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def print_summary(
    results: Sequence[dict[str, Any]],
    group: tuple[str, Sequence[str]],
    norms: Sequence[str],
    batches: Sequence[int],
    metric: tuple[str, str, str],
) -> list[dict[str, Any]]:
    """Print, as a Markdown table, the mean of each (group, norm, batch)'s metric over seeds with its min–max; return
    one summary row per cell.

    group: (the rows' group field, e.g. "dataset", its values in order); metric: (the rows' field, e.g.
    "eval_accuracy", the summary's field for the values, e.g. "accuracy", its title, e.g. "eval accuracy").
    A summary row holds the group field, "norm", "batch", ``mean_<values field>`` and the values."""
    field, values = group
    source, name, title = metric
    print(f"Mean {title} over seeds (min–max):")
    print()
    print(f"| {field} | norm | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    summary = []
    for value in values:
        for norm in norms:
            cells = []
            for batch in batches:
                found = [r[source] for r in results if (r[field], r["norm"], r["batch"]) == (value, norm, batch)]
                mean = statistics.fmean(found)
                summary.append({field: value, "norm": norm, "batch": batch, f"mean_{name}": mean, name: found})
                cells.append(f"{mean:.4f} ({min(found):.4f}–{max(found):.4f})")
            print(f"| {value} | {norm} | " + " | ".join(cells) + " |")
    return summary


def write_results(path: str, settings: dict[str, Any], results: Any, summary: Any) -> None:
    """Write the run's settings (without the output path; with torch's version), rows and summary as JSON,
    atomically."""
    kept = {k: v for k, v in settings.items() if k != "json"}
    kept["torch"] = torch.__version__
    payload = {"settings": kept, "results": results, "summary": summary}
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
