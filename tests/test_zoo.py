"""Real and mimic networks: converted without changing them, trained, exported in both modes, run in ORT.

For every network (``tests/zoo``): ``convert_batchnorm`` on the example input (its guard
checks each layer and the model's eval outputs; checked here again independently), every
BatchNorm replaced, five training steps at batch 2 with a finite, changing loss, then the
inference-mode and training-mode ONNX exports compared with PyTorch in ONNX Runtime
(``runtime.assert_parity`` with its dtype defaults), one test per network and export mode.
The small mimics and four real networks run in the default suite (MobileNetV3 and
EfficientNet-B0 without their training-mode export); the rest under ``-m slow``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from zoo.mimics import MIMICS, trained_like
from zoo.networks import NETWORKS, ZooNetwork

import runtime
from bkn_export import convert_batchnorm
from bkn_export.conversion_guard import tolerance_for
from bkn_export.nn import _BatchKalmanNorm

_RUNTIMES = ["ort:cpu:all"]
_LIBRARY = {"monai": "monai", "geffnet": "geffnet", "efficientnet": "efficientnet_pytorch"}


def _train(model: nn.Module, shape: tuple[int, ...], steps: int = 5) -> list[float]:
    """``steps`` SGD steps (lr 1e-2) on random inputs of ``shape`` (batch 2); the losses.

    The loss is smooth-L1 of the output against zero: its gradient is bounded, so five
    steps at this learning rate stay finite for BatchNorm and BKN alike (a mean square
    sends ResNet-50's BatchNorm loss to 2.6e12 in five steps, BKN's to NaN).
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        output = model(torch.randn(shape))
        output = (output[0] if isinstance(output, (tuple, list)) else output).float()
        loss = nn.functional.smooth_l1_loss(output, torch.zeros_like(output))
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def _converted_and_trained(model: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, Tensor]:
    """Convert (guard on), check the eval outputs independently, train five steps; (model, example input)."""
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert batchnorms > 0
    model = trained_like(model).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
    converted = convert_batchnorm(model, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert sum(isinstance(m, _BatchKalmanNorm) for m in converted.modules()) == batchnorms
    with torch.no_grad():
        actual = converted.eval()(x)
    tolerance = tolerance_for(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=tolerance.rtol, atol=tolerance.atol)

    losses = _train(converted, shape)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[0] != losses[-1]
    return converted, x


def _network_params() -> list[object]:
    params = []
    for network in NETWORKS:
        for mode in ("inference", "training"):
            slow = network.slow or (mode == "training" and network.slow_training_export)
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(network, mode, id=f"{network.name}-{mode}", marks=marks))
    return params


@pytest.mark.parametrize(("network", "mode"), _network_params())
def test_zoo_network_converts_trains_and_exports(network: ZooNetwork, mode: str) -> None:
    library = next(module for prefix, module in _LIBRARY.items() if network.name.startswith(prefix))
    pytest.importorskip(library, reason=f"{library} is in the `test` extra (geffnet: pip install --no-deps geffnet)")
    converted, x = _converted_and_trained(network.build(), network.input_shape)
    runtime.assert_parity(converted, x, mode=mode, runtimes=_RUNTIMES)


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("name", list(MIMICS))
def test_mimic_network_converts_trains_and_exports(name: str, mode: str) -> None:
    build, shape = MIMICS[name]
    converted, x = _converted_and_trained(build(), shape)
    runtime.assert_parity(converted, x, mode=mode, runtimes=_RUNTIMES)
