"""``bkn parity [SPEC] MODEL.onnx``: every runtime against PyTorch (or against saved outputs).

With a model spec (``pkg.module:factory`` or ``file.py:factory``, plus ``--checkpoint``)
the PyTorch model is built with :func:`bkn_export.factory.load_model` and is the
reference. Without one, ``--load-outputs REF.json --load-inputs IN.json`` (Polygraphy
``RunResults`` / inputs JSON) are the reference: no PyTorch needed. Runs the ONNX file on
the chosen runtimes, compares each output, localises failures, prints a table and writes
the reports.

Exit status (:mod:`bkn_export.commands.exit_codes`): 0 every runtime that ran agrees; 1 a
runtime differs (or could not run the model); 2 bad input or environment (spec,
checkpoint, ONNX file, inputs/outputs files, input shape/dtype/NaN, runtime name, options,
custom-op library, an unwritable report path or a full disk, none of the chosen
runtimes is available here, or a runtime named in ``--runtimes`` did not run).

Only argparse and the shared argument types are imported at module level, so
``bkn parity --help`` starts without torch, NumPy or onnx.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from bkn_export.commands.arguments import (
    finite_float_in,
    nonnegative_int,
    parse_factory_arg,
    parse_named_shape,
    positive_int,
)

__all__ = [
    "add_arguments",
    "parse_shape_set",
    "parse_tolerance",
    "parse_val_range",
    "run",
]

#: The positional list the CLI extends with positionals given after options (see bkn_export.cli).
POSITIONAL_LIST = "targets"

#: How several shape sets are written: one --shape-set per set, inputs separated by ';'.
SHAPE_SET_SYNTAX = "NAME:D,D,...;NAME:D,... (or D,D,...;D,... for the inputs in order)"


def _tolerance_value(text: str) -> float:
    return finite_float_in(text, "tolerance", 0.0)


def _fraction(text: str) -> float:
    return finite_float_in(text, "fraction", 0.0, 1.0)


def _cosine(text: str) -> float:
    return finite_float_in(text, "--cosine-min", -1.0, 1.0)


def parse_tolerance(text: str) -> tuple[str, float, float]:
    """'logits=1e-4,1e-3' -> ('logits', 1e-4, 1e-3): per-output atol, rtol (finite, >= 0)."""
    name, sep, values = text.partition("=")
    parts = values.split(",")
    if not sep or not name or len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--tolerance {text!r}: expected OUTPUT=ATOL,RTOL")
    return name, _tolerance_value(parts[0]), _tolerance_value(parts[1])


def parse_val_range(text: str) -> tuple[str | None, tuple[float, float]]:
    """'x:-1,1', 'x:[-1,1]' (Polygraphy's spelling), '-1,1' or '[-1,1]' -> (name or None, (lo, hi))."""
    body = text.strip()
    name: str | None = None
    if ":" in body:
        name, _, body = body.rpartition(":")
    parts = body.strip().removeprefix("[").removesuffix("]").split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--val-range {text!r}: expected [NAME:]LO,HI or NAME:[LO,HI]") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise argparse.ArgumentTypeError(f"--val-range {text!r}: expected finite LO < HI")
    return (name or None), (low, high)


def parse_shape_set(text: str) -> list[tuple[str | None, tuple[int, ...]]]:
    """'x:1,1,8,8;y:1,4' -> [('x', (1, 1, 8, 8)), ('y', (1, 4))]: one input-shape set."""
    parts = [p for p in text.split(";") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"--shape-set {text!r}: expected {SHAPE_SET_SYNTAX}")
    return [parse_named_shape(p.strip(), "--shape-set") for p in parts]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="[SPEC] MODEL.onnx",
        help="model factory as pkg.module:factory (or path/to/file.py:factory) and the .onnx file to check; "
        "the .onnx file alone with --load-outputs",
    )
    parser.add_argument("--checkpoint", help="state dict saved with torch.save(model.state_dict(), path)")
    parser.add_argument(
        "--mode",
        choices=("auto", "inference", "training"),
        default="auto",
        help="reference forward: eval (inference), or BKN layers in train mode and every other module in eval "
        "(training, what the training export computes); auto reads the ONNX file",
    )
    parser.add_argument(
        "--runtimes", default="all", help="'all' or a comma-separated list of names/prefixes (see --list-runtimes)"
    )
    parser.add_argument("--list-runtimes", action="store_true", help="list the runtimes known here and exit")
    parser.add_argument(
        "--openvino-precision",
        choices=("f32", "engine"),
        default="f32",
        help="OpenVINO INFERENCE_PRECISION_HINT: f32 (default) or the device's own hint (bf16 on some CPUs)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the JSON report (schema: runtime/report_schema.json)")
    parser.add_argument("--html", metavar="PATH", help="write the self-contained HTML report")
    data = parser.add_argument_group("inputs and outputs (Polygraphy-compatible JSON)")
    data.add_argument(
        "--input-shape",
        type=parse_named_shape,
        action="append",
        default=[],
        help="shape of a random input, e.g. 2,1,8,8 or x:2,1,8,8 (repeat per input; default: batch 2)",
    )
    data.add_argument(
        "--shape-set",
        type=parse_shape_set,
        action="append",
        default=[],
        help=f"one input-shape set, {SHAPE_SET_SYNTAX}; repeat to check a dynamic model at several shapes",
    )
    data.add_argument("--iterations", type=positive_int, default=1, help="random input sets per shape set (seeded)")
    data.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the first random input set (set k: seed + k)"
    )
    data.add_argument(
        "--val-range",
        type=parse_val_range,
        nargs="+",
        action="extend",
        default=[],
        help="uniform random values in [LO, HI): [NAME:]LO,HI or NAME:[LO,HI] (default: standard normal)",
    )
    data.add_argument(
        "--load-inputs",
        "--inputs",
        dest="load_inputs",
        metavar="PATH",
        help=".npz keyed by input name, a Polygraphy inputs JSON, or a folder of per-iteration JSON files",
    )
    data.add_argument("--save-inputs", metavar="PATH", help="write the inputs for `polygraphy run --load-inputs`")
    data.add_argument(
        "--save-outputs",
        metavar="PATH",
        help="write the PyTorch reference outputs as Polygraphy RunResults (runner 'pytorch'), inputs beside it",
    )
    data.add_argument(
        "--load-outputs", metavar="PATH", help="compare with saved outputs (Polygraphy RunResults) instead of PyTorch"
    )
    data.add_argument("--reference-runner", help="the runner in --load-outputs to compare with (when it has several)")
    criteria = parser.add_argument_group("criteria")
    criteria.add_argument("--atol", type=_tolerance_value, default=None, help="absolute tolerance for every output")
    criteria.add_argument("--rtol", type=_tolerance_value, default=None, help="relative tolerance for every output")
    criteria.add_argument(
        "--tolerance", type=parse_tolerance, action="append", default=[], help="per-output OUTPUT=ATOL,RTOL"
    )
    criteria.add_argument(
        "--noise-floor",
        action="store_true",
        help="deep float32 networks: also run the model in float64 and never judge an output with an atol below 4x "
        "the float32 reference's own distance from it (the report names each floor; needs a model that runs in "
        "float64)",
    )
    criteria.add_argument(
        "--check-error-stat",
        choices=("elementwise", "elemwise", "max", "mean", "median", "quantile"),
        default="elementwise",
        help="elementwise: |a-r| <= atol + rtol*|r| per element (default); max/mean/median/quantile: Polygraphy's "
        "rule, stat(|a-r|) <= atol or stat(|a-r|/|r|) <= rtol",
    )
    criteria.add_argument("--error-quantile", type=_fraction, default=0.99, help="quantile for --check-error-stat")
    criteria.add_argument("--cosine-min", type=_cosine, default=None, help="also require this cosine similarity")
    criteria.add_argument(
        "--max-mismatch",
        type=_fraction,
        default=0.0,
        help="elementwise: allowed fraction of elements outside atol + rtol*|r| (default 0)",
    )
    criteria.add_argument(
        "--equal-nan",
        action="store_true",
        help="a NaN (+Inf, -Inf) in the reference matches the same value at the same position in a runtime's output "
        "(one side only still fails; statistics over the other elements; the report notes it). Default: any NaN/Inf "
        "in the reference fails the run",
    )
    parser.add_argument("--custom-op-library", action="append", default=[], help="ONNX Runtime custom-op library")
    parser.add_argument("--plugin", action="append", default=[], help="TensorRT plugin library")
    parser.add_argument("--no-localise", action="store_true", help="do not localise failures")
    parser.add_argument(
        "--localise-method",
        choices=("auto", "bisect"),
        default="auto",
        help="auto: expose every module output, confirm on a prefix model; bisect: prefix models only "
        "(without exporter metadata: node by node against the ONNX reference evaluator)",
    )
    parser.add_argument("--repro", metavar="DIR", help="on a failure, write a repro bundle per failing runtime here")
    parser.add_argument(
        "--factory-arg", type=parse_factory_arg, action="append", default=[], help="KEY=VALUE for the factory"
    )


def _targets(args: argparse.Namespace) -> tuple[str | None, str]:
    from runtime.errors import BKNInputError

    if len(args.targets) == 2:
        return args.targets[0], args.targets[1]
    if len(args.targets) == 1:
        if not args.load_outputs and not args.list_runtimes:
            raise BKNInputError(
                f"bkn parity {args.targets[0]}: give the model spec before the ONNX file (SPEC MODEL.onnx), or "
                "--load-outputs REF.json --load-inputs IN.json to compare with saved outputs"
            )
        return None, args.targets[0]
    given = f": {' '.join(args.targets)}" if args.targets else " (see `bkn parity --help`)"
    raise BKNInputError(f"expected [SPEC] MODEL.onnx, got {len(args.targets)} positional argument(s){given}")


def _shape_sets(args: argparse.Namespace, specs: Any) -> list[dict[str, tuple[int, ...]]]:
    from runtime.errors import BKNInputError

    if args.input_shape and args.shape_set:
        raise BKNInputError("give --input-shape (one set) or --shape-set (one or more sets), not both")
    raw_sets = args.shape_set or ([args.input_shape] if args.input_shape else [])
    names = [s.name for s in specs]
    sets = []
    for raw in raw_sets:
        shapes: dict[str, tuple[int, ...]] = {}
        for position, (name, shape) in enumerate(raw):
            if name is None:
                if position >= len(specs):
                    raise BKNInputError(f"{len(raw)} shapes given; the model has inputs {names}")
                name = names[position]
            if name not in names:
                raise BKNInputError(f"shape given for unknown input {name!r}; the model's inputs are {names}")
            shapes[name] = shape
        sets.append(shapes)
    return sets


def _inputs(args: argparse.Namespace, onnx_path: str) -> list[Any] | None:
    """The loaded input sets, random ones of the given shapes / ranges / iterations, or None (run_parity's default)."""
    from runtime.errors import BKNInputError
    from runtime.model_io import example_shapes, input_sets, load_onnx, running_statistics_inputs, tensor_specs
    from runtime.polygraphy_io import load_inputs

    if args.load_inputs:
        if args.input_shape or args.shape_set or args.val_range or args.iterations != 1:
            raise BKNInputError(
                "--load-inputs gives the inputs: drop --input-shape/--shape-set/--val-range/--iterations"
            )
        return list(load_inputs(args.load_inputs))
    if not (args.input_shape or args.shape_set or args.val_range or args.iterations != 1):
        return None
    onnx_model = load_onnx(onnx_path)
    specs, _ = tensor_specs(onnx_model)
    ranges = dict(args.val_range)
    unknown = [name for name in ranges if name is not None and name not in {s.name for s in specs}]
    if unknown:
        raise BKNInputError(
            f"--val-range for unknown input(s) {unknown}; the model's inputs are {[s.name for s in specs]}"
        )
    shape_sets = _shape_sets(args, specs)
    # Running statistics of a running_stats_io file come from the model's buffers (run_parity fills them in), not
    # random values (a random "variance" is negative half the time); one given a shape or a --val-range: random.
    named = {name for shapes in shape_sets for name in shapes} | set(ranges)
    statistics = running_statistics_inputs(onnx_model) - named
    generated = [s for s in specs if s.name not in statistics]
    return input_sets(generated, shape_sets, args.iterations, args.seed, ranges, example_shapes(onnx_model))


def _saved_reference(args: argparse.Namespace) -> tuple[list[Any], str]:
    from runtime.errors import SavedDataError
    from runtime.polygraphy_io import load_outputs

    runs = load_outputs(args.load_outputs)
    if args.reference_runner:
        if args.reference_runner not in runs:
            raise SavedDataError(
                f"--reference-runner {args.reference_runner!r}: {args.load_outputs} holds runners {sorted(runs)}"
            )
        name = args.reference_runner
    elif len(runs) == 1:
        name = next(iter(runs))
    else:
        raise SavedDataError(
            f"{args.load_outputs} holds several runners {sorted(runs)}; name the reference with --reference-runner"
        )
    return runs[name], f"saved outputs of runner {name!r} ({args.load_outputs})"


def _list_runtimes(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from runtime.registry import discover
    from runtime.report import report_console

    table = Table(title="runtimes on this machine")
    for column in ("runtime", "available", "reason"):
        table.add_column(column)
    for entry in discover(args.custom_op_library, args.plugin, args.openvino_precision):
        state = "yes" if entry.availability.ok else ("n/a" if not entry.availability.applicable else "no")
        table.add_row(escape(entry.name), state, escape(entry.availability.reason))
    report_console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    from bkn_export.commands.exit_codes import run_command

    if args.list_runtimes:
        return run_command("parity", lambda: _list_runtimes(args))
    return run_command("parity", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from bkn_export.atomic import check_creatable, check_folder_creatable
    from bkn_export.commands.paths import check_distinct_paths, spec_file
    from runtime.compare import Criteria, Tolerance
    from runtime.errors import BKNInputError
    from runtime.parity import run_parity
    from runtime.report import print_report, report_console, write_html, write_json
    from runtime.report.terminal import stdout_closed

    spec, onnx_path = _targets(args)
    # option → (path, whether it may be a folder); a bad output path fails before the runs, not after them
    outputs = {
        "--json": (args.json, False), "--html": (args.html, False), "--save-inputs": (args.save_inputs, True),
        "--save-outputs": (args.save_outputs, True), "--repro": (args.repro, True),
    }  # fmt: skip
    for option, (output_path, folder) in outputs.items():
        if output_path is not None and not str(output_path).strip():  # an unset $REPORT in a CI script
            raise BKNInputError(f"{option} was given an empty path: name the file to write")
        if output_path and option == "--repro":  # bundles are folders
            check_folder_creatable(output_path)
        elif output_path:
            check_creatable(output_path, directory=folder)
    for option, path in (("--save-inputs", args.save_inputs), ("--save-outputs", args.save_outputs)):
        if path and str(path).lower().endswith(".npz"):
            raise BKNInputError(
                f"{option} {path}: the file is written in Polygraphy's JSON format (which --load-inputs / "
                "--load-outputs and `polygraphy run --load-inputs` read); name it .json"
            )
    input_files = {
        "the ONNX model": onnx_path, "the model spec": spec_file(spec), "--checkpoint": args.checkpoint,
        "--load-inputs": args.load_inputs, "--load-outputs": args.load_outputs,
    }  # fmt: skip
    check_distinct_paths({label: path for label, (path, _) in outputs.items()}, input_files)
    criteria = Criteria(
        args.check_error_stat, args.error_quantile, args.cosine_min, args.max_mismatch, equal_nan=args.equal_nan
    )
    inputs = _inputs(args, onnx_path)
    tolerances = {name: Tolerance(atol, rtol) for name, atol, rtol in args.tolerance}
    model: Any = None
    reference_outputs = None
    reference_name = "saved outputs"
    if args.load_outputs:
        if spec is not None:
            raise BKNInputError("give a model spec or --load-outputs, not both: they are two references")
        if inputs is None:
            raise BKNInputError("--load-outputs needs the inputs they were computed from: add --load-inputs")
        if args.save_outputs:
            raise BKNInputError("--save-outputs writes the PyTorch reference; there is none with --load-outputs")
        reference_outputs, reference_name = _saved_reference(args)
    else:
        from bkn_export.factory import load_model

        assert spec is not None
        model = load_model(spec, args.checkpoint, **dict(args.factory_arg))
    errors = Console(stderr=True)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=errors, transient=True,
        disable=not errors.is_terminal,  # piped or in CI: no progress (it left a blank line before an error)
    ) as progress:  # fmt: skip
        task = progress.add_task("parity: discovering runtimes", total=None)

        def on_event(event: str, runtime: str, index: int, total: int) -> None:
            words = {"start": "running", "skip": "skipping", "localise": "localising", "done": "done"}
            progress.update(task, total=total, description=f"parity: {words.get(event, event)} {escape(runtime)}")
            if event == "done":
                progress.advance(task)

        report = run_parity(
            model, onnx_path, inputs, mode=None if args.mode == "auto" else args.mode, runtimes=args.runtimes,
            atol=args.atol, rtol=args.rtol, tolerances=tolerances, custom_op_libraries=args.custom_op_library,
            plugin_libraries=args.plugin, localise_failures=not args.no_localise,
            localise_method=args.localise_method, progress=on_event,
            seed=None if args.load_inputs else args.seed,
            model_description=(spec or "") + (f" + {args.checkpoint}" if args.checkpoint else ""),
            criteria=criteria, reference_outputs=reference_outputs, reference_name=reference_name,
            openvino_precision=args.openvino_precision, save_inputs=args.save_inputs,
            save_outputs=args.save_outputs, repro_dir=args.repro, noise_floor=args.noise_floor,
        )  # fmt: skip
        progress.update(task, description="parity: finished")
    # The files first: a table that cannot be printed (stdout piped into `head`) loses no report. A report that
    # cannot be written still lets the table show the verdict; its error (exit 2) follows.
    written, write_error = [], None
    try:
        for path, writer in ((args.json, write_json), (args.html, write_html)):
            if path:
                written.append(writer(report, path))
    except OSError as error:
        write_error = error
    try:
        print_report(report, report_console())
        if model is not None and not args.checkpoint and model.state_dict() and report.ran and not report.passed:
            print(
                "note: no --checkpoint: the reference has the factory's own weights (random unless the factory "
                "loads some); a file exported from other weights differs everywhere"
            )
        for path in written:
            print(f"wrote {path}")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader of stdout stopped reading: the verdict's exit code stands
        stdout_closed()
    if write_error is not None:
        raise write_error
    if not report.ran:
        reasons = "; ".join(f"{r.runtime}: {r.reason}" for r in report.runtimes)
        print(
            f"bkn parity: RuntimeLoadError: none of the chosen runtimes ({args.runtimes}) is available here: {reasons}",
            file=sys.stderr,
        )
        return 2
    unrun = _named_but_not_run(args.runtimes, report.runtimes)
    if unrun:
        print(
            "bkn parity: runtime(s) named in --runtimes did not run: "
            + "; ".join(f"{name} ({reason})" for name, reason in unrun)
            + " (name only runtimes this machine runs, or use 'all', which reports the others without failing)",
            file=sys.stderr,
        )
        return 2
    return 0 if report.passed else 1


def _named_but_not_run(spec: str, rows: Any) -> list[tuple[str, str]]:
    """Each name of ``--runtimes`` (not 'all') none of whose runtimes ran, with their reasons: a name the user gave
    is a runtime they expect a verdict from, so the run cannot pass without it (exit 2, as for a missing
    library). A prefix of several runtimes ('ort') counts as run where one of them ran."""
    from runtime.registry import names_runtime, selection_names

    unrun = []
    for name in (name for name in selection_names(spec) if name != "all"):
        matched = [row for row in rows if names_runtime(name, row.runtime)]
        if matched and not any(row.ran for row in matched):
            unrun.append((name, "; ".join(f"{row.runtime}: {row.reason}" for row in matched)))
    return unrun
