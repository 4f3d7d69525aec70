"""Every value of a converted model's state dict is a tensor: code written for BatchNorm models keeps working.

The wiring used to be saved as a dict under ``<layer>._extra_state``; EMA updaters that walk the state dict
(timm's ModelEmaV2, ultralytics' ModelEMA, found by a tester), ``safetensors`` and checkpoint dtype conversions
failed on it (``'dict' object has no attribute 'copy_'``). It is now the uint8 JSON of the same dict
(:mod:`bkn_export.extra_state`).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from support.small_models import two_layer_classifier
from torch import Tensor, nn

import bkn_export
from bkn_export import ChainWiringError, extra_state

_model = two_layer_classifier


def _step(model: nn.Module, x: Tensor) -> None:
    model.train()
    model(x).square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None


def test_every_state_dict_value_is_a_tensor_that_decodes_to_the_wiring() -> None:
    state = _model().state_dict()
    assert all(isinstance(v, Tensor) for v in state.values())
    saved = extra_state.decode(state["4._extra_state"])
    assert saved["version"] == 2 and saved["wiring"]["transition"] == "propagate"
    assert state["4._extra_state"].dtype == torch.uint8 and not state["4._extra_state"].is_floating_point()


def test_timm_v2_and_ultralytics_style_ema_updates_run_and_keep_the_wiring() -> None:
    """Both loops as those projects write them (timm cannot be installed here)."""
    model = _model()
    ema_v2, ema_ul = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        _step(model, x)
        with torch.no_grad():
            decay = 0.9
            for ema_v, model_v in zip(ema_v2.state_dict().values(), model.state_dict().values()):  # timm ModelEmaV2
                ema_v.copy_(ema_v * decay + (1.0 - decay) * model_v)
            current = model.state_dict()
            for key, value in ema_ul.state_dict().items():  # ultralytics ModelEMA
                if value.dtype.is_floating_point:
                    value *= decay
                    value += (1 - decay) * current[key].detach()
    for ema in (ema_v2, ema_ul):
        assert not torch.equal(ema[0].weight, model[0].weight)  # averaged
        _model().load_state_dict(ema.state_dict(), strict=True)  # its wiring is intact
    ours = {k: v for k, v in ema_ul.state_dict().items() if k.endswith("_extra_state")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours.items())


def test_a_checkpoint_cast_to_half_or_saved_with_torch_save_loads() -> None:
    model = _model()
    state = {
        k: v.half() if v.is_floating_point() or k.endswith("_extra_state") else v for k, v in model.state_dict().items()
    }
    target = _model()
    target.load_state_dict(state, strict=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)


def test_safetensors_round_trip() -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model()
    data = safetensors_torch.save(model.state_dict())
    _model().load_state_dict(safetensors_torch.load(data), strict=True)


def test_a_checkpoint_of_another_wiring_or_a_damaged_state_is_refused() -> None:
    state = _model(prior_source="input").state_dict()
    with pytest.raises(ChainWiringError, match=r"'4'.*wiring differs in prior_source"):
        _model(prior_source="output").load_state_dict(state, strict=True)
    damaged = dict(_model().state_dict())
    damaged["4._extra_state"] = damaged["4._extra_state"][:-3]
    with pytest.raises(ChainWiringError, match=r"'4'.*not the JSON of a BKN wiring"):
        _model().load_state_dict(damaged, strict=True)


def test_a_checkpoint_saved_with_other_computing_options_loads_with_a_warning_naming_them() -> None:
    """A fixed prior weight or the fallback rule live in no tensor: a checkpoint saved with p = 0.9 used to load
    silently into a layer with p = 0.1 (train outputs 0.085 apart). The layer keeps its own options and says so;
    the first layer (no predecessor: BatchNorm whatever its options) does not."""
    state = _model(prior_weight=0.9).state_dict()
    with pytest.warns(UserWarning) as caught:
        _model(prior_weight=0.1, fallback_ratio=100.0).load_state_dict(state, strict=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "'4'" in messages[0] and "prior_weight=0.9 (this layer: 0.1)" in messages[0]
    assert "fallback_ratio=0.0 (this layer: 100.0)" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _model(prior_weight=0.9).load_state_dict(state, strict=True)


def test_a_checkpoint_of_the_model_wired_inside_a_wrapper_loads_into_the_model_wired_alone() -> None:
    """Converted as ``Wrap().net`` (names 'net.1', 'net.4'), saved, the keys' 'net.' prefix removed, loaded into the
    same network converted on its own ('1', '4'): the same chain under a root prefix, refused before; and back."""

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)  # type: ignore[no-any-return]

    wrapped = Wrap()
    with pytest.warns(UserWarning, match="hold BKN parameters already"):  # wired once more, at the wrapper
        bkn_export.wire_chain(wrapped, torch.randn(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    _step(wrapped, x)
    state = {k.removeprefix("net."): v for k, v in wrapped.state_dict().items()}
    alone = _model()
    alone.load_state_dict(state, strict=True)
    torch.testing.assert_close(alone.eval()(x), wrapped.eval()(x), rtol=0, atol=0)
    again = Wrap()
    with pytest.warns(UserWarning, match="hold BKN parameters already"):
        bkn_export.wire_chain(again, torch.randn(2, 3, 8, 8))
    again.load_state_dict({f"net.{k}": v for k, v in alone.state_dict().items()}, strict=True)
    other = _model(prior_source="input")  # a prefix does not excuse another chain
    with pytest.raises(ChainWiringError, match="wiring differs in prior_source"):
        other.load_state_dict(state, strict=True)
