"""Versions, the modules the GPU check needs, the device and its bandwidth, as JSON.

Bandwidth: the theoretical peak (``benchmarks.bench_kernels.peak_bandwidth_gbps``: 2 x memory
clock x bus width / 8) and a measured copy bandwidth, ``dst.copy_(src)`` of 1 GiB float32
timed with ``triton.testing.do_bench`` and counted as 2 GiB moved (read + write): what a
streaming kernel can reach on this device, the yardstick for the bandwidth fractions.
Without a CUDA device the device fields are null.

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
    return info


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
