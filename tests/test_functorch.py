"""torch.func transforms over a train-mode BKN step fail with an error naming the layer (before: torch's generic
"autograd.Function ... must override the setup_context staticmethod"); eval mode works under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from bkn_export import convert_batchnorm
from bkn_export.errors import UnsupportedTransformError


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    return convert_batchnorm(net, torch.randn(2, 3, 8, 8))


def test_grad_over_a_train_step_names_the_layer() -> None:
    model = _model().train()
    parameters = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedTransformError, match=r"BatchKalmanNorm2d '1'.*torch\.func transforms"):
        grad(lambda p: F.mse_loss(functional_call(model, p, (x,)), torch.zeros(2, 4, 4, 4)))(parameters)


def test_vmap_in_eval_mode_works_and_functional_call_alone_trains() -> None:
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    batched = vmap(lambda xs: model(xs))(torch.stack([x, x]))
    torch.testing.assert_close(batched[0], model(x))
    model.train()
    parameters = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, parameters, (x,)), model(x), rtol=0, atol=0)
