"""Wiring warns about forward hooks on the modules a prediction goes through: the prior follows each module's own
function, so a hook that replaces an output (found by a tester: ×2 on a ReLU left the next layer's prior at half
the mean, a quarter of the variance) is not in it. Torch's weight reparametrization pre-hooks are not warned about."""

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
    assert named in message and "not in it" in message


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
