"""Specification of two messages around conversion: what they name as the cause, and that nothing else changes.

* A BatchNorm whose running buffers were set to None while ``track_running_stats`` stayed True normalizes with
  batch statistics in eval mode; the guard refuses it naming that cause and its remedies (not an adapter).
* ``model.load_state_dict(batchnorm_checkpoint)`` on a converted model warns, pointing to
  ``bkn_export.load_batchnorm_state_dict``, then fails as PyTorch's strict load does; a non-strict load loads as
  before.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from zoo.mimics import trained_like

from bkn_export import convert_batchnorm, load_batchnorm_state_dict
from bkn_export.errors import ConversionError


def _input() -> Tensor:
    return torch.randn(4, 3, 8, 8)


def _conv_bn_chain() -> nn.Sequential:
    """conv-bn-relu-conv-bn: after conversion the second layer has a predecessor (and BKN-only parameters)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


# --------------------------------------------------------------------------- running buffers set to None


@pytest.mark.parametrize("keep_count", [True, False], ids=["num_batches_tracked-kept", "num_batches_tracked-None"])
def test_running_buffers_set_to_none_are_refused_naming_the_cause(keep_count: bool) -> None:
    model = trained_like(_conv_bn_chain())
    model[1].running_mean = None
    model[1].running_var = None
    if not keep_count:
        model[1].num_batches_tracked = None
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError) as raised:
        convert_batchnorm(model, _input())
    message = str(raised.value)
    assert "'1'" in message
    assert "running_mean and running_var are None while track_running_stats=True" in message
    assert "set track_running_stats=False and num_batches_tracked=None" in message
    assert "register_batchnorm_adapter" not in message  # the generic advice misled: nothing adds behaviour here
    assert type(model[1]) is nn.BatchNorm2d
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_the_named_remedy_converts() -> None:
    """Declaring the layer as one without running statistics (what its None buffers mean) converts it."""
    model = trained_like(_conv_bn_chain())
    model[1].running_mean = None
    model[1].running_var = None
    model[1].track_running_stats = False
    model[1].num_batches_tracked = None
    x = _input()
    expected = model.eval()(x)
    converted = convert_batchnorm(model, x)
    assert not converted.get_submodule("1").track_running_stats
    torch.testing.assert_close(converted.eval()(x), expected)


def test_tracking_switched_off_with_only_the_count_left_is_refused_naming_it() -> None:
    """running_mean/var None, track_running_stats=False, num_batches_tracked still a tensor: the count is the cause."""
    model = trained_like(_conv_bn_chain())
    model[1].running_mean = None
    model[1].running_var = None
    model[1].track_running_stats = False
    with pytest.raises(ConversionError, match=r"'1'.*num_batches_tracked is kept.*num_batches_tracked=None"):
        convert_batchnorm(model, _input())


# --------------------------------------------------------------------------- plain load_state_dict of a BN checkpoint


def _converted_and_batchnorm_checkpoint() -> tuple[nn.Module, dict[str, Tensor]]:
    model = trained_like(_conv_bn_chain())
    checkpoint = copy.deepcopy(model.state_dict())
    return convert_batchnorm(model, _input()), checkpoint


def test_strict_load_of_a_batchnorm_checkpoint_points_to_the_batchnorm_loader() -> None:
    """PyTorch's strict load fails as before, nothing loaded, after a warning that names the package's loader; that
    loader takes the checkpoint without the warning."""
    model, checkpoint = _converted_and_batchnorm_checkpoint()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"load_batchnorm_state_dict\(model, state_dict\)"):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\)"):
            model.load_state_dict(checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_batchnorm_state_dict(model, checkpoint)
    assert set(kept) == {"4.prior_weight_logit", "4.process_noise_raw", "4._extra_state"}


def test_non_strict_load_of_a_batchnorm_checkpoint_warns_and_loads_as_before() -> None:
    model, checkpoint = _converted_and_batchnorm_checkpoint()
    with pytest.warns(UserWarning, match="keep their initial values"):
        result = model.load_state_dict(checkpoint, strict=False)
    assert sorted(result.missing_keys) == ["4._extra_state", "4.prior_weight_logit", "4.process_noise_raw"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(model.get_submodule("4").running_mean, checkpoint["4.running_mean"])


def test_a_checkpoint_without_the_layers_batchnorm_entries_gets_no_pointer() -> None:
    """Missing BatchNorm entries too: not the before-conversion case, PyTorch's error alone."""
    model, checkpoint = _converted_and_batchnorm_checkpoint()
    partial = {k: v for k, v in checkpoint.items() if not k.startswith("4.")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"Missing key\(s\)") as raised:
            model.load_state_dict(partial)
    assert "load_batchnorm_state_dict" not in str(raised.value)
    assert not [w for w in caught if "load_batchnorm_state_dict" in str(w.message)]


def test_the_converted_models_own_checkpoint_without_its_wiring_entries_gets_no_pointer() -> None:
    """Parameters and buffers alone (no ``_extra_state``, as some savers write) hold the BKN parameters: not a
    BatchNorm checkpoint, so no pointer to load_batchnorm_state_dict (which refuses such a checkpoint)."""
    model, _ = _converted_and_batchnorm_checkpoint()
    own = {k: v.detach().clone() for k, v in (*model.named_parameters(), *model.named_buffers())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = copy.deepcopy(model).load_state_dict(own, strict=False)
    assert result.missing_keys == ["4._extra_state"]
    assert not [w for w in caught if "load_batchnorm_state_dict" in str(w.message)]


def test_a_batchnorm_checkpoint_saved_before_pytorch_0_4_1_gets_the_pointer() -> None:
    """Old model zoos have no ``num_batches_tracked``: still a BatchNorm checkpoint, still the pointer."""
    model, checkpoint = _converted_and_batchnorm_checkpoint()
    old = {k: v for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")}
    with pytest.warns(UserWarning, match="load_batchnorm_state_dict"):
        model.load_state_dict(old, strict=False)


def test_the_cli_loader_says_it_once_in_its_error_not_also_in_a_warning(tmp_path: Path) -> None:
    """``bkn ... --checkpoint`` of a BatchNorm checkpoint fails with one CheckpointError line that names the loader;
    the layers' warning saying the same was printed above it, breaking the one-line rule."""
    from bkn_export.errors import CheckpointError
    from bkn_export.factory import load_model

    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\nfrom torch import nn\nfrom bkn_export import convert_batchnorm\n"
        "def converted():\n"
        "    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), "
        "nn.BatchNorm2d(4))\n"
        "    return convert_batchnorm(net, torch.randn(4, 3, 8, 8))\n"
    )
    _, checkpoint = _converted_and_batchnorm_checkpoint()
    path = tmp_path / "bn.pt"
    torch.save(checkpoint, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match=r"load_batchnorm_state_dict\(model, torch\.load\(path\)\)"):
            load_model(f"{factory}:converted", str(path))
    assert not [w for w in caught if "load_batchnorm_state_dict" in str(w.message)]


# --------------------------------------------------------------------------- frozen BatchNorms


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's arithmetic (torchvision cannot be installed here): fixed
    statistics and affine in buffers."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(channels) + 0.5)
        self.register_buffer("bias", torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_frozen_batchnorms_are_left_as_they_are_with_a_warning_naming_them() -> None:
    """Third QA of 2026-12-06: a Hugging Face backbone's FrozenBatchNorm2d layers were passed over in silence. They
    are still left as they are (they use no batch statistics, so BKN has nothing to estimate; converting them
    would change the model in train mode), and the conversion says so, naming each and the remedy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4), nn.ReLU()
    )
    x = _input()
    expected = copy.deepcopy(model).train()(x)
    with pytest.warns(UserWarning, match=r"1 frozen BatchNorm\(s\) left as they are: '4' \(FrozenBatchNorm2d\)") as w:
        convert_batchnorm(model, x)
    assert "replace it with the nn.BatchNorm*d holding its state" in str(w[0].message)
    assert type(model[4]) is FrozenBatchNorm2d
    torch.testing.assert_close(model.train()(x), expected)
