"""Wiring warns about forward hooks on the modules a prediction goes through. The recorder follows what a hook computed
in the wiring forward as it follows the forward's own code (a ×3 hook is a ×3 step of the path, its number a
constant), so a hook that computes otherwise later is predicted as it ran then: the warning says so. (It said the
hook was "not in" the prior, which a tester found false, third QA of 2026-12-07: the prior's variance tracked the ×3.)
Torch's weight reparametrization pre-hooks are not warned about."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )


def _hook_warnings(prepare: Callable[[nn.Sequential], object]) -> list[str]:
    model = _net()
    prepare(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    return [str(w.message) for w in caught if "forward hooks on modules the Kalman chain" in str(w.message)]


@pytest.mark.parametrize(
    ("prepare", "named"),
    [
        (lambda m: m[2].register_forward_hook(lambda mod, args, out: out * 2), "'2' (0 pre-hook(s), 1 hook(s))"),
        (lambda m: m[1].register_forward_hook(lambda mod, args, out: out + 1), "'1' (0 pre-hook(s), 1 hook(s))"),
        (lambda m: m[3].register_forward_pre_hook(lambda mod, args: (args[0] * 2,)), "'3' (1 pre-hook(s), 0 hook(s))"),
    ],
    ids=["activation output", "source layer output", "conv input"],
)
def test_a_hook_on_a_predicted_module_is_named(prepare: Callable[[nn.Sequential], object], named: str) -> None:
    (message,) = _hook_warnings(prepare)
    assert named in message and "follows what a hook computed in the wiring forward" in message


@pytest.mark.parametrize("hook", ["output", "input"])
def test_a_hooks_arithmetic_is_in_the_prior_as_recorded(hook: str) -> None:
    """A ×3 forward hook on the conv (or pre-hook on its input) is a ×3 step of the path: the prior's variance is
    9 times that of the network without the hook, as the layer's own batch variance is."""
    from bkn_export import chain_statistics, format_chain

    def prior_and_batch(model: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_batchnorm(model, torch.randn(2, 3, 8, 8))
        torch.manual_seed(1)
        layer = chain_statistics(model, torch.randn(64, 3, 8, 8))[1]
        assert layer.prior_variance is not None
        return layer.prior_variance, layer.batch_variance

    plain_prior, plain_batch = prior_and_batch(_net())  # Σ_pred + R: the process noise R is added after the path
    hooked = _net()
    if hook == "output":
        hooked[3].register_forward_hook(lambda mod, args, out: out * 3)
    else:
        hooked[3].register_forward_pre_hook(lambda mod, args: (args[0] * 3,))
    prior, batch = prior_and_batch(hooked)
    noise = hooked[4].process_noise().detach()
    torch.testing.assert_close(prior - noise, 9 * (plain_prior - noise), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(batch, 9 * plain_batch, rtol=1e-4, atol=0.0)
    assert "×3 + 0" in format_chain(hooked)


@pytest.mark.parametrize(
    "prepare",
    [
        lambda m: torch.nn.utils.prune.l1_unstructured(m[3], "weight", 0.3),
        lambda m: torch.nn.utils.spectral_norm(m[3]),
        lambda m: m[4].register_forward_hook(lambda mod, args, out: None),  # after the last layer: not on a path
    ],
    ids=["prune", "spectral_norm", "hook past the chain"],
)
def test_weight_reparametrizations_and_other_modules_are_not_warned(prepare: Callable[[nn.Sequential], object]) -> None:
    assert _hook_warnings(prepare) == []
