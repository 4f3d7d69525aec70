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


class _PooledBranch(nn.Module):
    """DeepLab's image pooling: global pool → conv → BN (1 × 1 at every size) → resample to the input's size → conv →
    BN. The source's size never changes; the resample's does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.bn0(self.conv0(F.adaptive_avg_pool2d(x, 1))))
        return self.bn1(self.conv1(F.interpolate(pooled, size=x.shape[2:], mode="nearest")))


class _Viewed(nn.Module):
    """A view whose spatial sizes come from the input: recorded as the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn0(self.conv0(x)))
        n, c, h, w = y.shape
        return self.bn1(self.conv1(y.flatten(2).view(n, c, h, w)))


@pytest.mark.parametrize("model", [_PooledBranch(), _Viewed()], ids=["pooled-source", "view"])
def test_a_stale_path_is_found_by_the_layers_own_input_size_and_reshapes_are_marked(model: nn.Module) -> None:
    """Review of the fix: a source pooled to 1 × 1 keeps its size at every input size, so comparing the source's size
    missed the stale resample (prior mean 38 % of the scale off at 16 × 16); a view's recorded sizes were not marked
    (mean 34 % off). The layer's own input size is compared too, and reshapes are marked."""
    model = _converted(model, 4)
    at_example, warned = _statistics(model, 4)
    assert at_example["bn1"].prior_mean is not None and not warned  # type: ignore[attr-defined]
    elsewhere, warned = _statistics(model, 16)
    assert elsewhere["bn1"].prior_mean is None and elsewhere["bn1"].unrun  # type: ignore[attr-defined]
    assert any("'bn1'" in message for message in warned)


def test_torch_export_with_symbolic_sizes_refuses_a_path_given_at_the_wiring_size() -> None:
    """Review of the fix: ``torch.export`` of the train-mode model with symbolic H, W computed the stale path at every
    size (2.02 off eager at 16 × 16). It raises, naming the path; static sizes export."""
    model = _converted(_SamePadded()).train()
    x = torch.randn(2, 3, 8, 8)
    height, width = torch.export.Dim("height", min=4, max=64), torch.export.Dim("width", min=4, max=64)
    with pytest.raises(Exception, match="symbolic spatial sizes"):
        torch.export.export(model, (x,), dynamic_shapes=({2: height, 3: width},))
    torch.export.export(model, (x,))


def test_a_checkpoint_of_another_wiring_size_names_the_padding_that_differs() -> None:
    """Loading a checkpoint wired at 8 × 8 into the model wired at 9 × 9 (as the warning advises) is refused; the
    error printed the same step list twice ("saved [relu -> conv dw], this model [relu -> conv dw]")."""
    from bkn_export.errors import ChainWiringError

    state = _converted(_SamePadded(), 8).state_dict()
    padding = r"'input_padding': \[\[0, 1\], \[0, 1\]\].*'input_padding': \[\[1, 1\]"
    with pytest.raises(ChainWiringError, match=padding) as error:
        _converted(_SamePadded(), 9).load_state_dict(state)
    # QA of 2026-12-07 (third session): the error then printed two identical wiring summaries and left out the cause
    assert "wired at different input sizes" in str(error.value) and "it was saved with wiring" not in str(error.value)


def test_a_checkpoint_whose_wiring_differs_in_an_option_names_it_once() -> None:
    """A ``prior_source`` mismatch named the option, then printed the same wiring summary for both sides."""
    from bkn_export.errors import ChainWiringError

    state = _converted(_SamePadded()).state_dict()
    model = convert_batchnorm(_SamePadded(), torch.randn(2, 3, 8, 8), prior_source="input")
    with pytest.raises(ChainWiringError, match="prior_source: saved 'output', this model 'input'") as error:
        model.load_state_dict(state)
    assert "it was saved with wiring" not in str(error.value) and "input sizes" not in str(error.value)


class _PooledBothEnds(nn.Module):
    """BN at a pooled 4 × 4, resampled to the input's size, conv, pooled to 4 × 4 again, BN: both layers see 4 × 4 at
    every input size; only the model's input tells the size changed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn0(self.conv0(F.adaptive_avg_pool2d(x, 4))))
        y = self.conv1(F.interpolate(y, size=x.shape[2:], mode="nearest"))
        return self.bn1(F.adaptive_avg_pool2d(y, 4))


class _MeanHead(nn.Module):
    """conv → BN → ReLU → spatial mean (recorded as reshape(N, C)) → Linear → BatchNorm1d: no size kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn1 = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.fc(torch.relu(self.bn0(self.conv0(x))).mean((2, 3))))


def test_a_path_between_two_pooled_layers_is_checked_by_the_models_input() -> None:
    """Second review: both layers' sizes stay 4 × 4, so neither comparison saw the stale resample (prior mean 0.28 sd
    off at 64 × 64); the model's input size is compared too."""
    model = _converted(_PooledBothEnds(), 8)
    found, warned = _statistics(model, 8)
    assert found["bn1"].prior_mean is not None and not warned  # type: ignore[attr-defined]
    found, warned = _statistics(model, 16)
    assert found["bn1"].prior_mean is None and "'conv1' reads [16, 16]" in found["bn1"].unrun[0]  # type: ignore[attr-defined]


def test_a_spatial_mean_head_keeps_its_prior_and_exports_at_any_size(tmp_path: Path) -> None:
    """Second review: ``x.mean((2, 3))`` is recorded as reshape(N, C), which marking every reshape dropped at other
    sizes and refused in dynamic exports; a reshape to no spatial dims keeps no size."""
    model = _converted(_MeanHead(), 8)
    found, warned = _statistics(model, 16)
    assert found["bn1"].prior_mean is not None and not warned  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "head.onnx", mode="training", dynamic_spatial=True)


def test_jit_trace_at_the_wiring_size_is_not_taken_for_symbolic_sizes() -> None:
    """Second review: under ``torch.jit.trace`` sizes are tensors, and every trace of a model with such a path was
    refused as symbolic, at the wiring size too."""
    model = _converted(_SamePadded(), 8).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, torch.randn(2, 3, 8, 8), check_trace=False)


class _HalfResized(nn.Module):
    """``bn2(cat[conv(bn0 x), resample(pool(bn1 x), size=x's)])``: a layer whose concatenated parts come from two
    sources, one of them through a resample given at the wiring size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.conv2(self.bn0(self.conv0(x)))
        resized = F.interpolate(F.adaptive_avg_pool2d(self.bn1(self.conv1(x)), 1), size=x.shape[2:])
        return self.bn2(torch.cat([kept, resized], 1))


def test_a_source_whose_part_is_absent_is_not_listed_among_the_priors_sources() -> None:
    """(Left in the last note, cosmetic): the prior listed every source Gaussian, the one of a part counted as absent
    at another size too, and computed it. Only the sources of the parts delivered are listed."""
    model = _converted(_HalfResized())
    at_example, _ = _statistics(model, 8)
    assert [s.name for s in at_example["bn2"].sources] == ["bn0", "bn1"]  # type: ignore[attr-defined]
    elsewhere, warned = _statistics(model, 16)
    layer = elsewhere["bn2"]
    assert [s.name for s in layer.sources] == ["bn0"] and len(layer.unrun) == 1  # type: ignore[attr-defined]
    assert layer.prior_mean is not None and any("'bn2'" in message for message in warned)  # type: ignore[attr-defined]
