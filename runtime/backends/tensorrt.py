"""TensorRT backend: build an engine from the ONNX file with TensorRT's Python API, run it.

``BatchKalmanNorm`` nodes run as the plugin in ``plugins/tensorrt/``: ``load`` loads the
plugin library through TensorRT's plugin registry (``IPluginRegistry.load_library``),
hands the parser the model prepared by
:func:`bkn_export.tensorrt_plugin.prepare_model_for_plugin` (the op's local function
removed, so the parser cannot fall back to the function body), and checks that every
BKN node became a plugin layer before building. The engine has one optimization
profile: dynamic batch dims span ``1..max_batch`` (other dynamic dims need
``profile_shapes``). Buffers live in torch CUDA tensors; the engine runs on torch's
current stream.

Typed against ``tensorrt-stubs`` 10.13. Where TensorRT 11 differs for what is used here:

* networks are always strongly typed in 11 (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  is deprecated there but still accepted); in 10.x we set it so that float16 models run
  in the precisions the ONNX file states, as in 11. ``BuilderFlag.FP16/BF16/INT8`` and
  ``EXPLICIT_BATCH`` no longer exist in 11; this backend uses none of them.
* ``OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE`` exists from 10.15 on (not in the 10.13 stubs);
  it is not needed: see :mod:`bkn_export.tensorrt_plugin` for how the parser picks the plugin.
* ``load_library``, ``execute_async_v3``, ``set_input_shape``, ``set_tensor_address``,
  ``get_tensor_profile_shape`` have the same signatures in 10.x and 11.x.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bkn_export.errors import BKNInputError, RuntimeExecutionError, RuntimeLoadError
from runtime.backends.base import Availability, Backend

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

__all__ = ["DEFAULT_MAX_BATCH", "TensorRTBackend", "tensorrt_availability"]

#: Largest batch of the default optimization profile.
DEFAULT_MAX_BATCH = 32
#: Builder workspace limit (bytes); the plugin itself needs 16 bytes per channel.
DEFAULT_WORKSPACE_BYTES = 1 << 30

ProfileShapes = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

#: Plugin libraries loaded into this process's plugin registry (resolved path -> handle).
#: TensorRT refuses to load a library twice (its creators are then already registered).
_LOADED_LIBRARIES: dict[str, object] = {}


def tensorrt_availability() -> Availability:
    """Whether TensorRT's Python bindings and a CUDA device are usable here (never raises)."""
    try:
        import tensorrt as trt_module
    except Exception as error:  # ImportError, or a broken install raising anything
        return Availability(False, f"`import tensorrt` failed ({type(error).__name__}: {error}); install TensorRT")
    if not hasattr(trt_module, "Builder"):
        where = ", ".join(getattr(trt_module, "__path__", [])) or "?"
        return Availability(
            False,
            f"`import tensorrt` finds no TensorRT bindings, only a namespace package at {where} "
            "(tensorrt-stubs without TensorRT); install TensorRT (pip install tensorrt) on a machine with a GPU",
        )
    try:
        import torch as torch_module

        if not torch_module.cuda.is_available():
            return Availability(False, f"TensorRT {trt_module.__version__} imports, but torch sees no CUDA device")
    except Exception as error:
        return Availability(False, f"cannot query CUDA through torch ({type(error).__name__}: {error})")
    return Availability(True, f"TensorRT {trt_module.__version__}")


def _shape(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple of ints (-1 for a dynamic dim)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    import torch as torch_module

    return torch_module.from_numpy(np.empty(0, dtype=dtype)).dtype


class TensorRTBackend(Backend):
    """TensorRT engine built from the ONNX file, with the BatchKalmanNorm plugin.

    plugin_libraries: plugin shared libraries to load through TensorRT's plugin registry
    (``IPluginRegistry.load_library``: the ``libbkn_tensorrt_plugin.so`` kind, exporting
    ``getCreators``). When the model has BatchKalmanNorm nodes and none of them provides
    its creator, :func:`bkn_export.tensorrt_plugin.find_plugin_library` finds ours
    (``$BKN_TENSORRT_PLUGIN``, then the default build folders). max_batch / opt_batch: range of
    dynamic batch dims in the profile. profile_shapes: explicit (min, opt, max) per
    input name, overriding the default profile.
    """

    name = "tensorrt"

    def __init__(
        self,
        plugin_libraries: Sequence[str | os.PathLike[str]] = (),
        max_batch: int = DEFAULT_MAX_BATCH,
        opt_batch: int | None = None,
        profile_shapes: ProfileShapes | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        device: int = 0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._plugin_libraries = [Path(p) for p in plugin_libraries]
        self._max_batch = max_batch
        self._opt_batch = min(opt_batch if opt_batch is not None else max_batch, max_batch)
        self._profile_shapes = dict(profile_shapes or {})
        self._workspace_bytes = workspace_bytes
        self._device = device
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._model_path: str | None = None
        self.plugin_libraries_loaded: list[Path] = []
        self.plugin_layers = 0

    def available(self) -> Availability:
        return tensorrt_availability()

    # ------------------------------------------------------------------ load

    def _load_library(self, registry: trt.IPluginRegistry, library: Path) -> None:
        key = str(library.resolve())
        if key not in _LOADED_LIBRARIES:
            handle = registry.load_library(key)
            if handle is None:
                raise RuntimeLoadError(
                    f"TensorRT could not load the plugin library {library} (IPluginRegistry.load_library returned "
                    "no handle; TensorRT's log above says why: a TensorRT/CUDA version mismatch, a missing symbol, "
                    "or creators already registered by another copy of the library)"
                )
            _LOADED_LIBRARIES[key] = handle
        self.plugin_libraries_loaded.append(library)

    def _load_plugins(self, trt_module: Any, needs_batch_kalman_norm: bool) -> None:
        from bkn_export.errors import PluginLibraryNotFoundError
        from bkn_export.export import op_spec
        from bkn_export.tensorrt_plugin import find_plugin_library

        registry = trt_module.get_plugin_registry()
        for library in self._plugin_libraries:
            if not library.is_file():
                raise PluginLibraryNotFoundError(f"TensorRT plugin library {library} does not exist")
            self._load_library(registry, library)

        def registered() -> bool:
            creator = registry.get_creator(op_spec.PLUGIN_NAME, op_spec.PLUGIN_VERSION, op_spec.PLUGIN_NAMESPACE)
            return creator is not None

        if needs_batch_kalman_norm and not registered():
            library = find_plugin_library()
            self._load_library(registry, library)
            if not registered():
                raise RuntimeLoadError(
                    f"{library} loaded, but no creator {op_spec.PLUGIN_NAMESPACE}::{op_spec.PLUGIN_NAME} "
                    f"version {op_spec.PLUGIN_VERSION} is registered; rebuild the plugin from this checkout"
                )

    def _profile(self, name: str, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if name in self._profile_shapes:
            low, opt, high = self._profile_shapes[name]
            return tuple(low), tuple(opt), tuple(high)
        if any(d < 0 for d in shape[1:]):
            raise RuntimeLoadError(
                f"TensorRT backend: input {name!r} has dynamic non-batch dims {tuple(shape)}; "
                "pass profile_shapes={name: (min, opt, max)} to TensorRTBackend"
            )
        if not shape or shape[0] >= 0:
            fixed = tuple(shape)
            return fixed, fixed, fixed
        rest = tuple(shape[1:])
        return (1, *rest), (self._opt_batch, *rest), (self._max_batch, *rest)

    def load(self, model_path: str) -> None:
        import onnx
        import tensorrt as trt_module
        import torch as torch_module

        from bkn_export.tensorrt_plugin import plugin_nodes, prepare_model_for_plugin

        availability = self.available()
        if not availability:
            raise RuntimeLoadError(f"TensorRT backend unavailable: {availability.reason}")
        path = Path(model_path)
        if not path.is_file():
            raise RuntimeLoadError(f"TensorRT backend: ONNX file {path} does not exist")
        model = onnx.load(str(path), load_external_data=False)
        expected_plugins = len(plugin_nodes(model))
        self._load_plugins(trt_module, needs_batch_kalman_norm=expected_plugins > 0)
        if expected_plugins:
            model = prepare_model_for_plugin(model)

        logger = trt_module.Logger(trt_module.Logger.WARNING)
        builder = trt_module.Builder(logger)
        network = builder.create_network(1 << int(trt_module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt_module.OnnxParser(network, logger)
        # `path` lets the parser find external data files beside the original model.
        if not parser.parse(model.SerializeToString(), str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeLoadError(f"TensorRT's ONNX parser rejected {path}: {errors}")
        plugin_layers = sum(
            1 for i in range(network.num_layers) if network.get_layer(i).type == trt_module.LayerType.PLUGIN_V3
        )
        if plugin_layers < expected_plugins:
            raise RuntimeLoadError(
                f"{path}: only {plugin_layers} of {expected_plugins} BatchKalmanNorm nodes became TensorRT plugin "
                "layers; the parser imported the others some other way"
            )
        self.plugin_layers = plugin_layers

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt_module.MemoryPoolType.WORKSPACE, self._workspace_bytes)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            low, opt, high = self._profile(tensor.name, _shape(tensor.shape))
            profile.set_shape(
                tensor.name, trt_module.Dims(list(low)), trt_module.Dims(list(opt)), trt_module.Dims(list(high))
            )
        config.add_optimization_profile(profile)
        with torch_module.cuda.device(self._device):
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise RuntimeLoadError(f"TensorRT could not build an engine for {path}; see TensorRT's log above")
            engine = trt_module.Runtime(logger).deserialize_cuda_engine(plan)
            if engine is None:
                raise RuntimeLoadError(f"TensorRT could not deserialize the engine built for {path}")
            self._engine = engine
            self._context = engine.create_execution_context()
        self._model_path = str(path)

    # ------------------------------------------------------------------ run

    def _io_names(self, mode: trt.TensorIOMode) -> list[str]:
        assert self._engine is not None
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        return [n for n in names if self._engine.get_tensor_mode(n) == mode]

    def _check_input(self, name: str, array: np.ndarray) -> None:
        import tensorrt as trt_module

        assert self._engine is not None
        expected_dtype = np.dtype(trt_module.nptype(self._engine.get_tensor_dtype(name)))
        if array.dtype != expected_dtype:
            raise BKNInputError(f"TensorRT backend: input {name!r} has dtype {array.dtype}, expected {expected_dtype}")
        low, _, high = (_shape(s) for s in self._engine.get_tensor_profile_shape(name, 0))
        fits = len(array.shape) == len(low) and all(lo <= d <= hi for d, lo, hi in zip(array.shape, low, high))
        if not fits:
            raise BKNInputError(
                f"TensorRT backend: input {name!r} has shape {tuple(array.shape)}; the engine accepts shapes from "
                f"{low} to {high} (rebuild with a larger max_batch or profile_shapes)"
            )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt_module
        import torch as torch_module

        if self._engine is None or self._context is None:
            raise RuntimeLoadError("TensorRT backend: call load(model_path) before run()")
        context = self._context
        input_names = self._io_names(trt_module.TensorIOMode.INPUT)
        missing = [n for n in input_names if n not in inputs]
        unknown = [n for n in inputs if n not in input_names]
        if missing or unknown:
            raise BKNInputError(
                f"TensorRT backend: inputs {sorted(inputs)} do not match the engine's {input_names} "
                f"(missing {missing}, unknown {unknown})"
            )
        device = torch_module.device("cuda", self._device)
        keep_alive: list[torch_module.Tensor] = []
        with torch_module.cuda.device(self._device):
            for name in input_names:
                array = np.ascontiguousarray(inputs[name])
                self._check_input(name, array)
                tensor = torch_module.from_numpy(array).to(device)
                keep_alive.append(tensor)
                context.set_input_shape(name, tuple(array.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            outputs: dict[str, torch_module.Tensor] = {}
            for name in self._io_names(trt_module.TensorIOMode.OUTPUT):
                shape = _shape(context.get_tensor_shape(name))
                dtype = np.dtype(trt_module.nptype(self._engine.get_tensor_dtype(name)))
                outputs[name] = torch_module.empty(shape, dtype=_torch_dtype(dtype), device=device)
                context.set_tensor_address(name, outputs[name].data_ptr())
            stream = torch_module.cuda.current_stream(device)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeExecutionError(
                    f"TensorRT engine for {self._model_path} failed to run (execute_async_v3 returned False); "
                    "see TensorRT's log above"
                )
            stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
