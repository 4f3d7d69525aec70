"""Parity verdicts a cold QA found wrong (2026-12-06, fourth session).

* A float64 input the model computes in float64 was rounded to float32 (the parameters' dtype) before PyTorch ran:
  a faithful file failed, and the report blamed rounding. Wider inputs now keep the file's dtype; a model that
  refuses them gets them rounded, with a note saying so.
* A float16 file whose refused ONNX Runtime node computes in no half type (a uint16 ``Max``) made ONNX Runtime
  "unavailable" and parity passed: the refusal is the file's failure, as in a float32 file.
* A malformed Polygraphy ``RunResults`` pair raised a traceback and exit 1 ("a runtime differs").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from bkn_export.export.api import export_onnx
from runtime.errors import SavedDataError
from runtime.parity import Status, run_parity
from runtime.polygraphy_io import load_outputs


class _TimeEncoding(nn.Module):
    """float32 weights, a float64 timestamp computed with in float64 (its sine at a high frequency)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.linear(x) + torch.sin(t * 1000.0).to(torch.float32)


def test_a_float64_input_the_model_computes_in_float64_reaches_pytorch_unrounded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TimeEncoding().eval()
    x, t = torch.randn(2, 4), torch.rand(2, 3, dtype=torch.float64) * 1000
    path = tmp_path / "time.onnx"
    export_onnx(model, (x, t), str(path))
    report = run_parity(model, path, {"x": x.numpy(), "t": t.numpy()}, runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed, report.runtimes
    assert not any("rounded" in note for note in report.notes)


class _Float32Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def test_a_model_that_refuses_the_files_wider_inputs_gets_them_rounded_with_a_note(tmp_path: Path) -> None:
    """A float64 export of the model (``model.double()``) against the float32 model: the conv refuses float64, so
    the inputs are rounded for the reference (as before), and the report says the reference saw other values."""
    torch.manual_seed(0)
    model = _Float32Conv().eval()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    path = tmp_path / "double.onnx"
    export_onnx(_Float32Conv().double().eval(), (x,), str(path))
    report = run_parity(model, path, {"x": x.numpy()}, runtimes="reference", localise_failures=False)
    assert any("refuses the file's wider floating inputs ['x (float64)']" in note for note in report.notes), (
        report.notes
    )


def _uint16_max(elem: int, path: Path) -> Path:
    nodes = [
        helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT16),
        helper.make_node("Max", ["u", "one"], ["v"], name="max_u16"),
        helper.make_node("Cast", ["v"], ["y"], to=elem),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [4])],
        [helper.make_tensor_value_info("y", elem, [4])],
        [numpy_helper.from_array(np.array([1], np.uint16), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_refused_node_that_computes_in_no_half_type_fails_the_file_in_float16_too(
    tmp_path: Path, dtype: type
) -> None:
    pytest.importorskip("onnxruntime")
    elem = TensorProto.FLOAT if dtype is np.float32 else TensorProto.FLOAT16
    path = _uint16_max(elem, tmp_path / "u16.onnx")
    x = np.array([1, 2, 3, 4], dtype)
    report = run_parity(
        None, path, {"x": x}, runtimes="ort:cpu:all", reference_outputs=[{"y": np.maximum(x, 1).astype(dtype)}]
    )
    (result,) = [r for r in report.runtimes if r.runtime == "ort:cpu:all"]
    assert result.status is Status.ERROR, result
    assert "max_u16" in result.reason or "Max(13)" in result.reason
    assert not report.passed


@pytest.mark.parametrize("pair", [["pytorch"], ["a", [], "extra"]])
def test_a_malformed_run_results_pair_is_a_saved_data_error(tmp_path: Path, pair: list[object]) -> None:
    import json

    path = tmp_path / "out.json"
    path.write_text(json.dumps({"lst": [pair], "polygraphy_class": "RunResults"}))
    with pytest.raises(SavedDataError, match="not a Polygraphy JSON file"):
        load_outputs(path)


def _masked_matmul(weight: np.ndarray, masked: bool) -> onnx.ModelProto:
    """y = MatMul(x, W) (× Cast_f32(Cast_f16(x > 0)) where masked), all float32 but the exact 0/1 mask."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"])]
    if masked:
        nodes += [
            helper.make_node("Greater", ["x", "zero"], ["positive"]),
            helper.make_node("Cast", ["positive"], ["mask16"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["mask16"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["m", "mask"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Relu", ["m"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("masked", [False, True])
def test_an_exact_mask_cast_through_float16_keeps_float32_tolerances(masked: bool) -> None:
    """A bool → float16 → float32 mask is exact: the output is still computed in float32 (before, the whole output
    was judged at float16 tolerances and a 0.05 % weight fault passed)."""
    from runtime.precision import computed_precision

    model = _masked_matmul(np.eye(4, dtype=np.float32), masked)
    assert computed_precision(model) == {}
    half_mask = _masked_matmul(np.eye(4, dtype=np.float32), True)
    half_mask.graph.node[1].op_type = "Cast"  # a float value cast to float16 does round: that still counts
    half_mask.graph.node[1].ClearField("input")
    half_mask.graph.node[1].input.extend(["x"])
    half_mask.graph.node[1].attribute.extend([helper.make_attribute("to", TensorProto.FLOAT16)])
    assert computed_precision(half_mask) == {"y": "float16"}


def test_saved_outputs_with_intermediate_values_compare_the_graph_outputs_with_a_note(tmp_path: Path) -> None:
    """Polygraphy's ``--onnx-outputs mark all`` saves every intermediate value too: those were refused as "another
    model's" outputs. They are left out with a note; a name the file does not compute is still refused."""
    nodes = [helper.make_node("Neg", ["x"], ["hidden"]), helper.make_node("Relu", ["hidden"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    saved = {"y": np.maximum(-x, 0), "hidden": -x}
    report = run_parity(None, path, {"x": x}, runtimes="reference", reference_outputs=[saved])
    assert report.passed
    assert any("only the graph outputs are compared" in note for note in report.notes), report.notes
    with pytest.raises(SavedDataError, match="belong to another model"):
        run_parity(None, path, {"x": x}, runtimes="reference", reference_outputs=[{**saved, "elsewhere": x}])


class _SharedModules(nn.Module):
    """A tied Linear and a reused Tanh, each called twice: their outputs are not compared."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.lin, self.act, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.lin(self.pre(x)))
        return self.head(self.act(self.lin(x)))


def test_a_fault_among_shared_modules_is_not_pinned_on_one_without_saying_so(tmp_path: Path) -> None:
    """A fault in the tied ``lin`` showed as "act, in its own code": the localisation now names the modules run more
    than once, which have no compared output, as where the divergence may be."""
    torch.manual_seed(0)
    model = _SharedModules().eval()
    path = tmp_path / "shared.onnx"
    export_onnx(model, (torch.randn(2, 4),), str(path))
    proto = onnx.load(path)
    for index, initializer in enumerate(proto.graph.initializer):
        if initializer.name == "lin.bias":
            faulty = numpy_helper.to_array(initializer) + 0.05
            proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(faulty, initializer.name))
    onnx.save(proto, path)
    report = run_parity(model, path, runtimes="reference")
    (result,) = report.runtimes
    assert result.status is Status.FAILED and result.localisation is not None
    assert "modules run more than once per forward ('lin', 'act')" in result.localisation.message


def test_an_unnamed_refused_node_is_excused_only_where_every_node_of_its_type_computes_in_half(tmp_path: Path) -> None:
    """ONNX Runtime names an unnamed node ''. A refused uint16 ``Max`` beside a float16 ``Max`` is the file's failure
    (the second QA round: the first rule excused it by the float16 one)."""
    pytest.importorskip("onnxruntime")
    nodes = [
        helper.make_node("Max", ["x", "x"], ["h"]),  # float16: ONNX Runtime runs it
        helper.make_node("Cast", ["h"], ["u"], to=TensorProto.UINT16),
        helper.make_node("Max", ["u", "one"], ["v"]),  # uint16: refused
        helper.make_node("Cast", ["v"], ["y"], to=TensorProto.FLOAT16),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])],
        [numpy_helper.from_array(np.array([1], np.uint16), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, path)
    x = np.array([1, 2, 3, 4], np.float16)
    report = run_parity(None, path, {"x": x}, runtimes="ort:cpu:all", reference_outputs=[{"y": np.maximum(x, 1)}])
    (result,) = [r for r in report.runtimes if r.runtime == "ort:cpu:all"]
    assert result.status is Status.ERROR, result
