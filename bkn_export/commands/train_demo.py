"""``bkn train-demo``: the micro-batch benchmark.

Trains a demo network (``--network``: :class:`bkn_export.demo.models.DigitsResNet` or
:class:`bkn_export.demo.models.DigitsSiLUPoolNet`) on scikit-learn's digits with each
normaliser at each batch size for several seeds, at a fixed number of samples seen
(see :mod:`bkn_export.demo.training`), and reports the test accuracy in eval mode
(running statistics) as mean ± std over seeds: a rich table on the console, a JSON
file with the settings and every run, and a PNG plot. Files are written atomically
(:mod:`bkn_export.atomic`) and the JSON is rewritten after every run, so an
interrupted benchmark keeps what it finished.

Exit status (:mod:`bkn_export.commands.exit_codes`): 0 when every run finished, 1 when a
run raised an error (recorded in the JSON), 2 for bad arguments or environment (an
unwritable ``--out``; scikit-learn or matplotlib missing: ``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bkn_export import native
from bkn_export.atomic import check_writable, write_bytes_atomic
from bkn_export.commands.arguments import nonempty_path, positive_float, positive_int
from bkn_export.commands.exit_codes import run_command
from bkn_export.demo.environment import cpu_model_name
from bkn_export.demo.models import NETWORKS, NORMALIZERS
from bkn_export.errors import OptionError, OutputWriteError

__all__ = ["DEFAULTS", "QUICK", "add_arguments", "run", "summarize"]

#: The full benchmark (on ``--network``, default digits_resnet).
DEFAULTS: dict[str, Any] = {
    "batch_sizes": [1, 2, 4, 8, 32],
    "seeds": 3,
    "normalizers": list(NORMALIZERS),
    "epochs": 6.0,
}
#: ``--quick``: the two batch sizes that show the effect, two seeds, without the slowest
#: normalizer (bkn-authors samples its prior): a few minutes on 2 cores.
QUICK: dict[str, Any] = {
    "batch_sizes": [2, 32],
    "seeds": 2,
    "normalizers": ["batchnorm", "groupnorm", "bkn"],
    "epochs": 6.0,
}
RESULTS_NAME = "results.json"
PLOT_NAME = "accuracy_vs_batch_size.png"


# ---------------------------------------------------------------------- arguments


def _batch_sizes(text: str) -> list[int]:
    """'1,2,4' or '8' -> [1, 2, 4] / [8]; every value a positive integer."""
    values = []
    for part in text.replace(",", " ").split():
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"batch size {part!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"batch size {value} must be a positive integer (>= 1)")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("give at least one batch size, e.g. --batch-sizes 2,32")
    return values


def _normalizers(text: str) -> list[str]:
    """'batchnorm,bkn' -> ['batchnorm', 'bkn']; each one of NORMALIZERS."""
    values = [part for part in text.replace(",", " ").split() if part]
    for value in values:
        if value not in NORMALIZERS:
            raise argparse.ArgumentTypeError(f"unknown normalizer {value!r}; choose from {', '.join(NORMALIZERS)}")
    if not values:
        raise argparse.ArgumentTypeError(f"give at least one normalizer from {', '.join(NORMALIZERS)}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bkn train-demo`` (defaults: the full benchmark; see ``--quick``)."""
    full = DEFAULTS
    parser.add_argument(
        "--network",
        choices=NETWORKS,
        default=NETWORKS[0],
        help=(
            "digits_resnet: Conv-norm-ReLU residual net; digits_silu_pool: SiLU and average/max pooling between "
            f"its normalizations (default {NETWORKS[0]})"
        ),
    )
    parser.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        nargs="+",
        help=f"batch sizes, comma- or space-separated (default {','.join(map(str, full['batch_sizes']))})",
    )
    parser.add_argument(
        "--seeds", type=positive_int, help=f"number of seeds per setting, 0..N-1 (default {full['seeds']})"
    )
    parser.add_argument(
        "--normalizers",
        type=_normalizers,
        nargs="+",
        help=f"normalizers from {', '.join(NORMALIZERS)} (default: all)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_float,
        help=f"passes over the training set, the same samples seen at every batch size (default {full['epochs']})",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=0.1, help="SGD learning rate at batch 32, scaled linearly (default 0.1)"
    )
    parser.add_argument("--width", type=positive_int, default=16, help="channels of the first stage (default 16)")
    parser.add_argument(
        "--stem-stride",
        type=int,
        choices=(1, 2),
        default=2,
        help=(
            "stride of digits_resnet's first conv: 2 gives 4×4/2×2 maps, so batch statistics are noisier "
            "(default 2; digits_silu_pool pools instead and ignores it)"
        ),
    )
    parser.add_argument("--max-shift", type=int, default=1, help="random shift augmentation in pixels (default 1)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"a small subset: batch sizes {QUICK['batch_sizes']}, {QUICK['seeds']} seeds, "
            f"{', '.join(QUICK['normalizers'])} (a few minutes on 2 cores)"
        ),
    )
    parser.add_argument(
        "--out",
        type=lambda text: Path(nonempty_path(text)),
        default=Path("bkn-out/train-demo"),
        help="output directory (default bkn-out/train-demo)",
    )


def _flatten(lists: list[list[Any]] | None) -> list[Any] | None:
    return None if lists is None else [v for sub in lists for v in sub]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved settings: options given override the --quick or full defaults; OptionError (exit 2) if invalid."""
    base = QUICK if args.quick else DEFAULTS
    batch_sizes = _flatten(args.batch_sizes) or base["batch_sizes"]
    normalizers = _flatten(args.normalizers) or base["normalizers"]
    settings: dict[str, Any] = {
        "network": str(args.network),
        "quick": bool(args.quick),
        "batch_sizes": sorted(dict.fromkeys(batch_sizes)),
        "normalizers": list(dict.fromkeys(normalizers)),
        "seeds": list(range(args.seeds or base["seeds"])),
        "epochs": float(args.epochs or base["epochs"]),
        "base_lr": float(args.lr),
        "width": int(args.width),
        "stem_stride": int(args.stem_stride),
        "max_shift": int(args.max_shift),
        "threads": int(args.threads),
    }
    for value in settings["batch_sizes"]:
        if value < 1:
            raise OptionError(f"batch size {value} must be a positive integer (>= 1)")
    for value in settings["normalizers"]:
        if value not in NORMALIZERS:
            raise OptionError(f"unknown normalizer {value!r}; choose from {', '.join(NORMALIZERS)}")
    if settings["network"] not in NETWORKS:
        raise OptionError(f"unknown network {settings['network']!r}; choose from {', '.join(NETWORKS)}")
    if settings["max_shift"] < 0:
        raise OptionError(f"--max-shift must be >= 0, got {settings['max_shift']}")
    return settings


# ---------------------------------------------------------------------- outputs


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | int]]]:
    """normalizer -> str(batch size) -> {mean, std, n} of test accuracy over the finished runs.

    std is the sample standard deviation (0 for a single seed).
    """
    grouped: dict[str, dict[int, list[float]]] = {}
    for entry in runs:
        if entry.get("result") is None:
            continue
        grouped.setdefault(entry["normalizer"], {}).setdefault(entry["batch_size"], []).append(
            entry["result"]["test_accuracy"]
        )
    summary: dict[str, dict[str, dict[str, float | int]]] = {}
    for name, by_batch in grouped.items():
        summary[name] = {}
        for batch_size in sorted(by_batch):
            values = by_batch[batch_size]
            summary[name][str(batch_size)] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return summary


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_kernels": native.status(),
        "argv": list(sys.argv),
    }


def _table(summary: dict[str, dict[str, dict[str, float | int]]], settings: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        min_width=60,
        title=(
            f"Test accuracy (%) of {settings['network']} on digits, eval mode, "
            f"mean ± std over {len(settings['seeds'])} seed(s)"
        ),
        caption=f"{settings['epochs']:g} epochs of samples at every batch size; lr {settings['base_lr']:g}·B/32",
    )
    table.add_column("normalizer")
    for batch_size in settings["batch_sizes"]:
        table.add_column(f"B={batch_size}", justify="right")
    for name in settings["normalizers"]:
        cells = []
        for batch_size in settings["batch_sizes"]:
            cell = summary.get(name, {}).get(str(batch_size))
            cells.append("—" if cell is None else f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}")
        table.add_row(name, *cells)
    return table


# ---------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; write JSON + PNG under ``args.out``; return the exit status."""
    return run_command("train-demo", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bkn_export.demo.data import load_digits_split
    from bkn_export.demo.models import build_network
    from bkn_export.demo.plots import accuracy_vs_batch_size_png, require_matplotlib
    from bkn_export.demo.training import TrainConfig, train_and_evaluate

    console = Console()
    error_console = Console(stderr=True)
    settings = _settings(args)
    # The demo extra's dependencies are checked before anything is created or trained.
    require_matplotlib()
    data = load_digits_split()
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputWriteError(f"cannot create output directory {out}: {error}; choose a writable --out") from error
    torch.set_num_threads(settings["threads"])

    # Seed-major order: an interrupted benchmark still has every setting for its first seeds.
    configs = [
        (name, TrainConfig(batch_size, seed, settings["epochs"], settings["base_lr"], max_shift=settings["max_shift"]))
        for seed in settings["seeds"]
        for name in settings["normalizers"]
        for batch_size in settings["batch_sizes"]
    ]
    total_steps = sum(config.steps(len(data.x_train)) for _, config in configs)
    report: dict[str, Any] = {
        "benchmark": "bkn train-demo",
        "measures": f"test accuracy in eval mode (running statistics) of {settings['network']} on sklearn digits",
        "settings": {**settings, "reference_batch": 32, "lr_rule": "base_lr * batch_size / 32, cosine decay"},
        "data": {"train": len(data.x_train), "test": len(data.x_test), "split_seed": 0},
        "environment": _environment(),
        "started": _now(),
        "finished": None,
        "complete": False,
        "runs": [],
        "summary": {},
    }
    results_path, plot_path = out / RESULTS_NAME, out / PLOT_NAME
    for path in (results_path, plot_path):  # a read-only --out fails now, not after the first run
        check_writable(path)

    def save() -> None:
        report["summary"] = summarize(report["runs"])
        write_bytes_atomic(results_path, (json.dumps(report, indent=2) + "\n").encode())

    console.print(
        f"[bold]bkn train-demo[/]: {len(configs)} runs ({len(settings['normalizers'])} normalizers × "
        f"{len(settings['batch_sizes'])} batch sizes × {len(settings['seeds'])} seeds), {total_steps} steps, "
        f"{settings['threads']} thread(s)"
    )
    failures = 0
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        overall = progress.add_task("all runs", total=total_steps)
        for index, (name, config) in enumerate(configs, 1):
            steps = config.steps(len(data.x_train))
            current = progress.add_task(
                f"[{index}/{len(configs)}] {name} B={config.batch_size} seed={config.seed}", total=steps
            )

            def advance(k: int, task: Any = current) -> None:
                progress.advance(task, k)
                progress.advance(overall, k)

            entry: dict[str, Any] = {"normalizer": name, "batch_size": config.batch_size, "seed": config.seed}
            try:
                build = functools.partial(
                    build_network, settings["network"], name, settings["width"], stem_stride=settings["stem_stride"]
                )
                result = train_and_evaluate(build, data, config, on_step=advance)
                entry["result"] = result.as_dict()
            except Exception as error:  # one failing setting must not lose the others
                failures += 1
                entry["result"] = None
                entry["error"] = f"{type(error).__name__}: {error}"
                error_console.print(f"[red]run {name} B={config.batch_size} seed={config.seed} failed:[/] {error}")
            progress.remove_task(current)
            report["runs"].append(entry)
            save()

    report["finished"] = _now()
    report["complete"] = True
    report["environment"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    save()
    plot = accuracy_vs_batch_size_png(
        {
            name: [(int(b), float(cell["mean"]), float(cell["std"])) for b, cell in by_batch.items()]
            for name, by_batch in report["summary"].items()
        },
        title=(
            f"{settings['network']}, eval-mode test accuracy "
            f"({len(settings['seeds'])} seed(s), {settings['epochs']:g} epochs)"
        ),
    )
    write_bytes_atomic(plot_path, plot)

    console.print(_table(report["summary"], settings))
    diverged = [r for r in report["runs"] if r.get("result") and not r["result"]["finite"]]
    if diverged:
        console.print(f"[yellow]{len(diverged)} run(s) stopped on a non-finite loss (see 'finite' in the JSON)[/]")
    console.print(f"results: {results_path.resolve()}")
    console.print(f"plot:    {plot_path.resolve()}")
    console.print(f"wall time: {report['environment']['wall_seconds']:.0f} s")
    if failures:
        error_console.print(f"bkn train-demo: {failures} run(s) failed; their errors are in {results_path}")
        return 1
    return 0
