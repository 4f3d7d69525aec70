"""Test-time adaptation in ONNX Runtime with a training-mode BKN export.

A digits ResNet with BKN layers is trained briefly on clean digits. The deployed input
stream is then shifted (contrast and brightness change, plus noise), which breaks the
running statistics the eval-mode model normalizes with. We export the model in
training mode with ``running_stats_io=True`` and run that graph in ONNX Runtime on the
shifted stream, feeding each call's updated running statistics into the next call: the
running statistics adapt without PyTorch. Accuracy on the shifted test set is shown
before (source statistics) and after (adapted statistics), both evaluated in ONNX
Runtime with the eval-mode (inference) export, and for the training graph's own
batch-normalized predictions on the stream.

Run: ``python examples/test_time_adaptation.py`` (about 20 s on one CPU core).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from bkn_export.demo.data import load_digits_split
from bkn_export.demo.models import digits_resnet
from bkn_export.export import export_onnx
from bkn_export.export.training import check_feeds, check_training_model, running_stat_names
from bkn_export.nn import _BatchKalmanNorm


def shift(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The deployment shift: lower contrast, brighter, noisier (x: (N, 1, 8, 8), standardized)."""
    generator = torch.Generator().manual_seed(seed)
    return 0.5 * x + 1.5 + 0.3 * torch.randn(x.shape, generator=generator)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 32) -> None:
    """A few epochs of Adam on clean digits (BKN layers in train mode: micro-batch statistics)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_eval(model: nn.Module, example: torch.Tensor, path: Path) -> ort.InferenceSession:
    """The eval-mode (inference) export, running statistics folded into the convolutions."""
    export_onnx(model, example, path, mode="inference")
    return session(path)


def accuracy(run: ort.InferenceSession, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = run.run(None, {run.get_inputs()[0].name: x.numpy()})[0]
    return float((logits.argmax(1) == y.numpy()).mean())


def running_statistics(model: nn.Module, path: Path) -> dict[str, np.ndarray]:
    """Graph-input feeds holding the running statistics of the BKN layers whose statistics are inputs of ``path``
    (every layer that tracks them, except one frozen in eval mode, which the file runs as it is)."""
    inputs = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    feeds: dict[str, np.ndarray] = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, _BatchKalmanNorm)
            and module.running_mean is not None
            and f"{name}.running_mean" in inputs
        ):
            assert module.running_var is not None
            mean_in, var_in, _, _ = running_stat_names(name)
            feeds[mean_in] = module.running_mean.numpy().copy()
            feeds[var_in] = module.running_var.numpy().copy()
    return feeds


def adapt_in_ort(
    path: Path, stream: torch.Tensor, labels: torch.Tensor, stats: dict[str, np.ndarray], batch: int, passes: int
) -> tuple[dict[str, np.ndarray], float]:
    """Run the training-mode graph over the stream, carrying the running statistics call to call.

    Returns the adapted statistics and the accuracy of the graph's own (batch-statistics) outputs.
    """
    onnx_model = check_training_model(path)
    run = session(path)
    output_names = [o.name for o in run.get_outputs()]
    input_name = run.get_inputs()[0].name  # named after the model's forward() argument
    correct = seen = 0
    for _ in range(passes):
        for start in range(0, len(stream), batch):
            feeds = {input_name: stream[start : start + batch].numpy(), **stats}
            check_feeds(onnx_model, feeds)
            results = dict(zip(output_names, run.run(None, feeds)))
            for name in stats:  # "<layer>.running_mean" ← "<layer>.running_mean_out"
                stats[name] = results[name + "_out"]
            correct += int((results["output"].argmax(1) == labels[start : start + batch].numpy()).sum())
            seen += len(feeds[input_name])
    return stats, correct / seen


def load_statistics(model: nn.Module, stats: dict[str, np.ndarray]) -> nn.Module:
    adapted = copy.deepcopy(model)
    for name, module in adapted.named_modules():
        if isinstance(module, _BatchKalmanNorm) and module.running_mean is not None:
            assert module.running_var is not None
            mean_in, var_in, _, _ = running_stat_names(name)
            module.running_mean.copy_(torch.from_numpy(stats[mean_in]))
            module.running_var.copy_(torch.from_numpy(stats[var_in]))
    return adapted


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="stream batch size")
    parser.add_argument("--passes", type=int, default=2, help="passes over the shifted stream")
    parser.add_argument("--momentum", type=float, default=0.2, help="running-statistics momentum while adapting")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    data = load_digits_split()
    model = digits_resnet(width=16)
    train(model, data.x_train, data.y_train, args.epochs)
    model.eval()
    stream, labels = shift(data.x_test), data.y_test

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        source = export_eval(model, stream[:2], directory / "source.onnx")
        clean, before = accuracy(source, data.x_test, labels), accuracy(source, stream, labels)

        adapting = copy.deepcopy(model)
        for module in adapting.modules():
            if isinstance(module, _BatchKalmanNorm):
                module.momentum = args.momentum  # baked into the graph's update rule
        train_path = directory / "model_train.onnx"
        export_onnx(adapting, stream[:4], train_path, mode="training", running_stats_io=True)
        stats, online = adapt_in_ort(
            train_path, stream, labels, running_statistics(model, train_path), args.batch, args.passes
        )
        adapted = export_eval(load_statistics(model, stats), stream[:2], directory / "adapted.onnx")
        after = accuracy(adapted, stream, labels)

    results = {"clean": clean, "shifted_before": before, "shifted_online": online, "shifted_after": after}
    print(f"clean test set, source statistics          : {clean:6.1%}")
    print(f"shifted stream, source statistics (before) : {before:6.1%}")
    print(f"shifted stream, training graph outputs      : {online:6.1%}  (batch statistics, {args.batch}/call)")
    print(f"shifted stream, adapted statistics (after) : {after:6.1%}")
    return results


if __name__ == "__main__":
    main()
