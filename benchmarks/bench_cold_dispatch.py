"""What a small operator costs right after a convolution on this CPU: the price of host code run cold.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_cold_dispatch.py [--repeats 60] [--shape 2x64x112x112] [--threads 1]
        [--json out.json]

Why: a wired BKN layer's step runs many small operators and a good deal of Python (the prediction through the
path's steps, the Kalman update, the running statistics) between two convolutions of the network. On some machines
the first host code after a convolution over a micro-batch's activations (a few MiB) runs much slower than the
same code warm; a single pass over the same tensor (a ReLU, a sum) costs it far less, so it is not the data size
alone (the cause is not measured here: caches, TLB, the convolution library's own state). This script times,
``--threads`` torch threads (default one), median of ``--repeats`` samples in µs:

* ``add_ warm``: ``a.add_(b)`` on (240,) float32 tensors, right after another ``add_``;
* ``add_ after <op>``: the same ``add_`` right after ``<op>`` on x of ``--shape``: a depthwise 3×3 conv, a 1×1 conv
  (C → C), a ReLU (one pass over x), and a sum over x;
* ``2nd add_ after dw conv``: the ``add_`` that follows the first one after the depthwise conv (warm again);
* ``python loop warm`` / ``python loop after dw conv``: a 100-iteration Python loop, no torch call.

The difference between the cold and warm figures is a cost that no kernel's time shows; how large it is depends on
the machine (benchmarks/RESULTS.md, "Twenty-fifth round"). ``--json`` writes the figures with the settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_networks import cpu_model

from bkn_export.atomic import write_text_atomic


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 2x64x112x112") from None
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want N x C x H x W, each at least 1")
    return shape


def _median_us(before: Callable[[], object], timed: Callable[[], object], repeats: int, skip: int = 0) -> float:
    """Median µs of ``timed`` run right after ``before`` (after ``skip`` untimed runs of ``timed``)."""
    samples = []
    for _ in range(repeats):
        before()
        for _ in range(skip):
            timed()
        start = time.perf_counter()
        timed()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def measure(shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """The figures of the module docstring, µs by name."""
    torch.manual_seed(0)
    channels = shape[1]
    small, other = torch.randn(240), torch.randn(240)
    x = torch.randn(shape)
    depthwise = torch.randn(channels, 1, 3, 3)
    pointwise = torch.randn(channels, channels, 1, 1)

    def add() -> None:
        small.add_(other)

    def loop() -> int:
        total = 0
        for i in range(100):
            total += i
        return total

    def depthwise_conv() -> torch.Tensor:
        return torch.conv2d(x, depthwise, padding=1, groups=channels)

    before: dict[str, Callable[[], object]] = {
        "dw conv": depthwise_conv,
        "1x1 conv": lambda: torch.conv2d(x, pointwise),
        "relu": lambda: torch.relu(x),
        "sum": lambda: x.sum(),
    }
    with torch.no_grad():
        figures = {"add_ warm": _median_us(add, add, repeats)}
        figures.update({f"add_ after {name}": _median_us(op, add, repeats) for name, op in before.items()})
        figures["2nd add_ after dw conv"] = _median_us(depthwise_conv, add, repeats, skip=1)
        figures["python loop warm"] = _median_us(loop, loop, repeats)
        figures["python loop after dw conv"] = _median_us(depthwise_conv, loop, repeats)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--shape", type=_shape, default=(2, 64, 112, 112), help="x of the ops before: N x C x H x W")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures as JSON to this path")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    figures = measure(args.shape, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {cpu_model()}; x {tuple(args.shape)}; median µs")
    for name, value in figures.items():
        print(f"{name:28s} {value:9.1f}")
    if args.json:
        record = {
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "threads": args.threads,
            "repeats": args.repeats,
            "shape": list(args.shape),
            "us": figures,
        }
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
