"""Whole-network train step, BKN against BatchNorm, eager and CUDA-graphed; kernels per BKN layer.

For each model and batch size, one train step = forward, cross-entropy loss, backward, SGD
(momentum 0.9) step, on random 224x224 inputs and labels:

* ``bn``: the model as built (timm's own BatchNorm2d / BatchNormAct2d layers);
* ``bkn``: a copy converted with ``bkn_export.convert_batchnorm`` (default options: Kalman
  chain wired, ``propagate`` transition) on an example batch of the same size.

Modes: ``eager`` (Python issues every kernel each step) and ``graphed`` (the whole step captured
once with ``torch.cuda.graph`` after a warm-up on a side stream, then replayed; the pattern of
PyTorch's "whole network capture" example). Time per step: the median over ``--repeats`` of the
mean of ``--steps`` steps between two CUDA events (so at small batch the eager figure includes
the host's launch overhead, which is what graphs remove). Ratio: bkn / bn, same model, batch and
mode; goal ≤ 1.25x at batch 2 graphed.

Kernels per layer: one eager step of each variant under ``torch.profiler`` (CPU + CUDA
activities), counting device kernels (memcpy / memset excluded). Reported: kernels per step
for bn and bkn, the number of normalization layers, (bkn − bn) / layers = extra kernels per
BKN layer, the Triton kernels (names ``_*_kernel``) per BKN layer, and the most frequent
kernel names of the bkn step.

Graphed against eager: for each (batch, norm), two copies of the model from the same state, one stepped eagerly,
one through a captured step (``TrainStep.capture``: its warm-up steps eagerly, then replays), the same number of
steps in all (``AGREEMENT_REPLAYS`` replays); then every parameter and buffer compared (:func:`compare_states`:
largest difference relative to the tensor's largest magnitude, ``num_batches_tracked`` exactly). A capture that
replays the wrong work (a running statistic not updated, a stale cached constant) shows as a difference far above
the float32 noise of atomics in the convolutions' weight gradients.

Each model runs under its own error boundary: a model that does not build or convert, or a
variant that fails (e.g. graph capture), is recorded with its error and the rest goes on.

``--smoke`` runs on the CPU with a tiny built-in Conv/BatchNorm network at 16x16, eager only,
one step per repeat: a check that the script works (tests/test_gpu_check.py); its figures
mean nothing.

Usage::

    python benchmarks/gpu/network_step.py --models resnet50 mobilenetv3_large_100 --batches 2 32 --json out.json
    python benchmarks/gpu/network_step.py --smoke --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Replays of the captured step compared against as many eager steps (after capture's warm-up, matched eagerly).
AGREEMENT_REPLAYS = 3
#: A tensor agrees when its largest difference is at most this times its largest magnitude (plus 1e-6): float32
#: noise of a few steps (nondeterministic atomics) is ~1e-6 relative; a missed update is ~1e-2 and more.
AGREEMENT_RTOL = 1e-4

#: timm names of the two networks the GPU check times.
DEFAULT_MODELS = ("resnet50", "mobilenetv3_large_100")
SMOKE_MODEL = "smoke_convnet"
TRITON_KERNEL_NAME = re.compile(r"^_\w+_kernel$")


@dataclass
class Timing:
    model: str
    batch: int
    norm: str  # "bn" | "bkn"
    mode: str  # "eager" | "graphed"
    ms: float | None
    error: str | None = None


@dataclass
class KernelCount:
    model: str
    batch: int
    bn_kernels: int | None
    bkn_kernels: int | None
    norm_layers: int
    bkn_layers: int
    extra_per_layer: float | None
    triton_per_layer: float | None
    top_bkn_kernels: list[tuple[str, int]] = field(default_factory=list)
    error: str | None = None


def _error_text(error: BaseException) -> str:
    """``Type: first line of the message`` (the full traceback goes to stderr)."""
    traceback.print_exception(error, file=sys.stderr)
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"[:300]


def smoke_convnet() -> nn.Module:
    """Conv-BN-ReLU x3 with a residual-free downsampling, pooling, Linear: (N, 3, H, W) -> (N, 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def build_model(name: str) -> nn.Module:
    """``smoke_convnet`` or a timm model by name (random weights, 1000 classes)."""
    if name == SMOKE_MODEL:
        return smoke_convnet()
    import timm

    return timm.create_model(name, pretrained=False)


def count_norm_layers(model: nn.Module) -> tuple[int, int]:
    """(BatchNorm layers incl. subclasses such as timm's BatchNormAct2d, BKN layers)."""
    from bkn_export import bkn_layers

    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return batchnorms, len(bkn_layers(model))


class TrainStep:
    """One SGD train step of ``model`` on fixed input/label tensors, eager or as a replayed CUDA graph."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None) -> None:
        self.model = model.train()
        self.x, self.target, self.amp = x, target, amp
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _loss(self) -> torch.Tensor:
        if self.amp is None:
            return F.cross_entropy(self.model(self.x), self.target)
        with torch.autocast(self.x.device.type, dtype=self.amp):
            return F.cross_entropy(self.model(self.x), self.target)

    def eager(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()
        self.optimizer.step()

    def capture(self, warmup: int = 3) -> None:
        """Warm up on a side stream (allocations, lazy state, Triton compilation), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self._loss().backward()
            self.optimizer.step()
        self.graph = graph

    def replay(self) -> None:
        assert self.graph is not None, "capture() first"
        self.graph.replay()


def compare_states(reference: nn.Module, other: nn.Module) -> dict[str, Any]:
    """Every parameter and buffer of ``other`` against ``reference`` (same architecture): the largest relative
    difference (max |a - b| / (max |a| + 1e-12)) with the tensor it is in, counters compared exactly, and whether
    all agree (relative difference ≤ AGREEMENT_RTOL + 1e-6 / max |a|, integer tensors equal)."""
    worst, worst_name, failed = 0.0, "", []
    mine = dict(other.state_dict())
    for name, tensor in reference.state_dict().items():
        theirs = mine.get(name)
        if not isinstance(tensor, torch.Tensor) or not isinstance(theirs, torch.Tensor):
            continue
        if not tensor.is_floating_point():
            if tensor.shape != theirs.shape or not torch.equal(tensor, theirs):
                shown = (
                    f"{tensor.tolist()} != {theirs.tolist()}"
                    if tensor.numel() <= 4 and tensor.shape == theirs.shape
                    else f"{int((tensor != theirs).sum()) if tensor.shape == theirs.shape else 'shapes'} differ"
                )
                failed.append(f"{name}: {shown}")
            continue
        scale = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
        difference = float((tensor.detach() - theirs.detach()).abs().max()) if tensor.numel() else 0.0
        relative = difference / (scale + 1e-12)
        if relative > worst:
            worst, worst_name = relative, name
        if difference > AGREEMENT_RTOL * scale + 1e-6:
            failed.append(f"{name}: max difference {difference:.3g} at magnitude {scale:.3g}")
    return {"max_relative": worst, "worst": worst_name, "failed": failed[:5], "passed": not failed}


def graphed_agreement(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None) -> dict:
    """:func:`compare_states` of a copy stepped eagerly and a copy stepped through a captured step (module
    docstring), from ``model``'s state; the model itself is not stepped."""
    eager = TrainStep(copy.deepcopy(model), x, target, amp)
    graphed = TrainStep(copy.deepcopy(model), x, target, amp)
    graphed.capture(warmup=3)
    for _ in range(AGREEMENT_REPLAYS):
        graphed.replay()
    for _ in range(3 + AGREEMENT_REPLAYS):
        eager.eager()
    torch.cuda.synchronize()
    return compare_states(eager.model, graphed.model)


def time_ms(step: Callable[[], None], device: torch.device, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``steps`` consecutive steps (CUDA events; wall clock on CPU)."""
    step()  # warm-up
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / steps)
        else:
            begin = time.perf_counter()
            for _ in range(steps):
                step()
            samples.append((time.perf_counter() - begin) * 1e3 / steps)
    return statistics.median(samples)


def profile_kernels(step: Callable[[], None], device: torch.device) -> Counter[str]:
    """Device kernel names (with multiplicity) launched by one call of ``step``; empty on CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    names: Counter[str] = Counter()
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset")):
            names[event.name] += 1
    return names


def run_model(name: str, batches: list[int], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every (batch, norm, mode) of one model; errors are recorded, never raised."""
    from bkn_export import convert_batchnorm, format_chain

    result: dict[str, Any] = {"model": name, "timings": [], "kernels": [], "conversion": {}, "agreement": []}
    size = 16 if args.smoke else 224
    modes = ["eager"] if device.type != "cuda" else ["eager", "graphed"]
    for batch in batches:
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=device)
        try:
            bn_model = build_model(name).to(device)
        except Exception as error:  # a missing timm or an unknown name: record and go on
            text = f"build: {_error_text(error)}"
            result["timings"] += [asdict(Timing(name, batch, n, m, None, text)) for n in ("bn", "bkn") for m in modes]
            continue
        target = torch.randint(0, 10 if args.smoke else 1000, (batch,), device=device)
        models: dict[str, nn.Module | str] = {"bn": bn_model}
        begin = time.perf_counter()
        try:
            models["bkn"] = convert_batchnorm(copy.deepcopy(bn_model), x)
            result["conversion"][str(batch)] = {"ok": True, "seconds": round(time.perf_counter() - begin, 2)}
            if batch == batches[0]:
                result["chain"] = format_chain(models["bkn"])  # type: ignore[arg-type]
        except Exception as error:  # the conversion of timm's layers is work in progress (issue #14)
            models["bkn"] = f"conversion: {_error_text(error)}"
            result["conversion"][str(batch)] = {"ok": False, "error": models["bkn"]}
        counts = {n: count_norm_layers(m) for n, m in models.items() if isinstance(m, nn.Module)}
        result["norm_layers"] = {n: {"batchnorm": c[0], "bkn": c[1]} for n, c in counts.items()}

        steps: dict[str, TrainStep] = {}
        for norm in ("bn", "bkn"):
            model = models[norm]
            if isinstance(model, str):
                result["timings"] += [asdict(Timing(name, batch, norm, mode, None, model)) for mode in modes]
                continue
            steps[norm] = TrainStep(model, x, target, args.amp_dtype)
            try:
                ms = time_ms(steps[norm].eager, device, args.steps, args.repeats)
                result["timings"].append(asdict(Timing(name, batch, norm, "eager", ms)))
            except Exception as error:
                result["timings"].append(asdict(Timing(name, batch, norm, "eager", None, _error_text(error))))
        result["kernels"].append(asdict(_kernel_counts(name, batch, steps, counts, device)))
        if "graphed" in modes:  # before the timed captures, which step the models
            for norm, model in models.items():
                if not isinstance(model, nn.Module):
                    continue
                try:
                    agreement = graphed_agreement(model, x, target, args.amp_dtype)
                except Exception as error:
                    agreement = {"passed": False, "error": f"capture: {_error_text(error)}"}
                    torch.cuda.synchronize()
                result["agreement"].append({"batch": batch, "norm": norm, **agreement})
        if "graphed" in modes:  # last: a failed capture can leave the device in a bad state
            for norm in ("bn", "bkn"):
                if norm not in steps:
                    if not any(t["norm"] == norm and t["mode"] == "graphed" for t in result["timings"]):
                        result["timings"].append(asdict(Timing(name, batch, norm, "graphed", None, "no eager model")))
                    continue
                try:
                    steps[norm].capture()
                    ms = time_ms(steps[norm].replay, device, args.steps, args.repeats)
                    result["timings"].append(asdict(Timing(name, batch, norm, "graphed", ms)))
                except Exception as error:
                    text = f"capture: {_error_text(error)}"
                    result["timings"].append(asdict(Timing(name, batch, norm, "graphed", None, text)))
                    torch.cuda.synchronize()
        del steps, models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _kernel_counts(
    name: str, batch: int, steps: dict[str, TrainStep], counts: dict[str, tuple[int, int]], device: torch.device
) -> KernelCount:
    norm_layers = counts["bn"][0] if "bn" in counts else 0
    bkn_count = counts["bkn"][1] if "bkn" in counts else 0
    try:
        kernels = {norm: profile_kernels(step.eager, device) for norm, step in steps.items()}
    except Exception as error:
        return KernelCount(name, batch, None, None, norm_layers, bkn_count, None, None, error=_error_text(error))
    bn = sum(kernels["bn"].values()) if "bn" in kernels else None
    bkn = sum(kernels["bkn"].values()) if "bkn" in kernels else None
    if device.type != "cuda":
        return KernelCount(name, batch, None, None, norm_layers, bkn_count, None, None, error="no CUDA device")
    extra = (bkn - bn) / bkn_count if bn is not None and bkn is not None and bkn_count else None
    triton = sum(n for k, n in kernels.get("bkn", Counter()).items() if TRITON_KERNEL_NAME.match(k))
    return KernelCount(
        name,
        batch,
        bn,
        bkn,
        norm_layers,
        bkn_count,
        extra,
        triton / bkn_count if bkn_count else None,
        [(k[:120], n) for k, n in kernels.get("bkn", Counter()).most_common(15)],
    )


def ratios(timings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bkn / bn per (model, batch, mode) where both were measured."""
    found = []
    keyed = {(t["model"], t["batch"], t["mode"], t["norm"]): t for t in timings}
    for (model, batch, mode, norm), bn in keyed.items():
        bkn = keyed.get((model, batch, mode, "bkn"))
        if norm == "bn" and bkn and bn["ms"] and bkn["ms"]:
            found.append({"model": model, "batch": batch, "mode": mode, "ratio": bkn["ms"] / bn["ms"]})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples (median)")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype (default: float32)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny built-in network on the CPU, eager only")
    args = parser.parse_args(argv)
    args.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    if args.smoke:
        args.models, args.steps, args.repeats = [SMOKE_MODEL], 1, 1
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("network_step: no CUDA GPU is visible to torch; use --smoke for a CPU check of the script")
        return 2
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--smoke)"
    print(f"network_step: {device_name}; torch {torch.__version__}; amp {args.amp or 'off (float32)'}")
    results = [run_model(name, args.batches, args, device) for name in args.models]
    timings = [t for r in results for t in r["timings"]]
    for t in timings:
        figure = f"{t['ms']:.3f} ms" if t["ms"] is not None else f"ERROR {t['error']}"
        print(f"{t['model']:<24} batch {t['batch']:>3} {t['norm']:<4} {t['mode']:<8} {figure}", flush=True)
    for r in ratios(timings):
        print(f"{r['model']:<24} batch {r['batch']:>3} {r['mode']:<8} bkn/bn {r['ratio']:.2f}")
    for result in results:
        for a in result["agreement"]:
            verdict = "agrees" if a["passed"] else "DIFFERS"
            detail = a.get("error") or f"max relative {a['max_relative']:.2g} ({a['worst']}) {'; '.join(a['failed'])}"
            print(f"{result['model']:<24} batch {a['batch']:>3} {a['norm']:<4} graphed vs eager: {verdict}, {detail}")
    if args.json:
        payload = {
            "device": device_name,
            "torch": torch.__version__,
            "amp": args.amp,
            "size": 16 if args.smoke else 224,
            "steps": args.steps,
            "repeats": args.repeats,
            "results": results,
            "ratios": ratios(timings),
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
