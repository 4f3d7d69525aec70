"""``bkn_export.fold``: BKN / BatchNorm absorbed into the preceding layer, in PyTorch.

Specification: the folded copy computes the eval-mode output of the original; each
absorbed normalization becomes ``nn.Identity``; the original is untouched; a layer
whose input is not the sole output of a Conv/ConvTranspose/Linear stays, with a reason.
"""

from __future__ import annotations

from typing import Any

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


class _StdConv(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d): the forward uses a function of the weight, not the weight."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def _std_conv() -> nn.Module:
    return nn.Sequential(_StdConv(2, 2, 1), BatchKalmanNorm2d(2))


class _AliasedNorm(nn.Module):
    """The normalization under two names; the forward calls the second (fx names the call by the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2)
        self.alias = self.norm

    def forward(self, x: Tensor) -> Tensor:
        return self.alias(self.conv(x))


def _aliased_norm() -> nn.Module:
    return _AliasedNorm()


def _hooked_conv() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2))
    model[0].register_forward_hook(lambda _m, _i, out: out * 2 + 1)
    return model


def _parametrized_conv() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


class _TiedDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight)


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        (_std_conv, "overrides its class's forward"),
        (_aliased_norm, "registered under several names"),
        (_hooked_conv, "has forward hooks"),
        (_parametrized_conv, "is parametrized"),
        (_TiedDecoder, "reads a tensor of 'conv' directly"),
    ],
    ids=["subclass-forward", "alias", "hook", "parametrized", "tied-weight"],
)
def test_folds_the_rules_cannot_see_through_are_refused(factory: Any, reason: str, tmp_path: Any) -> None:
    """A reviewer's cases: the fp16 export and fold() folded each and changed the output (by up to 12 at |y| 20),
    or crashed on a parametrized conv. Each stays standalone, and the fp16 file computes the model."""
    import numpy as np
    import onnxruntime as ort

    from bkn_export.export import export_onnx

    model = randomize_statistics(factory()).eval()
    x = torch.randn(2, 2, 3, 3)
    folded, report = bkn_export.fold(model, x)
    (record,) = [r for r in report if r.module in ("1", "norm")]
    assert record.kind == "standalone" and reason in record.detail, record
    with torch.no_grad():
        expected = eval_output(model, x)
        assert (folded(x) - expected).abs().max() <= TOLERANCE
    path = tmp_path / "half.onnx"
    export_onnx(model, x, path, mode="inference", fp16=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.half().numpy()})
    np.testing.assert_allclose(got.astype(np.float64), expected.double().numpy(), rtol=5e-3, atol=5e-3)


def test_the_fp16_export_checks_its_fold_and_folds_in_the_graph_when_it_changed_the_model(tmp_path: Any) -> None:
    """A global forward hook (which no rule sees) changes each conv's output: the float64 check of the PyTorch-side
    fold catches it, warns, and the file is folded from the graph instead; it computes the model."""
    import numpy as np
    import onnxruntime as ort

    from bkn_export.export import export_onnx

    model = randomize_statistics(nn.Sequential(nn.Conv2d(2, 2, 1), BatchKalmanNorm2d(2))).eval()
    x = torch.randn(2, 2, 3, 3)

    def shift(module: nn.Module, _inputs: Any, out: Tensor) -> Tensor | None:
        return out + 1.0 if isinstance(module, nn.Conv2d) else None

    handle = torch.nn.modules.module.register_module_forward_hook(shift)
    try:
        with torch.no_grad():
            expected = eval_output(model, x)
        path = tmp_path / "half.onnx"
        with pytest.warns(UserWarning, match="PyTorch-side fold changed the model's output"):
            export_onnx(model, x, path, mode="inference", fp16=True)
    finally:
        handle.remove()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.half().numpy()})
    np.testing.assert_allclose(got.astype(np.float64), expected.double().numpy(), rtol=5e-3, atol=5e-3)


def test_invalid_statistics_are_refused() -> None:
    model = randomize_statistics(SmallCNN())
    with torch.no_grad():
        assert model.norm1.running_var is not None
        model.norm1.running_var.fill_(-1.0)
    with pytest.raises(InvalidStatisticsError, match="'norm1'"):
        bkn_export.fold(model)


def test_a_zero_variance_with_eps_zero_is_refused_not_folded_to_infinite_weights(tmp_path: Any) -> None:
    """It folded to 36 non-finite weights without a word (a reviewer); both export paths check the statistics."""
    from bkn_export.export import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0)).eval()
    with torch.no_grad():
        model[1].running_var[2] = 0.0
    with pytest.raises(InvalidStatisticsError, match=r"running_var \+ eps is 0 at channels \[2\] \(eps=0\)"):
        bkn_export.fold(model)
    with pytest.raises(InvalidStatisticsError, match="Set eps > 0"):
        export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "m.onnx", mode="inference")
    assert not (tmp_path / "m.onnx").exists()


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
