"""bkn_export.update_bn: torch.optim.swa_utils.update_bn for BKN layers (torch's skips them: not _BatchNorm)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn

import bkn_export
from bkn_export import BatchKalmanNorm2d, convert_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(3 + torch.randn(2, 3, 8, 8, generator=generator), torch.randint(0, 4, (2,))) for _ in range(5)]


def test_it_is_torchs_update_bn_on_a_batchnorm_model() -> None:
    ours, theirs = _net(), _net()
    for model in (ours, theirs):
        model.eval()
    bkn_export.update_bn(_batches(), ours)
    torch_update_bn(_batches(), theirs)
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert not ours.training and ours[4].momentum == 0.3


def test_it_recalibrates_an_swa_model_of_a_converted_network() -> None:
    model = convert_batchnorm(_net(), torch.randn(2, 3, 8, 8))
    swa = AveragedModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in _batches():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        swa.update_parameters(model)
    stale = copy.deepcopy(swa)
    torch_update_bn(_batches(), stale)  # silently does nothing here
    assert all(torch.equal(a, b) for a, b in zip(stale.buffers(), swa.buffers()))

    reference = copy.deepcopy(swa)  # what update_bn means: reset, cumulative average, train-mode forwards
    layers = [m for m in reference.modules() if isinstance(m, BatchKalmanNorm2d)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    reference.train()
    with torch.no_grad():
        for x, _ in _batches():
            reference(x)
    bkn_export.update_bn(_batches(), swa)
    for (name, a), (_, b) in zip(reference.named_buffers(), swa.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert int(layers[0].num_batches_tracked) == 5
    assert [m.momentum for m in swa.modules() if isinstance(m, BatchKalmanNorm2d)] == [0.1, 0.3]
