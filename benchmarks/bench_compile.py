"""Kernels a torch.compile'd train step of one wired BKN layer launches, against BatchNorm.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py [--probes relu_conv3x3,silu_conv1x1]
        [--transitions identity,learned,propagate] [--json out.json] [--show-code DIR]
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --networks resnet18,mobilenetv3 [--size 64]

Each probe is a two-normalization model ``conv → BN → act → conv' → BN`` (C = 64, 8×8, batch 2,
train mode) compiled with inductor; the model is run as is (``bn``) and converted with
:func:`bkn_export.convert_batchnorm` for each transition. In the converted model the first BKN
layer is first in the chain (BatchNorm math through the BKN op) and the second is wired to it: its
prediction pushes the first layer's posterior through ``act → conv'``. Probes:

* ``relu_conv3x3``: ReLU → 3×3 conv (zero padding 1);
* ``hardswish_dw``: hardswish → depthwise 3×3 conv (groups = C; the first conv is 1×1);
* ``silu_conv1x1``: SiLU → 1×1 conv;
* ``relu_maxpool_conv3x3``: ReLU → max pooling 3/2 → 3×3 conv (a ResNet stem);
* ``relu_upsample_conv3x3``: ReLU → nearest upsampling ×2 → 3×3 conv (a UNet decoder: a linear run).

By default ``relu_conv3x3`` runs identity, learned and propagate, the others propagate.
``--networks`` counts whole networks of ``benchmarks/bench_networks.py`` instead (batch 2, converted
with the default options; a few minutes each).

What is counted, separately for the forward and the backward graph of one train step (the
partition AOTAutograd makes; SGD is not part of it):

* ``kernels``: generated kernel launches in the Triton schedule: inductor lowers the graphs for
  the CPU device with ``cpu_backend="triton"`` and the wrapper's ``.run(`` calls are counted (codegen
  only: no Triton driver is needed and nothing runs). Fusion and the reduction / pointwise split
  follow the rules that make the Triton kernels on a GPU, so this is the proxy for a GPU's launches.
  Differences from a CUDA compile: the CPU convolution wants channels-last, so the input and the
  weights get layout copies and the custom op's input a copy back to contiguous (one kernel per
  conv and per BKN op that a CUDA graph would not have; BatchNorm pays the conv ones too).
* ``extern``: calls the wrapper makes to non-generated kernels, by name: ``convolution``,
  ``convolution_backward``, ``mm`` / ``bmm`` (inductor keeps a matmul as an extern call unless
  it lowers it to a reduction), and ``bkn.batch_kalman_norm`` / ``_backward`` (opaque to
  inductor; on CUDA its Triton kernels are one launch for small inputs (the single-program
  kernels), else several, forward and backward: ``bkn_export/kernels``).
* ``cpp``: the C++ kernels the CPU compile actually runs (the same graphs; C++ codegen fuses
  reductions of different sizes into one kernel, so it is lower than ``kernels``).

``BKN − BN`` is the difference of ``kernels`` + ``extern`` (excluding convolutions, which both
have) per probe; the first BKN layer contributes too (the op, a contiguous copy, running statistics
kept apart from the reduction). ``--show-code DIR`` writes the generated wrapper code of every
graph (``<probe>_<transition>_{fwd,bwd}_{triton,cpp}.py``) to read which op each kernel fuses.
One run of the defaults takes about a minute on one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import torch.utils._triton as triton_utils
from torch import nn
from torch._inductor import compile_fx
from torch._inductor.graph import GraphLowering

from bkn_export import convert_batchnorm

CHANNELS = 64
SPATIAL = 8
BATCH = 2


def _two_norms(first: nn.Module, *path: nn.Module) -> nn.Module:
    """first → BatchNorm → path → BatchNorm, on CHANNELS channels: the second layer is wired through ``path``."""
    return nn.Sequential(first, nn.BatchNorm2d(CHANNELS), *path, nn.BatchNorm2d(CHANNELS))


def _conv(kernel: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(CHANNELS, CHANNELS, kernel, padding=kernel // 2, groups=groups, bias=False)


def _relu_conv3x3() -> nn.Module:
    return _two_norms(_conv(3), nn.ReLU(), _conv(3))


def _hardswish_dw() -> nn.Module:
    return _two_norms(_conv(1), nn.Hardswish(), _conv(3, groups=CHANNELS))


def _silu_conv1x1() -> nn.Module:
    return _two_norms(_conv(3), nn.SiLU(), _conv(1))


def _relu_maxpool_conv3x3() -> nn.Module:
    return _two_norms(_conv(3), nn.ReLU(), nn.MaxPool2d(3, 2, 1), _conv(3))


def _relu_upsample_conv3x3() -> nn.Module:
    return _two_norms(_conv(3), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"), _conv(3))


PROBES: dict[str, Callable[[], nn.Module]] = {
    "relu_conv3x3": _relu_conv3x3,
    "hardswish_dw": _hardswish_dw,
    "silu_conv1x1": _silu_conv1x1,
    "relu_maxpool_conv3x3": _relu_maxpool_conv3x3,
    "relu_upsample_conv3x3": _relu_upsample_conv3x3,
}
DEFAULT_TRANSITIONS = {"relu_conv3x3": ("identity", "learned", "propagate")}
TRANSITIONS = ("identity", "learned", "propagate")


@dataclass
class GraphCount:
    """Launches of one compiled graph (forward or backward)."""

    kernels: int = 0
    cpp: int = 0
    extern: dict[str, int] = field(default_factory=dict)

    @property
    def extern_no_conv(self) -> int:
        return sum(n for name, n in self.extern.items() if not name.startswith("convolution"))


@dataclass
class ProbeCount:
    probe: str
    transition: str
    forward: GraphCount
    backward: GraphCount


_EXTERN = re.compile(r"^\s*(?:[\w, ]+ = )?(?:extern_kernels\.(\w+)|torch\.ops\.(\w+)\.(\w+)\.\w+)\(")


def _call_body(code: str) -> list[str]:
    start = code.index("def call(")
    return code[start:].splitlines()


def _count(code: str, pattern: str) -> tuple[int, Counter[str]]:
    lines = _call_body(code)
    kernels = sum(1 for line in lines if re.match(pattern, line))
    extern: Counter[str] = Counter()
    for line in lines:
        match = _EXTERN.match(line)
        if match:
            name = match.group(1) or (
                match.group(3) if match.group(2) == "aten" else f"{match.group(2)}.{match.group(3)}"
            )
            extern[name] += 1
    return kernels, extern


class _Captured(Exception):
    """Raised after codegen to stop a Triton-scheduled compile that is only read, never run."""


@contextlib.contextmanager
def _capturing_compiler() -> Iterator[tuple[Callable[..., Any], list[tuple[bool, str, str]]]]:
    """A torch.compile backend that, for every graph inductor compiles, also lowers a copy with the
    Triton scheduler and keeps both wrapper codes: ``(is_backward, triton_code, cpp_code)``."""
    graphs: list[tuple[bool, str, str]] = []
    state: dict[str, Any] = {"capture": False, "code": ""}
    original_codegen = GraphLowering.codegen
    original_hash = triton_utils.triton_hash_with_backend

    def codegen(self: GraphLowering) -> Any:
        result = original_codegen(self)
        state["code"] = result[0].value
        if state["capture"]:
            raise _Captured
        return result

    def inner_compile(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        lowered = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # post-grad passes edit the graph
        state["capture"] = True
        try:
            with inductor_config.patch(cpu_backend="triton"):
                compile_fx.compile_fx_inner(lowered, example_inputs, **kwargs)
        except Exception as error:  # inductor wraps what codegen raises
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, _Captured):
                cause = cause.__cause__ or getattr(cause, "inner_exception", None)
            if cause is None:
                raise
        finally:
            state["capture"] = False
        triton_code = state["code"]
        compiled = compile_fx.compile_fx_inner(gm, example_inputs, **kwargs)
        graphs.append((bool(kwargs.get("is_backward")), triton_code, state["code"]))
        return compiled

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        return compile_fx.compile_fx(gm, example_inputs, inner_compile=inner_compile)

    GraphLowering.codegen = codegen  # type: ignore[method-assign]
    # Triton kernels' metadata hash the driver's target; with no driver, codegen needs a stand-in.
    triton_utils.triton_hash_with_backend = lambda: "codegen-only"  # type: ignore[assignment]
    try:
        with (
            inductor_config.patch(fx_graph_cache=False),
            functorch_config.patch(enable_autograd_cache=False),
        ):
            yield backend, graphs
    finally:
        GraphLowering.codegen = original_codegen  # type: ignore[method-assign]
        triton_utils.triton_hash_with_backend = original_hash


def count_probe(probe: str, transition: str, show_code: Path | None = None) -> ProbeCount:
    """Compile one probe (``transition`` "bn": unconverted) and count one train step's launches."""
    torch.manual_seed(0)
    model = PROBES[probe]()
    x = torch.randn(BATCH, CHANNELS, SPATIAL, SPATIAL)
    if transition != "bn":
        model = convert_batchnorm(model, x, transition=transition)
    return count_model(model, x, probe, transition, show_code)


def count_network(name: str, converted: bool, size: int, show_code: Path | None = None) -> ProbeCount:
    """A network of ``benchmarks/bench_networks.py`` (batch 2, ``size``²), as is or converted with the
    default options, counted as :func:`count_probe` counts a probe."""
    try:
        from benchmarks.bench_networks import NETWORKS
    except ImportError:  # run as a script: benchmarks/ is on sys.path, the repository root may not be
        from bench_networks import NETWORKS  # type: ignore[no-redef]

    torch.manual_seed(0)
    model = NETWORKS[name]()
    x = torch.randn(BATCH, 3, size, size)
    if converted:
        model = convert_batchnorm(model, x)
    return count_model(model, x, name, "default" if converted else "bn", show_code)


def count_model(
    model: nn.Module, x: torch.Tensor, probe: str, transition: str, show_code: Path | None = None
) -> ProbeCount:
    """Compile ``model`` (train mode) and count the launches of one step: ``model(x).square().sum()`` backward."""
    model.train()
    torch._dynamo.reset()
    counts = {False: GraphCount(), True: GraphCount()}
    with _capturing_compiler() as (backend, graphs):
        compiled = torch.compile(model, backend=backend)
        compiled(x).square().sum().backward()
    for is_backward, triton_code, cpp_code in graphs:
        count = counts[is_backward]
        kernels, extern = _count(triton_code, r"^\s*\w+\.run\(")
        cpp, _ = _count(cpp_code, r"^\s*cpp_fused_\w+\(")
        count.kernels += kernels
        count.cpp += cpp
        count.extern = dict(Counter(count.extern) + extern)
        if show_code is not None:
            stem = f"{probe}_{transition}_{'bwd' if is_backward else 'fwd'}"
            (show_code / f"{stem}_triton.py").write_text(triton_code)
            (show_code / f"{stem}_cpp.py").write_text(cpp_code)
    return ProbeCount(probe, transition, counts[False], counts[True])


def _extern_text(extern: dict[str, int]) -> str:
    return " ".join(f"{name}×{n}" for name, n in sorted(extern.items())) or "-"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated, of {list(PROBES)}")
    parser.add_argument(
        "--transitions",
        default=None,
        help="comma-separated, of identity, learned, propagate (default: all for relu_conv3x3, else propagate)",
    )
    parser.add_argument(
        "--networks",
        default="",
        help="instead of the probes, whole networks of benchmarks/bench_networks.py (e.g. resnet18,mobilenetv3), "
        "BatchNorm against converted with the default options",
    )
    parser.add_argument("--size", type=int, default=64, help="image size for --networks")
    parser.add_argument("--json", type=Path, default=None, help="write the counts to this JSON file")
    parser.add_argument("--show-code", type=Path, default=None, help="write the generated wrapper code here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    networks = [n for n in args.networks.split(",") if n]
    probes = [] if networks else [p for p in args.probes.split(",") if p]
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        parser.error(f"unknown probes {unknown}; known: {list(PROBES)}")
    runs: list[tuple[str, str, Callable[[], ProbeCount]]] = []
    for network in networks:
        for converted in (False, True):
            runs.append(
                (network, "default" if converted else "bn",
                 functools.partial(count_network, network, converted, args.size, args.show_code))
            )  # fmt: skip
    for probe in probes:
        chosen = args.transitions.split(",") if args.transitions else DEFAULT_TRANSITIONS.get(probe, ("propagate",))
        for transition in ("bn", *chosen):
            if transition != "bn" and transition not in TRANSITIONS:
                parser.error(f"unknown transition {transition!r}; known: {TRANSITIONS}")
            runs.append((probe, transition, functools.partial(count_probe, probe, transition, args.show_code)))
    if args.show_code is not None:
        args.show_code.mkdir(parents=True, exist_ok=True)
    results: list[ProbeCount] = []
    header = f"{'probe':<21} {'transition':<10} | {'fwd kern':>8} {'cpp':>4}  {'extern (fwd)':<44} | "
    header += f"{'bwd kern':>8} {'cpp':>4}  {'extern (bwd)':<58} | {'BKN−BN fwd/bwd':>14}"
    print(header)
    print("-" * len(header))
    baseline: ProbeCount | None = None
    for probe, transition, run in runs:
        result = run()
        results.append(result)
        if transition == "bn":
            baseline = result
        assert baseline is not None
        extra = [
            (g.kernels + g.extern_no_conv) - (b.kernels + b.extern_no_conv)
            for g, b in ((result.forward, baseline.forward), (result.backward, baseline.backward))
        ]
        print(
            f"{probe:<21} {transition:<10} | {result.forward.kernels:>8} {result.forward.cpp:>4}  "
            f"{_extern_text(result.forward.extern):<44} | {result.backward.kernels:>8} {result.backward.cpp:>4}  "
            f"{_extern_text(result.backward.extern):<58} | {extra[0]:>6}/{extra[1]:<7}",
            flush=True,
        )
    if args.json is not None:
        payload = {
            "torch": torch.__version__,
            "probe_shape": [BATCH, CHANNELS, SPATIAL, SPATIAL],
            "network_shape": [BATCH, 3, args.size, args.size],
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
