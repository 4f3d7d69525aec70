"""Kernel launches of one eager train step on the CUDA route, counted on a machine without a GPU.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/count_launches.py [--probes relu_conv3x3,silu_conv1x1] [--json out.json]
        [--networks resnet18,mobilenetv3 [--size 32]] [--verbose]

The script runs itself again with ``TRITON_INTERPRET=1 BKN_TRITON_ON_CPU=1``
(:data:`bkn_export.kernels.TRITON_ON_CPU`): the CPU then takes the CUDA device's route, the op's
Triton launchers and the prediction's Triton twins (:mod:`bkn_export.per_channel`), run by
Triton's interpreter. What is counted, for the forward (``model(x)``) and the backward
(``loss.backward()``) of one train step, batch 2:

* ``triton``: every Triton kernel launch (each ``kernel[grid](...)``, counted in the interpreter);
* ``aten``: every other operator that would launch a kernel: in a ``torch.profiler`` trace outside
  the Triton launches, each ATen operator with no such operator under it, leaving out views,
  allocations, metadata changes and no-op ``to`` (the list of ``bench_networks.py --count-ops`` and
  a few more). On a GPU each is one kernel launch or one
  cuDNN / cuBLAS call (a few of those launch more than one kernel).

Variants of each probe (``bench_compile.PROBES``: ``conv → BN → act → conv' → BN``, C = 64, 8×8):
``bn`` (BatchNorm), ``bkn`` (converted, default options, the Triton twins) and
``bkn_pytorch_forms`` (converted, the prediction's per-channel formulas as PyTorch operators, what
a GPU ran before the twins: ``bkn_export.native.disabled()``; the op keeps its Triton kernels). The
first BKN layer is first in its chain, the second is wired through ``act → conv'``; ``BKN − BN``
is what the two layers add. ``--networks`` adds whole networks of ``bench_networks.py`` (default
options, a ``--size``² input: the count does not depend on it). The interpreter is slow: seconds
per probe, minutes per network.

This is a count, not a time: no kernel ran on a GPU. CUDA runs cuDNN's BatchNorm and convolutions
where the CPU runs ATen's; each is one operator here and one call there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compile import PROBES
from bench_networks import _NO_KERNEL, NETWORKS

from bkn_export import convert_batchnorm, kernels, native

BATCH = 2
_LAUNCH_RANGE = "triton_launch::"


@dataclass
class Direction:
    """Launches of one direction of a train step."""

    triton: dict[str, int] = field(default_factory=dict)
    aten: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values())


@dataclass
class Count:
    probe: str
    variant: str
    forward: Direction
    backward: Direction


_launches: collections.Counter[str] = collections.Counter()


@contextlib.contextmanager
def _counting_triton_launches() -> Iterator[None]:
    """Count every interpreted Triton launch in :data:`_launches`, each inside a profiler range so
    that the interpreter's own ATen calls are left out of the operator count."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(getattr(self, "fn", None), "__name__", "kernel")
        _launches[name] += 1
        with torch.profiler.record_function(_LAUNCH_RANGE + name):
            return original(self, *args, **kwargs)

    InterpretedFunction.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        InterpretedFunction.run = original  # type: ignore[method-assign]


def _inside_launch(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_LAUNCH_RANGE):
            return True
        parent = parent.cpu_parent
    return False


@contextlib.contextmanager
def _counted(direction: Direction) -> Iterator[None]:
    from torch.profiler import ProfilerActivity, profile

    _launches.clear()
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        yield
    aten: collections.Counter[str] = collections.Counter()
    for event in recorded.events():
        if _launches_kernel(event) and not _inside_launch(event):
            aten[event.name] += 1
    direction.triton = dict(_launches)
    direction.aten = dict(aten)


#: Operators that launch nothing themselves: ``bench_networks``' list, in-place metadata changes,
#: allocations and views by other names, a ``to`` / ``contiguous`` that returns its input (a real
#: conversion or copy shows as the ``copy_`` under it), and ``scalar_tensor`` (a host scalar: on CUDA
#: ``torch.where(c, t, 0.0)`` makes it on the CPU).
_NOTHING = frozenset(_NO_KERNEL) | {
    "aten::as_strided_", "aten::resize_", "aten::to", "aten::_to_copy", "aten::new_empty", "aten::new_empty_strided",
    "aten::expand_as", "aten::view_as", "aten::contiguous", "aten::scalar_tensor",
}  # fmt: skip


def _operator(event: Any) -> bool:
    return event.name.startswith("aten::") and event.name not in _NOTHING


def _launches_kernel(event: Any) -> bool:
    """An operator with no operator under it that launches something (the lowest level that does: a
    convolution whose children only resize its output counts once, as ``mkldnn_convolution``)."""
    return _operator(event) and not _operator_below(event)


def _operator_below(event: Any) -> bool:
    return any(_operator(c) or _operator_below(c) for c in event.cpu_children)


def count(probe: str, variant: str, size: int = 8) -> Count:
    """Launches of one train step of ``probe`` (a probe, or a network of ``bench_networks`` on a
    ``size``² input) as ``variant`` (module docstring)."""
    torch.manual_seed(0)
    model: nn.Module = PROBES[probe]() if probe in PROBES else NETWORKS[probe]()
    x = torch.randn(BATCH, *_input_shape(model)) if probe in PROBES else torch.randn(BATCH, 3, size, size)
    if variant != "bn":
        model = convert_batchnorm(model, x)
    model.train()
    forms = native.disabled() if variant == "bkn_pytorch_forms" else contextlib.nullcontext()
    forward, backward = Direction(), Direction()
    with forms, _counting_triton_launches():
        for step in range(2):  # the first fills the caches (tables, plans)
            model.zero_grad(set_to_none=True)
            with _counted(forward) if step else contextlib.nullcontext():
                out = model(x)
            loss = out.square().mean()
            with _counted(backward) if step else contextlib.nullcontext():
                loss.backward()
    return Count(probe, variant, forward, backward)


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return (first.in_channels, 8, 8)


def _run(args: argparse.Namespace) -> int:
    probes = args.probes.split(",") if args.probes else list(PROBES)
    probes += args.networks.split(",") if args.networks else []
    rows = []
    print(f"torch {torch.__version__}, Triton interpreter on CPU; batch {BATCH}; launches per train step")
    print(f"{'probe':24s} {'variant':18s} {'fwd':>5s} {'bwd':>5s}   triton fwd/bwd   aten fwd/bwd")
    for probe in probes:
        for variant in ("bn", "bkn", "bkn_pytorch_forms"):
            counted = count(probe, variant, args.size)
            rows.append(counted)
            f, b = counted.forward, counted.backward
            print(
                f"{probe:24s} {variant:18s} {f.total:5d} {b.total:5d}   "
                f"{sum(f.triton.values()):5d} / {sum(b.triton.values()):<5d}   "
                f"{sum(f.aten.values()):5d} / {sum(b.aten.values()):<5d}"
            )
            if args.verbose:
                print("    forward ", dict(sorted({**f.triton, **f.aten}.items())))
                print("    backward", dict(sorted({**b.triton, **b.aten}.items())))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", default="", help=f"comma-separated, of {', '.join(PROBES)} (default: all)")
    parser.add_argument(
        "--networks", default="", help=f"also whole networks, comma-separated, of {', '.join(NETWORKS)}"
    )
    parser.add_argument("--size", type=int, default=32, help="the networks' input height = width")
    parser.add_argument("--json", default="", help="write the counts as JSON to this path")
    parser.add_argument("--verbose", action="store_true", help="list the launches by kernel / operator")
    args = parser.parse_args(argv)
    if not kernels.TRITON_ON_CPU:  # run again with the CPU on the CUDA route, in Triton's interpreter
        env = {**os.environ, "TRITON_INTERPRET": "1", kernels.TRITON_ON_CPU_ENV: "1"}
        given = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, os.path.abspath(__file__), *given], env=env, check=False).returncode
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
