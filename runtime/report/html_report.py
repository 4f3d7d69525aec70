"""A self-contained HTML report: no scripts, no fonts, no links; plots are inline base64 PNGs.

Sections: a summary, a table with one row per runtime × output, one error-histogram
plot per output (a line per runtime), and per failing runtime its localisation (the
error of every module output in graph order, the first diverging module marked).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import os
from pathlib import Path
from typing import Any

from runtime._bkn import create_directories, write_text_atomic
from runtime.compare import HISTOGRAM_EDGES
from runtime.localize import Localisation
from runtime.parity import ParityReport
from runtime.report.cells import COLUMNS, comparison_cells, note

__all__ = ["render_html", "write_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.passed{background:#e6f6e6;color:#145214} .failed,.error{background:#fde8e8;color:#8a1010;font-weight:600}
.unavailable,.not_applicable{color:#777} .verdict{font-size:1.2em;padding:.5em 1em;display:inline-block}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0} code{background:#f6f6f6;padding:0 .2em}
"""


def _figure_png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _histogram_plot(report: ParityReport, output: str) -> str | None:
    rows = [(r.runtime, c) for r in report.ran for c in r.outputs if c.output == output and c.histogram]
    if not rows:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 3.2))
    centres = [math.sqrt(a * b) for a, b in itertools.pairwise(HISTOGRAM_EDGES)]
    for runtime, comparison in rows:
        axis.step(centres, comparison.histogram, where="mid", label=runtime, alpha=0.85)
        axis.axvline(comparison.tolerance.atol, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("|runtime − PyTorch| (bins per decade; dotted: atol)")
    axis.set_ylabel("elements")
    axis.set_title(f"error histogram of output {output!r}")
    axis.legend(fontsize=7, ncol=2)
    png = _figure_png(figure)
    plt.close(figure)
    return png


def _localisation_plot(loc: Localisation) -> str | None:
    checks = [c for c in loc.checks if c.max_abs_error is not None and math.isfinite(c.max_abs_error)]
    if not checks:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 3.4))
    errors = [max(c.max_abs_error, 1e-12) for c in checks]
    colours = ["#2a8a2a" if c.passed else "#c02020" for c in checks]
    axis.bar(range(len(checks)), errors, color=colours)
    axis.set_yscale("log")
    axis.set_xticks(range(len(checks)))
    axis.set_xticklabels([c.label for c in checks], rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("max |error| (log)")
    title = f"module outputs on {loc.runtime} (graph order; red: outside tolerance)"
    if loc.first is not None:
        title += f"\nfirst diverging: {loc.first.label}"
    axis.set_title(title, fontsize=9)
    png = _figure_png(figure)
    plt.close(figure)
    return png


def render_html(report: ParityReport) -> str:
    """The whole report as one HTML string."""
    e = html.escape
    verdict = "passed" if report.passed else "failed"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>bkn parity: {e(Path(report.onnx_path).name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Parity report: <code>{e(report.onnx_path)}</code></h1>",
        f"<p class='verdict {verdict}' id='verdict'>{'PASSED' if report.passed else 'FAILED'}: "
        f"{len(report.ran) - len(report.failures())} of {len(report.ran)} runtime(s) agree with "
        f"{e(report.reference)}</p>",
        "<p>",
        f"mode <b>{e(report.mode)}</b>; inputs "
        + ", ".join(f"<code>{e(s.name)}</code> {e(s.dtype)} {e(str(tuple(s.shape)))}" for s in report.inputs),
        f"; created {e(report.created)}; sha256 <code>{e(report.onnx_sha256[:16])}…</code>",
        (f"; model {e(report.model_description)}" if report.model_description else ""),
        f"; criteria: <span id='criteria'>{e(report.criteria.describe())}</span>",
        f"; {report.iterations} input set(s)" + (f", seed {report.seed}" if report.seed is not None else ""),
        "</p>",
    ]
    parts.extend(f"<p class='note'>note: {e(line)}</p>" for line in report.notes)
    for problem in report.reference_problems:
        parts.append(f"<p class='failed'>reference: {e(problem)}</p>")
    parts.append("<h2>Runtimes × outputs</h2><table id='results'><tr>")
    parts.append("".join(f"<th>{h}</th>" for h in COLUMNS) + "</tr>")
    for result in report.runtimes:
        if not result.outputs:
            parts.append(
                f"<tr><td>{e(result.runtime)}</td><td></td><td class='{result.status}'>{e(result.status)}</td>"
                f"<td colspan='{len(COLUMNS) - 4}'></td><td>{e(result.reason)}</td></tr>"
            )
            continue
        for c in result.outputs:
            status = "passed" if c.passed else "failed"
            numbers = "".join(f"<td class='num'>{e(cell)}</td>" for cell in comparison_cells(c))
            parts.append(
                f"<tr><td>{e(result.runtime)}</td><td>{e(c.output)}</td><td class='{status}'>{status}</td>"
                f"{numbers}<td>{e(note(c))}</td></tr>"
            )
    parts.append("</table>")
    parts.append("<h2>Error histograms</h2>")
    for spec in report.outputs:
        png = _histogram_plot(report, spec.name)
        if png:
            parts.append(
                f"<img class='plot' alt='error histogram of {e(spec.name)}' src='data:image/png;base64,{png}'>"
            )
    failures = report.failures()
    parts.append("<h2>Localisation</h2>")
    if not failures:
        parts.append("<p>Every runtime that ran agrees with PyTorch; nothing to localise.</p>")
    for result in failures:
        loc = result.localisation
        parts.append(f"<h3>{e(result.runtime)}</h3>")
        if loc is None:
            parts.append(f"<p>{e(result.reason or 'not localised')}</p>")
            continue
        parts.append(
            f"<p class='localisation' data-runtime='{e(result.runtime)}'><b>{e(loc.first_module or loc.status)}</b>: "
            f"{e(loc.message)} (method {e(loc.method or '–')}"
            + (f", reproduced with outputs exposed: {loc.reproduced}" if loc.reproduced is not None else "")
            + (f", confirmed on a prefix model: {loc.confirmed}" if loc.confirmed is not None else "")
            + f", prefix runs: {loc.prefix_runs})</p>"
        )
        png = _localisation_plot(loc)
        if png:
            parts.append(
                f"<img class='plot' alt='module errors on {e(result.runtime)}' src='data:image/png;base64,{png}'>"
            )
    parts.append("<h2>Environment</h2><table>")
    parts.extend(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in report.environment.items())
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_html(report: ParityReport, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` to ``path`` atomically (parent directories created); raises OSError."""
    target = Path(path)
    text = render_html(report)
    create_directories(target.parent)
    return write_text_atomic(target, text)
