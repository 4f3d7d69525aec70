"""Versions, the modules the GPU check needs, the device and its bandwidth, as JSON.

Bandwidth: the theoretical peak (``benchmarks.bench_kernels.peak_bandwidth_gbps``: 2 x memory
clock x bus width / 8) and a measured copy bandwidth, ``dst.copy_(src)`` of 1 GiB float32
timed with ``triton.testing.do_bench`` and counted as 2 GiB moved (read + write): what a
streaming kernel can reach on this device, the yardstick for the bandwidth fractions.
Without a CUDA device the device fields are null.

Host time per launch (``launch_us``): the median over repeats of the wall time of 2000 back-to-back launches
without a synchronisation between them, divided by 2000, for an ATen ``add_`` on a 4-element tensor, an empty
Triton kernel with one pointer, and a Triton kernel with 16 pointers and 4 scalars (what a BKN kernel takes). On a
GPU whose work per launch is shorter than the host's, the queue never fills and this is the host's cost of one
launch: what an eager train step at micro-batch pays per operator (RESULTS.md, "GPU check": 2.7 ms per BKN layer,
about 8 Triton launches and 50 host operations per layer on the CUDA route, ``bench_host_overhead.py --network``).

Usage (from the repository root)::

    python -m benchmarks.gpu.device_info [--json env.json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
from typing import Any

import torch

#: Modules a step imports: torch, triton, the test suite, the network step, the project's dependencies.
MODULES = (
    "triton",
    "numpy",
    "pytest",
    "hypothesis",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "timm",
    "torchvision",
    "rich",
    "matplotlib",
    "sklearn",
)
COPY_BYTES = 1 << 30


def module_versions() -> dict[str, str | None]:
    """Version of each module in MODULES, None where it cannot be imported."""
    found: dict[str, str | None] = {}
    for name in MODULES:
        if importlib.util.find_spec(name) is None:
            found[name] = None
            continue
        try:
            found[name] = str(getattr(importlib.import_module(name), "__version__", "present"))
        except Exception as error:  # a module that is there but broken is worth knowing about
            found[name] = f"import fails: {type(error).__name__}: {error}"[:200]
    return found


def pytest_plugin_registered() -> bool:
    """Whether ``pip install -e .`` registered runtime.pytest_plugin (entry point ``bkn_parity``)."""
    return any(ep.name == "bkn_parity" for ep in importlib.metadata.entry_points(group="pytest11"))


def device_info() -> dict[str, Any] | None:
    """Name, capability, SMs, memory, theoretical and measured bandwidth; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from benchmarks.bench_kernels import peak_bandwidth_gbps

    props = torch.cuda.get_device_properties(0)
    peak, source = peak_bandwidth_gbps(0)
    info: dict[str, Any] = {
        "name": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "peak_gbps": round(peak, 1),
        "peak_source": source,
    }
    try:
        from triton.testing import do_bench

        src = torch.empty(COPY_BYTES // 4, device="cuda")
        dst = torch.empty_like(src)
        ms = float(do_bench(lambda: dst.copy_(src), warmup=25, rep=200))
        info["copy_gbps"] = round(2 * COPY_BYTES / (ms * 1e-3) / 1e9, 1)
        info["copy_fraction_of_peak"] = round(info["copy_gbps"] / peak, 3)
    except Exception as error:
        info["copy_gbps"] = None
        info["copy_error"] = f"{type(error).__name__}: {error}"[:200]
    try:
        info["launch_us"] = launch_overhead_us()
    except Exception as error:  # Triton missing or broken
        info["launch_us"] = {"error": f"{type(error).__name__}: {error}"[:200]}
    return info


LAUNCHES = 2000


def launch_overhead_us(repeats: int = 5, launches: int = LAUNCHES, device: str = "cuda") -> dict[str, float | str]:
    """Host µs per launch of an ATen op and of two Triton kernels (see the module docstring). ``device="cpu"`` under
    ``TRITON_INTERPRET=1`` runs the same code on a machine without a GPU (its figures mean nothing: a test's)."""
    import statistics
    import time

    import triton
    import triton.language as tl

    @triton.jit
    def one_pointer(x_ptr):  # type: ignore[no-untyped-def]
        tl.store(x_ptr, 1.0)

    @triton.jit
    def many_arguments(  # type: ignore[no-untyped-def]
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, a, b, c, d, BLOCK: tl.constexpr
    ):
        tl.store(p0, a + b + c + d)

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.zeros(4, device=device)
    pointers = [torch.zeros(4, device=device) for _ in range(16)]
    kinds = {
        "aten_add": lambda: x.add_(1.0),
        "triton_1_pointer": lambda: one_pointer[(1,)](x),
        "triton_16_pointers_4_scalars": lambda: many_arguments[(1,)](*pointers, 3, 0.5, 7, 1.0, BLOCK=4),
    }
    results: dict[str, float | str] = {}
    for name, launch in kinds.items():
        try:
            for _ in range(20):  # compile and warm up
                launch()
            synchronize()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(launches):
                    launch()
                synchronize()
                samples.append((time.perf_counter() - start) / launches * 1e6)
            results[name] = round(statistics.median(samples), 2)
        except Exception as error:  # a launch that fails here must not hide the rest of the environment
            results[name] = f"{type(error).__name__}: {error}"[:200]
    return results


def triton_kernels_used() -> bool | str | None:
    """Whether the op takes the Triton kernels on a float32 CUDA tensor (None: no CUDA; text: import failed)."""
    if not torch.cuda.is_available():
        return None
    try:
        from bkn_export.kernels import uses_kernels

        return uses_kernels(torch.empty(2, 2, device="cuda"))
    except Exception as error:  # a broken checkout must not hide the rest of the environment
        return f"import fails: {type(error).__name__}: {error}"[:200]


def collect() -> dict[str, Any]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "modules": module_versions(),
        "pytest_plugin_registered": pytest_plugin_registered(),
        "triton_kernels_used": triton_kernels_used(),
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "device": device_info(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    info = collect()
    text = json.dumps(info, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
