"""A small, deterministic train/evaluate loop for the demo networks (needs torch only).

One run = one model, one batch size, one seed. Runs are compared at a fixed number of
*samples seen* (``epochs`` × training-set size), not a fixed number of steps, so a
batch of 2 takes 16× more optimizer steps than a batch of 32 and is not penalised by
seeing less data. The learning rate follows the linear scaling rule,
``lr(B) = base_lr · B / reference_batch``, so the per-sample step size is the same at
every batch size; it decays with a cosine schedule to zero over the run.

Training data is drawn as a stream of seeded permutations of the training set (an
epoch boundary does not drop a partial batch) and augmented with random integer
shifts of up to ``max_shift`` pixels (zero-padded with the background value). The
test accuracy is measured in ``model.eval()`` mode, i.e. with the running
statistics of the normalisation layers, exactly as a deployed model runs.

Determinism: the same :class:`TrainConfig` gives bit-identical metrics on the same
machine and torch build. The global RNG (used for weight initialisation and by the
``sampled`` BKN transition) is seeded inside :func:`torch.random.fork_rng`, so a run
leaves the caller's RNG state untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export.demo.data import DigitsSplit

__all__ = [
    "REFERENCE_BATCH",
    "RunResult",
    "TrainConfig",
    "batch_stream",
    "evaluate",
    "scaled_learning_rate",
    "shift_augment",
    "single_threaded",
    "train_and_evaluate",
]

#: The batch size at which ``base_lr`` applies unscaled.
REFERENCE_BATCH = 32


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    epochs: passes over the training set (may be fractional); fixes the number of
        samples seen, ``round(epochs · N_train)``, so steps = samples // batch_size.
    base_lr: SGD learning rate at :data:`REFERENCE_BATCH`; scaled linearly with batch size.
    momentum, weight_decay: SGD settings.
    max_shift: random shift augmentation in pixels (0 disables it).
    """

    batch_size: int
    seed: int
    epochs: float = 6.0
    base_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")

    def steps(self, num_train: int) -> int:
        """Optimizer steps for a training set of ``num_train`` samples (at least 1)."""
        return max(1, round(self.epochs * num_train) // self.batch_size)


@dataclass(frozen=True)
class RunResult:
    """Metrics of one run. Accuracies are fractions in [0, 1]."""

    test_accuracy: float
    test_loss: float
    train_loss: float  # mean loss over the last 10% of steps (augmented, train mode)
    steps: int
    samples_seen: int
    lr: float
    seconds: float
    finite: bool  # False when the loss became NaN/Inf (the run stops there)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def scaled_learning_rate(base_lr: float, batch_size: int) -> float:
    """lr(B) = base_lr · B / REFERENCE_BATCH (the linear scaling rule)."""
    return base_lr * batch_size / REFERENCE_BATCH


def shift_augment(x: Tensor, max_shift: int, generator: torch.Generator, fill: float) -> Tensor:
    """Shift each image of x: (N, C, H, W) by integers dy, dx ∈ [-max_shift, max_shift].

    Pixels shifted in take the value ``fill`` (the background). Returns a new tensor
    of the same shape.
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=fill)
    offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def batch_stream(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """``steps`` index batches of size ``batch_size`` from consecutive seeded permutations of range(num_samples)."""
    needed = steps * batch_size
    permutations = [torch.randperm(num_samples, generator=generator) for _ in range(math.ceil(needed / num_samples))]
    order = torch.cat(permutations)[:needed]
    return list(order.view(steps, batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode (running statistics) on x: (N, ...), y: (N,)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return correct / len(x), loss_sum / len(x)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Within the block, torch's intra-op pool has one thread (restored after). A sum split over threads is
    rounded in another order, and after 1000 micro-batch steps that changes the figures (the demo's test accuracy:
    94.7 % with one thread, 93.8 % with two on the same machine): the demo's numbers depend on the machine's
    core count no more. Also the faster setting at these sizes (9.6 s against 11.6 s on 2 cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_and_evaluate(
    build_model: Callable[[], nn.Module],
    data: DigitsSplit,
    config: TrainConfig,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train a fresh ``build_model()`` on ``data`` with ``config``; return its test metrics.

    The model is built after seeding, so its initial weights depend on ``config.seed``
    only. SGD with momentum, linear-scaled lr, cosine decay; cross-entropy loss.
    ``on_step(k)`` is called after every k-th step batch of progress (for progress bars). Runs single-threaded
    (:func:`single_threaded`): the figures are the same whatever the machine's core count.
    """
    with torch.random.fork_rng(devices=[]), single_threaded():
        torch.manual_seed(config.seed)
        model = build_model()
        generator = torch.Generator().manual_seed(config.seed)
        num_train = len(data.x_train)
        steps = config.steps(num_train)
        lr = scaled_learning_rate(config.base_lr, config.batch_size)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1.0 + math.cos(math.pi * k / steps)))
        background = float(data.x_train.min())
        tail_start = steps - max(1, steps // 10)
        tail_losses: list[float] = []
        finite = True
        model.train()
        started = time.perf_counter()
        for step, indices in enumerate(batch_stream(num_train, config.batch_size, steps, generator)):
            x = shift_augment(data.x_train[indices], config.max_shift, generator, background)
            loss = F.cross_entropy(model(x), data.y_train[indices])
            if not torch.isfinite(loss):
                finite = False
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step >= tail_start:
                tail_losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(1)
        seconds = time.perf_counter() - started
        accuracy, test_loss = evaluate(model, data.x_test, data.y_test)
    return RunResult(
        test_accuracy=accuracy,
        test_loss=test_loss,
        train_loss=sum(tail_losses) / len(tail_losses) if tail_losses else float("nan"),
        steps=steps,
        samples_seen=steps * config.batch_size,
        lr=lr,
        seconds=seconds,
        finite=finite,
    )
