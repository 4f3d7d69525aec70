"""How far a micro-batch-trained network's running statistics are from what its layers see when deployed.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_running_statistics.py [--networks digits_resnet,digits_silu_pool]
        [--norms batchnorm,bkn-output,bkn-input] [--batch 2] [--steps 600] [--seeds 0,1] [--json out.json]

Why: a wired BKN layer normalizes with its posterior (its micro-batch statistics blended with the Kalman prior)
and its running statistics average that posterior. The prior's variance is low (README, "The Kalman prior:
which Gaussian, measured"), so the running variance can be lower than the variance of the layer's input over the
data. In eval mode every layer normalizes with its running statistics; where they are off, the deployed network
computes something the trained one did not. BatchNorm at a micro-batch has its own gap (its running variance
averages the variance within each micro-batch, which misses the spread between batches), so it is the baseline.

For each network, normalization (``batchnorm``, or a demo BKN variant: ``bkn-output`` the default prior,
``bkn-input`` the authors' convention) and seed:

1. build the demo network (:func:`bkn_export.demo.models.build_network`, wired) and train it ``--steps`` SGD steps
   (lr 0.05, momentum 0.9) at batch ``--batch`` on scikit-learn's digits (the layers' default momentum 0.1: the
   running statistics forget a step after about 10);
2. run the test set through the model in eval mode (the deployed network) and record each normalization layer's
   input: per channel c, its mean μ_c and (biased) variance σ²_c over the test images and positions;
3. per layer, the median over channels of ``running_var / σ²`` (1 = the deployed variance) and of
   ``|running_mean − μ| / σ``; the table gives the median over layers and the lowest layer's variance ratio;
4. test accuracy in eval mode as trained; in train mode (every layer normalizing with its micro-batch's statistics
   and prior, test micro-batches of ``--batch`` images, on a copy), which is what the network was trained to compute;
   and in eval mode after :func:`bkn_export.update_bn` over the training set in batches
   of ``--recalibration-batch`` (running statistics recomputed, the weights unchanged), and the same variance ratio
   after recalibration.

Prints a Markdown table; ``--json`` writes every layer's figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bkn_export
from bkn_export.atomic import write_text_atomic
from bkn_export.demo.data import DigitsSplit, load_digits_split
from bkn_export.demo.models import build_network
from bkn_export.nn import _BatchKalmanNorm

NETWORKS = ("digits_resnet", "digits_silu_pool")
NORMS = ("batchnorm", "bkn-output", "bkn-input")


def normalization_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm or BKN layer that keeps running statistics, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchKalmanNorm)) and module.track_running_stats
    }


@torch.no_grad()
def deployed_input_statistics(model: nn.Module, x: Tensor, batch: int = 256) -> dict[str, tuple[Tensor, Tensor]]:
    """Per normalization layer: (mean, biased variance) per channel of its input over ``x`` in eval mode.

    x: (N, ...) inputs; each layer's input (N, C, *spatial) is reduced over N and the positions, in float64."""
    layers = normalization_layers(model)
    sums: dict[str, list[Tensor]] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            value = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            count = torch.tensor(float(value.shape[1]), dtype=torch.float64)
            parts = (count, value.sum(1), (value * value).sum(1))
            sums[name] = [a + b for a, b in zip(sums[name], parts)] if name in sums else list(parts)

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch):
            model(x[start : start + batch])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    result = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        result[name] = (mean, (squares / count - mean * mean).clamp_min(0.0))
    return result


def layer_gaps(model: nn.Module, deployed: dict[str, tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
    """Per layer: median_c running_var / σ²_c and median_c |running_mean − μ_c| / σ_c (σ² the deployed input's)."""
    gaps = {}
    for name, module in normalization_layers(model).items():
        mean, variance = deployed[name]
        tiny = torch.finfo(torch.float64).tiny
        running_mean = module.running_mean.double()
        running_var = module.running_var.double()
        gaps[name] = {  # the median of an even count is the mean of the middle two (torch.median takes the lower)
            "variance_ratio": float((running_var / variance.clamp_min(tiny)).quantile(0.5)),
            "mean_error": float(((running_mean - mean).abs() / variance.clamp_min(tiny).sqrt()).quantile(0.5)),
        }
    return gaps


def train(model: nn.Module, data: DigitsSplit, steps: int, batch: int, seed: int) -> float:
    """``steps`` SGD steps at ``batch``; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        index = torch.randint(0, len(data.x_train), (batch,), generator=generator)
        loss = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def eval_accuracy(model: nn.Module, data: DigitsSplit) -> float:
    was_training = model.training
    model.eval()
    try:
        return float((model(data.x_test).argmax(1) == data.y_test).double().mean())
    finally:
        model.train(was_training)


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, data: DigitsSplit, batch: int) -> float:
    """Test accuracy with every layer normalizing as in training (batch statistics and the prior, micro-batches of
    ``batch`` test images), on a copy: the model's own running statistics are not touched."""
    probe = copy.deepcopy(model).train()
    correct = 0
    for start in range(0, len(data.x_test) - batch + 1, batch):
        logits = probe(data.x_test[start : start + batch])
        correct += int((logits.argmax(1) == data.y_test[start : start + batch]).sum())
    return correct / (len(data.x_test) // batch * batch)


def summary(gaps: dict[str, dict[str, float]]) -> dict[str, float]:
    ratios = [g["variance_ratio"] for g in gaps.values()]
    return {
        "variance_ratio": statistics.median(ratios),
        "lowest_variance_ratio": min(ratios),
        "mean_error": statistics.median(g["mean_error"] for g in gaps.values()),
    }


def run_one(name: str, norm: str, seed: int, data: DigitsSplit, args: argparse.Namespace) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_network(name, norm)
        loss = train(model, data, args.steps, args.batch, seed)
        trained = layer_gaps(model, deployed_input_statistics(model, data.x_test))
        accuracy = eval_accuracy(model, data)
        train_accuracy = train_mode_accuracy(model, data, args.batch)
        batches = [
            data.x_train[i : i + args.recalibration_batch]
            for i in range(0, len(data.x_train), args.recalibration_batch)
        ]
        bkn_export.update_bn(batches, model)
        recalibrated = layer_gaps(model, deployed_input_statistics(model, data.x_test))
        recalibrated_accuracy = eval_accuracy(model, data)
    return {
        "network": name,
        "norm": norm,
        "seed": seed,
        "final_train_loss": loss,
        "eval_accuracy": accuracy,
        "train_mode_accuracy": train_accuracy,
        "recalibrated_eval_accuracy": recalibrated_accuracy,
        "trained": {"summary": summary(trained), "per_layer": trained},
        "recalibrated": {"summary": summary(recalibrated), "per_layer": recalibrated},
    }


def _names(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=_names, default=list(NETWORKS))
    parser.add_argument("--norms", type=_names, default=list(NORMS))
    parser.add_argument("--batch", type=int, default=2, help="training batch (default 2)")
    parser.add_argument("--steps", type=int, default=600, help="SGD steps (default 600)")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in _names(t)], default=[0, 1])
    parser.add_argument("--recalibration-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every layer's figures here")
    args = parser.parse_args(argv)
    for name in args.networks:
        if name not in NETWORKS:
            parser.error(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")
    for norm in args.norms:
        if norm not in NORMS:
            parser.error(f"unknown normalization {norm!r}; choose from {', '.join(NORMS)}")
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    print(
        "| network | norm | seed | running var / deployed var (median layer; lowest) | mean error | "
        "eval acc | train-mode acc | after update_bn: var ratio (median; lowest) | eval acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.networks:
        for norm in args.norms:
            for seed in args.seeds:
                started = time.perf_counter()
                row = run_one(name, norm, seed, data, args)
                row["seconds"] = time.perf_counter() - started
                results.append(row)
                t, r = row["trained"]["summary"], row["recalibrated"]["summary"]
                print(
                    f"| {name} | {norm} | {seed} | ×{t['variance_ratio']:.2f}; ×{t['lowest_variance_ratio']:.2f} | "
                    f"{t['mean_error']:.2f}σ | {100 * row['eval_accuracy']:.1f} % | "
                    f"{100 * row['train_mode_accuracy']:.1f} % | "
                    f"×{r['variance_ratio']:.2f}; ×{r['lowest_variance_ratio']:.2f} | "
                    f"{100 * row['recalibrated_eval_accuracy']:.1f} % |",
                    flush=True,
                )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_text_atomic(args.json, json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
