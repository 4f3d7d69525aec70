"""Reports of a parity run: terminal table (rich), JSON (with a schema) and self-contained HTML."""

from runtime.report.html_report import render_html, write_html
from runtime.report.json_report import SCHEMA_PATH, load_schema, report_to_dict, write_json
from runtime.report.terminal import print_report, report_console, report_text

__all__ = [
    "SCHEMA_PATH",
    "load_schema",
    "print_report",
    "render_html",
    "report_console",
    "report_text",
    "report_to_dict",
    "write_html",
    "write_json",
]
