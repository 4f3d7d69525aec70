"""The terminal report: one rich table row per runtime × output, then the localisations."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runtime.parity import ParityReport
from runtime.report.cells import COLUMNS, comparison_cells, note

__all__ = ["STATUS_STYLE", "print_report", "report_console", "report_text", "stdout_closed"]

#: Width used when output is not a terminal (CI logs, pipes): wide enough that no number is cut.
LOG_WIDTH = 180

STATUS_STYLE = {
    "passed": "green",
    "failed": "bold red",
    "error": "bold red",
    "unavailable": "dim",
    "not_applicable": "dim",
}


def build_table(report: ParityReport) -> Table:
    # Every string that comes from the user or the model (paths, names, runtime messages) is
    # escaped: an output named "[/]" or "[blink red]x" must print as written, not as markup.
    table = Table(
        title=escape(f"parity vs {report.reference}: {report.onnx_path} ({report.mode}); {report.criteria.describe()}"),
        show_lines=False,
    )
    for column in COLUMNS:
        table.add_column(
            column,
            justify="left" if column in ("runtime", "output", "status", "note") else "right",
            no_wrap=column != "note",
            overflow="fold" if column == "note" else "ellipsis",
            min_width=24 if column == "note" else None,
        )
    for result in report.runtimes:
        style = STATUS_STYLE.get(result.status, "")
        if not result.outputs:
            table.add_row(escape(result.runtime), "", f"[{style}]{result.status}[/]", *[""] * 6, escape(result.reason))
            continue
        for comparison in result.outputs:
            status = "passed" if comparison.passed else "failed"
            table.add_row(
                escape(result.runtime),
                escape(comparison.output),
                f"[{STATUS_STYLE[status]}]{status}[/]",
                *(escape(cell) for cell in comparison_cells(comparison)),
                escape(note(comparison)),
            )
    return table


def stdout_closed() -> None:
    """After a ``BrokenPipeError`` on stdout (``bkn parity ... | head``): send the rest of stdout to the null device,
    so that nothing fails again when Python flushes it at exit (Python's own advice for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _ReportConsole(Console):
    """rich's Console, except that a closed pipe raises ``BrokenPipeError`` for the caller to handle: rich's own
    handler exits with code 1, which the exit-code rule reserves for a problem with the model."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError("the output pipe was closed by its reader")


def report_console(stderr: bool = False) -> Console:
    """A console for reports: the terminal's width, or :data:`LOG_WIDTH` when writing to a log or pipe."""
    console = _ReportConsole(stderr=stderr)
    return console if console.is_terminal else _ReportConsole(stderr=stderr, width=LOG_WIDTH)


def print_report(report: ParityReport, console: Console | None = None) -> None:
    """Print the table, the localisation of each failing runtime and the verdict."""
    console = console or report_console()
    console.print(build_table(report))
    if report.iterations > 1:
        seed = f" (seed {report.seed})" if report.seed is not None else ""
        console.print(f"{report.iterations} input sets{seed}; each row is the output's worst set")
    for line in report.notes:
        console.print(f"note: {escape(line)}")
    for problem in report.reference_problems:
        console.print(f"[bold red]reference:[/] {escape(problem)}")
    for result in report.failures():
        loc = result.localisation
        if loc is not None:
            exposed = f", reproduced with outputs exposed: {loc.reproduced}" if loc.reproduced is not None else ""
            detail = f" ({loc.method}{exposed})" if loc.method else ""
            console.print(f"[bold]{escape(result.runtime)}[/]: {escape(loc.message or loc.status)}{escape(detail)}")
        elif result.status == "error":
            console.print(f"[bold]{escape(result.runtime)}[/]: {escape(result.reason)}")
    ran = len(report.ran)
    if report.passed:
        against = "PyTorch" if report.reference.startswith("pytorch") else "the saved outputs"
        console.print(f"[green]parity: {ran} runtime(s) agree with {against}[/]")
    elif report.reference_problems:
        console.print("[bold red]parity FAILED: the reference is broken; no runtime was judged against it[/]")
    elif not ran:
        console.print("[bold red]parity FAILED: none of the chosen runtimes ran[/]")
    else:
        console.print(f"[bold red]parity FAILED: {report.failure_counts()}[/]")


def report_text(report: ParityReport, width: int = 160) -> str:
    """The terminal report as plain text (for assertion messages and logs)."""
    console = Console(width=width, force_terminal=False, color_system=None)
    with console.capture() as captured:
        print_report(report, console)
    return captured.get()
