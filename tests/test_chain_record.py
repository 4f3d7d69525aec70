"""record_dataflow: which normalization feeds which, by data flow, with the steps in between.

Each test builds a small network whose topology is known by construction and checks the
recorded LayerRecords (sources, steps, channel counts, combine, notes) against it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bkn_export
from bkn_export import BatchKalmanNorm2d
from bkn_export.chain.record import Combination, LayerRecord, SourcePath, record_dataflow
from bkn_export.chain.steps import (
    STOP_GRADIENT,
    Affine,
    ChannelPad,
    Channels,
    Elementwise,
    Flatten,
    Gate,
    Identity,
    Pool,
    Resample,
    Reshape,
    ScaleShift,
    Subsample,
    apply_steps,
    predict_steps,
)
from bkn_export.errors import ChainWiringError
from bkn_export.norm_act import BatchKalmanNormAct2d


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]


# --------------------------------------------------------------------------- plain chains


def test_conv_bn_relu_chain_links_each_bn_to_the_previous_one_through_relu_and_conv() -> None:
    model = nn.Sequential(*_conv_bn(3, 8), nn.ReLU(), *_conv_bn(8, 16), nn.ReLU(), *_conv_bn(16, 4))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))

    assert chain.names == ["1", "4", "7"]
    first, second, third = chain.layers
    assert first.combine == "none" and first.sources == ()
    assert "reaches the model input" in first.notes[0]
    assert second == LayerRecord(
        "4", (2, 16, 8, 8), (SourcePath("1", (Elementwise("relu", (), "2"), Affine("3")), 16, (2, 8, 8, 8)),), "single"
    )
    assert third.sources[0].normalization == "4"
    assert third.sources[0].steps == (Elementwise("relu", (), "5"), Affine("6"))
    assert third.sources[0].channels == 4


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.SyncBatchNorm, BatchKalmanNorm2d])
def test_every_batchnorm_kind_is_a_normalization(norm: type[nn.Module]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv2d(8, 4, 3), norm(4))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain.names == ["1", "4"]
    assert chain["4"].sources == (SourcePath("1", (Elementwise("relu", (), "2"), Affine("3")), 4, (2, 8, 6, 6)),)


def test_recording_changes_no_statistic_and_restores_every_module_mode() -> None:
    model = nn.Sequential(*_conv_bn(3, 8), nn.ReLU(), *_conv_bn(8, 8), nn.Dropout(0.5))
    model.train()
    model[4].eval()  # a submodule in its own mode
    state = {k: v.clone() for k, v in model.state_dict().items()}

    record_dataflow(model, torch.randn(2, 3, 8, 8))

    assert [m.training for m in model.modules()] == [True, True, True, True, True, False, True]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


class _Functional(nn.Module):
    """Conv–BN pairs joined by functional activations and tensor methods (in place too)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = *_conv_bn(3, 8), *_conv_bn(8, 8)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        if self.activation == "silu":
            x = F.silu(x)
        elif self.activation == "hardswish":
            x = F.hardswish(x)
        elif self.activation == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        elif self.activation == "leaky_relu":
            x = F.leaky_relu(x, 0.2)
        elif self.activation == "relu_":
            x.relu_()
        elif self.activation == "torch.sigmoid":
            x = torch.sigmoid(x)
        elif self.activation == "x * sigmoid(x)":
            x = x * torch.sigmoid(x)
        elif self.activation == "x * relu6(x + 3) / 6":
            x = x * F.relu6(x + 3) / 6
        elif self.activation == "x * tanh(softplus(x))":
            x = torch.tanh(F.softplus(x)) * x
        return self.bn2(self.conv2(x))


@pytest.mark.parametrize(
    ("activation", "expected"),
    [
        ("silu", Elementwise("silu")),
        ("hardswish", Elementwise("hardswish")),
        ("gelu_tanh", Elementwise("gelu", (("approximate", "tanh"),))),
        ("leaky_relu", Elementwise("leaky_relu", (("negative_slope", 0.2),))),
        ("relu_", Elementwise("relu")),
        ("torch.sigmoid", Elementwise("sigmoid")),
        ("x * sigmoid(x)", Elementwise("silu")),
        ("x * tanh(softplus(x))", Elementwise("mish")),
    ],
)
def test_functional_activations_become_elementwise_steps(activation: str, expected: Elementwise) -> None:
    chain = record_dataflow(_Functional(activation), torch.randn(2, 3, 8, 8))
    assert chain["bn2"].sources[0].steps == (expected, Affine("conv2"))


def test_an_activation_written_out_with_scalar_arithmetic_is_recognised() -> None:
    chain = record_dataflow(_Functional("x * relu6(x + 3) / 6"), torch.randn(2, 3, 8, 8))
    steps = chain["bn2"].sources[0].steps
    assert steps == (Elementwise("hardswish"), ScaleShift(6.0, 0.0), ScaleShift(1 / 6, 0.0), Affine("conv2"))


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.SiLU(), Elementwise("silu", (), "act")),
        (nn.Hardswish(), Elementwise("hardswish", (), "act")),
        (nn.GELU(), Elementwise("gelu", (("approximate", "none"),), "act")),
        (nn.ReLU6(inplace=True), Elementwise("relu6", (), "act")),
        (nn.Hardtanh(-2.0, 2.0), Elementwise("hardtanh", (("max_val", 2.0), ("min_val", -2.0)), "act")),
        (nn.PReLU(8), Elementwise("prelu", (), "act")),
    ],
)
def test_activation_modules_become_elementwise_steps_with_their_parameters(module: nn.Module, expected: object) -> None:
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 8, 3))
    model.add_module("bn1", nn.BatchNorm2d(8))
    model.add_module("act", module)
    model.add_module("conv2", nn.Conv2d(8, 8, 1))
    model.add_module("bn2", nn.BatchNorm2d(8))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain["bn2"].sources[0].steps == (expected, Affine("conv2"))


class _Swish(nn.Module):
    """An activation written out by hand, as in older model zoos."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


def test_a_parameter_free_module_is_identified_by_probing_and_named_in_the_notes() -> None:
    model = nn.Sequential(*_conv_bn(3, 8), _Swish(), *_conv_bn(8, 8))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain["4"].sources[0].steps == (Elementwise("silu", (), "2"), Affine("3"))
    assert any("'2' (_Swish) is taken as silu" in note for note in chain.notes)


# --------------------------------------------------------------------------- pooling, resampling, reshapes


class _Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, 8)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2, self.bn2 = _conv_bn(8, 16)
        self.fc = nn.Linear(16, 10)
        self.bn3 = nn.BatchNorm1d(10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.avg_pool2d(self.conv2(x), 2)  # pooling after the feeding conv
        x = self.bn2(x)
        return self.bn3(self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1)))


def test_pooling_before_and_after_the_feeding_conv_are_steps_on_the_path() -> None:
    chain = record_dataflow(_Pooled(), torch.randn(2, 3, 16, 16))

    steps = chain["bn2"].sources[0].steps
    # max pooling moves in front of the ReLU (they commute), then the conv, then the functional avg pool
    assert [type(s) for s in steps] == [Pool, Elementwise, Affine, Pool]
    max_pool, avg_pool = steps[0], steps[3]
    assert isinstance(max_pool, Pool) and isinstance(avg_pool, Pool)
    assert (max_pool.module, max_pool.spec.kind, max_pool.spec.stride) == ("pool", "max", (2, 2))
    assert (avg_pool.module, avg_pool.spec.kind, avg_pool.spec.kernel_size) == (None, "avg", (2, 2))
    head = chain["bn3"].sources[0]
    assert head.normalization == "bn2"
    assert [type(s) for s in head.steps] == [Pool, Flatten, Affine]  # x.mean(keepdim) → flatten → fc
    assert head.steps[-1] == Affine("fc", "linear")


def test_steps_that_combine_positions_made_dependent_are_named_as_approximate() -> None:
    chain = record_dataflow(_Pooled(), torch.randn(2, 3, 16, 16))

    # max pool → ReLU → conv: the ReLU between them keeps the conv's input positions as the max pool left them
    # (overlapping windows); conv → avg pool is one linear run, exact (linear_path_moments): no note
    assert chain["bn2"].notes == (
        "its input: approximate variance: conv 'conv2' combines positions that "
        "max_pool2d(kernel (3, 3) stride (2, 2) padding (1, 1)) 'pool' left dependent or unlike, "
        "and the moments take them as independent and alike",
    )
    assert chain["bn3"].notes == ()  # global pooling right after a normalization: exact


def test_what_stays_approximate_after_linear_runs_is_named_where_format_chain_shows_it() -> None:
    """Upsampling → conv and conv → avg pooling are exact (one linear run): no note. A max pooling
    after a conv (dependent positions) or after SiLU (non-Gaussian values) is named, and
    ``format_chain`` prints the notes."""
    from bkn_export import convert_batchnorm, format_chain

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2),
        nn.BatchNorm2d(4),  # "6": relu → (bilinear → conv → avg pool) as one linear map
        nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.BatchNorm2d(4),  # "9": conv → max pool
        nn.SiLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),  # "13": silu → max pool
    )  # fmt: skip
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain["6"].notes == ()
    assert chain["9"].notes == (
        "its input: approximate variance: max_pool2d(kernel (3, 3) stride (2, 2) padding (1, 1)) '8' combines "
        "positions that conv '7' left dependent or unlike, and the moments take them as independent and alike",
    )
    assert chain["13"].notes == (
        "its input: approximate: max_pool2d(kernel (2, 2)) '11' takes the maximum of silu() '10' outputs as of "
        "Gaussians (it does not commute with that activation)",
    )
    table = format_chain(convert_batchnorm(model, torch.randn(2, 3, 8, 8)))
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert "conv '7' left dependent" in rows["9"] and "maximum of silu() '10' outputs" in rows["13"]


def test_flattening_channels_with_positions_is_a_flatten_step() -> None:
    model = nn.Sequential(*_conv_bn(3, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
    chain = record_dataflow(model, torch.randn(2, 3, 6, 6))
    assert chain["5"].sources[0].steps == (Elementwise("relu", (), "2"), Flatten(1, -1), Affine("4", "linear"))


class _Decoder(nn.Module):
    """A UNet level: skip connection concatenated with an upsampled deeper feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.enc_conv, self.enc_bn = _conv_bn(3, 4)
        self.down_conv, self.down_bn = _conv_bn(4, 6, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec_conv, self.dec_bn = _conv_bn(10, 5)

    def forward(self, x: Tensor) -> Tensor:
        skip = F.relu(self.enc_bn(self.enc_conv(x)))
        deep = F.relu(self.down_bn(self.down_conv(skip)))
        up = F.interpolate(self.up(deep), scale_factor=0.5, mode="bilinear", align_corners=False)
        up = F.interpolate(up, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.dec_bn(self.dec_conv(torch.cat([skip, up], dim=1)))


def test_a_conv_after_a_concatenation_has_a_path_whose_origin_is_the_concatenation() -> None:
    chain = record_dataflow(_Decoder(), torch.randn(2, 3, 8, 8))

    (path,) = chain["dec_bn"].sources
    assert chain["dec_bn"].combine == "single"
    assert path.normalization is None and path.steps == (Affine("dec_conv"),)
    assert isinstance(path.origin, Combination) and path.origin.combine == "concat"
    skip, up = path.origin.sources
    assert (skip.normalization, skip.channels, skip.steps) == ("enc_bn", 4, (Elementwise("relu"),))
    assert (up.normalization, up.channels) == ("down_bn", 6)
    assert [type(s) for s in up.steps] == [Elementwise, Resample, Resample, Resample]
    assert [s.spec.mode for s in up.steps[1:]] == ["nearest", "bilinear", "bilinear"]  # type: ignore[union-attr]
    assert chain["dec_bn"].notes[-1] == (
        "its input: approximate variance: conv 'dec_conv' combines positions that resample(bilinear, size (8, 8) "
        "(as given at the wiring size)) left dependent or unlike, and the moments take them as independent and alike"
    )


class _Split(nn.Module):
    """Channel ranges: slicing, split, chunk (CSP / GhostNet / ShuffleNet-style halves)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = _conv_bn(3, 8)
        self.bn_slice, self.bn_split, self.bn_chunk = nn.BatchNorm2d(3), nn.BatchNorm2d(5), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = F.relu(self.bn(self.conv(x)))
        _, rest = torch.split(x, [3, 5], dim=1)
        first, _ = x.chunk(2, dim=1)
        return self.bn_slice(x[:, 2:5, ...]), self.bn_split(rest), self.bn_chunk(first)


def test_channel_ranges_are_channels_steps() -> None:
    chain = record_dataflow(_Split(), torch.randn(2, 3, 8, 8))
    relu = Elementwise("relu")
    assert chain["bn_slice"].sources == (SourcePath("bn", (relu, Channels(2, 5)), 3, (2, 8, 8, 8)),)
    assert chain["bn_split"].sources[0].steps == (relu, Channels(3, 8))
    assert chain["bn_chunk"].sources[0].steps == (relu, Channels(0, 4))


class _SqueezeExcite(nn.Module):
    """MBConv's gate, written with a clamp-based hard sigmoid and scalar arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, 8)
        self.reduce, self.expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.conv2, self.bn2 = _conv_bn(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.neg(F.silu(self.bn1(self.conv1(x))).neg())
        gate = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        gate = torch.clamp(gate + 3, 0, 6) / 6
        return self.bn2(self.conv2(x * gate))


def test_a_squeeze_excitation_gate_is_a_gate_step_with_its_branch() -> None:
    chain = record_dataflow(_SqueezeExcite(), torch.randn(2, 3, 8, 8))
    steps = chain["bn2"].sources[0].steps
    assert steps[0] == Elementwise("silu")
    assert steps[1:3] == (ScaleShift(-1.0, 0.0), ScaleShift(-1.0, 0.0))
    assert isinstance(steps[3], Gate) and steps[4] == Affine("conv2")
    assert [step.describe() for step in steps[3].branch] == [
        "adaptive_avg_pool2d(output (1, 1))", "conv 'reduce'", "relu()", "conv 'expand'", "×1 + 3",
        "hardtanh(max_val=6.0, min_val=0.0)", "×0.166667 + 0",
    ]  # fmt: skip
    assert chain["bn2"].notes == ()


# --------------------------------------------------------------------------- residual sums and concatenations


class _Block(nn.Module):
    """A ResNet basic block with a projection (conv + BN) or identity shortcut; ``+=`` in place."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return F.relu(out)


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 8), nn.ReLU())
        self.block1 = _Block(8, 8, 1)
        self.block2 = _Block(8, 16, 2)
        self.head_conv, self.head_bn = _conv_bn(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head_bn(self.head_conv(self.block2(self.block1(self.stem(x)))))


def test_a_projection_shortcut_block_feeds_the_next_bn_through_the_sum_of_both_sides() -> None:
    chain = record_dataflow(_ResNet(), torch.randn(2, 3, 8, 8))

    (path,) = chain["head_bn"].sources
    assert path.steps == (Elementwise("relu"), Affine("head_conv"))
    assert path.origin is not None and path.origin.combine == "sum"
    branch, shortcut = path.origin.sources
    assert (branch.normalization, branch.steps) == ("block2.bn2", ())
    assert (shortcut.normalization, shortcut.steps) == ("block2.shortcut.1", ())
    assert chain["head_bn"].notes == ()


def test_an_identity_shortcut_is_walked_back_to_the_normalization_that_describes_it() -> None:
    chain = record_dataflow(_ResNet(), torch.randn(2, 3, 8, 8))

    # block2's projection sees relu(block1.bn2 + stem output): the identity shortcut is the stem's ReLU.
    (path,) = chain["block2.shortcut.1"].sources
    assert path.steps == (Elementwise("relu"), Affine("block2.shortcut.0"))
    assert path.origin is not None
    branch, shortcut = path.origin.sources
    assert branch == SourcePath("block1.bn2", (), 8, (2, 8, 8, 8))
    assert shortcut == SourcePath("stem.1", (Elementwise("relu", (), "stem.2"),), 8, (2, 8, 8, 8))


class _OptionABlock(nn.Module):
    """The CIFAR ResNet "option A" shortcut over a channel increase: strided positions, zero channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_conv, self.stem_bn = _conv_bn(3, 8)
        self.conv1, self.bn1 = _conv_bn(8, 16, stride=2)
        self.conv2, self.bn2 = _conv_bn(16, 16)
        self.head_conv, self.head_bn = _conv_bn(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)))
        return self.head_bn(self.head_conv(out))


def test_an_option_a_shortcut_is_subsampled_and_zero_padded_over_the_new_channels() -> None:
    chain = record_dataflow(_OptionABlock(), torch.randn(2, 3, 8, 8))
    (path,) = chain["head_bn"].sources
    assert path.origin is not None and path.origin.combine == "sum"
    branch, shortcut = path.origin.sources
    assert (branch.normalization, branch.steps) == ("bn2", ())
    assert shortcut.normalization == "stem_bn"
    assert shortcut.steps == (Elementwise("relu"), Subsample((0, 0), (2, 2)), ChannelPad(4, 4))
    # The block's ReLU of a sum with a ReLU addend takes that sum as Gaussian: named (ResNet blocks: variance 6-10 %).
    (note,) = chain["head_bn"].notes
    assert re.search(r"approximate: relu\(\) takes its input, a sum with relu\(\) outputs, as Gaussian", note), note


class _PreActivation(nn.Module):
    """A BN applied directly to a residual sum and to a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = _conv_bn(3, 8)
        self.conv_b, self.bn_b = _conv_bn(3, 8)
        self.bn_sum = nn.BatchNorm2d(8)
        self.bn_cat = nn.BatchNorm2d(16)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))
        return self.bn_sum(torch.add(a, F.silu(b))), self.bn_cat(torch.cat((a, b), dim=1))


def test_a_bn_fed_directly_by_a_sum_or_a_concat_has_one_source_per_addend_or_part() -> None:
    chain = record_dataflow(_PreActivation(), torch.randn(2, 3, 8, 8))

    assert chain["bn_sum"].combine == "sum"
    assert [(s.normalization, s.steps) for s in chain["bn_sum"].sources] == [
        ("bn_a", ()),
        ("bn_b", (Elementwise("silu"),)),
    ]
    assert chain["bn_cat"].combine == "concat"
    assert [(s.normalization, s.channels) for s in chain["bn_cat"].sources] == [("bn_a", 8), ("bn_b", 8)]


class _DenseBlock(nn.Module):
    """DenseNet-style: every layer sees the concatenation of all earlier feature maps."""

    def __init__(self, c_in: int, growth: int, layers: int) -> None:
        super().__init__()
        self.stem_conv, self.stem_bn = _conv_bn(3, c_in)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c_in + i * growth) for i in range(layers))
        self.convs = nn.ModuleList(nn.Conv2d(c_in + i * growth, growth, 3, padding=1) for i in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        features = self.stem_bn(self.stem_conv(x))
        for norm, conv in zip(self.norms, self.convs):
            features = torch.cat([features, conv(F.relu(norm(features)))], 1)
        return features


def test_densenet_concatenations_give_one_source_per_part_in_channel_order() -> None:
    chain = record_dataflow(_DenseBlock(6, 3, 3), torch.randn(2, 3, 8, 8))

    last = chain["norms.2"]
    assert last.combine == "concat"
    assert [(s.normalization, s.channels) for s in last.sources] == [("stem_bn", 6), ("norms.0", 3), ("norms.1", 3)]
    assert last.sources[1].steps == (Elementwise("relu"), Affine("convs.0"))
    assert sum(s.channels for s in last.sources) == last.input_shape[1] == 12


def test_monai_densenet121_needs_no_fallback_beyond_its_first_layer() -> None:
    from monai.networks.nets import DenseNet121

    model = DenseNet121(spatial_dims=2, in_channels=3, out_channels=2)
    chain = record_dataflow(model, torch.randn(1, 3, 64, 64))

    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert chain.names == bns and len(bns) == 121
    assert [layer.name for layer in chain.layers if layer.combine == "none"] == ["features.norm0"]
    assert sum(layer.combine == "concat" for layer in chain.layers) == 58
    for layer in chain.layers[1:]:
        assert layer.notes == (), layer.name
        assert sum(s.channels for s in layer.sources) == layer.input_shape[1], layer.name


def test_monai_basic_unet_skips_and_upsampling_have_full_paths() -> None:
    from monai.networks.nets import BasicUNet

    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, norm="batch", upsample="nontrainable")
    chain = record_dataflow(model, torch.randn(1, 1, 32, 32))

    assert len(chain.layers) == 18
    assert chain.layers[0].combine == "none"
    assert not any("falls back" in note for layer in chain.layers for note in layer.notes)
    decoders = [
        layer for layer in chain.layers if layer.name.startswith("upcat_") and layer.name.endswith("conv_0.adn.N")
    ]
    assert len(decoders) == 4
    for layer in decoders:
        (path,) = layer.sources
        assert path.origin is not None and path.origin.combine == "concat", layer.name
        assert any(isinstance(step, Resample) for step in path.origin.sources[1].steps), layer.name
        # the decoder conv reads upsampled (copied) positions as if independent: named
        assert any("approximate variance: conv" in note for note in layer.notes), layer.name


# --------------------------------------------------------------------------- norm-act layers and conv subclasses


class _BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: normalization, then its own drop and act children."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Dropout(0.1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def test_a_norm_act_layer_s_own_drop_and_act_start_the_next_layer_s_path() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _BatchNormAct2d(8), nn.Conv2d(8, 8, 3), _BatchNormAct2d(8))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))

    assert chain.names == ["1", "3"]
    assert chain["3"].sources[0].steps == (Identity("dropout", "1.drop"), Elementwise("silu", (), "1.act"), Affine("2"))
    assert chain.notes == ()


def test_bkn_norm_act_layers_are_read_like_timm_s() -> None:
    def norm_act(channels: int) -> nn.Module:
        return BatchKalmanNormAct2d(channels, act_layer=nn.Hardswish, drop_layer=lambda: nn.Dropout(0.1))

    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm_act(8), nn.Conv2d(8, 8, 3), norm_act(8))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain["3"].sources[0].steps == (
        Identity("dropout", "1.drop"), Elementwise("hardswish", (), "1.act"), Affine("2"),
    )  # fmt: skip
    assert chain.notes == ()


def test_a_bn_subclass_with_its_own_forward_and_no_act_children_is_named_in_the_notes() -> None:
    class BatchNormRelu(nn.BatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            return F.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormRelu(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain["3"].sources[0].steps == (Affine("2"),)
    assert chain.notes == (
        "'1' (BatchNormRelu) has its own forward, which this recorder cannot see into: its output is taken as the "
        "normalization's (if it also applies an activation, give the module `drop`/`act` children)",
    )


class _SameConv(nn.Conv2d):
    """TensorFlow-style "same" padding, explicit before the conv (efficientnet-pytorch's shape)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__(c_in, c_out, kernel, stride, padding=0, bias=False)
        self.static_padding = nn.ZeroPad2d((kernel - 1) // 2 if stride == 1 else (0, 1, 0, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding)


def test_a_conv_subclass_that_pads_first_is_an_affine_step_with_that_padding() -> None:
    model = nn.Sequential(_SameConv(3, 8, 3, 1), nn.BatchNorm2d(8), _SameConv(8, 8, 5, 1), nn.BatchNorm2d(8))
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain["3"].sources[0].steps == (Affine("2", "conv", ((2, 2), (2, 2))),)


def test_asymmetric_and_reflection_padding_before_a_conv_fold_into_its_step() -> None:
    model = nn.Sequential(
        _SameConv(3, 8, 3, 1), nn.BatchNorm2d(8), _SameConv(8, 8, 3, 2), nn.BatchNorm2d(8),
        nn.ReflectionPad2d((1, 1, 2, 2)), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4),
    )  # fmt: skip
    chain = record_dataflow(model, torch.randn(2, 3, 8, 8))
    assert chain["3"].sources[0].steps == (Affine("2", "conv", ((0, 1), (0, 1))),)
    assert chain["6"].sources[0].steps == (Affine("5", "conv", ((2, 2), (1, 1)), "reflect"),)
    assert chain["6"].notes == ()


def test_padding_that_no_conv_reads_falls_back() -> None:
    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn2(F.pad(self.bn1(self.conv(x)), (1, 1, 1, 1)))

    (note,) = record_dataflow(Padded(), torch.randn(2, 3, 8, 8))["bn2"].notes
    assert "its input zeros padding [1, 1, 1, 1] (F.pad in the model's forward (Padded)) not followed by a conv" in note


# --------------------------------------------------------------------------- what cannot be carried, and limits


class _TokenAttention(nn.Module):
    """Self-attention over positions, (N, C, H, W) in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(channels, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return self.mha(tokens, tokens, tokens)[0].transpose(1, 2).reshape(x.shape)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, 8)
        self.attn = _TokenAttention(8)
        self.conv2, self.bn2 = _conv_bn(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(torch.cat([x, self.attn(x)], 1)))


def test_a_part_through_attention_falls_back_with_a_note_naming_the_module() -> None:
    chain = record_dataflow(_Attention(), torch.randn(2, 3, 4, 4))

    (path,) = chain["bn2"].sources
    assert path.origin is not None
    kept, attended = path.origin.sources
    assert kept.normalization == "bn1" and not kept.falls_back
    assert attended.falls_back
    assert attended.fallback == "Tensor.transpose in 'attn' (_TokenAttention) cannot carry moments"
    (note,) = chain["bn2"].notes
    assert note == (
        "its input → concat part 1 (8 channels) Tensor.transpose in 'attn' (_TokenAttention) cannot carry moments; "
        "this part falls back"
    )


@pytest.mark.parametrize("edit", ["exp_", "setitem"])
def test_an_unknown_in_place_op_becomes_the_tensor_s_producer(edit: str) -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = _conv_bn(3, 8)
            self.conv2, self.bn2 = _conv_bn(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            x = F.relu(self.bn1(self.conv1(x)))
            if edit == "exp_":
                x.exp_()
            else:
                x[:, 0] = 0.0
            return self.bn2(self.conv2(x))

    chain = record_dataflow(InPlace(), torch.randn(2, 3, 8, 8))
    assert chain["bn2"].combine == "none"
    op = "Tensor.exp_" if edit == "exp_" else "Tensor.__setitem__"
    assert f"its input {op} in the model's forward (InPlace) cannot carry moments" in chain["bn2"].notes[0]


def test_a_layer_that_feeds_its_own_second_call_is_first_in_its_chain() -> None:
    """``bn2`` reads ``bn1`` on its first call and its own first call on its second: one wiring from ``bn1``
    would give call 2 a prior from the wrong statistics, so it takes batch statistics alone, with the reason."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = _conv_bn(3, 8)
            self.conv2, self.bn2 = _conv_bn(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            x = self.bn1(self.conv1(x))
            return self.bn2(self.conv2(self.bn2(self.conv2(x))))

    chain = record_dataflow(Twice(), torch.randn(2, 3, 8, 8))
    assert chain.names == ["bn1", "bn2"]
    assert (chain["bn2"].combine, chain["bn2"].sources) == ("none", ())
    assert re.fullmatch(
        r"first in its chain: it runs 2 times per forward, and call 2's input \(from 'bn2'\) does not come from "
        r"the same sources .* as call 1's \(from 'bn1'\); one wiring cannot give both calls their prior",
        chain["bn2"].notes[0],
    )


def test_layers_that_do_not_run_are_named_in_the_chain_notes() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = _conv_bn(3, 8)
            self.spare = nn.BatchNorm2d(8)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.conv(x))

    chain = record_dataflow(Unused(), torch.randn(2, 3, 8, 8))
    assert chain.notes == ("'spare' (BatchNorm2d) did not run on the example inputs; it is not wired",)


def test_multiple_and_keyword_inputs_and_tuple_outputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a, self.bn_a = _conv_bn(3, 4)
            self.conv_b, self.bn_b = _conv_bn(1, 2)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            a, b = self.bn_a(self.conv_a(image)), self.bn_b(self.conv_b(mask))
            return a, {"joint": self.bn(torch.cat([a, F.relu(b)], 1))}

    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8))
    for example in (inputs, {"image": inputs[0], "mask": inputs[1]}):
        chain = record_dataflow(TwoInputs(), example)
        assert chain.names == ["bn_a", "bn_b", "bn"]
        assert [(s.normalization, s.channels) for s in chain["bn"].sources] == [("bn_a", 4), ("bn_b", 2)]
        label = "input[1]" if isinstance(example, tuple) else "input['mask']"
        assert chain["bn_b"].notes == (
            f"first in its chain: no normalization upstream (its input reaches the model input {label})",
        )


def test_a_failing_example_forward_names_the_model_and_what_to_pass() -> None:
    model = nn.Sequential(*_conv_bn(3, 8))
    with pytest.raises(ChainWiringError, match=r"example forward of Sequential failed .*RuntimeError.*a tuple of"):
        record_dataflow(model, torch.randn(2, 5, 8, 8))
    assert model.training  # modes restored after the failure
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_keyword_arguments_of_a_submodule_call_are_its_inputs() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = _conv_bn(3, 8)
            self.act, self.conv2, self.bn2 = nn.SiLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn2(self.conv2(input=self.act(input=self.bn1(self.conv1(x)))))

    chain = record_dataflow(Wrapper(), torch.randn(2, 3, 8, 8))
    assert chain["bn2"].sources[0].steps == (Elementwise("silu", (), "act"), Affine("conv2"))


def test_a_linear_layer_on_tokens_is_not_a_channel_map() -> None:
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Linear(5, 5), nn.BatchNorm1d(4))
    chain = record_dataflow(model, torch.randn(2, 3, 5))
    assert chain["3"].combine == "none"
    assert "'2' (Linear) cannot carry moments (on a (2, 4, 5) input it mixes the last dim" in chain["3"].notes[0]


def test_recorded_values_round_trip_through_json() -> None:
    chains = [record_dataflow(_Decoder(), torch.randn(2, 3, 8, 8)), record_dataflow(_ResNet(), torch.randn(2, 3, 8, 8))]
    chains.append(record_dataflow(_Pooled(), torch.randn(2, 3, 16, 16)))
    for chain in chains:
        for layer in chain.layers:
            restored = LayerRecord.from_dict(json.loads(json.dumps(layer.to_dict())))
            assert restored == layer
            assert hash(restored.sources) == hash(layer.sources)
    assert any(isinstance(s, Reshape) or isinstance(s, Flatten) for s in chains[2]["bn3"].sources[0].steps)


# --------------------------------------------------------------------------- real networks


def test_efficientnet_pytorch_b0_records_with_notes_for_what_it_cannot_carry() -> None:
    from efficientnet_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-b0")
    chain = record_dataflow(model, torch.randn(1, 3, 64, 64))

    assert len(chain.layers) == 49
    # all but the stem: stride-2 convs' asymmetric "same" padding folds into their step, SE gates are Gate steps
    assert [layer.name for layer in chain.layers if layer.combine == "none"] == ["_bn0"]
    assert all(layer.notes == () for layer in chain.layers[1:])
    gated = chain["_blocks.1._bn2"].sources[0].steps
    assert [type(step) for step in gated] == [Elementwise, Gate, Affine]
    assert any("(MemoryEfficientSwish) is taken as silu" in note for note in chain.notes)


def test_geffnet_mobilenetv3_records_with_notes_for_what_it_cannot_carry() -> None:
    geffnet = pytest.importorskip("geffnet")
    chain = record_dataflow(geffnet.mobilenetv3_large_100(pretrained=False), torch.randn(1, 3, 64, 64))

    assert len(chain.layers) == 46
    assert [layer.name for layer in chain.layers if layer.combine == "none"] == ["bn1"]
    assert all(layer.notes == () for layer in chain.layers[1:])
    # the squeeze-excitation gate uses hard_sigmoid = relu6(x + 3) / 6
    gate = next(step for step in chain["blocks.2.0.bn3"].sources[0].steps if isinstance(step, Gate))
    assert gate.branch[-3:] == (ScaleShift(1.0, 3.0), Elementwise("relu6"), ScaleShift(1 / 6, 0.0))
    assert any("(HardSwishMe) is taken as hardswish" in note for note in chain.notes)


# --------------------------------------------------------------------------- recorded paths are consistent


def _unit_moments(path: SourcePath) -> tuple[Tensor, Tensor]:
    channels = path.entry_shape[1]
    return torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)


def _gaussian_of(path: SourcePath) -> tuple[Tensor, Tensor]:
    """Per-channel moments for the source normalization of ``path``, fixed by its name."""
    assert path.normalization is not None
    generator = torch.Generator().manual_seed(sum(map(ord, path.normalization)))
    channels = path.entry_shape[1]
    mean = torch.rand(channels, generator=generator, dtype=torch.float64) * 2 - 1
    return mean, torch.rand(channels, generator=generator, dtype=torch.float64) * 1.5 + 0.5


def _predict(
    path: SourcePath,
    modules: dict[str, nn.Module],
    start: Callable[[SourcePath], tuple[Tensor, Tensor]] = _unit_moments,
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Push the Gaussians ``start`` gives each source through ``path`` (concat: cat; sum: add)."""
    if path.origin is not None:
        parts = [_predict(source, modules, start) for source in path.origin.sources]
        assert len({spatial for _, _, spatial in parts}) == 1, [p[2] for p in parts]
        if path.origin.combine == "concat":
            mean, variance = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            mean, variance = torch.stack([p[0] for p in parts]).sum(0), torch.stack([p[1] for p in parts]).sum(0)
        spatial = parts[0][2]
    else:
        mean, variance = start(path)
        spatial = tuple(path.entry_shape[2:])
    with torch.no_grad():
        return predict_steps(path.steps, mean, variance, spatial, modules)


def _sample(path: SourcePath, modules: dict[str, nn.Module], draws: dict[str, Tensor], count: int) -> Tensor:
    """Run ``path``'s real ops on i.i.d. positions drawn from each source normalization's
    Gaussian (one draw per normalization, shared where it feeds several parts)."""
    if path.origin is not None:
        parts = [_sample(source, modules, draws, count) for source in path.origin.sources]
        start = torch.cat(parts, 1) if path.origin.combine == "concat" else torch.stack(parts).sum(0)
    else:
        assert path.normalization is not None
        if path.normalization not in draws:
            mean, variance = _gaussian_of(path)
            shape = (count, *path.entry_shape[1:])
            view = (1, -1, *[1] * (len(shape) - 2))
            noise = torch.randn(shape, dtype=torch.float64)
            draws[path.normalization] = mean.view(view) + variance.sqrt().view(view) * noise
        start = draws[path.normalization]
    with torch.no_grad():
        return apply_steps(path.steps, start, modules)


def _check_paths_predict_the_layer_input(model: nn.Module, example: Tensor) -> None:
    """Every recorded source predicts moments of its channel count at the layer's input size."""
    chain = record_dataflow(model, example)
    modules = dict(model.named_modules())
    for layer in chain.layers:
        if layer.combine in ("single", "sum"):
            assert all(s.channels == layer.input_shape[1] for s in layer.sources), layer.name
        for source in layer.sources:
            mean, variance, spatial = _predict(source, modules)
            assert mean.shape == variance.shape == (source.channels,), layer.name
            assert tuple(spatial) == layer.input_shape[2:], layer.name
            assert torch.isfinite(mean).all() and (variance >= 0).all(), layer.name


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (_ResNet(), (2, 3, 8, 8)),
        (_Decoder(), (2, 3, 8, 8)),
        (_Pooled(), (2, 3, 16, 16)),
        (_DenseBlock(6, 3, 3), (2, 3, 8, 8)),
    ],
    ids=["resnet", "decoder", "pooled", "dense"],
)
def test_recorded_paths_predict_moments_of_the_layer_input_size(model: nn.Module, shape: tuple[int, ...]) -> None:
    _check_paths_predict_the_layer_input(model, torch.randn(shape))


@pytest.mark.slow
@pytest.mark.parametrize("network", ["densenet121", "basic_unet", "unet_residual", "efficientnet-b0", "mobilenetv3"])
def test_zoo_recorded_paths_predict_moments_of_the_layer_input_size(network: str) -> None:
    from monai.networks.nets import BasicUNet, DenseNet121, UNet

    models = {
        "densenet121": lambda: DenseNet121(spatial_dims=2, in_channels=3, out_channels=2),
        "basic_unet": lambda: BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, norm="batch"),
        "unet_residual": lambda: UNet(
            spatial_dims=2, in_channels=3, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2,
            norm="batch",
        ),
        "efficientnet-b0": lambda: __import__("efficientnet_pytorch").EfficientNet.from_name("efficientnet-b0"),
        "mobilenetv3": lambda: __import__("geffnet").mobilenetv3_large_100(pretrained=False),
    }  # fmt: skip
    _check_paths_predict_the_layer_input(models[network](), torch.randn(1, 3, 64, 64))


def _has_max_pool(path: SourcePath) -> bool:
    nested = path.origin is not None and any(_has_max_pool(source) for source in path.origin.sources)
    return nested or any(isinstance(step, Pool) and "max" in step.spec.kind for step in path.steps)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["densenet121", "basic_unet", "efficientnet-b0", "mobilenetv3"])
def test_zoo_paths_predict_a_monte_carlo_of_the_real_modules(network: str) -> None:
    """Each layer with a full path whose maps have >= 64 positions: the sources' Gaussians pushed
    through the real modules (``apply``) match ``predict`` within 10 % (mean: of max(|mean|, std);
    variance: relative, per channel). Paths noted as approximate or with a max pooling (an
    approximation of the moments) are left out; so are smaller maps, where this Monte Carlo's
    own noise passes 10 % (1024 draws at 2x2: up to 20 %)."""
    from monai.networks.nets import BasicUNet, DenseNet121

    models = {
        "densenet121": lambda: DenseNet121(spatial_dims=2, in_channels=3, out_channels=2),
        "basic_unet": lambda: BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, norm="batch"),
        "efficientnet-b0": lambda: __import__("efficientnet_pytorch").EfficientNet.from_name("efficientnet-b0"),
        "mobilenetv3": lambda: __import__("geffnet").mobilenetv3_large_100(pretrained=False),
    }
    torch.manual_seed(0)
    model = models[network]().double().eval()
    chain = record_dataflow(model, torch.randn(1, 3, 64, 64, dtype=torch.float64))
    modules = dict(model.named_modules())
    checked = 0
    for layer in chain.layers:
        positions = math.prod(layer.input_shape[2:])
        if layer.combine == "none" or layer.notes or positions < 64 or any(map(_has_max_pool, layer.sources)):
            continue
        draws: dict[str, Tensor] = {}
        count = max(8, 16384 // positions)
        parts = [_sample(source, modules, draws, count) for source in layer.sources]
        predicted = [_predict(source, modules, _gaussian_of) for source in layer.sources]
        if layer.combine == "concat":
            sample = torch.cat(parts, 1)
            mean, variance = torch.cat([p[0] for p in predicted]), torch.cat([p[1] for p in predicted])
        else:
            sample = torch.stack(parts).sum(0)
            mean, variance = (
                torch.stack([p[0] for p in predicted]).sum(0),
                torch.stack([p[1] for p in predicted]).sum(0),
            )
        dims = [0, *range(2, sample.dim())]
        mc_mean, mc_variance = sample.mean(dims), sample.var(dims, correction=0)
        scale = torch.maximum(mc_mean.abs(), mc_variance.sqrt())
        assert ((mean - mc_mean).abs() <= 0.1 * scale).all(), layer.name
        assert ((variance - mc_variance).abs() <= 0.1 * mc_variance).all(), layer.name
        checked += 1
    assert checked >= 8


class _IdentitySkipBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


def test_a_residual_stack_deeper_than_the_recursion_limit_records_every_addend_in_order() -> None:
    """n identity-skip blocks nest n sums; flattening them recursed once per block (RecursionError past ~1000)."""
    import sys

    blocks = sys.getrecursionlimit() + 100
    model = nn.Sequential(nn.Conv2d(1, 2, 1), *[_IdentitySkipBlock() for _ in range(blocks)])
    records = record_dataflow(model, torch.randn(2, 1, 2, 2)).layers
    assert len(records) == blocks
    last = records[-1]
    assert last.combine == "single"
    (path,) = last.sources
    assert path.origin is not None and path.origin.combine == "sum"
    addends = path.origin.sources
    # the stem conv's output (no normalization upstream), then every earlier block's relu(bn(...)) in order
    assert len(addends) == blocks
    assert addends[0].falls_back and "model input" in addends[0].fallback
    assert [addend.normalization for addend in addends[1:]] == [f"{index}.bn" for index in range(1, blocks)]


class _SlicedConcat(nn.Module):
    """``cat([relu(bn(conv x)), x, relu(bn(conv x))])[:, lo:hi]`` then a conv and a normalization (GhostNet's
    ``cat([x1, x2])[:, :oup]``, with the model input as a middle part)."""

    def __init__(self, lo: int, hi: int, through_concat: bool = True) -> None:
        super().__init__()
        self.lo, self.hi, self.through_concat = lo, hi, through_concat
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(hi - lo, 5, 3, padding=1), nn.BatchNorm2d(5))

    def forward(self, x: Tensor) -> Tensor:
        if self.through_concat:
            y = torch.cat([self.a(x), x, self.b(x)], dim=1)[:, self.lo : self.hi]
        else:  # the same channels taken from the one branch they come from
            y = self.a(x)[:, self.lo : self.hi] if self.hi <= 4 else self.b(x)[:, self.lo - 7 : self.hi - 7]
        return self.head(y)


@pytest.mark.parametrize(("lo", "hi", "source"), [(0, 4, "a.1"), (1, 3, "a.1"), (7, 9, "b.1")])
def test_a_channel_slice_of_a_concat_reads_only_the_parts_it_reaches(lo: int, hi: int, source: str) -> None:
    """The part that reaches the model input is outside the slice: it no longer makes the sliced channels fall back,
    and the prior is the one of the same channels taken from their branch directly."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    (record,) = [layer for layer in record_dataflow(_SlicedConcat(lo, hi), x).layers if layer.name == "head.1"]
    (path,) = record.sources
    assert path.normalization == source and not path.falls_back and path.origin is None
    assert not any("model input" in note for note in record.notes)
    torch.manual_seed(0)
    through = _SlicedConcat(lo, hi)
    direct = _SlicedConcat(lo, hi, through_concat=False)
    direct.load_state_dict(through.state_dict())
    priors = []
    for model in (through, direct):
        with warnings.catch_warnings():  # the direct model does not run the other branch
            warnings.filterwarnings("ignore", "'[ab].1' did not run on the example inputs", UserWarning)
            converted = bkn_export.convert_batchnorm(model, x)
        (head,) = [s for s in bkn_export.chain_statistics(converted, x) if s.name == "head.1"]
        assert head.prior_mean is not None and head.prior_variance is not None
        priors.append((head.prior_mean, head.prior_variance))
    torch.testing.assert_close(priors[0], priors[1], rtol=0, atol=0)


def test_a_channel_slice_that_reaches_a_falling_back_part_still_falls_back_by_name() -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    (record,) = [layer for layer in record_dataflow(_SlicedConcat(3, 5), x).layers if layer.name == "head.1"]
    (path,) = record.sources
    assert path.origin is not None and [part.normalization for part in path.origin.sources] == ["a.1", None]
    assert any("reaches the model input" in note for note in record.notes)


class _AsTensorSkip(nn.Module):
    """MONAI's HighResBlock: ``y + torch.as_tensor(skip)``, which for a tensor is that tensor."""

    def __init__(self, wrapped: bool) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn0(self.conv0(x))
        y = self.conv1(torch.relu(self.bn1(x)))
        return self.bn2(y + (torch.as_tensor(x) if self.wrapped else x))


def test_torch_as_tensor_of_a_tensor_is_transparent_to_the_chain() -> None:
    """It fell back ("torch.as_tensor … cannot carry moments"): 9 of HighResNet's 21 layers had no prior."""
    links = {}
    for wrapped in (False, True):
        torch.manual_seed(0)
        model = bkn_export.convert_batchnorm(_AsTensorSkip(wrapped).eval(), torch.randn(2, 3, 16, 16))
        links[wrapped] = next(link for link in bkn_export.describe_chain(model) if link.name == "bn2")
    assert links[True].transition == links[False].transition == "propagate"
    assert links[True].sources == links[False].sources


class _ZeroChannels(nn.Module):
    """The option A shortcut as MONAI's ResNet (``shortcut_type="A"``) writes it: ``torch.cat([x.data, zeros], 1)``
    with a tensor of zeros made in the forward, in one of several spellings; ``"pad"`` is ``F.pad`` over the
    channels, which the chain carried before."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.stem_conv, self.stem_bn = _conv_bn(3, 8)
        self.conv1, self.bn1 = _conv_bn(8, 16, stride=2)
        self.conv2, self.bn2 = _conv_bn(16, 16)
        self.head_conv, self.head_bn = _conv_bn(16, 4)

    def shortcut(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        shape = (x.shape[0], 4, *x.shape[2:])
        if self.spelling == "pad":
            return F.pad(x, (0, 0, 0, 0, 4, 4))
        if self.spelling == "data":
            zeros = torch.zeros(shape, dtype=x.dtype, device=x.device)
            return torch.cat([zeros, x.data, zeros], 1)
        if self.spelling == "new_zeros":
            return torch.cat([x.new_zeros(shape), x, x.new_zeros(shape)], dim=1)
        if self.spelling == "full":
            return torch.cat([torch.full(shape, 0.0), torch.cat([x, torch.zeros_like(x[:, :4])], 1)], 1)
        raise AssertionError(self.spelling)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out = F.relu(out + self.shortcut(x))
        return self.head_bn(self.head_conv(out))


@pytest.mark.parametrize("spelling", ["data", "new_zeros", "full"])
def test_zero_channels_concatenated_are_zero_padding_and_tensor_data_keeps_the_values(spelling: str) -> None:
    """MONAI's ResNet ``shortcut_type="A"`` ended the chain at ``torch.zeros`` and ``x.data`` ("__get__"): the layer
    after every such block ran as BatchNorm. Zero parts of a channel concat are :class:`ChannelPad` of their
    neighbour (exact: mean 0, variance 0), so the chain, its prior and a train step are those of the ``F.pad``
    spelling, bit for bit."""
    torch.manual_seed(0)
    reference = _ZeroChannels("pad")
    model = _ZeroChannels(spelling)
    model.load_state_dict(reference.state_dict())
    example = torch.randn(2, 3, 8, 8)
    (path,) = record_dataflow(model, example)["head_bn"].sources
    assert path.origin is not None and path.origin.combine == "sum"
    shortcut = path.origin.sources[1]
    assert (shortcut.normalization, shortcut.steps[-1], shortcut.channels) == ("stem_bn", ChannelPad(4, 4), 16)
    for net in (reference, model):
        bkn_export.convert_batchnorm(net, example)
    if spelling == "data":  # x.data stops the gradient: a stop-gradient step on the shortcut, the same values
        assert shortcut.steps[-2] == Identity(STOP_GRADIENT)
        assert "detach (the prior's gradient stops too) → zero channels" in bkn_export.format_chain(model)
    else:
        assert bkn_export.format_chain(model) == bkn_export.format_chain(reference)
    data = torch.randn(2, 3, 8, 8)
    outputs, grads = [], []
    for net in (reference, model):
        out = net.train()(data)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([p.grad for p in net.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # running statistics; the saved wiring leaves stop-gradient steps out
    if spelling != "data":  # x.data detaches the model's own shortcut: its gradients are another model's
        for a, b in zip(*grads):
            assert a is not None and b is not None and torch.equal(a, b)


def test_a_concatenated_constant_other_than_zeros_or_zeros_written_in_place_still_fall_back() -> None:
    """Only untouched zeros are padding: ones carry a mean of 1; zeros written through a view are no longer zeros."""

    class Concat(nn.Module):
        def __init__(self, fill: str) -> None:
            super().__init__()
            self.fill = fill
            self.conv0, self.bn0 = _conv_bn(3, 4)
            self.conv1, self.bn1 = _conv_bn(8, 4)

        def forward(self, x: Tensor) -> Tensor:
            x = self.bn0(self.conv0(x))
            other = torch.ones_like(x) if self.fill == "ones" else torch.zeros_like(x)
            if self.fill == "written":
                other[:, :2] = x[:, :2]
            return self.bn1(self.conv1(torch.cat([x, other], 1)))

    for fill, op in (("ones", "torch.ones_like"), ("written", "Tensor.__setitem__")):
        record = record_dataflow(Concat(fill), torch.randn(2, 3, 8, 8))["bn1"]
        assert record.sources[0].falls_back or any(
            part.falls_back for part in (record.sources[0].origin.sources if record.sources[0].origin else ())
        ), fill
        assert op in record.notes[0], (fill, record.notes)


class _SharedNorm(nn.Module):
    """``bn2`` runs on two inputs per forward. ``"sources"``: from ``bna`` then from ``bnb`` (call 2 must not read
    ``bna``'s statistics); ``"stale"``: ``bn1`` runs on both inputs before ``bn2`` reads the first (the chain
    would read ``bn1``'s second call); ``"repeat"``: one block applied twice, each call of ``bn2`` fed by the call
    of ``bn1`` just before it (one wiring serves both)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.la, self.bna = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.lb, self.bnb = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.l2, self.bn2 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        with torch.no_grad():
            self.bnb.weight.fill_(4.0)
            self.bnb.bias.fill_(3.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.pattern == "sources":
            a, b = self.bna(self.la(x)), self.bnb(self.lb(x))
        elif self.pattern == "stale":
            a, b = self.bna(self.la(x)), self.bna(self.la(2 * x))
        else:
            a = self.bn2(self.l2(self.bna(self.la(x))))
            return a, self.bn2(self.l2(self.bna(self.la(a))))
        return self.bn2(self.l2(F.relu(a))), self.bn2(self.l2(F.relu(b)))


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (
            "sources",
            r"it runs 2 times per forward, and call 2's input \(from 'bnb'\) does not come from the same "
            r"sources .* as call 1's \(from 'bna'\); one wiring cannot give both calls their prior",
        ),
        (
            "stale",
            r"call 1 of 2: its input comes from call 1 of 'bna', but call 2 of 'bna' runs after that and "
            r"before it",
        ),
    ],
)
def test_a_layer_whose_calls_need_different_priors_is_first_in_its_chain(pattern: str, why: str) -> None:
    """One wiring serves every call of a layer, and within a forward the chain reads each source's latest
    statistics: where a call's right prior would differ from what that gives (a shared norm fed by two other
    norms, a source called again before the layer reads it), the layer takes batch statistics alone (BatchNorm)
    with the reason, instead of a prior from the wrong statistics. The whole converted model then computes what
    the BatchNorm model computes in training mode."""
    torch.manual_seed(0)
    model = _SharedNorm(pattern)
    x = torch.randn(4, 8)
    layer = {record.name: record for record in record_dataflow(model, x).layers}["bn2"]
    assert (layer.combine, layer.sources) == ("none", ())
    assert len(layer.notes) == 1 and re.fullmatch(f"first in its chain: {why}.*", layer.notes[0])
    reference = model.train()(x)
    unused = pytest.warns(UserWarning, match="'bnb' did not run") if pattern == "stale" else contextlib.nullcontext()
    with unused:
        converted = bkn_export.convert_batchnorm(copy.deepcopy(model), x).train()
    assert "bn2    batchnorm (first in chain)" in bkn_export.format_chain(converted)
    for got, expected in zip(converted(x), reference, strict=True):
        torch.testing.assert_close(got, expected)


def test_a_layer_called_again_from_the_same_sources_keeps_its_prior() -> None:
    """A block applied twice: each call of ``bn2`` reads the call of ``bna`` just before it, through the same
    steps at the same shapes, so one wiring gives both calls their prior (noted); ``bna`` is fed by the input,
    then by ``bn2``: its calls differ, and it is first in its chain."""
    torch.manual_seed(0)
    layers = {record.name: record for record in record_dataflow(_SharedNorm("repeat"), torch.randn(4, 8)).layers}
    assert layers["bn2"].combine == "single" and layers["bn2"].sources[0].normalization == "bna"
    assert layers["bn2"].notes == ("runs 2 times per forward from the same sources; wired by its first call",)
    assert layers["bna"].combine == "none"
    assert re.fullmatch(
        r"first in its chain: it runs 2 times per forward, and call 2's input \(from 'bn2'\) does not come from "
        r"the same sources .* as call 1's \(from no normalization\); one wiring cannot give both calls their prior",
        layers["bna"].notes[0],
    )


class _SharedOnTwoInputs(nn.Module):
    """``bn`` after one conv on two inputs (no normalization upstream of either call), or, with ``relu``, after
    ``bn0`` on the first call and after ``relu(bn0)`` on the second (the same source, another step)."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.relu = relu
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4 if relu else 3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.relu:
            return self.bn(self.conv(x)), self.bn(self.conv(2 * x))
        y = self.bn0(self.conv0(x))
        return self.bn(self.conv(y)), self.bn(self.conv(F.relu(y)))


def test_the_notes_of_a_layer_called_twice_say_what_differs() -> None:
    """QA of the multi-call rule: where no call has a normalization upstream the note said "one wiring cannot give
    both calls their prior" (nothing could be wired anyway); where calls differ by a step only it named the same
    source twice. The first now gets the plain first-in-chain note, the second says the steps or shapes differ."""
    plain = record_dataflow(_SharedOnTwoInputs(relu=False), torch.randn(2, 3, 8, 8))["bn"]
    assert plain.combine == "none"
    assert plain.notes[0].startswith("first in its chain: no normalization upstream"), plain.notes
    stepped = record_dataflow(_SharedOnTwoInputs(relu=True), torch.randn(2, 3, 8, 8))["bn"]
    assert stepped.combine == "none"
    assert re.fullmatch(
        r"first in its chain: it runs 2 times per forward, and call 2's input \(from 'bn0'\) comes from the same "
        r"sources as call 1's but through other steps or at other shapes; one wiring cannot give both calls their "
        r"prior",
        stepped.notes[0],
    )


class _SliceAfterAConcat(nn.Module):
    """``n`` reads only ``b``'s channels of ``cat([a(x), b(2x)])``; ``a`` runs again before ``n``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.c, self.n = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.cat([self.a(x), self.b(x * 2)], 1)
        again = self.a(x * 3)
        return self.n(self.c(y[:, 4:])), again


def test_a_source_called_again_outside_the_channels_read_keeps_the_prior() -> None:
    """QA of the stale-source rule: a call of 'a' after the concatenation made 'n' first in its chain, though 'n'
    reads only 'b''s channels; only the sources the walked paths keep count now (the rule for 'b' stands)."""
    layer = record_dataflow(_SliceAfterAConcat(), torch.randn(8, 4, 5, 5))["n"]
    assert layer.combine == "single" and layer.sources[0].normalization == "b"
    assert layer.notes == ()
