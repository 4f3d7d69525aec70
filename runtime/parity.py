"""Run one ONNX model on every chosen runtime and compare each with a reference.

The reference is the PyTorch model (``model``), or outputs saved earlier
(``reference_outputs``, e.g. read from a Polygraphy ``RunResults`` file), in which case no
PyTorch model is needed.

``run_parity`` checks everything about its inputs first (the file, custom ops, input
names / shapes / dtypes / finiteness, runtime names, tolerances) and raises on bad input;
after that it never raises for a runtime's behaviour: a runtime that cannot load the
model, crashes, or returns wrong or non-finite values is recorded as failed in the
:class:`ParityReport`, and localised (:mod:`runtime.localize`). A runtime that cannot run
the model's data type at all (ONNX Runtime's CPU provider has no bfloat16 Conv) is
recorded as unavailable for that dtype, with the runtime's own reason; one that has a
known limitation of its own on a valid model (:class:`~runtime.errors.RuntimeLimitationError`:
the ONNX reference evaluator's grouped ConvTranspose) is recorded as unavailable for that
model, with the limitation named. Any other failure stays a failure.

Several input sets (iterations, several shapes) run through the same loaded runtime; each
output's row in the report is its worst iteration.

Mixed precision: the inputs are made (or given) in the ONNX input dtype; the PyTorch
model gets the same values cast to its own parameter dtype (float16 → float32 is exact),
and each output is judged with the tolerance of the ONNX output's dtype; the report says
which (``tolerance_source``).
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from runtime._bkn import bkn_layers, copy_model
from runtime.backends.base import Backend
from runtime.backends.torch_eager import ModuleCapture, TorchEagerBackend, op_node_layers
from runtime.compare import (
    DEFAULT_TOLERANCES,
    Criteria,
    OutputComparison,
    Tolerance,
    TolerancePolicy,
    nonfinite_count,
)
from runtime.errors import BKNError, BKNInputError, RuntimeLimitationError, RuntimeLoadError
from runtime.localize import Localisation, NodeOracle, NoiseFloors, evaluator_oracle, localise, noise_floors
from runtime.model_io import (
    TensorSpec,
    check_custom_ops,
    check_feeds,
    declared_mode,
    detect_mode,
    example_shapes,
    load_onnx,
    onnxruntime_ops,
    quantization_ops,
    random_inputs,
    renamed_op_note,
    returned_output_order,
    symbol_conflicts_note,
    tensor_specs,
    unsized_dims_note,
)
from runtime.precision import computed_precision, graphs, value_types
from runtime.registry import RuntimeEntry, discover, select

__all__ = ["REFERENCE_DESCRIPTION", "SCHEMA_VERSION", "ParityReport", "RuntimeResult", "Status", "run_parity"]

#: Version of the JSON report layout (runtime/report_schema.json); bump on incompatible changes.
SCHEMA_VERSION = "1.3"

#: What the PyTorch reference computes, per mode (shown in every report).
REFERENCE_DESCRIPTION = {
    "inference": "pytorch (eval-mode forward)",
    "training": (
        "pytorch (BKN layers in train mode, frozen ones and every other module in eval, on a copy: the export's "
        "semantics)"
    ),
}

#: Progress callback: (event, runtime name, index, total); events "start", "done", "skip", "localise".
Progress = Callable[[str, str, int, int], None]

Feed = dict[str, np.ndarray]


class Status(str, enum.Enum):
    """What happened to one runtime. A ``str`` enum: ``Status.PASSED == "passed"``."""

    PASSED = "passed"
    FAILED = "failed"  # ran, and an output differs or holds NaN/Inf
    ERROR = "error"  # could not load or run the model
    UNAVAILABLE = "unavailable"  # not usable here, or cannot run the model's dtype at all
    NOT_APPLICABLE = "not_applicable"  # not a compute backend on this machine

    def __str__(self) -> str:
        return self.value


@dataclass
class RuntimeResult:
    """One runtime's verdict; ``outputs``: one comparison per output (its worst iteration)."""

    runtime: str
    status: Status
    reason: str = ""
    seconds: float = 0.0
    outputs: list[OutputComparison] = field(default_factory=list)
    localisation: Localisation | None = None
    failing_iteration: int | None = None

    @property
    def ran(self) -> bool:
        return self.status in (Status.PASSED, Status.FAILED, Status.ERROR)


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
    criteria: Criteria = field(default_factory=Criteria)
    seed: int | None = 0
    input_sets: list[list[TensorSpec]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.input_sets) or 1

    @property
    def ran(self) -> list[RuntimeResult]:
        return [r for r in self.runtimes if r.ran]

    @property
    def passed(self) -> bool:
        return bool(self.ran) and not self.reference_problems and all(r.status == Status.PASSED for r in self.ran)

    def failures(self) -> list[RuntimeResult]:
        return [r for r in self.ran if r.status != Status.PASSED]

    def failure_counts(self) -> str:
        """``2 of 7 runtime(s) differ``, ``1 of 7 runtime(s) could not run the file``, or both: a runtime that
        errored (an engine that crashed on the file) did not differ."""
        differ = sum(r.status == Status.FAILED for r in self.ran)
        errored = sum(r.status == Status.ERROR for r in self.ran)
        parts = [f"{differ} of {len(self.ran)} runtime(s) differ"] if differ else []
        if errored:
            parts.append(f"{errored}{'' if differ else f' of {len(self.ran)}'} runtime(s) could not run the file")
        return ", ".join(parts)


def _environment() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("bkn-export", "torch", "onnx", "onnxruntime", "onnxscript", "openvino", "tensorrt", "polygraphy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # absent packages are simply not listed
            continue
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: The first bytes of a shared library: ELF (Linux, BSD), Mach-O (32/64-bit, either byte order, universal), PE (MZ).
_LIBRARY_MAGICS = (
    b"\x7fELF", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe", b"MZ",
)  # fmt: skip


def _check_libraries(paths: Sequence[str | os.PathLike[str]], kind: str, entry: str | None = None) -> None:
    """Refuse a library that does not exist, is no shared library of any platform, or (``entry``) does not export the
    function the runtime calls (ONNX Runtime's ``RegisterCustomOps``): RuntimeLoadError, exit 2, the environment's
    problem, not the model's (before, such a file let every ONNX Runtime configuration fail to load, reported as the
    model's failure, exit 1)."""
    for path in paths:
        if not str(path).strip():
            raise RuntimeLoadError(f"{kind} was given an empty path (an unset shell variable?): name the library file")
        if Path(path).is_dir():
            raise RuntimeLoadError(f"{kind} {path} is a directory; give the library file (.so / .dylib / .dll)")
        if not Path(path).is_file():
            raise RuntimeLoadError(f"{kind} {path} does not exist; build it (see docs/runtime.md) or fix the path")
        try:
            with open(path, "rb") as handle:
                head = handle.read(4)
        except OSError as error:
            raise RuntimeLoadError(f"{kind} {path} cannot be read: {error.strerror or error}") from error
        if not head.startswith(_LIBRARY_MAGICS):
            raise RuntimeLoadError(
                f"{kind} {path} is not a shared library (its first bytes {head!r} are no ELF, Mach-O or PE header); "
                "give the built .so / .dylib / .dll"
            )
        problem = _entry_problem(path, entry) if entry is not None else None
        if problem is not None:
            raise RuntimeLoadError(f"{kind} {path} {problem}")


def _entry_problem(path: str | os.PathLike[str], symbol: str) -> str | None:
    """Why the shared library at ``path`` cannot serve as the runtime's library (it does not load here, with the
    loader's reason, or it does not export ``symbol``), or None. It is loaded into this process, as the runtime would
    load it anyway."""
    import ctypes

    try:
        library = ctypes.CDLL(os.path.abspath(path))  # a bare name would be looked up in the system's library paths
    except OSError as error:
        return f"does not load here ({error}): build it for this machine, or make the libraries it needs findable"
    if not hasattr(library, symbol):
        return (
            f"does not export {symbol}, the function the runtime calls to register its ops: give the library built "
            "for it"
        )
    return None


def _model_running_statistics(model: Any, mode: str, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """A ``running_stats_io=True`` training export's running-statistics inputs, from the PyTorch
    model's buffers (in each input's dtype): what the user's model holds is what its next train
    step starts from. Empty without a model, in inference mode, or for other files."""
    if model is None or mode != "training":
        return {}
    from runtime._bkn import running_statistics_io
    from runtime.backends.torch_eager import array_of

    statistics, _ = running_statistics_io(model, [s.name for s in specs])
    dtypes = {s.name: s.dtype for s in specs}
    return {name: array_of(buffer).astype(dtypes[name]) for name, buffer in statistics.items()}  # astype copies


def _as_feeds(
    inputs: Any, specs: Sequence[TensorSpec], optional: set[str] | frozenset[str] = frozenset()
) -> list[Feed]:
    """One feed dict, a sequence of arrays in graph-input order, or a sequence of feed dicts -> feed dicts.

    optional: inputs that have a default (the caller fills them in): a sequence of arrays may give
    every input or every other one."""
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    items = list(inputs)
    if items and all(isinstance(item, Mapping) for item in items):
        return [dict(item) for item in items]
    required = [s for s in specs if s.name not in optional]
    if len(items) == len(specs):
        return [{spec.name: np.asarray(a) for spec, a in zip(specs, items)}]
    if optional and len(items) == len(required):
        return [{spec.name: np.asarray(a) for spec, a in zip(required, items)}]
    also = f" (or only {[s.name for s in required]}: the others have defaults)" if optional else ""
    raise BKNInputError(f"got {len(items)} inputs; the model's inputs are {[s.name for s in specs]}{also}")


#: Substrings of a runtime's load error that mean "this data type is not implemented here".
#: Messages by which a runtime says it cannot run a (half-precision) dtype. "Input element types
#: do not match": OpenVINO's ONNX frontend needs BatchNormalization's statistics in X's type,
#: while ONNX (opset >= 15) allows float16 X with float32 statistics, as an fp16 training export has.
_DTYPE_UNSUPPORTED = (
    "NOT_IMPLEMENTED",
    "Could not find an implementation",
    "not supported for",
    "Unsupported type",
    "Input element types do not match",
)
#: ONNX Runtime's Python binding on a bfloat16 output it cannot hand back as a NumPy array (at run time).
_NO_NUMPY_TYPE = "No corresponding Numpy type"


def _half_dtypes(specs: Sequence[TensorSpec]) -> set[str]:
    return {s.dtype for s in specs if s.dtype in ("float16", "bfloat16")}


def run_parity(
    model: Any,
    onnx_path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray] | Sequence[Any] | None = None,
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
    seed: int | None = 0,
    model_description: str = "",
    *,
    criteria: Criteria | None = None,
    reference_outputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    reference_name: str = "saved outputs",
    openvino_precision: str = "f32",
    save_inputs: str | os.PathLike[str] | None = None,
    save_outputs: str | os.PathLike[str] | None = None,
    repro_dir: str | os.PathLike[str] | None = None,
    noise_floor: bool = False,
) -> ParityReport:
    """Compare ``onnx_path`` on the chosen runtimes with ``model`` (an ``nn.Module``) or saved outputs.

    inputs: arrays keyed by ONNX input name, a sequence in graph-input order, a sequence of
    such dicts (several input sets: iterations, shapes; see :func:`runtime.model_io.input_sets`),
    or None for seeded standard-normal inputs (named dims: batch 2, others the export example's size that the file
    records, else 1: :func:`runtime.model_io.default_shape`). seed: of the random
    inputs (reported; give None when the inputs were loaded, not made). mode: "inference"
    (eval forward) or "training" (BKN layers in train mode, every other module in eval,
    on a copy: what the training export computes); None detects it from the graph.
    atol / rtol: override the dtype defaults for every output; ``tolerances`` per output;
    ``criteria``: how an output is judged (:class:`runtime.compare.Criteria`).
    reference_outputs: per input set, the expected outputs keyed by ONNX output name
    (then ``model`` may be None and ``inputs`` must be given). save_inputs / save_outputs:
    write the inputs / the reference outputs as Polygraphy JSON (:mod:`runtime.polygraphy_io`);
    outputs always get their inputs beside them. repro_dir: on a failure, a repro bundle
    (:mod:`runtime.repro`). localise_method: "auto" or "bisect" (see :mod:`runtime.localize`).
    noise_floor: also run a float64 copy of ``model`` on the same inputs and never judge an output with an atol
    below :data:`runtime.noise.NOISE_FACTOR` times the float32 reference's own distance from it (max over the
    input sets; :mod:`runtime.noise`); the report's notes name each floor. For deep float32 networks, whose
    reference carries more rounding error than the dtype defaults assume (docs/runtime.md, "Deep float32
    networks"). Needs the model (not saved outputs) and a model that runs in float64.
    Raises ModelFileError, RuntimeLoadError, UnknownRuntimeError, SavedDataError or
    BKNInputError on bad input.
    """
    path = Path(onnx_path)
    onnx_model = load_onnx(path)
    input_specs, output_specs = tensor_specs(onnx_model)
    computed_in = computed_precision(onnx_model)
    policy = TolerancePolicy(
        atol, rtol, dict(tolerances or {}), criteria or Criteria(), computed_in=computed_in,
        declared={s.name: s.dtype for s in output_specs},
    )  # fmt: skip
    known_outputs = {s.name for s in output_specs}
    unknown = [name for name in policy.per_output if name not in known_outputs]
    if unknown:
        raise BKNInputError(
            f"tolerance for unknown output(s) {unknown}; the model's outputs are {sorted(known_outputs)}"
        )
    if model is None and reference_outputs is None:
        raise BKNInputError("give a PyTorch model or saved reference outputs to compare with")
    if noise_floor and reference_outputs is not None:
        raise BKNInputError(
            "the noise floor is measured on the PyTorch model (its float32 outputs against a float64 copy): "
            "it cannot be used with saved reference outputs; give the model, or explicit atol/rtol"
        )
    declared = declared_mode(onnx_model)
    if mode is not None and declared is not None and mode != declared and mode in ("inference", "training"):
        article = "an" if declared == "inference" else "a"
        raise BKNInputError(
            f"mode {mode!r} contradicts {path}, {article} {declared}-mode export (its metadata / ai.bkn nodes): the "
            f"{mode} reference would differ from it everywhere; use mode {declared!r} (or 'auto' on the CLI)"
        )
    # the modes differ only in the BKN layers: a model without any (or saved outputs) computes one function in both
    assumed = mode is None and declared is None and hasattr(model, "named_modules") and bool(bkn_layers(model))
    mode = mode or detect_mode(onnx_model)
    if mode not in ("inference", "training"):
        raise BKNInputError(f"mode must be 'inference' or 'training', got {mode!r}")
    model_statistics = _model_running_statistics(model, mode, input_specs)
    if inputs is None:
        if reference_outputs is not None:
            raise BKNInputError("saved reference outputs need the inputs they were computed from (--load-inputs)")
        inputs = random_inputs(
            [s for s in input_specs if s.name not in model_statistics],
            seed=seed or 0,
            examples=example_shapes(onnx_model),
        )
    given = _as_feeds(inputs, input_specs, optional=set(model_statistics))
    feeds = [check_feeds(input_specs, {**model_statistics, **feed}) for feed in given]
    _check_libraries(custom_op_libraries, "custom-op library", entry="RegisterCustomOps")
    _check_libraries(plugin_libraries, "TensorRT plugin library")
    check_custom_ops(onnx_model, path, "every runtime", provided=bool(custom_op_libraries or plugin_libraries))
    chosen = select(discover(custom_op_libraries, plugin_libraries, openvino_precision), runtimes)

    onnx_outputs = [s.name for s in output_specs]
    returned_order, order_note = returned_output_order(onnx_model)
    notes: list[str] = []
    unsized = unsized_dims_note(input_specs, feeds, example_shapes(onnx_model))
    if unsized is not None:
        notes.append(unsized)
    conflicting = symbol_conflicts_note(input_specs, feeds)
    if conflicting is not None:
        notes.append(conflicting)
    renamed = renamed_op_note(onnx_model)
    if renamed is not None:
        notes.append(renamed)
    if assumed:
        notes.append(
            f"{path.name} declares no export mode (no bkn_export.mode metadata, no ai.bkn nodes: exported by another "
            "tool, or rewritten by one that inlined the BKN op and dropped the metadata, as onnxscript's optimizer "
            "and onnx.utils.extract_model do): compared as an inference-mode file (the eval forward); a "
            "training-mode file needs --mode training (mode='training')"
        )
    judged_wider = {name: dtype for name, dtype in computed_in.items() if name not in policy.per_output}
    if judged_wider and (atol is None or rtol is None):
        computed = ", ".join(f"{name!r} in {dtype}" for name, dtype in judged_wider.items())
        notes.append(
            f"output(s) computed in a narrower float type than they are declared as ({computed}, e.g. a float64 "
            "output of a float32 network): judged at that type's default tolerances, the rounding they carry"
        )
    fed = [name for name in model_statistics if not any(name in feed for feed in given)]
    if fed:
        notes.append(
            f"running statistics {', '.join(repr(name) for name in fed)} fed from the PyTorch model's buffers "
            "(running_stats_io export; pass them among the inputs to choose others)"
        )
    reference_backend: TorchEagerBackend | None = None
    if reference_outputs is not None:
        intermediates = {name for node in onnx_model.graph.node for name in node.output if name}
        references = _saved_references(reference_outputs, feeds, onnx_outputs, intermediates, notes)
        shaped = {v.name for v in onnx_model.graph.output if v.type.tensor_type.HasField("shape")}
        _check_saved_shapes(references, feeds, input_specs, output_specs, shaped)
        references, converted = _exact_saved_outputs(references, output_specs)
        notes.extend(converted)
        description = f"{reference_name} (no PyTorch model run)"
    else:
        reference_backend = TorchEagerBackend(model, mode)
        # what load() would read from the file, already known: key inputs and outputs by graph name
        reference_backend.input_names = [s.name for s in input_specs]
        reference_backend.output_names = returned_order
        reference_backend.file_outputs = frozenset(known_outputs)
        reference_backend.file_layers = op_node_layers(onnx_model)
        references = [_reference_run(reference_backend, feed, path, unsized) for feed in feeds]
        notes.extend(reference_backend.notes)
        if order_note is not None:
            notes.append(order_note)
        description = REFERENCE_DESCRIPTION[mode]
        if not references[0]:
            raise BKNInputError(f"the PyTorch model returned no tensors; {path} has outputs {onnx_outputs}")
        if noise_floor:
            measured = _MeasuredRun(model, mode, feeds, references, input_specs, output_specs, returned_order)
            policy, floor_notes = _with_noise_floors(policy, measured)
            notes.extend(floor_notes)
    uncompared = [name for name in onnx_outputs if name not in references[0]]
    if len(uncompared) == len(onnx_outputs):
        raise BKNInputError(
            f"nothing to compare: the parity reference ({description}) gives none of {path}'s outputs {onnx_outputs}"
            + (f" (it gives {list(references[0])})" if references[0] else "")
        )
    for iteration, outputs in enumerate(references):
        if outputs and all(np.asarray(array).size == 0 for array in outputs.values()):
            shapes = ", ".join(f"{name} {tuple(array.shape)}" for name, array in feeds[iteration].items())
            empty = ", ".join(f"{name} {tuple(np.asarray(array).shape)}" for name, array in outputs.items())
            raise BKNInputError(
                f"input set {iteration} ({shapes}) compares nothing: every output of the parity reference is empty "
                f"({empty}); give inputs for which the model computes something (an empty batch checks no "
                "computation)"
            )
    if uncompared:
        notes.append(
            f"not compared: {', '.join(repr(name) for name in uncompared)} "
            "(the parity reference gives no such output): the verdict covers the other outputs only"
        )
    if save_inputs is not None or save_outputs is not None:
        _save(feeds, references, save_inputs, save_outputs)
    report = ParityReport(
        onnx_path=str(path),
        onnx_sha256=_sha256(path),
        mode=mode,
        inputs=[TensorSpec(s.name, s.dtype, tuple(feeds[0][s.name].shape)) for s in input_specs],
        outputs=output_specs,
        reference=description,
        runtimes=[],
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        environment=_environment(),
        model_description=model_description,
        uncompared_outputs=uncompared,
        criteria=policy.criteria,
        seed=seed if reference_outputs is None else None,
        input_sets=[[TensorSpec(s.name, s.dtype, tuple(f[s.name].shape)) for s in input_specs] for f in feeds],
        notes=notes,
    )
    nonfinite = [
        (iteration, name, nonfinite_count(array))
        for iteration, outputs in enumerate(references)
        for name, array in outputs.items()
        if nonfinite_count(array)
    ]
    if policy.criteria.equal_nan:  # not a pass like any other: the report says what was matched rather than compared
        held = ", ".join(f"{count} in {name!r} (input set {iteration})" for iteration, name, count in nonfinite)
        report.notes.append(
            "--equal-nan (Criteria(equal_nan=True)) is on: a NaN / ±Inf of the reference passes where a runtime's "
            "output holds the same value at the same position, and the error statistics cover the other elements "
            f"only; the reference's NaN / ±Inf values: {held or 'none'}"
        )
    else:
        for iteration, name, _ in nonfinite:
            report.reference_problems.append(
                f"the parity reference's output {name!r} holds NaN/Inf for input set {iteration}: the model is "
                "broken (check the checkpoint and the inputs); no runtime can be judged against it (--equal-nan "
                "if the model is meant to output them)"
            )
    half = _half_dtypes([*input_specs, *output_specs])
    ort_only = onnxruntime_ops(onnx_model)
    if ort_only:
        report.notes.append(
            f"the file holds ONNX Runtime's own ops ({', '.join(ort_only[:4])}{', ...' if len(ort_only) > 4 else ''}: "
            "a file ONNX Runtime optimized and saved), which only ONNX Runtime runs: the other runtimes are "
            "reported unavailable; compare them on the file before ONNX Runtime's optimization"
        )
    quantized = quantization_ops(onnx_model)
    if quantized:
        report.notes.append(
            f"the file is quantized ({', '.join(quantized[:4])}{', ...' if len(quantized) > 4 else ''}: "
            "onnxruntime.quantization writes these): it approximates the model by design, so its outputs differ from "
            "PyTorch's by the quantization's error, which float tolerances fail; judge it with tolerances set for "
            "that error (--atol / --rtol) or by an accuracy metric"
        )
    total = len(chosen)
    captured: dict[int, tuple[ModuleCapture, NoiseFloors | str]] = {}  # per input set, for every failing runtime
    for index, entry in enumerate(chosen):
        result, failure_notes = _run_one(
            entry, path, feeds, references, policy, half, progress, index, total, ort_only
        )  # fmt: skip
        report.notes.extend(f"{entry.name}: {note}" for note in failure_notes)
        if progress:
            progress("done", entry.name, index, total)
        report.runtimes.append(result)
    # Failures are localised once every runtime has run: the node-by-node method needs to know which runtimes agreed.
    for index, (entry, result) in enumerate(zip(chosen, report.runtimes)):
        if result.status in (Status.FAILED, Status.ERROR) and entry.make is not None:
            failing = [c.output for c in result.outputs if not c.passed]
            feed = feeds[result.failing_iteration or 0]
            # Against a broken reference every runtime "differs": localising would blame a module for the model's NaN.
            if localise_failures and result.outputs and failing and not report.reference_problems:
                if progress:
                    progress("localise", entry.name, index, total)
                result.localisation = _localise(
                    onnx_model, entry, feed, references[result.failing_iteration or 0], reference_backend,
                    failing, policy, localise_method, captured, result.failing_iteration or 0,
                    _node_oracle(entry, chosen, report.runtimes),
                )  # fmt: skip
            if repro_dir is not None and result.outputs:
                from runtime.repro import write_repro

                bundle = Path(repro_dir) / entry.name.replace(":", "_")
                try:
                    note = write_repro(
                        onnx_model, path, entry, feed, references[result.failing_iteration or 0], result, bundle,
                        policy, _bundle_oracle(entry, chosen, report.runtimes),
                    )  # fmt: skip
                except Exception as error:  # the bundle is extra: its failure must not hide the verdict it explains
                    note = f"repro bundle for {entry.name} not written to {bundle}: {type(error).__name__}: {error}"
                report.notes.append(note)
    exact = sorted(
        {
            c.output
            for r in report.failures()
            for c in r.outputs
            if not c.passed and (c.dtype == "bool" or c.dtype.startswith(("int", "uint")))
        }
    )
    if half and exact:
        report.notes.append(
            f"{', '.join(repr(name) for name in exact)}: integer / bool output(s) of a file that computes in "
            f"{'/'.join(sorted(half))}: an element within rounding of a threshold (a comparison, an argmax tie) can "
            "come out the other way than in the float32 reference; --max-mismatch (Criteria(max_mismatch=...)) "
            "allows a share of differing elements"
        )
    if report.ran:
        report.notes.extend(_coarse_default_tolerances(policy, output_specs, references))
        report.notes.extend(_input_insensitive_outputs(policy, output_specs, feeds, references))
    if model is not None and not noise_floor and any(not c.passed for r in report.failures() for c in r.outputs):
        measured = _MeasuredRun(model, mode, feeds, references, input_specs, output_specs, returned_order)
        report.notes.extend(_rounding_hints(report, measured))
    return report


#: A default atol at or above this share of an output's largest reference magnitude is named as coarse.
COARSE_ATOL_SHARE = 0.01


def _coarse_default_tolerances(
    policy: TolerancePolicy, output_specs: Sequence[TensorSpec], references: Sequence[Feed]
) -> list[str]:
    """A note per float output judged by its dtype's default tolerance whose atol is at least
    :data:`COARSE_ATOL_SHARE` of the reference's largest finite magnitude: the defaults are absolute, so on a small
    output (float16's atol 1e-3 on logits of magnitude 0.03) an error that changes the result passes. Named, not
    tightened: how close a half-precision file can come is the model's own rounding (``--noise-floor``)."""
    notes = []
    for spec in output_specs:
        if spec.dtype not in DEFAULT_TOLERANCES or not policy.uses_defaults(spec.name, spec.dtype):
            continue
        magnitudes = [
            float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0))
            for outputs in references
            if (values := np.asarray(outputs.get(spec.name, np.zeros(0)), dtype=np.float64)).size
        ]
        scale = max(magnitudes, default=0.0)
        atol = policy.tolerance(spec.name, spec.dtype).atol
        if scale > 0 and atol >= COARSE_ATOL_SHARE * scale:
            source = policy.source(spec.name, spec.dtype)
            notes.append(
                f"{spec.name!r}: the default atol {atol:g} ({source}) is {100 * atol / scale:.3g}% of the "
                f"reference's largest magnitude {scale:.3g}, so a difference that size passes (one that changes an "
                "argmax included); give --atol / --rtol on this output's scale (Polygraphy's defaults are 1e-5), or "
                "--noise-floor to measure the model's own rounding"
            )
    return notes


#: The samples of a batch the note on input-insensitive outputs compares (the first with each of the next ones).
INSENSITIVITY_SAMPLES = 8


def _first_passes_for_all(
    policy: TolerancePolicy, name: str, arrays: Sequence[np.ndarray]
) -> tuple[bool, float] | None:
    """Whether the first of ``arrays``, returned in place of each of the others, would pass the run's own judgement of
    output ``name`` (its tolerance and criteria: :meth:`~runtime.compare.TolerancePolicy.judge`), with the largest
    absolute change; None where there is nothing to compare (fewer than two arrays, or shapes that differ). Stops at
    the first that would fail: an output that responds costs one comparison."""
    if len(arrays) < 2 or any(np.shape(a) != np.shape(arrays[0]) for a in arrays):
        return None
    largest = 0.0
    for other in arrays[1:]:
        judged = policy.judge(name, other, arrays[0], runtime="the first input's output")
        if not judged.passed:
            return False, largest
        largest = max(largest, float(judged.max_abs_error))
    return True, largest


def _samples_differ(array: np.ndarray, samples: int) -> bool:
    return array.ndim > 0 and all(not np.array_equal(array[i], array[0]) for i in range(1, samples))


def _input_insensitive_outputs(
    policy: TolerancePolicy, output_specs: Sequence[TensorSpec], feeds: Sequence[Feed], references: Sequence[Feed]
) -> list[str]:
    """A note per float output whose reference, where the inputs change, moves less than the run's judgement can see:
    between the input sets (where their outputs have one shape), or between the first samples of the first set's batch
    (dim 0, up to :data:`INSENSITIVITY_SAMPLES`, where every input has that batch size and its samples differ). A
    runtime that returned one value whatever the input would pass there, so the verdict cannot see a fault whose
    effect reaches the output only through the inputs' influence (a wrong weight upstream). Found by a cold QA of
    2026-12-07: EfficientNet-B0 after three steps moved 4.7e-10 between inputs (its BatchNorm copy too) against
    atol 1e-5, and a stem weight off by 1 % passed with nothing said."""
    sets_differ = any(
        not np.array_equal(np.asarray(feed[name]), np.asarray(feeds[0].get(name)))
        for feed in feeds[1:]
        for name in feed
    )
    # The first set's batch: its size where every input has one (dim 0), and how many of its first samples all differ.
    inputs = [np.asarray(a) for a in feeds[0].values()]
    batch = inputs[0].shape[0] if inputs and all(a.ndim and a.shape[0] == inputs[0].shape[0] for a in inputs) else 0
    samples = min(batch, INSENSITIVITY_SAMPLES)
    if samples < 2 or not all(_samples_differ(a, samples) for a in inputs):
        samples = 0
    notes = []
    for spec in output_specs:
        if not spec.dtype.startswith(("float", "bfloat")):
            continue
        values = [np.asarray(r[spec.name]) for r in references if spec.name in r]
        if len(values) != len(feeds) or any(v.dtype.kind not in "fV" or v.size == 0 for v in values):
            continue
        found: dict[str, float] = {}
        if sets_differ:
            judged = _first_passes_for_all(policy, spec.name, values)
            if judged is not None and not judged[0]:
                continue  # it responds to the sets
            if judged is not None:
                found["between the input sets"] = judged[1]
        value = values[0]
        if samples and value.ndim and value.shape[0] == batch:
            judged = _first_passes_for_all(policy, spec.name, [value[i] for i in range(samples)])
            if judged is not None and not judged[0]:
                continue  # it responds to the samples
            if judged is not None:
                found["between the samples of the batch"] = judged[1]
        if not found:
            continue
        tolerance = policy.tolerance(spec.name, spec.dtype)
        pooled = (
            ""
            if "between the input sets" in found
            else ". Unless it is computed from the whole batch (pooled over dim 0, the same for every sample): such an "
            "output moves between batches only, which one input set cannot show (give two or more: --iterations 2)"
        )
        notes.append(
            f"{spec.name!r}: the reference moves less than this run's judgement can see {' and '.join(found)} "
            f"(largest change {max(found.values()):.3g}; atol {tolerance.atol:g}, rtol {tolerance.rtol:g}) though the "
            "inputs differ: a runtime that ignored the inputs would pass, so this verdict cannot see a fault upstream "
            "of where their influence is lost (a wrong weight). A constant output, an output whose changes are below "
            "the tolerance (small magnitude: give --atol on its scale), or a network that does not respond to its "
            f"input (randomly initialised, collapsed): check a trained checkpoint, or inputs it responds to{pooled}"
        )
    return notes


@dataclass(frozen=True)
class _MeasuredRun:
    """What the noise floor and the rounding hint measure against float64: the model, the mode, the input sets,
    the reference's outputs on them and the file's I/O specs."""

    model: Any
    mode: str
    feeds: Sequence[Feed]
    references: Sequence[Feed]
    input_specs: Sequence[TensorSpec]
    output_specs: Sequence[TensorSpec]
    #: The names the model's tensors pair with, in its order (:func:`runtime.model_io.returned_output_order`).
    returned_order: Sequence[str]

    def noise(self) -> dict[str, Any]:
        """:func:`runtime.noise.measured_noise` per output (ReferenceNoise); BKNInputError where the model does not
        run in float64 (or an output's half dtype)."""
        from runtime.noise import measured_noise

        return measured_noise(
            self.model, self.mode, self.feeds, self.references, [s.name for s in self.input_specs],
            list(self.returned_order), {s.name: self.dtype(s.name) for s in self.output_specs},
        )  # fmt: skip

    def dtype(self, output: str) -> str:
        """The precision ``output`` was computed in: its own dtype, except a float32 output of a file that computes
        in half precision (half inputs: an fp16 training file's running statistics), whose values come out of
        that half computation."""
        dtype = next((s.dtype for s in self.output_specs if s.name == output), "float32")
        halves = sorted(_half_dtypes(self.input_specs))
        return halves[0] if dtype == "float32" and len(halves) == 1 else dtype


def _rounding_hints(report: ParityReport, run: _MeasuredRun) -> list[str]:
    """After a failure judged without the noise floor: a note per failed runtime whose every failing output is
    within NOISE_FACTOR times the measured error of the model's own evaluation in the output's dtype (float32:
    the reference; float16 / bfloat16: a copy in that dtype) against float64, suggesting the floor. The verdict
    stays as it is; nothing is said where the model does not run in those dtypes or the errors are larger."""
    from runtime.noise import NOISE_FACTOR

    try:
        noise = run.noise()
    except BKNInputError:
        return []
    hints = []
    for result in report.failures():
        failing = [c for c in result.outputs if not c.passed]
        if not failing or any(c.output not in noise or c.nonfinite_actual for c in failing):
            continue
        if all(c.max_abs_error <= NOISE_FACTOR * noise[c.output].max_abs for c in failing):
            worst = ", ".join(
                f"{c.output!r} {c.max_abs_error:.2g} (the model's own {run.dtype(c.output)} error "
                f"{noise[c.output].max_abs:.2g})"
                for c in failing
            )
            hints.append(
                f"{result.runtime}: every failing output is within {NOISE_FACTOR:g}x the distance of the model's own "
                f"evaluation in that dtype from float64 ({worst}): rounding may explain it; "
                "rerun with --noise-floor (noise_floor=True) to judge at that floor"
            )
    return hints


def _with_noise_floors(policy: TolerancePolicy, run: _MeasuredRun) -> tuple[TolerancePolicy, list[str]]:
    """``policy`` with each float output's atol floor (:func:`runtime.noise.measured_noise` × NOISE_FACTOR) and a
    note per output saying what was measured and what it set."""
    from runtime.noise import NOISE_FACTOR

    floors = {}
    notes = []
    for name, found in run.noise().items():
        dtype = run.dtype(name)
        measured = "the float32 reference" if dtype not in ("float16", "bfloat16") else f"the model in {dtype}"
        if not math.isfinite(found.max_abs):  # NaN / Inf in an output: the reference's own problem, reported as such
            notes.append(
                f"noise floor of {name!r}: not set ({measured} or the model in float64 gives NaN/Inf on these inputs)"
            )
            continue
        floors[name] = NOISE_FACTOR * found.max_abs
        notes.append(
            f"noise floor of {name!r}: {measured} is up to {found.max_abs:.2g} from the model in float64 "
            f"(RMS {found.rms:.2g}, output RMS {found.scale:.2g}); atol is at least {NOISE_FACTOR:g} x that = "
            f"{floors[name]:.2g}"
        )
    return replace(policy, floors=floors), notes


_UNSIZED_HINT = (
    "the file's symbolic dims ran at size 1 here: give the shapes the model runs at (--input-shape, or inputs=...), or "
)


def _reference_run(backend: TorchEagerBackend, feed: Feed, path: Path, unsized: str | None = None) -> Feed:
    """The PyTorch model's outputs on ``feed``; a model that cannot take the ONNX file's inputs is bad input.

    Raises BKNInputError naming the file, the input shapes and PyTorch's own (first) line; where symbolic dims ran
    at size 1 (``unsized``: :func:`runtime.model_io.unsized_dims_note`), it says to give the shapes instead.
    """
    try:
        return backend.run(feed)
    except BKNError:
        raise
    except Exception as error:
        shapes = ", ".join(f"{name} {tuple(array.shape)} {array.dtype}" for name, array in feed.items())
        first = (str(error).strip().splitlines() or [""])[0]
        raise BKNInputError(
            f"the PyTorch model does not run on the inputs of {path} ({shapes}): {type(error).__name__}: {first}; "
            + ("" if unsized is None else _UNSIZED_HINT)
            + "pass the model (or factory arguments) that was exported to this file"
        ) from error


def _saved_references(
    saved: Sequence[Mapping[str, np.ndarray]],
    feeds: Sequence[Feed],
    onnx_outputs: Sequence[str],
    intermediates: Set[str] = frozenset(),
    notes: list[str] | None = None,
) -> list[Feed]:
    """The saved outputs per input set, as arrays. Values the file computes but does not output (``intermediates``:
    Polygraphy's ``--onnx-outputs mark all``) are left out with a note where the set also holds a graph output;
    a name the file does not compute at all means the outputs belong to another model (SavedDataError)."""
    from runtime.errors import SavedDataError

    if len(saved) != len(feeds):
        raise SavedDataError(
            f"the saved outputs hold {len(saved)} iteration(s) but the inputs {len(feeds)}; give the inputs they "
            "were computed from"
        )
    references = []
    for iteration, outputs in enumerate(saved):
        unknown = [name for name in outputs if name not in onnx_outputs]
        if unknown and any(name in onnx_outputs for name in outputs) and all(name in intermediates for name in unknown):
            if notes is not None and iteration == 0:
                notes.append(
                    f"the saved outputs also hold {len(unknown)} value(s) the file computes but does not output "
                    f"(e.g. {unknown[0]!r}: Polygraphy's --onnx-outputs mark all): only the graph outputs are compared"
                )
            outputs = {name: array for name, array in outputs.items() if name in onnx_outputs}
            unknown = []
        if unknown:
            raise SavedDataError(
                f"the saved outputs of iteration {iteration} name {unknown}, which the model does not output "
                f"(its outputs are {list(onnx_outputs)}): they belong to another model"
            )
        references.append({name: _saved_array(array, name, iteration) for name, array in outputs.items()})
    return references


def _saved_array(value: Any, name: str, iteration: int) -> np.ndarray:
    """A saved output as a NumPy array: a tensor through :func:`~runtime.backends.torch_eager.array_of`, and the raw
    2-byte records NumPy writes for a bfloat16 array (``np.save`` / ``.npz`` / Polygraphy JSON: dtype ``V2``) as
    ``ml_dtypes.bfloat16``, the bfloat16 every runtime returns; compared in float64 at bfloat16's tolerances
    (:meth:`~runtime.compare.TolerancePolicy.judge`). Raises SavedDataError for other raw records, naming the output.
    """
    from runtime.errors import SavedDataError

    if hasattr(value, "detach"):  # a torch.Tensor (bfloat16 has no NumPy dtype: np.asarray refuses it)
        from runtime.backends.torch_eager import array_of

        return array_of(value)
    array = np.asarray(value)
    if array.dtype.type is not np.void:  # numbers, ml_dtypes' own types (bfloat16, float8) included
        return array
    if array.dtype.itemsize == 2 and array.dtype.names is None:
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    raise SavedDataError(
        f"the saved output {name!r} of iteration {iteration} holds raw {array.dtype} records, not numbers: only "
        "bfloat16 (saved as 2-byte records, V2) is read back that way; save it as a numeric array"
    )


def _check_saved_shapes(
    references: Sequence[Feed], feeds: Sequence[Feed], input_specs: Sequence[TensorSpec],
    output_specs: Sequence[TensorSpec], shaped: Set[str],
) -> None:  # fmt: skip
    """SavedDataError when a saved output's shape cannot be what the model outputs for these inputs.

    Checked against the ONNX output's rank and fixed dims, and its symbolic dims that also
    name an input dim (``batch``), whose value the inputs fix. Outputs without shape
    information in the file (not in ``shaped``) are not checked; a declared scalar (rank 0) is.
    """
    from runtime.errors import SavedDataError

    specs = {s.name: s for s in output_specs}
    for iteration, (outputs, feed) in enumerate(zip(references, feeds)):
        symbols: dict[str, int] = {}
        for spec in input_specs:
            for dim, size in zip(spec.shape, feed[spec.name].shape):
                if isinstance(dim, str):
                    symbols.setdefault(dim, int(size))
        for name, array in outputs.items():
            output = specs.get(name)
            if output is None or name not in shaped:
                continue
            expected = tuple(symbols.get(d, d) if isinstance(d, str) else d for d in output.shape)
            fits = len(expected) == array.ndim and all(
                isinstance(e, str) or e == a for e, a in zip(expected, array.shape)
            )
            if not fits and not expected and array.size == 1:
                raise SavedDataError(
                    f"the saved output {name!r} of iteration {iteration} has shape {tuple(array.shape)}, but the "
                    "model declares it a scalar (shape ()): save it with shape () (array.reshape(()))"
                )
            if not fits:
                raise SavedDataError(
                    f"the saved output {name!r} of iteration {iteration} has shape {tuple(array.shape)}, but the "
                    f"model outputs {tuple(expected)} for these inputs: the outputs belong to other inputs or another "
                    "model"
                )


def _exact_saved_outputs(
    references: Sequence[Feed], output_specs: Sequence[TensorSpec]
) -> tuple[list[Feed], list[str]]:
    """The saved outputs with each float array of an integer / bool ONNX output cast to that dtype, and a note per
    output cast: its comparison stays exact (never within a float tolerance).

    Cast only where it loses nothing: every value finite, integral, within the dtype's range (bool: 0 or 1) and
    below the float type's exact-integer limit (2^24 for float32; a larger one may be a rounded integer).
    Raises SavedDataError naming the output, the iteration and a value that is not.
    """
    from runtime.errors import SavedDataError

    exact = {
        s.name: np.dtype(s.dtype) for s in output_specs if s.dtype == "bool" or s.dtype.startswith(("int", "uint"))
    }
    converted: dict[str, str] = {}
    cast = []
    for iteration, outputs in enumerate(references):
        outputs = dict(outputs)
        for name, array in outputs.items():
            target = exact.get(name)
            if target is None or array.dtype.kind != "f":
                continue
            limits = (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
            exact_limit = 2.0 ** (np.finfo(array.dtype).nmant + 1)
            with np.errstate(invalid="ignore"):
                lossy = ~(np.isfinite(array) & (array == np.round(array)))
                lossy |= (array < limits[0]) | (array > limits[1]) | (np.abs(array) > exact_limit)
            if lossy.any():
                value = array[lossy].flat[0].item()
                raise SavedDataError(
                    f"the saved output {name!r} of iteration {iteration} holds {array.dtype} values, but the model "
                    f"outputs {target}, and {value!r} is not a whole number in {target}'s range that {array.dtype} "
                    f"holds exactly: an integer / bool output is compared exactly, never within a float tolerance; "
                    f"save it as {target}"
                )
            outputs[name] = array.astype(target)
            converted[name] = f"{array.dtype}"
        cast.append(outputs)
    notes = [
        f"the saved output {name!r} is stored as {stored}: every value is a whole number, compared exactly as the "
        f"model's {exact[name]}"
        for name, stored in converted.items()
    ]
    return cast, notes


def _save(
    feeds: Sequence[Feed],
    references: Sequence[Feed],
    save_inputs: str | os.PathLike[str] | None,
    save_outputs: str | os.PathLike[str] | None,
) -> None:
    from runtime import polygraphy_io

    if save_outputs is not None and save_inputs is None:
        target = Path(save_outputs)
        save_inputs = target.with_name(f"{target.stem}_inputs{target.suffix}")
    if save_inputs is not None:
        polygraphy_io.save_inputs(save_inputs, feeds)
    if save_outputs is not None:
        polygraphy_io.save_outputs(save_outputs, references, runner="pytorch")


def _localise(
    onnx_model: Any,
    entry: RuntimeEntry,
    feed: Feed,
    reference: Feed,
    reference_backend: TorchEagerBackend | None,
    failing: list[str],
    policy: TolerancePolicy,
    method: str,
    captured: dict[int, tuple[ModuleCapture, NoiseFloors | str]],
    iteration: int,
    node_oracle: NodeOracle | None = None,
) -> Localisation:
    """Localise ``entry``'s failure on input set ``iteration`` (``feed``). The reference's module capture and noise
    floors on that set are computed once and kept in ``captured`` for the other failing runtimes. node_oracle: what
    a node-by-node localisation compares with (:func:`_node_oracle`)."""
    assert entry.make is not None
    capture: ModuleCapture | None = None
    floors: NoiseFloors | str | None = None
    if reference_backend is not None:
        if iteration not in captured:
            _, found = reference_backend.run_capturing(feed)
            captured[iteration] = found, _module_noise_floors(reference_backend, feed, found)
        capture, floors = captured[iteration]
    return localise(
        onnx_model, entry.make, entry.name, feed, reference, capture, failing, policy, method, floors=floors,
        node_oracle=node_oracle,
    )  # fmt: skip


#: How a message says why the evaluator gave no result to compare with, by its status in the run.
_EVALUATOR_STATE = {
    Status.ERROR: "could not run the file in this run",
    Status.UNAVAILABLE: "is unavailable for this file",
    Status.NOT_APPLICABLE: "was not run",
}


def _evaluator_result(chosen: Sequence[RuntimeEntry], results: Sequence[RuntimeResult]) -> RuntimeResult | None:
    """The ONNX reference evaluator's result in this run, or None where it was not among the runtimes."""
    return next((result for entry, result in zip(chosen, results) if entry.name == "reference"), None)


def _bundle_oracle(
    failing: RuntimeEntry, chosen: Sequence[RuntimeEntry], results: Sequence[RuntimeResult]
) -> NodeOracle:
    """What computes a repro bundle's sub-model inputs where the localisation names no oracle (a module localisation
    against PyTorch): :func:`_node_oracle`'s choice, else the evaluator where it ran the file (when every runtime
    failed, the file itself may be what differs, and the evaluator computes what it holds), else none (the bundle
    is the whole model)."""
    oracle = _node_oracle(failing, chosen, results)
    evaluator = _evaluator_result(chosen, results)
    if oracle.make is None and evaluator is not None and evaluator.status in (Status.PASSED, Status.FAILED):
        return evaluator_oracle()
    return oracle


def _node_oracle(failing: RuntimeEntry, chosen: Sequence[RuntimeEntry], results: Sequence[RuntimeResult]) -> NodeOracle:
    """What a node-by-node localisation of ``failing`` compares with: the ONNX reference evaluator, unless it ran in
    this run and differed from the reference too (its own kernels can be wrong: onnx 1.23's opset-9
    BatchNormalization and Softmax); then the first other runtime that agreed with the reference, or none (the
    localisation then says why, rather than blame correct nodes for the evaluator's errors)."""
    evaluator = _evaluator_result(chosen, results)
    if evaluator is None:  # not run: judged on the failing outputs before it is used (runtime.localize.judged_oracle)
        return replace(evaluator_oracle(), judged=False)
    if evaluator.status == Status.PASSED:
        return evaluator_oracle()
    agreeing = [
        entry
        for entry, result in zip(chosen, results)
        if result.status == Status.PASSED and entry.make is not None and entry is not failing
    ]
    if agreeing:
        return NodeOracle(
            agreeing[0].make,
            agreeing[0].name,
            "which agreed with the reference in this run; the ONNX reference evaluator did not, so it is no oracle "
            "here",
        )
    if failing.name == "reference":
        why = "the failing runtime is the ONNX reference evaluator itself"
    elif evaluator.status == Status.FAILED:  # every runtime failed: the file (or the reference) may be what differs
        return replace(
            evaluator_oracle(),
            why="which differs from the reference in this run too, as every runtime does",
            trusted=False,
        )
    else:
        why = f"the ONNX reference evaluator {_EVALUATOR_STATE[evaluator.status]}"
    return NodeOracle(
        None,
        "",
        f"{why}, and no other runtime agreed with the reference: nothing trustworthy to compare node outputs with",
    )


def _module_noise_floors(backend: TorchEagerBackend, feed: Feed, capture: ModuleCapture) -> NoiseFloors | str:
    """The reference's own rounding at every module output and input: the capture against a float64 copy of the
    model's (:func:`runtime.localize.noise_floors`); the reason as text where the model does not run in float64."""
    import torch

    double = TorchEagerBackend(copy_model(backend.model).to(torch.float64), backend.mode)
    double.input_names, double.output_names = backend.input_names, backend.output_names
    double.file_outputs, double.file_layers = backend.file_outputs, backend.file_layers
    try:
        _, in_float64 = double.run_capturing(feed)
    except Exception as error:  # any failure of that run means: no floors for this model
        first_line = next(iter(str(error).strip().splitlines()), "")  # torch's errors run to pages
        return f"the model does not run in float64 ({type(error).__name__}: {first_line})"
    return noise_floors(capture, in_float64)


#: ONNX Runtime's refusal names the node: "Could not find an implementation for Max(13) node with name 'n'".
_REFUSED_NODE = re.compile(r"implementation for (\w+)\(\d+\) node with name '([^']*)'")
_HALF_TYPES = ("float16", "bfloat16")


def _unsupported_dtype(error: Exception, half: set[str], path: Path | None = None) -> bool:
    """Whether a runtime's load error is its known refusal of a half-precision file's operators (the runtime is then
    unavailable for this file, not failing it). Where the error names the refused node (ONNX Runtime's "Could not
    find an implementation for OP(v) node with name 'n'"), only if that node reads or writes a float16 / bfloat16
    value: a refused uint16 ``Max`` in a float16 file is the file's failure, as in a float32 one."""
    text = f"{type(error).__name__}: {error}"
    if not half or not any(marker in text for marker in _DTYPE_UNSUPPORTED):
        return False
    match = _REFUSED_NODE.search(text)
    if match is None or path is None:
        return True
    return _node_computes_in_half(path, match.group(1), match.group(2))


def _node_computes_in_half(path: Path, op_type: str, name: str) -> bool:
    """Whether the refused node (``op_type``, named ``name``) reads or writes a float16 / bfloat16 value, by the
    file's types after ONNX shape inference, subgraphs (``If`` / ``Loop`` bodies) included.

    A node of that name decides. Where the name is empty or names no node of the file, the nodes of that op type
    do: all of them in half (unambiguous), yes; some not, no (a refused uint16 ``Max`` beside a float16 one is not
    excused); none at all, the node is ONNX Runtime's own (an expanded function body: its bfloat16 ``Relu`` becomes
    a ``Max`` it has no kernel for), so the refusal is the half-precision file's, yes. An unreadable file: no."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # an unreadable file: not known, so not excused
        return False
    half_types = {getattr(onnx.TensorProto, kind.upper()) for kind in _HALF_TYPES}
    types = value_types(model)
    nodes = [node for graph in graphs(model.graph) for node in graph.node]

    def in_half(node: Any) -> bool:
        return any(types.get(value) in half_types for value in (*node.input, *node.output) if value)

    named = [node for node in nodes if name and node.name == name and node.op_type == op_type]
    if named:
        return any(in_half(node) for node in named)
    candidates = [node for node in nodes if node.op_type == op_type]
    return all(in_half(node) for node in candidates)


def _run_one(
    entry: RuntimeEntry,
    path: Path,
    feeds: Sequence[Feed],
    references: Sequence[Feed],
    policy: TolerancePolicy,
    half: set[str],
    progress: Progress | None,
    index: int,
    total: int,
    ort_only: Sequence[str] = (),
) -> tuple[RuntimeResult, list[str]]:
    """The runtime's verdict, and where it failed, what its backend knows it computes less accurately
    (:meth:`Backend.failure_notes`). ort_only: the file's ONNX Runtime ops (:func:`onnxruntime_ops`), which make
    every other runtime unavailable."""
    if not entry.availability.ok or entry.make is None:
        status = Status.UNAVAILABLE if entry.availability.applicable else Status.NOT_APPLICABLE
        if progress:
            progress("skip", entry.name, index, total)
        return RuntimeResult(entry.name, status, entry.availability.reason), []
    if ort_only and not entry.name.startswith("ort"):
        if progress:
            progress("skip", entry.name, index, total)
        reason = f"the file holds ONNX Runtime's own ops ({', '.join(ort_only[:3])}), which {entry.name} does not run"
        return RuntimeResult(entry.name, Status.UNAVAILABLE, reason), []
    if progress:
        progress("start", entry.name, index, total)
    started = time.perf_counter()
    backend: Backend = entry.make()
    try:
        backend.load(str(path))
    except RuntimeLimitationError as error:  # the runtime's own known limit on a valid model
        return RuntimeResult(entry.name, Status.UNAVAILABLE, str(error), time.perf_counter() - started), []
    except Exception as error:  # the runtime's failure is a finding, not a crash of the tool
        seconds = time.perf_counter() - started
        if _unsupported_dtype(error, half, path):
            reason = f"refused this {'/'.join(sorted(half))} file's operators: {type(error).__name__}: {error}"
            return RuntimeResult(entry.name, Status.UNAVAILABLE, reason, seconds), []
        return RuntimeResult(entry.name, Status.ERROR, f"{type(error).__name__}: {error}", seconds), []
    worst: dict[str, tuple[int, OutputComparison]] = {}
    for iteration, (feed, reference_outputs) in enumerate(zip(feeds, references)):
        try:
            outputs = backend.run(feed)
        except Exception as error:
            if half and _NO_NUMPY_TYPE in str(error):  # the model ran; its outputs cannot be handed over
                reason = f"cannot return {'/'.join(sorted(half))} outputs: {type(error).__name__}: {error}"
                return RuntimeResult(entry.name, Status.UNAVAILABLE, reason, time.perf_counter() - started), []
            return RuntimeResult(
                entry.name, Status.ERROR, f"input set {iteration}: {type(error).__name__}: {error}",
                time.perf_counter() - started, failing_iteration=iteration,
            ), []  # fmt: skip
        for name, reference in reference_outputs.items():
            if name not in outputs:
                comparison = OutputComparison(
                    output=name, dtype="", shape=[], reference_shape=list(reference.shape),
                    tolerance=policy.tolerance(name, reference.dtype.name), passed=False,
                    message=f"{entry.name} returned no output {name!r}", criteria=policy.criteria,
                )  # fmt: skip
            else:
                comparison = policy.judge(name, reference, outputs[name], entry.name)
            if name not in worst or _worse(comparison, worst[name][1]):
                worst[name] = (iteration, comparison)
    seconds = time.perf_counter() - started
    comparisons = [c for _, c in worst.values()]
    status = Status.PASSED if all(c.passed for c in comparisons) else Status.FAILED
    failing = next((i for i, c in worst.values() if not c.passed), None)
    reason = entry.availability.reason
    result = RuntimeResult(entry.name, status, reason, seconds, comparisons, failing_iteration=failing)
    return result, backend.failure_notes() if status is Status.FAILED else []


def _worse(candidate: OutputComparison, current: OutputComparison) -> bool:
    """Failing beats passing; then the larger max abs error (NaN counts as the largest)."""
    if candidate.passed != current.passed:
        return not candidate.passed
    a, b = candidate.max_abs_error, current.max_abs_error
    return bool(np.isnan(a) and not np.isnan(b)) or bool(a > b)
