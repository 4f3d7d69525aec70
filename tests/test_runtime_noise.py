"""The reference-noise floor (runtime.noise): measured float32 error of the reference, and what it may excuse.

Specification: ``reference_noise`` is ``max |r32 - r64|`` of the parity reference (the
export mode's semantics) against a float64 copy, the model left as found;
``noise_tolerance`` never goes below the dtype default and keeps its rtol; under it the
float64 truth itself passes against the float32 reference (which the default rule can
fail on a deep network), while a weight changed by 1e-3 relative still fails.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_runtime_support import exported_digits
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.cli import main
from bkn_export.export import export_onnx
from runtime.compare import DEFAULT_TOLERANCES, Tolerance, TolerancePolicy, compare_output
from runtime.errors import BKNInputError
from runtime.noise import NOISE_FACTOR, ReferenceNoise, noise_tolerance, reference_noise
from runtime.parity import run_parity


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


def test_a_floor_only_ever_raises_the_atol_of_its_own_output() -> None:
    default = DEFAULT_TOLERANCES["float32"]
    policy = TolerancePolicy(floors={"y": 1e-3})
    assert policy.tolerance("y", "float32") == Tolerance(1e-3, default.rtol)
    assert policy.tolerance("z", "float32") == default
    assert "noise floor" in policy.source("y", "float32") and "noise floor" not in policy.source("z", "float32")
    looser = TolerancePolicy(atol=1e-2, floors={"y": 1e-3})
    assert looser.tolerance("y", "float32") == Tolerance(1e-2, default.rtol)
    assert "noise floor" not in looser.source("y", "float32")
    with pytest.raises(BKNInputError, match="noise floor"):
        TolerancePolicy(floors={"y": float("nan")})


def _exported(model: nn.Module, x: np.ndarray, path: Path, scale_last_weight: float = 1.0) -> Path:
    export_onnx(model, torch.from_numpy(x), path, mode="inference")
    if scale_last_weight != 1.0:
        graph = onnx.load(path)
        last = [t for t in graph.graph.initializer if t.dims and numpy_helper.to_array(t).ndim == 2][-1]
        last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) * np.float32(scale_last_weight), last.name))
        onnx.save(graph, path)
    return path


def _loud() -> tuple[nn.Module, np.ndarray]:
    """:func:`_deep` with its classifier scaled by 1000: outputs ~100, float32 noise ~3e-5 (4x that above 1e-5)."""
    model, x = _deep()
    with torch.no_grad():
        model[-1].weight.mul_(1e3)
    return model, x


def test_parity_with_the_noise_floor_judges_each_output_at_factor_times_its_measured_noise(tmp_path: Path) -> None:
    model, x = _loud()
    path = _exported(model, x, tmp_path / "deep.onnx")
    report = run_parity(model, path, [x], runtimes="ort:cpu:all", noise_floor=True, localise_failures=False)
    (noise,) = reference_noise(model, [x], "inference").values()
    assert NOISE_FACTOR * noise.max_abs > DEFAULT_TOLERANCES["float32"].atol  # the floor is what sets atol here
    (comparison,) = report.runtimes[0].outputs
    assert comparison.tolerance.atol == pytest.approx(NOISE_FACTOR * noise.max_abs, rel=1e-9)
    assert "noise floor" in comparison.tolerance_source
    assert any(note.startswith(f"noise floor of {comparison.output!r}") for note in report.notes)
    assert report.passed
    plain = run_parity(model, path, [x], runtimes="ort:cpu:all", localise_failures=False)
    assert plain.runtimes[0].outputs[0].tolerance == DEFAULT_TOLERANCES["float32"]


def test_the_noise_floor_still_fails_a_weight_changed_by_one_part_in_a_thousand(tmp_path: Path) -> None:
    model, x = _loud()
    path = _exported(model, x, tmp_path / "tampered.onnx", scale_last_weight=1 + 1e-3)
    report = run_parity(model, path, [x], runtimes="ort:cpu:all", noise_floor=True, localise_failures=False)
    assert not report.passed


def test_a_reference_that_is_not_finite_is_reported_as_such_with_the_noise_floor(tmp_path: Path) -> None:
    """Inputs on which the model itself overflows: the measured noise is NaN, which is no floor; the report says
    the reference is broken, as without ``noise_floor`` (it raised "tolerance ... must be a finite number")."""
    model, x = _deep(depth=2)
    path = _exported(model, x, tmp_path / "small.onnx")
    huge = np.full_like(x, 3e38)
    report = run_parity(model, path, [huge], runtimes="ort:cpu", noise_floor=True, localise_failures=False)
    assert not report.passed
    assert any("holds NaN/Inf" in problem for problem in report.reference_problems)
    assert any("noise floor of" in note and "not set" in note for note in report.notes)


def test_the_noise_floor_needs_the_model_not_saved_outputs(tmp_path: Path) -> None:
    model, x = _deep(depth=2)
    path = _exported(model, x, tmp_path / "small.onnx")
    with torch.no_grad():
        saved = model(torch.from_numpy(x)).numpy()
    output = onnx.load(path).graph.output[0].name
    with pytest.raises(BKNInputError, match="noise floor"):
        run_parity(None, path, [x], reference_outputs=[{output: saved}], noise_floor=True)


def test_cli_noise_floor_passes_and_refuses_saved_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec, onnx_path = "bkn_export.demo.models:digits_resnet", str(exported_digits("inference"))
    argv = ["parity", spec, onnx_path, "--runtimes", "ort:cpu:basic", "--noise-floor"]
    # the file was exported from trained weights: without them it differs, with or without the floor
    assert main(argv) == 1
    assert "noise floor of" in capsys.readouterr().out
    saved = ["parity", onnx_path, "--load-inputs", str(tmp_path / "i.json"), "--load-outputs", str(tmp_path / "o.json")]
    assert main(["parity", spec, onnx_path, "--save-inputs", str(tmp_path / "i.json"), "--save-outputs",
                 str(tmp_path / "o.json"), "--runtimes", "reference", "--no-localise"]) == 1  # fmt: skip
    assert main([*saved, "--noise-floor"]) == 2


def _near_zero_output(tmp_path: Path, bias_shift: float) -> tuple[nn.Module, np.ndarray, Path]:
    """:func:`_loud` with one output element moved to ~0 (its classifier bias), exported, then that bias shifted by
    ``bias_shift`` in the file: the element fails the default rule; (model, x, path)."""
    model, x = _loud()
    with torch.no_grad():
        model[-1].bias[0] -= model(torch.from_numpy(x))[0, 0]
    path = _exported(model, x, tmp_path / "near_zero.onnx")
    graph = onnx.load(path)
    bias = next(t for t in graph.graph.initializer if numpy_helper.to_array(t).shape == (64,))
    array = numpy_helper.to_array(bias).copy()
    array[0] += np.float32(bias_shift)
    bias.CopyFrom(numpy_helper.from_array(array, bias.name))
    onnx.save(graph, path)
    return model, x, path


@pytest.mark.parametrize(("shift", "hinted"), [(5e-5, True), (1e-3, False)])
def test_a_failure_within_the_references_own_error_suggests_the_noise_floor(
    tmp_path: Path, shift: float, hinted: bool
) -> None:
    model, x, path = _near_zero_output(tmp_path, shift)
    (noise,) = reference_noise(model, [x], "inference").values()
    assert (shift <= NOISE_FACTOR * noise.max_abs) == hinted  # the premise of each case
    report = run_parity(model, path, [x], runtimes="ort:cpu:disable_all", localise_failures=False)
    assert not report.passed  # the verdict is the default rule's, hint or not
    hints = [note for note in report.notes if "--noise-floor" in note]
    assert bool(hints) == hinted, report.notes
    if hinted:
        assert run_parity(model, path, [x], runtimes="ort:cpu:disable_all", noise_floor=True).passed


def test_a_float16_file_is_judged_against_the_models_own_float16_error(tmp_path: Path) -> None:
    """For a half-precision file the floor measures a float16 copy of the model (the error a half evaluation
    makes), not the float32 reference."""
    model, x = _deep(depth=6)
    path = tmp_path / "half.onnx"
    export_onnx(model, torch.from_numpy(x), path, mode="inference", fp16=True)
    x = x.astype(np.float16)  # the file's input dtype; PyTorch gets the same values (exact in float32)
    report = run_parity(model, path, [x], runtimes="ort:cpu:all", noise_floor=True, localise_failures=False)
    with torch.no_grad():
        half = copy.deepcopy(model).half()(torch.from_numpy(x)).double().numpy()
        r64 = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    floor = NOISE_FACTOR * np.abs(half - r64).max()
    (comparison,) = report.runtimes[0].outputs
    assert comparison.tolerance.atol == pytest.approx(max(floor, DEFAULT_TOLERANCES["float16"].atol), rel=1e-9)
    assert any(f"noise floor of {comparison.output!r}: the model in float16" in note for note in report.notes)
    assert report.passed
