"""``bkn demo``: train a BKN CNN at batch 2, export both modes, check parity everywhere, write reports.

Steps: train :func:`bkn_export.demo.models.digits_resnet` ("bkn") on scikit-learn's digits at
micro-batch 2 for ``--steps`` SGD steps (:func:`bkn_export.demo.training.train_and_evaluate`),
save the checkpoint, export ``mode="inference"`` (BKN folded into the convolutions) and
``mode="training"`` (``ai.bkn::BatchKalmanNorm`` nodes), run parity on every available
runtime against PyTorch (eval forward for the first, train-mode forward at batch 2 for
the second), and write a JSON and an HTML report per mode into ``--out``.

Exit status (the rule of every ``bkn`` command, :mod:`bkn_export.commands.exit_codes`): 0
both modes agree on every runtime that ran; 1 a mismatch or a failed export; 2 bad
arguments or environment (an unknown runtime name, an ``--out`` that is a file or cannot be
written, a full disk). ``--out`` and ``--runtimes`` are checked before training. Every file
is written atomically (:mod:`bkn_export.atomic`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bkn_export.commands.arguments import nonempty_path, nonnegative_int, positive_int
from bkn_export.commands.exit_codes import run_command

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=nonempty_path, default="bkn-demo", help="directory for the checkpoint, ONNX files and reports"
    )
    parser.add_argument("--steps", type=positive_int, default=1000, help="SGD steps at --batch-size (default 1000)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="training micro-batch size (default 2)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--runtimes", default="all", help="'all' or a comma-separated list (see bkn parity)")
    parser.add_argument(
        "--parity-batch", type=positive_int, default=16, help="batch of test digits for the inference-mode parity"
    )


def run(args: argparse.Namespace) -> int:
    return run_command("demo", lambda: _run(args))


def _prepare_out(out: Path) -> None:
    """Create ``out`` (a directory) or fail with OutputWriteError before any training."""
    from bkn_export.atomic import check_writable
    from bkn_export.errors import OutputWriteError

    if out.exists() and not out.is_dir():
        raise OutputWriteError(f"--out {out} is a file; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputWriteError(f"cannot create --out directory {out}: {error.strerror or error}") from error
    check_writable(out / "digits_bkn.pt")


def _check_runtimes(spec: str) -> None:
    """Refuse before training an unknown or empty ``--runtimes`` (UnknownRuntimeError), and a name none of whose
    runtimes can run here (RuntimeLoadError, as ``bkn parity`` refuses it: exit 2, an environment problem; before, the
    demo trained, exported and reported both modes as a MISMATCH, exit 1)."""
    from runtime.errors import RuntimeLoadError
    from runtime.registry import discover, names_runtime, select, selection_names

    chosen = select(discover(), spec)
    unavailable = []
    for name in (name for name in selection_names(spec) if name != "all"):
        matched = [entry for entry in chosen if names_runtime(name, entry.name)]
        if matched and not any(entry.availability.ok for entry in matched):
            reasons = "; ".join(f"{entry.name}: {entry.availability.reason}" for entry in matched)
            unavailable.append(f"{name} ({reasons})")
    if unavailable:
        raise RuntimeLoadError(
            f"runtime(s) named in --runtimes cannot run here: {', '.join(unavailable)}; name only runtimes this "
            "machine runs, or use 'all', which reports the others without failing"
        )


def _train(args: argparse.Namespace, data: Any, console: Any) -> tuple[Any, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bkn_export.demo.models import digits_resnet
    from bkn_export.demo.training import TrainConfig, train_and_evaluate

    built: list[Any] = []

    def build() -> Any:
        built.append(digits_resnet("bkn", example_batch=args.batch_size))
        return built[-1]

    epochs = args.steps * args.batch_size / len(data.x_train)
    config = TrainConfig(batch_size=args.batch_size, seed=args.seed, epochs=epochs)
    with Progress(
        TextColumn("train (batch {task.fields[batch]})"), BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("train", total=config.steps(len(data.x_train)), batch=args.batch_size)
        result = train_and_evaluate(build, data, config, on_step=lambda k: progress.advance(task, k))
    return built[-1], result


def _run(args: argparse.Namespace) -> int:
    import torch

    from bkn_export.atomic import atomic_writer
    from bkn_export.demo.data import load_digits_split
    from bkn_export.export import export_onnx
    from runtime.parity import run_parity
    from runtime.report import print_report, report_console, write_html, write_json

    console = report_console()
    out = Path(args.out)
    _check_runtimes(args.runtimes)  # first: a refused option leaves no empty --out behind
    _prepare_out(out)
    data = load_digits_split()
    model, result = _train(args, data, console)
    console.print(
        f"trained {result.steps} steps at batch {args.batch_size} in {result.seconds:.1f} s: "
        f"test accuracy {result.test_accuracy:.1%} (eval mode, running statistics)"
    )
    checkpoint = out / "digits_bkn.pt"
    with atomic_writer(checkpoint) as handle:
        torch.save(model.state_dict(), handle)
    written: list[Path] = [checkpoint]
    verdicts: dict[str, bool] = {}
    batches = {"inference": args.parity_batch, "training": args.batch_size}
    for mode, batch in batches.items():
        inputs = data.x_test[:batch]
        onnx_path = out / f"digits_bkn_{mode}.onnx"
        console.rule(f"{mode} mode")
        export_onnx(model, (data.x_test[: args.batch_size],), onnx_path, mode=mode)
        written.append(onnx_path)
        with console.status(f"parity ({mode}, batch {batch}) on every available runtime"):
            report = run_parity(
                model, onnx_path, [inputs.numpy()], mode=mode, runtimes=args.runtimes,
                model_description=f"bkn_export.demo.models:digits_resnet + {checkpoint}",
            )  # fmt: skip
        print_report(report, console)
        written.append(write_json(report, out / f"parity_{mode}.json"))
        written.append(write_html(report, out / f"parity_{mode}.html"))
        verdicts[mode] = report.passed
    console.rule("written")
    for path in written:
        console.print(f"  {path}")
    summary = ", ".join(f"{mode}: {'parity' if ok else 'MISMATCH'}" for mode, ok in verdicts.items())
    console.print(f"open {out / 'parity_inference.html'} and {out / 'parity_training.html'} in a browser ({summary})")
    return 0 if all(verdicts.values()) else 1
