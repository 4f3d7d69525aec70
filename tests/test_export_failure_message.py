"""An export of a model whose own code torch.export cannot trace names that code in both modes (found by a tester
on MONAI DiNTS, ``if self.node_a[0][d]:``): the training mode kept only "Could not guard on data-dependent
expression Eq(u0, 1)", which does not say the failure is in the model's forward rather than in the chain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.errors import ExportError
from bkn_export.export import export_onnx


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.node_a = torch.tensor([[1.0, 0.0]])  # a plain tensor attribute, as in DiNTS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.node_a[0][0]:  # the branch torch.export cannot trace
            y = y * 2
        return y


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_the_failing_line_of_the_model_is_named(tmp_path: Path, mode: str) -> None:
    x = torch.randn(2, 1, 8, 8)
    model = convert_batchnorm(_DataDependent().eval(), x)
    named = r"(?s)test_export_failure_message\.py.*in forward.*if self\.node_a\[0\]\[0\]"
    with pytest.raises(ExportError, match=named):
        export_onnx(model, (x,), tmp_path / "model.onnx", mode=mode)
