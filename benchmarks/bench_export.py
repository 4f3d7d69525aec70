"""Export latency: the folded BKN model in ONNX Runtime vs BatchNorm and vs PyTorch eager.

One network (:class:`bkn_export.demo.models.DigitsResNet`, width ``--width``) in three forms,
timed side by side in one process, interleaved (each repeat runs every contender once,
in a rotating order), medians over repeats:

* ``ort_bkn``   — the BKN model exported with ``export_onnx(mode="inference")`` (BKN folded)
* ``ort_bn``    — the same weights with ``nn.BatchNorm2d``, exported by plain
                  ``torch.onnx.export(dynamo=True)``
* ``torch_bkn`` — the BKN model in PyTorch eager eval mode (``torch.inference_mode``)

Printed ratios: ort_bkn / ort_bn (goal <= 1.00, i.e. equal within noise) and
ort_bkn / torch_bkn (goal <= 0.7). All contenders use ``--threads`` CPU threads.

``--modes inference,training``: the training-mode comparison lives in
``benchmarks/bench_export_training.py`` (its ``run(args) -> list[dict]`` gets these same
parsed arguments); it is called when that file exists. Rows are dicts with at least
``mode``, ``batch``, ``measurement`` and ``value``; ``--json`` writes them all.

    OMP_NUM_THREADS=1 python benchmarks/bench_export.py --batch 1,8,32 --repeats 31
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
TRAINING_BENCH = HERE / "bench_export_training.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="inference", help="comma list of inference, training")
    parser.add_argument("--batch", default="1,8,32", help="comma list of batch sizes")
    parser.add_argument("--width", type=int, default=32, help="DigitsResNet width")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats (medians over these)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds of calls per contender per repeat")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for ORT and PyTorch")
    parser.add_argument("--json", type=Path, default=None, help="write all rows here")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    return args


# --------------------------------------------------------------------------- timing


def time_interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    min_time: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each contender (measured with ``clock``); every repeat runs all, in a rotating
    order."""
    names = list(contenders)
    calls = {}
    for name, fn in contenders.items():  # warm up and size the inner loop to ~min_time
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            fn, n = contenders[name], calls[name]
            start = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


# --------------------------------------------------------------------------- inference


_STATISTICS_RANGES = {"running_mean": (-0.5, 0.5), "running_var": (0.5, 2.0), "weight": (0.5, 1.5), "bias": (-0.5, 0.5)}


def graph_signature(path: Path) -> list[tuple[str, tuple[tuple[int, ...], ...]]]:
    """Op types in order with the shapes of their initializer inputs: equal signatures, equal work."""
    import onnx

    model = onnx.load(str(path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [(n.op_type, tuple(shapes[i] for i in n.input if i in shapes)) for n in model.graph.node]


def _models(width: int) -> tuple[nn.Module, nn.Module]:
    """(BatchNorm model, BKN model converted from it): same weights and running statistics."""
    import bkn_export
    from bkn_export.demo.models import DigitsResNet

    torch.manual_seed(0)
    bn_model = DigitsResNet(norm="batchnorm", width=width)
    with torch.no_grad():
        for module in bn_model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for field, (low, high) in _STATISTICS_RANGES.items():
                    getattr(module, field).uniform_(low, high)
    bkn_model = bkn_export.convert_batchnorm(copy.deepcopy(bn_model), torch.randn(2, 1, 8, 8))
    return bn_model.eval(), bkn_model.eval()


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_inference(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bkn_export.export import export_onnx

    torch.set_num_threads(args.threads)
    bn_model, bkn_model = _models(args.width)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bkn_path, bn_path = Path(tmp) / "bkn.onnx", Path(tmp) / "bn.onnx"
        result = export_onnx(bkn_model, torch.randn(2, 1, 8, 8), bkn_path)
        batch = torch.export.Dim("batch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                bn_model, (torch.randn(2, 1, 8, 8),), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
            )
        assert program is not None
        program.save(str(bn_path))
        folded = sum(r.kind != "standalone" for r in result.fold_report)
        same = graph_signature(bkn_path) == graph_signature(bn_path)
        print(f"BKN export: {folded}/{len(result.fold_report)} layers folded, opset {result.opset}")
        print(f"BKN graph has the same ops and weight shapes as the BatchNorm graph: {same}")
        bkn_session, bn_session = _session(bkn_path, args.threads), _session(bn_path, args.threads)
        for n in args.batches:
            x = torch.randn(n, 1, 8, 8)
            feed_bkn = {bkn_session.get_inputs()[0].name: x.numpy()}
            feed_bn = {bn_session.get_inputs()[0].name: x.numpy()}
            with torch.inference_mode():
                expected = bkn_model(x).numpy()
            error = float(np.abs(bkn_session.run(None, feed_bkn)[0] - expected).max())

            def eager(x: torch.Tensor = x) -> Any:
                with torch.inference_mode():
                    return bkn_model(x)

            def ort_bkn(feed: dict[str, Any] = feed_bkn) -> Any:
                return bkn_session.run(None, feed)

            def ort_bn(feed: dict[str, Any] = feed_bn) -> Any:
                return bn_session.run(None, feed)

            medians = time_interleaved(
                {"ort_bkn": ort_bkn, "ort_bn": ort_bn, "torch_bkn": eager},
                args.repeats,
                args.min_time,
            )
            for name, seconds in medians.items():
                rows.append({"mode": "inference", "batch": n, "measurement": f"{name}_ms", "value": seconds * 1e3})
            rows.append(
                {
                    "mode": "inference",
                    "batch": n,
                    "measurement": "ort_bkn/ort_bn",
                    "value": medians["ort_bkn"] / medians["ort_bn"],
                    "goal": "<= 1.00",
                }
            )
            rows.append(
                {
                    "mode": "inference",
                    "batch": n,
                    "measurement": "ort_bkn/torch_bkn",
                    "value": medians["ort_bkn"] / medians["torch_bkn"],
                    "goal": "<= 0.70",
                }
            )
            rows.append({"mode": "inference", "batch": n, "measurement": "max_abs_error_vs_torch", "value": error})
    return rows


def run_training(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of benchmarks/bench_export_training.py's ``run(args)``, if that file exists."""
    if not TRAINING_BENCH.exists():
        print(f"training mode: {TRAINING_BENCH.name} not found; skipped")
        return []
    spec = importlib.util.spec_from_file_location("bench_export_training", TRAINING_BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows: list[dict[str, Any]] = module.run(args)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'mode':<10} {'batch':>5}  {'measurement':<26} {'value':>12}  goal")
    for row in rows:
        value = row["value"]
        text = f"{value:12.3e}" if "error" in row["measurement"] else f"{value:12.3f}"
        print(f"{row['mode']:<10} {row['batch']!s:>5}  {row['measurement']:<26} {text}  {row.get('goal', '')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {args.threads}, "
        f"repeats {args.repeats}, width {args.width}"
    )
    runners = {"inference": run_inference, "training": run_training}
    unknown = set(args.mode_list) - set(runners)
    if unknown:
        print(f"unknown modes {sorted(unknown)}; choose from {sorted(runners)}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for mode in args.mode_list:
        rows.extend(runners[mode](args))
    print_rows(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
