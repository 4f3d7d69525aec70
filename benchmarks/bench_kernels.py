"""Triton BKN vs cuDNN BatchNorm: forward+backward time on ResNet-50 layer shapes.

For every BatchNorm shape of ResNet-50 (v1.5, 224x224 input) at batch 1, 2, 8 and 32,
measured side by side in one run on one GPU:

* ``bn``:  ``torch.nn.functional.batch_norm(training=True)`` (cuDNN) forward, then
  ``autograd.grad`` for (x, γ, β); the running statistics update is inside cuDNN.
* ``bkn``: what a wired layer's train step runs on the Triton route in eager execution:
  :func:`bkn_export.triton_step.kalman_norm_step` (one autograd node over the forward and
  backward kernels) with a prior (p = 0.5), the running-statistics update as the module does
  it (:func:`bkn_export.per_channel.update_running_statistics_`, one launch), then
  ``autograd.grad`` for (x, prior mean, prior variance, p, γ, β).
* ``op`` (``--op``): the same step through the contract op ``torch.ops.bkn.batch_kalman_norm`` (what
  traced graphs, ``torch.compile`` and a layer that replaces ``_kalman_step`` run) and the
  functional running-statistics update: the same kernels behind ``torch.library``'s Python
  dispatch, to show what that dispatch costs per call.
* ``ref`` (``--reference``): the op with ``BKN_DISABLE_TRITON=1``: the unfused
  PyTorch reference on the GPU, to show what the fusion buys.

Times are ``triton.testing.do_bench`` means (CUDA events, L2 flushed before each run).
Bandwidth counts the traffic of a fused three-pass forward + two-pass backward, the
minimum for training-mode BatchNorm on tensors that do not fit on chip and the same for
both: forward reads x twice and writes y, backward reads (x, g) twice and writes
grad_x, i.e. 8 · numel · itemsize bytes. Peak bandwidth is the device's theoretical
DRAM bandwidth, 2 (double data rate) x memory clock x bus width / 8, from
``torch.cuda.get_device_properties`` (``memory_clock_rate`` in kHz,
``memory_bus_width`` in bits) or, on torches without those fields, from Triton's driver
utilities; ``--peak-gbps`` overrides it.

Usage::

    python benchmarks/bench_kernels.py [--dtype float16] [--channels-last] [--batches 1 2 8 32]
                                       [--op] [--reference] [--json results.json]

Without a CUDA GPU (or without Triton) it prints why and exits 0. ``--smoke`` runs the
same code on one tiny shape on the CPU (the op's CPU implementation, wall-clock timer,
nominal 1 GB/s peak): a check that the script works, its figures mean nothing
(tests/test_gpu_check.py runs it; benchmarks/gpu_check.sh runs the real thing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: (name, channels, height = width) of every BatchNorm in ResNet-50 v1.5 at 224x224.
RESNET50_SHAPES: list[tuple[str, int, int]] = [
    ("conv1", 64, 112),
    ("layer1.bn1/2", 64, 56),
    ("layer1.bn3", 256, 56),
    ("layer2.0.bn1", 128, 56),
    ("layer2.bn2", 128, 28),
    ("layer2.bn3", 512, 28),
    ("layer3.0.bn1", 256, 28),
    ("layer3.bn2", 256, 14),
    ("layer3.bn3", 1024, 14),
    ("layer4.0.bn1", 512, 14),
    ("layer4.bn2", 512, 7),
    ("layer4.bn3", 2048, 7),
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_EPS = 1e-5
_MOMENTUM = 0.1


@dataclass
class Row:
    layer: str
    batch: int
    shape: list[int]
    bn_ms: float
    bkn_ms: float
    ratio: float
    bn_peak_fraction: float
    bkn_peak_fraction: float
    op_ms: float | None
    ref_ms: float | None


def peak_bandwidth_gbps(device: int) -> tuple[float, str]:
    """Theoretical DRAM bandwidth in GB/s and where it came from."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    source = "torch.cuda.get_device_properties"
    if not (clock_khz and bus_bits):
        from triton.runtime import driver

        info = driver.active.utils.get_device_properties(device)
        clock_khz, bus_bits = info["mem_clock_rate"], info["mem_bus_width"]
        source = "triton driver device properties"
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"{source}: {clock_khz / 1e3:.0f} MHz x {bus_bits} bit x 2"


def _bench(fn: Callable[[], object], rep_ms: int = 100) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms))


def _bench_wall(fn: Callable[[], object], repeats: int = 3) -> float:
    """Mean wall-clock ms of ``repeats`` calls after one warm-up (``--smoke`` on CPU only)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


class Steps(NamedTuple):
    """The three timed steps on one input (module docstring) and the bytes one step moves at least."""

    bn: Callable[[], None]
    bkn: Callable[[], None]
    op: Callable[[], None]
    nbytes: int


def training_steps(
    channels: int, size: int, batch: int, dtype: torch.dtype, channels_last: bool, device: str = "cuda"
) -> Steps:
    """The steps on x: (batch, channels, size, size), as described above.

    Also what benchmarks/gpu/ncu_kernels.py profiles. Where the Triton route does not take x (``--smoke`` on the
    CPU), ``bkn`` is the module's CPU step (:func:`bkn_export.ops.kalman_norm_step` and the functional update).
    """
    from bkn_export import functional as Fk
    from bkn_export import ops, per_channel, triton_step

    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)

    def parameter(value: float) -> torch.Tensor:
        return torch.full((channels,), value, device=device, requires_grad=True)

    weight, bias = parameter(1.0), parameter(0.0)
    running_mean = torch.zeros(channels, device=device)
    running_var = torch.ones(channels, device=device)
    prior_mean, prior_variance, prior_weight = parameter(0.0), parameter(1.0), parameter(0.5)
    count = x.numel() // channels

    def bn_step() -> None:
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, _MOMENTUM, _EPS)
        torch.autograd.grad(y, (x, weight, bias), grad)

    tensors = (x, prior_mean, prior_variance, prior_weight, weight, bias)

    def bkn_step() -> None:
        if triton_step.applies(x):
            y, mean, variance, _, _ = triton_step.kalman_norm_step(
                x, prior_mean, prior_variance, prior_weight, None, weight, bias, _EPS, 0.0
            )
        else:
            y, mean, variance = ops.kalman_norm_step(
                x, prior_mean, prior_variance, prior_weight, weight, bias, _EPS, 0.0
            )
        if not per_channel.update_running_statistics_(
            running_mean, running_var, mean, variance, _MOMENTUM, count, None
        ):
            Fk.update_running_statistics_(running_mean, running_var, mean, variance, _MOMENTUM, count)
        torch.autograd.grad(y, tensors, grad)

    def op_step() -> None:
        y, mean, variance = torch.ops.bkn.batch_kalman_norm(*tensors, _EPS, 0.0)
        Fk.update_running_statistics_(running_mean, running_var, mean, variance, _MOMENTUM, count)
        torch.autograd.grad(y, tensors, grad)

    return Steps(bn_step, bkn_step, op_step, 8 * x.numel() * x.element_size())


def measure(
    channels: int,
    size: int,
    batch: int,
    dtype: torch.dtype,
    channels_last: bool,
    reference: bool,
    device: str = "cuda",
    rep_ms: int = 100,
    op: bool = False,
) -> tuple[float, float, float | None, float | None, int]:
    """(bn ms, bkn ms, op ms or None, reference ms or None, bytes moved) for one shape; ``rep_ms``: do_bench's time
    per figure; ``op``: time the contract op too."""
    steps = training_steps(channels, size, batch, dtype, channels_last, device)

    def bench(fn: Callable[[], object]) -> float:
        return _bench(fn, rep_ms) if device == "cuda" else _bench_wall(fn)

    bn_ms = bench(steps.bn)
    bkn_ms = bench(steps.bkn)
    op_ms = bench(steps.op) if op else None
    ref_ms = None
    if reference:
        os.environ["BKN_DISABLE_TRITON"] = "1"
        try:
            ref_ms = bench(steps.op)
        finally:
            del os.environ["BKN_DISABLE_TRITON"]
    return bn_ms, bkn_ms, op_ms, ref_ms, steps.nbytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--channels-last", action="store_true", help="NHWC tensors (default NCHW)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8, 32])
    parser.add_argument("--reference", action="store_true", help="also time the unfused PyTorch reference")
    parser.add_argument("--op", action="store_true", help="also time the step through the contract op")
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the device's peak bandwidth")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench's measuring time per figure (ms)")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU: checks the script runs")
    args = parser.parse_args(argv)

    if args.smoke:
        return _report(
            args,
            [("smoke", 4, 5)],
            "cpu",
            "CPU (--smoke: figures mean nothing)",
            "",
            args.peak_gbps or 1.0,
            "nominal (--smoke)",
        )
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU is visible to torch; nothing measured (the Triton kernels run on CUDA only).")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_kernels: triton is not installed; nothing measured (pip install triton).")
        return 0
    from bkn_export.kernels import uses_kernels

    if not uses_kernels(torch.empty(2, 2, device="cuda")):
        print("bench_kernels: the op would not run the Triton kernels on CUDA here; nothing measured.")
        return 0

    device = torch.cuda.current_device()
    peak, peak_source = (args.peak_gbps, "--peak-gbps") if args.peak_gbps else peak_bandwidth_gbps(device)
    return _report(
        args,
        RESNET50_SHAPES,
        "cuda",
        torch.cuda.get_device_name(device),
        f", triton {triton.__version__}",
        peak,
        peak_source,
    )


def _report(
    args: argparse.Namespace,
    shapes: list[tuple[str, int, int]],
    device: str,
    device_name: str,
    versions: str,
    peak: float,
    peak_source: str,
) -> int:
    """Measure every (batch, shape), print the table, write ``--json`` (device, dtype, layout, peak, rows)."""
    dtype = _DTYPES[args.dtype]
    layout = "NHWC" if args.channels_last else "NCHW"
    print(f"device: {device_name}; torch {torch.__version__}{versions}")
    print(f"dtype {args.dtype}, layout {layout}; peak bandwidth {peak:.0f} GB/s ({peak_source})")
    print("times: forward+backward, ms (do_bench mean); BW: 8*numel*itemsize / time as a fraction of peak")
    header = f"{'layer':<14}{'N':>4} {'shape':<18}{'bn ms':>9}{'bkn ms':>9}{'bkn/bn':>8}{'bn BW':>8}{'bkn BW':>8}"
    print(header + (f"{'op ms':>9}{'op/bn':>7}" if args.op else "") + (f"{'ref ms':>9}" if args.reference else ""))

    rows: list[Row] = []
    for batch in args.batches:
        for name, channels, size in shapes:
            bn_ms, bkn_ms, op_ms, ref_ms, nbytes = measure(
                channels, size, batch, dtype, args.channels_last, args.reference, device, args.rep_ms, args.op
            )
            row = Row(
                layer=name,
                batch=batch,
                shape=[batch, channels, size, size],
                bn_ms=bn_ms,
                bkn_ms=bkn_ms,
                ratio=bkn_ms / bn_ms,
                bn_peak_fraction=nbytes / (bn_ms * 1e-3) / (peak * 1e9),
                bkn_peak_fraction=nbytes / (bkn_ms * 1e-3) / (peak * 1e9),
                op_ms=op_ms,
                ref_ms=ref_ms,
            )
            rows.append(row)
            shape = "x".join(map(str, row.shape))
            line = (
                f"{name:<14}{batch:>4} {shape:<18}{bn_ms:>9.4f}{bkn_ms:>9.4f}{row.ratio:>8.2f}"
                f"{row.bn_peak_fraction:>8.0%}{row.bkn_peak_fraction:>8.0%}"
            )
            line += f"{op_ms:>9.4f}{op_ms / bn_ms:>7.2f}" if op_ms is not None else ""
            print(line + (f"{ref_ms:>9.4f}" if ref_ms is not None else ""), flush=True)

    ratios = torch.tensor([r.ratio for r in rows])
    large = [r for r in rows if r.shape[0] * r.shape[1] * r.shape[2] * r.shape[3] >= 8 * 2**20]
    print(f"geometric mean bkn/bn: {float(ratios.log().mean().exp()):.2f}; max {float(ratios.max()):.2f}")
    if large:
        fractions = ", ".join(f"{r.bkn_peak_fraction:.0%}" for r in large)
        print(f"bkn bandwidth on tensors of >= 8M elements: {fractions}")
    if args.json:
        with open(args.json, "w") as handle:
            summary = {"device": device_name, "dtype": args.dtype, "layout": layout, "peak_gbps": peak}
            json.dump({**summary, "peak_source": peak_source, "rows": [asdict(r) for r in rows]}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
