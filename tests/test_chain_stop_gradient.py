"""A user's stop-gradient on a path (``detach()``, ``.data``, a ``torch.no_grad()`` region in the forward) stops the
prior's gradient too: a frozen feature extractor run inside the model's forward stays frozen, as with BatchNorm.

Before, the chain's prediction rebuilt the source's Gaussian from its posterior and γ, β outside the user's stop, so
the optimizer moved the "frozen" backbone (its BatchNorm's γ, β and, through ``detach``, its conv weights) with no
warning (cold QA, 2026-12-06).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bkn_export
from bkn_export.chain.record import record_dataflow
from bkn_export.chain.steps import STOP_GRADIENT, Identity


class _FrozenBackbone(nn.Module):
    """A feature extractor run without gradient inside the forward (``mode``), then a trainable head."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "no_grad":
            with torch.no_grad():
                features = self.backbone(x)
        elif self.mode == "detach":
            features = self.backbone(x).detach()
        elif self.mode == "data":
            features = self.backbone(x).data
        else:
            features = self.backbone(x)
        return self.fc(self.head(features))


def _converted(mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = _FrozenBackbone(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bkn_export.convert_batchnorm(model, torch.randn(4, 3, 8, 8))
    return model


def _gradients(model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["no_grad", "detach", "data"])
def test_a_stop_gradient_in_the_forward_stops_the_priors_gradient_as_the_datas(mode: str) -> None:
    """The backbone gets no gradient at all (BatchNorm's model: every backbone ``.grad`` None); the head still trains
    and keeps its prior from the backbone's statistics."""
    model = _converted(mode)
    head_link = next(link for link in bkn_export.describe_chain(model) if link.name == "head.1")
    assert head_link.transition == "propagate" and head_link.predecessor == "backbone.1"
    grads = _gradients(model, torch.randn(4, 3, 8, 8))
    backbone = {name: grad for name, grad in grads.items() if name.startswith("backbone.")}
    assert backbone and all(grad is None for grad in backbone.values()), backbone
    head = [grads[name] for name in ("head.0.weight", "head.1.weight", "head.1.prior_weight_logit", "fc.weight")]
    assert all(grad is not None and bool(grad.abs().sum() > 0) for grad in head)


@pytest.mark.parametrize("mode", ["no_grad", "detach", "data"])
def test_the_stop_changes_no_value_only_the_gradient(mode: str) -> None:
    """Same weights with and without the stop: the same train-mode outputs and running statistics; the head's
    gradients differ only by the prior's share into the backbone (which the stop removes), so its own γ, β agree."""
    plain, stopped = _converted("plain"), _converted(mode)
    stopped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 8, 8)
    outputs = [m.train()(x) for m in (plain, stopped)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for (name, a), b in zip(plain.state_dict().items(), stopped.state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a, b), name


@pytest.mark.parametrize(("mode", "recorded"), [("detach", True), ("data", True), ("no_grad", False)])
def test_detach_and_data_are_recorded_as_a_stop_gradient_step(mode: str, recorded: bool) -> None:
    """``detach()`` / ``.data`` are a stop-gradient step on the path (shown by ``format_chain``); a ``no_grad`` region
    is seen at run time instead (the wiring's forward runs without gradients throughout)."""
    torch.manual_seed(0)
    (path,) = record_dataflow(_FrozenBackbone(mode), torch.randn(4, 3, 8, 8))["head.1"].sources
    assert (Identity(STOP_GRADIENT) in path.steps) is recorded
    if recorded:
        assert "detach (the prior's gradient stops too)" in bkn_export.format_chain(_converted(mode))


def test_a_checkpoint_wired_before_stop_gradients_were_recorded_still_loads() -> None:
    """A stop-gradient changes no value: a saved wiring without it (a checkpoint of an earlier bkn_export, here the
    unstopped model's, which is that wiring) loads strictly."""
    plain, stopped = _converted("plain"), _converted("detach")
    stopped.load_state_dict(copy.deepcopy(plain.state_dict()))


def test_a_no_grad_forward_of_the_whole_model_trains_nothing_and_updates_statistics_as_before() -> None:
    """Publishing without gradients everywhere (a no_grad train-mode forward, as for BatchNorm statistics
    recalibration) gives the same outputs and running statistics as a forward with gradients."""
    model, again = _converted("plain"), _converted("plain")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = model.train()(x)
    torch.testing.assert_close(out, again.train()(x), rtol=0, atol=0)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_no_grad_region_stops_the_priors_gradient_exactly_where_detach_does() -> None:
    """Same weights, same values: every gradient of the no_grad model equals the detach model's, bit for bit (the
    first fix detached the whole path part, so the trainable conv after the region lost the prior's share and took a
    spurious bias gradient; a second QA round caught it)."""
    detached, no_grad = _converted("detach"), _converted("no_grad")
    no_grad.load_state_dict(detached.state_dict(), strict=False)
    x = torch.randn(4, 3, 8, 8)
    expected, got = _gradients(detached, x), _gradients(no_grad, x)
    for name, grad in expected.items():
        assert (grad is None) == (got[name] is None), name
        if grad is not None:
            torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)


class _DetachBeforeUpsample(nn.Module):
    """``detach`` inside a run of linear steps (upsample → conv: one exact map): ``where`` puts it before or after
    the ReLU, which gives the same values and the same data gradients."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b1(self.c1(x))
        h = torch.relu(h).detach() if self.where == "after" else torch.relu(h.detach())
        return self.b2(self.c2(self.up(h)))


def test_a_stop_gradient_inside_a_linear_run_keeps_the_gradient_of_the_conv_after_it() -> None:
    torch.manual_seed(0)
    models = {where: _DetachBeforeUpsample(where) for where in ("after", "before")}
    models["before"].load_state_dict(models["after"].state_dict())
    x = torch.randn(4, 3, 8, 8)
    grads = {}
    for where, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bkn_export.convert_batchnorm(model, x)
        model.train()
        model(x).square().sum().backward()
        grads[where] = model.c2.weight.grad
    assert grads["after"] is not None and grads["before"] is not None
    torch.testing.assert_close(grads["after"], grads["before"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transition", ["propagate", "sampled", "learned", "identity"])
@pytest.mark.parametrize("mode", ["no_grad", "detach", "data"])
def test_every_transition_stops_the_priors_gradient(mode: str, transition: str) -> None:
    """``learned`` and ``identity`` do not walk a path's steps: they take a source whose every path is stopped
    detached (a third QA round found the backbone still training under them)."""
    torch.manual_seed(0)
    model = _FrozenBackbone(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bkn_export.convert_batchnorm(model, torch.randn(4, 3, 8, 8), transition=transition)
    grads = _gradients(model, torch.randn(4, 3, 8, 8))
    backbone = {name: grad for name, grad in grads.items() if name.startswith("backbone.")}
    assert all(grad is None for grad in backbone.values()), backbone


class _GatedDetach(nn.Module):
    """A squeeze-and-excitation gate whose branch reads ``h.detach()`` (``stop``) or ``h``: the same values."""

    def __init__(self, stop: bool) -> None:
        super().__init__()
        self.stop = stop
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return self.b2(self.c2(h * self.gate(h.detach() if self.stop else h)))


def test_a_stop_gradient_inside_a_gate_branch_is_left_out_of_the_saved_wiring() -> None:
    """A fourth QA round: the saved wiring kept a stop inside a gate's branch, so checkpoints of the same values
    could not be swapped (and an earlier bkn_export's did not load)."""
    models = {}
    for stop in (False, True):
        torch.manual_seed(0)
        models[stop] = _GatedDetach(stop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bkn_export.convert_batchnorm(models[stop], torch.randn(4, 3, 8, 8))
    assert "gate(× detach" in bkn_export.format_chain(models[True])
    models[True].load_state_dict(models[False].state_dict())
    models[False].load_state_dict(models[True].state_dict())
