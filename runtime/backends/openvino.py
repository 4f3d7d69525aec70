"""OpenVINO: Intel's inference engine, read from the ONNX file and compiled for a device.

Names: ``openvino:<device>`` (``openvino:cpu`` here). Two things differ from running the
file as it is:

* **Precision.** OpenVINO's CPU plugin computes in bfloat16 on CPUs that have it (its
  ``INFERENCE_PRECISION_HINT`` default), which is not what the ONNX file says: a float32
  model then differs from PyTorch by ~1e-3. This backend sets the hint to ``f32`` by
  default; ``precision="engine"`` keeps the device's own hint (reported in the reason),
  for checking what a deployment with default settings computes.
* **Model-local functions.** OpenVINO's ONNX frontend does not read ``ModelProto.functions``
  (reading the training-mode export crashes the process with a segmentation fault), so
  a model that has them is inlined first with ``onnx.inliner.inline_local_functions``:
  every ``ai.bkn::BatchKalmanNorm`` node becomes its function body, as ONNX defines it.
  OpenVINO never sees the functions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime._bkn import RuntimeLoadError
from runtime.backends.base import Availability, Backend

__all__ = ["PRECISIONS", "OpenVINOBackend", "openvino_devices"]

#: precision option -> INFERENCE_PRECISION_HINT value (None: leave the device's default).
PRECISIONS: dict[str, str | None] = {"f32": "f32", "engine": None}


def openvino_devices() -> tuple[list[str], str]:
    """(devices OpenVINO sees, reason); an empty list with the reason when it does not import."""
    try:
        import openvino
    except Exception as error:  # ImportError, or a broken install
        return [], f"`import openvino` failed ({type(error).__name__}: {error}); pip install 'bkn-export[openvino]'"
    try:
        return list(openvino.Core().available_devices), f"openvino {openvino.__version__}"
    except Exception as error:
        return [], f"openvino {openvino.__version__} cannot list devices: {error}"


def prepare_for_openvino(model: Any) -> Any:
    """``model`` with its local functions inlined (a copy), or ``model`` itself when it has none."""
    if not len(model.functions):
        return model
    from onnx import inliner

    return inliner.inline_local_functions(model)


class OpenVINOBackend(Backend):
    """``openvino:<device>``; precision "f32" (default) or "engine" (the device's own hint)."""

    def __init__(self, device: str = "CPU", precision: str = "f32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.device = device
        self.precision = precision
        self.name = f"openvino:{device.lower()}"
        self._compiled: Any = None
        self.inlined_functions = 0

    def available(self) -> Availability:
        devices, reason = openvino_devices()
        if not devices:
            return Availability(False, reason)
        if self.device not in devices:
            return Availability(False, f"{reason} sees devices {devices}, not {self.device}")
        return Availability(True, f"{reason}, precision hint {self.precision_hint()}")

    def precision_hint(self) -> str:
        """The INFERENCE_PRECISION_HINT the compiled model uses, as OpenVINO names it."""
        wanted = PRECISIONS[self.precision]
        if wanted is not None:
            return wanted
        try:
            import openvino

            value = openvino.Core().get_property(self.device, "INFERENCE_PRECISION_HINT")
            return f"{getattr(value, 'get_type_name', lambda: str(value))()} (the device's default)"
        except Exception as error:
            return f"the device's default (unreadable: {error})"

    def load(self, model_path: str) -> None:
        import onnx
        import openvino

        try:
            model = onnx.load(model_path)
            self.inlined_functions = len(model.functions)
            prepared = prepare_for_openvino(model)
            core = openvino.Core()
            with tempfile.TemporaryDirectory(prefix="bkn-openvino-") as tmp:
                path = model_path
                if prepared is not model:
                    path = str(Path(tmp) / "inlined.onnx")
                    large = prepared.ByteSize() > 1_800_000_000  # protobuf's 2 GiB limit
                    onnx.save_model(prepared, path, save_as_external_data=large)
                read = core.read_model(path)
                config = {} if PRECISIONS[self.precision] is None else {"INFERENCE_PRECISION_HINT": "f32"}
                self._compiled = core.compile_model(read, self.device, config)
        except Exception as error:
            raise RuntimeLoadError(f"{self.name}: OpenVINO cannot load {model_path}: {error}") from error

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._compiled is None:
            raise RuntimeError(f"{self.name}: call load() before run()")
        request = self._compiled.create_infer_request()
        results = request.infer({name: np.ascontiguousarray(array) for name, array in inputs.items()})
        outputs: dict[str, np.ndarray] = {}
        for port, value in results.items():
            names = port.get_names()
            name = port.get_any_name() if names else str(port)
            outputs[name] = np.array(value, copy=True)
        return outputs
