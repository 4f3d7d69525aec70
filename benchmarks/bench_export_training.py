"""Training-mode export latency: the ``ai.bkn::BatchKalmanNorm`` graph in ONNX Runtime vs PyTorch train forward.

One network (:class:`bkn_export.demo.models.DigitsResNet`, width ``--width``, converted from
BatchNorm with the default options: transition ``propagate``, learned gain, process
noise), timed side by side in one process, interleaved, medians over repeats
(``bench_export.time_interleaved``):

* ``torch_train``  — PyTorch train-mode forward (batch statistics, Kalman chain, running
                     statistics updated in place) under ``torch.no_grad()``
* ``ort_train``    — ``export_onnx(mode="training")`` in ORT CPU (ORT_ENABLE_ALL)
* ``ort_train_io`` — the same with ``running_stats_io=True`` (running statistics in and out)

Printed ratios: ort_train / torch_train and ort_train_io / torch_train (goal <= 1.0).
``--profile`` adds the share of ORT kernel time per op type at the largest batch.
``run(args)`` is also called by ``benchmarks/bench_export.py --modes training``.

    OMP_NUM_THREADS=1 python benchmarks/bench_export_training.py --batch 1,8,32 --repeats 31
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_export  # noqa: E402  (shared options, models and timing)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows {mode, batch, measurement, value[, goal]} for every batch size in ``args.batches``."""
    from bkn_export.export import export_onnx
    from bkn_export.export.training import running_stat_names
    from bkn_export.nn import _BatchKalmanNorm

    torch.set_num_threads(args.threads)
    _, model = bench_export._models(args.width)
    model.train()
    example = torch.randn(2, 1, 8, 8)
    stats: dict[str, np.ndarray] = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchKalmanNorm) and module.running_mean is not None:
            assert module.running_var is not None
            mean_in, var_in, _, _ = running_stat_names(name)
            stats[mean_in], stats[var_in] = module.running_mean.numpy().copy(), module.running_var.numpy().copy()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plain_path, io_path = Path(tmp) / "train.onnx", Path(tmp) / "train_io.onnx"
        result = export_onnx(model, example, plain_path, mode="training")
        export_onnx(model, example, io_path, mode="training", running_stats_io=True)
        print(f"training export: {len(result.extra['graph'].layers)} BatchKalmanNorm nodes, opset {result.opset}")
        plain = bench_export._session(plain_path, args.threads)
        with_io = bench_export._session(io_path, args.threads)
        for n in args.batches:
            x = torch.randn(n, 1, 8, 8)
            feed = {plain.get_inputs()[0].name: x.numpy()}
            feed_io = {**feed, **stats}
            torch_model = copy.deepcopy(model)
            with torch.no_grad():
                expected = copy.deepcopy(model)(x).numpy()
            error = float(np.abs(plain.run(None, feed)[0] - expected).max())

            def torch_train(x: torch.Tensor = x, m: torch.nn.Module = torch_model) -> Any:
                with torch.no_grad():
                    return m(x)

            def ort_train(feed: dict[str, Any] = feed) -> Any:
                return plain.run(None, feed)

            def ort_train_io(feed: dict[str, Any] = feed_io) -> Any:
                return with_io.run(None, feed)

            medians = bench_export.time_interleaved(
                {"torch_train": torch_train, "ort_train": ort_train, "ort_train_io": ort_train_io},
                args.repeats,
                args.min_time,
            )
            for name, seconds in medians.items():
                rows.append({"mode": "training", "batch": n, "measurement": f"{name}_ms", "value": seconds * 1e3})
            for name in ("ort_train", "ort_train_io"):
                rows.append(
                    {
                        "mode": "training",
                        "batch": n,
                        "measurement": f"{name}/torch_train",
                        "value": medians[name] / medians["torch_train"],
                        "goal": "<= 1.00",
                    }
                )
            rows.append({"mode": "training", "batch": n, "measurement": "max_abs_error_vs_torch", "value": error})
    return rows


def profile(args: argparse.Namespace, batch: int, calls: int = 50) -> dict[str, float]:
    """Share of ORT kernel time per op type for the training-mode graph (ORT's own profiler).

    Ops inlined from the BatchKalmanNorm function body are counted under their own types
    (ReduceMean, Sub, Mul, BatchNormalization, ...), as ORT runs them.
    """
    import json

    import onnxruntime as ort

    from bkn_export.export import export_onnx

    _, model = bench_export._models(args.width)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.onnx"
        export_onnx(model.train(), torch.randn(2, 1, 8, 8), path, mode="training")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: torch.randn(batch, 1, 8, 8).numpy()}
        for _ in range(calls):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"]
    grand = sum(totals.values())
    return {op: t / grand for op, t in sorted(totals.items(), key=lambda item: -item[1])}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with_profile = "--profile" in argv  # ours; the other options are bench_export's
    args = bench_export.parse_args([a for a in argv if a != "--profile"])
    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {args.threads}, "
        f"repeats {args.repeats}, width {args.width}"
    )
    bench_export.print_rows(run(args))
    if with_profile:
        batch = max(args.batches)
        print(f"ORT kernel time by op type, training-mode graph, batch {batch}:")
        for op, share in profile(args, batch).items():
            if share >= 0.005:
                print(f"  {op:<22} {share:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
