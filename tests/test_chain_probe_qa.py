"""What the cold QA of 2026-12-05 found in the chain's recording (each prior was compared with a Monte-Carlo
estimate of the layer's input under the source's Gaussian):

* a parameter-free module was identified by running it on an ordered ramp, which ``torch.sort`` and ``cummax``
  return unchanged: both were taken as the identity (prior variance 129 % off, no note). The probe is shuffled now;
* a module that is the identity in eval mode only (Gaussian noise, DropPath) was taken as the identity without a
  note (variance 60 % / 26 % off in training); it now carries the note dropout carries;
* adaptive average pooling to a size that does not divide the input's (overlapping windows) was not counted as
  making positions dependent: the conv after it was predicted as if they were independent (variance 26–47 % off).

And what the next QA (same day) found: the train-mode probe drew from Python's / NumPy's global RNGs and its
answer depended on the caller's seed; a module refusing ``train(True)`` stopped the conversion; a write through a
view (``y[:, :4].relu_()``) left ``y`` recorded as unchanged; ``tensor_split`` with unsorted indices took the wrong
channels.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import convert_batchnorm, describe_chain
from bkn_export.chain.record import record_dataflow
from bkn_export.chain.steps import Channels, Elementwise, Identity, predict_steps


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


class _PythonRandomDropPath(nn.Module):
    """Drops the whole batch with probability 0.1 in training (Python's ``random``), without rescaling."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0 if self.training and random.random() < 0.1 else x


class _NumpyNoise(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x + torch.from_numpy(np.random.standard_normal(tuple(x.shape))).to(x) if self.training else x


class _SampleDropPath(nn.Module):
    """DropPath without rescaling: each sample dropped with probability 0.1 in training."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= 0.1).to(x)
        return x * keep


class _InferenceOnlySiLU(nn.Module):
    def train(self, mode: bool = True) -> _InferenceOnlySiLU:
        if mode:
            raise RuntimeError("inference-only")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


def test_the_train_mode_probe_keeps_every_global_rng_and_answers_the_same_each_time() -> None:
    """The probe drew from Python's and NumPy's global RNGs (the caller's sequence changed), and whether a DropPath
    that drops whole samples got its note at batch 1 depended on the caller's seed (5 of 20 recordings)."""
    for module in (_PythonRandomDropPath(), _NumpyNoise()):
        random.seed(1)
        np.random.seed(1)
        states = random.getstate(), np.random.get_state()[1].copy()
        chain = record_dataflow(_between(module).eval(), torch.randn(1, 3, 8, 8))
        assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
        assert chain["4"].sources[0].steps[0] == Identity("train-mode", "2"), type(module).__name__
    for seed in range(8):
        torch.manual_seed(seed)
        chain = record_dataflow(_between(_SampleDropPath()).eval(), torch.randn(1, 3, 8, 8))
        assert chain["4"].sources[0].steps[0] == Identity("train-mode", "2"), seed


def test_a_module_that_refuses_train_mode_does_not_stop_the_conversion() -> None:
    """Its ``train(True)`` raised out of the probe: the conversion failed with a misleading "example forward failed"."""
    chain = record_dataflow(_between(_InferenceOnlySiLU()).eval(), torch.randn(2, 3, 8, 8))
    (path,) = chain["4"].sources  # not a probed leaf: its forward's own operators were recorded, x * sigmoid(x)
    assert path.steps[0].kind == "silu" and path.steps[0].module is None


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


def test_a_strided_transposed_conv_counts_the_taps_that_meet_an_output() -> None:
    """ConvTranspose2d(8, 8, 2, stride=2) sums 8 inputs per output (one tap each), counted as 32 = 8 × 2 × 2: no note,
    while its prior variance was 42-69 % off, as for the Conv2d(8, 8, 1) that had one."""
    strided = record_dataflow(_act_conv_act(nn.ConvTranspose2d(8, 8, 2, stride=2), channels=8), torch.randn(2, 3, 8, 8))
    (note,) = strided["6"].notes
    assert "summed 8 at a time by conv '3'" in note, note
    overlapping = record_dataflow(
        _act_conv_act(nn.ConvTranspose2d(8, 8, 4, stride=2), channels=8), torch.randn(2, 3, 8, 8)
    )
    assert overlapping["6"].notes == ()  # 8 × 2 × 2 = 32 inputs per output
    uneven = record_dataflow(_act_conv_act(nn.ConvTranspose2d(8, 8, 3, stride=2), channels=8), torch.randn(2, 3, 8, 8))
    assert "summed 8 at a time" in uneven["6"].notes[0]  # 1 or 2 taps per dim meet an output: the fewest counted


def test_a_conv_on_an_input_smaller_than_its_kernel_and_a_small_average_pool_are_named() -> None:
    """A 3×3 conv (padding 1) on a 1×1 input sums 8 real inputs, counted as 72 (variance 26-126 % off, no note); an
    AvgPool2d(2) averages 4 ReLU outputs, taken as Gaussian again (variance 14-16 % off, no note)."""
    tiny = record_dataflow(_act_conv_act(nn.Conv2d(8, 8, 3, padding=1), channels=8), torch.randn(2, 3, 1, 1))
    assert "summed 8 at a time by conv '3'" in tiny["6"].notes[0]
    roomy = record_dataflow(_act_conv_act(nn.Conv2d(8, 8, 3, padding=1), channels=8), torch.randn(2, 3, 8, 8))
    assert roomy["6"].notes == ()  # 72 inputs per output
    pooled = record_dataflow(_act_conv_act(nn.AvgPool2d(2), channels=4), torch.randn(2, 3, 8, 8))
    assert "summed 4 at a time by" in pooled["6"].notes[0]


def test_a_pooling_description_names_dilation_and_ceil_mode() -> None:
    from bkn_export.chain.steps import Pool
    from bkn_export.moments import PoolSpec

    spec = PoolSpec.create("max", 2, kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)
    assert (
        Pool(spec, "p").describe()
        == "max_pool2d(kernel (3, 3) stride (2, 2) padding (1, 1) dilation (2, 2) ceil_mode) 'p'"
    )
    assert Pool(PoolSpec.create("avg", 2, kernel_size=2), "p").describe() == "avg_pool2d(kernel (2, 2)) 'p'"


class _WrittenThroughView(nn.Module):
    """conv → BN → (an in-place write through a view of the BN output) → conv → BN."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.write = write
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.b0(self.c0(x))
        if self.write == "method":
            y[:, :4].relu_()
        elif self.write == "functional":
            F.relu(y.narrow(1, 0, 4), inplace=True)
        elif self.write == "module":
            self.act(y[:, :4])
        elif self.write == "base after a view":
            kept = y[:, :4]
            F.relu(y, inplace=True)
            y = torch.cat([kept, y[:, 4:]], 1)
        elif self.write == "flattened view":
            y.flatten(2).relu_()
        return self.b1(self.c1(y))


def test_a_write_through_a_view_is_not_taken_as_the_unchanged_tensor() -> None:
    """``y[:, :4].relu_()`` changes ``y``; the chain still predicted ``conv(y)`` from the source's Gaussian as if it
    were untouched (prior mean 63-146 % of the scale off, variance 68-402 %, no note). The write now makes ``y`` (and
    any other view of it) opaque: the layer starts its own chain and says why."""
    for write in ("method", "functional", "module", "base after a view", "flattened view"):
        chain = record_dataflow(_WrittenThroughView(write).eval(), torch.randn(2, 3, 8, 8))
        assert not any(path.normalization == "b0" for path in chain["b1"].sources), write  # not conv(b0's y)
        assert any("changed in place through another view" in note for note in chain["b1"].notes), write
    whole = record_dataflow(_WrittenThroughView("none").eval(), torch.randn(2, 3, 8, 8))
    assert whole["b1"].sources[0].normalization == "b0"  # nothing written: the chain goes on


class _TensorSplit(nn.Module):
    def __init__(self, indices: list[int], channels: int) -> None:
        super().__init__()
        self.indices = indices
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b1 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.b1(torch.tensor_split(self.b0(self.c0(x)), self.indices, dim=1)[2])


def test_tensor_split_with_unsorted_indices_takes_the_channels_it_returns() -> None:
    """``tensor_split(y, [4, 2, 6], 1)[2]`` is ``y[:, 2:6]``: it was wired as channels 4-7 (running sums of the parts'
    sizes), and with [5, 2] as 6 channels from 5 (a crash at the first train step, after the conversion)."""
    for indices, channels, expected in (([4, 2, 6], 4, Channels(2, 6)), ([5, 2], 6, Channels(2, 8))):
        model = convert_batchnorm(_TensorSplit(indices, channels).eval(), torch.randn(2, 3, 8, 8))
        (path,) = record_dataflow(_TensorSplit(indices, channels).eval(), torch.randn(2, 3, 8, 8))["b1"].sources
        assert path.steps == (expected,), indices
        model.train()(torch.randn(2, 3, 8, 8)).sum().backward()


class _SwappedHalves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.b0(self.c0(x))
        return self.b1(torch.cat([y[:, 4:], y[:, :4]], 1))


def test_the_identity_transition_names_the_steps_it_does_not_run() -> None:
    """``identity`` pairs channel c with the sources' channel c whatever lies between: halves swapped by a concat put
    the prior's variance 178 % off, while the description listed the slices as if they were followed."""
    model = convert_batchnorm(_SwappedHalves().eval(), torch.randn(2, 3, 8, 8), transition="identity")
    links = {link.name: link for link in describe_chain(model)}
    assert any(text.startswith("identity: each channel takes the same channel") for text in links["b1"].approximations)
    propagated = convert_batchnorm(_SwappedHalves().eval(), torch.randn(2, 3, 8, 8))
    assert not any("identity:" in text for link in describe_chain(propagated) for text in link.approximations)
    dropout = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.1), nn.BatchNorm2d(4))
    converted = convert_batchnorm(dropout.eval(), torch.randn(2, 3, 8, 8), transition="identity")
    assert not any("identity:" in text for link in describe_chain(converted) for text in link.approximations)


def test_a_channel_crop_is_described_as_one() -> None:
    """``F.pad`` with a negative channel width crops; the description read "zero channels +-2/+0"."""
    from bkn_export.chain.steps import ChannelPad

    assert ChannelPad(2, 3).describe() == "zero channels +2/+3"
    assert ChannelPad(-2, 0).describe() == "channels padded / cropped -2/+0"


class _Halves(nn.Module):
    def __init__(self, first: slice, second: slice, channels: int) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.c0, self.b0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(channels, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.b0(self.c0(x))
        return self.b1(self.c1(torch.cat([F.relu(y[:, self.first]), y[:, self.second]], 1)))


def test_concat_parts_that_read_disjoint_channels_of_one_source_are_not_called_correlated() -> None:
    """Channels of one posterior are independent in the model: ``cat([relu(y[:, 4:]), y[:, :4]])`` then a conv is
    exact (measured within 1 %), but carried the "parts share the source" approximation note."""
    disjoint = record_dataflow(_Halves(slice(4, 8), slice(0, 4), 8).eval(), torch.randn(2, 3, 8, 8))
    assert not any("share the source" in note for note in disjoint["b1"].notes)
    overlapping = record_dataflow(_Halves(slice(0, 4), slice(2, 6), 8).eval(), torch.randn(2, 3, 8, 8))
    assert any("share the source 'b0'" in note for note in overlapping["b1"].notes)
    repeated = record_dataflow(_Halves(slice(0, 8), slice(0, 8), 16).eval(), torch.randn(2, 3, 8, 8))
    assert any("share the source 'b0'" in note for note in repeated["b1"].notes)


class _AliasTouched(nn.Module):
    """b1 → relu → (an op on an alias of y) → conv → b2."""

    def __init__(self, touch: str) -> None:
        super().__init__()
        self.touch = touch
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        if self.touch == "requires_grad_":
            y.detach().requires_grad_()
        elif self.touch == "transpose_":
            y.view(y.shape[0], 8, -1).transpose_(1, 2)
        elif self.touch == "unsqueeze_":
            y[:, :, 0].unsqueeze_(2)
        elif self.touch == "eval dropout":
            F.dropout(y.view(y.shape), 0.1, training=False, inplace=True)
        elif self.touch == "out=":
            torch.mul(y[:, :4], 10.0, out=y[:, :4])
        return self.b2(self.c2(y))


def test_ops_that_write_no_values_keep_the_chain_and_out_writes_are_seen() -> None:
    """Metadata-only in-place methods (``requires_grad_``, ``transpose_``, ``unsqueeze_``) and an eval-mode in-place
    dropout write no values: the first version of the write-through check made ``y`` opaque after them. A write through
    ``out=`` (``torch.mul(y[:, :4], 10, out=y[:, :4])``) does change ``y`` and went unseen."""
    for touch in ("requires_grad_", "transpose_", "unsqueeze_", "eval dropout"):
        chain = record_dataflow(_AliasTouched(touch).eval(), torch.randn(2, 3, 8, 8))
        (path,) = chain["b2"].sources
        assert path.normalization == "b1" and chain["b2"].notes == (), touch
    written = record_dataflow(_AliasTouched("out=").eval(), torch.randn(2, 3, 8, 8))
    assert written["b2"].sources == () and "changed in place" in written["b2"].notes[0]


def test_the_train_mode_probe_does_not_reseed_other_devices_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.manual_seed`` in the probe also reseeded every CUDA generator, which ``fork_rng`` (CPU probe) does not
    restore: after a conversion, CUDA training ran from the probe's seed, not the user's."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "manual_seed", lambda seed: calls.append(seed))
    chain = record_dataflow(_between(_Noise()).eval(), torch.randn(2, 3, 8, 8))
    assert chain["4"].sources[0].steps[0] == Identity("train-mode", "2")
    assert calls == []


def test_a_forward_hook_that_changes_a_modules_output_is_followed() -> None:
    """A user's forward hook on the conv (``out * 3 + 1``, returned or in place) ran before the recorder's, which
    took the changed output for the conv's own: the prior was ``conv(y)``'s, 10× low in variance, no note."""
    for in_place in (False, True):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        if in_place:
            model[2].register_forward_hook(lambda module, args, out: out.mul_(3).add_(1))
        else:
            model[2].register_forward_hook(lambda module, args, out: out * 3 + 1)
        (path,) = record_dataflow(model.eval(), torch.randn(2, 3, 8, 8))["3"].sources
        assert [step.describe() for step in path.steps][1:] == ["×3 + 0", "×1 + 1"], (in_place, path.steps)


class _ClampedByATensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0, self.c1, self.b1 = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 1),
            nn.BatchNorm2d(8),
        )
        self.register_buffer("low", torch.linspace(-1, 1, 8).view(1, 8, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.b1(self.c1(torch.clamp(self.b0(self.c0(x)), min=self.low)))


def test_a_clamp_with_a_tensor_bound_is_refused_by_name_not_a_crash() -> None:
    """``torch.clamp(y, min=tensor)`` made the recorder ask a tensor for a truth value: the conversion failed with
    "the example forward ... failed"."""
    chain = record_dataflow(_ClampedByATensor().eval(), torch.randn(2, 3, 8, 8))
    assert chain["b1"].sources == () and "with a tensor bound" in chain["b1"].notes[0]
