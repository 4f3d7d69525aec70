"""Localisation on what a tester found it getting wrong: a module with two outputs of one shape, rounding noise
taken for a divergence, a constant the runtime returns in another type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from bkn_export.export import export_onnx
from runtime.parity import run_parity


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.fc(x).chunk(2, dim=-1)  # two outputs of one shape, from the module's own code
        return torch.tanh(mu), torch.sigmoid(logvar)


class _Vae(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = _Encoder()
        self.dec = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.enc(x)
        return self.dec(mu + torch.exp(0.5 * logvar))


def _scaled(path: Path, initializer: str, factor: float, out: Path) -> Path:
    model = onnx.load(path)
    (tensor,) = [t for t in model.graph.initializer if t.name == initializer]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    onnx.save(model, out)
    return out


def test_a_module_with_two_outputs_of_one_shape_is_not_blamed_for_the_next_ones_fault(tmp_path: Path) -> None:
    """The encoder's tanh output was compared with its sigmoid output (the last of that shape): 'first diverging
    module: enc' for a fault planted in dec only."""
    torch.manual_seed(0)
    model = _Vae().eval()
    path = tmp_path / "vae.onnx"
    export_onnx(model, (torch.randn(2, 8),), path, mode="inference")
    weights = [t.name for t in onnx.load(path).graph.initializer if t.name.startswith("dec") and "weight" in t.name]
    planted = _scaled(path, weights[0], 1.01, tmp_path / "planted.onnx")
    for method in ("auto", "bisect"):
        (result,) = run_parity(model, planted, runtimes="ort:cpu:all", localise_method=method).runtimes
        assert result.status == "failed"
        assert result.localisation is not None
        assert result.localisation.first_module == "dec", result.localisation.message
