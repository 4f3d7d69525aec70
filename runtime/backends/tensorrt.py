"""TensorRT backend on Polygraphy's loaders, with the ``BatchKalmanNorm`` plugin.

The engine is built by Polygraphy's maintained loader chain, the one every TensorRT user's
``polygraphy run --trt`` goes through::

    LoadPlugins(plugins=[...], obj=
        EngineFromNetwork(
            PostprocessNetwork(NetworkFromOnnxBytes(model bytes, strongly_typed=True), check_plugin_layers),
            config=CreateConfig(profiles=[Profile], memory_pool_limits={WORKSPACE: ...})))
    TrtRunner(engine).infer(feed)

What is ours around it:

* **The plugin is chosen.** A model with ``ai.bkn::BatchKalmanNorm`` nodes is handed to
  the parser as :func:`runtime._bkn.prepare_model_for_plugin` makes it (the op's local
  function removed), so no parser version can fall back to the function body.
* **One plugin layer per node**, checked on the parsed network before the build
  (``PostprocessNetwork``); otherwise :class:`RuntimeLoadError`.
* **Plugin libraries.** ``LoadPlugins`` ``dlopen``\\ s each library (a library with a
  static registrar registers its creator then, as ``polygraphy run --plugins`` does); a
  library that exports ``getCreators`` (our ``libbkn_tensorrt_plugin.so``) is also handed
  to ``IPluginRegistry.load_library``, which is how TensorRT reads such libraries. When
  the model needs our plugin and no library gave its creator,
  :func:`runtime._bkn.find_plugin_library` finds ours.
* **One optimization profile**: dynamic batch dims span ``1..max_batch``; other dynamic
  dims need ``profile_shapes``.

Typed against ``tensorrt-stubs`` 10.13 where TensorRT objects are touched; Polygraphy's
loaders are untyped. TensorRT 10 and 11 agree on everything used here (networks are
strongly typed in 11; in 10 ``strongly_typed=True`` makes float16 models run in the
precisions the ONNX file states, as in 11). Models over protobuf's 2 GiB limit are
parsed from a temporary copy with external data (``NetworkFromOnnxPath``).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.base import Availability, Backend
from runtime.errors import BKNInputError, PluginLibraryNotFoundError, RuntimeExecutionError, RuntimeLoadError

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["DEFAULT_MAX_BATCH", "TensorRTBackend", "tensorrt_availability"]

#: Largest batch of the default optimization profile.
DEFAULT_MAX_BATCH = 32
#: Builder workspace limit (bytes); the plugin itself needs 16 bytes per channel.
DEFAULT_WORKSPACE_BYTES = 1 << 30
#: Above this the prepared model is parsed from a file with external data.
_PROTOBUF_LIMIT = 1_800_000_000

ProfileShapes = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

#: Libraries handed to IPluginRegistry.load_library in this process (resolved path -> handle):
#: TensorRT refuses to load a library twice (its creators are then already registered).
_LOADED_LIBRARIES: dict[str, object] = {}


def tensorrt_availability() -> Availability:
    """Whether TensorRT's Python bindings, Polygraphy and a CUDA device are usable here (never raises)."""
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
        import polygraphy
    except Exception as error:
        return Availability(False, f"`import polygraphy` failed ({error}); pip install 'bkn-export[tensorrt]'")
    try:
        import torch as torch_module

        if not torch_module.cuda.is_available():
            return Availability(False, f"TensorRT {trt_module.__version__} imports, but torch sees no CUDA device")
    except Exception as error:
        return Availability(False, f"cannot query CUDA through torch ({type(error).__name__}: {error})")
    return Availability(True, f"TensorRT {trt_module.__version__} via Polygraphy {polygraphy.__version__}")


def _onnx_dims(value: Any) -> tuple[int, ...]:
    """A graph input's dims, -1 for a symbolic one."""
    dims = value.type.tensor_type.shape.dim
    return tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)


class TensorRTBackend(Backend):
    """TensorRT engine built from the ONNX file through Polygraphy, with the BatchKalmanNorm plugin.

    plugin_libraries: plugin shared libraries (see the module docstring). max_batch /
    opt_batch: range of dynamic batch dims in the profile. profile_shapes: explicit
    (min, opt, max) per input name, overriding the default profile.
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
        self._runner: Any = None
        self._model_path: str | None = None
        self.plugin_libraries_loaded: list[Path] = []
        self.plugin_layers = 0

    def available(self) -> Availability:
        return tensorrt_availability()

    # ------------------------------------------------------------------ plugins

    def _register(self, registry: trt.IPluginRegistry, library: Path) -> None:
        """Hand a ``getCreators`` library to TensorRT's registry (once per process)."""
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

    def _libraries(self, trt_module: Any, needs_plugin: bool) -> list[Path]:
        """Every library to load: the given ones, plus ours when the model needs it and none provides it."""
        from runtime._bkn import find_plugin_library, plugin_identity

        for library in self._plugin_libraries:
            if not library.is_file():
                raise PluginLibraryNotFoundError(f"TensorRT plugin library {library} does not exist")
        libraries = list(self._plugin_libraries)
        registry = trt_module.get_plugin_registry()
        name, version, namespace = plugin_identity()
        self._load(trt_module, libraries)
        if needs_plugin and registry.get_creator(name, version, namespace) is None:
            ours = find_plugin_library()
            self._load(trt_module, [ours])
            libraries.append(ours)
            if registry.get_creator(name, version, namespace) is None:
                raise RuntimeLoadError(
                    f"{ours} loaded, but no creator {namespace}::{name} version {version} is registered; "
                    "rebuild the plugin from this checkout"
                )
        return libraries

    def _load(self, trt_module: Any, libraries: Sequence[Path]) -> None:
        from polygraphy.backend.trt import LoadPlugins

        LoadPlugins(plugins=[str(p) for p in libraries])()  # dlopen: static registrars register here
        registry = trt_module.get_plugin_registry()
        for library in libraries:
            if hasattr(ctypes.CDLL(str(library)), "getCreators"):
                self._register(registry, library)
            self.plugin_libraries_loaded.append(library)

    # ------------------------------------------------------------------ profile

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

    # ------------------------------------------------------------------ load

    def load(self, model_path: str) -> None:
        import onnx

        availability = self.available()
        if not availability:
            raise RuntimeLoadError(f"TensorRT backend unavailable: {availability.reason}")
        import tensorrt as trt_module
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineFromNetwork,
            NetworkFromOnnxBytes,
            NetworkFromOnnxPath,
            PostprocessNetwork,
            Profile,
            TrtRunner,
        )

        from runtime._bkn import plugin_nodes, prepare_model_for_plugin

        path = Path(model_path)
        if not path.is_file():
            raise RuntimeLoadError(f"TensorRT backend: ONNX file {path} does not exist")
        model = onnx.load(str(path))
        expected_plugins = len(plugin_nodes(model))
        self._libraries(trt_module, needs_plugin=expected_plugins > 0)
        if expected_plugins:
            model = prepare_model_for_plugin(model)

        def check_plugin_layers(network: trt.INetworkDefinition) -> None:
            layers = sum(
                1 for i in range(network.num_layers) if network.get_layer(i).type == trt_module.LayerType.PLUGIN_V3
            )
            if layers < expected_plugins:
                raise RuntimeLoadError(
                    f"{path}: only {layers} of {expected_plugins} BatchKalmanNorm nodes became TensorRT plugin "
                    "layers; the parser imported the others some other way"
                )
            self.plugin_layers = layers

        profile = Profile()
        initializers = {t.name for t in model.graph.initializer}
        for value in model.graph.input:
            if value.name not in initializers:
                profile.add(value.name, *self._profile(value.name, _onnx_dims(value)))
        config = CreateConfig(
            profiles=[profile], memory_pool_limits={trt_module.MemoryPoolType.WORKSPACE: self._workspace_bytes}
        )
        with tempfile.TemporaryDirectory(prefix="bkn-trt-") as tmp:
            if model.ByteSize() < _PROTOBUF_LIMIT:
                network = NetworkFromOnnxBytes(model.SerializeToString(), strongly_typed=True)
            else:
                copy = Path(tmp) / path.name
                onnx.save_model(model, str(copy), save_as_external_data=True)
                network = NetworkFromOnnxPath(str(copy), strongly_typed=True)
            engine = EngineFromNetwork(PostprocessNetwork(network, check_plugin_layers), config=config)
            try:
                import torch as torch_module

                with torch_module.cuda.device(self._device):
                    runner = TrtRunner(engine)
                    runner.activate()
            except RuntimeLoadError:
                raise
            except Exception as error:  # Polygraphy reports parser/builder errors as PolygraphyException
                raise RuntimeLoadError(f"TensorRT could not build an engine for {path}: {error}") from error
        self._runner = runner
        self._model_path = str(path)

    # ------------------------------------------------------------------ run

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is None:
            raise RuntimeLoadError("TensorRT backend: call load(model_path) before run()")
        expected = list(self._runner.get_input_metadata().keys())
        missing = [n for n in expected if n not in inputs]
        unknown = [n for n in inputs if n not in expected]
        if missing or unknown:
            raise BKNInputError(
                f"TensorRT backend: inputs {sorted(inputs)} do not match the engine's {expected} "
                f"(missing {missing}, unknown {unknown})"
            )
        try:
            # C order, rank kept (np.ascontiguousarray makes a 0-d input (1,)).
            outputs = self._runner.infer({name: np.require(array, requirements="C") for name, array in inputs.items()})
        except Exception as error:
            raise RuntimeExecutionError(
                f"TensorRT engine for {self._model_path} failed to run: {error} (shapes outside the profile "
                f"1..{self._max_batch} need a larger max_batch or profile_shapes)"
            ) from error
        return {name: np.array(value, copy=True) for name, value in outputs.items()}

    def __del__(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None and getattr(runner, "is_active", False):
            try:
                runner.deactivate()
            except Exception:  # interpreter shutdown: nothing left to release into
                pass
