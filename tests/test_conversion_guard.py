"""Specification of the conversion guard and of BatchNorm subclasses with extra behaviour.

Nothing converts silently into a different function: each converted layer, called on its
own (prior off), computes what its original computed on the input it saw in the example
forward, in eval and train mode (output and running statistics), and the model's eval
outputs are unchanged; otherwise ``convert_batchnorm`` raises ``ConversionError`` and the
model is left exactly as it was. timm's fused layers are tested against the mimic in
``tests/zoo/timm_mimic.py`` (timm itself cannot be installed here).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from zoo.mimics import ActBatchNorm2d, ActSubclassNet, TaggedBatchNorm2d, TimmStyleNet, trained_like
from zoo.timm_mimic import BatchNormAct2d, FrozenBatchNormAct2d, convert_sync_batchnorm

from bkn_export import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, convert_batchnorm
from bkn_export import norm_act as norm_act_module
from bkn_export.conversion_guard import TOLERANCES, check_layer, check_outputs, prior_off
from bkn_export.errors import ConversionError
from bkn_export.norm_act import (
    BatchKalmanNormAct2d,
    SyncBatchKalmanNormAct,
    post_normalization_modules,
    register_batchnorm_adapter,
)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[type[nn.Module], Any]:
    """The adapter registry, restored after the test."""
    saved: dict[type[nn.Module], Any] = dict(norm_act_module._REGISTRY)
    monkeypatch.setattr(norm_act_module, "_REGISTRY", saved)
    return saved


def _snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, Tensor], dict[str, int]]:
    """Module types by name, state-dict values (cloned), and the identity of every parameter."""
    types = {name: type(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    identities = {name: id(p) for name, p in model.named_parameters()}
    return types, state, identities


def _assert_unchanged(model: nn.Module, before: tuple[dict[str, type], dict[str, Tensor], dict[str, int]]) -> None:
    types, state, identities = _snapshot(model)
    assert types == before[0]
    assert identities == before[2]
    assert state.keys() == before[1].keys()
    for key, value in before[1].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def _input() -> Tensor:
    return torch.randn(2, 3, 16, 16)


# ----------------------------------------------------------------- subclasses that add behaviour


def test_subclass_overriding_forward_is_refused_and_the_model_left_as_it_was() -> None:
    """The issue's repro: BatchNorm2d subclass with forward = act(super().forward(x))."""
    model = trained_like(ActSubclassNet()).eval()
    x = _input()
    expected = model(x)
    before = _snapshot(model)
    with pytest.raises(ConversionError, match=r"'bn1' is a .*ActBatchNorm2d.*overrides forward.*register_batchnorm"):
        convert_batchnorm(model, x)
    _assert_unchanged(model, before)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_subclass_converts_with_its_behaviour_through_a_registered_adapter(registry: dict[Any, Any]) -> None:
    register_batchnorm_adapter(ActBatchNorm2d, BatchKalmanNormAct2d, submodules=("act",))
    model = trained_like(ActSubclassNet()).eval()
    act = model.bn1.act
    x = _input()
    expected = model(x)
    converted = convert_batchnorm(model, x)
    assert type(converted.bn1) is BatchKalmanNormAct2d and converted.bn1.act is act
    assert isinstance(converted.bn1.drop, nn.Identity)  # the original has no drop: the default stays
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)
    assert converted(x).min() < 0 and converted.bn1(x.new_ones(2, 8, 4, 4)).min() >= 0


def test_an_adapter_that_drops_the_behaviour_is_caught_in_eval_mode(registry: dict[Any, Any]) -> None:
    """The guard, not the registry, decides: a wrong adapter is refused, naming module and mode."""
    register_batchnorm_adapter(ActBatchNorm2d, BatchKalmanNorm2d)
    model = trained_like(ActSubclassNet()).eval()
    before = _snapshot(model)
    with (
        pytest.warns(UserWarning, match=r"'bn1' \(ActBatchNorm2d\) has submodules \['act'\] that its adapter"),
        pytest.raises(ConversionError, match=r"converting 'bn1' \(ActBatchNorm2d -> BatchKalmanNorm2d\).*eval-mode"),
    ):
        convert_batchnorm(model, _input())
    _assert_unchanged(model, before)


class _SlowMomentumNorm2d(BatchKalmanNorm2d):
    """A BKN layer whose running statistics move at half the momentum: same outputs, different training."""

    def _momentum(self) -> float:
        return 0.5 * super()._momentum()


def test_a_difference_only_in_train_mode_statistics_is_caught(registry: dict[Any, Any]) -> None:
    register_batchnorm_adapter(TaggedBatchNorm2d, _SlowMomentumNorm2d)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), TaggedBatchNorm2d(4))
    with pytest.raises(ConversionError, match=r"'1'.*train-mode running_mean update"):
        convert_batchnorm(model, _input())
    assert type(model[1]) is TaggedBatchNorm2d


def test_subclass_with_batchnorms_own_forward_converts_plainly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), TaggedBatchNorm2d(4))
    converted = convert_batchnorm(trained_like(model), _input())
    assert type(converted[1]) is BatchKalmanNorm2d


# ----------------------------------------------------------------- timm's fused layers (mimic)


def test_timm_batchnormact_keeps_drop_and_act_and_its_state_dict_keys() -> None:
    model = trained_like(TimmStyleNet()).eval()
    submodules = {name: (model.get_submodule(name).drop, model.get_submodule(name).act) for name in ("bn1", "bn3")}
    keys = set(model.state_dict())
    x = _input()
    expected = model(x)
    converted = convert_batchnorm(model, x)
    for name in ("bn1", "bn2", "bn3", "bn4"):
        assert type(converted.get_submodule(name)) is BatchKalmanNormAct2d
    for name, (drop, act) in submodules.items():
        assert post_normalization_modules(converted.get_submodule(name)) == (drop, act)
    assert isinstance(converted.bn1.act, nn.SiLU) and isinstance(converted.bn1.drop, nn.Dropout)
    assert "bn3.act.weight" in keys  # PReLU's parameter keeps its key
    assert keys <= set(converted.state_dict())
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_batchnormact_matches_in_train_mode_with_dropout(dtype: torch.dtype) -> None:
    """Output and running statistics in train mode; dropout sees one random stream on both sides."""
    original = trained_like(BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.3))).to(dtype)
    converted = BatchKalmanNormAct2d(6, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.3)).to(dtype)
    converted.load_state_dict(original.state_dict(), strict=False)
    x = torch.randn(4, 6, 5, 5, dtype=dtype) * 3 + 1
    check_layer("layer", original, converted, x)  # raises on any difference
    torch.manual_seed(1)
    y_original = original.train()(x)
    torch.manual_seed(1)
    y_converted = converted.train()(x)
    assert (y_original == 0).any()  # the dropout did drop
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(y_converted, y_original, rtol=tolerance.rtol, atol=tolerance.atol)


def test_timm_syncbatchnormact_becomes_synchronised_bkn_with_drop_and_act() -> None:
    model = convert_sync_batchnorm(trained_like(TimmStyleNet())).eval()
    x = _input()
    expected = model(x)
    converted = convert_batchnorm(model, x)
    assert type(converted.bn1) is SyncBatchKalmanNormAct and isinstance(converted.bn1.act, nn.SiLU)
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)  # eval mode needs no process group


def test_frozen_batchnormact_is_not_a_batchnorm_and_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNormAct2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    converted = convert_batchnorm(model, _input())
    assert type(converted[1]) is FrozenBatchNormAct2d and type(converted[3]) is BatchKalmanNorm2d


# ----------------------------------------------------------------- BatchNorm settings


@pytest.mark.parametrize(
    "settings",
    [{"track_running_stats": False}, {"momentum": None}, {"affine": False}],
    ids=["no-running-stats", "cumulative-average", "no-affine"],
)
def test_batchnorm_settings_that_bkn_expresses_convert_and_match(settings: dict[str, Any]) -> None:
    """Checked by the guard in eval and train mode; here the converted layer is also run in both."""
    bn = trained_like(nn.BatchNorm2d(4, **settings))
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(3)
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    converted = convert_batchnorm(copy.deepcopy(bn), x)
    assert type(converted) is BatchKalmanNorm2d
    for training in (False, True):
        torch.testing.assert_close(converted.train(training)(x), bn.train(training)(x), rtol=5e-5, atol=5e-5)
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            torch.testing.assert_close(getattr(converted, name), getattr(bn, name), rtol=5e-5, atol=5e-5)


def test_running_statistics_with_tracking_switched_off_are_refused() -> None:
    """BatchNorm normalizes with such buffers in eval mode and never updates them: BKN cannot express it."""
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[1].track_running_stats = False
    with pytest.raises(ConversionError, match=r"'1'.*eval-mode output.*track_running_stats=False"):
        convert_batchnorm(model, _input())
    assert type(model[1]) is nn.BatchNorm2d


def test_one_value_per_channel_in_train_mode_is_exempt() -> None:
    """nn.BatchNorm1d raises on a (1, C) batch in training (and so does the converted layer, first in its chain):
    eval mode is compared."""
    model = trained_like(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    converted = convert_batchnorm(model, torch.randn(1, 5))
    assert type(converted[1]) is BatchKalmanNorm1d


class _TrainScaled3d(BatchKalmanNorm3d):
    """Differs from BatchNorm3d only in train mode, by 10% of its output."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return 1.1 * y if self.training else y


def test_ill_conditioned_channels_convert_but_a_real_difference_there_is_caught() -> None:
    """Two nearly equal values per channel (max|x|/std ≈ 3e4): both implementations lose the same digits.

    The per-channel allowance (conditioning_slack, here ≈ 0.8% of |γ|) admits that rounding, not
    a changed function: a layer whose train-mode output is 10% larger is refused on that input.
    """
    bn = trained_like(nn.BatchNorm3d(4))
    x = 1e4 + 0.3 * torch.randn(2, 4, 1, 1, 1)
    converted = BatchKalmanNorm3d(4)
    converted.load_state_dict(bn.state_dict(), strict=False)
    check_layer("layer4.0.downsample.1", bn, converted, x)
    scaled = _TrainScaled3d(4)
    scaled.load_state_dict(bn.state_dict(), strict=False)
    with pytest.raises(ConversionError, match=r"'layer4\.0\.downsample\.1'.*train-mode output"):
        check_layer("layer4.0.downsample.1", bn, scaled, x)


# ----------------------------------------------------------------- the whole model


class _TypeSwitch(nn.Module):
    """A forward that asks for the module type: every layer matches on its own, the model does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        return out * 2 if isinstance(self.bn, nn.BatchNorm2d) else out


def test_a_changed_model_output_is_refused_even_when_every_layer_matches() -> None:
    model = trained_like(_TypeSwitch())
    before = _snapshot(model)
    with pytest.raises(ConversionError, match=r"eval-mode outputs \(output 0\).*isinstance"):
        convert_batchnorm(model, _input())
    _assert_unchanged(model, before)


def test_successful_conversion_keeps_the_other_modules_and_their_parameters() -> None:
    """Conversion runs on a copy, but the modules it does not replace stay the same objects."""
    model = trained_like(TimmStyleNet())
    conv, head_weight = model.conv1, model.head.weight
    convert_batchnorm(model, _input())
    assert model.conv1 is conv and model.head.weight is head_weight


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_tolerance_is_the_stated_one_per_dtype(dtype: torch.dtype) -> None:
    """|a − b| ≤ atol + rtol·|b|: a difference of half the bound passes, twice the bound fails."""
    tolerance = TOLERANCES[dtype]
    expected = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    bound = tolerance.atol + tolerance.rtol * expected.abs()
    check_outputs(expected.to(dtype), (expected + 0.5 * bound).to(dtype))
    with pytest.raises(ConversionError, match="largest difference"):
        check_outputs(expected.to(dtype), (expected + 2.0 * bound).to(dtype))


# ----------------------------------------------------------------- no running statistics (exempt by design)


class _NoRunningStats(nn.Module):
    """conv-bn-relu-conv-bn with track_running_stats=False: the second layer is wired with a prior."""

    def __init__(self, scale_when_batchnorm: float = 1.0) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)
        self.scale_when_batchnorm = scale_when_batchnorm

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return out * self.scale_when_batchnorm if isinstance(self.bn2, nn.BatchNorm2d) else out


def test_no_running_statistics_converts_with_the_prior_difference_exempt_and_named() -> None:
    """In eval mode the wired second layer blends its prior with the batch statistics, BatchNorm does not.

    The guard compares the whole model with that layer's prior weight held at 0 (prior_off):
    then the converted model equals the original; with the prior on it differs (by design).
    """
    model = trained_like(_NoRunningStats()).eval()
    original = copy.deepcopy(model)
    x = _input()
    # named where the user sees it: the by-design difference was silent (a cold QA session's finding)
    with pytest.warns(RuntimeWarning, match=r"track_running_stats=False: 'bn2'\).*eval outputs differ.*by design"):
        convert_batchnorm(model, x)
    assert isinstance(model.bn2, BatchKalmanNorm2d) and model.bn2.has_predecessor
    with torch.no_grad():
        expected = original(x)
        with prior_off([model.bn2]):
            torch.testing.assert_close(model(x), expected, rtol=5e-5, atol=5e-5)
        assert (model(x) - expected).abs().max() > 1e-3  # the prior is back on: BKN's by-design difference
    assert "prior_weight" not in vars(model.bn2)


def test_no_running_statistics_still_refuses_a_real_model_difference() -> None:
    """The exemption covers the prior only: a forward that changes with the module type is still refused."""
    model = trained_like(_NoRunningStats(scale_when_batchnorm=2.0))
    before = _snapshot(model)
    with pytest.raises(ConversionError, match=r"eval-mode outputs \(output 0\)"):
        convert_batchnorm(model, _input())
    _assert_unchanged(model, before)


def test_a_conversion_refused_after_wiring_leaves_no_chain_hooks_on_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy that is wired shares the Conv/ReLU modules with the model: a refusal must take its hooks back."""
    from bkn_export.chain.scope import PathWatch
    from bkn_export.conversion_guard import ConversionGuard

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    hooks_before = {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()}

    def refuse(self: ConversionGuard, *args: object, **kwargs: object) -> None:
        raise ConversionError("planted refusal after wiring")

    monkeypatch.setattr(ConversionGuard, "check_model", refuse)
    with pytest.raises(ConversionError, match="planted refusal"):
        convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert not any(isinstance(h, PathWatch) for m in model.modules() for h in m._forward_pre_hooks.values())
    assert {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks_before
