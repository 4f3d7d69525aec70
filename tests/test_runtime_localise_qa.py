"""Localisation on what a tester found it getting wrong: a module with two outputs of one shape, rounding noise
taken for a divergence, a constant the runtime returns in another type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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


def _sliced_relu(path: Path) -> Path:
    """y = relu(x[:, 0:2⁶³ − 1]): a Slice bound at int64's limit, as exporters write."""
    h = onnx.helper
    nodes = [
        h.make_node("Constant", [], ["starts"], value=numpy_helper.from_array(np.array([0], np.int64))),
        h.make_node("Constant", [], ["ends"], value=numpy_helper.from_array(np.array([2**63 - 1], np.int64))),
        h.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64))),
        h.make_node("Slice", ["x", "starts", "ends", "axes"], ["sliced"]),
        h.make_node("Relu", ["sliced"], ["y"]),
    ]
    graph = h.make_graph(
        nodes,
        "sliced_relu",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    return path


def test_node_by_node_localisation_compares_only_values_computed_from_the_inputs(tmp_path: Path) -> None:
    """OpenVINO returns an exposed int64 constant near 2⁶³ as int32's limit; the node-by-node method named that
    Constant as the first divergence of a file whose only difference is in its saved outputs."""
    pytest.importorskip("openvino")
    path = _sliced_relu(tmp_path / "sliced.onnx")
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    wrong = {"y": np.maximum(x, 0) + np.float32(1.0)}  # the saved outputs differ from what the file computes
    (result,) = run_parity(None, path, {"x": x}, runtimes="openvino:cpu", reference_outputs=[wrong]).runtimes
    assert result.status == "failed"
    localisation = result.localisation
    assert localisation is not None and localisation.method == "nodes"
    assert localisation.status == "not_localised", localisation.message
    assert {c.onnx_value for c in localisation.checks} == {"sliced", "y"}
