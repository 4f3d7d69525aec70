"""A product with a module's scalar or per-channel tensor on a path (ReZero / SkipInit's gain ``h * self.alpha``,
LayerScale's ``h * self.gamma.view(1, -1, 1, 1)``) is a :class:`~bkn_export.chain.steps.ParameterScale` step: the
factor is read at every call, so a learned or scheduled one is followed, and the prior's gradient reaches it. Before
(QA of 2026-12-07, third session) such a product made the layer after it first in its chain, and a Python number in
its place is recorded as the constant it was at wiring (README)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bkn_export import chain_statistics, convert_batchnorm, format_chain
from bkn_export.export import export_onnx
from runtime.parity import run_parity


class _Scaled(nn.Module):
    """``bn2(relu(bn1(conv1 x)) · a)``, ``a`` a float, a 0-dim parameter (of this module or a submodule), a
    per-channel parameter (viewed to (1, C, 1, 1), indexed to (C, 1, 1) from the left, or multiplied in place)."""

    def __init__(self, kind: str, value: float = 3.0) -> None:
        super().__init__()
        self.kind = kind
        self.conv1, self.bn1, self.bn2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        if kind == "float":
            self.alpha: float | nn.Parameter = value
        elif kind == "scalar":
            self.alpha = nn.Parameter(torch.tensor(value))
        elif kind == "submodule":  # a factor another module holds, read in this forward
            self.holder = nn.Module()
            self.holder.alpha = nn.Parameter(torch.tensor(value))
        else:
            self.alpha = nn.Parameter(torch.full((6,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        if self.kind == "view":
            assert isinstance(self.alpha, torch.Tensor)
            h = h * self.alpha.view(1, -1, 1, 1)
        elif self.kind == "index":
            assert isinstance(self.alpha, torch.Tensor)
            h = self.alpha[:, None, None] * h
        elif self.kind == "submodule":
            h = h * self.holder.alpha
        elif self.kind == "inplace":
            assert isinstance(self.alpha, torch.Tensor)
            h = h.mul_(self.alpha.reshape(6, 1, 1))
        else:
            h = h * self.alpha
        return self.bn2(h)


def _converted(kind: str, value: float = 3.0) -> nn.Module:
    torch.manual_seed(0)
    model = _Scaled(kind, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_batchnorm(model, torch.randn(4, 3, 8, 8))


def _prior(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    layer = chain_statistics(model, torch.randn(8, 3, 8, 8))[1]
    assert layer.name == "bn2" and layer.prior_mean is not None and layer.prior_variance is not None
    return layer.prior_mean, layer.prior_variance


@pytest.mark.parametrize("kind", ["scalar", "view", "index", "inplace", "submodule"])
def test_a_parameter_factor_is_a_step_of_the_path_and_predicts_as_the_number_would(kind: str) -> None:
    model = _converted(kind)
    assert ("× 'holder.alpha'" if kind == "submodule" else "× 'alpha'") in format_chain(model)
    mean, variance = _prior(model)
    expected_mean, expected_variance = _prior(_converted("float"))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-6, atol=1e-7)


def test_a_changed_factor_is_followed() -> None:
    """The factor is read at every call: set to 1 (a warm-up schedule), the prior is that of a chain wired at 1,
    where a Python number would have stayed at its recorded 3."""
    model = _converted("scalar", 3.0)
    with torch.no_grad():
        model.alpha.fill_(1.0)
    mean, variance = _prior(model)
    expected_mean, expected_variance = _prior(_converted("float", 1.0))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-6, atol=1e-7)
    stale_mean, _ = _prior(_converted("float", 3.0))
    assert not torch.allclose(mean, stale_mean)


def test_the_priors_gradient_reaches_the_factor() -> None:
    """BatchNorm's output does not depend on the scale of its input (but for eps, made tiny here), so without a prior
    the factor's gradient is about 0; the prior's share of it is not."""

    def alpha_gradient(prior_weight: float | None) -> float:
        torch.manual_seed(0)
        model = _Scaled("scalar")
        model.bn2.eps = 1e-10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_batchnorm(model, torch.randn(4, 3, 8, 8), prior_weight=prior_weight)
        torch.manual_seed(2)
        (model.train()(torch.randn(4, 3, 8, 8)) ** 3).sum().backward()
        assert isinstance(model.alpha, torch.Tensor) and model.alpha.grad is not None
        return float(model.alpha.grad.abs())

    without, wired = alpha_gradient(0.0), alpha_gradient(None)
    assert wired > 1e-2 and without < 1e-3 * wired  # float32 rounding of a sum of 1536 cubes: about 1e-4


def test_a_checkpoint_round_trips_and_a_training_export_agrees(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    model = _converted("view")
    fresh = _converted("view", 1.0)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_prior(fresh)[1], _prior(model)[1], rtol=0.0, atol=0.0)
    example = torch.randn(4, 3, 8, 8)
    path = tmp_path / "scaled_training.onnx"
    export_onnx(model, example, path, mode="training")
    report = run_parity(model, path, {"x": example.numpy()}, runtimes="ort:cpu:all,reference", mode="training")
    assert report.passed, report.runtimes
