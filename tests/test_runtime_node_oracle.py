"""Node-by-node localisation does not trust the ONNX reference evaluator where it failed in the same run.

Cold QA on ONNX's backend test models (2026-12-07): onnx 1.23's reference evaluator computes an opset-9
BatchNormalization with batch statistics. With saved outputs one element off (a wrong reference file), ONNX Runtime
correctly failed, but its correct BatchNormalization was blamed ("from the evaluator's own inputs it computes the same
difference"), and the repro bundle "confirmed" that non-bug. The evaluator's own failure was never localised, though
ONNX Runtime agreed with the reference in that run. Now an evaluator that failed in the run is no oracle: a runtime
that agreed is one, or the failure is not localised, with the reason.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bkn_export import BatchKalmanNorm2d
from bkn_export.export import export_onnx
from runtime.backends.reference import ReferenceEvaluatorBackend
from runtime.parity import run_parity

_C = 4


def _conv_bn9(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """Conv -> BatchNormalization (opset 9, inference) -> Relu, its input, and its output computed in float64."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((_C, 3, 3, 3)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, _C).astype(np.float32), rng.standard_normal(_C).astype(np.float32)
    mean, variance = rng.standard_normal(_C).astype(np.float32), rng.uniform(0.5, 3, _C).astype(np.float32)
    arrays = [(weight, "W"), (scale, "scale"), (bias, "bias"), (mean, "mean"), (variance, "var")]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], epsilon=1e-5, name="bn"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, _C, 6, 6])],
        [numpy_helper.from_array(a, n) for a, n in arrays],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    path = tmp_path / "conv_bn9.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((2, _C, 6, 6))
    for i in range(6):
        for j in range(6):
            conv[:, :, i, j] = np.einsum("nckl,ockl->no", padded[:, :, i : i + 3, j : j + 3], weight.astype(np.float64))
    per_channel = [a.reshape(1, -1, 1, 1).astype(np.float64) for a in (mean, variance, scale, bias)]
    y = np.maximum((conv - per_channel[0]) / np.sqrt(per_channel[1] + 1e-5) * per_channel[2] + per_channel[3], 0)
    return path, {"x": x}, y.astype(np.float32)


def _evaluator_is_wrong(path: Path, inputs: dict[str, np.ndarray], expected: np.ndarray) -> bool:
    backend = ReferenceEvaluatorBackend()
    backend.load(str(path))
    return not np.allclose(backend.run(inputs)["y"], expected, atol=1e-3)


@pytest.fixture
def conv_bn9(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    path, inputs, expected = _conv_bn9(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, inputs)[0], expected, rtol=1e-4, atol=1e-5)  # ONNX Runtime is right
    if not _evaluator_is_wrong(path, inputs, expected):
        pytest.skip("this onnx's reference evaluator computes opset-9 BatchNormalization right: no wrong oracle here")
    return path, inputs, expected


def test_the_evaluators_own_failure_is_localised_against_a_runtime_that_agreed(
    conv_bn9: tuple[Path, dict[str, np.ndarray], np.ndarray],
) -> None:
    path, inputs, expected = conv_bn9
    report = run_parity(
        None, path, [inputs], runtimes="ort:cpu:all,reference", reference_outputs=[{"y": expected}], seed=None
    )
    statuses = {r.runtime: r.status for r in report.runtimes}
    assert statuses == {"ort:cpu:all": "passed", "reference": "failed"}
    localisation = next(r for r in report.runtimes if r.runtime == "reference").localisation
    assert localisation is not None and localisation.status == "localised"
    assert localisation.first is not None and localisation.first.onnx_node == "bn"
    assert "against ort:cpu:all (which agreed with the reference in this run" in localisation.message


def test_a_wrong_reference_file_blames_no_node_when_every_runtime_failed(
    conv_bn9: tuple[Path, dict[str, np.ndarray], np.ndarray],
) -> None:
    path, inputs, expected = conv_bn9
    wrong = expected.copy()
    wrong[0, 0, 0, 0] += 1e-3  # the saved reference is off; every runtime computes the file right
    report = run_parity(
        None, path, [inputs], runtimes="ort:cpu:all,reference", reference_outputs=[{"y": wrong}], seed=None
    )
    assert {r.runtime: r.status for r in report.runtimes} == {"ort:cpu:all": "failed", "reference": "failed"}
    ort_result, evaluator_result = report.runtimes
    assert ort_result.localisation is not None and evaluator_result.localisation is not None
    assert ort_result.localisation.status == "not_localised", ort_result.localisation.message
    assert ort_result.localisation.first is None  # so a repro bundle is the whole model, blaming no node
    assert "first disagree at ONNX node bn" in ort_result.localisation.message
    assert "which of the two is wrong there is not known" in ort_result.localisation.message
    assert evaluator_result.localisation.status == "not_localised"
    assert "the failing runtime is the ONNX reference evaluator itself" in evaluator_result.localisation.message


def test_a_wrong_reference_of_a_file_both_compute_alike_says_so(tmp_path: Path) -> None:
    """ONNX Runtime alone against a wrong saved output: the evaluator, judged here, differs from it too, and every node
    output agrees with it: the message says the reference differs from ONNX's semantics of the file."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    data = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    wrong = np.maximum(data, 0)
    wrong[0, 0] += 1.0
    report = run_parity(None, path, [{"x": data}], runtimes="ort:cpu:all", reference_outputs=[{"y": wrong}], seed=None)
    (result,) = report.runtimes
    assert result.localisation is not None
    assert result.localisation.status == "not_localised"
    assert result.localisation.message.startswith("every node output agrees with the ONNX reference evaluator")
    assert "the reference (PyTorch / saved outputs) differs from ONNX's semantics" in result.localisation.message


def test_the_repro_bundle_takes_its_values_from_the_same_oracle(
    conv_bn9: tuple[Path, dict[str, np.ndarray], np.ndarray], tmp_path: Path
) -> None:
    """The bundle of the evaluator's failure: the sub-model's inputs and expected values are the agreeing runtime's,
    as the localisation compared (the evaluator's own were "ONNX's semantics" there, and it "did not reproduce")."""
    path, inputs, expected = conv_bn9
    bundles = tmp_path / "repro"
    report = run_parity(
        None, path, [inputs], runtimes="ort:cpu:all,reference", reference_outputs=[{"y": expected}], seed=None,
        repro_dir=bundles,
    )  # fmt: skip
    assert report.runtimes[1].localisation is not None and report.runtimes[1].localisation.status == "localised"
    readme = (bundles / "reference" / "README.txt").read_text()
    assert "ort:cpu:all's values there" in readme and "reproduces the failure: yes" in readme
    saved = json.loads((bundles / "reference" / "expected.json").read_text())
    assert "ort:cpu:all" in json.dumps(saved)


def test_the_message_names_why_there_is_no_oracle(
    conv_bn9: tuple[Path, dict[str, np.ndarray], np.ndarray],
) -> None:
    path, inputs, expected = conv_bn9
    wrong = expected.copy()
    wrong[0, 0, 0, 0] += 1e-3
    report = run_parity(None, path, [inputs], runtimes="reference", reference_outputs=[{"y": wrong}], seed=None)
    (result,) = report.runtimes
    assert result.localisation is not None
    assert "the failing runtime is the ONNX reference evaluator itself" in result.localisation.message


def test_a_bundle_the_evaluator_cannot_feed_leaves_the_verdict_standing(tmp_path: Path) -> None:
    """A file the evaluator cannot run (a grouped ConvTranspose) with a planted fault: the module localisation's
    bundle took its sub-model's inputs from the evaluator anyway, which raised, and the whole run was lost (exit 2,
    no report). Now the run's oracle rule applies there too (no runtime agreed: the whole model), and a bundle that
    cannot be written is a note."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ConvTranspose2d(2, 4, 3, groups=2), BatchKalmanNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3), BatchKalmanNorm2d(2)
    ).eval()
    path = tmp_path / "ct.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, torch.randn(2, 2, 8, 8), path)
    proto = onnx.load(str(path))
    weight = next(n for n in proto.graph.node if n.op_type == "Conv").input[1]
    for tensor in proto.graph.initializer:
        if tensor.name == weight:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.5), weight))
    planted = tmp_path / "planted.onnx"
    onnx.save(proto, str(planted))
    report = run_parity(model, planted, runtimes="ort:cpu:all,reference", repro_dir=tmp_path / "repro")
    statuses = {r.runtime: r.status for r in report.runtimes}
    assert statuses == {"ort:cpu:all": "failed", "reference": "unavailable"}
    (bundle_note,) = [note for note in report.notes if "repro bundle for ort:cpu:all" in note]
    assert "reproduces: yes" in bundle_note
    readme = (tmp_path / "repro" / "ort_cpu_all" / "README.txt").read_text()
    assert "the whole model" in readme and "the failure was localised, but nothing trustworthy" in readme
    assert "polygraphy run" in readme and "--onnxrt" in readme


def test_an_evaluator_left_out_of_the_run_is_judged_before_it_is_trusted(
    conv_bn9: tuple[Path, dict[str, np.ndarray], np.ndarray],
) -> None:
    """`--runtimes ort:cpu:all` alone, a wrong saved reference: the evaluator never ran in the run, so it was trusted,
    and ONNX Runtime's correct BatchNormalization was "localised" (third review round). It is now run once on the
    failing outputs first; differing too, it is named only as the other side of a disagreement."""
    path, inputs, expected = conv_bn9
    wrong = expected.copy()
    wrong[0, 0, 0, 0] += 1e-3
    report = run_parity(None, path, [inputs], runtimes="ort:cpu:all", reference_outputs=[{"y": wrong}], seed=None)
    (result,) = report.runtimes
    assert result.status == "failed" and result.localisation is not None
    assert result.localisation.status == "not_localised" and result.localisation.first is None
    assert "was run here and differs from the reference too" in result.localisation.message
    assert "which of the two is wrong there is not known" in result.localisation.message


def _planted_bn_file(tmp_path: Path, model: nn.Module, x: torch.Tensor, opset: int) -> tuple[Path, onnx.ModelProto]:
    """``model`` exported at ``opset`` (TorchScript: a BatchNormalization node) with its last Conv's weight 1 % off."""
    path = tmp_path / f"bn{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=opset, dynamo=False
        )
    proto = onnx.load(str(path))
    assert [node.op_type for node in proto.graph.node] == ["Conv", "Relu", "BatchNormalization", "Conv"]
    weight = proto.graph.node[-1].input[1]
    for tensor in proto.graph.initializer:
        if tensor.name == weight:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.01), weight))
    onnx.save(proto, str(path))
    return path, proto


def test_a_bundle_against_pytorch_is_fed_pytorchs_own_tensors(tmp_path: Path) -> None:
    """A localisation against PyTorch names a value whose expected tensor is PyTorch's; the bundle took the inputs of
    the node computing it from the ONNX reference evaluator, unjudged. Where that is wrong (onnx 1.23 computes an
    opset-13 BatchNormalization with batch statistics), ONNX Runtime's Conv was fed a wrong input and "reproduced"
    the failure whatever the Conv computed. Now the sub-model starts at the module outputs that agreed with PyTorch,
    fed PyTorch's tensors there: no oracle is involved."""
    from runtime.backends.base import Availability
    from runtime.backends.ort import OnnxRuntimeBackend
    from runtime.localize import Localisation
    from runtime.registry import RuntimeEntry
    from runtime.repro import write_repro

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3)).eval()
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        normalized, expected = model[:3](x).numpy(), model(x).numpy()
    path, proto = _planted_bn_file(tmp_path, model, x, 13)

    def make() -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend("CPUExecutionProvider", "all")

    entry = RuntimeEntry("ort:cpu:all", Availability(True, ""), make)
    found = Localisation("ort:cpu:all", "localised", expected_value="y", expected=expected)
    found.agreed = {proto.graph.node[2].output[0]: normalized}  # the BatchNorm module's output agreed

    class _Result:
        localisation = found

    note = write_repro(proto, path, entry, {"x": x.numpy()}, {"y": expected}, _Result(), tmp_path / "bundle")
    readme = (tmp_path / "bundle" / "README.txt").read_text()
    assert "PyTorch's tensors there" in readme and "where the file agreed with PyTorch" in readme, readme
    assert [node.op_type for node in onnx.load(str(tmp_path / "bundle" / "model.onnx")).graph.node] == ["Conv"]
    assert "reproduces: yes" in note  # the planted Conv weight, on PyTorch's own input
    (inputs,) = json.loads((tmp_path / "bundle" / "inputs.json").read_text())
    assert list(inputs) == [proto.graph.node[2].output[0]]


class _Block(nn.Module):
    """A residual block with its own code around its modules: ``x + 0.5 * relu(bn(conv(x)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), BatchKalmanNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * torch.relu(self.bn(self.conv(x)))


def test_a_fault_in_a_blocks_own_code_is_inside_its_bundle(tmp_path: Path) -> None:
    """Cold QA (2026-12-07): the 0.5 of the second block's own code changed to 0.55. The localisation named the block,
    but the bundle was its final Add alone, fed the faulty product as an input: a node every runtime computes right,
    "reproducing" the failure. Now the bundle is the block's nodes from its agreeing input and its submodules' agreeing
    outputs, the faulty Mul among them, fed PyTorch's tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchKalmanNorm2d(8), _Block(8), _Block(8)).eval()
    path = tmp_path / "blocks.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, torch.randn(2, 3, 8, 8), path)
    proto = onnx.load(str(path))
    multiplies = [node for node in proto.graph.node if node.op_type == "Mul"]
    assert len(multiplies) == 2
    faulty = multiplies[-1]
    proto.graph.initializer.append(numpy_helper.from_array(np.array(0.55, np.float32), "scale_of_the_second_block"))
    constant = next(i for i, name in enumerate(faulty.input) if name not in {n.output[0] for n in proto.graph.node})
    faulty.input[constant] = "scale_of_the_second_block"
    planted = tmp_path / "planted.onnx"
    onnx.save(proto, str(planted))
    report = run_parity(model, planted, runtimes="ort:cpu:all", repro_dir=tmp_path / "repro")
    (result,) = report.runtimes
    assert result.localisation is not None and result.localisation.first_module == "3", result.localisation.message
    bundled = onnx.load(str(tmp_path / "repro" / "ort_cpu_all" / "model.onnx"))
    assert faulty.name in [node.name for node in bundled.graph.node]
    assert "scale_of_the_second_block" in [t.name for t in bundled.graph.initializer]
    (bundle_note,) = [note for note in report.notes if "repro bundle for ort:cpu:all" in note]
    assert "reproduces: yes" in bundle_note


def test_a_file_whose_every_node_agrees_with_the_evaluator_is_named_as_the_difference(tmp_path: Path) -> None:
    """A file without exporter metadata whose middle conv weight is 5 % off: every runtime fails, each node agrees with
    the evaluator, nothing is localised. The message said "the difference is in the graph outputs' last nodes" (cold
    QA, 2026-12-07); it names the file itself (or the reference) instead, the cause it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(2, 3, 10, 10)
    path = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    proto = onnx.load(str(path))
    weight = [node for node in proto.graph.node if node.op_type == "Conv"][1].input[1]
    for tensor in proto.graph.initializer:
        if tensor.name == weight:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.05), weight))
    onnx.save(proto, str(path))
    report = run_parity(model, path, [x.numpy()], runtimes="ort:cpu:all,reference")
    assert [result.status for result in report.runtimes] == ["failed", "failed"]
    found = next(result.localisation for result in report.runtimes if result.runtime == "ort:cpu:all")
    assert found is not None and found.status == "not_localised"
    assert "the file itself computes something else" in found.message
    assert "last nodes" not in found.message


class _ScaledBetween(nn.Module):
    """conv → × 2 in the model's own forward → conv (``between``), or × 2 on the input first (not ``between``)."""

    def __init__(self, between: bool) -> None:
        super().__init__()
        self.between = between
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.between:
            return self.c2(self.c1(x) * 2.0)
        return self.c2(self.c1(x * 2.0))


@pytest.mark.parametrize("between", [True, False], ids=["after-a-module", "on-the-input"])
def test_an_operation_missing_from_the_file_is_named_and_bundled_whole(tmp_path: Path, between: bool) -> None:
    """The file drops the model's own ``* 2``: the next module reads a value that agrees with PyTorch (c1's output, or
    the model input) where PyTorch reads twice it. The localisation blamed c1's own code and the bundle was c1's
    correct Conv, expected to give PyTorch's doubled tensor ("reproduces: yes"), review of 2026-12-07. Now the model's
    forward is named, with the missing operation, and the bundle is the whole model, saying why."""
    torch.manual_seed(0)
    model = _ScaledBetween(between).eval()
    path = tmp_path / "scaled.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, torch.randn(2, 3, 8, 8), path)
    proto = onnx.load(str(path))
    (multiply,) = [node for node in proto.graph.node if node.op_type == "Mul"]
    constants = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                             for o in n.output}  # fmt: skip
    (kept,) = [name for name in multiply.input if name not in constants]
    for node in proto.graph.node:
        node.input[:] = [kept if name == multiply.output[0] else name for name in node.input]
    proto.graph.node.remove(multiply)
    planted = tmp_path / "dropped.onnx"
    onnx.save(proto, str(planted))
    report = run_parity(model, planted, runtimes="ort:cpu:all", repro_dir=tmp_path / "repro")
    (result,) = report.runtimes
    assert result.localisation is not None and result.localisation.first_module == "<model>"
    assert "an operation of that forward is missing from the file" in result.localisation.message
    readme = (tmp_path / "repro" / "ort_cpu_all" / "README.txt").read_text()
    assert "the whole model" in readme and "an operation is missing from it" in readme, readme


def test_the_polygraphy_recheck_carries_the_runs_tolerances() -> None:
    """The README's ``polygraphy run`` line used Polygraphy's 1e-5 defaults: a faithful float16 sub-model failed its
    re-check where the ``bkn parity`` line passed (review, 2026-12-07). It carries the tolerances the run judges by:
    the file's float16, not the float32 of PyTorch's expected tensor."""
    from runtime.compare import TolerancePolicy
    from runtime.repro import _tolerances

    sub = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["a"], ["y"])], "g",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT16, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])],
        )
    )  # fmt: skip
    expected = {"y": np.zeros(2, np.float32)}
    assert _tolerances(sub, expected, TolerancePolicy()) == " --atol y:0.001 --rtol y:0.001"
    assert _tolerances(sub, expected, TolerancePolicy(atol=0.5, rtol=0.25)) == " --atol y:0.5 --rtol y:0.25"


def test_the_recheck_lines_quote_paths_and_output_names(tmp_path: Path) -> None:
    """An output named with a space split the Polygraphy tolerance argument (second review, 2026-12-07)."""
    import shlex

    from runtime.compare import TolerancePolicy
    from runtime.repro import _polygraphy_line, _tolerances

    sub = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["a"], ["my out"])], "g",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("my out", TensorProto.FLOAT, [2])],
        )
    )  # fmt: skip
    line = _polygraphy_line(
        "ort:cpu:all", tmp_path / "a dir", _tolerances(sub, {"my out": np.zeros(2)}, TolerancePolicy())
    )
    words = shlex.split(line.splitlines()[0])
    assert words[words.index("--atol") + 1] == "my out:1e-05" and str(tmp_path / "a dir" / "model.onnx") in words


class _Branching(nn.Module):
    """``d(cond(sum(a(x)) > 0, relu(b(·)), tanh(c(·))))``: the branches read the main graph's weights (outer scope)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y = torch.cond(h.sum() > 0, lambda t: self.b(t).relu(), lambda t: self.c(t).tanh(), (h,))
        return self.d(y)


def test_a_fault_read_inside_a_branch_is_localised_and_bundled(tmp_path: Path) -> None:
    """Review (2026-12-07): a wrong weight read inside an ``If`` branch (``torch.cond``) from the main graph. The cut
    models left out what the branch reads from the enclosing graph (as ``onnx.utils.extract_model`` does): the
    localisation ended in status ``error`` ("input 'b.weight' ... is not output of any previous nodes"). The cuts now
    keep a subgraph's outer reads; the bundle holds the ``If`` with the weight and reproduces."""
    torch.manual_seed(0)
    model = _Branching().eval()
    with torch.no_grad():
        model.a.bias += 5  # the then-branch
    x = torch.randn(2, 4)
    path = tmp_path / "cond.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, verbose=False)
    proto = onnx.load(str(path))
    (branching,) = [node for node in proto.graph.node if node.op_type == "If"]
    weight = next(t for t in proto.graph.initializer if t.name == "b.weight")
    planted = numpy_helper.to_array(weight).copy()
    planted[0, 0] += 0.5
    weight.CopyFrom(numpy_helper.from_array(planted, "b.weight"))
    faulty = tmp_path / "planted.onnx"
    onnx.save(proto, str(faulty))
    report = run_parity(model, faulty, [x.numpy()], runtimes="ort:cpu:all", repro_dir=tmp_path / "repro")
    (result,) = report.runtimes
    assert result.status == "failed"
    assert result.localisation is not None and result.localisation.status == "localised", result.localisation
    assert "the input of d already differs" in result.localisation.message
    bundled = onnx.load(str(tmp_path / "repro" / "ort_cpu_all" / "model.onnx"))
    assert branching.name in [node.name for node in bundled.graph.node]
    assert "b.weight" in [t.name for t in bundled.graph.initializer]
    onnx.checker.check_model(bundled, full_check=True)
    (bundle_note,) = [note for note in report.notes if "repro bundle for ort:cpu:all" in note]
    assert "reproduces: yes" in bundle_note


def test_a_cut_keeps_what_a_branch_reads_from_the_main_graph() -> None:
    """``r = relu(x)`` read only inside both branches, with a weight: the cut computing the ``If``'s output keeps the
    Relu and the weight (``onnx.utils.extract_model`` keeps neither), and runs."""
    from runtime.onnx_scopes import node_reads, sub_model

    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["r", "w"], [f"{name}_m"]), helper.make_node(op, [f"{name}_m"], [f"{name}_y"])],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 2])],
        )  # fmt: skip

    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["g"]),
        helper.make_node("If", ["g"], ["y"], then_branch=branch("then", "Tanh"), else_branch=branch("else", "Sigmoid")),
        helper.make_node("Neg", ["y"], ["out"]),
    ]
    weights = [
        numpy_helper.from_array(np.eye(2, dtype=np.float32) * 2, "w"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert node_reads(model.graph.node[3]) == ["g", "r", "w"]
    cut = sub_model(model, [], "y")
    assert [node.op_type for node in cut.graph.node] == ["Relu", "ReduceSum", "Greater", "If"]
    assert sorted(t.name for t in cut.graph.initializer) == ["w", "zero"]
    onnx.checker.check_model(cut, full_check=True)
    x = np.array([[1.0, -2.0], [3.0, 0.5]], np.float32)
    (y,) = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, np.tanh(np.maximum(x, 0) @ (np.eye(2) * 2)), rtol=1e-6)
    from_r = sub_model(model, ["r", "g"], "y")  # the branch's outer value made an input
    assert [node.op_type for node in from_r.graph.node] == ["If"] and [i.name for i in from_r.graph.input] == ["r", "g"]
