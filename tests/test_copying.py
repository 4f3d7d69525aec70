"""Copies of a model that keeps tensors of its last forward (MONAI's DynUNet keeps its deep-supervision heads)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.copying import copy_module
from bkn_export.export import export_onnx
from runtime.parity import run_parity


class _KeepsHeads(nn.Module):
    """conv → BN → ReLU → conv → BN, keeping the first block's output in a plain list attribute, as DynUNet does."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.heads: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        self.heads = [h]
        return self.second(h)


def _trained_once() -> nn.Module:
    torch.manual_seed(0)
    model = convert_batchnorm(_KeepsHeads().eval(), torch.randn(2, 3, 8, 8)).train()
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()  # heads now hold a tensor with autograd history
    return model


def test_a_model_holding_a_tensor_with_history_is_copied_detached_and_left_as_it_was() -> None:
    model = _trained_once()
    with pytest.raises(RuntimeError, match="deepcopy protocol"):
        copy.deepcopy(model)
    copied = copy_module(model)
    assert copied.heads[0].grad_fn is None and torch.equal(copied.heads[0], model.heads[0])
    assert model.heads[0].grad_fn is not None  # the user's model is untouched


@pytest.mark.filterwarnings("ignore:The tensor attribute self.model.heads:UserWarning")  # torch.export on the model
def test_such_a_model_exports_in_training_mode_and_its_parity_runs(tmp_path: Path) -> None:
    """The training export's working copy raised PyTorch's 'Only Tensors created explicitly by the user ... support
    the deepcopy protocol', with a hint about weight_norm."""
    model = _trained_once()
    path = tmp_path / "heads.onnx"
    export_onnx(model, (torch.randn(2, 3, 8, 8),), path, mode="training")
    assert run_parity(model, path, runtimes="ort:cpu:all").passed
