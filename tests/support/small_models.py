"""Small converted models shared by tests."""

from __future__ import annotations

import torch
from torch import nn

from bkn_export import convert_batchnorm


def two_layer_classifier(**options: object) -> nn.Module:
    """conv → BN → ReLU → conv → BN → ReLU → pool → Linear(8, 4), seeded and converted on a (2, 3, 8, 8) example
    with ``options``: layer '1' first in chain, layer '4' wired to it."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    return convert_batchnorm(net, torch.randn(2, 3, 8, 8), **options)
