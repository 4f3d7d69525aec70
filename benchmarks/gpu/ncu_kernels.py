"""Measured DRAM traffic of one BKN and one BatchNorm training step, with Nsight Compute (``ncu``).

``benchmarks/bench_kernels.py`` counts 8·numel·itemsize bytes per forward + backward (the
minimum for training BatchNorm on tensors that do not fit on chip) and reports bandwidth as
that count over the time. This measures what the kernels really move, on one large ResNet-50
shape (layer1.bn3: x of (32, 256, 56, 56), float32, 25.7M elements, 103 MB): per kernel
``gpu__time_duration.sum``, ``dram__bytes_read.sum`` and ``dram__bytes_write.sum`` of one
step of each variant (the same steps as bench_kernels.py's ``training_steps``), after three
warm-up steps outside the profiled range (Triton compilation, cuDNN's heuristics). The sum
over a step's kernels, divided by the counted bytes, says whether the bandwidth figure's
accounting holds; bytes over kernel time is the bandwidth the kernels reach while running
(launch gaps excluded). ``ncu`` serialises kernels and flushes caches between them (its
default ``--cache-control all``), so times are per kernel, cold-cache; the clocks are left
alone (``--clock-control none``; ncu's default locks them to base clocks).

Usage (``benchmarks/gpu_check.sh --only ncu`` runs both)::

    ncu --profile-from-start off --clock-control none --csv --page raw --print-units base \\
        --metrics METRICS --log-file WORK/ncu/bkn.csv python -m benchmarks.gpu.ncu_kernels target --variant bkn
    python -m benchmarks.gpu.ncu_kernels parse WORK/ncu --json WORK/ncu.json

``target --smoke`` runs the steps on a tiny CPU tensor without the profiler calls (a check that
the script works).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")
LAYER, CHANNELS, SIZE, BATCH = "layer1.bn3", 256, 56, 32
DTYPE = torch.float32
VARIANTS = ("bn", "bkn")


def counted_bytes(batch: int = BATCH, channels: int = CHANNELS, size: int = SIZE) -> int:
    """bench_kernels.py's count: 8 · numel · itemsize."""
    return 8 * batch * channels * size * size * torch.empty(0, dtype=DTYPE).element_size()


def target(variant: str, smoke: bool) -> int:
    """Three warm-up steps, then one step inside cudaProfilerStart/Stop (what ncu profiles)."""
    from benchmarks.bench_kernels import training_steps

    device = "cpu" if smoke else "cuda"
    batch, channels, size = (2, 4, 5) if smoke else (BATCH, CHANNELS, SIZE)
    steps = training_steps(channels, size, batch, DTYPE, False, device)
    step = steps.bn if variant == "bn" else steps.bkn
    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ncu_kernels: {variant} step on ({batch}, {channels}, {size}, {size}) {DTYPE} ran on {device}")
    return 0


def read_kernels(path: Path) -> list[dict[str, Any]]:
    """Rows of ``ncu --csv --page raw --print-units base``: kernel name and the METRICS per kernel.

    The log starts with ncu's own lines (``==PROF==`` ...), then a header row, a units row, then
    one row per profiled kernel; numbers may carry thousands separators.
    """
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f'{path}: no CSV header row ("ID", ...): ncu failed? first lines: {lines[:5]}')
    rows = list(csv.reader(lines[start:]))
    header = rows[0]
    missing = [name for name in ("Kernel Name", *METRICS) if name not in header]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing from the ncu CSV header")
    kernels = []
    for row in rows[1:]:
        if len(row) != len(header) or not row[0].strip().isdigit():
            continue  # the units row, or a truncated line
        values = {name: float(row[header.index(name)].replace(",", "") or "nan") for name in METRICS}
        kernels.append({"name": row[header.index("Kernel Name")][:120], **values})
    return kernels


def parse(folder: Path) -> dict[str, Any]:
    counted = counted_bytes()
    result: dict[str, Any] = {
        "layer": LAYER,
        "shape": [BATCH, CHANNELS, SIZE, SIZE],
        "dtype": str(DTYPE).removeprefix("torch."),
        "counted_bytes": counted,
        "variants": {},
    }
    for variant in VARIANTS:
        path = folder / f"{variant}.csv"
        try:
            kernels = read_kernels(path)
        except (OSError, ValueError) as error:
            result["variants"][variant] = {"error": str(error)[:300]}
            continue
        time_ns = sum(k["gpu__time_duration.sum"] for k in kernels)
        moved = sum(k["dram__bytes_read.sum"] + k["dram__bytes_write.sum"] for k in kernels)
        result["variants"][variant] = {
            "kernels": kernels,
            "kernel_count": len(kernels),
            "kernel_time_us": time_ns / 1e3,
            "dram_bytes": moved,
            "dram_over_counted": moved / counted,
            "dram_gbps_while_running": moved / time_ns if time_ns else None,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("target", help="the profiled program")
    run.add_argument("--variant", choices=VARIANTS, required=True)
    run.add_argument("--smoke", action="store_true", help="tiny CPU tensor, no profiler calls")
    read = commands.add_parser("parse", help="summarise <folder>/{bn,bkn}.csv")
    read.add_argument("folder", type=Path)
    read.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.command == "target":
        return target(args.variant, args.smoke)
    result = parse(args.folder)
    for variant, data in result["variants"].items():
        if "error" in data:
            print(f"{variant}: {data['error']}")
            continue
        print(
            f"{variant}: {data['kernel_count']} kernels, {data['kernel_time_us']:.1f} us, "
            f"{data['dram_bytes'] / 1e6:.1f} MB DRAM = {data['dram_over_counted']:.2f} x the counted "
            f"{result['counted_bytes'] / 1e6:.1f} MB, {data['dram_gbps_while_running'] or 0:.0f} GB/s while running"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0 if all("error" not in v for v in result["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
