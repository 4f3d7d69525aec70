"""The exact speed rewrites of the exporter (bkn_export.export.speed_rules): a single-slope PRelu as LeakyRelu."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.export import export_onnx, speed_rules
from bkn_export.export.speed_rules import REWRITE_RULE_TAG, apply_speed_rules

_SPECIAL = np.array([0.0, -0.0, 1e-38, -1e-38, -3.5, 2.25, np.inf, -np.inf, np.nan, -1e30], np.float32)


def _prelu_graph(
    slope: np.ndarray, x_shape: list[int], dtype: int = TensorProto.FLOAT, slope_as_input: bool = False
) -> onnx.ModelProto:
    """y = PRelu(x, slope) with the slope an initializer (or a graph input)."""
    slope_tensor = numpy_helper.from_array(slope, "slope")
    inputs = [helper.make_tensor_value_info("x", dtype, x_shape)]
    initializers = [slope_tensor]
    if slope_as_input:
        inputs.append(helper.make_tensor_value_info("slope", dtype, list(slope.shape)))
        initializers = []
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"], name="act")],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", dtype, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return onnx.shape_inference.infer_shapes(model)


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph_model = ir.serde.deserialize_model(model)
    count = apply_speed_rules(graph_model)
    return ir.serde.serialize_model(graph_model), count


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("slope_shape", [(1,), (), (1, 1, 1, 1)])
def test_single_float32_slope_becomes_leaky_relu_with_the_same_outputs(slope_shape: tuple[int, ...]) -> None:
    slope = np.full(slope_shape, 0.3, np.float32)
    model = _prelu_graph(slope, [2, 5, 1, 10])
    rewritten, count = _rewritten(model)
    assert count == 1 and _ops(rewritten) == ["LeakyRelu"]
    (node,) = rewritten.graph.node
    assert helper.get_attribute_value(node.attribute[0]) == np.float32(0.3)  # the float32 slope, bit for bit
    assert {p.key: p.value for p in node.metadata_props}[REWRITE_RULE_TAG] == "PReluAsLeakyRelu"
    onnx.checker.check_model(rewritten, full_check=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 1, 10)).astype(np.float32)
    x.reshape(-1)[: _SPECIAL.size] = _SPECIAL

    def on_ort(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def on_reference(m: onnx.ModelProto) -> np.ndarray:
        return ReferenceEvaluator(m).run(None, {"x": x})[0]

    for runner in (on_ort, on_reference):
        before, after = runner(model), runner(rewritten)
        assert after.shape == before.shape == x.shape
        np.testing.assert_array_equal(after, before)  # NaN where NaN, zeros equal (signs may differ)


@pytest.mark.parametrize(
    ("slope", "x_shape", "dtype", "as_input", "why"),
    [
        (np.full((5, 1, 1), 0.3, np.float32), [2, 5, 1, 10], TensorProto.FLOAT, False, "per channel"),
        (np.full((1,), 0.3, np.float64), [2, 5], TensorProto.DOUBLE, False, "float64"),
        (np.full((1,), 0.3, np.float16), [2, 5], TensorProto.FLOAT16, False, "float16"),
        (np.full((1, 1, 1), 0.3, np.float32), [2, 5], TensorProto.FLOAT, False, "slope rank above x's"),
        (np.full((1,), 0.3, np.float32), [2, 5], TensorProto.FLOAT, True, "slope a graph input"),
    ],
)
def test_prelu_kept_where_the_rewrite_would_not_be_exact(
    slope: np.ndarray, x_shape: list[int], dtype: int, as_input: bool, why: str
) -> None:
    rewritten, count = _rewritten(_prelu_graph(slope, x_shape, dtype, slope_as_input=as_input))
    assert count == 0 and _ops(rewritten) == ["PRelu"], why


def _scopes(node: onnx.NodeProto) -> str:
    return {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")


class _PReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(init=0.2)
        self.per_channel = nn.PReLU(4, init=0.1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.per_channel(self.act(self.bn(self.conv(x)))))


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_export_writes_leaky_relu_that_computes_what_torch_and_the_prelu_graph_compute(tmp_path, mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = convert_batchnorm(_PReluNet(), x)
    model.train(mode == "training")
    export_onnx(model, x, tmp_path / "fast.onnx", mode=mode)
    with speed_rules.disabled():
        export_onnx(model, x, tmp_path / "plain.onnx", mode=mode)
    fast, plain = onnx.load(str(tmp_path / "fast.onnx")), onnx.load(str(tmp_path / "plain.onnx"))
    assert _ops(fast).count("LeakyRelu") == 1 and _ops(fast).count("PRelu") == 1  # nn.PReLU(4) stays
    assert "LeakyRelu" not in _ops(plain) and _ops(plain).count("PRelu") == 2
    (leaky,) = [n for n in fast.graph.node if n.op_type == "LeakyRelu"]
    (original,) = [n for n in plain.graph.node if n.op_type == "PRelu" and "act'" in _scopes(n)]
    assert leaky.name == original.name
    kept = {p.key: p.value for p in leaky.metadata_props}
    for prop in original.metadata_props:  # the module it came from, as localisation and reports read it
        if prop.key.startswith("pkg.torch.onnx.") or prop.key == "namespace":
            assert kept[prop.key] == prop.value
    probe = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(probe).numpy()
    outputs = []
    for path in (tmp_path / "fast.onnx", tmp_path / "plain.onnx"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(outputs[0], expected, rtol=1e-5, atol=1e-5)
