"""Mixed precision: float16 / bfloat16 ONNX files against the float32 PyTorch model.

Inputs are made in the ONNX input dtype and cast at the boundary for PyTorch; outputs are
judged with the tolerance of the ONNX output dtype, and the report says so. A runtime that
cannot run a dtype at all is reported unavailable for it, with its reason, not as a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_runtime_support import trained_digits

from bkn_export.cli import main
from runtime.parity import run_parity

SPEC = "bkn_export.demo.models:digits_resnet"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("precision") / "digits.pt"
    torch.save(trained_digits().state_dict(), path)
    return path


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_bkn_export_fp16_then_parity_exits_0(tmp_path: Path, checkpoint: Path, mode: str) -> None:
    onnx_path = tmp_path / f"digits_{mode}_fp16.onnx"
    export_argv = [
        "export", SPEC, "--checkpoint", str(checkpoint), "--input-shape", "2,1,8,8", "-o", str(onnx_path),
        "--mode", mode, "--fp16",
    ]  # fmt: skip
    assert main(export_argv) == 0
    assert onnx.load(onnx_path).graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    report_path = tmp_path / "r.json"
    argv = [
        "parity", SPEC, str(onnx_path), "--checkpoint", str(checkpoint), "--runtimes", "ort:cpu:all,reference",
        "--input-shape", "4,1,8,8", "--json", str(report_path),
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(report_path.read_text())
    assert data["model"]["inputs"][0]["dtype"] == "float16"
    for runtime in data["runtimes"]:
        for output in runtime["outputs"]:
            assert output["dtype"] == "float16" and (output["atol"], output["rtol"]) == (1e-3, 1e-3)
            assert output["tolerance_source"] == "float16 defaults (float16 ONNX output vs float32 reference)"


def test_tampered_fp16_file_exits_1(tmp_path: Path, checkpoint: Path) -> None:
    onnx_path = tmp_path / "digits_fp16.onnx"
    export_argv = [
        "export",
        SPEC,
        "--checkpoint",
        str(checkpoint),
        "--input-shape",
        "2,1,8,8",
        "-o",
        str(onnx_path),
        "--fp16",
    ]
    assert main(export_argv) == 0
    model = onnx.load(onnx_path)
    head = next(t for t in model.graph.initializer if "head" in t.name and numpy_helper.to_array(t).ndim == 1)
    array = numpy_helper.to_array(head).copy()
    array[0] += np.float16(0.05)  # a bias off by 0.05: 50x the float16 atol
    head.CopyFrom(numpy_helper.from_array(array, head.name))
    onnx.save(model, onnx_path)
    argv = [
        "parity",
        SPEC,
        str(onnx_path),
        "--checkpoint",
        str(checkpoint),
        "--runtimes",
        "ort:cpu:all",
        "--no-localise",
    ]
    assert main(argv) == 1


def _bf16_relu_model(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "bf16_relu",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)


def test_runtime_without_bf16_kernels_is_unavailable_for_the_dtype_not_failed(tmp_path: Path) -> None:
    path = tmp_path / "relu_bf16.onnx"
    _bf16_relu_model(path)
    report = run_parity(torch.nn.ReLU(), path, runtimes="ort:cpu:all,reference")
    ort_result = next(r for r in report.runtimes if r.runtime == "ort:cpu:all")
    assert ort_result.status == "unavailable", ort_result
    assert "refused this bfloat16 file's operators" in ort_result.reason and "NOT_IMPLEMENTED" in ort_result.reason
    reference = next(r for r in report.runtimes if r.runtime == "reference")
    assert reference.status == "passed", reference
    assert reference.outputs[0].dtype == "bfloat16" and reference.outputs[0].tolerance.atol == 1e-2


def test_api_fp16_export_is_checked_against_the_float32_model() -> None:
    """assert_parity (and so the fixture) exports fp16 and casts the float32 example inputs at the boundary."""
    from runtime import assert_parity

    report = assert_parity(
        trained_digits(), torch.randn(3, 1, 8, 8), runtimes="ort:cpu:all", export_options={"fp16": True}
    )
    assert report.inputs[0].dtype == "float16"
    (result,) = report.ran
    assert result.outputs[0].dtype == "float16" and result.outputs[0].tolerance.atol == 1e-3


def _bfloat16_chain() -> torch.nn.Module:
    from bkn_export import convert_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
    ).bfloat16().eval()  # fmt: skip
    return convert_batchnorm(model, torch.randn(2, 3, 8, 8, dtype=torch.bfloat16))


def test_assert_parity_takes_a_bfloat16_model_and_input() -> None:
    """numpy has no bfloat16: the inputs and the reference's outputs crashed with torch's 'unsupported ScalarType'."""
    from runtime import assert_parity

    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    report = assert_parity(
        _bfloat16_chain(), x, mode="training", runtimes="reference,ort:cpu:all", export_options={"opset": 23}
    )
    status = {r.runtime: r.status.value for r in report.runtimes}
    assert status["reference"] == "passed", status
    assert status["ort:cpu:all"] == "unavailable"  # ORT's CPU provider has no bfloat16 Conv: its own reason


def test_a_bfloat16_export_at_an_early_opset_says_which_opset_to_use(tmp_path: Path) -> None:
    from bkn_export.errors import ExportError
    from bkn_export.export import export_onnx

    with pytest.raises(ExportError, match=r"bfloat16 .* from opset 22 on: export with opset=23 \(this file: 20\)"):
        export_onnx(_bfloat16_chain(), torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), tmp_path / "m.onnx", opset=20)


def test_a_bfloat16_inference_export_at_opset_23_folds_into_bfloat16_weights(tmp_path: Path) -> None:
    """onnxscript's fold stored float32 products of bfloat16 weights: onnx.checker refused the file."""
    from runtime import assert_parity

    path = tmp_path / "bf16.onnx"
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    report = assert_parity(
        _bfloat16_chain(), x, mode="inference", runtimes="reference", export_options={"opset": 23}, export_to=path
    )
    assert [r.status.value for r in report.runtimes] == ["passed"]
    graph = onnx.load(path).graph
    assert [n.op_type for n in graph.node] == ["Conv", "Relu", "Conv"]
    assert {t.data_type for t in graph.initializer} == {TensorProto.BFLOAT16}


def test_the_float32_running_statistics_of_an_fp16_training_file_are_measured_at_float16(tmp_path: Path) -> None:
    """An fp16 training file keeps its running statistics float32, but computes them from float16 data: their noise
    floor (and the rounding hint after a failure) is the model's own float16 error, not the float32 reference's,
    which failed them at float32 tolerances with no word of why."""
    from bkn_export.export import export_onnx

    model = trained_digits()
    path = tmp_path / "fp16_training_stats.onnx"
    export_onnx(model, torch.randn(2, 1, 8, 8), path, mode="training", fp16=True, running_stats_io=True)
    report = run_parity(
        model, path, None, mode="training", runtimes="ort:cpu:all", localise_failures=False, noise_floor=True
    )
    floors = [n for n in report.notes if n.startswith("noise floor of") and "running_mean_out" in n]
    assert floors and all("the model in float16 is up to" in n for n in floors), floors
    assert report.passed
