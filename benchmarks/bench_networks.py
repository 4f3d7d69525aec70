"""Whole-network train step (forward + backward + SGD) of a converted network over the same network with BatchNorm.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_networks.py [--networks resnet18,mobilenetv3,efficientnet_b0,densenet121]
        [--batches 2,16] [--size 64] [--repeats 11] [--steps 2] [--clock process|wall] [--compile] [--json out.json]
        [--profile N] [--count-ops] [--kernel-times] [--prior-times] [--reference-moments] [--no-native]
        [--compare-native] [--unwired] [--steady-malloc]

For each network and batch size it builds the network twice from the same seed — once as shipped (BatchNorm), once
converted with ``bkn_export.convert_batchnorm`` (default options) — and times one train step of each, interleaved
within every repeat (the order alternates), in one process with one torch thread. One sample is ``--steps`` steps;
the figure is the median over ``--repeats`` samples and the ratio BKN / BatchNorm of the medians, with the first
and third quartiles of the per-repeat ratios (each repeat's two samples side by side: the run's own spread). The
default clock is this process's CPU time, which on a shared machine leaves out time spent waiting for a core;
``--clock wall`` uses elapsed time. ``--compile`` adds the same pair under ``torch.compile`` (default backend).
``--profile N`` instead prints, per network and batch, the N operators with the most self CPU time over 3 steps of
the converted network (``torch.profiler``; the Python-level ``autograd.Function`` s of ``bkn_export`` show up by name).
``--count-ops`` instead counts, per network and batch, the compute operators one eager train step dispatches
(``torch.profiler`` events that call no other operator, without views, allocations and metadata ops: on a GPU each is
about one kernel launch, the cost that dominates a micro-batch step there), BatchNorm against BKN, with the
PyTorch forms of the per-channel kernels (:mod:`bkn_export.native` is CPU-only); with ``--compile``
it counts the kernels inductor generates for the compiled forward and backward instead (on this CPU: C++ kernels, the
proxy for the Triton kernels it would generate on a GPU).
``--kernel-times`` instead times, per network and batch, each C kernel of :mod:`bkn_export.native` over
``--repeats`` steps of the converted network (ms per step and calls per step per kernel, against the step's wall time):
how much of the step the per-channel and per-activation kernels themselves take, the rest being Python, autograd and
ATen.
``--prior-times`` instead times, per network and batch, each BKN layer's prediction forward (its ``_prior`` call:
the chain's checks, the prediction's Functions and kernels, the prior's assembly) in ``--repeats`` train steps, and
the same call repeated warm right after it on the same input (the forward's memo of predictions put back before each
repeat, so that it does the same work): how much of the prediction's host time is its code's own, and how much the
network around it adds (caches made cold by the convolutions).
``--no-native`` runs the PyTorch forms of the per-channel kernels instead of the C kernels of
:mod:`bkn_export.native` (the header line says which ran); ``--compare-native`` times a third variant in the
same interleaved loop, a copy of the converted network stepped with the PyTorch forms (its ms and ratio to
BatchNorm in the last two columns). ``--unwired`` times another one: a copy of the converted network with every
layer's chain membership removed, so that no layer predicts and each takes an unwired layer's train step (ATen's
train-mode BatchNorm where it applies: ``BatchKalmanNorm._is_plain_batchnorm``); against the converted network
this is what the chain costs (the prediction through the network's layers, forward and backward, and the Kalman
op it feeds) over the modules' own overhead. ``--reference-moments`` runs every prediction
through the reference :mod:`bkn_export.moments` instead of the fused eager forms of :mod:`bkn_export.chain.fast`
(what the speed work is measured against).

``--steady-malloc`` fixes glibc's allocator thresholds for the whole process (``mallopt``: no ``mmap`` for blocks
below 32 MiB, no trimming, 256 MiB top pad; what ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=...
MALLOC_TOP_PAD_=268435456`` would set) for BatchNorm and BKN alike: with the default dynamic thresholds, whether a
step's activation-sized buffers come back as fresh pages (page faults) changes from run to run, and moved the same
code's ratio by up to ±0.06 at 224×224 (benchmarks/RESULTS.md); the header says which ran.

The networks come from packages installed without torchvision (``pip install --no-deps monai efficientnet-pytorch
geffnet``); a network whose package is missing is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bkn_export import convert_batchnorm, native


def _monai_resnet18() -> nn.Module:
    from monai.networks.nets import resnet18

    return resnet18(spatial_dims=2, n_input_channels=3, num_classes=10)


def _monai_densenet121() -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=3, out_channels=10)


def _geffnet_mobilenetv3() -> nn.Module:
    import geffnet

    return geffnet.mobilenetv3_large_100(pretrained=False, num_classes=10)


def _efficientnet_b0() -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-b0", num_classes=10)


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": _monai_resnet18,
    "mobilenetv3": _geffnet_mobilenetv3,
    "efficientnet_b0": _efficientnet_b0,
    "densenet121": _monai_densenet121,
}


@dataclass(frozen=True)
class Row:
    network: str
    batch: int
    variant: str  # "eager" or "compile"
    batchnorm_ms: float
    bkn_ms: float
    #: The converted network stepped with the PyTorch forms (``--compare-native``), else None.
    bkn_pytorch_forms_ms: float | None = None
    #: The converted network without its chain (``--unwired``), else None.
    bkn_unwired_ms: float | None = None
    #: The first and third quartiles of the per-repeat ratios BKN / BatchNorm (each repeat's two samples taken
    #: side by side), None with fewer than two repeats: how far the machine moved the ratio during the run.
    ratio_quartiles: tuple[float, float] | None = None

    @property
    def ratio(self) -> float:
        return self.bkn_ms / self.batchnorm_ms


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimizer.step()

    return step


def _time(step: Callable[[], Any], steps: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(steps):
        step()
    return (clock() - start) / steps * 1e3


def _without_native(step: Callable[[], None]) -> Callable[[], None]:
    def stepped() -> None:
        with native.disabled():
            step()

    return stepped


def _pair(
    name: str,
    batch: int,
    size: int,
    repeats: int,
    steps: int,
    clock: Callable[[], float],
    compiled: bool,
    compare_native: bool = False,
    unwired: bool = False,
) -> Row:
    torch.manual_seed(0)
    batchnorm_model = NETWORKS[name]()
    bkn_model = copy.deepcopy(batchnorm_model)
    example = torch.randn(2, 3, size, size)
    bkn_model = convert_batchnorm(bkn_model, example)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10, (batch,))
    if compiled:
        batchnorm_model = torch.compile(batchnorm_model)  # type: ignore[assignment]
        bkn_model = torch.compile(bkn_model)  # type: ignore[assignment]
    steps_by_variant = {
        "batchnorm": _train_step(batchnorm_model, x, target),
        "bkn": _train_step(bkn_model, x, target),
    }
    if compare_native and not compiled:  # a copy of the converted network, its own optimizer
        steps_by_variant["bkn_pytorch_forms"] = _without_native(_train_step(copy.deepcopy(bkn_model), x, target))
    if unwired and not compiled:
        steps_by_variant["bkn_unwired"] = _train_step(_unwire(copy.deepcopy(bkn_model)), x, target)
    samples = interleaved_samples(steps_by_variant, repeats, steps, clock)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return Row(
        name,
        batch,
        "compile" if compiled else "eager",
        medians["batchnorm"],
        medians["bkn"],
        medians.get("bkn_pytorch_forms"),
        medians.get("bkn_unwired"),
        paired_quartiles(samples["bkn"], samples["batchnorm"]),
    )


def paired_quartiles(numerators: list[float], denominators: list[float]) -> tuple[float, float] | None:
    """The first and third quartiles of the ratios of samples taken in the same repeat; None below two repeats."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    if len(ratios) < 2:
        return None
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return first, third


def interleaved_medians(
    variants: dict[str, Callable[[], Any]], repeats: int, steps: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median ms per call of each variant over :func:`interleaved_samples`."""
    samples = interleaved_samples(variants, repeats, steps, clock)
    return {key: statistics.median(values) for key, values in samples.items()}


def interleaved_samples(
    variants: dict[str, Callable[[], Any]], repeats: int, steps: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Ms per call of each variant, one sample per repeat: two warm-up calls each (and compilation), then ``repeats``
    samples of ``steps`` calls, the variants interleaved within every repeat in an order that alternates."""
    for step in variants.values():
        step()
        step()
    samples: dict[str, list[float]] = {key: [] for key in variants}
    order = list(variants)
    for repeat in range(repeats):
        for key in order if repeat % 2 == 0 else reversed(order):
            samples[key].append(_time(variants[key], steps, clock))
    return samples


def _unwire(model: nn.Module) -> nn.Module:
    """``model`` with every BKN layer's chain membership removed (``--unwired``)."""
    for module in model.modules():
        if getattr(module, "chain", None) is not None:
            module.chain = None
    return model


def _profile(name: str, batch: int, size: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = convert_batchnorm(NETWORKS[name](), torch.randn(2, 3, size, size))
    step = _train_step(model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
    step()
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        for _ in range(3):
            step()
    print(f"== {name}, batch {batch}: converted network, 3 train steps")
    print(recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _kernel_times(name: str, batch: int, size: int, steps: int) -> None:
    """Print, per :mod:`bkn_export.native` C kernel, its time per train step of the converted network (its calls
    through ``native.call`` timed with ``perf_counter`` over ``steps`` steps after two), and the step itself."""
    torch.manual_seed(0)
    model = convert_batchnorm(NETWORKS[name](), torch.randn(2, 3, size, size))
    step = _train_step(model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
    step()
    step()
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    call = native.call

    def timed(kernel: str, *tensors: torch.Tensor | None, count: int | None = None) -> None:
        start = time.perf_counter()
        call(kernel, *tensors, count=count)
        seconds[kernel] = seconds.get(kernel, 0.0) + time.perf_counter() - start
        calls[kernel] = calls.get(kernel, 0) + 1

    native.call = timed  # type: ignore[assignment]  # the modules that run kernels call native.call
    try:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        step_ms = (time.perf_counter() - start) / steps * 1e3
    finally:
        native.call = call  # type: ignore[assignment]
    print(f"== {name}, batch {batch}, {size}x{size}: C kernels per train step of the converted network")
    for kernel, total in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"{total / steps * 1e3:9.2f} ms {calls[kernel] // steps:5d} calls  {kernel}")
    print(f"{sum(seconds.values()) / steps * 1e3:9.2f} ms in all, of a {step_ms:.1f} ms step (wall clock)")


@dataclass(frozen=True)
class PriorTime:
    """One wired layer's prediction forward (``--prior-times``), µs per call: in the train step, and warm."""

    layer: str
    channels: int
    #: Its ``_prior`` call (the chain's checks, the prediction's Functions and kernels, the prior's assembly) as
    #: the train step runs it, mean over the timed steps and the layer's calls in each.
    in_network_us: float
    #: The same call repeated right after it on the same input, with the forward's memo of predictions put back
    #: before each repeat (the same work again), median: the host code with warm caches.
    warm_us: float
    #: How many times the layer ran per train step (a layer applied twice in the forward: 2).
    calls_per_step: float = 1.0


def prior_times(model: nn.Module, step: Callable[[], None], steps: int, repeats: int) -> list[PriorTime]:
    """Time every BKN layer's ``_prior`` in ``steps`` train steps of ``model`` (``step`` steps it; two untimed
    steps first), then once more with each call repeated ``repeats`` times warm (:class:`PriorTime`, per call; the
    totals per step weigh each layer by its calls). The step's values are those of an untimed step: the call's own
    result goes on, the repeats' are dropped."""
    from bkn_export.chain.scope import scratch_for
    from bkn_export.nn import _BatchKalmanNorm

    names = {module: name for name, module in model.named_modules() if isinstance(module, _BatchKalmanNorm)}
    in_network: dict[str, float] = {}
    calls: dict[str, int] = {}
    warm: dict[str, list[float]] = {}
    repeating = False
    prior = _BatchKalmanNorm._prior

    def timed(layer: _BatchKalmanNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name = names.get(layer, type(layer).__name__)
        root = getattr(layer.chain, "root", None)
        scratch = scratch_for(root) if repeating and root is not None else None
        if scratch is None:
            start = time.perf_counter()
            result = prior(layer, x)
            if not repeating:
                in_network[name] = in_network.get(name, 0.0) + time.perf_counter() - start
                calls[name] = calls.get(name, 0) + 1
            return result
        before = dict(scratch.predictions)
        result = prior(layer, x)
        after = dict(scratch.predictions)
        samples = warm.setdefault(name, [])
        for _ in range(repeats):
            scratch.predictions.clear()
            scratch.predictions.update(before)
            start = time.perf_counter()
            prior(layer, x)
            samples.append(time.perf_counter() - start)
        scratch.predictions.clear()
        scratch.predictions.update(after)
        return result

    step()
    step()
    _BatchKalmanNorm._prior = timed  # type: ignore[method-assign]
    try:
        for _ in range(steps):
            step()
        repeating = True
        step()
    finally:
        _BatchKalmanNorm._prior = prior  # type: ignore[method-assign]
    return [
        PriorTime(
            name,
            int(layer.num_features),
            in_network[name] / calls[name] * 1e6,
            statistics.median(warm[name]) * 1e6 if warm.get(name) else math.nan,
            calls[name] / steps,
        )
        for layer, name in names.items()
        if name in in_network
    ]


def _prior_times(name: str, batch: int, size: int, steps: int) -> list[PriorTime]:
    """Print :func:`prior_times` of the converted network, slowest layer first, and the step's wall time; return
    the rows."""
    torch.manual_seed(0)
    model = convert_batchnorm(NETWORKS[name](), torch.randn(2, 3, size, size))
    step = _train_step(model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
    step()
    start = time.perf_counter()
    step()
    step_ms = (time.perf_counter() - start) * 1e3  # the second step: the first one's allocations are made
    rows = prior_times(model, step, steps, _WARM_REPEATS)
    print(f"== {name}, batch {batch}, {size}x{size}: each BKN layer's prediction forward (_prior), µs per call")
    print(f"{'in step':>9} {'warm':>9} {'ratio':>6} {'C':>5}  layer")
    for row in sorted(rows, key=lambda r: -r.in_network_us):
        ratio = row.in_network_us / row.warm_us if row.warm_us > 0 else math.nan
        print(f"{row.in_network_us:9.0f} {row.warm_us:9.0f} {ratio:6.2f} {row.channels:5d}  {row.layer}")
    total = sum(r.in_network_us * r.calls_per_step for r in rows) / 1e3
    total_warm = sum(r.warm_us * r.calls_per_step for r in rows if not math.isnan(r.warm_us)) / 1e3
    print(f"{total:9.2f} ms in the step, {total_warm:.2f} ms warm, {len(rows)} layers; a step took {step_ms:.1f} ms")
    return rows


#: Repeats of each layer's warm ``_prior`` call (``--prior-times``).
_WARM_REPEATS = 31


#: Operators that launch no kernel: views, allocation, metadata (excluded from ``--count-ops``).
_NO_KERNEL = (
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::reshape", "aten::expand", "aten::squeeze", "aten::unsqueeze", "aten::permute", "aten::t",
    "aten::transpose", "aten::select", "aten::slice", "aten::alias", "aten::detach", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::is_nonzero", "aten::split", "aten::chunk", "aten::unbind",
    "aten::narrow", "aten::diagonal", "aten::set_", "aten::_reshape_alias", "aten::result_type",
)  # fmt: skip


def _compute_ops(recorded: Any) -> int:
    """Operators in a profile that call no other operator and launch a kernel (see ``--count-ops``)."""
    return sum(
        1 for e in recorded.events() if e.name.startswith("aten::") and not e.cpu_children and e.name not in _NO_KERNEL
    )


def _count_ops(name: str, batch: int, size: int, compiled: bool) -> tuple[int, int]:
    """(BatchNorm, BKN): compute operators one eager train step dispatches, or with ``compiled`` the kernels
    inductor generates for the compiled forward and backward (see ``--count-ops``)."""
    from torch._inductor import metrics
    from torch.profiler import ProfilerActivity, profile

    counts = []
    torch.manual_seed(0)
    batchnorm_model = NETWORKS[name]()
    bkn_model = convert_batchnorm(copy.deepcopy(batchnorm_model), torch.randn(2, 3, size, size))
    x, target = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    for model in (batchnorm_model, bkn_model):
        if compiled:
            torch._dynamo.reset()
            metrics.reset()
            _train_step(torch.compile(model), x, target)()  # type: ignore[arg-type]
            counts.append(metrics.generated_kernel_count)
            continue
        step = _train_step(model, x, target)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            step()
        counts.append(_compute_ops(recorded))
    return counts[0], counts[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--batches", default="2,16")
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("process", "wall"), default="process")
    parser.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N ops instead of timing")
    parser.add_argument("--count-ops", action="store_true", help="count dispatched compute ops instead of timing")
    parser.add_argument(
        "--kernel-times", action="store_true", help="time each C kernel of bkn_export.native per step instead"
    )
    parser.add_argument(
        "--prior-times", action="store_true", help="time each BKN layer's prediction forward, in the step and warm"
    )
    parser.add_argument("--reference-moments", action="store_true", help="no fused eager predictions")
    parser.add_argument("--no-native", action="store_true", help="no bkn_export.native C kernels")
    parser.add_argument(
        "--compare-native", action="store_true", help="also time BKN with the PyTorch forms, interleaved"
    )
    parser.add_argument(
        "--unwired", action="store_true", help="also time BKN without its chain (no prediction), interleaved"
    )
    parser.add_argument(
        "--steady-malloc", action="store_true", help="fix glibc's malloc thresholds (fewer page faults, less noise)"
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.reference_moments:
            from bkn_export.chain import fast

            stack.enter_context(fast.reference_only())
        if args.no_native:
            stack.enter_context(native.disabled())
        return _run(args)


#: glibc's ``mallopt`` parameters (malloc.h): M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _steady_malloc() -> str:
    """Fix glibc's allocator thresholds (see the module docstring); says what it did."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return "default (no glibc mallopt here)"
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 << 20))
    if not all(mallopt(parameter, value) == 1 for parameter, value in settings):
        return "default (mallopt refused)"
    return "steady (mmap threshold 32 MiB, no trim, top pad 256 MiB)"


def cpu_model() -> str:
    """The CPU's model name and the cores this process may use (absolute times differ between machines:
    RESULTS.md's eighth round)."""
    from bkn_export.demo.environment import cpu_model_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model_name()}, {cores} core(s)"


def _run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    allocator = _steady_malloc() if args.steady_malloc else "default (glibc's dynamic thresholds)"
    clock = time.process_time if args.clock == "process" else time.perf_counter
    names = [n for n in args.networks.split(",") if n]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        print(f"unknown networks {unknown}; known: {sorted(NETWORKS)}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.profile:
        for name in names:
            for batch in batches:
                _profile(name, batch, args.size, args.profile)
        return 0
    if args.kernel_times:
        for name in names:
            for batch in batches:
                _kernel_times(name, batch, args.size, max(args.repeats, 1))
        return 0
    if args.prior_times:
        timed = [
            {"network": name, "batch": batch, "size": args.size, **asdict(row)}
            for name in names
            for batch in batches
            for row in _prior_times(name, batch, args.size, max(args.repeats, 1))
        ]
        if args.json:
            from bkn_export.atomic import write_text_atomic

            payload: dict[str, Any] = {"torch": torch.__version__, "native": native.status(), "malloc": allocator}
            payload |= {"cpu": cpu_model()}
            write_text_atomic(args.json, json.dumps(payload | {"args": vars(args), "prior_times": timed}, indent=2))
        return 0
    if args.count_ops:
        what = "inductor kernels (torch.compile)" if args.compile else "compute ops dispatched (eager)"
        print(f"{'network':<16} {'batch':>5} {'BN':>8} {'BKN':>8} {'BKN/BN':>7}  ({what} per train step)")
        with native.disabled():  # CPU-only kernels: the count stands for what a GPU launches
            for name in names:
                for batch in batches:
                    bn_ops, bkn_ops = _count_ops(name, batch, args.size, args.compile)
                    print(f"{name:<16} {batch:>5} {bn_ops:>8} {bkn_ops:>8} {bkn_ops / bn_ops:>6.2f}x", flush=True)
        return 0
    rows: list[Row] = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), clock={args.clock}, input {args.size}x{args.size}")
    cpu = cpu_model()
    print(f"cpu: {cpu}")
    print(f"malloc: {allocator}")
    print(f"bkn_export.native: {native.status() if native.takes(torch.zeros(1)) else 'off (PyTorch forms)'}")
    extra = f" {'BKN-PyTorch ms':>15} {'ratio':>7}" if args.compare_native else ""
    extra += f" {'unwired ms':>11} {'ratio':>7}" if args.unwired else ""
    header = f"{'network':<16} {'batch':>5} {'variant':<8} {'BN ms':>9} {'BKN ms':>9} {'BKN/BN':>7} {'quartiles':>11}"
    print(header + extra)
    for name in names:
        for batch in batches:
            for compiled in (False, True) if args.compile else (False,):
                try:
                    row = _pair(
                        name, batch, args.size, args.repeats, args.steps, clock, compiled, args.compare_native,
                        args.unwired,
                    )  # fmt: skip
                except ImportError as error:
                    print(f"{name:<16} skipped: {error}")
                    break
                rows.append(row)
                forms, unwired = row.bkn_pytorch_forms_ms, row.bkn_unwired_ms
                extra = "" if forms is None else f" {forms:>15.2f} {forms / row.batchnorm_ms:>6.2f}x"
                extra += "" if unwired is None else f" {unwired:>11.2f} {unwired / row.batchnorm_ms:>6.2f}x"
                spread = "-" if row.ratio_quartiles is None else "{:.2f}-{:.2f}".format(*row.ratio_quartiles)
                print(
                    f"{row.network:<16} {row.batch:>5} {row.variant:<8} {row.batchnorm_ms:>9.2f} "
                    f"{row.bkn_ms:>9.2f} {row.ratio:>6.2f}x {spread:>11}{extra}",
                    flush=True,
                )
    if args.json:
        from bkn_export.atomic import write_text_atomic

        rows_out = [asdict(r) | {"ratio": r.ratio} for r in rows]
        native_line = native.status() if native.takes(torch.zeros(1)) else "off (PyTorch forms)"
        payload: dict[str, Any] = {"torch": torch.__version__, "native": native_line, "malloc": allocator, "cpu": cpu}
        payload |= {"args": vars(args), "rows": rows_out}
        write_text_atomic(args.json, json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
