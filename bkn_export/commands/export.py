"""``bkn export pkg.module:factory [--checkpoint ckpt.pt] (--input-shape 1,1,8,8 | --load-inputs x.npz) -o model.onnx``.

Builds the model with :func:`bkn_export.factory.load_model` (the same spec and checkpoint
that ``bkn parity`` takes), exports it with :func:`bkn_export.export.export_onnx` and
prints where each normalization layer went. Exit status (the rule of every ``bkn``
command, :mod:`bkn_export.commands.exit_codes`): 0 written; 1 the model cannot be exported
(an unsupported layer, non-finite weights or statistics, an exporter or checker failure, a
dynamic-spatial file that does not run at other sizes); 2 bad input or environment (spec,
checkpoint, options, input names or shapes, ``--mode training`` for a model without BKN layers, an unwritable
output path, a full disk).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from bkn_export.commands.arguments import (
    nonempty_path,
    nonnegative_int,
    parse_factory_arg,
    parse_named_shape,
    parse_shape,
)
from bkn_export.commands.exit_codes import run_command

__all__ = ["add_arguments", "example_inputs", "loaded_example_inputs", "parse_factory_arg", "parse_shape", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bkn_export.export.op.op_spec import MAX_OPSET, MIN_OPSET

    parser.add_argument("spec", help="model factory as pkg.module:factory (or path/to/file.py:factory)")
    parser.add_argument("--checkpoint", help="state dict saved with torch.save(model.state_dict(), path)")
    examples = parser.add_mutually_exclusive_group(required=True)
    examples.add_argument(
        "--input-shape",
        type=parse_named_shape,
        action="append",
        help="shape of a random (standard normal) example input, e.g. 1,1,8,8, or NAME:1,1,8,8 with NAME a "
        "forward() argument (repeat for several inputs)",
    )
    examples.add_argument(
        "--load-inputs",
        metavar="PATH",
        help="the example inputs from a file, for inputs random floats cannot be (token ids, edge indices, masks): "
        ".npz keyed by forward() argument names (np.savez), or a Polygraphy inputs JSON (its first set); "
        "floating arrays take the model's floating dtype, others keep theirs",
    )
    parser.add_argument("-o", "--output", type=nonempty_path, required=True, help="the .onnx file to write")
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
    parser.add_argument(
        "--dynamic-spatial",
        action="store_true",
        help="make dims 2.. of every input symbolic (checked by running the file at two other sizes)",
    )
    parser.add_argument("--static-batch", action="store_true", help="keep the batch size of --input-shape fixed")
    parser.add_argument(
        "--factory-arg", type=parse_factory_arg, action="append", default=[], help="KEY=VALUE for the factory"
    )
    parser.add_argument(
        "--external-data-threshold",
        type=nonnegative_int,
        default=None,
        help="total bytes of tensors above which every tensor of 1 KiB or more goes to <output>.<pid>-<id>.data "
        "(default 2 GiB; smaller ones stay in the model file)",
    )
    parser.add_argument(
        "--graph-optimizer",
        choices=("full", "fold", "none"),
        default=None,
        help="--mode training: how much of onnxscript's optimizer runs on the traced graph: full (default, the "
        "smallest graph), fold (constant folding only: minutes faster on dense networks such as DenseNet), none",
    )
    parser.add_argument(
        "--input-names", help="comma-separated graph input names (default: the forward() argument names)"
    )
    parser.add_argument(
        "--output-names",
        help="comma-separated graph output names (default: output, output_0, output_1, ... or a dict output's keys)",
    )


def _memory_bytes() -> int | None:
    """Physical memory of this machine in bytes, if the OS says."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def example_inputs(model: Any, shapes: list[tuple[str | None, tuple[int, ...]]]) -> tuple[Any, ...]:
    """Random example tensors for ``model.forward``, from ``--input-shape`` values, in the model's floating dtype
    (its first floating parameter's or buffer's; float32 where it has none: a float64 model gets float64 examples).

    Named shapes (``x:1,3,8,8``) are placed by the forward() argument of that name; they
    must cover the first k arguments. Raises :class:`OptionError` for unknown, repeated or
    mixed names, and when the tensors would need more than a quarter of this machine's
    memory (the export traces one example; its batch is dynamic, so a small one is enough).
    """
    import math

    import torch

    from bkn_export.errors import OptionError
    from bkn_export.export.pipeline import forward_argument_names, leading_arguments_problem

    named = [name for name, _ in shapes if name is not None]
    if named and len(named) != len(shapes):
        raise OptionError("--input-shape: give every input as NAME:SHAPE, or none (then they follow forward()'s order)")
    if named:
        problem = leading_arguments_problem(model, named)
        if problem is not None:
            raise OptionError(f"--input-shape: {problem}")
        arguments = forward_argument_names(model)
        shapes = sorted(shapes, key=lambda item: arguments.index(str(item[0])))
    dtype = _floating_dtype(model)
    needed = sum(dtype.itemsize * math.prod(shape) for _, shape in shapes)
    memory = _memory_bytes()
    if memory is not None and needed > memory // 4:
        raise OptionError(
            f"--input-shape {[list(s) for _, s in shapes]} needs {needed / 2**30:.1f} GiB for the example alone "
            f"(this machine has {memory / 2**30:.1f} GiB); the batch is dynamic, so export with a small example "
            "such as batch 1"
        )
    return tuple(torch.randn(*shape, dtype=dtype) for _, shape in shapes)


def loaded_example_inputs(model: Any, path: str) -> tuple[Any, ...]:
    """Example tensors for ``model.forward`` from ``--load-inputs``: the file's first input set, its arrays placed by
    forward() argument name. Floating arrays are cast to the model's floating dtype (as random examples are made);
    integer and boolean arrays keep their dtype. Raises :class:`OptionError` where the names do not cover the first
    k arguments, or an array cannot become a tensor (a dtype torch has not)."""
    import numpy as np
    import torch

    from bkn_export.errors import OptionError
    from bkn_export.export.pipeline import forward_argument_names, leading_arguments_problem
    from runtime.polygraphy_io import load_inputs

    feeds = load_inputs(path)
    if not feeds or not feeds[0]:
        raise OptionError(f"--load-inputs {path}: the file holds no input")
    feed = feeds[0]
    problem = leading_arguments_problem(model, list(feed))
    if problem is not None:
        raise OptionError(f"--load-inputs {path}: {problem}")
    arguments = forward_argument_names(model)
    count = len(feed)
    dtype = _floating_dtype(model)
    tensors = []
    for name in arguments[:count]:
        array = np.asarray(feed[name])
        if not array.dtype.isnative:  # big-endian data from another machine: the same values in this one's order
            array = array.astype(array.dtype.newbyteorder("="))
        try:
            tensor = torch.from_numpy(np.array(array, order="C", copy=True))  # a 0-d array stays 0-d
        except TypeError as error:
            raise OptionError(
                f"--load-inputs {path}: input {name!r} of dtype {array.dtype} is not a torch dtype"
            ) from error
        tensors.append(tensor.to(dtype) if tensor.is_floating_point() else tensor)
    return tuple(tensors)


def _floating_dtype(model: Any) -> Any:
    import torch

    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _names(text: str | None, option: str) -> list[str] | None:
    from bkn_export.errors import OptionError

    if text is None:
        return None
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise OptionError(f"{option} {text!r}: expected comma-separated non-empty names")
    return names


def _print_report(result: Any) -> None:
    print(f"wrote {result.path} (mode={result.mode}, opset={result.opset})")
    for record in result.fold_report:
        target = record.target or "-"
        print(f"  {record.module:<32} {record.kind:<15} {target:<40} {record.detail}")


def _check_example_runs(model: Any, example: Any, given: str) -> None:
    """One eval, no-grad forward on the example: a shape the model cannot take is bad input (OptionError, exit 2).
    ``given``: the option the example came from, as the user wrote it.

    Catches a wrong channel count (``--input-shape 2,3,8,8`` for a 1-channel stem) before
    tracing, where it would read as an export failure of the model. Modes are restored.
    """
    from bkn_export.errors import BKNError, OptionError
    from bkn_export.module_modes import call_example, eval_mode

    try:
        with eval_mode(model), torch_no_grad():
            call_example(model, example)
    except BKNError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise OptionError(
            f"{given}: the model does not run on this example ({type(error).__name__}: {first}); give the "
            "shapes (and dtypes) its forward() expects (N, C, ...)"
        ) from error


def _check_has_bkn_layers(model: Any, spec: str) -> None:
    """``--mode training`` for a model without BKN layers is a wrong pairing of option and model, not a defect of
    the model (it exports in inference mode): OptionError, exit 2, before anything is traced."""
    from bkn_export.chain.wire import bkn_layers
    from bkn_export.errors import OptionError

    if not bkn_layers(model):
        raise OptionError(
            f"--mode training: the model of {spec} ({type(model).__name__}) has no BatchKalmanNorm layers, so a "
            "training-mode file would have no BKN step; convert it in the factory with "
            "bkn_export.convert_batchnorm(model, example_inputs), or export with --mode inference"
        )


def torch_no_grad() -> Any:
    """``torch.no_grad()``, imported late so that ``bkn --help`` stays fast."""
    import torch

    return torch.no_grad()


def _run(args: argparse.Namespace) -> int:
    from bkn_export.atomic import check_writable
    from bkn_export.commands.paths import check_distinct_paths, spec_file
    from bkn_export.errors import OptionError
    from bkn_export.export import export_onnx
    from bkn_export.factory import load_model

    check_writable(args.output)  # before building and tracing the model
    check_distinct_paths({"-o": args.output}, {"the model spec": spec_file(args.spec), "--checkpoint": args.checkpoint})
    options: dict[str, Any] = {}
    if args.external_data_threshold is not None:
        options["external_data_threshold"] = args.external_data_threshold
    if args.graph_optimizer is not None:
        if args.mode != "training":
            raise OptionError(
                "--graph-optimizer applies to --mode training only (the inference export's BatchNorm fold needs "
                "the full optimizer)"
            )
        options["graph_optimizer"] = args.graph_optimizer
    model = load_model(args.spec, args.checkpoint, **dict(args.factory_arg))
    if args.mode == "training":
        _check_has_bkn_layers(model, args.spec)
    if args.load_inputs:
        example = loaded_example_inputs(model, args.load_inputs)
        given = f"--load-inputs {args.load_inputs}"
    else:
        example = example_inputs(model, args.input_shape)
        given = "--input-shape " + ", ".join(
            f"{name + ':' if name else ''}{','.join(map(str, shape))}" for name, shape in args.input_shape
        )
    _check_example_runs(model, example, given)
    result = export_onnx(
        model,
        example,
        args.output,
        mode=args.mode,
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        dynamic_spatial=args.dynamic_spatial,
        fp16=args.fp16,
        input_names=_names(args.input_names, "--input-names"),
        output_names=_names(args.output_names, "--output-names"),
        **options,
    )
    _print_report(result)
    if not args.checkpoint:
        print(
            "note: no --checkpoint: this file holds the factory's own weights (random unless the factory loads "
            "some); check it with `bkn parity` on the same weights"
        )
    sys.stdout.flush()
    return 0


def run(args: argparse.Namespace) -> int:
    return run_command("export", lambda: _run(args))
