"""The ONNX op ``ai.bkn::BatchKalmanNorm``: one contract (op_spec) for schema, function body and doc.

The function body is run on a single-node model in ONNX Runtime (every optimisation
level) and the reference evaluator and compared with ``bkn_export.functional``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import defs, helper
from onnx.reference import ReferenceEvaluator

from bkn_export import functional as Fk
from bkn_export.errors import ExportError
from bkn_export.export.op import function_body, op_spec, schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops" / "BatchKalmanNorm.md"
ORT_LEVELS = [
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
]
_ONNX_TYPES: dict[Any, int] = {
    np.float32: onnx.TensorProto.FLOAT,
    np.float64: onnx.TensorProto.DOUBLE,
    np.float16: onnx.TensorProto.FLOAT16,
}


def single_node_model(
    opset: int,
    x_dtype: type,
    u_dtype: type,
    rank: int,
    **attributes: float | str,
) -> onnx.ModelProto:
    """A model with one BatchKalmanNorm node, every port a graph input/output, and the function body."""
    schema.register_schema()
    attrs: dict[str, Any] = {**op_spec.attribute_defaults(), **attributes}
    node = helper.make_node(
        op_spec.OP_TYPE,
        [p.name for p in op_spec.INPUTS],
        [p.name for p in op_spec.OUTPUTS],
        name="bkn0",
        domain=op_spec.DOMAIN,
        **attrs,
    )
    x_type, u_type = _ONNX_TYPES[x_dtype], _ONNX_TYPES[u_dtype]
    x_shape = ["N", "C", *[f"D{i}" for i in range(rank - 2)]]
    inputs = [helper.make_tensor_value_info("X", x_type, x_shape)]
    inputs += [helper.make_tensor_value_info(p.name, u_type, ["C"]) for p in op_spec.INPUTS[1:]]
    outputs = [helper.make_tensor_value_info("Y", x_type, x_shape)]
    outputs += [helper.make_tensor_value_info(p.name, u_type, ["C"]) for p in op_spec.OUTPUTS[1:]]
    graph = helper.make_graph([node], "bkn_single", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(op_spec.DOMAIN, op_spec.DOMAIN_VERSION)],
        functions=[function_body.function_proto(opset)],
    )
    model.ir_version = 9
    return model


def random_feeds(shape: tuple[int, ...], x_dtype: type, u_dtype: type, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = shape[1]
    return {
        "X": (rng.standard_normal(shape) * 1.7 + 0.6).astype(x_dtype),
        "prior_mean": rng.standard_normal(c).astype(u_dtype),
        "prior_variance": rng.uniform(0.2, 3.0, c).astype(u_dtype),
        "prior_weight": rng.uniform(0.0, 0.95, c).astype(u_dtype),
        "scale": rng.uniform(0.5, 1.5, c).astype(u_dtype),
        "B": rng.standard_normal(c).astype(u_dtype),
    }


def reference(feeds: dict[str, np.ndarray], epsilon: float, fallback_ratio: float) -> list[np.ndarray]:
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    step = Fk.batch_kalman_norm(
        t["X"], t["prior_mean"], t["prior_variance"], t["prior_weight"], t["scale"], t["B"], epsilon, fallback_ratio
    )
    return [step.output.numpy(), step.posterior_mean.numpy(), step.posterior_variance.numpy()]


def run_ort(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: ort.GraphOptimizationLevel
) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# --------------------------------------------------------------------------- schema


def test_schema_is_built_from_op_spec() -> None:
    built = schema.build_schema()
    assert (built.name, built.domain, built.since_version) == (op_spec.OP_TYPE, op_spec.DOMAIN, op_spec.DOMAIN_VERSION)
    assert [p.name for p in built.inputs] == [p.name for p in op_spec.INPUTS]
    assert [p.type_str for p in built.inputs] == [p.type_var for p in op_spec.INPUTS]
    assert [p.name for p in built.outputs] == [p.name for p in op_spec.OUTPUTS]
    assert [p.type_str for p in built.outputs] == [p.type_var for p in op_spec.OUTPUTS]
    assert {name: helper.get_attribute_value(a.default_value) for name, a in built.attributes.items()} == {
        a.name: (a.default.encode() if isinstance(a.default, str) else pytest.approx(a.default))
        for a in op_spec.ATTRIBUTES
    }
    assert {c.type_param_str: sorted(c.allowed_type_strs) for c in built.type_constraints} == {
        name: sorted(types) for name, (types, _) in op_spec.TYPE_CONSTRAINTS.items()
    }


def test_register_schema_is_idempotent() -> None:
    schema.register_schema()
    schema.register_schema()
    found = defs.get_schema(op_spec.OP_TYPE, op_spec.DOMAIN_VERSION, op_spec.DOMAIN)
    assert found.has_type_and_shape_inference_function
    assert schema.is_registered()


def test_plugin_fields_are_stable() -> None:
    """The TensorRT plugin is built from these; renaming them breaks its creator lookup."""
    assert (op_spec.DOMAIN, op_spec.OP_TYPE, op_spec.DOMAIN_VERSION) == ("ai.bkn", "BatchKalmanNorm", 1)
    assert (op_spec.PLUGIN_NAME, op_spec.PLUGIN_VERSION, op_spec.PLUGIN_NAMESPACE) == ("BatchKalmanNorm", "1", "bkn")
    assert [p.name for p in op_spec.INPUTS] == ["X", "prior_mean", "prior_variance", "prior_weight", "scale", "B"]
    assert [p.name for p in op_spec.OUTPUTS] == ["Y", "posterior_mean", "posterior_variance"]
    assert [a.name for a in op_spec.ATTRIBUTES] == ["epsilon", "fallback_ratio", "plugin_version", "plugin_namespace"]


# --------------------------------------------------------------------------- function body


@pytest.mark.parametrize("opset", [op_spec.MIN_OPSET, 20, op_spec.MAX_OPSET])
def test_function_signature_follows_op_spec(opset: int) -> None:
    proto = function_body.function_proto(opset)
    assert (proto.domain, proto.name) == (op_spec.DOMAIN, op_spec.OP_TYPE)
    assert list(proto.input) == [p.name for p in op_spec.INPUTS]
    assert list(proto.output) == [p.name for p in op_spec.OUTPUTS]
    assert [a.name for a in proto.attribute_proto] == [a.name for a in op_spec.ATTRIBUTES]
    assert {helper.get_attribute_value(a) for a in proto.attribute_proto if a.type == onnx.AttributeProto.STRING} == {
        op_spec.PLUGIN_VERSION.encode(),
        op_spec.PLUGIN_NAMESPACE.encode(),
    }
    assert {e.domain: e.version for e in proto.opset_import}.get("") == opset


@pytest.mark.parametrize("opset", [op_spec.MIN_OPSET - 1, op_spec.MAX_OPSET + 1])
def test_function_rejects_opsets_outside_the_spec(opset: int) -> None:
    with pytest.raises(ExportError, match=rf"opsets {op_spec.MIN_OPSET}\.\.{op_spec.MAX_OPSET}"):
        function_body.function_proto(opset)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 4, 5, 3), (2, 2, 3, 2, 2), (1, 3, 4, 4)])
def test_function_body_matches_functional_on_ort_and_reference(shape: tuple[int, ...]) -> None:
    model = single_node_model(op_spec.MIN_OPSET, np.float32, np.float32, len(shape), epsilon=1e-3)
    onnx.checker.check_model(model, full_check=True)
    feeds = random_feeds(shape, np.float32, np.float32)
    expected = reference(feeds, 1e-3, 0.0)
    for level in ORT_LEVELS:
        for got, want in zip(run_ort(model, feeds, level), expected):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"ORT level {level}")
    for got, want in zip(ReferenceEvaluator(model).run(None, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg="reference evaluator")


def test_function_body_in_double() -> None:
    model = single_node_model(op_spec.MAX_OPSET, np.float64, np.float64, 4)
    feeds = random_feeds((3, 4, 5, 5), np.float64, np.float64)
    expected = reference(feeds, 1e-5, 0.0)
    for got, want in zip(run_ort(model, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), expected):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_half_input_keeps_float32_statistics() -> None:
    """X float16 → Y float16; statistics computed and returned in float32 (type U)."""
    model = single_node_model(op_spec.MIN_OPSET, np.float16, np.float32, 4)
    onnx.checker.check_model(model, full_check=True)
    feeds = random_feeds((4, 3, 6, 6), np.float16, np.float32)
    expected = reference(feeds, 1e-5, 0.0)
    got: list[Any] = list(ReferenceEvaluator(model).run(None, feeds))
    assert [g.dtype for g in got] == [np.float16, np.float32, np.float32]
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[2], expected[2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[0].astype(np.float32), expected[0].astype(np.float32), rtol=0, atol=4e-3)


@pytest.mark.parametrize("fires", [True, False])
def test_fallback_ratio_switches_to_batch_statistics(fires: bool) -> None:
    """mean(prior_variance / var(X)) ≥ fallback_ratio → p = 0: the op is BatchNormalization."""
    feeds = random_feeds((6, 3, 4), np.float32, np.float32)
    batch_variance = feeds["X"].var(axis=(0, 2))
    ratio = float(np.mean(feeds["prior_variance"] / batch_variance))
    fallback_ratio = ratio * (0.9 if fires else 1.1)
    model = single_node_model(op_spec.MIN_OPSET, np.float32, np.float32, 3, fallback_ratio=fallback_ratio)
    got = run_ort(model, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    expected = reference(feeds, 1e-5, fallback_ratio)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
    batch_mean = feeds["X"].mean(axis=(0, 2))
    assert np.allclose(got[1], batch_mean, atol=1e-6) == fires


def test_shape_inference_of_the_node() -> None:
    model = single_node_model(op_spec.MIN_OPSET, np.float16, np.float32, 4)
    del model.graph.output[1:]  # let inference find the statistics' type and shape
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    for name in ("posterior_mean", "posterior_variance"):
        assert types[name].elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_param for d in types[name].shape.dim] == ["C"]


def test_shape_inference_rejects_a_prior_of_another_channel_count() -> None:
    model = single_node_model(op_spec.MIN_OPSET, np.float32, np.float32, 4)
    x = model.graph.input[0].type.tensor_type.shape
    x.dim[1].dim_value = 8
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 5
    with pytest.raises(onnx.shape_inference.InferenceError, match="prior_mean"):
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


# --------------------------------------------------------------------------- the operator doc


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_doc_lists_every_port_and_attribute_of_op_spec() -> None:
    text = _doc()
    for port in (*op_spec.INPUTS, *op_spec.OUTPUTS):
        assert re.search(rf"^\| `{port.name}` \| {port.type_var} \| `{re.escape(port.shape)}` \|", text, re.M), (
            port.name
        )
    for attribute in op_spec.ATTRIBUTES:
        default = f'"{attribute.default}"' if isinstance(attribute.default, str) else repr(attribute.default)
        row = rf"^\| `{attribute.name}` \| {attribute.kind} \| `{re.escape(default)}` \|"
        assert re.search(row, text, re.M), attribute.name
    for name, (types, _) in op_spec.TYPE_CONSTRAINTS.items():
        assert re.search(rf"^\| {name} \| {re.escape(', '.join(types))} \|", text, re.M), name
    assert f"domain `{op_spec.DOMAIN}`, version {op_spec.DOMAIN_VERSION}" in text
    assert f"opsets {op_spec.MIN_OPSET} to {op_spec.MAX_OPSET}" in text


def _worked_example() -> dict[str, Any]:
    match = re.search(r"<!-- worked-example -->\s*```json\n(.*?)```", _doc(), re.S)
    assert match, "the worked example block is missing from the doc"
    return json.loads(match.group(1))


def test_worked_example_numbers_are_recomputed() -> None:
    example = _worked_example()
    inputs = {k: np.asarray(v, dtype=np.float32) for k, v in example["inputs"].items()}  # type: ignore[union-attr]
    attributes = example["attributes"]
    assert isinstance(attributes, dict)
    expected = reference(inputs, attributes["epsilon"], attributes["fallback_ratio"])
    model = single_node_model(op_spec.MIN_OPSET, np.float32, np.float32, inputs["X"].ndim, **attributes)
    got = run_ort(model, inputs, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    documented = example["outputs"]
    assert isinstance(documented, dict)
    for port, want, runtime in zip(op_spec.OUTPUTS, expected, got):
        np.testing.assert_allclose(np.asarray(documented[port.name], dtype=np.float32), want, rtol=0, atol=6e-5)
        np.testing.assert_allclose(runtime, want, rtol=0, atol=1e-5)
