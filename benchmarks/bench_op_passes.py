"""The BKN op's activation-sized passes on CPU: the C kernels against the ATen forms they replace.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_op_passes.py [--shapes 2x16x112x112 2x960x7x7 ...] [--repeats 15]
        [--calls 30] [--steady-malloc]

Per shape (N, C, H, W), float32, one torch thread, interleaved in every repeat (the order alternates), median of
``--repeats`` samples of ``--calls`` calls, µs per call:

* batch statistics (``bkn_export.cpu_kernels.batch_statistics``): the C kernel ``kalman_batch_statistics`` against
  the ATen form (``bkn_export.native.disabled()``), and each one's largest relative error against the float64
  statistics of the same float32 values (the input has mean 100 and spread 3, so centring matters);
* ∂L/∂x (``cpu_kernels.backward_from_state``, the whole backward of the op): the one-pass C kernel
  ``kalman_input_gradient`` against ATen's three passes (``cpu_kernels.aten_input_gradient()``).

``--steady-malloc`` fixes glibc's allocator thresholds as ``bench_networks.py --steady-malloc`` does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_networks import _steady_malloc, interleaved_medians

from bkn_export import cpu_kernels, native
from bkn_export import functional as Fk


def _interleaved(variants: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    """Median µs per call of each variant, interleaved (:func:`bench_networks.interleaved_medians`), elapsed time."""
    medians = interleaved_medians(variants, repeats, calls, time.perf_counter)
    return {name: milliseconds * 1e3 for name, milliseconds in medians.items()}


def _relative_error(got: Fk.BatchStatistics, exact: Fk.BatchStatistics) -> float:
    return max(
        float(((part.double() - want).abs() / want.abs()).max())
        for part, want in ((got.mean, exact.mean), (got.variance, exact.variance))
    )


def _measure(shape: tuple[int, ...], repeats: int, calls: int) -> str:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3.0 + 100.0
    exact = Fk.batch_statistics(x.double())

    def aten_statistics() -> Fk.BatchStatistics:
        with native.disabled():
            return cpu_kernels.batch_statistics(x)

    times = _interleaved({"kernel": lambda: cpu_kernels.batch_statistics(x), "aten": aten_statistics}, repeats, calls)
    errors = (_relative_error(cpu_kernels.batch_statistics(x), exact), _relative_error(aten_statistics(), exact))

    channels = shape[1]
    inputs = Fk.KalmanNormInputs(
        x, torch.full((channels,), 100.0), torch.ones(channels), torch.full((channels,), 0.5),
        torch.ones(channels), torch.zeros(channels), 1e-5, 0.0,
    )  # fmt: skip
    state = cpu_kernels.forward_state(inputs)
    grads = (torch.randn(shape, generator=generator), None, None)

    def three_passes() -> object:
        with cpu_kernels.aten_input_gradient():
            return cpu_kernels.backward_from_state(inputs, state, *grads)

    backward = _interleaved(
        {"one": lambda: cpu_kernels.backward_from_state(inputs, state, *grads), "three": three_passes}, repeats, calls
    )
    return (
        f"{shape!s:<20} {times['kernel']:>9.1f} {times['aten']:>9.1f} {times['aten'] / times['kernel']:>6.2f}x"
        f" {errors[0]:>9.1e} {errors[1]:>9.1e}   {backward['one']:>9.1f} {backward['three']:>9.1f}"
        f" {backward['three'] / backward['one']:>6.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["2x16x112x112", "2x72x56x56", "2x120x28x28", "2x480x14x14", "2x960x7x7", "16x144x56x56"],
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--steady-malloc", action="store_true", help="fix glibc's malloc thresholds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    allocator = _steady_malloc() if args.steady_malloc else "default (glibc's dynamic thresholds)"
    if native.library() is None:
        print(f"bkn_export.native unavailable: {native.status()}", file=sys.stderr)
        return 2
    shapes = []
    for text in args.shapes:
        parts = text.lower().split("x")
        if len(parts) < 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
            print(f"bad shape {text!r}: want positive sizes N x C x ..., e.g. 2x16x112x112", file=sys.stderr)
            return 2
        shapes.append(tuple(int(part) for part in parts))
    print(f"torch {torch.__version__}, 1 thread, float32, malloc: {allocator}; µs per call, median")
    print(
        f"{'shape (N, C, H, W)':<20} {'stats C':>9} {'ATen':>9} {'ratio':>7} {'C error':>9} {'ATen err':>9}"
        f"   {'bwd 1-pass':>9} {'3-pass':>9} {'ratio':>7}"
    )
    for shape in shapes:
        print(_measure(shape, args.repeats, args.calls), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
