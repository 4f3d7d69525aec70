"""``bkn parity pkg.module:factory --checkpoint ckpt.pt model.onnx``: every runtime vs PyTorch.

Builds the PyTorch model with :func:`bkn_export.factory.load_model` (the spec and
checkpoint that ``bkn export`` took), runs the ONNX file on the chosen runtimes, compares
each output with PyTorch, localises failures, prints a table and writes the reports.

Exit status: 0 every runtime that ran agrees; 1 a runtime differs (or could not run the
model); 2 bad input (spec, checkpoint, ONNX file, input shape/dtype/NaN, runtime name,
custom-op library, or none of the chosen runtimes is available here).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_arguments", "parse_named_shape", "parse_tolerance", "run"]


def parse_named_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """'x:2,1,8,8' -> ('x', (2, 1, 8, 8)); '2,1,8,8' -> (None, ...) for the inputs in graph order."""
    from bkn_export.commands.export import parse_shape

    name, sep, shape = text.rpartition(":")
    return (name if sep else None), parse_shape(shape)


def parse_tolerance(text: str) -> tuple[str, float, float]:
    """'logits=1e-4,1e-3' -> ('logits', 1e-4, 1e-3): per-output atol, rtol."""
    name, sep, values = text.partition("=")
    parts = values.split(",")
    try:
        if not sep or not name or len(parts) != 2:
            raise ValueError
        return name, float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tolerance {text!r}: expected OUTPUT=ATOL,RTOL") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bkn_export.commands.export import parse_factory_arg

    parser.add_argument("spec", help="model factory as pkg.module:factory (or path/to/file.py:factory)")
    parser.add_argument("onnx", help="the .onnx file to check")
    parser.add_argument("--checkpoint", help="state dict saved with torch.save(model.state_dict(), path)")
    parser.add_argument(
        "--mode",
        choices=("auto", "inference", "training"),
        default="auto",
        help="reference forward: eval (inference) or train-mode (training); auto reads the ONNX file",
    )
    parser.add_argument(
        "--runtimes", default="all", help="'all' or a comma-separated list of names/prefixes (see --list-runtimes)"
    )
    parser.add_argument("--list-runtimes", action="store_true", help="list the runtimes known here and exit")
    parser.add_argument("--json", metavar="PATH", help="write the JSON report (schema: runtime/report_schema.json)")
    parser.add_argument("--html", metavar="PATH", help="write the self-contained HTML report")
    parser.add_argument(
        "--input-shape",
        type=parse_named_shape,
        action="append",
        default=[],
        help="shape of the random input, e.g. 2,1,8,8 or x:2,1,8,8 (repeat per input; default: batch 2)",
    )
    parser.add_argument("--inputs", metavar="NPZ", help="an .npz file with the inputs, keyed by ONNX input name")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance for every output")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance for every output")
    parser.add_argument(
        "--tolerance", type=parse_tolerance, action="append", default=[], help="per-output OUTPUT=ATOL,RTOL"
    )
    parser.add_argument("--custom-op-library", action="append", default=[], help="ONNX Runtime custom-op library")
    parser.add_argument("--plugin", action="append", default=[], help="TensorRT plugin library")
    parser.add_argument("--no-localise", action="store_true", help="do not localise failures")
    parser.add_argument(
        "--localise-method",
        choices=("auto", "bisect"),
        default="auto",
        help="auto: expose every module output, confirm on a prefix model; bisect: prefix models only",
    )
    parser.add_argument(
        "--factory-arg", type=parse_factory_arg, action="append", default=[], help="KEY=VALUE for the factory"
    )


def _inputs(args: argparse.Namespace) -> dict[str, Any] | None:
    """The --inputs arrays, random ones of the --input-shape shapes, or None (run_parity makes them)."""
    import numpy as np

    from bkn_export.errors import BKNInputError
    from runtime.model_io import load_onnx, random_inputs, tensor_specs

    if args.inputs:
        try:
            with np.load(args.inputs) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError) as error:
            raise BKNInputError(f"--inputs {args.inputs}: cannot read it as an .npz file: {error}") from error
    if not args.input_shape:
        return None
    specs, _ = tensor_specs(load_onnx(args.onnx))  # only here: run_parity loads and checks the file itself
    shapes: dict[str, tuple[int, ...]] = {}
    for position, (name, shape) in enumerate(args.input_shape):
        if name is None:
            if position >= len(specs):
                raise BKNInputError(
                    f"--input-shape given {len(args.input_shape)} times; the model has inputs {[s.name for s in specs]}"
                )
            name = specs[position].name
        shapes[name] = shape
    return random_inputs(specs, shapes, seed=args.seed)


def _list_runtimes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from runtime.registry import discover
    from runtime.report import report_console

    table = Table(title="runtimes on this machine")
    for column in ("runtime", "available", "reason"):
        table.add_column(column)
    for entry in discover(args.custom_op_library, args.plugin):
        state = "yes" if entry.availability.ok else ("n/a" if not entry.availability.applicable else "no")
        table.add_row(entry.name, state, entry.availability.reason)
    report_console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_runtimes:
        return _list_runtimes(args)
    from bkn_export.errors import BKNError

    try:
        return _run(args)
    except BKNError as error:  # BKNInputError, CheckpointError, FactoryError, ModelFileError, ...: all bad input
        print(f"bkn parity: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from bkn_export.factory import load_model
    from runtime.compare import Tolerance
    from runtime.parity import run_parity
    from runtime.report import print_report, report_console, write_html, write_json

    inputs = _inputs(args)
    model = load_model(args.spec, args.checkpoint, **dict(args.factory_arg))
    tolerances = {name: Tolerance(atol, rtol) for name, atol, rtol in args.tolerance}
    errors = Console(stderr=True)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=errors, transient=False,
    ) as progress:  # fmt: skip
        task = progress.add_task("parity: discovering runtimes", total=None)

        def on_event(event: str, runtime: str, index: int, total: int) -> None:
            words = {"start": "running", "skip": "skipping", "localise": "localising", "done": "done"}
            progress.update(task, total=total, description=f"parity: {words.get(event, event)} {runtime}")
            if event == "done":
                progress.advance(task)

        report = run_parity(
            model, args.onnx, inputs, mode=None if args.mode == "auto" else args.mode, runtimes=args.runtimes,
            atol=args.atol, rtol=args.rtol, tolerances=tolerances, custom_op_libraries=args.custom_op_library,
            plugin_libraries=args.plugin, localise_failures=not args.no_localise,
            localise_method=args.localise_method, progress=on_event,
            seed=args.seed, model_description=f"{args.spec}" + (f" + {args.checkpoint}" if args.checkpoint else ""),
        )  # fmt: skip
        progress.update(task, description="parity: finished")
    print_report(report, report_console())
    for path, writer in ((args.json, write_json), (args.html, write_html)):
        if path:
            print(f"wrote {writer(report, path)}")
    if not report.ran:
        reasons = "; ".join(f"{r.runtime}: {r.reason}" for r in report.runtimes)
        print(
            f"bkn parity: none of the chosen runtimes ({args.runtimes}) is available here: {reasons}", file=sys.stderr
        )
        return 2
    return 0 if report.passed else 1
