"""Micro-batch training of a MONAI U-Net on a synthetic 2-D segmentation task: BatchNorm, BKN (and GroupNorm).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_microbatch_segmentation.py [--networks basicunet,unet]
        [--norms batchnorm,bkn,groupnorm] [--batches 1,2,8] [--steps 1500] [--seeds 0,1] [--size 48]
        [--train-size 2000] [--test-size 256] [--json out.json]

Why: the project's micro-batch accuracy evidence (``bkn train-demo``) is classification of scikit-learn's 8×8
digits. This is a second task of another kind, dense prediction with a network from another library, generated
here from a seed (no download).

The task: 1-channel ``--size``×``--size`` images, a smoothly varying background (a random plane plus a random
low-frequency wave, amplitude about 1) with Gaussian noise (σ 0.3), and 1–4 ellipses or rectangles, each filled
with its own random contrast of either sign (|contrast| 0.4–1.2) added to the background. The target mask is the
union of the shapes. A global threshold does not solve it (the background varies as much as the shapes' contrast,
and a shape can be darker or brighter than its surroundings); local contrast does.

For each network, seed, batch and normalization:

1. build the MONAI network with ``norm="batch"`` under ``torch.manual_seed(seed)``; ``bkn`` is a deep copy of it
   converted by :func:`bkn_export.convert_batchnorm` (default options) on a ``(2, 1, size, size)`` zero input;
   ``groupnorm`` is the same architecture built with ``norm=("group", {"num_groups": 4})`` that takes every
   tensor of the BatchNorm network's initial state with the same name and shape (so every variant of a seed
   starts from the same convolution weights and the same γ = 1, β = 0);
2. train ``--steps`` Adam steps (lr 1e-3, no weight decay, the same for every variant) at batch ``--batches`` on
   the loss BCE-with-logits + soft Dice (per image, averaged), the images drawn from a training pool of
   ``--train-size`` images generated from the seed, in an order drawn from the seed (the same for every variant);
3. evaluate in eval mode (the deployed network: running statistics for BatchNorm and BKN) on ``--test-size``
   held-out images (generated from ``--test-seed``, the same for every seed): Dice of the mask ``logit > 0``
   against the target, per image, averaged.

The reported training loss is the mean over the last ``--loss-window`` steps (one step's loss at batch 1 is
mostly noise). A row whose loss became non-finite says so. Prints a Markdown table of every run and a summary
(mean Dice over seeds per network × norm × batch, with the seeds' min–max); ``--json`` writes every row and the
settings.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bkn_export

try:
    from benchmarks.seeded_grid import integers, names, print_summary, write_results
except ImportError:  # run as a script: benchmarks/ is on sys.path, the repository root may not be
    from seeded_grid import integers, names, print_summary, write_results  # type: ignore[no-redef]

NETWORKS = ("basicunet", "unet")
NORMS = ("batchnorm", "bkn", "groupnorm")
GROUPS = 4


def synthetic_segmentation(count: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` images and masks generated from ``seed`` (deterministic, CPU, float32).

    Returns (images (count, 1, size, size), masks (count, 1, size, size) of 0/1)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # (size,) in (0, 1)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (size, size) each
    yy, xx = yy.expand(count, size, size), xx.expand(count, size, size)

    def per_image(values: Tensor) -> Tensor:
        return values.view(count, 1, 1)

    # background: a plane plus a low-frequency wave, amplitude about 1
    background = per_image(uniform(-0.5, 0.5, count)) + per_image(uniform(-1.0, 1.0, count)) * (xx - 0.5)
    background = background + per_image(uniform(-1.0, 1.0, count)) * (yy - 0.5)
    frequency = uniform(1.0, 3.0, count, 2)
    phase = uniform(0.0, 2 * math.pi, count)
    wave = torch.sin(
        2 * math.pi * (per_image(frequency[:, 0]) * xx + per_image(frequency[:, 1]) * yy) + per_image(phase)
    )
    background = background + per_image(uniform(0.2, 0.6, count)) * wave

    image = background.clone()
    mask = torch.zeros(count, size, size, dtype=torch.bool)
    shapes = torch.randint(1, 5, (count,), generator=g)  # 1–4 shapes per image
    for k in range(4):
        present = per_image((shapes > k).float())
        cy, cx = per_image(uniform(0.15, 0.85, count)), per_image(uniform(0.15, 0.85, count))
        ry, rx = per_image(uniform(0.06, 0.2, count)), per_image(uniform(0.06, 0.2, count))
        ellipse = per_image(torch.rand(count, generator=g) < 0.5)
        inside_ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        inside_rectangle = ((yy - cy).abs() <= ry * 0.85) & ((xx - cx).abs() <= rx * 0.85)
        inside = torch.where(ellipse, inside_ellipse, inside_rectangle) & (present > 0)
        sign = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0)
        contrast = per_image(sign * uniform(0.4, 1.2, count))
        image = torch.where(inside & ~mask, image + contrast, image)
        mask |= inside
    image = image + 0.3 * torch.randn(count, size, size, generator=g)
    return image.unsqueeze(1).contiguous(), mask.unsqueeze(1).float()


def build_network(name: str, norm: Any) -> nn.Module:
    """The MONAI network ``name`` for 1-channel input, 1 output logit per pixel, with normalization ``norm``
    (MONAI's spelling: ``"batch"`` or ``("group", {...})``)."""
    from monai.networks.nets import BasicUNet, UNet

    if name == "basicunet":
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(8, 8, 16, 32, 64, 8), norm=norm)
    if name == "unet":
        return UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=(8, 16, 32, 64),
            strides=(2, 2, 2),
            num_res_units=1,
            norm=norm,
        )
    raise ValueError(f"unknown network {name!r}")


def make_variant(name: str, norm: str, seed: int, size: int) -> tuple[nn.Module, list[str]]:
    """The network ``name`` with normalization ``norm``, initialised from ``seed``; returns it and the warnings
    that building (converting) it gave. Every variant of a seed starts from the BatchNorm network's weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batchnorm = build_network(name, "batch")
    if not any(isinstance(m, nn.BatchNorm2d) for m in batchnorm.modules()):
        raise RuntimeError(f"{name} with norm='batch' has no BatchNorm2d layer")
    caught: list[str] = []
    if norm == "batchnorm":
        return batchnorm, caught
    if norm == "bkn":
        model = copy.deepcopy(batchnorm)
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            bkn_export.convert_batchnorm(model, torch.zeros(2, 1, size, size))
        caught = [f"{r.category.__name__}: {r.message}" for r in records]
        return model, caught
    if norm == "groupnorm":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_network(name, ("group", {"num_groups": GROUPS}))
        own = model.state_dict()
        shared = {k: v for k, v in batchnorm.state_dict().items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
        missing = sorted(set(own) - set(shared))
        if missing:
            raise RuntimeError(f"groupnorm {name}: no BatchNorm tensor for {missing}")
        return model, caught
    raise ValueError(f"unknown normalization {norm!r}")


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE-with-logits (mean over pixels) + soft Dice loss (per image, averaged); logits, target (N, 1, H, W)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (probability * flat).sum(1) + 1.0) / (probability.sum(1) + flat.sum(1) + 1.0)
    return bce + (1 - dice).mean()


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, batch: int, seed: int, window: int) -> tuple[float, bool]:
    """``steps`` Adam steps (lr 1e-3) at ``batch`` on images x (N, 1, H, W), masks y (N, 1, H, W), the batches
    drawn from ``seed``; returns (mean loss over the last ``window`` steps, whether every loss was finite)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # built after conversion: BKN's parameters too
    model.train()
    recent: list[float] = []
    finite = True
    for step in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        loss = segmentation_loss(model(x[index]), y[index])
        value = float(loss.detach())
        if not math.isfinite(value):
            finite = False
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - window:
            recent.append(value)
    return (statistics.fmean(recent) if recent and finite else float("nan")), finite


@torch.no_grad()
def eval_dice(model: nn.Module, x: Tensor, y: Tensor, batch: int = 64) -> float:
    """Mean over images of the Dice of ``logit > 0`` against y, in eval mode; x, y (N, 1, H, W)."""
    was_training = model.training
    model.eval()
    scores = []
    try:
        for start in range(0, len(x), batch):
            predicted = (model(x[start : start + batch]) > 0).flatten(1).float()
            target = y[start : start + batch].flatten(1)
            overlap = (predicted * target).sum(1)
            total = predicted.sum(1) + target.sum(1)
            scores.append(torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total)))
    finally:
        model.train(was_training)
    return float(torch.cat(scores).mean())


def run_one(
    name: str,
    norm: str,
    batch: int,
    seed: int,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Build, train and evaluate one variant; returns its table row."""
    model, caught = make_variant(name, norm, seed, args.size)
    for message in caught:
        print(f"[{name} {norm} seed {seed}] warning: {message}", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss, finite = train(model, *train_data, args.steps, batch, seed, args.loss_window)
    dice = eval_dice(model, *test_data) if finite else float("nan")
    return {
        "network": name,
        "norm": norm,
        "batch": batch,
        "seed": seed,
        "eval_dice": dice,
        "final_train_loss": loss,
        "finite": finite,
        "parameters": sum(p.numel() for p in model.parameters()),
        "warnings": caught,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=names, default=["basicunet"], help="basicunet, unet (default basicunet)")
    parser.add_argument("--norms", type=names, default=list(NORMS), help="default batchnorm,bkn,groupnorm")
    parser.add_argument("--batches", type=integers, default=[1, 2, 8], help="training batches (default 1,2,8)")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per run (default 1500)")
    parser.add_argument("--seeds", type=integers, default=[0, 1], help="default 0,1")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels (default 48)")
    parser.add_argument("--train-size", type=int, default=2000, help="training pool per seed (default 2000)")
    parser.add_argument("--test-size", type=int, default=256, help="held-out images (default 256)")
    parser.add_argument("--test-seed", type=int, default=10_000, help="seed of the held-out set (default 10000)")
    parser.add_argument("--loss-window", type=int, default=50, help="steps the final loss averages (default 50)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every row and the settings here")
    args = parser.parse_args(argv)
    for name in args.networks:
        if name not in NETWORKS:
            parser.error(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")
    for norm in args.norms:
        if norm not in NORMS:
            parser.error(f"unknown normalization {norm!r}; choose from {', '.join(NORMS)}")
    if not args.networks or not args.norms or not args.batches or not args.seeds:
        parser.error("--networks, --norms, --batches and --seeds need at least one value each")
    if any(b < 1 for b in args.batches):
        parser.error("--batches must be ≥ 1")
    if args.steps < 1 or args.train_size < 1 or args.test_size < 1 or args.loss_window < 1 or args.threads < 1:
        parser.error("--steps, --train-size, --test-size, --loss-window and --threads must be ≥ 1")
    if args.size < 16 or args.size % 16:
        parser.error("--size must be a multiple of 16 (the U-Nets downsample 4 or 3 times by 2)")
    if args.size < 32 and 1 in args.batches:
        parser.error("at batch 1, --size must be at least 32 (BasicUNet's bottleneck would hold one value per channel)")
    torch.set_num_threads(args.threads)
    test_data = synthetic_segmentation(args.test_size, args.size, args.test_seed)
    print(f"foreground fraction of the held-out set: {float(test_data[1].mean()):.3f}", file=sys.stderr)
    print("| network | norm | batch | seed | eval Dice | final train loss | seconds |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for seed in args.seeds:
        train_data = synthetic_segmentation(args.train_size, args.size, seed)
        for name in args.networks:
            for batch in args.batches:
                for norm in args.norms:
                    started = time.perf_counter()
                    row = run_one(name, norm, batch, seed, train_data, test_data, args)
                    row["seconds"] = time.perf_counter() - started
                    results.append(row)
                    note = "" if row["finite"] else " (non-finite loss)"
                    print(
                        f"| {name} | {norm} | {batch} | {seed} | {row['eval_dice']:.4f}{note} | "
                        f"{row['final_train_loss']:.4f} | {row['seconds']:.0f} |",
                        flush=True,
                    )
    print()
    metric = ("eval_dice", "dice", "eval Dice")
    summary = print_summary(results, ("network", args.networks), args.norms, args.batches, metric)
    if args.json:
        write_results(args.json, vars(args), results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
