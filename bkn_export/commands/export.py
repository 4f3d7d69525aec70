"""``bkn export pkg.module:factory [--checkpoint ckpt.pt] --input-shape 1,1,8,8 -o model.onnx``.

Builds the model with :func:`bkn_export.factory.load_model` (the same spec and checkpoint
that ``bkn parity`` takes), exports it with :func:`bkn_export.export.export_onnx` and
prints where each normalization layer went. Exit status: 0 written, 1 the export failed
a check (a fold guarantee, the exporter, onnx.checker, the write), 2 bad input (spec,
checkpoint, shape, statistics, an unsupported layer).
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any

import torch

from bkn_export.errors import (
    BKNError,
    BKNInputError,
    CheckpointError,
    FactoryError,
    InvalidStatisticsError,
    UnsupportedLayerError,
)

__all__ = ["add_arguments", "parse_factory_arg", "parse_shape", "run"]

_BAD_INPUT = (BKNInputError, CheckpointError, FactoryError, InvalidStatisticsError, UnsupportedLayerError)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,1,8,8' -> (1, 1, 8, 8); every entry a positive integer."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: expected positive integers like 1,3,32,32")
    return shape


def parse_factory_arg(text: str) -> tuple[str, Any]:
    """'width=32' -> ('width', 32); values are Python literals, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--factory-arg {text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bkn_export.export.op_spec import MAX_OPSET, MIN_OPSET

    parser.add_argument("spec", help="model factory as pkg.module:factory (or path/to/file.py:factory)")
    parser.add_argument("--checkpoint", help="state dict saved with torch.save(model.state_dict(), path)")
    parser.add_argument(
        "--input-shape",
        type=parse_shape,
        action="append",
        required=True,
        help="shape of an example input, e.g. 1,1,8,8 (repeat for several inputs)",
    )
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--mode", choices=("inference", "training"), default="inference")
    parser.add_argument(
        "--opset",
        type=int,
        choices=range(MIN_OPSET, MAX_OPSET + 1),
        metavar=f"{{{MIN_OPSET}..{MAX_OPSET}}}",
        default=None,
        help="ONNX opset of the default domain",
    )
    parser.add_argument("--fp16", action="store_true", help="float16 weights, inputs and outputs")
    parser.add_argument("--dynamic-spatial", action="store_true", help="make dims 2.. of every input symbolic")
    parser.add_argument("--static-batch", action="store_true", help="keep the batch size of --input-shape fixed")
    parser.add_argument(
        "--factory-arg", type=parse_factory_arg, action="append", default=[], help="KEY=VALUE for the factory"
    )
    parser.add_argument(
        "--external-data-threshold",
        type=int,
        default=None,
        help="bytes of weights above which they go to <output>.data (default 2 GiB)",
    )


def _print_report(result: Any) -> None:
    print(f"wrote {result.path} (mode={result.mode}, opset={result.opset})")
    for record in result.fold_report:
        target = record.target or "-"
        print(f"  {record.module:<32} {record.kind:<15} {target:<40} {record.detail}")


def run(args: argparse.Namespace) -> int:
    from bkn_export.export import export_onnx
    from bkn_export.factory import load_model

    options: dict[str, Any] = {}
    if args.external_data_threshold is not None:
        options["external_data_threshold"] = args.external_data_threshold
    try:
        model = load_model(args.spec, args.checkpoint, **dict(args.factory_arg))
        example = tuple(torch.randn(*shape) for shape in args.input_shape)
        result = export_onnx(
            model,
            example,
            args.output,
            mode=args.mode,
            opset=args.opset,
            dynamic_batch=not args.static_batch,
            dynamic_spatial=args.dynamic_spatial,
            fp16=args.fp16,
            **options,
        )
    except _BAD_INPUT as error:
        print(f"bkn export: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    except BKNError as error:
        print(f"bkn export: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    _print_report(result)
    return 0
