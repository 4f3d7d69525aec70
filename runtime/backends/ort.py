"""ONNX Runtime: one backend per (execution provider, graph optimisation level).

A provider that ``onnxruntime.get_available_providers()`` lists is only called
available after a session on a one-node probe model really runs on it: ORT silently
falls back to the CPU when, e.g., the CUDA libraries are missing, and the reason is
only printed to stderr, so the probe captures that text. Providers that are not
compute backends here (the Azure provider calls a remote endpoint) are listed as not
applicable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from runtime.backends.base import Availability, Backend
from runtime.errors import RuntimeLoadError

__all__ = ["NOT_COMPUTE_PROVIDERS", "OPTIMIZATION_LEVELS", "OnnxRuntimeBackend", "provider_short_name"]

#: Listed by some ORT builds but not local compute backends.
NOT_COMPUTE_PROVIDERS = {"AzureExecutionProvider": "calls a remote Azure endpoint; not a local compute backend"}

#: Short name -> onnxruntime.GraphOptimizationLevel member name (every level ORT defines).
OPTIMIZATION_LEVELS: dict[str, str] = {
    "disable_all": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}


def provider_short_name(provider: str) -> str:
    """``CPUExecutionProvider`` -> ``cpu``."""
    return provider.removesuffix("ExecutionProvider").lower()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 (ORT's logger)."""
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


@functools.cache
def _probe_provider(provider: str) -> Availability:
    """Create a session for a one-node model on ``provider`` and check it stayed there."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as error:
        return Availability(False, f"onnxruntime does not import: {error}")
    if provider in NOT_COMPUTE_PROVIDERS:
        return Availability(False, NOT_COMPUTE_PROVIDERS[provider], applicable=False)
    if provider not in ort.get_available_providers():
        return Availability(False, f"not built into this onnxruntime {ort.__version__} package")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    probe.ir_version = 8
    log = ""
    try:
        with _captured_stderr() as captured:
            session = ort.InferenceSession(probe.SerializeToString(), providers=[provider])
            session.run(None, {"x": np.ones(2, np.float32)})
        log = captured[0] if captured else ""
    except Exception as error:
        return Availability(False, f"ORT cannot create a session: {error}".strip())
    if provider not in session.get_providers():
        detail = " ".join(log.split())[-400:] or "ORT fell back to another provider"
        return Availability(False, f"listed, but a session falls back to {session.get_providers()}: {detail}")
    return Availability(True, f"onnxruntime {ort.__version__}")


class OnnxRuntimeBackend(Backend):
    """``ort:<provider>:<level>``, e.g. ``ort:cpu:all``.

    custom_op_libraries: shared libraries registered on the session options (for ops
    that are not ONNX functions in the model); a missing file is a
    :class:`RuntimeLoadError` naming it.
    """

    def __init__(self, provider: str, level: str, custom_op_libraries: Sequence[str | os.PathLike[str]] = ()) -> None:
        if level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown optimisation level {level!r}; choose one of {list(OPTIMIZATION_LEVELS)}")
        self.provider = provider
        self.level = level
        self.custom_op_libraries = [Path(p) for p in custom_op_libraries]
        self.name = f"ort:{provider_short_name(provider)}:{level}"
        self._session: object | None = None

    def available(self) -> Availability:
        availability = _probe_provider(self.provider)
        if not availability.ok:
            return availability
        import onnxruntime as ort

        if not hasattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[self.level]):
            return Availability(False, f"onnxruntime {ort.__version__} has no {OPTIMIZATION_LEVELS[self.level]}")
        return availability

    def session_options(self):  # type: ignore[no-untyped-def]
        """The ``SessionOptions`` this backend uses (also for peers, e.g. Polygraphy)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[self.level])
        options.log_severity_level = 3
        for library in self.custom_op_libraries:
            if not library.is_file():
                raise RuntimeLoadError(
                    f"{self.name}: custom-op library {library} does not exist; build it or fix the path "
                    "(--custom-op-library)"
                )
            try:
                # absolute: a relative name ("libops.so", Path("./libops.so")) would be looked up in the system's
                # library paths, not where the file is
                options.register_custom_ops_library(os.path.abspath(library))
            except Exception as error:
                raise RuntimeLoadError(f"{self.name}: cannot load custom-op library {library}: {error}") from error
        return options

    def load(self, model_path: str) -> None:
        import onnxruntime as ort

        options = self.session_options()
        try:
            self._session = ort.InferenceSession(model_path, sess_options=options, providers=[self.provider])
        except Exception as error:
            raise RuntimeLoadError(f"{self.name}: ONNX Runtime cannot load {model_path}: {error}") from error

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError(f"{self.name}: call load() before run()")
        session = self._session
        names = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        values = session.run(names, dict(inputs))  # type: ignore[attr-defined]
        return dict(zip(names, (np.asarray(v) for v in values)))
