"""Localisation never blames a module that agrees: in-place activations after a folded Conv → BKN.

``nn.ReLU(inplace=True)`` after a normalization (geffnet, torchvision, timm) writes into
the normalization's output tensor. The PyTorch reference records module outputs with
forward hooks; a record that shared the tensor's memory later held the ReLU's output, so
the fused ``Conv(+BKN)`` ONNX node (which computes the normalization's output, negatives
included) was reported as diverging by the size of the most negative activation: on
geffnet's MobileNetV3-large, ``blocks.0.0.conv_dw + blocks.0.0.bn1``, max abs error 21.2,
for a file that agrees with PyTorch. These tests fail on that bug and pin the fixed
behaviour: the fused node is compared with the last module of its group (the
normalization), and a real divergence is still found where it is planted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.export import export_onnx
from runtime.backends.torch_eager import TorchEagerBackend
from runtime.parity import run_parity

_RUNTIMES = "ort:cpu:all,reference"


class _ConvBnInplaceRelu(nn.Module):
    """conv1 → bn1 → ReLU(inplace) → conv2 → bn2 → ReLU(inplace) → mean over (H, W) → head; (N, 3, 8, 8) → (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def _model() -> tuple[nn.Module, torch.Tensor]:
    """The model converted to BKN, with running statistics and affine parameters away from 0 / 1.

    The running means are shifted so that about half of each normalization's outputs are
    negative: exactly what an in-place ReLU overwrites.
    """
    torch.manual_seed(0)
    model = _ConvBnInplaceRelu()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    return convert_batchnorm(model.eval(), x).eval(), x


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, torch.Tensor, Path]:
    model, x = _model()
    path = tmp_path_factory.mktemp("inplace") / "model.onnx"
    export_onnx(model, (x,), path, mode="inference")
    return model, x, path


def _planted(source: Path, target: Path, initializer: str, relative: float) -> None:
    """``source`` with initializer ``initializer`` (name ending) scaled by ``1 + relative``, saved as ``target``."""
    model = onnx.load(source)
    tensor = next((t for t in model.graph.initializer if t.name.endswith(initializer)), None)
    assert tensor is not None, [t.name for t in model.graph.initializer]
    array = numpy_helper.to_array(tensor) * np.float32(1 + relative)
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
    onnx.save(model, target)


def test_captured_module_output_is_what_the_module_returned_not_what_an_inplace_op_made_of_it(
    exported: tuple[nn.Module, torch.Tensor, Path],
) -> None:
    model, x, _ = exported
    _, capture = TorchEagerBackend(model, "inference").run_capturing({"x": x.numpy()})
    bn1 = capture.outputs["bn1"][0]
    with torch.no_grad():
        expected = model.bn1(model.conv1(x)).numpy()
    assert (expected < 0).mean() > 0.2  # the premise: the in-place ReLU has negatives to overwrite
    np.testing.assert_array_equal(bn1, expected)
    np.testing.assert_array_equal(capture.outputs["act1"][0], np.maximum(expected, 0))


def test_the_faithful_export_agrees_and_the_fold_really_happened(
    exported: tuple[nn.Module, torch.Tensor, Path],
) -> None:
    model, x, path = exported
    graph = onnx.load(path).graph
    assert [n.op_type for n in graph.node].count("Conv") == 2
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)  # both BKN layers folded
    report = run_parity(model, path, [x.numpy()], runtimes=_RUNTIMES)
    assert report.passed, [c.message for r in report.ran for c in r.outputs]


def test_divergence_after_the_inplace_relu_blames_the_head_not_the_fused_conv_bn(
    exported: tuple[nn.Module, torch.Tensor, Path], tmp_path: Path
) -> None:
    model, x, path = exported
    bad = tmp_path / "head.onnx"
    _planted(path, bad, "head.weight", 0.5)
    report = run_parity(model, bad, [x.numpy()], runtimes=_RUNTIMES)
    assert not report.passed
    for result in report.failures():
        loc = result.localisation
        assert loc is not None and loc.status == "localised" and loc.first is not None, loc
        assert loc.first.module == "head", loc.message
        compared = {c.label: c.passed for c in loc.checks}
        assert compared["conv1 + bn1"] and compared["conv2 + bn2"], compared  # the fused nodes agree


def test_divergence_in_a_fused_conv_bn_is_located_there_and_the_group_before_it_agrees(
    exported: tuple[nn.Module, torch.Tensor, Path], tmp_path: Path
) -> None:
    model, x, path = exported
    bad = tmp_path / "conv2.onnx"
    _planted(path, bad, "conv2.weight", 1e-3)  # the folded Conv2 weight, 1e-3 relative
    report = run_parity(model, bad, [x.numpy()], runtimes=_RUNTIMES)
    assert not report.passed
    for result in report.failures():
        loc = result.localisation
        assert loc is not None and loc.first is not None, loc
        assert loc.first.modules == ["conv2", "bn2"], loc.message  # compared with bn2's output, the group's last
        assert loc.last_passing == "act1"
