"""The batch the export makes dynamic is checked (cold QA, 2026-12-06).

* torch.export fixes a batch the forward uses as a number (``y * float(x.shape[0])``) to the traced size, with only
  a warning on stderr: the file refused the example's own batch while its metadata said ``dynamic_batch: true``.
  Refused now (ExportError, exit 1), naming the input and what to do.
* A batch-1 example is traced widened to 2, so a model that branches on its batch size got a file of the batch-2
  branch, wrong by 2.16 at batch 1 with exit 0. The file is now run at the example itself and compared.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from bkn_export.errors import ExportError
from bkn_export.export import export_onnx


class _BatchBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if x.shape[0] > 1:
            y = y - y.mean(0, keepdim=True)
        return y


class _BatchScale(_BatchBranch):
    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) * float(x.shape[0])


def _quiet_export(model: nn.Module, x: Tensor, path: Path, **options: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's own note on the specialised axis
        export_onnx(model, x, path, **options)  # type: ignore[arg-type]


def test_a_model_that_branches_on_its_batch_size_is_refused_at_a_batch_1_example(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _BatchBranch().eval()
    with pytest.raises(ExportError, match=r"at batch 1 the file's output 'output' differs from PyTorch's by 2\.\d+"):
        _quiet_export(model, torch.randn(1, 3, 4, 4), tmp_path / "branch.onnx")
    assert not (tmp_path / "branch.onnx").exists()
    x = torch.randn(1, 3, 4, 4)  # with a static batch the file is of the example's own branch
    _quiet_export(model, x, tmp_path / "static.onnx", dynamic_batch=False)
    session = ort.InferenceSession(str(tmp_path / "static.onnx"), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(output, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_batch_the_exporter_fixed_is_refused_not_written_as_dynamic(tmp_path: Path, batch: int) -> None:
    torch.manual_seed(0)
    with pytest.raises(ExportError, match=r"the exporter fixed the batch of input\(s\) 'x' at 2"):
        _quiet_export(_BatchScale().eval(), torch.randn(batch, 3, 4, 4), tmp_path / "scale.onnx")


def test_a_batch_agnostic_model_exports_from_a_batch_1_example(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
    _quiet_export(model, torch.randn(1, 3, 4, 4), tmp_path / "plain.onnx")
    session = ort.InferenceSession(str(tmp_path / "plain.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"


class _PerSampleConv(nn.Module):
    """A depthwise conv run as one grouped conv over the batch folded into the channels (geffnet's CondConv):
    groups = N · C, an ONNX attribute that cannot follow a dynamic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        folded = x.reshape(1, n * c, h, w)
        y = torch.nn.functional.conv2d(folded, self.weight.repeat(n, 1, 1, 1), padding=1, groups=n * c)
        return y.reshape(n, c, h, w)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_an_attribute_that_follows_the_batch_is_refused_with_what_to_do(tmp_path: Path, mode: str) -> None:
    """CondConv networks failed with the exporter's bare "Unsupported attribute type: SymbolicTensor"; with a static
    batch they export."""
    from bkn_export import convert_batchnorm
    from bkn_export.errors import StaticShapeNeededError

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), _PerSampleConv(), nn.BatchNorm2d(4)).eval()
    model = convert_batchnorm(model, x) if mode == "training" else model
    with pytest.raises(
        StaticShapeNeededError, match=r"depends on the input's batch.*dynamic_batch=False, --static-batch"
    ):
        export_onnx(model, (x,), tmp_path / "dynamic.onnx", mode=mode)
    export_onnx(model, (x,), tmp_path / "static.onnx", mode=mode, dynamic_batch=False)


class _GraphConv(nn.Module):
    """A message-passing layer (PyG's shape): node features (N, 4) and edge indices (2, E), whose first axis is not
    the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        h = self.linear(x)
        return self.bn(torch.zeros_like(h).index_add(0, edge_index[1], h[edge_index[0]]))


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_an_input_whose_first_axis_is_not_the_batch_is_refused_with_what_to_do(tmp_path: Path, mode: str) -> None:
    """Third QA of 2026-12-06: a graph network's dynamic-batch export ended in torch.export's bare "UserError:
    L['edge_index'].size()[0] = 2 is not equal to L['x'].size()[0] = 6"; now the error names both inputs and the
    static batch, with which the file exports."""
    from bkn_export import convert_batchnorm

    torch.manual_seed(0)
    x, edge_index = torch.randn(6, 4), torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])
    model = _GraphConv().eval()
    model = convert_batchnorm(model, (x, edge_index)) if mode == "training" else model
    first, second = ("input 'x'", "input 'edge_index'") if mode == "inference" else ("input 1", "input 2")
    with pytest.raises(
        ExportError,
        match=rf"{second} has 2 there and {first} 6: an input whose first axis is not the batch .*"
        r"dynamic_batch=False, --static-batch",
    ):
        export_onnx(model, (x, edge_index), tmp_path / "dynamic.onnx", mode=mode)
    export_onnx(model, (x, edge_index), tmp_path / "static.onnx", mode=mode, dynamic_batch=False)
