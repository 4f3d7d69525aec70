"""BKN train step (forward + backward) vs nn.BatchNorm2d on CPU, side by side in one run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_layers.py [--threads 1] [--repeats 15] [--steps 5]

For each shape (N, C, H, W) it times, interleaved in rotating order within every repeat:

* ``batchnorm``  — ``nn.BatchNorm2d``;
* ``bkn-unwired`` — an unwired ``BatchKalmanNorm2d`` (no chain: BatchNorm, which in eager CPU
  training with a float momentum runs as ATen's BatchNorm, ``_BatchKalmanNorm._batchnorm_step``, except on
  inputs where the op's CPU fast path is the faster one, :func:`bkn_export.cpu_kernels.op_outruns_batchnorm`);
* ``bkn-first``  — a first-in-chain ``BatchKalmanNorm2d`` (BatchNorm math through the BKN op:
  its posterior is published to the chain), the op's fixed cost;
* ``bkn-wired``  — a ``BatchKalmanNorm2d`` with a predecessor (default options: ``propagate``
  through a 3x3 conv with ReLU, learned gain, process noise): prediction, update,
  normalization and the gradients into the predecessor's posterior and the conv weights;
* ``reference``  — (with ``--reference``) the functional reference under autograd, for scale;
* ``bkn-first-3pass`` — (with ``--three-pass``) ``bkn-first`` with ∂L/∂x built by ATen's three passes
  instead of the one-pass C kernel (:func:`bkn_export.cpu_kernels.aten_input_gradient`);
* ``bkn-wired-separate`` — (with ``--separate-heads``) ``bkn-wired`` with its path's head (the source's output
  variance, ReLU's and the conv's moments) as separate autograd nodes instead of one
  (:func:`bkn_export.chain.path_moments.separate`).

One timed sample is ``--steps`` train steps; the figure is the median over ``--repeats``
samples, printed in ms and as a ratio to BatchNorm. The default clock is this process's
CPU time (``time.process_time``), which on a machine shared with other jobs leaves out the
time the process waits for a core (with one torch thread it is the step's own work);
``--clock wall`` uses ``time.perf_counter``. The numbers in benchmarks/RESULTS.md say
what else was running.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bkn_export import BatchKalmanNorm2d, cpu_kernels, wire_chain
from bkn_export import functional as Fk
from bkn_export.chain import path_moments
from bkn_export.chain.scope import Published, forward_scope

DEFAULT_SHAPES = ((8, 64, 32, 32), (2, 256, 14, 14), (32, 128, 16, 16))


def _batchnorm_step(shape: tuple[int, ...]) -> Callable[[], None]:
    layer = nn.BatchNorm2d(shape[1]).train()
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def step() -> None:
        layer(x).backward(grad)

    return step


def _bkn_unwired_step(shape: tuple[int, ...]) -> Callable[[], None]:
    layer = BatchKalmanNorm2d(shape[1]).train()
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    assert layer.chain is None

    def step() -> None:
        layer(x).backward(grad)

    return step


def _bkn_first_step(shape: tuple[int, ...]) -> Callable[[], None]:
    channels = shape[1]
    layer, follower = BatchKalmanNorm2d(channels), BatchKalmanNorm2d(channels)
    model = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), follower)
    wire_chain(model, torch.randn(2, channels, 4, 4))
    layer.train()  # first in the chain: BatchNorm math through the BKN op
    assert not layer.has_predecessor and follower.has_predecessor
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def step() -> None:
        layer(x).backward(grad)  # outside a forward of the model: no scratch is kept

    return step


def _bkn_wired_step(shape: tuple[int, ...]) -> Callable[[], None]:
    channels = shape[1]
    layer = BatchKalmanNorm2d(channels)
    model = nn.Sequential(BatchKalmanNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), layer)
    wire_chain(model, torch.randn(2, channels, 4, 4))
    layer.train()
    assert layer.chain is not None and layer.chain.transition == "propagate"
    source = model[0]
    # The predecessor's posterior as leaves, so the step times this layer alone (its
    # prediction, update, normalization, and the gradients into posterior and conv weights).
    previous_mean = torch.randn(channels, requires_grad=True)
    previous_variance = (torch.rand(channels) + 0.5).requires_grad_()
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def step() -> None:
        with forward_scope(model) as scratch:
            scratch.published["0"] = Published(
                previous_mean,
                previous_variance,
                x.numel() // channels,
                tuple(x.shape),
                source.weight,
                source.bias,
                1e-5,
            )
            layer(x).backward(grad)

    return step


def _separate_heads(step: Callable[[], None]) -> Callable[[], None]:
    def stepped() -> None:
        with path_moments.separate():
            step()

    return stepped


def _three_pass(step: Callable[[], None]) -> Callable[[], None]:
    def stepped() -> None:
        with cpu_kernels.aten_input_gradient():
            step()

    return stepped


def _reference_step(shape: tuple[int, ...]) -> Callable[[], None]:
    channels = shape[1]
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    prior_mean, prior_variance = torch.zeros(channels), torch.ones(channels)
    prior_weight = torch.full((channels,), 0.5, requires_grad=True)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def step() -> None:
        out = Fk.batch_kalman_norm(x, prior_mean, prior_variance, prior_weight, weight, bias, 1e-5)
        out.output.backward(grad)

    return step


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _time(step: Callable[[], None], steps: int, clock: Callable[[], float] = time.process_time) -> float:
    start = clock()
    for _ in range(steps):
        step()
    return (clock() - start) / steps


def measure(
    shape: tuple[int, ...],
    repeats: int,
    steps: int,
    reference: bool,
    clock: Callable[[], float] = time.process_time,
    three_pass: bool = False,
    separate_heads: bool = False,
) -> dict[str, float]:
    """Median seconds per train step of each variant on ``shape``, interleaved."""
    variants: dict[str, Callable[[], None]] = {
        "batchnorm": _batchnorm_step(shape),
        "bkn-unwired": _bkn_unwired_step(shape),
        "bkn-first": _bkn_first_step(shape),
        "bkn-wired": _bkn_wired_step(shape),
    }
    if reference:
        variants["reference"] = _reference_step(shape)
    if three_pass:
        variants["bkn-first-3pass"] = _three_pass(_bkn_first_step(shape))
    if separate_heads:
        variants["bkn-wired-separate"] = _separate_heads(_bkn_wired_step(shape))
    names = list(variants)
    for name in names:  # warm up allocator and caches
        _time(variants[name], 2)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate who goes first
        for name in order:
            samples[name].append(_time(variants[name], steps, clock))
    return {name: statistics.median(values) for name, values in samples.items()}


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.lower().split("x"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timed samples per variant (median taken)")
    parser.add_argument("--steps", type=int, default=5, help="train steps per timed sample")
    parser.add_argument("--shapes", nargs="*", type=_parse_shape, default=list(DEFAULT_SHAPES), help="e.g. 8x64x32x32")
    parser.add_argument("--reference", action="store_true", help="also time the functional reference (autograd)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: process CPU time; wall: elapsed")
    parser.add_argument(
        "--three-pass", action="store_true", help="also time bkn-first with ATen's three passes for the input gradient"
    )
    parser.add_argument(
        "--separate-heads", action="store_true", help="also time bkn-wired with its path head as separate nodes"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
        f"median of {args.repeats} x {args.steps} steps"
    )
    header = f"{'shape (N, C, H, W)':<22}{'batchnorm ms':>14}"
    header += f"{'unwired ms':>14}{'ratio':>7}{'bkn-first ms':>14}{'ratio':>7}{'bkn-wired ms':>14}{'ratio':>7}"
    extra = (
        *(("reference",) if args.reference else ()),
        *(("bkn-first-3pass",) if args.three_pass else ()),
        *(("bkn-wired-separate",) if args.separate_heads else ()),
    )
    for name in extra:
        header += f"{name + ' ms':>{max(14, len(name) + 5)}}{'ratio':>7}"
    print(header)
    for shape in args.shapes:
        result = measure(
            shape, args.repeats, args.steps, args.reference, CLOCKS[args.clock], args.three_pass, args.separate_heads
        )
        base = result["batchnorm"]
        line = f"{shape!s:<22}{base * 1e3:>14.3f}"
        for name in ("bkn-unwired", "bkn-first", "bkn-wired", *extra):
            line += f"{result[name] * 1e3:>14.3f}{result[name] / base:>6.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
