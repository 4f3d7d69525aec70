"""Training-mode export: ``ai.bkn::BatchKalmanNorm`` nodes with a function body, run in ORT and onnx.reference.

Every parity test compares an ONNX runtime with the PyTorch train-mode forward of the
same model: the output, each layer's posterior (μ_{k|k}, Σ_{k|k}) and the running
statistics after one step (BatchNorm's rule applied to the posterior).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from bkn_export import BatchKalmanNorm1d, KalmanOptions, convert_batchnorm, describe_chain, wire_chain
from bkn_export.demo.models import digits_resnet
from bkn_export.errors import BKNInputError, ExportError, ModelFileError, OptionError
from bkn_export.export import export_onnx
from bkn_export.export.op import op_spec
from bkn_export.export.training import (
    POSTERIOR_MEAN_SUFFIX,
    POSTERIOR_VARIANCE_SUFFIX,
    attach_function,
    check_feeds,
    check_training_model,
    export_training,
    running_stat_names,
)
from bkn_export.module_modes import train_layers_only
from bkn_export.nn import _BatchKalmanNorm

ORT_LEVELS = [
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
]
BATCH_SIZES = [1, 2, 4, 8]
ATOL = 1e-5


# --------------------------------------------------------------------------- models


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Move every parameter and running statistic off its initial value (a non-trivial chain)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, _BatchKalmanNorm) and module.running_mean is not None:
                assert module.running_var is not None
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return model


def resnet_model() -> tuple[nn.Module, tuple[int, ...]]:
    """Digits ResNet: residual blocks, a projection shortcut, transition 'propagate'."""
    return _perturb(digits_resnet(width=8), 1), (1, 8, 8)


def mlp_model() -> tuple[nn.Module, tuple[int, ...]]:
    """MLP with BatchKalmanNorm1d, transition 'learned' (channel counts change)."""
    model = nn.Sequential(
        nn.Linear(6, 12),
        BatchKalmanNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 8),
        BatchKalmanNorm1d(8, momentum=0.3),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    wire_chain(model, torch.zeros(2, 6), KalmanOptions(transition="learned"))
    return _perturb(model, 2), (6,)


def converted_cnn_model() -> tuple[nn.Module, tuple[int, ...]]:
    """A BatchNorm CNN converted to BKN: affine=False layers, transition 'identity', authors' fallback."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6, affine=False),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6, affine=False),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    converted = convert_batchnorm(
        model,
        torch.zeros(2, 3, 6, 6),
        transition="identity",
        prior_weight=0.6,
        process_noise=False,
        fallback_ratio=100.0,
    )
    return _perturb(converted, 3), (3, 6, 6)


MODELS = {"resnet": resnet_model, "mlp": mlp_model, "converted_cnn": converted_cnn_model}


def bkn_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if isinstance(m, _BatchKalmanNorm)}


def torch_train_step(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """PyTorch train-mode forward on a copy: output, posteriors and updated running statistics by graph name."""
    work = copy.deepcopy(model).train()
    names = bkn_names(work)
    result: dict[str, np.ndarray] = {}
    original = _BatchKalmanNorm._kalman_step

    def recording_step(self: _BatchKalmanNorm, *args: Any) -> Any:
        y, mean, variance, count = original(self, *args)
        result[names[id(self)] + POSTERIOR_MEAN_SUFFIX] = mean.detach().numpy().copy()
        result[names[id(self)] + POSTERIOR_VARIANCE_SUFFIX] = variance.detach().numpy().copy()
        return y, mean, variance, count

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(_BatchKalmanNorm, "_kalman_step", recording_step)
        result["output"] = work(x).numpy()
    for name, module in work.named_modules():
        if isinstance(module, _BatchKalmanNorm) and module.running_mean is not None:
            assert module.running_var is not None
            _, _, mean_out, var_out = running_stat_names(name)
            result[mean_out] = module.running_mean.numpy()
            result[var_out] = module.running_var.numpy()
    return result


def feeds_for(model: nn.Module, onnx_model: onnx.ModelProto, x: torch.Tensor) -> dict[str, np.ndarray]:
    feeds = {onnx_model.graph.input[0].name: x.numpy()}  # the model's input (named after forward's argument)
    for name, module in model.named_modules():
        if isinstance(module, _BatchKalmanNorm) and module.running_mean is not None:
            assert module.running_var is not None
            mean_in, var_in, _, _ = running_stat_names(name)
            feeds[mean_in] = module.running_mean.numpy()
            feeds[var_in] = module.running_var.numpy()
    graph_inputs = {i.name for i in onnx_model.graph.input}
    return {k: v for k, v in feeds.items() if k in graph_inputs}


def ort_session(path: Path | str, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each model exported once with running-statistics IO and exposed posteriors."""
    torch.manual_seed(0)
    model, sample_shape = MODELS[request.param]()
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    path = tmp_path_factory.mktemp("training") / f"{request.param}.onnx"
    result = export_training(model, torch.randn(4, *sample_shape), path, running_stats_io=True, expose_posteriors=True)
    return {
        "name": request.param,
        "model": model,
        "shape": sample_shape,
        "path": path,
        "result": result,
        "before": (modes, state),
    }


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_parity_with_pytorch_train_forward(exported: dict[str, Any], batch: int) -> None:
    """Outputs, posteriors and running-statistic updates within 1e-5 on ORT (every level) and onnx.reference."""
    model, path = exported["model"], exported["path"]
    onnx_model = onnx.load(str(path))
    x = torch.randn(batch, *exported["shape"], generator=torch.Generator().manual_seed(batch))
    expected = torch_train_step(model, x)
    feeds = feeds_for(model, onnx_model, x)
    output_names = [o.name for o in onnx_model.graph.output]
    assert set(output_names) == set(expected), "every compared quantity is a graph output"
    runs = {f"ORT {level.name}": ort_session(path, level).run(None, feeds) for level in ORT_LEVELS}
    runs["onnx.reference"] = ReferenceEvaluator(onnx_model).run(None, feeds)
    for runtime, values in runs.items():
        for name, value in zip(output_names, values):
            np.testing.assert_allclose(
                value,
                expected[name],
                rtol=0,
                atol=ATOL,
                err_msg=f"{exported['name']} batch {batch}: {runtime} '{name}'",
            )


@pytest.mark.parametrize("graph_optimizer", ["fold", "none"])
def test_every_graph_optimizer_form_computes_the_train_forward(
    exported: dict[str, Any], graph_optimizer: str, tmp_path: Path
) -> None:
    """``graph_optimizer="fold"`` / ``"none"`` (less of onnxscript's optimizer, for dense networks) give graphs
    of more nodes than the default's (``"none"`` more than ``"fold"``: benchmarks/bench_export_time.py),
    recorded in the metadata, with the same outputs, posteriors and running-statistic updates within 1e-5 on
    ORT (no and all optimisations) and onnx.reference."""
    model = exported["model"]
    path = tmp_path / f"{graph_optimizer}.onnx"
    result = export_training(
        model, torch.randn(4, *exported["shape"]), path, running_stats_io=True, expose_posteriors=True,
        graph_optimizer=graph_optimizer,
    )  # fmt: skip
    assert result.metadata["bkn_export.graph_optimizer"] == graph_optimizer
    assert exported["result"].metadata["bkn_export.graph_optimizer"] == "full"
    onnx_model, full = onnx.load(str(path)), onnx.load(str(exported["path"]))
    assert len(onnx_model.graph.node) > len(full.graph.node)
    for batch in (1, 3):
        x = torch.randn(batch, *exported["shape"], generator=torch.Generator().manual_seed(10 + batch))
        expected = torch_train_step(model, x)
        feeds = feeds_for(model, onnx_model, x)
        output_names = [o.name for o in onnx_model.graph.output]
        assert set(output_names) == set(expected)
        runs = {f"ORT {level.name}": ort_session(path, level).run(None, feeds) for level in ORT_LEVELS[::3]}
        runs["onnx.reference"] = ReferenceEvaluator(onnx_model).run(None, feeds)
        for runtime, values in runs.items():
            for name, value in zip(output_names, values):
                np.testing.assert_allclose(
                    value, expected[name], rtol=0, atol=ATOL,
                    err_msg=f"{exported['name']} {graph_optimizer} batch {batch}: {runtime} '{name}'",
                )  # fmt: skip


def test_a_large_graph_warns_before_the_full_optimizer_and_names_the_lighter_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above ``LARGE_GRAPH_NODES`` traced nodes (lowered here to fit a small model) the full optimizer is announced
    as slow, with the option that skips it; not with that option, and never for the inference export (which
    cannot skip it)."""
    from bkn_export.export import common

    model, shape = mlp_model()
    monkeypatch.setattr(common, "LARGE_GRAPH_NODES", 20)
    with pytest.warns(UserWarning, match=r"the traced graph has \d+ nodes.*graph_optimizer='fold'"):
        export_training(model, torch.randn(2, *shape), tmp_path / "full.onnx")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the traced graph has")
        export_training(model, torch.randn(2, *shape), tmp_path / "fold.onnx", graph_optimizer="fold")
        export_onnx(model.eval(), torch.randn(2, *shape), tmp_path / "inference.onnx")
    monkeypatch.setattr(common, "LARGE_GRAPH_NODES", 10**6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the traced graph has")
        export_training(model, torch.randn(2, *shape), tmp_path / "small.onnx")


@pytest.mark.parametrize("graph_optimizer", ["fast", "", None, True])
def test_an_unknown_graph_optimizer_is_refused_before_any_work(graph_optimizer: Any, tmp_path: Path) -> None:
    model, shape = mlp_model()
    with pytest.raises(OptionError, match="graph_optimizer must be one of"):
        export_training(model, torch.randn(2, *shape), tmp_path / "m.onnx", graph_optimizer=graph_optimizer)
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- graph structure


def test_one_node_per_layer_named_after_its_module(exported: dict[str, Any]) -> None:
    onnx_model = onnx.load(str(exported["path"]))
    nodes = [n for n in onnx_model.graph.node if n.domain == op_spec.DOMAIN]
    layers = {name for name, m in exported["model"].named_modules() if isinstance(m, _BatchKalmanNorm)}
    assert {n.name for n in nodes} == layers
    for node in nodes:
        assert node.op_type == op_spec.OP_TYPE
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_version"] == op_spec.PLUGIN_VERSION.encode()
        assert attributes["plugin_namespace"] == op_spec.PLUGIN_NAMESPACE.encode()
        assert set(attributes) == {a.name for a in op_spec.ATTRIBUTES}


def _ancestors(graph: onnx.GraphProto, value: str) -> set[str]:
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    stack = [value]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None:
            continue
        for upstream in node.input:
            if upstream and upstream not in seen:
                seen.add(upstream)
                stack.append(upstream)
    return seen


def test_chain_is_explicit_in_the_graph(exported: dict[str, Any]) -> None:
    """A wired layer's prior inputs are computed from its predecessor's posterior outputs.

    The prior variance always depends on the predecessor's posterior variance. The prior
    mean depends on the posterior mean under the authors' convention (``prior_source="input"``);
    under the default normalization-aware one the source's output mean is its β, so where
    no nonlinearity sits on the path the exporter may fold the prior mean into a constant.
    """
    model = exported["model"]
    graph = onnx.load(str(exported["path"])).graph
    nodes = {n.name: n for n in graph.node if n.domain == op_spec.DOMAIN}
    checked = 0
    for name, layer in model.named_modules():
        if isinstance(layer, _BatchKalmanNorm) and layer.has_predecessor:
            predecessor = nodes[next(link.predecessor for link in describe_chain(model) if link.name == name)]
            prior_mean, prior_variance = nodes[name].input[1], nodes[name].input[2]
            assert predecessor.output[2] in _ancestors(graph, prior_variance) | {prior_variance}
            if layer.options.prior_source == "input":
                assert predecessor.output[1] in _ancestors(graph, prior_mean) | {prior_mean}
            checked += 1
    assert checked > 0


def test_checker_and_function_opset(exported: dict[str, Any]) -> None:
    onnx_model = onnx.load(str(exported["path"]))
    onnx.checker.check_model(onnx_model, full_check=True)
    (function,) = [f for f in onnx_model.functions if f.domain == op_spec.DOMAIN]
    model_opset = {e.domain: e.version for e in onnx_model.opset_import}
    assert {e.domain: e.version for e in function.opset_import}[""] == model_opset[""] == exported["result"].opset
    assert model_opset[op_spec.DOMAIN] == op_spec.DOMAIN_VERSION
    check_training_model(exported["path"])


def test_shape_inference_on_the_custom_nodes(exported: dict[str, Any]) -> None:
    onnx_model = onnx.load(str(exported["path"]))
    del onnx_model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(onnx_model, check_type=True, strict_mode=True)
    known = {v.name: v.type.tensor_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    for node in (n for n in inferred.graph.node if n.domain == op_spec.DOMAIN):
        for output in node.output[1:]:
            assert len(known[output].shape.dim) == 1 and known[output].elem_type == onnx.TensorProto.FLOAT
        assert known[node.output[0]].elem_type == onnx.TensorProto.FLOAT


def test_checker_and_shape_inference_without_our_schema(tmp_path: Path) -> None:
    """A fresh process that never registered the schema checks the model and infers the node via its function."""
    model, shape = mlp_model()
    path = tmp_path / "mlp.onnx"
    export_training(model, torch.randn(4, *shape), path)
    script = (
        "import onnx, sys\n"
        "m = onnx.load(sys.argv[1]); del m.graph.value_info[:]\n"
        "onnx.checker.check_model(m, full_check=True)\n"
        "m = onnx.shape_inference.infer_shapes(m, strict_mode=True)\n"
        "node = [n for n in m.graph.node if n.domain == 'ai.bkn'][0]\n"
        "vi = {v.name: v for v in m.graph.value_info}\n"
        "print([d.dim_value for d in vi[node.output[1]].type.tensor_type.shape.dim])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[12]"


# --------------------------------------------------------------------------- options and API


def test_default_export_has_only_model_inputs_and_outputs(tmp_path: Path) -> None:
    model, shape = mlp_model()
    path = tmp_path / "plain.onnx"
    result = export_onnx(model, torch.randn(4, *shape), path, mode="training", opset=op_spec.MAX_OPSET)
    onnx_model = onnx.load(str(path))
    assert [i.name for i in onnx_model.graph.input] == ["input"]
    assert [o.name for o in onnx_model.graph.output] == ["output"]
    assert result.mode == "training" and result.opset == op_spec.MAX_OPSET
    assert result.metadata["bkn_export.mode"] == "training"
    assert result.metadata["bkn_export.layers"] == "1,4"
    onnx.checker.check_model(onnx_model, full_check=True)
    x = torch.randn(5, *shape)
    got = ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, torch_train_step(model, x)["output"], rtol=0, atol=ATOL)


def test_dynamic_spatial_dims(tmp_path: Path) -> None:
    model, _ = converted_cnn_model()
    path = tmp_path / "spatial.onnx"
    export_training(model, torch.randn(2, 3, 6, 6), path, dynamic_spatial=True)
    x = torch.randn(3, 3, 9, 5)
    got = ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, torch_train_step(model, x)["output"], rtol=0, atol=ATOL)


def test_dynamic_spatial_dims_through_a_circular_padded_conv(tmp_path: Path) -> None:
    """The prior through a circular-padded conv mapped its taps with torch.remainder of the spatial size, which the
    ONNX exporter could not translate once the size was symbolic (TypeError, 'SymbolicTensor')."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(5),
    )  # fmt: skip
    model = _perturb(convert_batchnorm(model, torch.randn(2, 3, 12, 12)), 3)
    assert {link.name: link.transition for link in describe_chain(model)}["4"] is not None  # through the circular conv
    path = tmp_path / "circular.onnx"
    export_training(model, torch.randn(2, 3, 12, 12), path, dynamic_spatial=True)
    for size in (12, 9):
        x = torch.randn(2, 3, size, size)
        got = ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, torch_train_step(model, x)["output"], rtol=0, atol=ATOL)


def test_fp16_export_keeps_float32_statistics(tmp_path: Path) -> None:
    model, shape = converted_cnn_model()
    path = tmp_path / "half.onnx"
    export_training(model, torch.randn(4, *shape), path, fp16=True, expose_posteriors=True)
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    assert onnx_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    outputs = {o.name: o.type.tensor_type.elem_type for o in onnx_model.graph.output}
    assert outputs.pop("output") == onnx.TensorProto.FLOAT16
    assert set(outputs.values()) == {onnx.TensorProto.FLOAT}
    x = torch.randn(4, *shape)
    expected = torch_train_step(copy.deepcopy(model).half(), x.half())
    feeds = {"input": x.half().numpy()}
    runs = {"onnx.reference": ReferenceEvaluator(onnx_model).run(None, feeds)}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        runs[f"ORT {level.name}"] = ort_session(path, level).run(None, feeds)
    for runtime, values in runs.items():
        for name, value in zip(outputs_order(onnx_model), values):
            # float16 activations between layers: compare at half precision.
            np.testing.assert_allclose(
                value.astype(np.float32), expected[name].astype(np.float32), rtol=0, atol=2e-2, err_msg=runtime
            )


def test_fp16_running_statistics_stay_float32_and_keep_small_momentum_updates(tmp_path: Path) -> None:
    """At momentum 0.001 an update of r_Σ ≈ 1 is ~3e-4, under half a float16 ulp (4.9e-4): float16 running
    statistics would never move. The file's running-statistics inputs and outputs are float32 and, fed back for
    200 steps, track PyTorch's float32 buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, momentum=0.001))
    with torch.no_grad():  # channels 0 and 1 pass the input through: variance 1.69, so r_Σ rises from 1
        model[0].weight.copy_(torch.eye(4, 2).view(4, 2, 1, 1))
        model[0].bias.zero_()
    convert_batchnorm(model, torch.randn(8, 2, 8, 8))
    path = tmp_path / "half_stats.onnx"
    export_training(model.eval(), torch.randn(8, 2, 8, 8), path, fp16=True, running_stats_io=True)
    onnx_model = onnx.load(str(path))
    stats = [v for v in (*onnx_model.graph.input, *onnx_model.graph.output) if ".running_" in v.name]
    assert len(stats) == 4 and {v.type.tensor_type.elem_type for v in stats} == {onnx.TensorProto.FLOAT}
    session = ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    names = [o.name for o in session.get_outputs()]
    reference = copy.deepcopy(model)
    train_layers_only(reference)
    layer = reference[1]
    feeds = {"1.running_mean": layer.running_mean.numpy().copy(), "1.running_var": layer.running_var.numpy().copy()}
    for _ in range(200):
        x = (torch.randn(16, 2, 8, 8) * 1.3 + 0.2).half()
        with torch.no_grad():
            reference(x.float())
        got = dict(zip(names, session.run(None, {"input": x.numpy(), **feeds})))
        feeds = {"1.running_mean": got["1.running_mean_out"], "1.running_var": got["1.running_var_out"]}
    start_var = model[1].running_var.numpy()
    assert np.all(np.abs(layer.running_var.numpy() - start_var)[:2] > 0.05)  # the statistics moved ...
    # ... and the file moved them as PyTorch did (float16 activations: differences at half precision).
    np.testing.assert_allclose(feeds["1.running_var"], layer.running_var.numpy(), rtol=2e-3, atol=0)
    np.testing.assert_allclose(feeds["1.running_mean"], layer.running_mean.numpy(), rtol=0, atol=2e-3)


def outputs_order(onnx_model: onnx.ModelProto) -> list[str]:
    return [o.name for o in onnx_model.graph.output]


def test_external_data_is_written_beside_the_model(tmp_path: Path) -> None:
    model, shape = converted_cnn_model()
    path = tmp_path / "external.onnx"
    export_training(model, torch.randn(4, *shape), path, external_data_threshold=2048)
    (data,) = tmp_path.glob("external.onnx.*.data")  # one data file, named for this write
    assert data.is_file() and data.stat().st_size > 0
    x = torch.randn(3, *shape)
    got = ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, torch_train_step(model, x)["output"], rtol=0, atol=ATOL)


def _assert_unchanged(model: nn.Module, modes: dict[str, bool], state: dict[str, torch.Tensor]) -> None:
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key


def test_export_leaves_a_train_mode_model_as_it_was(exported: dict[str, Any]) -> None:
    """Mode, parameters, running statistics and num_batches_tracked are untouched by exporting."""
    _assert_unchanged(exported["model"], *exported["before"])


def test_export_leaves_an_eval_mode_model_as_it_was(tmp_path: Path) -> None:
    model, shape = mlp_model()
    model.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    export_training(model, torch.randn(4, *shape), tmp_path / "m.onnx", running_stats_io=True)
    _assert_unchanged(model, modes, state)


# --------------------------------------------------------------------------- bad input


def test_sampled_transition_is_refused_with_the_alternative() -> None:
    model = digits_resnet(width=8)
    wire_chain(model, torch.zeros(2, 1, 8, 8), KalmanOptions(transition="sampled"))
    with pytest.raises(ExportError, match=r"transition='sampled'.*transition='propagate'"):
        export_training(model, torch.randn(2, 1, 8, 8), "unused.onnx")


def test_cumulative_momentum_is_refused_for_running_stats_io() -> None:
    model, shape = mlp_model()
    assert isinstance(model, nn.Sequential) and isinstance(model[1], _BatchKalmanNorm)
    model[1].momentum = None
    with pytest.raises(ExportError, match=r"'1' has momentum=None"):
        export_training(model, torch.randn(2, *shape), "unused.onnx", running_stats_io=True)


def test_empty_example_batch_is_refused() -> None:
    model, shape = mlp_model()
    with pytest.raises(OptionError, match=r"shape \(0, 6\): an empty batch"):
        export_training(model, torch.randn(0, *shape), "unused.onnx")
    with pytest.raises(OptionError, match=r"shape \(2, 0\); the export needs a non-empty batch"):
        export_training(model, torch.randn(2, 0), "unused.onnx")


def test_model_without_bkn_layers_is_refused() -> None:
    with pytest.raises(ExportError, match="convert_batchnorm"):
        export_training(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), "unused.onnx")


def test_mismatched_chain_shapes_are_reported(tmp_path: Path) -> None:
    model, shape = mlp_model()
    assert isinstance(model, nn.Sequential)
    layer = model[4]
    assert isinstance(layer, _BatchKalmanNorm)
    layer.transition_matrix = nn.Parameter(torch.randn(8, 13))  # predecessor has 12 channels
    with pytest.raises(ExportError, match=r"Kalman chain's shapes do not fit.*wire_chain"):
        export_training(model, torch.randn(2, *shape), tmp_path / "bad.onnx")


def test_mismatched_chain_in_a_graph_is_caught_by_the_check(exported: dict[str, Any], tmp_path: Path) -> None:
    onnx_model = onnx.load(str(exported["path"]))
    node = next(n for n in onnx_model.graph.node if n.domain == op_spec.DOMAIN)
    wrong = onnx.helper.make_tensor("wrong_prior", onnx.TensorProto.FLOAT, [99], [0.0] * 99)
    onnx_model.graph.initializer.append(wrong)
    node.input[1] = "wrong_prior"
    with pytest.raises(ModelFileError, match=rf"BatchKalmanNorm.*\({node.name}\).*'prior_mean' has shape \[99\]"):
        check_training_model(onnx_model)


def test_stripped_function_is_explained_and_restorable(exported: dict[str, Any], tmp_path: Path) -> None:
    onnx_model = onnx.load(str(exported["path"]))
    del onnx_model.functions[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(onnx_model, str(stripped))
    with pytest.raises(Exception, match="BatchKalmanNorm"):  # ORT alone: no implementation for the op
        ort_session(stripped, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    with pytest.raises(ModelFileError, match=r"no function body.*attach_function\(model\).*mode='training'"):
        check_training_model(stripped)
    attach_function(onnx_model)
    check_training_model(onnx_model)
    x = torch.randn(2, *exported["shape"])
    feeds = feeds_for(exported["model"], onnx_model, x)
    restored = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        restored.run(["output"], feeds)[0], torch_train_step(exported["model"], x)["output"], rtol=0, atol=ATOL
    )


def test_unknown_domain_is_explained(exported: dict[str, Any]) -> None:
    onnx_model = onnx.load(str(exported["path"]))
    kept = [e for e in onnx_model.opset_import if e.domain != op_spec.DOMAIN]
    del onnx_model.opset_import[:]
    onnx_model.opset_import.extend(kept)
    with pytest.raises(ModelFileError, match=r"does not import domain 'ai.bkn'.*attach_function"):
        check_training_model(onnx_model)


@pytest.mark.parametrize("op_type", ["p_BatchKalmanNorm", "BKNStep"])
def test_renamed_op_nodes_are_named_not_passed(exported: dict[str, Any], op_type: str) -> None:
    """BKN nodes a tool renamed (a prefixed op type, or another op type in the ai.bkn domain) were not BKN nodes to
    the check, which then passed a file nothing can run; it now names the first and how many."""
    onnx_model = onnx.load(str(exported["path"]))
    nodes = [n for n in onnx_model.graph.node if op_spec.is_op_node(n)]
    for node in nodes:
        node.op_type = op_type
    pattern = rf"node '{nodes[0].name}' is ai\.bkn::{op_type}, a renamed ai\.bkn::BatchKalmanNorm \({len(nodes)} such"
    with pytest.raises(ModelFileError, match=pattern):
        check_training_model(onnx_model)


def test_missing_file_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        check_training_model(tmp_path / "absent.onnx")


def test_runtime_feeds_are_checked(exported: dict[str, Any]) -> None:
    onnx_model = onnx.load(str(exported["path"]))
    good = feeds_for(exported["model"], onnx_model, torch.randn(2, *exported["shape"]))
    check_feeds(onnx_model, good)
    name = onnx_model.graph.input[0].name
    empty = {**good, name: np.zeros((0, *exported["shape"]), np.float32)}
    with pytest.raises(BKNInputError, match=rf"input '{name}' is empty"):
        check_feeds(onnx_model, empty)
    wrong_channels = {**good, name: np.zeros((2, 7, *exported["shape"][1:]), np.float32)}
    with pytest.raises(BKNInputError, match=rf"input '{name}' has shape \(2, 7[,)].*; expected \(batch"):
        check_feeds(onnx_model, wrong_channels)
    with pytest.raises(BKNInputError, match=rf"input '{name}' has dtype float64"):
        check_feeds(onnx_model, {**good, name: good[name].astype(np.float64)})
    with pytest.raises(BKNInputError, match=rf"input '{name}' holds 1 NaN/Inf"):
        check_feeds(onnx_model, {**good, name: np.where(np.arange(good[name].size).reshape(good[name].shape) == 3,
                                                         np.nan, good[name]).astype(np.float32)})  # fmt: skip
    with pytest.raises(BKNInputError, match=r"unknown input\(s\) \['nope'\]"):
        check_feeds(onnx_model, {**good, "nope": good[name]})


# --------------------------------------------------------------------------- the example


@pytest.mark.slow
def test_time_adaptation_example_recovers_accuracy() -> None:
    """examples/test_time_adaptation.py: ORT-adapted running statistics beat the source statistics."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "test_time_adaptation.py"
    spec = importlib.util.spec_from_file_location("test_time_adaptation_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--epochs", "3", "--passes", "1"])
    assert results["clean"] > 0.85
    assert results["shifted_after"] > results["shifted_before"] + 0.2


# --------------------------------------------------------------------------- submodules of a BKN layer


def test_norm_act_dropout_stays_in_eval_in_export_and_reference(tmp_path: Path) -> None:
    """A BatchKalmanNormAct2d's ``drop`` (Dropout(0.5)) is not put in train mode: no Dropout node, parity passes.

    Only the BKN layers run in train mode (batch statistics); their children stay in eval,
    so the graph is deterministic and the PyTorch training reference is too.
    """
    import runtime
    from bkn_export.norm_act import BatchKalmanNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        BatchKalmanNormAct2d(8, drop_layer=lambda: nn.Dropout(0.5)),
        nn.Conv2d(8, 8, 3, padding=1),
        BatchKalmanNormAct2d(8, drop_layer=lambda: nn.Dropout(0.5)),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    ).eval()
    x = torch.randn(4, 1, 6, 6)
    wire_chain(model, x)
    path = tmp_path / "norm_act_train.onnx"
    export_onnx(model, x, path, mode="training")
    graph = onnx.load(str(path)).graph
    assert [n.name for n in graph.node if n.op_type == "Dropout"] == []
    session = ort_session(path, ORT_LEVELS[0])
    feeds = {session.get_inputs()[0].name: x.numpy()}
    np.testing.assert_array_equal(session.run(None, feeds)[0], session.run(None, feeds)[0])
    runtime.assert_parity(model, (x,), mode="training", runtimes="ort:cpu:all", onnx_path=path)
    assert all(not m.training for m in model.modules()), "the user's model is given back in eval"


class _SharedNorm(nn.Module):
    """One BatchNorm called twice per forward (its weights shared): train mode updates its statistics twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c2(torch.relu(self.bn(self.c1(x)))))


def test_running_statistics_outputs_of_a_layer_called_twice_take_both_updates(tmp_path: Path) -> None:
    """They held the first call's update only (the second call's was lost without a word)."""
    x = torch.randn(2, 3, 8, 8)
    model = convert_batchnorm(_SharedNorm().eval(), x)
    path = tmp_path / "shared.onnx"
    export_training(model, x, path, running_stats_io=True)
    mean_in, var_in, mean_out, var_out = running_stat_names("bn")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x.numpy(), mean_in: model.bn.running_mean.numpy(),
             var_in: model.bn.running_var.numpy()}  # fmt: skip
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    stepped = copy.deepcopy(model).train()
    with torch.no_grad():
        stepped(x)
    np.testing.assert_allclose(got[mean_out], stepped.bn.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[var_out], stepped.bn.running_var.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(stepped.bn.running_var.numpy(), model.bn.running_var.numpy())


def test_posteriors_of_a_layer_called_twice_are_refused_by_name(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    model = convert_batchnorm(_SharedNorm().eval(), x)
    with pytest.raises(ExportError, match=r"'bn' runs 2 times in one forward.*without expose_posteriors"):
        export_training(model, x, tmp_path / "shared.onnx", expose_posteriors=True)


def test_a_float64_training_export_warns_that_the_file_is_not_float64_exact(tmp_path: Path) -> None:
    """eps is a 32-bit ONNX attribute and the exporter rounds the prior's scalar constants to float32: parity at
    float64's 1e-10 fails on every runtime, so the export says so (it was silent)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = convert_batchnorm(_SharedNorm().double().eval(), x)
    with pytest.warns(UserWarning, match=r"float64 model's training-mode file is not float64-exact"):
        export_training(model, x, tmp_path / "f64.onnx")
    eps = [a.f for n in onnx.load(tmp_path / "f64.onnx").graph.node for a in n.attribute if a.name == "epsilon"]
    assert eps and all(e != 1e-5 and abs(e - 1e-5) < 1e-12 for e in eps)  # 1e-5 rounded to float32


def test_a_layer_frozen_in_eval_mode_inside_a_training_model_is_exported_as_the_model_runs_it(
    tmp_path: Path,
) -> None:
    """It normalizes with its running statistics and hands them on (``tests/test_frozen_layers.py``); the file
    does the same, leaves its running statistics out of the IO, and parity's reference runs the model as it is."""
    import runtime

    model, shape = converted_cnn_model()
    x = torch.randn(4, *shape)
    model.train()
    model[4].eval()  # the second of three BKN layers frozen, as in fine-tuning
    path = tmp_path / "frozen.onnx"
    export_training(model, x, path, running_stats_io=True)
    onnx_model = onnx.load(str(path))
    nodes = [n for n in onnx_model.graph.node if n.op_type == op_spec.OP_TYPE]
    assert [n.name for n in nodes] == ["1", "7"]
    assert not any(i.name.startswith("4.") for i in onnx_model.graph.input)
    work = copy.deepcopy(model)
    feeds = {
        f"{k}.{stat}": getattr(work[k], stat).numpy().copy() for k in (1, 7) for stat in ("running_mean", "running_var")
    }
    with torch.no_grad():
        expected = work(x).numpy()  # the model as the user runs it: layer 4 frozen
    got = ort_session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(["output"], {"input": x.numpy(), **feeds})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    all_trained = copy.deepcopy(model)
    train_layers_only([all_trained[4]])
    with torch.no_grad():
        assert np.abs(all_trained(x).numpy() - expected).max() > 100 * ATOL  # the switch would have shown
    report = runtime.assert_parity(model, x, mode="training", runtimes="reference", onnx_path=path)
    assert any("('4')" in note and "running statistics" in note for note in report.notes)
    assert not model[4].training and model[1].training  # the user's model keeps its modes
    # checked against the model with every layer training (a factory, a rebuilt model): it fails, and says why
    model[4].train()
    mismatch = runtime.run_parity(model, path, None, mode="training", runtimes="reference", localise_failures=False)
    assert not mismatch.passed
    assert any("layer(s) '4' train in the model but have no BatchKalmanNorm node" in n for n in mismatch.notes)


def test_a_models_dropout_is_named_as_exported_off(tmp_path: Path) -> None:
    """The file runs Dropout as in eval mode (only the BKN layers train): the export says so, naming the modules."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(64, 2)
    )
    x = torch.randn(2, 1, 4, 4)
    convert_batchnorm(model, x)
    with pytest.warns(UserWarning, match=r"1 Dropout module\(s\) \('3'\) run as in eval mode \(off\) in the file"):
        export_onnx(model, x, tmp_path / "dropout.onnx", mode="training")
