"""Graph outputs are named by position even when the model returns one tensor at two positions (MONAI's
VarAutoEncoder in eval mode returns ``mu`` as ``z`` too): the exporter had named them ``[recon, z, logvar,
z_alias_3]`` for ``[recon, mu, logvar, z]`` (found by a tester), so a runtime asked for ``mu`` had no such output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.export import export_onnx


class _Repeats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.head2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        mu = self.head(h)
        return x * 2, mu, self.head2(h), mu


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("names", [None, ["recon", "mu", "logvar", "z"]])
def test_outputs_are_named_by_position(tmp_path: Path, mode: str, names: list[str] | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = convert_batchnorm(_Repeats().eval(), x)
    path = tmp_path / "model.onnx"
    export_onnx(model, (x,), path, mode=mode, output_names=names)
    wanted = names or [f"output_{i}" for i in range(4)]
    outputs = [o.name for o in onnx.load(path).graph.output]
    assert outputs[:4] == wanted
    if mode == "training":  # its values are compared by the parity tests (extra running-statistics I/O)
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x.numpy()}
    got = dict(zip(wanted, session.run(wanted, feeds)))
    with torch.no_grad():
        expected = model(x)
    for name, tensor in zip(wanted, expected):
        np.testing.assert_allclose(got[name], tensor.numpy(), rtol=1e-5, atol=1e-6)
