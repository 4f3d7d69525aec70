"""bkn_export.parameter_groups: weight decay off BKN's own parameters, whose zero is not "no effect"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from support.small_models import two_layer_classifier

import bkn_export

_model = two_layer_classifier


def test_the_groups_split_normalization_parameters_from_the_rest() -> None:
    model = _model(transition="learned")
    decayed, undecayed = bkn_export.parameter_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["0.weight", "3.weight", "8.bias", "8.weight"]
    bkn_own = ["4.prior_weight_logit", "4.process_noise_raw", "4.transition_matrix"]
    expected = sorted(["1.weight", "1.bias", "4.weight", "4.bias", *bkn_own])
    assert sorted(names[id(p)] for p in undecayed["params"]) == expected
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (5e-4, 0.0)


def test_decay_on_every_parameter_inflates_the_process_noise_and_the_groups_do_not() -> None:
    """SGD with weight decay 0.05 on all parameters moves R = softplus(raw) from 9e-4 toward 0.69."""
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(2, 3, 8, 8, generator=generator), torch.randint(0, 4, (2,), generator=generator)) for _ in range(4)
    ]
    noise = {}
    for grouped in (False, True):
        model = _model()
        groups = bkn_export.parameter_groups(model, 0.05) if grouped else model.parameters()
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.05)
        for step in range(60):
            x, y = data[step % 4]
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        noise[grouped] = F.softplus(model[4].process_noise_raw).mean().item()
    assert noise[False] > 0.3, noise
    assert noise[True] < 0.01, noise


def test_a_parametrized_gamma_is_in_the_undecayed_group() -> None:
    """torch.nn.utils.parametrize keeps γ's original in the layer's ``parametrizations`` child, which
    ``parameters(recurse=False)`` missed: it was decayed, against the docstring."""

    class Positive(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return F.softplus(weight)

    model = _model()
    torch.nn.utils.parametrize.register_parametrization(model[4], "weight", Positive())
    decayed, undecayed = bkn_export.parameter_groups(model, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "4.parametrizations.weight.original" in {names[id(p)] for p in undecayed["params"]}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["0.weight", "3.weight", "8.bias", "8.weight"]
