"""Small demo networks on (N, 1, 8, 8) digits, used by ``bkn demo``, ``bkn train-demo``, tests and benchmarks.

Two networks (:data:`NETWORKS`), each built with any normaliser of :data:`NORMALIZERS`:

* ``digits_resnet`` (:class:`DigitsResNet`): Conv–norm–ReLU and residual blocks; between two
  normalizations sit a ReLU and a Conv, or a residual sum.
* ``digits_silu_pool`` (:class:`DigitsSiLUPoolNet`): Conv–norm–SiLU with average pooling
  *before* the feeding conv and max pooling *after* it, so each link of the Kalman chain
  passes a smooth activation and a pooling (the cases of most modern convnets).

Needs torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import Tensor, nn

from bkn_export.chain import wire_chain
from bkn_export.nn import BatchKalmanNorm2d, KalmanOptions

__all__ = [
    "NETWORKS",
    "NORMALIZERS",
    "DigitsResNet",
    "DigitsSiLUPoolNet",
    "ResidualBlock",
    "build_network",
    "digits_resnet",
    "digits_silu_pool",
    "make_norm",
]

#: ``bkn`` uses the library's default :class:`KalmanOptions`; ``bkn-input`` / ``bkn-output``
#: fix ``prior_source`` (the authors' convention / the normalization-aware one) whatever the
#: default is; ``bkn-authors`` is :meth:`KalmanOptions.authors`.
NORMALIZERS = ("batchnorm", "groupnorm", "bkn", "bkn-input", "bkn-output", "bkn-authors")


def make_norm(kind: str, channels: int, groups: int = 4) -> nn.Module:
    """A 2-D normalization layer of the given kind (one of :data:`NORMALIZERS`)."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "bkn":
        return BatchKalmanNorm2d(channels)
    if kind == "bkn-input":
        return BatchKalmanNorm2d(channels, prior_source="input")
    if kind == "bkn-output":
        return BatchKalmanNorm2d(channels, prior_source="output")
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


class DigitsSiLUPoolNet(nn.Module):
    """A plain CNN with SiLU and pooling between its normalizations: (N, 1, 8, 8) → (N, 10) logits.

    conv3x3 (1→w) → norm1 [8×8] → SiLU → AvgPool 2×2 → conv3x3 (w→w) → norm2 [4×4] → SiLU →
    conv3x3 (w→2w) → MaxPool 2×2 → norm3 [2×2] → SiLU → global average pool → Linear.

    The path norm1 → norm2 is SiLU, average pooling, conv (pooling before the feeding
    conv); norm2 → norm3 is SiLU, conv, max pooling (pooling after it). A Kalman prior
    that ignores the SiLU or the pooling, or uses the wrong spatial size, is visibly off
    here. The smallest normalized map is 2×2, so every layer sees ≥ 4 values per channel
    at batch 1; no normalization layer sees a (N, C) input.
    """

    def __init__(self, norm: str = "bkn", width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, width)
        self.act1 = nn.SiLU()
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, width)
        self.act2 = nn.SiLU()
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.pool3 = nn.MaxPool2d(2)
        self.norm3 = make_norm(norm, 2 * width)
        self.act3 = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool1(self.act1(self.norm1(self.conv1(x))))
        out = self.act2(self.norm2(self.conv2(out)))
        out = self.act3(self.norm3(self.pool3(self.conv3(out))))
        return self.head(torch.flatten(self.pool(out), 1))


def _wired(model: nn.Module, norm: str, example_batch: int) -> nn.Module:
    """``model`` with its BKN layers wired into a Kalman chain (other normalizers: unchanged)."""
    if norm.startswith("bkn"):
        wire_chain(model, torch.zeros(example_batch, 1, 8, 8))
    return model


def digits_resnet(norm: str = "bkn", width: int = 16, example_batch: int = 2, stem_stride: int = 1) -> nn.Module:
    """A :class:`DigitsResNet` with its BKN layers wired into a Kalman chain (factory for the CLI)."""
    return _wired(DigitsResNet(norm, width, stem_stride=stem_stride), norm, example_batch)


def digits_silu_pool(norm: str = "bkn", width: int = 16, example_batch: int = 2) -> nn.Module:
    """A :class:`DigitsSiLUPoolNet` with its BKN layers wired into a Kalman chain (factory for the CLI)."""
    return _wired(DigitsSiLUPoolNet(norm, width), norm, example_batch)


#: ``bkn train-demo --network`` choices -> what they build (see :func:`build_network`).
NETWORKS = ("digits_resnet", "digits_silu_pool")


def build_network(network: str, norm: str = "bkn", width: int = 16, stem_stride: int = 1) -> nn.Module:
    """One of :data:`NETWORKS`, wired. ``stem_stride`` applies to ``digits_resnet`` only.

    (``digits_silu_pool`` reduces its maps by pooling; a stride-2 stem would leave its
    last normalization a single value per channel at batch 1.)
    """
    if network == "digits_resnet":
        return digits_resnet(norm, width, stem_stride=stem_stride)
    if network == "digits_silu_pool":
        return digits_silu_pool(norm, width)
    raise ValueError(f"unknown network {network!r}; choose one of {NETWORKS}")
