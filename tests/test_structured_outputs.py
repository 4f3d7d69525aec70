"""Models whose inputs and outputs are not one float tensor each: what a tester found wrong (2026-12-03, fourth
session), each checked end to end through the export and the parity check.

* a None among the outputs shifted every graph output name after it (with ``running_stats_io``, one layer's running
  variance was named as the next one's running mean);
* a Python int among the outputs (``x.shape[0]``, a symbolic size the exporter writes as an int64 scalar output) was
  dropped from the PyTorch side, so the tensors after it were compared with the wrong outputs (a wrong int passed);
* a forward that changes its input in place rewrote the arrays the runtimes were then fed (a correct file failed,
  and with the noise floor a wrong one passed), the caller's example tensor and the conversion's second forward;
* a bfloat16 output was read from OpenVINO as float16 bits; ONNX Runtime's binding, which cannot return one,
  counted as an error rather than "cannot run bfloat16";
* an fp16 export with a bool output crashed; a training export refused an index input (N,); an input the model
  also returns lost its name in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.export import export_onnx
from runtime.parity import Status, run_parity


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _DictWithNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Body()

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        y = self.body(x)
        return {"a": y, "n": None, "b": y.mean((2, 3))}


class _SizeFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Body()

    def forward(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        return x.shape[0], self.body(x)


class _ScalesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)  # in-place preprocessing of the input
        return self.body(x)


def _converted(model: nn.Module, example: Any) -> nn.Module:
    torch.manual_seed(0)
    convert_batchnorm(model, example)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.2, 0.2)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model.eval()


def _graph_io(path: Path) -> tuple[list[str], list[str]]:
    graph = onnx.load(path).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def _ran(report: Any) -> list[Any]:
    return [r for r in report.runtimes if r.ran]


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_a_none_among_the_outputs_shifts_no_name(tmp_path: Path, mode: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    model = _converted(_DictWithNone(), x)
    path = tmp_path / "model.onnx"
    export_onnx(model, x, path, mode=mode)
    assert _graph_io(path)[1][:2] == ["a", "b"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["b"], {"x": x.numpy()})[0]
    assert got.shape == (2, 4)
    report = run_parity(model, path, [{"x": x.numpy()}], mode=mode, runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed and not report.uncompared_outputs


def test_a_none_before_the_running_statistics_leaves_their_names_right(tmp_path: Path) -> None:
    """The running-statistics outputs follow the model's own; a None counted among those shifted them by one."""

    class TupleWithNone(_DictWithNone):
        def forward(self, x: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
            return self.body(x), None

    x = torch.randn(2, 3, 8, 8)
    model = _converted(TupleWithNone(), x)
    path = tmp_path / "model.onnx"
    export_onnx(model.train(), x, path, mode="training", running_stats_io=True)
    feeds = {"x": x.numpy()}
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            feeds[name] = buffer.numpy().copy()
    names = _graph_io(path)[1]
    outputs = dict(zip(names, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)))
    with torch.no_grad():
        model.train()(x)
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(outputs[f"{name}_out"], buffer.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_a_size_among_the_outputs_is_compared_and_keeps_the_pairing(tmp_path: Path, mode: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    model = _converted(_SizeFirst(), x)
    path, wrong = tmp_path / "model.onnx", tmp_path / "wrong.onnx"
    export_onnx(model, x, path, mode=mode)
    report = run_parity(model, path, [{"x": x.numpy()}], mode=mode, runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed, [(c.output, c.message) for r in _ran(report) for c in r.outputs]
    assert {c.output for r in _ran(report) for c in r.outputs} >= {"output_0", "output_1"}

    # the size output replaced by a constant 7: caught
    proto = onnx.load(path)
    graph = proto.graph
    seven = helper.make_tensor("seven", TensorProto.INT64, [], [7])
    graph.initializer.append(seven)
    for node in graph.node:
        node.output[:] = ["unused_size" if o == "output_0" else o for o in node.output]
    graph.node.append(helper.make_node("Identity", ["seven"], ["output_0"]))
    onnx.save(proto, wrong)
    report = run_parity(model, wrong, [{"x": x.numpy()}], mode=mode, runtimes="ort:cpu:all", localise_failures=False)
    failed = {c.output for r in _ran(report) for c in r.outputs if not c.passed}
    assert failed == {"output_0"}


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_a_forward_that_scales_its_input_in_place_changes_nothing_of_the_callers(tmp_path: Path, mode: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    kept = x.clone()
    model = _converted(_ScalesItsInput(), x)  # the conversion's guard runs the model twice on the example
    assert torch.equal(x, kept)
    path = tmp_path / "model.onnx"
    export_onnx(model, x, path, mode=mode)
    assert torch.equal(x, kept)
    feed = {"x": x.numpy().copy()}
    report = run_parity(model, path, [feed], mode=mode, runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed, [(c.output, c.message) for r in _ran(report) for c in r.outputs]
    np.testing.assert_array_equal(feed["x"], kept.numpy())


def test_a_wrong_file_of_a_model_that_scales_its_input_in_place_fails_with_the_noise_floor(tmp_path: Path) -> None:
    """The reference run had doubled the inputs: the float64 rerun then measured a 'noise' of the outputs' size."""
    x = torch.randn(2, 3, 8, 8)
    model = _converted(_ScalesItsInput(), x)
    path, wrong = tmp_path / "model.onnx", tmp_path / "wrong.onnx"
    export_onnx(model, x, path)
    proto = onnx.load(path)
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    values = onnx.numpy_helper.to_array(weight) + np.float32(0.05)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(proto, wrong)
    report = run_parity(
        model, wrong, [{"x": x.numpy()}], runtimes="ort:cpu:all", noise_floor=True, localise_failures=False
    )
    assert not report.passed


def test_a_bfloat16_output_is_read_as_bfloat16(tmp_path: Path) -> None:
    pytest.importorskip("openvino")

    class Bf16Head(_DictWithNone):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            y = self.body(x)
            return y, y.mean((2, 3)).to(torch.bfloat16)

    x = torch.randn(2, 3, 8, 8)
    model = _converted(Bf16Head(), x)
    path = tmp_path / "model.onnx"
    export_onnx(model, x, path)
    report = run_parity(
        model, path, [{"x": x.numpy()}], runtimes="ort:cpu:all,openvino:cpu,reference", localise_failures=False
    )
    by_name = {r.runtime: r for r in report.runtimes}
    assert by_name["openvino:cpu"].status is Status.PASSED, by_name["openvino:cpu"].outputs
    assert by_name["reference"].status is Status.PASSED
    # ONNX Runtime's Python binding cannot hand back a bfloat16 array: the runtime cannot run it, no error
    assert by_name["ort:cpu:all"].status is Status.UNAVAILABLE
    assert "No corresponding Numpy type" in by_name["ort:cpu:all"].reason
    assert report.passed


def test_node_localisation_takes_a_nan_both_sides_compute_as_agreement(tmp_path: Path) -> None:
    """log of a negative value is NaN in the file, on every runtime: against saved finite references the run fails,
    but no node of the runtime is blamed for computing what ONNX computes."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Log", ["t"], ["y"])], "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )  # fmt: skip
    path = tmp_path / "log.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    x = np.array([1.0, -1.0, 2.0, -3.0], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        report = run_parity(
            None, path, [{"x": x}], mode="inference", runtimes="ort:cpu:all",
            reference_outputs=[{"y": np.log(np.abs(2 * x))}],
        )  # fmt: skip
    (result,) = _ran(report)
    assert result.status is Status.FAILED
    assert result.localisation is not None and result.localisation.status == "not_localised"
    assert "every node output agrees" in result.localisation.message


def test_an_fp16_export_with_a_bool_output(tmp_path: Path) -> None:
    class Masked(_DictWithNone):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            y = self.body(x)
            return y, y > 0.5

    x = torch.randn(2, 3, 8, 8)
    model = _converted(Masked(), x)
    path = tmp_path / "model.onnx"
    export_onnx(model, x, path, fp16=True)
    feed = {"x": x.numpy().astype(np.float16)}
    report = run_parity(model, path, [feed], runtimes="ort:cpu:all", localise_failures=False)
    assert report.passed
    assert [c.dtype for r in _ran(report) for c in r.outputs] == ["float16", "bool"]


class _Embedded(nn.Module):
    """Index input (N,): Embedding → Linear → BatchNorm1d, twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.lin1, self.bn1 = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.lin2, self.bn2 = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.lin2(torch.relu(self.bn1(self.lin1(self.embed(index))))))


def test_a_training_export_takes_an_index_input(tmp_path: Path) -> None:
    index = torch.tensor([1, 3, 5, 7])
    model = _converted(_Embedded(), index)
    path = tmp_path / "model.onnx"
    export_onnx(model.train(), index, path, mode="training")
    report = run_parity(
        model, path, [{"index": index.numpy()}], mode="training", runtimes="ort:cpu:all", localise_failures=False
    )
    assert report.passed


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_an_input_the_model_also_returns_keeps_its_name(tmp_path: Path, mode: str) -> None:
    class PassesOn(_DictWithNone):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            return self.body(x), y

    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 5)
    model = _converted(PassesOn(), (x, y))
    path = tmp_path / "model.onnx"
    export_onnx(model, (x, y), path, mode=mode)
    inputs, outputs = _graph_io(path)
    assert inputs[:2] == ["x", "y"] and outputs[:2] == ["output_0", "output_1"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: v for i, v in zip(session.get_inputs(), (x.numpy(), y.numpy()))}
    np.testing.assert_array_equal(session.run(["output_1"], feeds)[0], y.numpy())


def test_a_model_returning_a_size_converts() -> None:
    """The conversion guard compares the outputs' structure; its copy had turned a torch.Size into a tuple."""

    class WithSize(_DictWithNone):
        def forward(self, x: torch.Tensor) -> dict[str, Any]:  # type: ignore[override]
            y = self.body(x)
            return {"y": y, "hw": y.shape[2:]}

    x = torch.randn(2, 3, 8, 8)
    model = _converted(WithSize(), x)
    assert model(x)["hw"] == torch.Size([8, 8])


def test_a_constant_number_among_the_outputs_is_named_when_the_export_fails(tmp_path: Path) -> None:
    from bkn_export.errors import ExportError

    class WithConstant(_DictWithNone):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:  # type: ignore[override]
            return self.body(x), 3

    x = torch.randn(2, 3, 8, 8)
    model = _converted(WithConstant(), x)
    with pytest.raises(ExportError, match=r"Output\(s\) 'output_1' of WithConstant are Python values"):
        export_onnx(model, x, tmp_path / "model.onnx")


def test_assert_parity_refuses_a_dict_of_inputs_by_name() -> None:
    from runtime import assert_parity
    from runtime.errors import BKNInputError

    x = torch.randn(2, 3, 8, 8)
    model = _converted(_DictWithNone(), x)
    with pytest.raises(BKNInputError, match=r"not a dict \(keys \['x'\]\)"):
        assert_parity(model, {"x": x})


def test_a_mask_of_a_half_precision_file_may_flip_within_max_mismatch(tmp_path: Path) -> None:
    """A float16 file's comparison can come out the other way than the float32 reference's for an element within
    rounding of the threshold: exact by default, with a note saying why; ``max_mismatch`` allows a share."""
    from runtime.compare import Criteria

    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "half"], ["mask"])], "mask",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1000])],
        [helper.make_tensor_value_info("mask", TensorProto.BOOL, [1000])],
        [helper.make_tensor("half", TensorProto.FLOAT16, [], [0.5])],
    )  # fmt: skip
    path = tmp_path / "mask.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    x = np.linspace(0, 1, 1000).astype(np.float16)
    reference = x > 0.5
    reference[np.argmin(np.abs(x.astype(np.float64) - 0.5))] ^= True  # the float32 model rounded it the other way
    runs = {
        "inputs": [{"x": x}],
        "mode": "inference",
        "runtimes": "ort:cpu:all",
        "reference_outputs": [{"mask": reference}],
    }
    report = run_parity(None, path, **runs)  # type: ignore[arg-type]
    assert not report.passed
    assert any("within rounding of a threshold" in note and "'mask'" in note for note in report.notes)
    assert run_parity(None, path, criteria=Criteria(max_mismatch=0.002), **runs).passed  # type: ignore[arg-type]
    assert not run_parity(None, path, criteria=Criteria(max_mismatch=0.0005), **runs).passed  # type: ignore[arg-type]


def test_a_size_among_the_example_inputs_is_recorded() -> None:
    """Recording the chain copies the example; its copy had turned a torch.Size into a tuple (a regression of the
    copies, found in review)."""

    class Resized(_DictWithNone):
        def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:  # type: ignore[override]
            assert isinstance(size, torch.Size)
            return nn.functional.interpolate(self.body(x), size=size[2:])

    x = torch.randn(2, 3, 8, 8)
    model = _converted(Resized(), (x, torch.Size([2, 4, 4, 4])))
    assert model(x, torch.Size([2, 4, 4, 4])).shape == (2, 4, 4, 4)


class _Pair(tuple):  # type: ignore[type-arg]
    """A tuple subclass torch's pytree does not know."""


def test_a_container_subclass_output_converts_and_its_training_file_is_compared(tmp_path: Path) -> None:
    class Paired(_DictWithNone):
        def forward(self, x: torch.Tensor) -> _Pair:  # type: ignore[override]
            y = self.body(x)
            return _Pair((y, y.mean((2, 3))))

    x = torch.randn(2, 3, 8, 8)
    model = _converted(Paired(), x)  # the guard had raised "Boolean value of Tensor ... is ambiguous"
    path = tmp_path / "model.onnx"
    export_onnx(model.train(), x, path, mode="training")
    report = run_parity(model, path, [{"x": x.numpy()}], mode="training", runtimes="ort:cpu:all")
    assert report.passed  # the PyTorch side had found "no tensors" in the subclass
    assert {c.output for r in _ran(report) for c in r.outputs} >= {"output_0", "output_1"}


def test_an_unregistered_dataclass_output_is_refused_by_name() -> None:
    from dataclasses import dataclass

    from bkn_export.errors import ConversionError

    @dataclass
    class Out:
        features: torch.Tensor

    class Boxed(_DictWithNone):
        def forward(self, x: torch.Tensor) -> Out:  # type: ignore[override]
            return Out(self.body(x))

    with pytest.raises(ConversionError, match=r"a Out: .*register the type with torch.utils._pytree"):
        convert_batchnorm(Boxed(), torch.randn(2, 3, 8, 8))


class _RegisteredTwice(nn.Module):
    """A block registered under two names and called through the second, as MONAI's DynUNet does (its
    ``input_block`` is also ``skip_layers.downsample``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.skip = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), self.conv2, self.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x)


@pytest.mark.parametrize("option", ["running_stats_io", "expose_posteriors"])
def test_layers_registered_under_two_names_export_their_statistics(tmp_path: Path, option: str) -> None:
    """torch.export traces such a module through copies: the export's observer did not know them ("did not run on
    the example inputs"), and parity's note called every layer missing from the file."""
    x = torch.randn(2, 3, 8, 8)
    model = _converted(_RegisteredTwice(), x)
    path = tmp_path / "model.onnx"
    export_onnx(model.train(), x, path, mode="training", **{option: True})
    report = run_parity(model, path, [{"x": x.numpy()}], mode="training", runtimes="ort:cpu:all")
    assert report.passed
    assert not any("no BatchKalmanNorm node" in note for note in report.notes), report.notes
