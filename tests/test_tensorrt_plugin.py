"""The TensorRT plugin for ai.bkn::BatchKalmanNorm: contract, build, kernels, engine.

What runs where (see docs/tensorrt.md):
* everywhere: the generated C++ field header is current; exported nodes carry the plugin's
  registered name / version / namespace and one attribute per plugin field; the model the
  TensorRT backend hands the parser leaves the plugin as the only import path.
* nvcc on PATH: the kernel-only CMake target builds and its C entry points answer.
* TensorRT headers in $BKN_TENSORRT_INCLUDE: both plugin libraries build, and the loadLibrary
  one is dlopen'ed and exercised through its TensorRT interfaces (bkn_plugin_library_test).
* a CUDA GPU (marker gpu): the CUDA launcher against bkn_export.functional.
* TensorRT (marker tensorrt): engine build + run against PyTorch.
"""

from __future__ import annotations

import copy
import ctypes
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bkn_export import functional
from bkn_export.errors import PluginLibraryNotFoundError, RuntimeLoadError
from bkn_export.export.op import op_spec
from bkn_export.tensorrt_plugin import (
    DYNAMIC_LIBRARY_NAME,
    PLUGIN_SOURCE_DIR,
    STATIC_LIBRARY_NAME,
    find_plugin_library,
    plugin_fields,
    plugin_nodes,
    prepare_model_for_plugin,
    render_fields_header,
)
from runtime.backends.tensorrt import TensorRTBackend

FIELDS_HEADER = PLUGIN_SOURCE_DIR / "BatchKalmanNormFields.h"
KERNEL_LIBRARY_NAME = "libbkn_batch_kalman_norm_kernel.so"
TENSORRT_INCLUDE_ENV = "BKN_TENSORRT_INCLUDE"
CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue
#: The ONNX attribute type TensorRT's parser (onnxOpImporters.cpp loadFields) turns into each field type.
ONNX_TYPE_OF_FIELD = {"kFLOAT32": onnx.AttributeProto.FLOAT, "kCHAR": onnx.AttributeProto.STRING}


# --------------------------------------------------------------------------- helpers


class Registered(NamedTuple):
    name: str
    version: str
    namespace: str
    fields: list[tuple[str, str]]  # (name, "kFLOAT32" | "kCHAR")


def _registered() -> Registered:
    """What the C++ plugin registers, read from the committed header it is compiled with."""
    text = FIELDS_HEADER.read_text()

    def constant(name: str) -> str:
        match = re.search(rf'constexpr char const\* {name} = "([^"]*)";', text)
        assert match, f"{name} missing from {FIELDS_HEADER}"
        return match.group(1)

    fields = re.findall(r'^\s+\{"(\w+)", FieldKind::(kFLOAT32|kSTRING),', text, flags=re.MULTILINE)
    return Registered(
        constant("kPLUGIN_NAME"),
        constant("kPLUGIN_VERSION"),
        constant("kPLUGIN_NAMESPACE"),
        [(name, "kFLOAT32" if kind == "kFLOAT32" else "kCHAR") for name, kind in fields],
    )


def _single_node_model(
    channels: int, spatial: tuple[int, ...], elem_type: int, **attributes: object
) -> onnx.ModelProto:
    """One BatchKalmanNorm node built from op_spec: X (batch, C, *spatial) of elem_type, (C,) float inputs."""
    attrs: dict[str, Any] = {a.name: a.default for a in op_spec.ATTRIBUTES}
    attrs.update(attributes)
    names = [port.name for port in op_spec.INPUTS]
    graph_inputs = [helper.make_tensor_value_info(names[0], elem_type, ["batch", channels, *spatial])]
    graph_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [channels]) for n in names[1:]]
    outputs = [port.name for port in op_spec.OUTPUTS]
    graph_outputs = [helper.make_tensor_value_info(outputs[0], elem_type, ["batch", channels, *spatial])]
    graph_outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [channels]) for n in outputs[1:]]
    node = helper.make_node(op_spec.OP_TYPE, names, outputs, name="bkn0", domain=op_spec.DOMAIN, **attrs)
    graph = helper.make_graph([node], "single_bkn", graph_inputs, graph_outputs)
    return helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", op_spec.MIN_OPSET),
            helper.make_opsetid(op_spec.DOMAIN, op_spec.DOMAIN_VERSION),
        ],
    )


def _attribute(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    found = [a for a in node.attribute if a.name == name]
    assert found, f"node {node.name!r} has no attribute {name!r}"
    return found[0]


def _string_attribute(node: onnx.NodeProto, name: str) -> str:
    value = helper.get_attribute_value(_attribute(node, name))
    return value.decode() if isinstance(value, bytes) else str(value)


def _small_bkn_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """Conv → BKN → ReLU → Conv → BKN (a two-link Kalman chain), converted from BatchNorm."""
    from bkn_export.convert import convert_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
    )
    example = torch.randn(3, 2, 6, 6)
    return convert_batchnorm(model, example), example


@pytest.fixture(scope="module")
def exported_training_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """A training-mode export of a two-BKN model (path, model, example input)."""
    try:
        from bkn_export.export.training import export_training  # noqa: F401
    except ImportError as error:
        pytest.skip(f"training-mode export not available yet ({error})")
    from bkn_export.export import export_onnx

    model, example = _small_bkn_model()
    path = tmp_path_factory.mktemp("trt_export") / "bkn_train.onnx"
    export_onnx(model, example, path, mode="training")
    return path, model, example


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _cmake_build(build_dir: Path, *options: str) -> str:
    """Configure + build plugins/tensorrt into build_dir; returns the log; fails the test on an error."""
    log = []
    for command in (
        ["cmake", "-S", str(PLUGIN_SOURCE_DIR), "-B", str(build_dir), *options],
        ["cmake", "--build", str(build_dir), "-j", "2"],
    ):
        result = _run(command)
        log.append(result.stdout + result.stderr)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return "\n".join(log)


def _require_build_tools() -> None:
    for tool in ("cmake", "nvcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not on PATH; the CUDA sources are compiled where the CUDA toolkit is installed")


@pytest.fixture(scope="session")
def kernel_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel-only CMake target (no TensorRT), built once per session with the default arch list."""
    _require_build_tools()
    build_dir = tmp_path_factory.mktemp("bkn_kernel_build")
    _cmake_build(build_dir, "-DBKN_BUILD_PLUGIN=OFF")
    library = build_dir / KERNEL_LIBRARY_NAME
    assert library.is_file(), f"{library} was not produced"
    return library


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Both plugin libraries + the library test, built against $BKN_TENSORRT_INCLUDE (build dir, log)."""
    _require_build_tools()
    include = os.environ.get(TENSORRT_INCLUDE_ENV)
    if not include or not (Path(include) / "NvInferRuntime.h").is_file():
        pytest.skip(
            f"TensorRT headers not found: set ${TENSORRT_INCLUDE_ENV} to a folder with NvInferRuntime.h "
            "(e.g. a checkout of NVIDIA/TensorRT's include/, see plugins/tensorrt/README.md)"
        )
    build_dir = tmp_path_factory.mktemp("bkn_plugin_build")
    log = _cmake_build(build_dir, f"-DTensorRT_INCLUDE_DIR={include}")
    return build_dir, log


def _nm(library: Path, *flags: str) -> set[str]:
    if shutil.which("nm") is None:
        pytest.skip("`nm` (binutils) is not on PATH")
    result = _run(["nm", "-D", *flags, str(library)])
    assert result.returncode == 0, result.stderr
    return {line.split()[-1].split("@")[0] for line in result.stdout.splitlines() if line.strip()}


# --------------------------------------------------------------------------- one source of truth


def test_fields_header_is_generated_from_op_spec() -> None:
    assert FIELDS_HEADER.read_text() == render_fields_header(), (
        f"{FIELDS_HEADER} is stale: run `python plugins/tensorrt/gen_fields.py`"
    )


def test_gen_fields_check_mode_accepts_the_committed_header() -> None:
    result = _run([sys.executable, str(PLUGIN_SOURCE_DIR / "gen_fields.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_plugin_fields_are_the_op_attributes_in_order() -> None:
    fields = plugin_fields()
    assert [f.name for f in fields] == [a.name for a in op_spec.ATTRIBUTES]
    assert [f.default for f in fields] == [a.default for a in op_spec.ATTRIBUTES]
    assert [(f.name, f.field_type) for f in fields] == _registered().fields


def test_registered_identity_is_op_specs() -> None:
    registered = _registered()
    assert (registered.name, registered.version, registered.namespace) == (
        op_spec.PLUGIN_NAME,
        op_spec.PLUGIN_VERSION,
        op_spec.PLUGIN_NAMESPACE,
    )
    assert registered.name == op_spec.OP_TYPE  # the parser looks the creator up by op type


# --------------------------------------------------------------------------- node / plugin conformance


def _nodes_under_test(source: str, request: pytest.FixtureRequest) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    if source == "helper":
        model = _single_node_model(4, (3, 3), TensorProto.FLOAT)
    else:
        path, _, _ = request.getfixturevalue("exported_training_model")
        model = onnx.load(str(path))
    nodes = plugin_nodes(model)
    assert nodes, "no ai.bkn::BatchKalmanNorm node in the model"
    return model, nodes


@pytest.mark.parametrize("source", ["helper", "exported"])
def test_node_selects_the_registered_plugin(source: str, request: pytest.FixtureRequest) -> None:
    """Op type = plugin name; plugin_version / plugin_namespace attributes = registered ones."""
    registered = _registered()
    _, nodes = _nodes_under_test(source, request)
    for node in nodes:
        assert node.op_type == registered.name
        assert _string_attribute(node, "plugin_version") == registered.version
        assert _string_attribute(node, "plugin_namespace") == registered.namespace
        assert len(node.input) == len(op_spec.INPUTS) and len(node.output) == len(op_spec.OUTPUTS)


@pytest.mark.parametrize("source", ["helper", "exported"])
def test_every_plugin_field_is_a_node_attribute_of_the_parsers_type(
    source: str, request: pytest.FixtureRequest
) -> None:
    """The parser passes node attributes named like the creator's fields, FLOAT→kFLOAT32, STRING→kCHAR."""
    _, nodes = _nodes_under_test(source, request)
    for node in nodes:
        for name, field_type in _registered().fields:
            assert _attribute(node, name).type == ONNX_TYPE_OF_FIELD[field_type], (node.name, name)


def test_plugin_version_is_independent_of_the_domain_version(
    exported_training_model: tuple[Path, object, object],
) -> None:
    model = onnx.load(str(exported_training_model[0]))
    domains = {entry.domain: entry.version for entry in model.opset_import}
    assert domains[op_spec.DOMAIN] == op_spec.DOMAIN_VERSION
    assert {_string_attribute(n, "plugin_version") for n in plugin_nodes(model)} == {op_spec.PLUGIN_VERSION}


def test_exported_model_carries_the_local_function_that_the_trt_path_removes(
    exported_training_model: tuple[Path, object, object],
) -> None:
    model = onnx.load(str(exported_training_model[0]))
    is_op = [(f.domain, f.name) == (op_spec.DOMAIN, op_spec.OP_TYPE) for f in model.functions]
    assert any(is_op), "the training export should carry the op's function body (for ONNX Runtime)"
    prepared = prepare_model_for_plugin(model)
    assert not any((f.domain, f.name) == (op_spec.DOMAIN, op_spec.OP_TYPE) for f in prepared.functions)
    assert len(prepared.functions) == len(model.functions) - sum(is_op)
    assert [n.SerializeToString() for n in prepared.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert any((f.domain, f.name) == (op_spec.DOMAIN, op_spec.OP_TYPE) for f in model.functions), "input modified"


def test_op_type_has_no_builtin_importer_so_the_plugin_is_the_only_path() -> None:
    """With the local function gone, a node is a built-in ONNX op, a TRT_* parser op, or a plugin."""
    standard = {schema.name for schema in onnx.defs.get_all_schemas_with_history() if schema.domain in ("", "ai.onnx")}
    assert op_spec.OP_TYPE not in standard
    assert not op_spec.OP_TYPE.startswith("TRT_")


def test_prepare_adds_missing_plugin_attributes() -> None:
    model = _single_node_model(4, (), TensorProto.FLOAT)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name not in ("plugin_version", "plugin_namespace")]
    del node.attribute[:]
    node.attribute.extend(kept)
    prepared_node = prepare_model_for_plugin(model).graph.node[0]
    assert _string_attribute(prepared_node, "plugin_version") == op_spec.PLUGIN_VERSION
    assert _string_attribute(prepared_node, "plugin_namespace") == op_spec.PLUGIN_NAMESPACE


@pytest.mark.parametrize("attribute", ["plugin_version", "plugin_namespace"])
def test_prepare_rejects_a_node_asking_for_another_plugin(attribute: str) -> None:
    model = _single_node_model(4, (), TensorProto.FLOAT, **{attribute: "other"})
    with pytest.raises(RuntimeLoadError, match=rf"bkn0.*{attribute}='other'"):
        prepare_model_for_plugin(model)


# --------------------------------------------------------------------------- Python side without TensorRT


def test_backend_reports_why_tensorrt_is_unavailable() -> None:
    availability = TensorRTBackend().available()
    if availability:
        pytest.skip(f"TensorRT is usable here ({availability.reason})")
    assert "tensorrt" in availability.reason.lower() or "cuda" in availability.reason.lower()


def test_backend_load_refuses_when_unavailable(tmp_path: Path) -> None:
    backend = TensorRTBackend()
    if backend.available():
        pytest.skip("TensorRT is usable here")
    with pytest.raises(RuntimeLoadError, match="TensorRT backend unavailable"):
        backend.load(str(tmp_path / "model.onnx"))


def test_backend_profile_spans_the_dynamic_batch() -> None:
    """One optimization profile: dynamic dim 0 from 1 to max_batch, fixed dims as declared."""
    backend = TensorRTBackend(max_batch=16, opt_batch=4)
    assert backend._profile("X", (-1, 8, 5, 5)) == ((1, 8, 5, 5), (4, 8, 5, 5), (16, 8, 5, 5))
    assert backend._profile("prior_mean", (8,)) == ((8,), (8,), (8,))
    assert backend._profile("step", ()) == ((), (), ())
    explicit = TensorRTBackend(profile_shapes={"X": ((1, 8, 2, 2), (2, 8, 4, 4), (4, 8, 8, 8))})
    assert explicit._profile("X", (-1, 8, -1, -1)) == ((1, 8, 2, 2), (2, 8, 4, 4), (4, 8, 8, 8))
    with pytest.raises(RuntimeLoadError, match=r"'X' has dynamic non-batch dims.*profile_shapes"):
        backend._profile("X", (-1, 8, -1, -1))


def test_missing_plugin_library_is_named(tmp_path: Path) -> None:
    missing = tmp_path / DYNAMIC_LIBRARY_NAME
    with pytest.raises(PluginLibraryNotFoundError, match=re.escape(str(missing))):
        find_plugin_library(missing)


def test_plugin_library_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = tmp_path / DYNAMIC_LIBRARY_NAME
    library.write_bytes(b"")
    monkeypatch.setenv("BKN_TENSORRT_PLUGIN", str(library))
    assert find_plugin_library() == library


# --------------------------------------------------------------------------- builds


def _kernel_api(library: Path) -> ctypes.CDLL:
    api = ctypes.CDLL(str(library))
    api.bkn_batch_kalman_norm_workspace_size.argtypes = [ctypes.c_int64]
    api.bkn_batch_kalman_norm_workspace_size.restype = ctypes.c_size_t
    api.bkn_batch_kalman_norm_forward.argtypes = [
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_float,
        ctypes.c_float,
        *([ctypes.c_void_p] * 11),
    ]
    api.bkn_batch_kalman_norm_forward.restype = ctypes.c_int32
    return api


def test_kernel_only_target_builds_with_nvcc(kernel_library: Path) -> None:
    api = _kernel_api(kernel_library)
    assert api.bkn_batch_kalman_norm_workspace_size(16) == 256  # 4 arrays x 16 floats, 256-byte aligned
    assert api.bkn_batch_kalman_norm_workspace_size(100) == 1792
    assert api.bkn_batch_kalman_norm_workspace_size(0) == 0


@pytest.mark.parametrize(("batch", "channels", "spatial"), [(0, 4, 1), (2, 0, 1), (2, 4, 0)])
def test_kernel_launcher_rejects_empty_shapes_before_touching_the_gpu(
    kernel_library: Path, batch: int, channels: int, spatial: int
) -> None:
    api = _kernel_api(kernel_library)
    pointers = [ctypes.c_void_p(16)] * 11  # never dereferenced: the shape is checked first
    status = api.bkn_batch_kalman_norm_forward(0, batch, channels, spatial, 1e-5, 0.0, *pointers)
    assert status == CUDA_ERROR_INVALID_VALUE


def test_kernel_launcher_rejects_missing_tensors_before_touching_the_gpu(kernel_library: Path) -> None:
    api = _kernel_api(kernel_library)
    pointers = [ctypes.c_void_p(16)] * 11
    for missing in range(10):  # x, the five (C,) inputs, y, both posteriors, the workspace
        with_null = [ctypes.c_void_p(None) if i == missing else p for i, p in enumerate(pointers)]
        assert api.bkn_batch_kalman_norm_forward(0, 2, 4, 1, 1e-5, 0.0, *with_null) == CUDA_ERROR_INVALID_VALUE


def test_kernel_launcher_rejects_an_unknown_element_type(kernel_library: Path) -> None:
    api = _kernel_api(kernel_library)
    assert api.bkn_batch_kalman_norm_forward(7, 2, 4, 1, 1e-5, 0.0, *([ctypes.c_void_p(16)] * 11)) == 1


def test_plugin_libraries_build_against_tensorrt_headers(plugin_build: tuple[Path, str]) -> None:
    build_dir, log = plugin_build
    assert re.search(r"BKN: TensorRT headers .* \(version \d+\.\d+\.\d+\.\d+\)", log), log[-2000:]
    dynamic, static = build_dir / DYNAMIC_LIBRARY_NAME, build_dir / STATIC_LIBRARY_NAME
    assert {"getCreators", "setLoggerFinder"} <= _nm(dynamic, "--defined-only")
    # The loadLibrary library needs nothing from libnvinfer; the static one resolves the
    # registry (and TensorRT's logger) when loaded into a TensorRT process.
    assert not {"getPluginRegistry", "getLogger"} & _nm(dynamic, "--undefined-only")
    assert {"getPluginRegistry", "getLogger"} <= _nm(static, "--undefined-only")
    assert "getCreators" not in _nm(static, "--defined-only")


def test_plugin_library_creator_and_plugin_through_tensorrt_interfaces(plugin_build: tuple[Path, str]) -> None:
    build_dir, _ = plugin_build
    result = _run([str(build_dir / "bkn_plugin_library_test"), str(build_dir / DYNAMIC_LIBRARY_NAME)])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"CREATOR {op_spec.PLUGIN_NAME} {op_spec.PLUGIN_VERSION} {op_spec.PLUGIN_NAMESPACE}" in lines
    fields = [tuple(line.split()[1:]) for line in lines if line.startswith("FIELD ")]
    assert fields == [(f.name, f.field_type) for f in plugin_fields()]
    assert not [line for line in lines if line.startswith("FAIL")]


# --------------------------------------------------------------------------- CUDA launcher numerics (GPU)


def _reference(
    x: torch.Tensor, prior: dict[str, torch.Tensor], epsilon: float, fallback_ratio: float
) -> functional.KalmanStep:
    cpu = {k: v.cpu() for k, v in prior.items()}
    return functional.batch_kalman_norm(
        x.cpu(),
        cpu["prior_mean"],
        cpu["prior_variance"],
        cpu["prior_weight"],
        cpu["scale"],
        cpu["B"],
        epsilon,
        fallback_ratio,
    )


def _prior(channels: int, variance_scale: float, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    values = {
        "prior_mean": rand(channels) - 0.5,
        "prior_variance": (rand(channels) + 0.5) * variance_scale,
        "prior_weight": rand(channels) * 0.9,
        "scale": rand(channels) + 0.5,
        "B": rand(channels) - 0.5,
    }
    return {k: v.to(device=device, dtype=torch.float32).contiguous() for k, v in values.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 3), (4, 6, 7, 5), (2, 3, 4, 5, 6), (64, 8, 33, 17), (4, 300, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("fallback_ratio", "variance_scale"), [(0.0, 1.0), (100.0, 1.0), (100.0, 1000.0)])
def test_cuda_launcher_matches_functional_reference(
    kernel_library: Path, shape: tuple[int, ...], dtype: torch.dtype, fallback_ratio: float, variance_scale: float
) -> None:
    """(100, 1000): the prior is 1000x wider than the batch, the fallback fires (p = 0)."""
    api = _kernel_api(kernel_library)
    epsilon = 1e-5
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2 + 1).to(dtype)
    x_gpu = x.cuda().contiguous()
    channels = shape[1]
    prior = _prior(channels, variance_scale, "cuda")
    y = torch.empty_like(x_gpu)
    posterior_mean = torch.empty(channels, device="cuda")
    posterior_variance = torch.empty(channels, device="cuda")
    workspace = torch.empty(api.bkn_batch_kalman_norm_workspace_size(channels), dtype=torch.uint8, device="cuda")
    spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    status = api.bkn_batch_kalman_norm_forward(
        1 if dtype == torch.float16 else 0,
        shape[0],
        channels,
        spatial,
        epsilon,
        fallback_ratio,
        *(ctypes.c_void_p(t.data_ptr()) for t in (x_gpu, *prior.values(), y, posterior_mean, posterior_variance)),
        ctypes.c_void_p(workspace.data_ptr()),
        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
    )
    torch.cuda.synchronize()
    assert status == 0
    expected = _reference(x, prior, epsilon, fallback_ratio)
    torch.testing.assert_close(posterior_mean.cpu(), expected.posterior_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(posterior_variance.cpu(), expected.posterior_variance, rtol=1e-4, atol=1e-5)
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-3, 4e-3)
    torch.testing.assert_close(y.cpu(), expected.output, rtol=rtol, atol=atol)


@pytest.mark.gpu
def test_cuda_launcher_keeps_precision_over_millions_of_values_per_channel(kernel_library: Path) -> None:
    """ReLU-like values (many repeats), 4.2M per channel: a plain float32 running sum per thread was 1e-4 off in the
    variance (a reviewer's emulation); the per-thread sums are compensated."""
    api = _kernel_api(kernel_library)
    shape = (4, 2, 1024, 1024)
    x = torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(0))).contiguous()
    prior = _prior(2, 1.0, "cuda")
    x_gpu = x.cuda()
    y = torch.empty_like(x_gpu)
    posterior_mean, posterior_variance = torch.empty(2, device="cuda"), torch.empty(2, device="cuda")
    workspace = torch.empty(api.bkn_batch_kalman_norm_workspace_size(2), dtype=torch.uint8, device="cuda")
    status = api.bkn_batch_kalman_norm_forward(
        0, shape[0], 2, shape[2] * shape[3], 1e-5, 0.0,
        *(ctypes.c_void_p(t.data_ptr()) for t in (x_gpu, *prior.values(), y, posterior_mean, posterior_variance)),
        ctypes.c_void_p(workspace.data_ptr()), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
    )  # fmt: skip
    torch.cuda.synchronize()
    assert status == 0
    expected = _reference(x.double(), {k: v.cpu().double() for k, v in prior.items()}, 1e-5, 0.0)
    torch.testing.assert_close(posterior_variance.cpu().double(), expected.posterior_variance, rtol=1e-5, atol=0)
    torch.testing.assert_close(posterior_mean.cpu().double(), expected.posterior_mean, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_cuda_launcher_a_nan_channel_does_not_fire_the_fallback_for_the_others(kernel_library: Path) -> None:
    """fmaxf(NaN, floor) is the floor: the ratio of a NaN channel was ~1e12, so p became 0 for every channel; the
    reference's mean ratio is NaN there and the rule does not fire."""
    api = _kernel_api(kernel_library)
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = float("nan")
    prior = _prior(3, 1.0, "cuda")
    x_gpu = x.cuda().contiguous()
    y = torch.empty_like(x_gpu)
    posterior_mean, posterior_variance = torch.empty(3, device="cuda"), torch.empty(3, device="cuda")
    workspace = torch.empty(api.bkn_batch_kalman_norm_workspace_size(3), dtype=torch.uint8, device="cuda")
    status = api.bkn_batch_kalman_norm_forward(
        0, 4, 3, 5, 1e-5, 100.0,
        *(ctypes.c_void_p(t.data_ptr()) for t in (x_gpu, *prior.values(), y, posterior_mean, posterior_variance)),
        ctypes.c_void_p(workspace.data_ptr()), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
    )  # fmt: skip
    torch.cuda.synchronize()
    assert status == 0
    expected = _reference(x, {k: v.cpu() for k, v in prior.items()}, 1e-5, 100.0)
    torch.testing.assert_close(posterior_variance.cpu()[1:], expected.posterior_variance[1:], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- TensorRT engine (TensorRT + GPU)


@pytest.fixture
def tensorrt_backend_factory(plugin_build: tuple[Path, str]) -> Iterator[Callable[..., TensorRTBackend]]:
    build_dir, _ = plugin_build

    def make(**options: Any) -> TensorRTBackend:
        return TensorRTBackend(plugin_libraries=[build_dir / DYNAMIC_LIBRARY_NAME], **options)

    yield make


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize(("elem_type", "dtype"), [(TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)])
@pytest.mark.parametrize("variance_scale", [1.0, 1000.0], ids=["prior-used", "fallback-fires"])
def test_tensorrt_engine_runs_the_plugin_with_dynamic_batch(
    tensorrt_backend_factory: Callable[..., TensorRTBackend],
    tmp_path: Path,
    elem_type: int,
    dtype: type,
    variance_scale: float,
) -> None:
    """fallback-fires: a prior 1000x wider than the batch, so fallback_ratio=100 must reach the engine intact."""
    channels, spatial = 6, (5, 4)
    model = _single_node_model(channels, spatial, elem_type, epsilon=1e-3, fallback_ratio=100.0)
    path = tmp_path / "single.onnx"
    onnx.save(model, str(path))
    backend = tensorrt_backend_factory(max_batch=16)
    backend.load(str(path))
    assert backend.plugin_layers == 1
    prior = _prior(channels, variance_scale, "cpu")
    for batch in (1, 3, 16):  # one engine, several batch sizes
        x = torch.randn(batch, channels, *spatial, generator=torch.Generator().manual_seed(batch)).to(
            torch.from_numpy(np.empty(0, dtype)).dtype
        )
        feeds = {"X": x.numpy(), **{k: v.numpy() for k, v in prior.items()}}
        outputs = backend.run(feeds)
        expected = _reference(x, prior, 1e-3, 100.0)
        torch.testing.assert_close(
            torch.from_numpy(outputs["posterior_mean"]), expected.posterior_mean, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            torch.from_numpy(outputs["posterior_variance"]), expected.posterior_variance, rtol=1e-4, atol=1e-5
        )
        rtol, atol = (1e-4, 1e-4) if dtype == np.float32 else (1e-3, 4e-3)
        torch.testing.assert_close(torch.from_numpy(outputs["Y"]), expected.output, rtol=rtol, atol=atol)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_pytorch_on_an_exported_training_model(
    tensorrt_backend_factory: Callable[..., TensorRTBackend],
    exported_training_model: tuple[Path, torch.nn.Module, torch.Tensor],
) -> None:
    path, model, example = exported_training_model
    backend = tensorrt_backend_factory(max_batch=8)
    backend.load(str(path))
    assert backend.plugin_layers == len(plugin_nodes(onnx.load(str(path))))
    onnx_model = onnx.load(str(path))
    input_name = onnx_model.graph.input[0].name
    output_name = onnx_model.graph.output[0].name
    for batch in (2, 5):
        x = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(batch))
        reference = copy.deepcopy(model).train()
        with torch.no_grad():
            expected = reference(x)
        outputs = backend.run({input_name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(outputs[output_name]), expected, rtol=1e-4, atol=1e-4)
