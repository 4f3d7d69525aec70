"""``update_bn`` for models with BKN layers: what ``torch.optim.swa_utils.update_bn`` does for BatchNorm.

PyTorch's function finds normalization layers with ``isinstance(module, nn.modules.batchnorm._BatchNorm)``; BKN
layers are not such instances (README, "Using BKN"), so on a converted model it returns without touching a
single running statistic, and an SWA model (``AveragedModel``, which averages parameters only by default) is
evaluated with the statistics copied when it was built. This function recalibrates BKN layers and BatchNorm
layers alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bkn_export.nn import _BatchKalmanNorm

__all__ = ["update_bn"]


@torch.no_grad()
def update_bn(loader: Iterable[Any], model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute the running statistics of every BKN and BatchNorm layer of ``model`` over ``loader``.

    As ``torch.optim.swa_utils.update_bn``: each layer's running statistics are reset and ``momentum`` set to
    None (a cumulative average over the batches), the model runs in train mode on each batch (the first element
    of a tuple or list batch, moved to ``device`` if given), then the momenta and the model's mode are restored
    (``model.train(was_training)``, as torch does). A BKN layer's running statistics are the average of its
    posteriors (its batch statistics blended with its Kalman prior), as in training.
    """
    momenta: dict[nn.modules.batchnorm._BatchNorm | _BatchKalmanNorm, float | None] = {}
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchKalmanNorm)) and module.track_running_stats:
            module.reset_running_stats()
            momenta[module] = module.momentum
    if not momenta:
        return
    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    try:
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
