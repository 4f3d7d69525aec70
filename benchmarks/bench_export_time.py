"""Training-mode export time per ``graph_optimizer``: how long ``export_onnx(mode="training")`` takes, how many
nodes it writes, and what the file costs ONNX Runtime.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_export_time.py [--networks densenet121,resnet18]
        [--graph-optimizers full,fold,none] [--size 64] [--batch 2] [--repeats 5] [--json out.json]

For each network of ``bench_networks.NETWORKS`` (converted with the default options, 64×64 inputs) and each
graph optimizer, in turn in one process with one torch thread: the export's wall time (tracing, the optimizer,
the op's function body, onnx.checker, the atomic write), the node count of the file, ONNX Runtime's session
creation time (ORT_ENABLE_ALL, one thread) and its median run time over ``--repeats`` runs, and the largest
absolute difference of its output from the PyTorch train-mode forward of the same batch (every form computes
the same function; ``tests/test_export_training.py`` checks posteriors and running statistics too). Export
times are minutes on dense networks, so the forms run one after another rather than interleaved; the
ratio column is each form's export time over the first form's.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_networks  # noqa: E402  (the networks of the test corpus)


def _row(network: str, graph_optimizer: str, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from bkn_export import convert_batchnorm
    from bkn_export.export import export_onnx

    torch.manual_seed(0)
    example = torch.randn(args.batch, 3, args.size, args.size)
    model = convert_batchnorm(bench_networks.NETWORKS[network](), example)
    path = directory / f"{network}_{graph_optimizer}.onnx"
    start = time.perf_counter()
    export_onnx(model, example, path, mode="training", graph_optimizer=graph_optimizer)
    export_s = time.perf_counter() - start
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session_s = time.perf_counter() - start
    feeds = {session.get_inputs()[0].name: example.numpy()}
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        (output,) = session.run(None, feeds)[:1]
        runs.append(time.perf_counter() - start)
    with torch.no_grad():
        expected = copy.deepcopy(model).train()(example).numpy()
    return {
        "network": network,
        "graph_optimizer": graph_optimizer,
        "export_s": export_s,
        "nodes": nodes,
        "ort_session_s": session_s,
        "ort_run_ms": statistics.median(runs) * 1e3,
        "max_abs_vs_torch": float(np.abs(output - expected).max()),
        "output_scale": float(np.abs(expected).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="densenet121")
    parser.add_argument("--graph-optimizers", default="full,fold,none")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    networks = [n for n in args.networks.split(",") if n]
    unknown = [n for n in networks if n not in bench_networks.NETWORKS]
    if unknown:
        parser.error(f"unknown networks {unknown}; choose from {sorted(bench_networks.NETWORKS)}")
    forms = [f for f in args.graph_optimizers.split(",") if f]
    print(f"torch {torch.__version__}, 1 thread, input {args.size}x{args.size}, batch {args.batch}")
    print(f"{'network':<14} {'optimizer':<9} {'export s':>9} {'ratio':>6} {'nodes':>7} {'ORT session s':>14} "
          f"{'ORT run ms':>11} {'max|ORT-torch|':>15}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for network in networks:
            first: float | None = None
            for form in forms:
                row = _row(network, form, args, Path(tmp))
                first = first if first is not None else row["export_s"]
                rows.append(row)
                print(
                    f"{network:<14} {form:<9} {row['export_s']:9.1f} {row['export_s'] / first:5.2f}x "
                    f"{row['nodes']:7d} {row['ort_session_s']:14.1f} {row['ort_run_ms']:11.1f} "
                    f"{row['max_abs_vs_torch']:15.2e}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(
            json.dumps({"torch": torch.__version__, "machine": platform.machine(), "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
