"""An eval-mode ("frozen") BKN layer inside a training model hands its running statistics on as its posterior.

Freezing BatchNorm layers with ``.eval()`` while the rest trains is common fine-tuning practice. Such a layer
normalizes with its running statistics; before, it handed nothing on, so every layer it fed lost its prior and
trained as plain BatchNorm (no gradient reached their gains) without a word.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import BatchKalmanNorm2d, chain_statistics, convert_batchnorm


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.head(F.relu(x + self.branch(x)))
        return self.fc(x.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return convert_batchnorm(_Residual(), torch.randn(2, 3, 16, 16))


def test_a_frozen_layer_with_this_batchs_statistics_is_the_training_layer() -> None:
    """The stem's BKN layer is first in chain: in train mode it normalizes with the batch statistics and hands
    them on. Frozen with running statistics equal to those statistics (biased variance), it must compute and
    hand on the same, so the whole step is the same: outputs and every gradient but the stem conv's (frozen
    statistics are constants: no gradient through them, as for a frozen BatchNorm)."""
    training, frozen = _model(), _model()
    x = torch.randn(2, 3, 16, 16)
    stem_input = frozen.stem[0](x).detach()
    layer = frozen.stem[1]
    assert isinstance(layer, BatchKalmanNorm2d) and not layer.has_predecessor
    with torch.no_grad():
        layer.running_mean.copy_(stem_input.mean((0, 2, 3)))
        layer.running_var.copy_(stem_input.var((0, 2, 3), unbiased=False))
    layer.eval()
    out_training, out_frozen = training(x), frozen(x)
    torch.testing.assert_close(out_frozen, out_training, rtol=1e-5, atol=1e-6)
    out_training.square().sum().backward()
    out_frozen.square().sum().backward()
    for (name, p), (_, q) in zip(training.named_parameters(), frozen.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        if name == "stem.0.weight":
            assert not torch.allclose(q.grad, p.grad)
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_layers_a_frozen_layer_feeds_keep_their_prior() -> None:
    model = _model()
    model.stem[1].eval()
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()
    for name in ("branch.1", "branch.4", "head.1"):
        layer = model.get_submodule(name)
        assert layer.prior_weight_logit.grad is not None and layer.prior_weight_logit.grad.abs().sum() > 0, name
    assert model.stem[1].running_mean.grad is None  # nothing flows into the frozen statistics


def test_a_frozen_layer_changes_no_state_and_observers_see_the_training_layers() -> None:
    model = _model()
    model.stem[1].eval()
    before = copy.deepcopy(model.stem[1].state_dict())
    model(torch.randn(2, 3, 16, 16))
    after = model.stem[1].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], Tensor))
    x = torch.randn(2, 3, 16, 16)
    stats = chain_statistics(model, x)  # as a train step runs it: the frozen layer runs no Kalman step
    assert [s.name for s in stats] == ["branch.1", "branch.4", "head.1"]
    assert model.stem[1].training is False
    unfrozen = copy.deepcopy(model).train()
    moved = {s.name: s for s in chain_statistics(unfrozen, x)}
    assert [*moved] == ["stem.1", "branch.1", "branch.4", "head.1"]
    # the frozen layer hands on its running statistics, not this batch's: the prior it feeds differs
    assert stats[0].prior_mean is not None and moved["branch.1"].prior_mean is not None
    assert not torch.allclose(stats[0].prior_mean, moved["branch.1"].prior_mean)
    model.eval()
    assert len(chain_statistics(model, x)) == 4  # a model in eval mode is put in train mode as a whole
    assert model.training is False and model.stem[1].training is False  # chain_statistics restores the modes
