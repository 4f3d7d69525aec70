"""Small demo networks used by ``bkn demo``, ``bkn train-demo``, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import Tensor, nn

from bkn_export.nn import BatchKalmanNorm2d, KalmanOptions

__all__ = ["NORMALIZERS", "DigitsResNet", "ResidualBlock", "digits_resnet", "make_norm"]

NORMALIZERS = ("batchnorm", "groupnorm", "bkn", "bkn-authors")


def make_norm(kind: str, channels: int, groups: int = 4) -> nn.Module:
    """A 2-D normalization layer of the given kind (one of :data:`NORMALIZERS`)."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "bkn":
        return BatchKalmanNorm2d(channels)
    if kind == "bkn-authors":
        return BatchKalmanNorm2d(channels, **asdict(KalmanOptions.authors()))
    raise ValueError(f"unknown normalizer {kind!r}; choose one of {NORMALIZERS}")


class ResidualBlock(nn.Module):
    """conv3x3 → norm → ReLU → conv3x3 → norm, plus identity (or 1×1 conv + norm) shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small residual CNN for (N, 1, 8, 8) digits → (N, 10) logits.

    stem (conv3x3, stride ``stem_stride``) → norm → ReLU → block (width) → block
    (2·width, stride 2) → global average pool → Linear. With ``stem_stride=1`` the
    normalized maps are 8×8, 8×8 and 4×4; with ``stem_stride=2`` they are 4×4, 4×4
    and 2×2, so each BatchNorm sees 4× fewer values per channel in a batch (noisier
    batch statistics, as in larger images with larger strides). No normalization
    layer sees a (N, C) input: the head is a plain Linear.
    """

    def __init__(self, norm: str = "bkn", width: int = 16, num_classes: int = 10, stem_stride: int = 1) -> None:
        super().__init__()

        def layer(c: int) -> nn.Module:
            return make_norm(norm, c)

        self.stem = nn.Conv2d(1, width, 3, stride=stem_stride, padding=1, bias=False)
        self.stem_norm = layer(width)
        self.block1 = ResidualBlock(width, width, 1, layer)
        self.block2 = ResidualBlock(width, 2 * width, 2, layer)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.stem_norm(self.stem(x)))
        out = self.block2(self.block1(out))
        return self.head(torch.flatten(self.pool(out), 1))


def digits_resnet(norm: str = "bkn", width: int = 16, example_batch: int = 2, stem_stride: int = 1) -> nn.Module:
    """A :class:`DigitsResNet` with its BKN layers wired into a Kalman chain (factory for the CLI)."""
    from bkn_export.convert import wire_chain

    model = DigitsResNet(norm, width, stem_stride=stem_stride)
    if norm.startswith("bkn"):
        wire_chain(model, torch.zeros(example_batch, 1, 8, 8))
    return model
