"""``bkn_export.fold``: BKN / BatchNorm absorbed into the preceding layer, in PyTorch.

Specification: the folded copy computes the eval-mode output of the original; each
absorbed normalization becomes ``nn.Identity``; the original is untouched; a layer
whose input is not the sole output of a Conv/ConvTranspose/Linear stays, with a reason.
"""

from __future__ import annotations

import pytest
import torch
from test_export_inference import (
    MLP,
    DepthwiseNet,
    ResidualNet,
    SequenceNet,
    SmallCNN,
    TransposedNet,
    converted_resnet,
    randomize_statistics,
)
from torch import Tensor, nn

import bkn_export
from bkn_export import BatchKalmanNorm2d
from bkn_export.errors import ExportError, InvalidStatisticsError

#: folding reorders float32 rounding only
TOLERANCE = 1e-5

CASES = {
    "mlp": (MLP, (6,), {"norm1": "linear", "norm2": "linear"}),
    "small_cnn": (SmallCNN, (3, 8, 8), {"norm1": "conv", "norm2": "conv"}),
    "resnet_post_add": (
        ResidualNet,
        (2, 6, 6),
        {"stem_norm": "conv", "norm1": "conv", "norm2": "conv", "post_add_norm": "standalone"},
    ),
    "depthwise": (DepthwiseNet, (4, 6, 6), {"norm1": "conv", "norm2": "conv"}),
    "conv_transpose_grouped": (lambda: TransposedNet(groups=2), (4, 3, 3), {"norm": "conv_transpose"}),
    # a Linear on (N, L, C) feeds the normalization through a transpose: not foldable in PyTorch
    "bkn1d_ncl": (SequenceNet, (3, 7), {"norm1": "conv", "norm2": "standalone", "norm3": "standalone"}),
}


def eval_output(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    with torch.no_grad():
        out = model.eval()(x)
    model.train(was_training)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_folded_model_matches_eval_output(name: str) -> None:
    factory, shape, kinds = CASES[name]
    model = randomize_statistics(factory()).train()
    folded, report = bkn_export.fold(model, torch.randn(2, *shape))
    assert {r.module: r.kind for r in report} == kinds
    for batch in (1, 3, 64):
        x = torch.randn(batch, *shape) * 2
        with torch.no_grad():
            actual = folded(x)
        assert (actual - eval_output(model, x)).abs().max() <= TOLERANCE


def test_absorbed_layers_become_identity_and_the_original_is_untouched() -> None:
    model = randomize_statistics(SmallCNN())
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    folded, report = bkn_export.fold(model)
    assert isinstance(folded.norm1, nn.Identity) and isinstance(folded.norm2, nn.Identity)
    assert isinstance(model.norm1, BatchKalmanNorm2d) and model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert folded.get_submodule("conv2").bias is not None  # a bias-free conv gains the shift as its bias
    assert [(r.module, r.target) for r in report] == [("norm1", "conv1"), ("norm2", "conv2")]
    assert not folded.training


def test_converted_from_batchnorm_model_folds_fully() -> None:
    model = converted_resnet()
    x = torch.randn(5, 1, 8, 8)
    folded, report = bkn_export.fold(model)
    assert all(r.kind == "conv" for r in report) and len(report) == 6
    assert not any(isinstance(m, bkn_export.nn._BatchKalmanNorm) for m in folded.modules())
    with torch.no_grad():
        assert (folded(x) - eval_output(model, x)).abs().max() <= TOLERANCE


def test_batchnorm_layers_fold_too() -> None:
    model = randomize_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    folded, report = bkn_export.fold(model)
    assert [r.kind for r in report] == ["conv"] and isinstance(folded.get_submodule("1"), nn.Identity)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert (folded(x) - eval_output(model, x)).abs().max() <= TOLERANCE


def test_linear_needs_example_inputs_to_prove_an_n_c_output() -> None:
    _, report = bkn_export.fold(randomize_statistics(MLP()))
    assert {r.kind for r in report} == {"standalone"}
    assert all("example_inputs" in r.detail for r in report)


class _SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.norm(y) + y  # the conv output is used twice: folding would change the second use


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm_a, self.norm_b = nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2), BatchKalmanNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_a(self.conv(x)) + self.norm_b(self.conv(x))


@pytest.mark.parametrize(("factory", "reason"), [(_SharedOutput, "also used"), (_SharedConv, "more than once")])
def test_unsafe_folds_are_refused_with_a_reason(factory: type[nn.Module], reason: str) -> None:
    model = randomize_statistics(factory())
    folded, report = bkn_export.fold(model)
    assert all(r.kind == "standalone" and reason in r.detail for r in report)
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        assert (folded(x) - eval_output(model, x)).abs().max() <= TOLERANCE


def test_invalid_statistics_are_refused() -> None:
    model = randomize_statistics(SmallCNN())
    with torch.no_grad():
        assert model.norm1.running_var is not None
        model.norm1.running_var.fill_(-1.0)
    with pytest.raises(InvalidStatisticsError, match="'norm1'"):
        bkn_export.fold(model)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.norm(self.conv(x))


def test_untraceable_model_is_a_clear_error() -> None:
    with pytest.raises(ExportError, match=r"torch.fx cannot trace _Untraceable.*export_onnx"):
        bkn_export.fold(_Untraceable())
