"""Real networks from libraries nobody here wrote, installable without torchvision.

MONAI and efficientnet-pytorch come with the ``test`` extra; geffnet is installed with
``pip install --no-deps geffnet`` (it declares torchvision but never imports it). Each
entry builds the network at a small input size so that conversion, five training steps and
both exports stay fast; dropout and stochastic depth are switched off where the network
has them, because a training-mode parity check compares one random forward with another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ZooNetwork:
    """One real network: how to build it, its example input shape (N, C, *), and what of it is slow.

    slow: the whole network runs under ``-m slow``; slow_training_export: only its
    training-mode export does (the costliest step: the MobileNetV3-small / EfficientNet-B0
    training-mode tests took 107 s / 101 s, their inference-mode tests 26 s / 30 s, on 2 cores
    shared with ~10 other processes).
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    slow: bool = False
    slow_training_export: bool = False


def _monai_unet(spatial_dims: int, channels: tuple[int, ...]) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=2,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
        norm="batch",
    )


def _monai_basic_unet_3d() -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8), norm="batch")


def _monai_densenet121() -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=3, out_channels=4)


def _monai_resnet(depth: int, spatial_dims: int, channels: int) -> nn.Module:
    from monai.networks import nets

    return getattr(nets, f"resnet{depth}")(spatial_dims=spatial_dims, n_input_channels=channels, num_classes=3)


def _geffnet_mobilenetv3(variant: str) -> nn.Module:
    import geffnet

    return getattr(geffnet, f"mobilenetv3_{variant}_100")(drop_rate=0.0, drop_connect_rate=0.0)


def _efficientnet_b0() -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    model = EfficientNet.from_name(
        "efficientnet-b0", image_size=32, num_classes=10, dropout_rate=0.0, drop_connect_rate=0.0
    )
    # The plain Swish, as chosen when the memory-efficient one (an autograd.Function) was thought not to export;
    # with torch 2.13's exporter it does (by hand, 2026-12-01: both modes pass parity in ONNX Runtime, b0 at 32x32).
    model.set_swish(memory_efficient=False)
    return model


NETWORKS: tuple[ZooNetwork, ...] = (
    ZooNetwork("monai_unet_2d", lambda: _monai_unet(2, (4, 8, 16)), (2, 1, 16, 16)),
    ZooNetwork("monai_unet_3d", lambda: _monai_unet(3, (4, 8, 16)), (2, 1, 8, 8, 8)),
    ZooNetwork("geffnet_mobilenetv3_small", lambda: _geffnet_mobilenetv3("small"), (2, 3, 32, 32), False, True),
    ZooNetwork("efficientnet_b0", _efficientnet_b0, (2, 3, 32, 32), False, True),
    ZooNetwork("monai_densenet121_2d", _monai_densenet121, (2, 3, 32, 32), slow=True),
    ZooNetwork("monai_basic_unet_3d", _monai_basic_unet_3d, (2, 1, 16, 16, 16), slow=True),
    ZooNetwork("monai_resnet50_2d", lambda: _monai_resnet(50, 2, 3), (2, 3, 32, 32), slow=True),
    ZooNetwork("monai_resnet10_3d", lambda: _monai_resnet(10, 3, 1), (2, 1, 16, 16, 16), slow=True),
    ZooNetwork("geffnet_mobilenetv3_large", lambda: _geffnet_mobilenetv3("large"), (2, 3, 32, 32), slow=True),
)
