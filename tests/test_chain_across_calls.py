"""A wired model across calls: a changed module or input never meets a prediction computed for the old one.

Each test changes what a layer's prior depends on (a module replaced on the way to a name, a conv's geometry, the
input's spatial size) and compares with what nothing carried over gives: a copy of the model (a new chain root, new
steps) and the reference moments.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import LayerStatistics, chain_statistics, convert_batchnorm, wire_chain
from bkn_export.chain import fast
from bkn_export.chain.scope import PathWatch
from bkn_export.errors import ChainWiringError

# --------------------------------------------------------------------------- a wired model across calls


class _Net(nn.Module):
    """bn0 → relu → nearest ×2 → 3×3 conv (one linear run) → bn1 → relu → strided conv → bn2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.up = nn.Upsample(scale_factor=2)
        self.block = nn.Sequential(OrderedDict(conv=nn.Conv2d(6, 6, 3, padding=1)))
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        a = self.bn1(self.block.conv(self.up(h)))
        return self.bn2(self.conv2(F.relu(a)))


def _inputs(size: int) -> Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


def _wired() -> nn.Module:
    torch.manual_seed(0)
    model = _Net().double()
    with torch.no_grad():  # non-trivial γ, β
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.5)
    return convert_batchnorm(model, _inputs(8), process_noise=False, prior_source="output")


def _priors(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    found: dict[str, LayerStatistics] = {s.name: s for s in chain_statistics(model, x)}
    priors = {}
    for name in ("bn1", "bn2"):
        mean, variance = found[name].prior_mean, found[name].prior_variance
        assert mean is not None and variance is not None, name
        priors[name] = (mean, variance)
    return priors


def _assert_equal(got: dict[str, tuple[Tensor, Tensor]], expected: dict[str, tuple[Tensor, Tensor]]) -> None:
    for name, (mean, variance) in expected.items():
        assert torch.equal(got[name][0], mean) and torch.equal(got[name][1], variance), name


def _replace_conv(model: Any, conv: nn.Conv2d) -> None:
    """``model.block`` replaced by a new block around ``conv``, which takes over the old conv's path watch."""
    for hook in model.block.conv._forward_pre_hooks.values():
        if isinstance(hook, PathWatch):
            conv.register_forward_pre_hook(hook)
    model.block = nn.Sequential(OrderedDict(conv=conv))


@pytest.mark.parametrize("kernel", [3, 1], ids=["same geometry", "another geometry"])
def test_a_replaced_module_on_a_path_predicts_what_a_fresh_copy_does(kernel: int) -> None:
    model = _wired()
    x = _inputs(8)
    before = _priors(model, x)
    torch.manual_seed(1)
    _replace_conv(model, nn.Conv2d(6, 6, kernel, padding=kernel // 2).double())
    after = _priors(model, x)
    _assert_equal(after, _priors(copy.deepcopy(model), x))  # a new root, new steps: nothing kept
    assert not torch.equal(after["bn1"][1], before["bn1"][1])  # the new conv's moments, not the kept one's
    with fast.reference_only():
        reference = _priors(model, x)
    for name, (mean, variance) in reference.items():
        torch.testing.assert_close(after[name], (mean, variance), rtol=1e-10, atol=1e-12)


def test_another_spatial_size_predicts_what_a_fresh_copy_does() -> None:
    model = _wired()
    fresh = {size: copy.deepcopy(model) for size in (8, 12)}
    for size in (8, 12, 8):
        got = _priors(model, _inputs(size))
        _assert_equal(got, _priors(copy.deepcopy(fresh[size]), _inputs(size)))
        with fast.reference_only():
            reference = _priors(model, _inputs(size))
        for name, (mean, variance) in reference.items():
            torch.testing.assert_close(got[name], (mean, variance), rtol=1e-10, atol=1e-12)


def test_a_conv_whose_geometry_changed_in_place_predicts_what_a_fresh_copy_does() -> None:
    """Surgery as for a dilated backbone: a conv's stride set in place, no module replaced."""
    model: Any = _wired()
    x = _inputs(8)
    before = _priors(model, x)
    model.block.conv.stride = (2, 2)  # the nearest ×2 → 3×3 conv run now reads every other position
    model.conv2.stride = (1, 1)
    after = _priors(model, x)
    _assert_equal(after, _priors(copy.deepcopy(model), x))
    assert not torch.equal(after["bn2"][1], before["bn2"][1])
    with fast.reference_only():
        reference = _priors(model, x)
    for name, (mean, variance) in reference.items():
        torch.testing.assert_close(after[name], (mean, variance), rtol=1e-10, atol=1e-12)


def test_a_module_replaced_after_wiring_is_refused_by_name_until_rewired() -> None:
    """A new module under a recorded name (a new conv or head put in after converting) must not count as a branch
    not taken: the layers it feeds would train as BatchNorm under a warning that blames a module that did run."""
    model = _wired().train()
    x = _inputs(8)
    model.block = nn.Sequential(OrderedDict(conv=nn.Conv2d(6, 6, 3, padding=1).double()))
    with pytest.raises(ChainWiringError, match=r"'block\.conv' is now a Conv2d, not the module the chain recorded"):
        model(x)
    with pytest.warns(UserWarning, match="hold BKN parameters already"):
        wire_chain(model, x)
    assert _priors(model, x)["bn1"][1].isfinite().all()


def test_a_module_deleted_after_wiring_is_refused_by_name() -> None:
    model = _wired().train()
    del model.block.conv  # the forward still runs: its own attribute lookup fails first otherwise
    model.block.add_module("other", nn.Identity())
    model.forward = lambda x: model.bn1(model.up(F.relu(model.bn0(model.stem(x)))))  # type: ignore[method-assign]
    with pytest.raises(ChainWiringError, match=r"'block\.conv', on a recorded path, is no longer in the model"):
        model(_inputs(8))
