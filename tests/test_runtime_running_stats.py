"""Parity of a ``running_stats_io=True`` training export: the running statistics in and out.

The PyTorch reference loads the file's running-statistics inputs into the layers' buffers, runs
the train-mode step, and gives the updated buffers as the file's ``<layer>.running_*_out``
outputs; where the user gives no running statistics, both sides start from the model's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import runtime
from bkn_export import convert_batchnorm
from bkn_export.nn import _BatchKalmanNorm
from runtime.backends.torch_eager import TorchEagerBackend
from runtime.errors import BKNInputError, ParityMismatchError

STATISTICS = ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var"]
UPDATED = [name + "_out" for name in STATISTICS]


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    x = torch.randn(2, 3, 8, 8)
    converted = convert_batchnorm(model, x)
    with torch.no_grad():  # statistics other than the defaults (0, 1), so that a feed of the wrong ones shows
        for layer in converted.modules():
            if isinstance(layer, _BatchKalmanNorm):
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.uniform_(-1.0, 1.0)
                layer.running_var.uniform_(0.5, 2.0)
    return converted, x


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    runtime.assert_parity(
        model, x, mode="training", runtimes="reference", export_to=path, export_options={"running_stats_io": True}
    )
    return path


def test_running_statistics_are_fed_from_the_model_and_their_updates_compared(tmp_path: Path) -> None:
    model, x = _model()
    report = runtime.assert_parity(
        model, x, mode="training", runtimes="ort:cpu:all,reference", export_options={"running_stats_io": True}
    )
    for result in report.runtimes:
        assert {o.output for o in result.outputs} == {"output", *UPDATED}
        assert all(o.passed for o in result.outputs)
    (note,) = [n for n in report.notes if "running statistics" in n]
    assert all(repr(name) in note for name in STATISTICS) and "fed from the PyTorch model's buffers" in note
    layer = model[1]
    assert isinstance(layer, _BatchKalmanNorm) and int(layer.num_batches_tracked) == 0  # the user's model untouched


def test_a_different_update_fails_on_the_updated_statistics(tmp_path: Path) -> None:
    """The file updates with momentum 0.1; a reference stepping with 0.3 computes the same output
    and other running statistics: the check fails on those, by name."""
    model, x = _model()
    path = _export(model, x, tmp_path / "training.onnx")
    for layer in model.modules():
        if isinstance(layer, _BatchKalmanNorm):
            layer.momentum = 0.3
    with pytest.raises(ParityMismatchError) as failure:
        runtime.assert_parity(model, x, mode="training", runtimes="ort:cpu:all", onnx_path=path)
    message = str(failure.value)
    assert "'1.running_mean_out'" in message and "'4.running_var_out'" in message
    assert "of 'output'" not in message


def test_given_running_statistics_are_used_on_both_sides(tmp_path: Path) -> None:
    model, x = _model()
    path = _export(model, x, tmp_path / "training.onnx")
    feed = {"input": x.numpy()}
    feed.update({name: np.full(8, 0.25 if name.endswith("mean") else 3.0, np.float32) for name in STATISTICS})
    report = runtime.run_parity(model, path, feed, mode="training", runtimes="ort:cpu:all")
    assert report.passed and not [n for n in report.notes if "running statistics" in n]
    # The reference's update starts from the given statistics: what a copy with those buffers computes.
    backend = TorchEagerBackend(model, "training")
    backend.load(str(path))
    outputs = backend.run(feed)
    expected, _ = _model()
    with torch.no_grad():
        for layer in expected.modules():
            if isinstance(layer, _BatchKalmanNorm):
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.fill_(0.25)
                layer.running_var.fill_(3.0)
        expected.eval()
        for layer in expected.modules():
            if isinstance(layer, _BatchKalmanNorm):
                layer.train()
        expected(x)
    for name in ("1", "4"):
        layer = expected.get_submodule(name)
        assert isinstance(layer, _BatchKalmanNorm) and layer.running_mean is not None and layer.running_var is not None
        np.testing.assert_array_equal(outputs[f"{name}.running_mean_out"], layer.running_mean.numpy())
        np.testing.assert_array_equal(outputs[f"{name}.running_var_out"], layer.running_var.numpy())
    assert not np.array_equal(outputs["1.running_mean_out"], model.get_submodule("1").running_mean.numpy())


def test_arrays_in_graph_order_may_include_the_statistics_or_leave_them_out(tmp_path: Path) -> None:
    model, x = _model()
    path = _export(model, x, tmp_path / "training.onnx")
    statistics = [np.zeros(8, np.float32), np.ones(8, np.float32)] * 2
    assert runtime.run_parity(model, path, [x.numpy(), *statistics], mode="training", runtimes="ort:cpu:all").passed
    assert runtime.run_parity(model, path, [x.numpy()], mode="training", runtimes="ort:cpu:all").passed
    with pytest.raises(BKNInputError, match=r"got 2 inputs.*or only \['input'\]: the others have defaults"):
        runtime.run_parity(model, path, [x.numpy(), statistics[0]], mode="training", runtimes="ort:cpu:all")


class _WithAnUnusedLayer(nn.Module):
    """A registered BatchNorm the forward never calls (pytorch-tabnet's ``TabNetNoEmbeddings.initial_bn``)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.BatchNorm1d(4)
        self.fc, self.bn, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_a_layer_the_forward_never_runs_keeps_its_statistics_in_the_file(tmp_path: Path) -> None:
    """A cold QA on TabNet: ``running_stats_io=True`` was refused ("export with example inputs that reach every BKN
    layer", which no input can do for a layer the forward never calls). Now the file passes that layer's statistics
    through unchanged, as PyTorch leaves them, with a warning naming it; parity compares them on every runtime."""
    torch.manual_seed(0)
    model = convert_batchnorm(_WithAnUnusedLayer(), torch.randn(8, 4))
    with torch.no_grad():
        model.unused.running_mean.uniform_(-1.0, 1.0)
    x = torch.randn(4, 4)
    with pytest.warns(UserWarning, match=r"1 BKN layer\(s\) \('unused'\) did not run .* passes their running"):
        report = runtime.assert_parity(
            model, x, mode="training", runtimes="ort:cpu:all,reference", export_options={"running_stats_io": True}
        )
    for result in report.runtimes:
        assert {"unused.running_mean_out", "unused.running_var_out", "bn.running_mean_out"} <= {
            o.output for o in result.outputs
        }
        assert all(o.passed for o in result.outputs)
    import onnxruntime

    path = tmp_path / "unused.onnx"
    runtime.assert_parity(
        model, x, mode="training", runtimes="reference", export_to=path, export_options={"running_stats_io": True}
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(model.get_buffer(i.name).numpy()) for i in session.get_inputs() if "running" in i.name}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x.numpy(), **feeds})))
    np.testing.assert_array_equal(outputs["unused.running_mean_out"], model.unused.running_mean.numpy())
