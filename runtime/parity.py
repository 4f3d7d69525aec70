"""Run one ONNX model on every chosen runtime and compare each with the PyTorch reference.

``run_parity`` checks everything about its inputs first (the file, custom ops, input
names / shapes / dtypes / finiteness, runtime names) and raises on bad input; after
that it never raises for a runtime's behaviour: a runtime that cannot load the model,
crashes, or returns wrong or non-finite values is recorded as failed in the
:class:`ParityReport`, and localised (:mod:`runtime.localize`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bkn_export.errors import BKNInputError, RuntimeLoadError
from runtime.backends.torch_eager import ModuleCapture, TorchEagerBackend
from runtime.compare import OutputComparison, Tolerance, compare_output, nonfinite_count, resolve_tolerance
from runtime.localize import Localisation, localise
from runtime.model_io import (
    TensorSpec,
    check_custom_ops,
    check_inputs,
    detect_mode,
    load_onnx,
    random_inputs,
    tensor_specs,
)
from runtime.registry import RuntimeEntry, discover, select

__all__ = ["SCHEMA_VERSION", "ParityReport", "RuntimeResult", "run_parity"]

#: Version of the JSON report layout (runtime/report_schema.json); bump on incompatible changes.
SCHEMA_VERSION = "1.0"

#: Progress callback: (event, runtime name, index, total); events "start", "done", "skip", "localise".
Progress = Callable[[str, str, int, int], None]


@dataclass
class RuntimeResult:
    """One runtime: status "passed" | "failed" | "error" | "unavailable" | "not_applicable"."""

    runtime: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    outputs: list[OutputComparison] = field(default_factory=list)
    localisation: Localisation | None = None

    @property
    def ran(self) -> bool:
        return self.status in ("passed", "failed", "error")


@dataclass
class ParityReport:
    """Everything a parity run found; ``passed`` is False if any runtime that ran failed."""

    onnx_path: str
    onnx_sha256: str
    mode: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: str
    runtimes: list[RuntimeResult]
    created: str
    environment: dict[str, str]
    model_description: str = ""
    reference_problems: list[str] = field(default_factory=list)
    uncompared_outputs: list[str] = field(default_factory=list)

    @property
    def ran(self) -> list[RuntimeResult]:
        return [r for r in self.runtimes if r.ran]

    @property
    def passed(self) -> bool:
        return bool(self.ran) and not self.reference_problems and all(r.status == "passed" for r in self.ran)

    def failures(self) -> list[RuntimeResult]:
        return [r for r in self.ran if r.status != "passed"]


def _environment() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt"):
        try:
            module = __import__(package)
            versions[package] = str(getattr(module, "__version__", "?"))
        except Exception:  # absent or broken packages are simply not listed
            continue
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_libraries(paths: Sequence[str | os.PathLike[str]], kind: str) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise RuntimeLoadError(f"{kind} {path} does not exist; build it (see docs/runtime.md) or fix the path")


def run_parity(
    model: Any,
    onnx_path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | None = None,
    mode: str | None = None,
    runtimes: str | Sequence[str] = "all",
    atol: float | None = None,
    rtol: float | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
    custom_op_libraries: Sequence[str | os.PathLike[str]] = (),
    plugin_libraries: Sequence[str | os.PathLike[str]] = (),
    localise_failures: bool = True,
    localise_method: str = "auto",
    progress: Progress | None = None,
    seed: int = 0,
    model_description: str = "",
) -> ParityReport:
    """Compare ``onnx_path`` on the chosen runtimes with ``model`` (an ``nn.Module``) in PyTorch.

    inputs: arrays keyed by ONNX input name, or a sequence in graph-input order, or None
    for seeded standard-normal inputs (named dims: batch 2). mode: "inference" (eval
    forward) or "training" (train forward on a copy); None detects it from the graph.
    atol / rtol: override the dtype defaults for every output; ``tolerances`` per output.
    localise_method: "auto" or "bisect" (see :mod:`runtime.localize`).
    Raises ModelFileError, RuntimeLoadError, UnknownRuntimeError or BKNInputError on bad input.
    """
    path = Path(onnx_path)
    onnx_model = load_onnx(path)
    input_specs, output_specs = tensor_specs(onnx_model)
    if inputs is None:
        inputs = random_inputs(input_specs, seed=seed)
    elif not isinstance(inputs, Mapping):
        arrays = list(inputs)
        if len(arrays) != len(input_specs):
            raise BKNInputError(f"got {len(arrays)} inputs; the model's inputs are {[s.name for s in input_specs]}")
        inputs = {spec.name: np.asarray(a) for spec, a in zip(input_specs, arrays)}
    feed = check_inputs(input_specs, inputs)
    mode = mode or detect_mode(onnx_model)
    if mode not in ("inference", "training"):
        raise BKNInputError(f"mode must be 'inference' or 'training', got {mode!r}")
    _check_libraries(custom_op_libraries, "custom-op library")
    _check_libraries(plugin_libraries, "TensorRT plugin library")
    check_custom_ops(onnx_model, path, "every runtime", provided=bool(custom_op_libraries or plugin_libraries))
    chosen = select(discover(custom_op_libraries, plugin_libraries), runtimes)

    onnx_outputs = [s.name for s in output_specs]
    reference_backend = TorchEagerBackend(model, mode)
    # what load() would read from the file, already known: key inputs and outputs by graph name
    reference_backend.input_names = [s.name for s in input_specs]
    reference_backend.output_names = onnx_outputs
    capture: ModuleCapture | None = None
    if localise_failures:
        reference_outputs, capture = reference_backend.run_capturing(feed)
    else:
        reference_outputs = reference_backend.run(feed)
    if not reference_outputs:
        raise BKNInputError(f"the PyTorch model returned no tensors; {path} has outputs {onnx_outputs}")
    report = ParityReport(
        onnx_path=str(path),
        onnx_sha256=_sha256(path),
        mode=mode,
        inputs=[TensorSpec(s.name, s.dtype, tuple(feed[s.name].shape)) for s in input_specs],
        outputs=output_specs,
        reference=f"pytorch ({'train' if mode == 'training' else 'eval'}-mode forward)",
        runtimes=[],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        environment=_environment(),
        model_description=model_description,
        uncompared_outputs=[name for name in onnx_outputs if name not in reference_outputs],
    )
    for name, array in reference_outputs.items():
        if nonfinite_count(array):
            report.reference_problems.append(
                f"the PyTorch reference output {name!r} holds NaN/Inf for these inputs: the model is broken "
                "(check the checkpoint and the inputs); no runtime can be judged against it"
            )
    total = len(chosen)
    for index, entry in enumerate(chosen):
        result = _run_one(entry, path, feed, reference_outputs, atol, rtol, tolerances, progress, index, total)
        if result.status in ("failed", "error") and localise_failures and capture is not None and entry.make:
            if progress:
                progress("localise", entry.name, index, total)
            failing = [c.output for c in result.outputs if not c.passed]
            result.localisation = localise(
                onnx_model, entry.make, entry.name, feed, reference_outputs, capture, failing, atol, rtol,
                localise_method, tolerances,
            )  # fmt: skip
        if progress:
            progress("done", entry.name, index, total)
        report.runtimes.append(result)
    return report


def _run_one(
    entry: RuntimeEntry,
    path: Path,
    feed: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    atol: float | None,
    rtol: float | None,
    tolerances: Mapping[str, Tolerance] | None,
    progress: Progress | None,
    index: int,
    total: int,
) -> RuntimeResult:
    if not entry.availability.ok or entry.make is None:
        status = "unavailable" if entry.availability.applicable else "not_applicable"
        if progress:
            progress("skip", entry.name, index, total)
        return RuntimeResult(entry.name, status, entry.availability.reason)
    if progress:
        progress("start", entry.name, index, total)
    started = time.perf_counter()
    try:
        backend = entry.make()
        backend.load(str(path))
        outputs = backend.run(feed)
    except Exception as error:  # the runtime's failure is a finding, not a crash of the tool
        return RuntimeResult(
            entry.name, "error", f"{type(error).__name__}: {error}", seconds=time.perf_counter() - started
        )
    seconds = time.perf_counter() - started
    comparisons = []
    for name, reference in reference_outputs.items():
        if name not in outputs:
            comparisons.append(
                OutputComparison(
                    output=name, dtype="", shape=[], reference_shape=list(reference.shape),
                    tolerance=resolve_tolerance(name, reference.dtype.name, atol, rtol, tolerances),
                    passed=False, message=f"{entry.name} returned no output {name!r}",
                )
            )  # fmt: skip
            continue
        actual = outputs[name]
        tolerance = resolve_tolerance(name, actual.dtype.name, atol, rtol, tolerances)
        comparisons.append(compare_output(name, reference, actual, tolerance, entry.name))
    status = "passed" if all(c.passed for c in comparisons) else "failed"
    return RuntimeResult(entry.name, status, entry.availability.reason, seconds, comparisons)
