"""Small networks, each the smallest case of a pattern found in real zoo networks.

Every BatchNorm gets non-trivial affine parameters and running statistics
(:func:`trained_like`), so that a conversion that drops or changes anything shows in the
outputs; tests/test_zoo.py then replaces the running statistics by those of the data
(:func:`calibrated`), so that the eval outputs depend on the input. Input (N, 3, 16, 16)
unless a network says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from zoo.timm_mimic import BatchNormAct2d


class ActBatchNorm2d(nn.BatchNorm2d):
    """The issue's repro: a BatchNorm2d subclass whose forward adds an activation."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class TaggedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that only adds an attribute: its function is BatchNorm2d's."""

    def __init__(self, num_features: int, tag: str = "stage1") -> None:
        super().__init__(num_features)
        self.tag = tag


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class ActSubclassNet(nn.Module):
    """conv → ActBatchNorm2d → conv → BatchNorm2d (the repro inside a network)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 8), ActBatchNorm2d(8)
        self.conv2, self.bn2 = _conv(8, 8), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


class TimmStyleNet(nn.Module):
    """timm's pattern: conv → BatchNormAct2d (SiLU + dropout; ReLU; PReLU with a parameter; no act) → pool → linear.

    The dropout has p = 0 so that the training-mode parity check compares deterministic forwards;
    tests/test_conversion_guard.py checks a fused layer with a real dropout.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv(3, 8)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.0))
        self.conv2 = _conv(8, 8, 2)
        self.bn2 = BatchNormAct2d(8)
        self.conv3 = _conv(8, 16)
        self.bn3 = BatchNormAct2d(16, act_layer=nn.PReLU, act_kwargs={"num_parameters": 16}, inplace=False)
        self.conv4 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn4 = BatchNormAct2d(16, apply_act=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        out = self.bn4(self.conv4(self.bn3(self.conv3(out))))
        return self.head(out.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, then a BatchNorm (DenseNet's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = _conv(3, 8), nn.BatchNorm2d(8)
        self.branch, self.branch_bn = _conv(8, 4), nn.BatchNorm2d(4)
        self.joint_bn = nn.BatchNorm2d(12)
        self.out = nn.Conv2d(12, 6, 1)

    def forward(self, x: Tensor) -> Tensor:
        stem = torch.relu(self.stem_bn(self.stem(x)))
        branch = torch.relu(self.branch_bn(self.branch(stem)))
        return self.out(torch.relu(self.joint_bn(torch.cat([stem, branch], dim=1))))


class ResidualNet(nn.Module):
    """A basic residual block with a projection shortcut, then a BatchNorm on the sum (ResNet's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = _conv(3, 8), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = _conv(8, 16, 2), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = _conv(16, 16), nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.post_bn = nn.BatchNorm2d(16)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.post_bn(torch.relu(out + self.shortcut(x)))


class SiluPoolNet(nn.Module):
    """SiLU and pooling between normalizations (EfficientNet / MobileNet's pattern), ending in BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 8), nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(2)
        self.conv2, self.bn2 = _conv(8, 8), nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(2)
        self.conv3, self.bn3 = _conv(8, 16), nn.BatchNorm2d(16)
        self.head, self.head_bn = nn.Linear(16, 10), nn.BatchNorm1d(10)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(nn.functional.silu(self.bn1(self.conv1(x))))
        out = self.maxpool(nn.functional.hardswish(self.bn2(self.conv2(out))))
        out = nn.functional.silu(self.bn3(self.conv3(out)))
        return self.head_bn(self.head(out.mean(dim=(2, 3))))


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (as after training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                c = module.num_features
                if module.affine:
                    module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(c, generator=generator))
                if module.running_mean is not None and module.running_var is not None:
                    module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return model


def calibrated(model: nn.Module, input_shape: tuple[int, ...], batch: int = 16, forwards: int = 4) -> nn.Module:
    """Replace every BatchNorm's running statistics by those of the data that reaches it (affine kept).

    ``forwards`` train-mode, no-grad forwards of N(0, 1) inputs of shape
    (``batch``, *``input_shape[1:]``) with momentum None: each running mean / variance is
    the cumulative average of the batch means / unbiased variances of the layer's actual
    input, so that in eval mode every BatchNorm maps its input to roughly
    γ·N(0, 1) + β. Without it, random running statistics on a randomly initialised deep
    network shrink the activations layer after layer: efficientnet-pytorch's B0 (after
    :func:`trained_like`, conversion, five steps) had eval outputs independent of the
    input (max|f(x1) − f(x2)| = 1.3e-7, max|f| = 0.35), so no parity check on it could
    see a wrong feature path. Deterministic (seeded generator); restores each momentum
    and every module's mode.
    """
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    momenta = [m.momentum for m in norms]
    modes = {m: m.training for m in model.modules()}
    try:
        for module in norms:
            module.reset_running_stats()
            module.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(forwards):
                model(torch.randn((batch, *input_shape[1:]), generator=generator))
    finally:
        for module, momentum in zip(norms, momenta, strict=True):
            module.momentum = momentum
        for submodule, training in modes.items():
            submodule.train(training)
    return model


#: name -> (constructor, example input shape)
MIMICS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "timm_style": (TimmStyleNet, (2, 3, 16, 16)),
    "concat": (ConcatNet, (2, 3, 16, 16)),
    "residual": (ResidualNet, (2, 3, 16, 16)),
    "silu_pool": (SiluPoolNet, (2, 3, 16, 16)),
}
