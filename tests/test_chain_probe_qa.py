"""What the cold QA of 2026-12-05 found in the chain's recording (each prior was compared with a Monte-Carlo
estimate of the layer's input under the source's Gaussian):

* a parameter-free module was identified by running it on an ordered ramp, which ``torch.sort`` and ``cummax``
  return unchanged: both were taken as the identity (prior variance 129 % off, no note). The probe is shuffled now;
* a module that is the identity in eval mode only (Gaussian noise, DropPath) was taken as the identity without a
  note (variance 60 % / 26 % off in training); it now carries the note dropout carries;
* adaptive average pooling to a size that does not divide the input's (overlapping windows) was not counted as
  making positions dependent: the conv after it was predicted as if they were independent (variance 26–47 % off).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bkn_export import convert_batchnorm, describe_chain
from bkn_export.chain.record import record_dataflow
from bkn_export.chain.steps import Elementwise, Identity, predict_steps


class _SortWidth(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sort(x, dim=-1).values


class _CumMax(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cummax(x, dim=-1).values


class _Noise(nn.Module):
    """Gaussian noise in training, the identity in evaluation."""

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.randn_like(x) if self.training else x


class _Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


def _between(module: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), module, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )


def test_an_order_dependent_module_is_not_taken_as_the_identity() -> None:
    for module in (_SortWidth(), _CumMax()):
        chain = record_dataflow(_between(module), torch.randn(2, 3, 8, 8))
        assert chain["4"].sources == (), type(module).__name__  # first in its chain: nothing predicts through it
        assert "cannot carry moments" in chain["4"].notes[0]


def test_an_activation_is_still_identified_on_the_shuffled_probe() -> None:
    chain = record_dataflow(_between(_Swish()), torch.randn(2, 3, 8, 8))
    assert chain["4"].sources[0].steps[0] == Elementwise("silu", (), "2")


def test_a_module_that_is_the_identity_in_eval_mode_only_is_noted() -> None:
    model = _between(_Noise())
    x = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    chain = record_dataflow(model, x)
    assert torch.equal(torch.get_rng_state(), rng)  # the train-mode probe left the caller's RNG alone
    assert all(module.training for module in model.modules())  # modes as they were
    (path,) = chain["4"].sources
    assert path.steps[0] == Identity("train-mode", "2")
    assert any("'2' (_Noise) is taken as the identity" in note for note in chain.notes)
    links = {link.name: link for link in describe_chain(convert_batchnorm(model, torch.randn(2, 3, 8, 8)))}
    assert any("train-mode effect (noise, DropPath) not modelled" in text for text in links["4"].approximations)
    plain = record_dataflow(_between(nn.Identity()), torch.randn(2, 3, 8, 8))
    assert not any("train-mode" in note for note in plain.notes)


def _pooled_conv(output_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(output_size),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
    )


def test_adaptive_pooling_that_overlaps_gives_the_conv_after_it_an_exact_prior() -> None:
    """6x6 -> 5x5 windows overlap: the conv's prior variance against a Monte-Carlo estimate with the source's
    Gaussian in place of its output (was 47 % off)."""
    torch.manual_seed(0)
    model = _pooled_conv(5).double()
    chain = record_dataflow(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    (path,) = chain["4"].sources
    mean = torch.randn(4, dtype=torch.float64)
    variance = torch.rand(4, dtype=torch.float64) + 0.5
    modules = dict(model.named_modules())
    predicted_mean, predicted_variance, _ = predict_steps(path.steps, mean, variance, (6, 6), modules)
    samples = mean[None, :, None, None] + variance.sqrt()[None, :, None, None] * torch.randn(
        20_000, 4, 6, 6, dtype=torch.float64
    )
    with torch.no_grad():
        out = model[3](model[2](samples))
    true_mean = out.mean(dim=(0, 2, 3))
    true_variance = out.var(dim=(0, 2, 3))
    torch.testing.assert_close(predicted_mean, true_mean, rtol=0.0, atol=0.03 * float(true_variance.sqrt().max()))
    torch.testing.assert_close(predicted_variance, true_variance, rtol=0.03, atol=0.0)


def _act_conv_act(conv: nn.Module, channels: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        conv,
        nn.ReLU(),
        nn.Conv2d(channels, 4, 1),
        nn.BatchNorm2d(4),
    )


def test_an_activation_after_a_small_fan_in_conv_of_activations_is_named() -> None:
    """``relu(dw1x1(relu(x)))`` is ``relu(a relu(x) + b)``: its prior was 76 % off with no note."""
    depthwise = record_dataflow(_act_conv_act(nn.Conv2d(4, 4, 1, groups=4)), torch.randn(2, 3, 8, 8))
    (note,) = depthwise["6"].notes
    assert "relu() '4' takes its input, relu() '2' outputs summed 1 at a time by conv '3', as Gaussian" in note
    wide = record_dataflow(_act_conv_act(nn.Conv2d(32, 32, 1), channels=32), torch.randn(2, 3, 8, 8))
    assert wide["6"].notes == ()  # 32 inputs per output: taken as Gaussian, as before


def test_a_pooling_description_names_dilation_and_ceil_mode() -> None:
    from bkn_export.chain.steps import Pool
    from bkn_export.moments import PoolSpec

    spec = PoolSpec.create("max", 2, kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)
    assert (
        Pool(spec, "p").describe()
        == "max_pool2d(kernel (3, 3) stride (2, 2) padding (1, 1) dilation (2, 2) ceil_mode) 'p'"
    )
    assert Pool(PoolSpec.create("avg", 2, kernel_size=2), "p").describe() == "avg_pool2d(kernel (2, 2)) 'p'"
