"""Host time of one BKN layer's eager train step on the CUDA route, measured on a machine without a GPU.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_host_overhead.py [--channels 64] [--size 8] [--batch 2] [--network NAME]
        [--steps 300] [--repeats 7] [--profile N] [--json out.json]

Why: on the GPU (benchmarks/RESULTS.md, "GPU check") BKN's eager step costs about a millisecond whatever the
tensor's size: the GPU waits on the host code of each step. This script measures that host code alone. It runs
itself again with ``TRITON_INTERPRET=1 BKN_TRITON_ON_CPU=1`` (:data:`bkn_export.kernels.TRITON_ON_CPU`: CPU
tensors take the CUDA route, Triton launchers and all) and **replaces every Triton launch by a no-op**
(``InterpretedFunction.run`` returns at once): the kernels' outputs are then uninitialised memory and mean
nothing; what is timed is everything else a step does on the host — the package's Python, autograd, the
allocations, the launchers' argument preparation. Triton's own ``JITFunction.run`` per launch is not in it
(it is the interpreter's here; on a GPU it adds its own few to tens of µs per launch, counted in ``launches``).

Steps timed (``bench_kernels.training_steps``, on x: (batch, channels, size, size), float32):

* ``bkn``: a wired layer's step as the module runs it on the Triton route (``triton_step`` + one-launch update);
* ``op``: the same through the contract op ``torch.ops.bkn.batch_kalman_norm`` and the functional update;
* ``bn``: ``F.batch_norm`` forward and backward on the CPU, for scale only (it computes, on tiny inputs).

Interleaved repeats of ``--steps`` steps each, 1 thread; the median µs per step. ``--profile N`` prints the N
functions with the largest own time in ``bkn`` (cProfile).

``--network NAME`` (a network of ``bench_networks.py``, at ``--size``, batch ``--batch``) counts instead of timing:
per whole train step (forward + cross-entropy + backward + SGD) of the network with BatchNorm and converted, the
ATen operators dispatched from the host (``torch.profiler``'s leaf ``aten::`` events; those that launch a kernel on
a GPU, i.e. not a view or an allocation, apart), the Triton launches, and the host synchronisations a GPU would make
(``aten::_local_scalar_dense``, ``aten::is_nonzero``, ``aten::item``: a tensor read on the host). No time is
reported in this mode: the network's own convolutions compute on the CPU, on kernel outputs that are uninitialised
memory, and that time is no host overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

_CHILD_FLAG = "--child"


@contextlib.contextmanager
def _launches_skipped(counter: list[int]) -> Iterator[None]:
    """Every interpreted Triton launch returns at once (counted in ``counter[0]``)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def skipped(self: Any, *args: Any, **kwargs: Any) -> None:
        counter[0] += 1

    InterpretedFunction.run = skipped  # type: ignore[method-assign]
    try:
        yield
    finally:
        InterpretedFunction.run = original  # type: ignore[method-assign]


def _median_us(step: Callable[[], None], steps: int, samples: list[float]) -> None:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    samples.append((time.perf_counter() - start) / steps * 1e6)


def _layer_steps(args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], str]:
    from bench_kernels import training_steps

    steps = training_steps(args.channels, args.size, args.batch, torch.float32, False, device="cpu")
    shape = f"x ({args.batch}, {args.channels}, {args.size}, {args.size}) float32"
    return {"bkn": steps.bkn, "op": steps.op, "bn": steps.bn}, shape


#: Leaf ATen events that read a tensor on the host: on a GPU, each waits for the device (a synchronisation).
_SYNCS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")


def _network_counts(args: argparse.Namespace) -> int:
    """``--network``: host operators, Triton launches and host reads per train step, BatchNorm against BKN."""
    import copy

    from bench_networks import _NO_KERNEL, NETWORKS, _train_step
    from torch.profiler import ProfilerActivity, profile

    from bkn_export import convert_batchnorm
    from bkn_export.nn import _BatchKalmanNorm

    torch.manual_seed(0)
    batchnorm_model = NETWORKS[args.network]()
    bkn_model = convert_batchnorm(copy.deepcopy(batchnorm_model), torch.randn(2, 3, args.size, args.size))
    layers = sum(isinstance(m, _BatchKalmanNorm) for m in bkn_model.modules())
    x, target = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,))
    counter = [0]
    rows: dict[str, dict[str, int]] = {}
    with _launches_skipped(counter):
        for name, model in (("bn", batchnorm_model), ("bkn", bkn_model)):
            step = _train_step(model, x, target)
            for _ in range(3):
                step()
            counter[0] = 0
            with profile(activities=[ProfilerActivity.CPU]) as recorded:
                step()
            leaves = [e.name for e in recorded.events() if e.name.startswith("aten::") and not e.cpu_children]
            rows[name] = {
                "host_ops": len(leaves),
                "kernel_ops": sum(1 for n in leaves if n not in _NO_KERNEL and n != "aten::to"),
                "triton_launches": counter[0],
                "host_reads": sum(1 for n in leaves if n in _SYNCS),
            }
    print(f"torch {torch.__version__}; CUDA route under Triton's interpreter, launches skipped; {args.network} "
          f"{args.size}x{args.size}, batch {args.batch}; {layers} BKN layers; per train step:")  # fmt: skip
    print(f"{'':<22}{'bn':>8}{'bkn':>8}{'extra per BKN layer':>22}")
    for key in ("host_ops", "kernel_ops", "triton_launches", "host_reads"):
        extra = (rows["bkn"][key] - rows["bn"][key]) / max(layers, 1)
        print(f"{key:<22}{rows['bn'][key]:>8}{rows['bkn'][key]:>8}{extra:>22.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"network": args.network, "size": args.size, "batch": args.batch, "layers": layers} | rows,
                      handle, indent=1)  # fmt: skip
    return 0


def _child(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bkn_export import kernels

    if not kernels.TRITON_ON_CPU:
        print("bench_host_overhead: the CPU is not on the CUDA route (TRITON_INTERPRET / BKN_TRITON_ON_CPU)")
        return 1
    torch.set_num_threads(1)
    if args.network:
        return _network_counts(args)
    timed, shape = _layer_steps(args)
    counter = [0]
    samples: dict[str, list[float]] = {name: [] for name in timed}
    launches: dict[str, float] = {}
    with _launches_skipped(counter):
        for name, step in timed.items():  # warm-up, and the launches per step
            for _ in range(10):
                step()
            counter[0] = 0
            step()
            launches[name] = counter[0]
        for _ in range(args.repeats):
            for name, step in timed.items():
                _median_us(step, args.steps, samples[name])
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(lambda: [timed["bkn"]() for _ in range(args.steps)])
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"torch {torch.__version__}; CUDA route under Triton's interpreter, launches skipped; {shape}")
    print(f"{'step':<6}{'host µs/step':>14}{'launches':>10}")
    for name in timed:
        print(f"{name:<6}{medians[name]:>14.1f}{launches[name]:>10}")
    ratios = "; ".join(f"{name} / bn: {medians[name] / medians['bn']:.2f}" for name in timed if name != "bn")
    print(f"host time {ratios}")
    if args.profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    if args.json:
        record: dict[str, Any] = {"what": shape}
        record |= {"torch": torch.__version__, "median_us": medians, "samples_us": samples, "launches": launches}
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=_positive, default=64)
    parser.add_argument("--size", type=_positive, default=8)
    parser.add_argument("--batch", type=_positive, default=2)
    parser.add_argument("--steps", type=_positive, default=300, help="steps per timed sample")
    parser.add_argument("--repeats", type=_positive, default=7, help="interleaved samples per step kind")
    parser.add_argument("--profile", type=int, default=0, help="print the N largest own times of the bkn step")
    parser.add_argument("--network", default=None, help="count a whole network's step instead (bench_networks names)")
    parser.add_argument("--json", default=None)
    parser.add_argument(_CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(given)
    if args.child:
        return _child(args)
    from bkn_export import kernels

    env = {**os.environ, "TRITON_INTERPRET": "1", kernels.TRITON_ON_CPU_ENV: "1"}
    command = [sys.executable, os.path.abspath(__file__), *given, _CHILD_FLAG]
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
