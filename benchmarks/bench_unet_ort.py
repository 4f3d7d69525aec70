"""A MONAI 3-D UNet in ONNX Runtime vs PyTorch eager: the converted (BKN) network and the BatchNorm original.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_unet_ort.py [--network unet|basic_unet] [--channels 16,32,64]
        [--size 16] [--batches 8] [--modes inference,training] [--repeats 11] [--min-time 0.1] [--threads 1]
        [--torch-threads T] [--ort-threads T] [--clock process|wall] [--levels] [--layers] [--profile] [--json out.json]

Builds ``monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=--channels,
strides=(2, ...), num_res_units=1, norm="batch")`` (MONAI's default activation: PReLU with one slope) — or, with
``--network basic_unet``, ``BasicUNet(spatial_dims=3, features=(8, 8, 16, 32, 64, 8), norm="batch")`` (LeakyReLU,
ConvTranspose upsampling), the control without PReLU — seeds it, gives its BatchNorm layers non-trivial
statistics, converts a copy with ``bkn_export.convert_batchnorm`` (default options) and times, on inputs
(N, 1, S, S, S), side by side in one process, interleaved (each repeat runs every contender once, in a rotating
order; one sample is as many calls as fill ``--min-time`` seconds), medians over ``--repeats``:

inference mode
  * ``torch_bkn`` / ``torch_bn``: the converted / BatchNorm network in PyTorch eager eval (``inference_mode``)
  * ``ort_bkn``: ``export_onnx(mode="inference")`` (BKN folded into Conv / ConvTranspose; a single-slope ``PRelu``
    written as ``LeakyRelu`` by :mod:`bkn_export.export.speed_rules`) in ORT CPU
  * ``ort_bkn_prelu``: the same export with the speed rules off (``speed_rules.disabled()``): the ``PRelu`` that
    ``torch.onnx.export`` emits, ORT's generic broadcasting kernel
  * ``ort_bn``: the BatchNorm network by plain ``torch.onnx.export(dynamo=True)`` in ORT CPU (ORT folds its
    BatchNormalization into the convs itself); the script checks that it has the same ops and weight shapes as
    ``ort_bkn_prelu``

training mode (forward only, batch statistics)
  * ``torch_train``: the converted network's train-mode forward under ``torch.no_grad()``
  * ``ort_train``: ``export_onnx(mode="training")`` (``ai.bkn::BatchKalmanNorm``, function body inlined by ORT)
  * ``ort_train_prelu``: the same export with the speed rules off

Ratios printed: ORT / PyTorch of the medians (below 1: ORT faster), ``ort_bkn / ort_bn``, each ORT graph's
largest difference from PyTorch's output, and the largest difference between the graphs with and without the rewrite.
ORT runs with ``ORT_ENABLE_ALL``, ``intra_op_num_threads`` and ``inter_op_num_threads = 1``;
``torch.set_num_threads`` the same count (``--threads``, or ``--torch-threads`` and
``--ort-threads`` apart to show what an unequal comparison does). The default clock is this process's CPU time
(with one thread ORT computes on the calling thread), which on a shared machine leaves out time spent waiting for
a core; with more than one thread the wall clock is used. ``--levels`` adds ``ort_bkn`` at the four graph
optimisation levels. ``--layers`` adds single layers, each alone, ORT vs PyTorch (:func:`layer_rows`).
``--profile`` then prints, for the largest batch, ORT's kernel time per node type for every ORT graph
(``SessionOptions.enable_profiling``) and PyTorch's top operators by self CPU time (``torch.profiler``).
One run at the defaults takes about a minute.
"""

from __future__ import annotations

import argparse
import copy
import json
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
if str(HERE) not in sys.path:  # run from anywhere: the shared timing lives beside this script
    sys.path.insert(0, str(HERE))
from bench_export import time_interleaved  # noqa: E402  (interleaved, rotating order, medians)

#: Ranges the BatchNorm statistics and affine parameters are drawn from (fresh ones fold to identity).
_STATISTICS_RANGES = {"running_mean": (-0.5, 0.5), "running_var": (0.5, 2.0), "weight": (0.5, 1.5), "bias": (-0.5, 0.5)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--network", choices=("unet", "basic_unet"), default="unet")
    parser.add_argument("--channels", default="16,32,64", help="UNet channels per level (strides 2)")
    parser.add_argument("--size", type=int, default=16, help="input depth = height = width")
    parser.add_argument("--batches", default="8", help="comma list of batch sizes")
    parser.add_argument("--modes", default="inference,training", help="comma list of inference, training")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved repeats (medians over these)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of calls per contender per sample")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both engines")
    parser.add_argument("--torch-threads", type=int, default=None, help="override --threads for PyTorch")
    parser.add_argument("--ort-threads", type=int, default=None, help="override --threads for ORT (0: ORT's default)")
    parser.add_argument("--clock", choices=("process", "wall"), default=None, help="default: process if 1 thread")
    parser.add_argument("--levels", action="store_true", help="also time ort_bkn at every graph optimisation level")
    parser.add_argument("--layers", action="store_true", help="also time single layers (conv3d, prelu, ...) alone")
    parser.add_argument("--profile", action="store_true", help="print ORT and PyTorch time per op at the largest batch")
    parser.add_argument("--json", type=Path, default=None, help="write all rows here")
    args = parser.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.mode_list) - {"inference", "training"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    args.torch_threads = args.threads if args.torch_threads is None else args.torch_threads
    args.ort_threads = args.threads if args.ort_threads is None else args.ort_threads
    if args.clock is None:
        args.clock = "process" if args.torch_threads == 1 and args.ort_threads == 1 else "wall"
    return args


# --------------------------------------------------------------------------- models and graphs


def build_network(args: argparse.Namespace) -> nn.Module:
    """The BatchNorm network, seeded, with non-trivial BatchNorm statistics; eval mode."""
    from monai.networks.nets import BasicUNet, UNet

    torch.manual_seed(0)
    model: nn.Module
    if args.network == "unet":
        channels = tuple(int(c) for c in args.channels.split(","))
        model = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=1,
            norm="batch",
        )
    else:
        model = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8), norm="batch")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                for field, (low, high) in _STATISTICS_RANGES.items():
                    getattr(module, field).uniform_(low, high)
    return model.eval()


def graph_signature(path: Path) -> list[tuple[str, tuple[tuple[int, ...], ...]]]:
    """Op types in order with the shapes of their initializer inputs: equal signatures, equal work."""
    import onnx

    model = onnx.load(str(path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [(n.op_type, tuple(shapes[i] for i in n.input if i in shapes)) for n in model.graph.node]


def export_graphs(
    bn_model: nn.Module, bkn_model: nn.Module, example: torch.Tensor, modes: list[str], tmp: Path
) -> dict[str, Path]:
    """ONNX files by contender name (``ort_bkn``, ``ort_bkn_prelu``, ``ort_bn``, ``ort_train``, ``ort_train_prelu``)."""
    import onnx

    from bkn_export.export import export_onnx, speed_rules

    paths: dict[str, Path] = {}
    if "inference" in modes:
        paths["ort_bkn"] = tmp / "bkn.onnx"
        result = export_onnx(bkn_model, example, paths["ort_bkn"])
        kinds = [r.kind for r in result.fold_report]
        print(f"inference export: {sum(k != 'standalone' for k in kinds)}/{len(kinds)} BKN layers folded {kinds}")
        paths["ort_bkn_prelu"] = tmp / "bkn_prelu.onnx"
        with speed_rules.disabled():
            export_onnx(bkn_model, example, paths["ort_bkn_prelu"])
        paths["ort_bn"] = tmp / "bn.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                bn_model, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
            )
        assert program is not None
        program.save(str(paths["ort_bn"]))
        same = graph_signature(paths["ort_bkn_prelu"]) == graph_signature(paths["ort_bn"])
        print(f"BKN graph (speed rules off) has the same ops and weight shapes as the plain BatchNorm export: {same}")
    if "training" in modes:
        paths["ort_train"] = tmp / "train.onnx"
        result = export_onnx(copy.deepcopy(bkn_model).train(), example, paths["ort_train"], mode="training")
        print(f"training export: {len(result.extra['graph'].layers)} BatchKalmanNorm nodes, opset {result.opset}")
        paths["ort_train_prelu"] = tmp / "train_prelu.onnx"
        with speed_rules.disabled():
            export_onnx(copy.deepcopy(bkn_model).train(), example, paths["ort_train_prelu"], mode="training")
    for graph_name, path in paths.items():
        ops: dict[str, int] = {}
        for node in onnx.load(str(path)).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        print(f"  {graph_name:<16} {sum(ops.values()):4d} nodes: {dict(sorted(ops.items()))}")
    return paths


def session(path: Path, threads: int, level: str = "all", profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- timing


def _ort_call(sess: Any, x: np.ndarray) -> Callable[[], Any]:
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def measure(
    args: argparse.Namespace, bn_model: nn.Module, bkn_model: nn.Module, paths: dict[str, Path], batch: int
) -> list[dict[str, Any]]:
    """Rows {mode, batch, measurement, value} for one batch size."""
    rows: list[dict[str, Any]] = []
    clock = time.process_time if args.clock == "process" else time.perf_counter
    x = torch.randn(batch, 1, args.size, args.size, args.size, generator=torch.Generator().manual_seed(batch))
    xn = x.numpy()
    for mode in args.mode_list:
        contenders: dict[str, Callable[[], Any]] = {}
        errors: dict[str, float] = {}
        if mode == "inference":
            with torch.inference_mode():
                expected, expected_bn = bkn_model(x).numpy(), bn_model(x).numpy()

            def torch_bkn() -> Any:
                with torch.inference_mode():
                    return bkn_model(x)

            def torch_bn() -> Any:
                with torch.inference_mode():
                    return bn_model(x)

            contenders = {"torch_bkn": torch_bkn, "torch_bn": torch_bn}
            names = ["ort_bkn", "ort_bkn_prelu", "ort_bn"]
            for name in names:
                contenders[name] = _ort_call(session(paths[name], args.ort_threads), xn)
            if args.levels:
                for level in ("extended", "basic", "disabled"):
                    contenders[f"ort_bkn_{level}"] = _ort_call(session(paths["ort_bkn"], args.ort_threads, level), xn)
            reference = "torch_bkn"
        else:
            torch_model = copy.deepcopy(bkn_model).train()
            with torch.no_grad():
                expected = copy.deepcopy(torch_model)(x).numpy()
            expected_bn = expected

            def torch_train(model: nn.Module = torch_model) -> Any:
                with torch.no_grad():
                    return model(x)

            contenders = {"torch_train": torch_train}
            names = ["ort_train", "ort_train_prelu"]
            for name in names:
                contenders[name] = _ort_call(session(paths[name], args.ort_threads), xn)
            reference = "torch_train"
        for name in contenders:
            if name.startswith("ort_"):
                target = expected_bn if name == "ort_bn" else expected
                errors[name] = float(np.abs(contenders[name]()[0] - target).max())
        plain, rewritten = ("ort_bkn_prelu", "ort_bkn") if mode == "inference" else ("ort_train_prelu", "ort_train")
        rewrite_diff = float(np.abs(contenders[rewritten]()[0] - contenders[plain]()[0]).max())
        medians = time_interleaved(contenders, args.repeats, args.min_time, clock)
        for name, seconds in medians.items():
            rows.append({"mode": mode, "batch": batch, "measurement": f"{name}_ms", "value": seconds * 1e3})
        for name, seconds in medians.items():
            if name.startswith("ort_"):
                ref = "torch_bn" if name == "ort_bn" else reference
                rows.append(
                    {"mode": mode, "batch": batch, "measurement": f"{name}/{ref}", "value": seconds / medians[ref]}
                )
        if mode == "inference":
            ratio = medians["ort_bkn"] / medians["ort_bn"]
            rows.append({"mode": mode, "batch": batch, "measurement": "ort_bkn/ort_bn", "value": ratio})
        for name, error in errors.items():
            rows.append({"mode": mode, "batch": batch, "measurement": f"{name}_max_abs_err", "value": error})
        rows.append(
            {"mode": mode, "batch": batch, "measurement": f"{rewritten}_vs_{plain}_max_abs_diff", "value": rewrite_diff}
        )
    return rows


# --------------------------------------------------------------------------- single layers


def layer_rows(args: argparse.Namespace, batch: int, tmp: Path) -> list[dict[str, Any]]:
    """One layer alone, ORT vs PyTorch eager (``--layers``): which kernel makes the difference.

    Layers at the UNet's first level, C = the first of ``--channels``, S = ``--size``: ``conv3d`` 3x3x3 C -> C
    (padding 1) on (N, C, S, S, S); ``conv2d`` 3x3 C -> C on (N, C, S, S * S) (the same work in 2-D);
    ``conv_transpose3d`` 3x3x3 2C -> C, stride 2 (MONAI's up-sampling) on (N, 2C, S/2, S/2, S/2); ``prelu`` (one
    slope) and ``leaky_relu`` on (N, C, S, S, S). Each exported alone by ``torch.onnx.export(dynamo=True)``.
    """
    c, s = int(args.channels.split(",")[0]), args.size
    layers: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
        "conv3d": (nn.Conv3d(c, c, 3, padding=1), (batch, c, s, s, s)),
        "conv2d": (nn.Conv2d(c, c, 3, padding=1), (batch, c, s, s * s)),
        "conv_transpose3d": (
            nn.ConvTranspose3d(2 * c, c, 3, stride=2, padding=1, output_padding=1),
            (batch, 2 * c, s // 2, s // 2, s // 2),
        ),
        "prelu": (nn.PReLU(), (batch, c, s, s, s)),
        "leaky_relu": (nn.LeakyReLU(0.25), (batch, c, s, s, s)),
    }
    clock = time.process_time if args.clock == "process" else time.perf_counter
    rows: list[dict[str, Any]] = []
    for name, (module, shape) in layers.items():
        torch.manual_seed(0)
        module.eval()
        x = torch.randn(shape)
        path = tmp / f"layer_{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
        assert program is not None
        program.save(str(path))

        def eager(module: nn.Module = module, x: torch.Tensor = x) -> Any:
            with torch.inference_mode():
                return module(x)

        ort_run = _ort_call(session(path, args.ort_threads), x.numpy())
        error = float(np.abs(ort_run()[0] - eager().numpy()).max())
        medians = time_interleaved({"torch": eager, "ort": ort_run}, args.repeats, args.min_time, clock)
        rows.append(
            {"mode": f"layer {name}", "batch": batch, "measurement": "torch_ms", "value": medians["torch"] * 1e3}
        )
        rows.append({"mode": f"layer {name}", "batch": batch, "measurement": "ort_ms", "value": medians["ort"] * 1e3})
        rows.append(
            {
                "mode": f"layer {name}",
                "batch": batch,
                "measurement": "ort/torch",
                "value": medians["ort"] / medians["torch"],
            }
        )
        rows.append({"mode": f"layer {name}", "batch": batch, "measurement": "ort_max_abs_err", "value": error})
    return rows


# --------------------------------------------------------------------------- profiles


def ort_profile(path: Path, threads: int, x: np.ndarray, calls: int, tmp: Path) -> dict[str, float]:
    """Milliseconds per call of ORT kernel time by node type (``*_kernel_time`` events of ORT's profiler)."""
    sess = session(path, threads, profile_prefix=str(tmp / f"profile_{path.stem}"))
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)  # warm-up call, profiled too, excluded below by the per-call mean over calls + 1
    for _ in range(calls):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / (calls + 1)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def torch_profile(
    model: nn.Module, x: torch.Tensor, train: bool, calls: int, rows: int
) -> list[tuple[str, float, int]]:
    """PyTorch's top operators by self CPU time: (name, ms per forward, calls per forward)."""
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(model).train(train)
    context = torch.no_grad if train else torch.inference_mode
    with context():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            for _ in range(calls):
                model(x)
    averages = sorted(recorded.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
    return [(e.key, e.self_cpu_time_total / 1e3 / calls, e.count // calls) for e in averages]


def print_profiles(
    args: argparse.Namespace, bn_model: nn.Module, bkn_model: nn.Module, paths: dict[str, Path], tmp: Path
) -> None:
    batch = max(args.batch_list)
    x = torch.randn(batch, 1, args.size, args.size, args.size)
    for name, path in paths.items():
        totals = ort_profile(path, args.ort_threads, x.numpy(), 10, tmp)
        grand = sum(totals.values())
        print(f"ORT kernel time by node type, {name}, batch {batch}: {grand:.3f} ms per call")
        for op, ms in list(totals.items())[:8]:
            print(f"  {op:<22} {ms:9.3f} ms {ms / grand:6.1%}")
    torch_models = {"torch_bn (eval)": (bn_model, False), "torch_bkn (eval)": (bkn_model, False)}
    if "training" in args.mode_list:
        torch_models["torch_train"] = (bkn_model, True)
    if "inference" not in args.mode_list:
        del torch_models["torch_bn (eval)"], torch_models["torch_bkn (eval)"]
    for name, (model, train) in torch_models.items():
        top = torch_profile(model, x, train, 10, 8)
        print(f"PyTorch self CPU time by operator, {name}, batch {batch} (ms per forward, calls per forward):")
        for key, ms, count in top:
            print(f"  {key:<30} {ms:9.3f} ms {count:5d}")


# --------------------------------------------------------------------------- main


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'mode':<24} {'batch':>5}  {'measurement':<40} {'value':>12}")
    for row in rows:
        value = row["value"]
        text = f"{value:12.2e}" if row["measurement"].endswith(("err", "diff")) else f"{value:12.3f}"
        print(f"{row['mode']:<24} {row['batch']:>5}  {row['measurement']:<40} {text}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime

    import bkn_export

    torch.set_num_threads(args.torch_threads)
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; network {args.network} "
        f"channels {args.channels if args.network == 'unet' else '-'}, input (N, 1, {args.size}, {args.size}, "
        f"{args.size}); threads torch {args.torch_threads} / ORT {args.ort_threads}; clock {args.clock}; "
        f"repeats {args.repeats}"
    )
    bn_model = build_network(args)
    example = torch.randn(2, 1, args.size, args.size, args.size)
    bkn_model = bkn_export.convert_batchnorm(copy.deepcopy(bn_model), example).eval()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = export_graphs(bn_model, bkn_model, example, args.mode_list, tmp)
        for batch in args.batch_list:
            rows.extend(measure(args, bn_model, bkn_model, paths, batch))
            if args.layers:
                rows.extend(layer_rows(args, batch, tmp))
        print_rows(rows)
        if args.profile:
            print_profiles(args, bn_model, bkn_model, paths, tmp)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
