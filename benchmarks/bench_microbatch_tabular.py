"""Micro-batch training of an MLP with ``BatchNorm1d`` on scikit-learn's tabular data: BatchNorm, BKN, LayerNorm, none.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_microbatch_tabular.py [--datasets breast_cancer,wine,digits]
        [--norms batchnorm,bkn,layernorm,none] [--batches 2,4,8] [--steps 1500] [--seeds 0,1,2,3,4]
        [--width 64] [--json out.json]

Why: the project's other micro-batch evidence is convolutional (``bkn train-demo``: digits as 8×8 images;
``bench_microbatch_segmentation.py``: a U-Net). This is the ``BatchNorm1d`` drop-in on (N, C) inputs, where a
BKN layer's prior comes through ``nn.Linear`` layers, on the tabular datasets scikit-learn ships (no download):
``breast_cancer`` (569 × 30, 2 classes), ``wine`` (178 × 13, 3 classes) and ``digits`` read as 64 features
(1797 × 64, 10 classes).

For each dataset, seed, batch and normalization:

1. split the data 70 / 30, stratified, with ``seed`` (scikit-learn's ``train_test_split``) and standardise every
   feature with the training split's mean and standard deviation;
2. build the MLP ``Linear(d, w) → norm → ReLU → Linear(w, w) → norm → ReLU → Linear(w, w) → norm → ReLU →
   Linear(w, classes)`` under ``torch.manual_seed(seed)`` with ``norm`` = ``BatchNorm1d(w)``; ``bkn`` is a deep
   copy converted by :func:`bkn_export.convert_batchnorm` (default options) on a ``(2, d)`` zero input (its first
   layer has no predecessor, as in any chain: at batch 1 it refuses as BatchNorm does, hence no batch 1 here);
   ``layernorm`` puts ``LayerNorm(w)`` in place of each BatchNorm and ``none`` an identity, both taking the
   BatchNorm network's Linear weights (every variant of a seed starts from the same weights, γ = 1, β = 0);
3. train ``--steps`` Adam steps (lr 1e-3) at batch ``--batches`` on cross-entropy, the samples drawn with
   replacement in an order drawn from the seed (the same for every variant);
4. evaluate in eval mode (the deployed network: running statistics for BatchNorm and BKN) on the held-out split:
   accuracy and mean cross-entropy.

Prints a Markdown table of every run and a summary (mean eval accuracy over seeds per dataset × norm × batch, with
the seeds' min–max); ``--json`` writes every row and the settings.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bkn_export

try:
    from benchmarks.seeded_grid import integers, names, print_summary, write_results
except ImportError:  # run as a script: benchmarks/ is on sys.path, the repository root may not be
    from seeded_grid import integers, names, print_summary, write_results  # type: ignore[no-redef]

DATASETS = ("breast_cancer", "wine", "digits")
NORMS = ("batchnorm", "bkn", "layernorm", "none")


class Split(NamedTuple):
    """A dataset split and standardised: features (N, d) float32, labels (N,) int64."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: int


def load_split(name: str, seed: int) -> Split:
    """Dataset ``name`` split 70 / 30 (stratified, ``seed``), standardised by the training split's statistics
    (a feature constant there is only centred)."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine, "digits": datasets.load_digits}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    bunch = loaders[name]()
    train_x, test_x, train_y, test_y = train_test_split(
        bunch.data, bunch.target, test_size=0.3, stratify=bunch.target, random_state=seed
    )
    mean, std = train_x.mean(0), train_x.std(0)
    std[std == 0] = 1.0
    as_features = lambda a: torch.as_tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    as_labels = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    classes = int(bunch.target.max()) + 1
    return Split(as_features(train_x), as_labels(train_y), as_features(test_x), as_labels(test_y), classes)


def build_mlp(features: int, classes: int, width: int, norm: str) -> nn.Sequential:
    """The MLP of the module docstring with ``norm`` (``batchnorm``, ``layernorm`` or ``none``) after each hidden
    Linear; module indices are the same for every norm, so its Linear weights load by name across norms."""

    def normalization() -> nn.Module:
        if norm == "batchnorm":
            return nn.BatchNorm1d(width)
        if norm == "layernorm":
            return nn.LayerNorm(width)
        if norm == "none":
            return nn.Identity()
        raise ValueError(f"unknown normalization {norm!r}")

    layers: list[nn.Module] = []
    inputs = features
    for _ in range(3):
        layers += [nn.Linear(inputs, width), normalization(), nn.ReLU()]
        inputs = width
    return nn.Sequential(*layers, nn.Linear(width, classes))


def make_variant(norm: str, features: int, classes: int, width: int, seed: int) -> tuple[nn.Module, list[str]]:
    """The MLP with ``norm``, initialised from ``seed``, and the warnings building (converting) it gave. Every
    variant of a seed starts from the BatchNorm network's Linear weights."""
    if norm not in NORMS:
        raise ValueError(f"unknown normalization {norm!r}; choose from {', '.join(NORMS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batchnorm = build_mlp(features, classes, width, "batchnorm")
    caught: list[str] = []
    if norm == "batchnorm":
        return batchnorm, caught
    if norm == "bkn":
        model = copy.deepcopy(batchnorm)
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            bkn_export.convert_batchnorm(model, torch.zeros(2, features))
        return model, [f"{r.category.__name__}: {r.message}" for r in records]
    model = build_mlp(features, classes, width, norm)
    linears = {
        k: v for k, v in batchnorm.state_dict().items() if isinstance(batchnorm[int(k.split(".")[0])], nn.Linear)
    }
    missing, _ = model.load_state_dict(linears, strict=False)
    if any(isinstance(model[int(k.split(".")[0])], nn.Linear) for k in missing):
        raise RuntimeError(f"{norm}: Linear tensors missing from the BatchNorm network: {missing}")
    return model, caught


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, batch: int, seed: int) -> bool:
    """``steps`` Adam steps (lr 1e-3) at ``batch`` on x (N, d), y (N,), the samples drawn from ``seed``; whether every
    loss was finite."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # built after conversion: BKN's parameters too
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index])
        if not math.isfinite(float(loss.detach())):
            return False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return True


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model in eval mode on x (N, d), y (N,)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def run_one(dataset: str, norm: str, batch: int, seed: int, split: Split, args: argparse.Namespace) -> dict[str, Any]:
    """Build, train and evaluate one variant; returns its table row."""
    model, caught = make_variant(norm, split.train_x.shape[1], split.classes, args.width, seed)
    for message in caught:
        print(f"[{dataset} {norm} seed {seed}] warning: {message}", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        finite = train(model, split.train_x, split.train_y, args.steps, batch, seed)
    accuracy, loss = evaluate(model, split.test_x, split.test_y) if finite else (float("nan"), float("nan"))
    return {
        "dataset": dataset,
        "norm": norm,
        "batch": batch,
        "seed": seed,
        "eval_accuracy": accuracy,
        "eval_loss": loss,
        "finite": finite,
        "warnings": caught,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=names, default=list(DATASETS), help="default breast_cancer,wine,digits")
    parser.add_argument("--norms", type=names, default=list(NORMS), help="default batchnorm,bkn,layernorm,none")
    parser.add_argument("--batches", type=integers, default=[2, 4, 8], help="training batches, ≥ 2 (default 2,4,8)")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per run (default 1500)")
    parser.add_argument("--seeds", type=integers, default=[0, 1, 2, 3, 4], help="default 0,1,2,3,4")
    parser.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every row and the settings here")
    args = parser.parse_args(argv)
    for name in args.datasets:
        if name not in DATASETS:
            parser.error(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    for norm in args.norms:
        if norm not in NORMS:
            parser.error(f"unknown normalization {norm!r}; choose from {', '.join(NORMS)}")
    if not args.datasets or not args.norms or not args.batches or not args.seeds:
        parser.error("--datasets, --norms, --batches and --seeds need at least one value each")
    if any(b < 2 for b in args.batches):
        parser.error("--batches must be ≥ 2 (BatchNorm1d and a chain's first BKN layer refuse one value per channel)")
    if args.steps < 1 or args.width < 1 or args.threads < 1:
        parser.error("--steps, --width and --threads must be ≥ 1")
    torch.set_num_threads(args.threads)
    print("| dataset | norm | batch | seed | eval accuracy | eval loss | seconds |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for seed in args.seeds:
        for dataset in args.datasets:
            split = load_split(dataset, seed)
            for batch in args.batches:
                for norm in args.norms:
                    started = time.perf_counter()
                    row = run_one(dataset, norm, batch, seed, split, args)
                    row["seconds"] = time.perf_counter() - started
                    results.append(row)
                    note = "" if row["finite"] else " (non-finite loss)"
                    print(
                        f"| {dataset} | {norm} | {batch} | {seed} | {row['eval_accuracy']:.4f}{note} | "
                        f"{row['eval_loss']:.4f} | {row['seconds']:.1f} |",
                        flush=True,
                    )
    print()
    summary = print_summary(
        results, ("dataset", args.datasets), args.norms, args.batches, ("eval_accuracy", "accuracy", "eval accuracy")
    )
    if args.json:
        write_results(args.json, vars(args), results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
