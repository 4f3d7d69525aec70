"""``assert_parity``: export a model, run it on every runtime, raise a readable error on mismatch."""

from __future__ import annotations

import inspect
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.torch_eager import array_of, tensor_of
from runtime.compare import Criteria, Tolerance
from runtime.parity import ParityReport, run_parity

__all__ = ["assert_parity"]


def _as_arrays(inputs: Any) -> list[np.ndarray]:
    if isinstance(inputs, Mapping):
        from runtime.errors import BKNInputError

        raise BKNInputError(
            f"assert_parity takes a tensor or a tuple of tensors in forward()'s order (the export traces positional "
            f"inputs), not a dict (keys {list(inputs)}): pass tuple(inputs[name] for name in forward()'s arguments)"
        )
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    arrays = []
    for item in items:
        arrays.append(array_of(item) if hasattr(item, "detach") else np.asarray(item))
    return arrays


def _cast_to_onnx_inputs(arrays: list[np.ndarray], path: Path) -> list[np.ndarray]:
    """Floating inputs cast to the ONNX file's floating input dtypes (e.g. float32 -> float16 for an fp16 export).

    The PyTorch reference gets the cast values back in its own dtype (run_parity), so both
    sides see the same numbers. Other mismatches are left for run_parity to reject.
    """
    import ml_dtypes

    from runtime.model_io import load_onnx, tensor_specs

    specs, _ = tensor_specs(load_onnx(path, load_external_data=False))
    floating = ("float16", "bfloat16", "float32", "float64")
    cast = []
    for array, spec in zip(arrays, specs):
        if array.dtype.name in floating and spec.dtype in floating and array.dtype.name != spec.dtype:
            array = array.astype(ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else spec.dtype)
        cast.append(array)
    return cast + arrays[len(specs) :]


def _as_tensors(arrays: Sequence[np.ndarray]) -> tuple[Any, ...]:
    return tuple(tensor_of(a) for a in arrays)


def assert_parity(
    model: Any,
    inputs: Any,
    mode: str = "inference",
    runtimes: str | Sequence[str] = "all",
    atol: float | None = None,
    rtol: float | None = None,
    *,
    tolerances: Mapping[str, Tolerance] | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    export_to: str | os.PathLike[str] | None = None,
    report_dir: str | os.PathLike[str] | None = None,
    export_options: Mapping[str, Any] | None = None,
    custom_op_libraries: Sequence[str | os.PathLike[str]] = (),
    plugin_libraries: Sequence[str | os.PathLike[str]] = (),
    criteria: Criteria | None = None,
    openvino_precision: str = "f32",
    report_name: str | None = None,
    **parity_options: Any,
) -> ParityReport:
    """Check that every chosen runtime computes what ``model`` computes in PyTorch.

    model: an ``nn.Module``; inputs: a tensor / array or a tuple of them, (N, C, *).
    mode: "inference" (the eval-mode export, BKN folded) or "training" (the train-mode
    export with ``ai.bkn::BatchKalmanNorm`` nodes, compared with the train-mode forward).
    With ``onnx_path`` that file is checked; without, the model is exported with
    ``bkn_export.export.export_onnx(model, inputs, path, mode=mode, **export_options)``
    to ``export_to`` (kept) or a temporary file. atol / rtol override the dtype defaults
    (:data:`runtime.compare.DEFAULT_TOLERANCES`) for every output, ``tolerances`` per output.
    ``criteria``: how outputs are judged (:class:`runtime.compare.Criteria`); other
    keywords go to :func:`runtime.parity.run_parity` (``save_inputs``, ``save_outputs``,
    ``repro_dir``, ...). With ``report_dir`` the JSON and HTML reports are written there as
    ``<report_name or parity_<mode>>.json`` / ``.html``.

    Returns the :class:`ParityReport`; raises :class:`runtime.errors.ParityMismatchError`
    (an ``AssertionError``) naming each failing runtime, output and error, and the first
    diverging module, when any runtime that ran differs or none could run.
    """
    from runtime.errors import NoRuntimeRanError, ParityMismatchError

    _check_options(atol, rtol, parity_options)
    _check_arguments(model, inputs, runtimes, tolerances, criteria, report_dir)
    arrays = _as_arrays(inputs)
    with tempfile.TemporaryDirectory(prefix="bkn-parity-") as tmp:
        path = Path(onnx_path or export_to or Path(tmp) / f"model_{mode}.onnx")
        if onnx_path is None:
            from runtime._bkn import export_onnx

            export_onnx(model, _as_tensors(arrays), path, mode=mode, **dict(export_options or {}))
        if report_dir is not None:
            try:
                Path(report_dir).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                from runtime.errors import BKNInputError

                raise BKNInputError(f"report_dir {report_dir}: cannot create it ({error})") from error
        arrays = _cast_to_onnx_inputs(arrays, path)
        report = run_parity(
            model, path, arrays, mode=mode, runtimes=runtimes, atol=atol, rtol=rtol, tolerances=tolerances,
            custom_op_libraries=custom_op_libraries, plugin_libraries=plugin_libraries, criteria=criteria,
            openvino_precision=openvino_precision, **parity_options,
        )  # fmt: skip
        if report_dir is not None:
            from runtime.report import write_html, write_json

            directory = Path(report_dir)
            stem = report_name or f"parity_{mode}"
            write_json(report, directory / f"{stem}.json")
            write_html(report, directory / f"{stem}.html")
    if report.passed:
        return report
    if not report.ran and not report.reference_problems:
        raise NoRuntimeRanError(failure_message(report))
    raise ParityMismatchError(failure_message(report))


#: run_parity's keywords that assert_parity sets itself (the others pass through ``**parity_options``).
_SET_HERE = frozenset({"model", "onnx_path", "inputs", "mode", "runtimes", "atol", "rtol", "tolerances",
                       "custom_op_libraries", "plugin_libraries", "criteria", "openvino_precision"})  # fmt: skip


def _check_options(atol: Any, rtol: Any, parity_options: Mapping[str, Any]) -> None:
    """Refuse, before the export, a tolerance that is not a number and a keyword run_parity does not take."""
    from runtime.errors import BKNInputError

    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise BKNInputError(f"{name} must be a number or None, got {value!r} ({type(value).__name__})")
    accepted = set(inspect.signature(run_parity).parameters) - _SET_HERE
    unknown = sorted(set(parity_options) - accepted)
    if unknown:
        raise BKNInputError(
            f"assert_parity got unknown keyword(s) {unknown}; it takes its own arguments and run_parity's "
            f"{sorted(accepted)}"
        )


def _check_arguments(model: Any, inputs: Any, runtimes: Any, tolerances: Any, criteria: Any, report_dir: Any) -> None:
    """Refuse, before the export, arguments of the wrong type (they would fail later with an error about something
    else, or be read as something they are not)."""
    from runtime.errors import BKNInputError

    if not (hasattr(model, "named_modules") and callable(model)):
        raise BKNInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inputs is None or isinstance(inputs, (str, bytes)):
        raise BKNInputError(f"inputs must be a tensor / array or a tuple of them, got {type(inputs).__name__}")
    names = [runtimes] if isinstance(runtimes, str) else runtimes
    if not isinstance(names, Sequence) or not all(isinstance(name, str) for name in names):
        raise BKNInputError(
            f"runtimes must be 'all', a comma-separated string or a sequence of runtime names, got {runtimes!r}"
        )
    if tolerances is not None and not isinstance(tolerances, Mapping):
        raise BKNInputError(f"tolerances must map output names to Tolerance(atol, rtol), got {tolerances!r}")
    for name, tolerance in (tolerances or {}).items():
        if not isinstance(tolerance, Tolerance):
            raise BKNInputError(
                f"tolerances[{name!r}] must be runtime.compare.Tolerance(atol, rtol), got {tolerance!r}"
            )
    if criteria is not None and not isinstance(criteria, Criteria):
        raise BKNInputError(f"criteria must be runtime.compare.Criteria(...) or None, got {criteria!r}")
    if report_dir is not None and Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise BKNInputError(f"report_dir {report_dir} is a file, not a directory")


def failure_message(report: ParityReport) -> str:
    """A few lines a test log can show: what failed, by how much, and where it starts."""
    if not report.ran:
        skipped = "; ".join(f"{r.runtime}: {r.reason}" for r in report.runtimes)
        return f"parity: no runtime could run {report.onnx_path} ({skipped})"
    verdict = (
        "the reference is broken; no runtime was judged against it"
        if report.reference_problems
        else f"{report.failure_counts()} (against "
        + ("PyTorch" if report.reference.startswith("pytorch") else "the saved outputs")
        + ")"
    )
    lines = [f"parity ({report.mode}) failed for {report.onnx_path}: {verdict}"]
    lines.extend(f"  reference: {problem}" for problem in report.reference_problems)
    for result in report.failures():
        if result.status == "error":
            lines.append(f"  {result.runtime}: could not run: {result.reason}")
        for comparison in result.outputs:
            if not comparison.passed:
                lines.append(f"  {result.runtime} / {comparison.output}: {comparison.message}")
        if result.localisation is not None:
            lines.append(f"    localisation: {result.localisation.message or result.localisation.status}")
        prefix = f"{result.runtime}: "
        lines.extend(f"    note: {note[len(prefix) :]}" for note in report.notes if note.startswith(prefix))
    passed = [r.runtime for r in report.ran if r.status == "passed"]
    if passed:
        lines.append(f"  agreeing: {', '.join(passed)}")
    return "\n".join(lines)
