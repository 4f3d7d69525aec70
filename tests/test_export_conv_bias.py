"""A Conv's bias in the exported file is absent or of shape (C_out,): what every runtime needs.

torch.onnx (onnxscript's ``aten_conv3d``, microsoft/onnxscript#2931) stands in a zero bias of shape (C_out, 2) for a
bias-free Conv3d; ``run_dynamo_export`` removes it in every ``graph_optimizer`` form and refuses any other
mis-shaped constant bias (``check_conv_biases``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.errors import ExportError
from bkn_export.export import common, export_onnx
from bkn_export.export.common import check_conv_biases
from runtime.parity import run_parity

RUNTIMES = "ort:cpu:all,reference"


def conv3d_net() -> tuple[nn.Module, torch.Tensor]:
    """Two bias-free Conv3d, each followed by a BatchNorm3d converted to BKN (MONAI's SegResNet / VNet blocks)."""
    model = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.Conv3d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm3d(6),
    ).eval()
    example = torch.randn(2, 1, 4, 4, 4)
    convert_batchnorm(model, example)
    return model, example


def misshapen_conv_biases(proto: onnx.ModelProto) -> list[str]:
    """Each Conv / ConvTranspose whose bias is not an initializer of shape [C_out] (read from the proto, not from
    the guard under test)."""
    initializers = {tensor.name: list(tensor.dims) for tensor in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 3 or not node.input[2]:
            continue
        weight = initializers[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_channels = weight[0] if node.op_type == "Conv" else weight[1] * group
        if initializers.get(node.input[2]) != [out_channels]:
            found.append(f"{node.name}: bias {node.input[2]} {initializers.get(node.input[2], 'computed')}")
    return found


@pytest.mark.parametrize(
    ("mode", "graph_optimizer"),
    [("training", "full"), ("training", "fold"), ("training", "none"), ("inference", None)],
)
def test_a_bias_free_conv3d_exports_a_file_that_runs_and_matches(
    mode: str, graph_optimizer: str | None, tmp_path: Path
) -> None:
    """Every form: no Conv bias of the wrong shape, and ONNX Runtime (every level) and the reference evaluator
    match PyTorch."""
    model, example = conv3d_net()
    path = tmp_path / f"{mode}_{graph_optimizer}.onnx"
    options = {} if graph_optimizer is None else {"graph_optimizer": graph_optimizer}
    export_onnx(model, example, path, mode=mode, **options)
    assert misshapen_conv_biases(onnx.load(str(path))) == []
    report = run_parity(model, path, runtimes=RUNTIMES)
    assert report.passed, report.failures()


def test_without_the_repair_the_guard_refuses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: with the zero-bias removal switched off, "fold" leaves the (C_out, 2) bias, and the export
    raises naming the Conv instead of writing a file no runtime runs."""
    monkeypatch.setattr(common, "_drop_zero_conv_biases", lambda model: 0)
    model, example = conv3d_net()
    path = tmp_path / "fold.onnx"
    with pytest.raises(ExportError, match=r"Conv node 'node_conv3d'.*shape \[4, 2\].*\[4\]"):
        export_onnx(model, example, path, mode="training", graph_optimizer="fold")
    assert not path.exists()


# --------------------------------------------------------------------------- the graph passes, on small graphs


def _conv_graph(
    bias: np.ndarray | None,
    op_type: str = "Conv",
    weight_shape: tuple[int, ...] = (4, 1, 3, 3, 3),
    group: int = 1,
    bias_as_graph_input: bool = False,
) -> ir.Model:
    """``Y = op_type(X, W[, B], group)`` with W (and B) initializers; B can also be a graph input."""
    weight = helper.make_tensor("W", onnx.TensorProto.FLOAT, weight_shape, np.ones(weight_shape).ravel().tolist())
    inputs, initializers = ["X", "W"], [weight]
    graph_inputs = [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None)]
    if bias is not None:
        inputs.append("B")
        initializers.append(helper.make_tensor("B", onnx.TensorProto.FLOAT, bias.shape, bias.ravel().tolist()))
        if bias_as_graph_input:
            graph_inputs.append(helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, bias.shape))
    node = helper.make_node(op_type, inputs, ["Y"], name="the_conv", group=group)
    graph = helper.make_graph(
        [node], "g", graph_inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], initializers
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _upstream_conv3d_graph() -> ir.Model:
    """The chain torch.onnx traces for a bias-free Conv3d (``graph_optimizer="none"``):
    ``Conv(X, W, Expand(CastLike(0, X), Concat(Shape(W)[:1], [2])))``."""
    proto = onnx.parser.parse_model(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 1, 4, 4, 4] X) => (float Y)
        <float[4, 1, 3, 3, 3] W = {"""
        + ", ".join(["1.0"] * 108)
        + """}>
        {
            zero = Constant <value = float {0.0}> ()
            zero_like = CastLike (zero, X)
            out_channels = Shape <start = 0, end = 1> (W)
            two = Constant <value_ints = [2]> ()
            bias_shape = Concat <axis = 0> (out_channels, two)
            bias = Expand (zero_like, bias_shape)
            Y = Conv <pads = [1, 1, 1, 1, 1, 1]> (X, W, bias)
        }
        """
    )
    return ir.from_proto(proto)


def test_the_upstream_zero_bias_chain_is_removed_with_what_only_fed_it() -> None:
    model = _upstream_conv3d_graph()
    assert common._drop_zero_conv_biases(model) == 1
    assert [node.op_type for node in model.graph] == ["Conv"]
    assert len(next(iter(model.graph)).inputs) == 2
    check_conv_biases(model)


@pytest.mark.parametrize(
    ("bias", "removed"),
    [
        (np.zeros((4, 2)), True),  # what "fold" makes of the upstream chain
        (np.zeros(4), False),  # a 1-D parameter that happens to be zero: the model's, kept
        (np.array([[0.0, 1.0]] * 4), False),  # not all zeros
        (np.array([np.nan] * 4), False),
    ],
)
def test_only_a_provably_zero_non_parameter_bias_is_removed(bias: np.ndarray, removed: bool) -> None:
    model = _conv_graph(bias)
    assert common._drop_zero_conv_biases(model) == int(removed)
    conv = next(iter(model.graph))
    assert (len(conv.inputs) == 2) == removed
    assert ("B" in model.graph.initializers) != removed


def test_a_bias_a_caller_can_feed_is_not_provably_zero() -> None:
    model = _conv_graph(np.zeros((4, 2)), bias_as_graph_input=True)
    assert common._drop_zero_conv_biases(model) == 0


@pytest.mark.parametrize(
    ("op_type", "weight_shape", "group", "bias_shape"),
    [
        ("Conv", (4, 1, 3, 3, 3), 1, (4,)),
        ("Conv", (6, 2, 3, 3), 2, (6,)),
        ("ConvTranspose", (4, 3, 3, 3), 1, (3,)),
        ("ConvTranspose", (4, 3, 3, 3), 2, (6,)),  # C_out = W.shape[1] * group
    ],
)
def test_the_guard_passes_a_bias_of_shape_c_out(
    op_type: str, weight_shape: tuple[int, ...], group: int, bias_shape: tuple[int, ...]
) -> None:
    check_conv_biases(_conv_graph(np.ones(bias_shape), op_type, weight_shape, group))


@pytest.mark.parametrize(
    ("op_type", "weight_shape", "group", "bias_shape"),
    [
        ("Conv", (4, 1, 3, 3, 3), 1, (4, 2)),  # the upstream shape, non-zero: not removable
        ("Conv", (4, 1, 3, 3, 3), 1, (8,)),
        ("Conv", (4, 1, 3, 3, 3), 1, ()),
        ("ConvTranspose", (4, 3, 3, 3), 2, (3,)),
    ],
)
def test_the_guard_refuses_a_misshapen_constant_bias_naming_the_node(
    op_type: str, weight_shape: tuple[int, ...], group: int, bias_shape: tuple[int, ...]
) -> None:
    model = _conv_graph(np.full(bias_shape, 0.5), op_type, weight_shape, group)
    with pytest.raises(ExportError, match=rf"{op_type} node 'the_conv': its bias 'B' has shape \[.*\(weight"):
        check_conv_biases(model)
