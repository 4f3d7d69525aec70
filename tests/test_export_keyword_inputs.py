"""Keyword example inputs (third QA of 2026-12-06): ``convert_batchnorm(model, {"pixel_values": x})`` worked on a
Hugging Face model, and ``export_onnx`` with the same dict refused it ("must be a tensor or a tuple of tensors").
A dict keyed by the first positional arguments of ``forward()`` now exports in both modes, its graph inputs in
``forward()``'s order and named after them; keys that are not, or values that are not tensors, are refused naming
them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from bkn_export import BatchKalmanNormBase, convert_batchnorm
from bkn_export.errors import ExportError
from bkn_export.export import export_onnx


class _Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)

    def forward(self, pixel_values: Tensor, mask: Tensor | None = None, return_dict: bool = True) -> Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv(pixel_values)))))
        return y if mask is None else y * mask


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_a_dict_of_keyword_inputs_exports_in_forward_order(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    x, mask = torch.randn(2, 3, 12, 12), (torch.rand(2, 8, 8, 8) > 0.5).float()
    examples = {"mask": mask, "pixel_values": x}  # not in forward()'s order
    model = convert_batchnorm(_Keywords(), examples).eval()
    path = export_onnx(model, examples, tmp_path / "model.onnx", mode=mode).path
    assert [value.name for value in onnx.load(path).graph.input][:2] == ["pixel_values", "mask"]
    if mode == "training":
        for module in model.modules():
            if isinstance(module, BatchKalmanNormBase):
                module.train()
    with torch.no_grad():
        expected = model(x, mask).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([session.get_outputs()[0].name], {"pixel_values": x.numpy(), "mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (
            {"mask": torch.ones(2, 8, 8, 8)},
            r"keys \['mask'\]: give the first 2 forward\(\) arguments \['pixel_values', 'mask'\]",
        ),
        ({"images": torch.ones(2, 3, 12, 12)}, r"keys \['images'\]"),
        ({"pixel_values": torch.ones(2, 3, 12, 12), "mask": None}, r"example_inputs\['mask'\] is not a tensor"),
        ({}, r"example_inputs is an empty dict"),
    ],
)
def test_keyword_inputs_that_are_not_the_first_arguments_are_refused_naming_them(
    tmp_path: Path, examples: dict[str, object], message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        export_onnx(_Keywords().eval(), examples, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
