"""The reference-noise floor (runtime.noise): measured float32 error of the reference, and what it may excuse.

Specification: ``reference_noise`` is ``max |r32 - r64|`` of the parity reference (the
export mode's semantics) against a float64 copy, the model left as found;
``noise_tolerance`` never goes below the dtype default and keeps its rtol; under it the
float64 truth itself passes against the float32 reference (which the default rule can
fail on a deep network), while a weight changed by 1e-3 relative still fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from runtime.compare import DEFAULT_TOLERANCES, compare_output
from runtime.errors import BKNInputError
from runtime.noise import NOISE_FACTOR, ReferenceNoise, noise_tolerance, reference_noise


def _deep(depth: int = 24, width: int = 32) -> tuple[nn.Module, np.ndarray]:
    """``depth`` × (Conv 3x3 → BatchNorm → ReLU), converted to BKN, eval statistics away from 0 / 1; (model, x).

    Weights are scaled up (gain 2) so activations grow through depth, as float32 rounding
    in a real network does relative to small output elements.
    """
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for index in range(depth):
        layers += [nn.BatchNorm2d(width), nn.ReLU()]
        if index < depth - 1:
            layers.append(nn.Conv2d(width, width, 3, padding=1))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 64)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.8, 1.6)
                module.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 3, 8, 8)
    return convert_batchnorm(model.eval(), x).eval(), x.numpy()


def test_noise_is_the_distance_of_the_float32_reference_from_float64_and_leaves_the_model_alone() -> None:
    model, x = _deep()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    before = {k: v.detach().clone() for k, v in tensors.items()}
    (noise,) = reference_noise(model, [x], "inference").values()
    with torch.no_grad():
        r32 = model(torch.from_numpy(x)).double().numpy()
        r64 = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    assert noise.max_abs == pytest.approx(np.abs(r32 - r64).max(), rel=1e-12)
    assert noise.scale == pytest.approx(np.sqrt(np.mean(r64**2)), rel=1e-12)
    assert 0 < noise.rms <= noise.max_abs
    assert not model.training
    for key, value in (dict(model.named_parameters()) | dict(model.named_buffers())).items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


def test_training_mode_noise_uses_batch_statistics() -> None:
    model, x = _deep(depth=4)
    eval_noise = reference_noise(model, [x], "inference")["output_0"]
    train_noise = reference_noise(model, [x], "training")["output_0"]
    assert train_noise.scale != pytest.approx(eval_noise.scale, rel=1e-3)  # a different function was measured
    assert not model.training  # the training reference ran on a copy


def test_tolerance_is_factor_times_noise_never_below_the_default_and_keeps_rtol() -> None:
    default = DEFAULT_TOLERANCES["float32"]
    small = noise_tolerance(ReferenceNoise("y", max_abs=1e-8, rms=1e-9, scale=1.0))
    assert small == default
    large = noise_tolerance(ReferenceNoise("y", max_abs=1e-4, rms=1e-5, scale=1.0))
    assert large.atol == pytest.approx(NOISE_FACTOR * 1e-4) and large.rtol == default.rtol


def test_the_float64_truth_passes_under_the_floor_and_a_tampered_weight_fails() -> None:
    model, x = _deep()
    (noise,) = reference_noise(model, [x], "inference").values()
    tolerance = noise_tolerance(noise)
    with torch.no_grad():
        r32 = model(torch.from_numpy(x)).numpy()
        r64 = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
        tampered = copy.deepcopy(model)
        weight = tampered[-1].weight
        weight.mul_(1 + 1e-3)
        r_tampered = tampered(torch.from_numpy(x)).numpy()
    assert compare_output("y", r32, r64, tolerance).passed
    result = compare_output("y", r32, r_tampered, tolerance)
    assert not result.passed, (result.max_abs_error, tolerance)


def test_a_model_that_cannot_run_in_float64_says_so() -> None:
    class Float32Only(nn.Module):
        """Its matrix is a plain attribute, not a parameter or buffer: ``.double()`` leaves it float32."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.matrix = torch.eye(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.mm(self.linear(x), self.matrix)

    with pytest.raises(BKNInputError, match="does not run in float64"):
        reference_noise(Float32Only(), [np.ones((2, 4), np.float32)])
