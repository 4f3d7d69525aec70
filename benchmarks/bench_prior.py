"""How well each BKN layer's Kalman prior predicts the layer's actual input statistics, per convention.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_prior.py [--networks digits_resnet,digits_silu_pool,
        monai_resnet18,efficientnet_b0] [--conventions input,output] [--steps 30] [--micro-batch 2]
        [--micro-batches 16] [--population 256] [--json out.json]

For each network and each ``prior_source`` convention (``"input"``: the authors' — a source's
posterior of its *input* statistics is pushed through the path; ``"output"``: the
normalization-aware one — the moments of the source's normalized output, through its γ, β):

1. build the network with BKN in that convention (the demo networks directly; MONAI's 2-D
   ``resnet18`` and efficientnet-pytorch's ``EfficientNet.from_name("efficientnet-b0")`` as
   BatchNorm networks converted by :func:`bkn_export.convert_batchnorm`), all on scikit-learn's
   8×8 digits (the real networks on the digits resized to ``--image-size`` pixels, 1 channel);
2. train it ``--steps`` SGD steps at batch ``--train-batch`` (lr 0.05, momentum 0.9), so that
   γ, β and the weights have left their initial values;
3. run :func:`bkn_export.chain_statistics` (one train-mode forward, no state changed) on one
   large batch of ``--population`` test images (the *population* statistics of every layer's
   input) and on ``--micro-batches`` micro-batches of ``--micro-batch`` test images;
4. for every layer with a prior, per channel c, with μ_pop, σ²_pop the layer's input
   statistics on the large batch, x̄, S those of the micro-batch, and μ_prior, Σ_prior the
   prior the layer received (μ_{k|k-1}, Σ_{k|k-1} + R_k):

   * ``mean error`` = |μ_prior − μ_ref| / σ_pop  (μ_ref = μ_pop or x̄; normalised by the
     population std in both cases, since a micro-batch's own std is itself noisy);
   * ``variance ratio`` = Σ_prior / σ²_ref  (σ²_ref = σ²_pop or the micro-batch's biased S);

   each layer's value is the median over its channels, averaged over the micro-batches; the
   table gives the median over layers (and, for the ratio, the median over layers of the
   factor exp(median_c |log ratio|), how far off the ratio is either way).

Three comparisons: ``micro → pop`` (the prior a micro-batch step uses vs the population: what
the prior is for), ``micro → micro`` (vs that micro-batch's own statistics: what the update
mixes it with) and ``pop → pop`` (the prior computed on the large batch vs the large batch:
the transition's model error without micro-batch noise). EfficientNet runs with
``drop_connect_rate=0`` (stochastic depth would make every input statistic random) and the
plain (not memory-efficient) Swish, which the chain recorder reads as SiLU.

Prints a Markdown table; ``--json`` writes every layer's figures.
"""

from __future__ import annotations

import argparse
import json
import math
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

DEMO_NETWORKS = ("digits_resnet", "digits_silu_pool")
REAL_NETWORKS = ("monai_resnet18", "efficientnet_b0")
COMPARISONS = ("micro → pop", "micro → micro", "pop → pop")


def _real_network(name: str, image_size: int) -> nn.Module:
    """A BatchNorm network for (N, 1, image_size, image_size) → (N, 10)."""
    if name == "monai_resnet18":
        from monai.networks.nets import resnet18

        return resnet18(spatial_dims=2, n_input_channels=1, num_classes=10)
    if name == "efficientnet_b0":
        from efficientnet_pytorch import EfficientNet

        model = EfficientNet.from_name(
            "efficientnet-b0", in_channels=1, num_classes=10, image_size=image_size, drop_connect_rate=0.0
        )
        model.set_swish(memory_efficient=False)
        return model
    raise ValueError(f"unknown network {name!r}; choose from {DEMO_NETWORKS + REAL_NETWORKS}")


def build(name: str, convention: str, image_size: int) -> nn.Module:
    """The network ``name`` with BKN layers of ``prior_source=convention``, wired."""
    if name in DEMO_NETWORKS:
        return build_network(name, f"bkn-{convention}")
    model = _real_network(name, image_size)
    return bkn_export.convert_batchnorm(model, torch.zeros(2, 1, image_size, image_size), prior_source=convention)


def images(x: Tensor, name: str, image_size: int) -> Tensor:
    """Digits (N, 1, 8, 8) as the network's input: unchanged for the demo nets, resized otherwise."""
    if name in DEMO_NETWORKS:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


def train(model: nn.Module, data: DigitsSplit, name: str, args: argparse.Namespace) -> float:
    """``args.steps`` SGD steps at batch ``args.train_batch``; returns the last loss."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        index = torch.randint(0, len(data.x_train), (args.train_batch,), generator=generator)
        loss = F.cross_entropy(model(images(data.x_train[index], name, args.image_size)), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _channel_median(values: Tensor) -> float:
    return float(values.median())


def layer_errors(
    prior_mean: Tensor, prior_variance: Tensor, mean: Tensor, variance: Tensor, population_std: Tensor
) -> tuple[float, float, float]:
    """(median_c |Δμ|/σ_pop, median_c Σ_prior/σ², exp(median_c |log(Σ_prior/σ²)|)) for one layer."""
    tiny = torch.finfo(prior_variance.dtype).tiny
    ratio = prior_variance / variance.clamp_min(tiny)
    mean_error = (prior_mean - mean).abs() / population_std.clamp_min(tiny)
    return (
        _channel_median(mean_error),
        _channel_median(ratio),
        math.exp(_channel_median(ratio.clamp_min(tiny).log().abs())),
    )


def measure(model: nn.Module, data: DigitsSplit, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Per layer and comparison: mean error, variance ratio, variance factor (see the module docstring)."""
    x_test = images(data.x_test, name, args.image_size)
    population = {s.name: s for s in bkn_export.chain_statistics(model, x_test[: args.population])}
    per_layer: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for s in population.values():
        if s.prior_mean is None or s.prior_variance is None:
            continue
        std = s.batch_variance.sqrt()
        per_layer.setdefault(s.name, {c: [] for c in COMPARISONS})["pop → pop"].append(
            layer_errors(s.prior_mean, s.prior_variance, s.batch_mean, s.batch_variance, std)
        )
    start = args.population
    for k in range(args.micro_batches):
        x = x_test[start + k * args.micro_batch : start + (k + 1) * args.micro_batch]
        for s in bkn_export.chain_statistics(model, x):
            if s.prior_mean is None or s.prior_variance is None or s.name not in per_layer:
                continue
            pop = population[s.name]
            std = pop.batch_variance.sqrt()
            per_layer[s.name]["micro → pop"].append(
                layer_errors(s.prior_mean, s.prior_variance, pop.batch_mean, pop.batch_variance, std)
            )
            per_layer[s.name]["micro → micro"].append(
                layer_errors(s.prior_mean, s.prior_variance, s.batch_mean, s.batch_variance, std)
            )
    layers = {
        layer: {c: [statistics.fmean(v[i] for v in values) for i in range(3)] for c, values in by.items() if values}
        for layer, by in per_layer.items()
    }
    summary = {
        c: {
            "mean_error": statistics.median(v[c][0] for v in layers.values()),
            "variance_ratio": statistics.median(v[c][1] for v in layers.values()),
            "variance_factor": statistics.median(v[c][2] for v in layers.values()),
        }
        for c in COMPARISONS
    }
    return {"layers_with_prior": len(layers), "summary": summary, "per_layer": layers}


def _names(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=_names, default=list(DEMO_NETWORKS + REAL_NETWORKS))
    parser.add_argument("--conventions", type=_names, default=["input", "output"])
    parser.add_argument("--steps", type=int, default=30, help="SGD steps before measuring (default 30)")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--population", type=int, default=256, help="images in the large batch (default 256)")
    parser.add_argument("--image-size", type=int, default=64, help="input size of the real networks (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every layer's figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    results: list[dict[str, Any]] = []
    print(f"| network | prior_source | layers with a prior | {' | '.join(COMPARISONS)} |")
    print("|---|---|---|" + "---|" * len(COMPARISONS))
    for name in args.networks:
        for convention in args.conventions:
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                model = build(name, convention, args.image_size)
                loss = train(model, data, name, args)
                measured = measure(model, data, name, args)
            seconds = time.perf_counter() - started
            cells = [
                f"{s['mean_error']:.2f}σ, ×{s['variance_ratio']:.2f} (off ×{s['variance_factor']:.2f})"
                for s in (measured["summary"][c] for c in COMPARISONS)
            ]
            print(f"| {name} | {convention} | {measured['layers_with_prior']} | {' | '.join(cells)} |", flush=True)
            results.append(
                {"network": name, "prior_source": convention, "final_train_loss": loss, "seconds": seconds, **measured}
            )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_text_atomic(args.json, json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
