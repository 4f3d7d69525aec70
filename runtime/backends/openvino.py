"""OpenVINO: Intel's inference engine, read from the ONNX file and compiled for a device.

Names: ``openvino:<device>`` (``openvino:cpu`` here). Two things differ from running the
file as it is:

* **Precision.** OpenVINO's CPU plugin computes in bfloat16 on CPUs that have it (its
  ``INFERENCE_PRECISION_HINT`` default), which is not what the ONNX file says: a float32
  model then differs from PyTorch by ~1e-3. This backend sets the hint to ``f32`` by
  default; ``precision="engine"`` keeps the device's own hint (reported in the reason),
  for checking what a deployment with default settings computes.
* **Model-local functions.** OpenVINO's ONNX frontend does not read ``ModelProto.functions``
  (reading the training-mode export fails: openvino 2026.4.1 raises ``OpConversionFailure``,
  earlier releases crashed the process with a segmentation fault), so
  a model that has them is inlined first with ``onnx.inliner.inline_local_functions``:
  every ``ai.bkn::BatchKalmanNorm`` node becomes its function body, as ONNX defines it.
  OpenVINO never sees the functions.

**Erf.** OpenVINO's CPU plugin computes float32 ``Erf`` by an approximation that is off by up to ~5e-7
(openvino 2026.4: 5.3e-7 near 0, about 9x float32's rounding there; ONNX Runtime's is within rounding). A
network that computes Gaussian CDFs with ``Erf`` carries the difference from layer to layer, so such a file can
fail parity on OpenVINO alone. (bkn_export's float32 training-mode exports have no ``Erf`` since their ``erfc``
became :mod:`bkn_export.export.erfc`'s; float64 ones, older ones and other exporters' files may.) Where a
comparison fails on a model with ``Erf`` nodes, :meth:`OpenVINOBackend.failure_notes` measures the device's
``Erf`` against ``math.erf`` then and there and says so in the report.
"""

from __future__ import annotations

import functools
import math
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


#: float32's unit roundoff at 1.0 (2^-24): an ``Erf`` off by more than twice this is not rounding.
_FLOAT32_ROUNDING = 2.0**-24


@functools.lru_cache(maxsize=8)
def erf_error(device: str, precision_hint: str | None) -> float:
    """Largest absolute error of OpenVINO's float32 ``Erf`` on ``device`` over [-6, 6] (120001 points) against
    ``math.erf`` in float64, compiled with this precision hint (None: the device's default)."""
    import onnx
    import openvino
    from onnx import TensorProto, helper

    points = np.linspace(-6.0, 6.0, 120_001).astype(np.float32)
    shape = [points.size]
    graph = helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"])], "erf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with tempfile.TemporaryDirectory(prefix="bkn-openvino-erf-") as tmp:
        path = str(Path(tmp) / "erf.onnx")
        onnx.save_model(model, path)
        core = openvino.Core()
        config = {} if precision_hint is None else {"INFERENCE_PRECISION_HINT": precision_hint}
        compiled = core.compile_model(core.read_model(path), device, config)
        (values,) = compiled.create_infer_request().infer({"x": points}).values()
    exact = np.array([math.erf(float(v)) for v in points])
    return float(np.max(np.abs(np.asarray(values, dtype=np.float64) - exact)))


def _double_values(model: Any) -> int:
    """How many of ``model``'s graph inputs, outputs and initializers are float64."""
    from onnx import TensorProto

    graph = model.graph
    typed = [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)]
    stored = [t.data_type for t in graph.initializer]
    return sum(t == TensorProto.DOUBLE for t in (*typed, *stored))


class OpenVINOBackend(Backend):
    """``openvino:<device>``; precision "f32" (default) or "engine" (the device's own hint)."""

    def __init__(self, device: str = "CPU", precision: str = "f32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.device = device
        self.precision = precision
        self.name = f"openvino:{device.lower()}"
        self._compiled: Any = None
        self._declared_outputs: list[str] = []
        self.inlined_functions = 0
        self.erf_nodes = 0
        self.double_values = 0

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
            self._declared_outputs = [output.name for output in model.graph.output]
            prepared = prepare_for_openvino(model)
            self.erf_nodes = sum(
                node.op_type == "Erf" and node.domain in ("", "ai.onnx") for node in prepared.graph.node
            )
            self.double_values = _double_values(prepared)
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
        import openvino as ov

        request = self._compiled.create_infer_request()
        # C order, rank kept: np.ascontiguousarray makes a scalar (0-d) input (1,), which OpenVINO refuses.
        results = request.infer({name: np.require(array, requirements="C") for name, array in inputs.items()})
        outputs: dict[str, np.ndarray] = {}
        for port, value in results.items():
            array = np.array(value, copy=True)
            if port.get_element_type() == ov.Type.bf16 and array.itemsize == 2:
                # OpenVINO hands a bf16 result over as float16 storage: the same bits, to be read as bfloat16
                import ml_dtypes

                array = array.view(ml_dtypes.bfloat16)
            for name in self._output_names(port):
                outputs[name] = array
        return outputs

    def _output_names(self, port: Any) -> list[str]:
        """The graph outputs a result port stands for. Where OpenVINO folds the last node (an Identity, a no-op
        Cast, a Reshape into its producer) the port carries the producer's tensor name too, and ``get_any_name()``
        returns the first in sort order (``/Reshape_output_0`` before ``y``): the declared outputs among its names
        are taken (all of them, where one tensor is several outputs), else any name."""
        names = set(port.get_names())
        declared = [name for name in self._declared_outputs if name in names]
        if declared:
            return declared
        return [port.get_any_name()] if names else [str(port)]

    def failure_notes(self) -> list[str]:
        """Where the model holds float64 values: a note that OpenVINO computes them in float32 (its highest inference
        precision; a cold QA of 2026-12-07's sixth session found a float64 file's parity "failed" at 1.6e-7 with
        no word why). Where it has ``Erf`` nodes and this device's ``Erf`` is off by more than float32 rounding
        (measured now, :func:`erf_error`): a note naming both."""
        notes = []
        if self.double_values:
            notes.append(
                f"the model holds {self.double_values} float64 input(s), output(s) or weight(s): OpenVINO computes "
                "them in float32 (it has no float64 inference precision), so float64 tolerances are beyond it; "
                "the difference is the engine's precision, not the file's (judge this engine on a float32 export)"
            )
        return notes + self._erf_notes()

    def _erf_notes(self) -> list[str]:
        if not self.erf_nodes:
            return []
        try:
            error = erf_error(self.device, PRECISIONS[self.precision])
        except Exception as failure:  # a note, never a crash of the report
            return [f"the model has {self.erf_nodes} Erf node(s); OpenVINO's Erf could not be measured ({failure})"]
        if error <= 2 * _FLOAT32_ROUNDING:
            return []
        return [
            f"the model has {self.erf_nodes} Erf node(s), and OpenVINO's {self.device} Erf is off by up to "
            f"{error:.1e} in float32 (measured now against math.erf on [-6, 6]; float32 rounding is "
            f"{_FLOAT32_ROUNDING:.1e}): where ONNX Runtime passes and OpenVINO fails, that is the likely cause, "
            "an accuracy limit of the engine, not a difference of the file"
        ]
