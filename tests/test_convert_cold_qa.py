"""convert_batchnorm as a new user hands it models nobody wrote for it (cold QA, 2026-12-06).

* A TorchScript submodule (scripted or traced) between normalizations is opaque to the recorder (it takes no
  hooks): the chain restarts after it with a note naming it, instead of a raw ``RuntimeError`` from
  ``register_forward_pre_hook``; one holding a BatchNorm, which cannot be replaced, is refused by name.
* The activation probe runs on copies of a parameter-free module, so a module that keeps state (a feature tap)
  keeps none of the probe's fabricated values; and a module that matched an activation on the probe's range but
  computes something else on the example's values (a branch on their range) is recorded by its operators.
* The example forwards leave every buffer outside the normalizations as it was (a fake-quantize observer), and
  the guard's final check starts from the buffers its first forward saw: a model with such a module converts.
* A non-finite example (or one made non-finite upstream) is named as such, not "largest difference 0"; BatchNorm's
  ``momentum=None`` without ``num_batches_tracked`` is named as the cause of its refusal; a BatchNorm subclass's
  extra parameters / buffers are warned about.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import bkn_export
from bkn_export.chain.record import record_dataflow
from bkn_export.errors import BKNInputError, ConversionError


def _between(block: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), block, nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_submodule_without_batchnorm_is_opaque_and_named(how: str) -> None:
    block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    compiled = torch.jit.script(block) if how == "script" else torch.jit.trace(block, torch.randn(2, 4, 8, 8))
    model = _between(compiled)
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    bkn_export.convert_batchnorm(model, x)
    assert model[2] is compiled  # put back after the recording
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    (note,) = [line for line in bkn_export.format_chain(model).splitlines() if line.startswith("4 ")]
    assert "'2' (TorchScript Sequential) cannot carry moments" in note


def test_a_batchnorm_inside_a_torchscript_submodule_is_refused_by_name() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model = _between(scripted)
    with pytest.raises(BKNInputError, match=r"'2\.1': a BatchNorm inside a TorchScript submodule"):
        bkn_export.convert_batchnorm(model, torch.randn(2, 3, 10, 10))
    assert isinstance(model[1], nn.BatchNorm2d)


class _FeatureTap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.store: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.store.append(x.detach().clone())
        return x


def test_the_probe_leaves_a_stateful_modules_own_state_alone() -> None:
    tap = _FeatureTap()
    model = _between(tap)
    x = torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        real = model[1](model[0](x))
    bkn_export.convert_batchnorm(model, x)
    assert tap.store, "the example forwards ran the module"
    for seen in tap.store:  # only the example forward's own values, never the probe's ramp or its batch of 64
        torch.testing.assert_close(seen, real, rtol=0, atol=0)
    (line,) = [line for line in bkn_export.format_chain(model).splitlines() if line.startswith("4 ")]
    assert "identity() '2'" in line


class _ClipAbove(nn.Module):
    """The identity on the probe's [-8, 8]; a clamp where its input reaches beyond 9."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(max=10.0) if x.abs().max() > 9 else x


def test_a_module_that_matched_the_probe_but_not_the_example_is_recorded_by_its_operators() -> None:
    model = _between(_ClipAbove())
    with torch.no_grad():
        model[1].weight.fill_(20.0)  # the first normalization's outputs reach |x| ~ 60
    recorded = record_dataflow(model, torch.randn(8, 3, 10, 10))
    assert any(
        "'2' (_ClipAbove) matched identity() on a probe" in note and "computes something else" in note
        for note in recorded.notes
    )
    (layer,) = [layer for layer in recorded.layers if layer.name == "4"]
    assert not layer.sources  # not taken as the identity: the clamp it runs is named as what the path cannot carry
    assert any("Tensor.clamp in '2' (_ClipAbove)" in note for note in layer.notes)


def test_a_fake_quantize_observer_is_unchanged_by_the_conversion_and_does_not_fail_it() -> None:
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    torch.manual_seed(0)
    quantize = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), quantize, nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    with torch.no_grad():  # a few calibration steps
        for _ in range(5):
            model(torch.randn(8, 3, 10, 10))
    model.eval()
    before = {key: value.clone() for key, value in quantize.state_dict().items()}
    bkn_export.convert_batchnorm(model, torch.randn(8, 3, 10, 10))
    after = quantize.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_a_non_finite_example_is_named() -> None:
    x = torch.randn(2, 3, 10, 10)
    x[0, 0, 0, 0] = float("nan")
    model = _between(nn.ReLU())
    with pytest.raises(ConversionError, match=r"'1' .*holds 4 non-finite value\(s\) \(NaN / inf\) of 512"):
        bkn_export.convert_batchnorm(model, x)


def test_non_finite_running_statistics_upstream_are_named_at_the_layer_they_reach() -> None:
    model = _between(nn.ReLU())
    model[1].running_var[0] = float("nan")
    with pytest.raises(ConversionError, match=r"'4' .*non-finite value.*a module before this layer produced them"):
        bkn_export.convert_batchnorm(model, torch.randn(2, 3, 10, 10))


def test_momentum_none_without_a_count_is_named_as_the_cause() -> None:
    model = _between(nn.ReLU())
    model[1].momentum = None
    model[1].num_batches_tracked = None
    with pytest.raises(ConversionError, match=r"momentum=None .* but num_batches_tracked is None"):
        bkn_export.convert_batchnorm(model, torch.randn(2, 3, 10, 10))


class _ScaledBatchNorm(nn.BatchNorm2d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.register_buffer("scale", torch.tensor(3.0))


def test_a_batchnorm_subclass_with_extra_buffers_is_warned_about() -> None:
    model = _between(nn.ReLU())
    model[1] = _ScaledBatchNorm(4).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bkn_export.convert_batchnorm(model, torch.randn(2, 3, 10, 10))
    assert any("'1' (_ScaledBatchNorm) has parameters / buffers ['scale']" in str(w.message) for w in caught)
