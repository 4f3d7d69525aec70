"""The GPU check's summary: markdown for benchmarks/RESULTS.md from the files of one run.

Reads what benchmarks/gpu_check.sh leaves in its work folder (every file optional: a step that
did not run or timed out leaves a section saying so) and prints the "GPU check" section of
benchmarks/RESULTS.md with the same headings as its template:

* ``steps.tsv``: step, status (ok | failed | timeout | skipped), seconds, exit code, note;
* ``env.json`` (``benchmarks.gpu.device_info``), ``nvidia-smi.txt``;
* ``pytest.xml`` (JUnit XML of ``pytest -m gpu``);
* ``plugin/harness.log``, ``plugin/library_test.log``, ``plugin/memcheck.log``;
* ``kernels-<dtype>.json`` (``benchmarks/bench_kernels.py --json``);
* ``network-<model>.json`` (``benchmarks.gpu.network_step --json``).

Usage (from the repository root)::

    python -m benchmarks.gpu.summarize WORK_DIR [--command "benchmarks/gpu_check.sh"]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: The goals of issue #12.
KERNEL_RATIO_GOAL = 1.1
BANDWIDTH_GOAL = 0.8
NETWORK_RATIO_GOAL = 1.25
#: "Large" as in benchmarks/bench_kernels.py: tensors of at least 8M elements.
LARGE_ELEMENTS = 8 * 2**20
STEPS = ("env", "pytest", "plugin", "kernels", "network")
OPTIONAL_STEPS = ("ncu",)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]


def _text(value: object) -> str:
    """A JSON value for a table cell; null (missing, not measured) as a dash."""
    return "–" if value is None else str(value)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def read_steps(work: Path) -> dict[str, dict[str, str]]:
    """steps.tsv as {step: {status, seconds, rc, note}} (the last line of a step wins)."""
    steps: dict[str, dict[str, str]] = {}
    path = work / "steps.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                steps[parts[0]] = {
                    "status": parts[1],
                    "seconds": parts[2],
                    "rc": parts[3],
                    "note": parts[4] if len(parts) > 4 else "",
                }
    return steps


def driver_version(work: Path) -> str:
    text = (work / "nvidia-smi.txt").read_text() if (work / "nvidia-smi.txt").is_file() else ""
    match = re.search(r"Driver Version:\s*([\d.]+)", text)
    return match.group(1) if match else "–"


def run_section(work: Path, command: str) -> list[str]:
    env = _read_json(work / "env.json") or {}
    device = env.get("device") or {}
    modules = env.get("modules", {})
    missing = sorted(name for name, version in modules.items() if version is None or "import fails" in str(version))
    missing_text = (", ".join(missing) or "none") if modules else "–"
    device_text = "–" if not env else "no CUDA device"
    if device:
        device_text = (
            f"{device['name']} ({device['capability']}, {device['memory_gib']} GiB, {device['multiprocessors']} SMs)"
        )
    bandwidth = "–"
    if device:
        copy = device.get("copy_gbps")
        bandwidth = f"peak {device.get('peak_gbps')} GB/s ({device.get('peak_source')})" + (
            f"; measured copy {copy} GB/s ({device.get('copy_fraction_of_peak', 0):.0%} of peak)" if copy else ""
        )
    launch = device.get("launch_us") if device else None
    launch_text = "; ".join(f"{name} {_text(value)}" for name, value in launch.items()) if launch else "–"
    versions = " / ".join(_text(v) for v in (env.get("torch"), env.get("torch_cuda"), env.get("cudnn")))
    versions += f" / {_text(modules.get('triton'))}"
    rows = [
        ["date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")],
        ["device", device_text],
        ["driver", driver_version(work)],
        ["python / torch / CUDA / cuDNN / Triton", f"{_text(env.get('python'))} / {versions}"],
        ["timm / torchvision", f"{_text(modules.get('timm'))} / {_text(modules.get('torchvision'))}"],
        ["HBM bandwidth", bandwidth],
        ["host µs per launch (no sync between)", launch_text],
        ["modules missing", missing_text],
        ["Triton kernels taken by the op", _text(env.get("triton_kernels_used"))],
        ["command", f"`{command}`"],
    ]
    return ["### Run", "", *_table(["", ""], rows), ""]


def step_results(work: Path) -> dict[str, str]:
    """One-line result per step, for the steps table."""
    results: dict[str, str] = {}
    env = _read_json(work / "env.json")
    if env:
        pip = (work / "pip-install.txt").read_text().strip() if (work / "pip-install.txt").is_file() else ""
        results["env"] = f"{(env.get('device') or {}).get('name', 'no CUDA device')}; {pip}".strip("; ")
    junit = pytest_counts(work)
    if junit:
        results["pytest"] = (
            f"{junit['passed']} passed, {junit['failed']} failed, {junit['errors']} errors, {junit['skipped']} skipped"
        )
    harness = harness_summary(work)
    if harness:
        results["plugin"] = harness["final"]
    kernels = sorted(work.glob("kernels-*.json"))
    if kernels:
        results["kernels"] = "dtypes: " + ", ".join(p.stem.removeprefix("kernels-") for p in kernels)
    networks = sorted(work.glob("network-*.json"))
    if networks:
        results["network"] = "models: " + ", ".join(p.stem.removeprefix("network-") for p in networks)
    return results


def steps_section(work: Path) -> list[str]:
    steps = read_steps(work)
    results = step_results(work)
    rows = []
    for name in [*STEPS, *(s for s in OPTIONAL_STEPS if s in steps)]:
        step = steps.get(name)
        if step is None:
            rows.append([name, "not run", "", ""])
            continue
        note = "; ".join(part for part in (results.get(name, ""), step["note"]) if part)
        rows.append([name, step["status"], step["seconds"], note])
    return ["### Steps", "", *_table(["step", "status", "seconds", "result"], rows), ""]


def pytest_counts(work: Path) -> dict[str, Any] | None:
    path = work / "pytest.xml"
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    failures = []
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                counts["failed" if kind == "failure" else ("errors" if kind == "error" else "skipped")] += 1
                if kind != "skipped":
                    message = (element.get("message") or "").strip().splitlines()
                    failures.append(f"{case.get('classname')}::{case.get('name')}: {message[0] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "failures": failures}


def pytest_section(work: Path) -> list[str]:
    counts = pytest_counts(work)
    lines = ["### pytest -m gpu", ""]
    if counts is None:
        return [*lines, "Not run (or no JUnit XML was written).", ""]
    lines.append(
        f"{counts['tests']} selected: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped."
    )
    lines += [f"- {failure[:300]}" for failure in counts["failures"][:25]]
    return [*lines, ""]


def harness_summary(work: Path) -> dict[str, Any] | None:
    path = work / "plugin" / "harness.log"
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    cases = []
    for line in lines:
        match = re.match(r"CASE (\S+) (\S+) (\S+) .*Y=(\S+) posterior_mean=(\S+) posterior_variance=(\S+)", line)
        if match:
            cases.append(match.groups())
    finals = [line for line in lines if re.match(r"^(OK|FAILED) \(", line)]
    return {
        "passed": sum(line.startswith("PASS ") for line in lines),
        "failed": [line[5:] for line in lines if line.startswith("FAIL ")],
        "cases": cases,
        "final": finals[-1] if finals else f"no result line; the log ends: {(lines or ['(empty)'])[-1][:200]}",
        "headers": next((line[22:] for line in lines if line.startswith("INFO TensorRT headers ")), "–"),
    }


def plugin_section(work: Path) -> list[str]:
    lines = ["### TensorRT plugin on the GPU without TensorRT (plugins/tensorrt/test/pluginGpuHarness.cpp)", ""]
    summary = harness_summary(work)
    if summary is None:
        return [*lines, "Not run.", ""]
    lines.append(
        f"Headers: {summary['headers']}. Checks: {summary['passed']} passed, {len(summary['failed'])} failed. "
        f"{summary['final']}."
    )
    lines += [f"- FAIL {failure}" for failure in summary["failed"][:25]]
    by_dtype: dict[str, list[tuple[float, float]]] = {}
    for _, dtype, _, y, mean, variance in summary["cases"]:
        by_dtype.setdefault(dtype, []).append((float(y), max(float(mean), float(variance))))
    if by_dtype:
        rows = [
            [dtype, str(len(errors)), f"{max(e[0] for e in errors):.2g}", f"{max(e[1] for e in errors):.2g}"]
            for dtype, errors in sorted(by_dtype.items())
        ]
        lines += ["", *_table(["X dtype", "cases enqueued", "max abs err Y", "max abs err posterior"], rows)]
    for name, label in (("library_test.log", "bkn_plugin_library_test"), ("memcheck.log", "compute-sanitizer")):
        path = work / "plugin" / name
        if path.is_file():
            text = path.read_text(errors="replace").strip().splitlines()
            pick = [line for line in text if "ERROR SUMMARY" in line or re.match(r"^(OK|FAILED) \(", line)]
            lines.append(f"- {label}: {(pick or text[-1:] or ['(empty log)'])[-1].strip()}")
    return [*lines, ""]


def kernels_section(work: Path, copy_gbps: float | None) -> list[str]:
    lines = ["### Triton BKN vs cuDNN BatchNorm, forward + backward (benchmarks/bench_kernels.py)", ""]
    files = sorted(work.glob("kernels-*.json"))
    if not files:
        return [*lines, "Not run.", ""]
    layers = {r["layer"] for path in files for r in (_read_json(path) or {}).get("rows", [])}
    lines.append(
        f"{len(layers)} shapes per batch (ResNet-50's BatchNorm shapes). bkn: a wired layer's eager step (one autograd "
        "node, the running-statistics update in one launch); op (bench_kernels.py --op): the same kernels through the "
        f"contract op torch.ops.bkn.batch_kalman_norm. Goals: bkn/bn ≤ {KERNEL_RATIO_GOAL}x; bkn "
        f"bandwidth ≥ {BANDWIDTH_GOAL:.0%} of peak on tensors of ≥ 8M elements (8·numel·itemsize bytes per step)."
    )
    summary_rows: list[list[str]] = []
    batch_rows: dict[int, dict[str, list[float]]] = {}
    worst: list[tuple[float, str, str, int, float, float]] = []
    for path in files:
        data = _read_json(path) or {}
        rows = data.get("rows", [])
        if not rows:
            continue
        dtype, layout = data.get("dtype", path.stem), data.get("layout", "")
        ratios = [r["ratio"] for r in rows]
        large = [r for r in rows if math.prod(r["shape"]) >= LARGE_ELEMENTS]
        large_ratio = [r["ratio"] for r in large]
        fractions = [r["bkn_peak_fraction"] for r in large]
        bn_fractions = [r["bn_peak_fraction"] for r in large]
        op_ratios = [r["op_ms"] / r["bn_ms"] for r in rows if r.get("op_ms")]
        of_copy = ""
        if copy_gbps and data.get("peak_gbps") and fractions:
            of_copy = f"{statistics.median(fractions) * data['peak_gbps'] / copy_gbps:.0%}"
        summary_rows.append(
            [
                f"{dtype} {layout}",
                str(len(rows)),
                f"{_geomean(ratios):.2f}",
                f"{max(ratios):.2f}",
                f"{sum(r <= KERNEL_RATIO_GOAL for r in ratios)}/{len(ratios)}",
                f"{_geomean(large_ratio):.2f}" if large_ratio else "–",
                f"{min(fractions):.0%} / {statistics.median(fractions):.0%}" if fractions else "–",
                f"{statistics.median(bn_fractions):.0%}" if bn_fractions else "–",
                of_copy or "–",
                f"{_geomean(op_ratios):.2f}" if op_ratios else "–",
            ]
        )
        for r in rows:
            batch_rows.setdefault(r["batch"], {}).setdefault(dtype, []).append(r["ratio"])
            worst.append((r["ratio"], dtype, r["layer"], r["batch"], r["bn_ms"], r["bkn_ms"]))
    header = [
        "dtype, layout",
        "rows",
        "geo-mean bkn/bn",
        "max",
        f"rows ≤ {KERNEL_RATIO_GOAL}x",
        "geo-mean, large",
        "bkn BW large (min / median)",
        "bn BW large (median)",
        "bkn BW large / copy BW",
        "geo-mean op/bn",
    ]
    lines += ["", *_table(header, summary_rows), ""]
    dtypes = sorted({d for per in batch_rows.values() for d in per})
    rows_by_batch = [
        [str(batch)] + [f"{_geomean(per[d]):.2f} (max {max(per[d]):.2f})" if d in per else "–" for d in dtypes]
        for batch, per in sorted(batch_rows.items())
    ]
    lines += ["bkn/bn by batch (geo-mean over the shapes):", "", *_table(["batch", *dtypes], rows_by_batch), ""]
    worst.sort(reverse=True)
    worst_rows = [[f"{w[0]:.2f}", w[1], w[2], str(w[3]), f"{w[4]:.4f}", f"{w[5]:.4f}"] for w in worst[:8]]
    lines += ["Largest ratios:", "", *_table(["bkn/bn", "dtype", "layer", "batch", "bn ms", "bkn ms"], worst_rows), ""]
    return lines


def ncu_lines(work: Path) -> list[str]:
    """The optional ncu step (benchmarks/gpu/ncu_kernels.py): measured DRAM bytes of one step per variant."""
    data = _read_json(work / "ncu.json")
    if not data:
        return []
    shape = "x".join(map(str, data["shape"]))
    lines = [f"Nsight Compute, one step on {data['layer']} ({shape}, {data['dtype']}), clocks unlocked:", ""]
    for variant, v in data["variants"].items():
        if "error" in v:
            lines.append(f"- {variant}: {v['error']}")
            continue
        lines.append(
            f"- {variant}: {v['kernel_count']} kernels, {v['kernel_time_us']:.1f} µs of kernel time, "
            f"{v['dram_bytes'] / 1e6:.1f} MB DRAM = {v['dram_over_counted']:.2f}x the counted "
            f"{data['counted_bytes'] / 1e6:.1f} MB, {v['dram_gbps_while_running'] or 0:.0f} GB/s while running"
        )
    return [*lines, ""]


def network_section(work: Path) -> list[str]:
    lines = ["### Whole-network train step, BKN vs BatchNorm (benchmarks/gpu/network_step.py)", ""]
    files = sorted(work.glob("network-*.json"))
    if not files:
        return [*lines, "Not run.", ""]
    timing_rows, kernel_rows, notes, agreement_rows = [], [], [], []
    amp, size, device, steps, repeats = None, 224, "–", 10, 5
    for path in files:
        data = _read_json(path) or {}
        amp, size, device = data.get("amp"), data.get("size", size), data.get("device", device)
        steps, repeats = data.get("steps", steps), data.get("repeats", repeats)
        for result in data.get("results", []):
            keyed = {(t["batch"], t["mode"], t["norm"]): t for t in result["timings"]}
            for batch, mode in sorted({(t["batch"], t["mode"]) for t in result["timings"]}):
                bn, bkn = keyed.get((batch, mode, "bn")), keyed.get((batch, mode, "bkn"))

                def cell(t: dict[str, Any] | None) -> str:
                    return "–" if t is None else (f"{t['ms']:.2f}" if t["ms"] is not None else "error")

                ratio = f"{bkn['ms'] / bn['ms']:.2f}" if bn and bkn and bn["ms"] and bkn["ms"] else "–"
                errors = "; ".join(f"{t['norm']}: {t['error']}" for t in (bn, bkn) if t and t.get("error"))
                timing_rows.append([result["model"], str(batch), mode, cell(bn), cell(bkn), ratio, errors[:200]])
            for k in result.get("kernels", []):
                kernel_rows.append(
                    [
                        k["model"],
                        str(k["batch"]),
                        str(k["norm_layers"]),
                        str(k["bkn_layers"]),
                        "–" if k["bn_kernels"] is None else str(k["bn_kernels"]),
                        "–" if k["bkn_kernels"] is None else str(k["bkn_kernels"]),
                        "–" if k["extra_per_layer"] is None else f"{k['extra_per_layer']:.1f}",
                        "–" if k["triton_per_layer"] is None else f"{k['triton_per_layer']:.1f}",
                        k.get("error") or "",
                    ]
                )
            for a in result.get("agreement", []):
                detail = a.get("error") or "; ".join(a.get("failed", []))
                relative = f"{a['max_relative']:.2g} ({a['worst']})" if "max_relative" in a else "–"
                verdict = "agrees" if a["passed"] else "DIFFERS"
                agreement_rows.append([result["model"], str(a["batch"]), a["norm"], verdict, relative, detail[:200]])
            for batch, conversion in result.get("conversion", {}).items():
                if not conversion.get("ok"):
                    notes.append(f"- {result['model']} batch {batch}: {conversion.get('error')}")
    lines.append(
        f"{device}: forward + cross-entropy + backward + SGD step, {size}x{size}, "
        f"{'autocast ' + amp if amp else 'float32'}; ms per step (median of {repeats} means of {steps} steps). "
        f"Goal: bkn/bn ≤ {NETWORK_RATIO_GOAL}x at batch 2, graphed."
    )
    header = ["model", "batch", "mode", "bn ms", "bkn ms", "bkn/bn", "errors"]
    lines += ["", *_table(header, timing_rows), ""]
    header = [
        "model",
        "batch",
        "BN layers",
        "BKN layers",
        "kernels/step bn",
        "kernels/step bkn",
        "extra per BKN layer",
        "Triton per BKN layer",
        "note",
    ]
    lines += ["Kernels per eager train step (torch.profiler):", "", *_table(header, kernel_rows), ""]
    if agreement_rows:
        header = ["model", "batch", "norm", "graphed vs eager", "max relative difference", "differences"]
        lines += [
            "Parameters and buffers after the same steps eagerly and through the captured step:",
            "",
            *_table(header, agreement_rows),
            "",
        ]
    if notes:
        lines += ["Conversion errors:", "", *notes, ""]
    return lines


def summarize(work: Path, command: str) -> str:
    env = _read_json(work / "env.json") or {}
    copy_gbps = (env.get("device") or {}).get("copy_gbps")
    sections = [
        ["## GPU check (benchmarks/gpu_check.sh)", ""],
        run_section(work, command),
        steps_section(work),
        pytest_section(work),
        plugin_section(work),
        kernels_section(work, copy_gbps) + ncu_lines(work),
        network_section(work),
    ]
    return "\n".join(line for section in sections for line in section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--command", default="benchmarks/gpu_check.sh")
    args = parser.parse_args(argv)
    print(summarize(args.work, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
