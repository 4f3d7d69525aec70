"""Name the first PyTorch module whose output diverges on a failing runtime.

Method (documented in docs/runtime.md):

1. The PyTorch reference run records every module's output through forward hooks
   (:meth:`TorchEagerBackend.run_capturing`); the ONNX graph's module boundaries come
   from the exporter's node metadata (:mod:`runtime.onnx_scopes`).
2. The failing runtime configuration (same provider, same optimisation level) runs the
   model with every boundary exposed as an extra output. Exposing values can stop the
   runtime fusing across them, so the failure might vanish; hence we first check that
   the original outputs still fail in this run (``reproduced``).
3. If it reproduces, the first boundary in graph order outside tolerance is the
   candidate, and it is *confirmed* on its prefix model (only the nodes it depends on,
   itself the single output), which the runtime optimises as in the full graph.
4. If it does not reproduce (or the candidate is not confirmed), we bisect over the
   boundaries with prefix models, as ``polygraphy debug reduce`` does: the first
   boundary whose prefix model fails, assuming that once a value diverges everything
   computed from it does too.

Each boundary is compared with the output of the module it leaves, matched by shape
(a module with several outputs, e.g. a training-mode BKN's posterior statistics, keeps
only the tensor its forward returned). Modules called more than once are skipped.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from runtime.backends.base import Backend
from runtime.backends.torch_eager import ModuleCapture
from runtime.compare import OutputComparison, Tolerance, compare_output, resolve_tolerance
from runtime.onnx_scopes import Boundary, module_boundaries, prefix_model, with_outputs

__all__ = ["BoundaryCheck", "Localisation", "localise"]


@dataclass
class BoundaryCheck:
    """One module boundary compared with the PyTorch module output."""

    module: str
    modules: list[str]
    onnx_value: str
    onnx_node: str
    op_type: str
    passed: bool
    max_abs_error: float
    max_rel_error: float
    mismatch_fraction: float
    cosine_similarity: float

    @property
    def label(self) -> str:
        """``block2.conv1 + block2.norm1`` when one ONNX node computes fused modules."""
        return " + ".join(self.modules) if len(self.modules) > 1 else self.module


@dataclass
class Localisation:
    """Where a failing runtime first diverges from PyTorch.

    status: "localised" (``first`` set), "not_localised" (every boundary passed: the
    divergence is after the last module output), "no_metadata" (the graph has no
    exporter scopes) or "error" (``message`` says what went wrong).
    method: "exposed" (all boundaries in one run, confirmed on a prefix) or "bisect".
    reproduced: whether the failure was still there with every boundary exposed.
    """

    runtime: str
    status: str
    method: str = ""
    reproduced: bool | None = None
    confirmed: bool | None = None
    first: BoundaryCheck | None = None
    last_passing: str | None = None
    checks: list[BoundaryCheck] = field(default_factory=list)
    prefix_runs: int = 0
    message: str = ""

    @property
    def first_module(self) -> str | None:
        """The module (or fused group) whose output diverges first."""
        return self.first.label if self.first else None


def _match(capture: ModuleCapture, module: str, actual: np.ndarray) -> np.ndarray | None:
    if capture.calls.get(module, 0) != 1:
        return None
    candidates = [t for t in capture.outputs.get(module, []) if t.shape == actual.shape]
    return candidates[-1] if candidates else None


def _check(boundary: Boundary, reference: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> BoundaryCheck:
    result: OutputComparison = compare_output(boundary.value, reference, actual, tolerance)
    return BoundaryCheck(
        module=boundary.module,
        modules=list(boundary.modules),
        onnx_value=boundary.value,
        onnx_node=boundary.node,
        op_type=boundary.op_type,
        passed=result.passed,
        max_abs_error=result.max_abs_error,
        max_rel_error=result.max_rel_error,
        mismatch_fraction=result.mismatch_fraction,
        cosine_similarity=result.cosine_similarity,
    )


class _Runner:
    """Runs modified models on fresh backends of the failing configuration."""

    def __init__(self, make_backend: Callable[[], Backend], inputs: Mapping[str, np.ndarray], workdir: Path) -> None:
        self.make_backend = make_backend
        self.inputs = inputs
        self.workdir = workdir
        self.count = 0

    def run(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        self.count += 1
        path = self.workdir / f"cut_{self.count}.onnx"
        onnx.save_model(model, str(path))
        backend = self.make_backend()
        backend.load(str(path))
        wanted = {i.name for i in model.graph.input}
        return backend.run({k: v for k, v in self.inputs.items() if k in wanted})


def localise(
    model: onnx.ModelProto,
    make_backend: Callable[[], Backend],
    runtime: str,
    inputs: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    capture: ModuleCapture,
    failing_outputs: list[str],
    atol: float | None = None,
    rtol: float | None = None,
    method: str = "auto",
    tolerances: Mapping[str, Tolerance] | None = None,
) -> Localisation:
    """Localise the failure of ``runtime`` (see the module docstring). Never raises; errors go in the result.

    method: "auto" (exposed outputs, confirmed on a prefix; bisect when that does not
    reproduce) or "bisect" (prefix models only).
    """
    if method not in ("auto", "bisect"):
        raise ValueError(f"method must be 'auto' or 'bisect', got {method!r}")
    try:
        with tempfile.TemporaryDirectory(prefix="bkn-localise-") as tmp:
            return _localise(
                model, _Runner(make_backend, inputs, Path(tmp)), runtime, reference_outputs, capture,
                failing_outputs, _ToleranceRule(atol, rtol, tolerances or {}), method,
            )  # fmt: skip
    except Exception as error:  # a localisation failure must not hide the parity verdict
        return Localisation(runtime, "error", message=f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class _ToleranceRule:
    """The parity run's tolerances: per-output overrides, else global atol/rtol, else the dtype default."""

    atol: float | None
    rtol: float | None
    per_output: Mapping[str, Tolerance]

    def __call__(self, value: str, actual: np.ndarray) -> Tolerance:
        return resolve_tolerance(value, actual.dtype.name, self.atol, self.rtol, self.per_output)


def _localise(
    model: onnx.ModelProto,
    runner: _Runner,
    runtime: str,
    reference_outputs: Mapping[str, np.ndarray],
    capture: ModuleCapture,
    failing_outputs: list[str],
    tolerance: _ToleranceRule,
    method: str,
) -> Localisation:
    boundaries = module_boundaries(model, known_modules=set(capture.outputs))
    boundaries = [b for b in boundaries if b.module in capture.outputs and capture.calls.get(b.module) == 1]
    if not boundaries:
        return Localisation(
            runtime, "no_metadata",
            message="the ONNX graph has no module scopes (pkg.torch.onnx.name_scopes); export with "
            "torch.onnx.export(..., dynamo=True) / bkn_export.export.export_onnx to get them",
        )  # fmt: skip
    result = Localisation(runtime, "not_localised")
    exposed = runner.run(with_outputs(model, [b.value for b in boundaries]))
    result.reproduced = any(
        not compare_output(
            name, reference_outputs[name], exposed[name], tolerance(name, exposed[name])
        ).passed
        for name in failing_outputs
        if name in exposed
    )
    checks: list[tuple[Boundary, BoundaryCheck]] = []
    for boundary in boundaries:
        actual = exposed.get(boundary.value)
        reference = _match(capture, boundary.module, actual) if actual is not None else None
        if actual is None or reference is None:
            continue
        checks.append((boundary, _check(boundary, reference, actual, tolerance(boundary.value, actual))))
    result.checks = [c for _, c in checks]

    verdicts: dict[int, BoundaryCheck] = {}  # boundary index -> its check on its prefix model (run once each)

    def prefix_check(index: int) -> BoundaryCheck:
        if index not in verdicts:
            boundary, _ = checks[index]
            outputs = runner.run(prefix_model(model, boundary.value))
            actual = outputs[boundary.value]
            reference = _match(capture, boundary.module, actual)
            assert reference is not None
            verdicts[index] = _check(boundary, reference, actual, tolerance(boundary.value, actual))
        return verdicts[index]

    first_index = next((i for i, (_, c) in enumerate(checks) if not c.passed), None)
    if method == "auto" and result.reproduced and first_index is not None:
        result.method = "exposed"
        confirmation = prefix_check(first_index)
        result.confirmed = not confirmation.passed
        if result.confirmed:
            result.first = confirmation
            result.last_passing = checks[first_index - 1][1].module if first_index > 0 else None
    if result.first is None and checks:
        # Bisect on prefix models: the smallest index whose prefix fails.
        result.method = "bisect"
        low, high = 0, len(checks) - 1
        if prefix_check(high).passed:
            result.prefix_runs = runner.count - 1
            result.message = (
                "every module output agrees with PyTorch in its prefix model: the divergence is after the last module"
            )
            return result
        while low < high:
            middle = (low + high) // 2
            if prefix_check(middle).passed:
                low = middle + 1
            else:
                high = middle
        result.first = verdicts[high]
        result.last_passing = checks[high - 1][1].module if high > 0 else None
    result.prefix_runs = runner.count - 1
    if result.first is not None:
        result.status = "localised"
        result.message = (
            f"first diverging module: {result.first.label}"
            + f" (ONNX node {result.first.onnx_node}, {result.first.op_type}, value {result.first.onnx_value!r})"
            + f", max abs error {result.first.max_abs_error:.3g}"
            + (f"; last agreeing module: {result.last_passing}" if result.last_passing else "")
        )  # fmt: skip
    elif not checks:
        result.message = "no ONNX module output could be matched to a PyTorch module output by shape"
    return result
