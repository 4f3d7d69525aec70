"""Paths whose padding or resample size the forward computed from the wiring example's size.

Cold QA (2026-12-07): a TF-style "same" padding computed by ``F.pad`` from the input's size (geffnet's ``pad_same``,
timm's and efficientnet-pytorch's dynamic-same convs) and ``F.interpolate(size=skip.shape[2:])`` were recorded as
the wiring example's constants. Trained at another size, the network pads or resamples otherwise, and the prior was
silently wrong: tf_efficientnet_b0 wired at 64² and trained at 65² had its strided layers' prior means off by up to
108 % of the scale. Now such steps are marked (``format_chain`` says "as computed at the wiring size"), and a call at
another size counts that path as absent, with a RuntimeWarning once per layer and the reason in ``chain_statistics``.
A padding module's padding (``nn.ZeroPad2d``: the same at every size) and a resample by scale factor stay exact.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bkn_export import chain_statistics, convert_batchnorm, format_chain
from bkn_export.errors import ExportError
from bkn_export.export import export_onnx


def _pad_same(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class _SamePadded(nn.Module):
    """conv → BN → ReLU → TF-"same" pad computed from the size (or a fixed ZeroPad2d) → strided depthwise → BN."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 1)
        self.bn0 = nn.BatchNorm2d(8)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if fixed else None
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn0(self.conv0(x)))
        return self.bn1(self.dw(self.pad(y) if self.pad is not None else _pad_same(y)))


class _Resized(nn.Module):
    """A decoder step: BN at H/2 → interpolate back to the input's size (or by a factor of 2) → conv → BN."""

    def __init__(self, by_size: bool = True) -> None:
        super().__init__()
        self.by_size = by_size
        self.conv0 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn0(self.conv0(x))
        if self.by_size:
            up = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.bn1(self.conv1(up))


def _converted(model: nn.Module, size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return convert_batchnorm(model, torch.randn(2, 3, size, size))


def _statistics(model: nn.Module, size: int) -> tuple[dict[str, object], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = {s.name: s for s in chain_statistics(model.train(), torch.randn(2, 3, size, size))}
    return found, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    ("model", "bound"),
    [(_SamePadded(), "padding [[0, 1], [0, 1]] before 'dw'"), (_Resized(), "resample size (8, 8)")],
    ids=["f.pad-same", "interpolate-size"],
)
def test_a_path_computed_for_the_wiring_size_is_absent_at_another(model: nn.Module, bound: str) -> None:
    model = _converted(model)
    assert "(as given at the wiring size)" in format_chain(model)
    at_example, warned = _statistics(model, 8)
    assert at_example["bn1"].prior_mean is not None and not at_example["bn1"].unrun  # type: ignore[attr-defined]
    assert not warned
    elsewhere, warned = _statistics(model, 9 if isinstance(model, _SamePadded) else 16)
    layer = elsewhere["bn1"]
    assert layer.prior_mean is None and layer.sources == ()  # type: ignore[attr-defined]
    (reason,) = layer.unrun  # type: ignore[attr-defined]
    assert bound in reason and "given at the wiring size" in reason
    assert any("'bn1'" in message and "Wire the chain at the size you train at" in message for message in warned)
    # once per layer, but chain_statistics shows every call
    again, warned = _statistics(model, 7 if isinstance(model, _SamePadded) else 32)
    assert again["bn1"].unrun and not warned  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", [_SamePadded(fixed=True), _Resized(by_size=False)], ids=["zero-pad-module", "scale"])
def test_a_padding_module_or_a_scale_factor_keeps_its_prior_at_any_size(model: nn.Module) -> None:
    model = _converted(model)
    assert "wiring size" not in format_chain(model)
    for size in (8, 12, 16):
        found, warned = _statistics(model, size)
        assert found["bn1"].prior_mean is not None and not found["bn1"].unrun and not warned  # type: ignore[attr-defined]


def test_the_mark_survives_the_saved_wiring() -> None:
    from bkn_export.chain.steps import Affine, Resample, size_bound, step_from_dict
    from bkn_export.moments import ResampleSpec

    padded = Affine("dw", "conv", ((0, 1), (0, 1)), "zeros", False)
    resized = Resample(ResampleSpec(size=(8, 8), mode="bilinear", align_corners=False), None, False)
    for step in (padded, resized):
        assert step_from_dict(step.to_dict()) == step and size_bound(step) is not None
    old = padded.to_dict()
    del old["input_padding_fixed"]  # a wiring saved before the mark: a padding module's, as it was then read
    assert size_bound(step_from_dict(old)) is None


@pytest.mark.parametrize("model", [_SamePadded(), _Resized()], ids=["f.pad-same", "interpolate-size"])
def test_a_training_export_refuses_sizes_the_path_was_not_computed_for(model: nn.Module, tmp_path: Path) -> None:
    """A training-mode file computes the prior it traced: with dynamic_spatial, or at another size than the wiring's,
    it would compute the stale path (where eager training leaves it out). Refused, with the reason; the wiring size
    and inference mode (no prior) export."""
    model = _converted(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match=r"at the wiring example's size.*without dynamic_spatial"):
            export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "a.onnx", mode="training", dynamic_spatial=True)
        with pytest.raises(ExportError, match="another size than the chain was wired at"):
            export_onnx(model, torch.randn(2, 3, 9, 9), tmp_path / "b.onnx", mode="training")
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "c.onnx", mode="training")
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "d.onnx", mode="inference", dynamic_spatial=True)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_a_checkpoint_keeps_no_mark_so_earlier_ones_load() -> None:
    """How the forward computed a step's constants is not part of a checkpoint's wiring (an earlier bkn_export, which
    recorded no mark, saved the same wiring)."""
    model = _converted(_SamePadded())
    state = model.state_dict()
    assert "input_padding_fixed" not in json.dumps(state["bn1._extra_state"], default=str)
    fresh = _converted(_SamePadded())
    fresh.load_state_dict(state)
