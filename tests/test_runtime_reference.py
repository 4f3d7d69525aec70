"""The training reference is the export's semantics: BKN layers in train mode, every other module in eval.

A training-mode export runs only the BKN layers in train mode (batch statistics, the Kalman
chain); Dropout, drop-path, an unconverted BatchNorm and any module with its own train-mode
behaviour are exported as in eval mode. The PyTorch reference of a training-mode parity
check must compute the same thing, in the API, the pytest fixture and the CLI, or a
faithful export is reported as a mismatch.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bkn_export import convert_batchnorm
from runtime import assert_parity
from runtime.backends.torch_eager import TorchEagerBackend
from runtime.parity import run_parity

RUNTIMES = "ort:cpu:all,reference"


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: in training, zero whole samples and rescale the rest."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1))) >= self.p
        return x * keep / (1 - self.p)


class TrainShift(nn.Module):
    """A module whose train-mode forward differs deterministically from its eval forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 3.0 if self.training else x


class Net(nn.Module):
    """Conv–BN–ReLU–Conv–BN–(drop-path residual)–TrainShift–Flatten–Dropout–Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop_path = DropPath(0.5)
        self.shift = TrainShift()
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = h + self.drop_path(self.bn2(self.conv2(h)))
        return self.head(self.dropout(torch.flatten(self.shift(h), 1)))


def _converted() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    return convert_batchnorm(model, torch.randn(2, 1, 6, 6))


def _export_semantics(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """An independent spelling of what the training export computes."""
    import copy

    from bkn_export import bkn_layers

    work = copy.deepcopy(model).eval()
    for _, layer in bkn_layers(work):
        layer.train()
    with torch.no_grad():
        return work(x).numpy()


def test_reference_runs_bkn_in_train_mode_and_every_other_module_in_eval() -> None:
    model = _converted()
    x = torch.randn(4, 1, 6, 6)
    backend = TorchEagerBackend(model, "training")
    first = backend.run({"x": x.numpy()})["output_0"]
    second = backend.run({"x": x.numpy()})["output_0"]
    np.testing.assert_array_equal(first, second)  # no dropout / drop-path noise
    np.testing.assert_allclose(first, _export_semantics(model, x), rtol=0, atol=0)
    with torch.no_grad():
        model.eval()
        eval_output = model(x).numpy()
    assert np.abs(first - eval_output).max() > 1e-3  # and the BKN layers did use batch statistics


def test_api_training_parity_with_dropout_drop_path_and_train_shift(tmp_path: Path) -> None:
    model = _converted()
    model.train()  # the user's mode must not matter, nor change
    report = assert_parity(model, torch.randn(4, 1, 6, 6), mode="training", runtimes=RUNTIMES, report_dir=tmp_path)
    assert report.passed and {r.runtime for r in report.ran} == set(RUNTIMES.split(","))
    for result in report.ran:
        assert all(c.max_abs_error < 1e-5 for c in result.outputs)
    assert all(m.training for m in model.modules())
    assert "BKN layers in train mode" in report.reference


def test_a_reference_with_every_module_in_train_mode_would_not_match(tmp_path: Path) -> None:
    """The false alarm this guards against: model.train() on the reference makes TrainShift add 3."""
    model = _converted()
    x = torch.randn(4, 1, 6, 6)
    path = tmp_path / "m.onnx"
    from bkn_export.export import export_onnx

    export_onnx(model, (x,), path, mode="training")
    report = run_parity(model, path, [x.numpy()], mode="training", runtimes="reference", localise_failures=False)
    assert report.passed
    import copy

    all_train = copy.deepcopy(model).train()
    all_train.dropout.p = 0.0
    all_train.drop_path.p = 0.0
    with torch.no_grad():
        wrong = all_train(x).numpy()
    assert np.abs(wrong - _export_semantics(model, x)).max() > 1.0


def test_cli_training_parity_uses_export_semantics(tmp_path: Path) -> None:
    from bkn_export.cli import main

    factory = tmp_path / "net.py"
    factory.write_text(
        textwrap.dedent(
            f"""
            import torch
            from bkn_export import convert_batchnorm
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_runtime_reference import Net

            def make():
                torch.manual_seed(0)
                return convert_batchnorm(Net(), torch.randn(2, 1, 6, 6))
            """
        )
    )
    model = _converted()
    checkpoint = tmp_path / "net.pt"
    torch.save(model.state_dict(), checkpoint)
    onnx_path = tmp_path / "net_train.onnx"
    from bkn_export.export import export_onnx

    export_onnx(model, (torch.randn(2, 1, 6, 6),), onnx_path, mode="training")
    argv = [
        "parity", f"{factory}:make", str(onnx_path), "--checkpoint", str(checkpoint),
        "--runtimes", "ort:cpu:all", "--input-shape", "3,1,6,6",
    ]  # fmt: skip
    assert main(argv) == 0


# The pytest fixture's training reference is checked in
# test_runtime_plugin.py::test_bkn_parity_fixture_in_a_users_test_suite (test_training_export_semantics),
# which shares one pytest subprocess with the other fixture checks.


def _grouped_convtranspose(tmp_path: Path) -> tuple[nn.Module, torch.Tensor, Path]:
    from bkn_export.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, stride=2, groups=2), nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 4, 5, 5)
    convert_batchnorm(model, x)
    path = tmp_path / "grouped_convtranspose.onnx"
    export_onnx(model, (x,), path)
    return model, x, path


def test_reference_evaluator_grouped_convtranspose_is_its_limitation_not_a_mismatch(tmp_path: Path) -> None:
    """onnx.reference cannot run ConvTranspose with group > 1: 'reference' is unavailable for it, ORT judges it."""
    model, x, path = _grouped_convtranspose(tmp_path)
    report = run_parity(model, path, [x.numpy()], runtimes="ort:cpu:all,reference")
    status = {r.runtime: r.status.value for r in report.runtimes}
    assert status == {"ort:cpu:all": "passed", "reference": "unavailable"}, status
    reason = next(r.reason for r in report.runtimes if r.runtime == "reference")
    assert "ConvTranspose" in reason and "group=2" in reason
    assert report.passed


def test_a_broken_grouped_convtranspose_model_still_fails(tmp_path: Path) -> None:
    """The reference's limitation does not hide a wrong model: ORT, which can run it, reports the mismatch."""
    import onnx
    from onnx import numpy_helper

    model, x, path = _grouped_convtranspose(tmp_path)
    onnx_model = onnx.load(path)
    node = next(n for n in onnx_model.graph.node if n.op_type == "ConvTranspose")
    weight = next(t for t in onnx_model.graph.initializer if t.name == node.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.5), weight.name))
    bad = tmp_path / "broken.onnx"
    onnx.save(onnx_model, bad)
    report = run_parity(model, bad, [x.numpy()], runtimes="ort:cpu:all,reference")
    status = {r.runtime: r.status.value for r in report.runtimes}
    assert status == {"ort:cpu:all": "failed", "reference": "unavailable"}, status
    assert not report.passed


def test_a_reference_crash_on_a_broken_model_is_an_error_not_unavailable(tmp_path: Path) -> None:
    """Only the named limitation makes 'reference' unavailable; any other failure of it stays visible."""
    import onnx
    from onnx import helper

    from bkn_export.export import export_onnx

    model = _converted()
    x = torch.randn(4, 1, 6, 6)
    path = tmp_path / "m.onnx"
    export_onnx(model, (x,), path)
    onnx_model = onnx.load(path)
    first = onnx_model.graph.node[0]
    # a Reshape to an impossible shape in front of the first node: no runtime can run this file
    onnx_model.graph.initializer.append(helper.make_tensor("bad_shape", onnx.TensorProto.INT64, [2], [7, -1]))
    onnx_model.graph.node.insert(0, helper.make_node("Reshape", [first.input[0], "bad_shape"], ["reshaped"]))
    first.input[0] = "reshaped"
    bad = tmp_path / "broken.onnx"
    onnx.save(onnx_model, bad)
    report = run_parity(model, bad, [x.numpy()], runtimes="reference")
    (result,) = report.runtimes
    assert result.status.value == "error", (result.status, result.reason)
    assert not report.passed
