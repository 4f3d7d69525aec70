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
only the tensor its forward returned; of several outputs of one shape, the one closest to the
runtime's value, since which one a value is cannot be told), as copied when that module returned: a later
in-place op (``ReLU(inplace=True)``, ``x += shortcut``) does not change it. A fused node
(Conv with a folded BKN) carries the normalization's scope, so it is compared with the
normalization's output, the last module of its group. Modules called more than once are
skipped.

Without exporter metadata (``torch.onnx.export(dynamo=False)``, third-party files) or
without a PyTorch model (saved reference outputs), the localisation is **node by node
against the ONNX reference evaluator** (method "nodes"): every node output that depends on
a graph input, in graph order, is exposed on the failing runtime and on ``onnx.reference`` in chunks of
:data:`NODE_CHUNK` values (so memory stays bounded on large models), and the first value
outside tolerance names its ONNX node. This judges the runtime against ONNX's own
semantics, not against PyTorch. Where the reference evaluator itself differed from the reference in the same
run (onnx.reference has wrong kernels: opset-9 BatchNormalization and Softmax in onnx 1.23), it is no oracle: the
node outputs are compared with a runtime that agreed with the reference in that run instead (:class:`NodeOracle`),
or, with none, the failure is not localised and the message says why (before, correct nodes of ONNX Runtime and
OpenVINO were blamed for the evaluator's own errors). The evaluator's own failure is localised the same way,
against a runtime that agreed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path

import numpy as np
import onnx

from runtime._bkn import save_onnx
from runtime.backends.base import Backend
from runtime.backends.torch_eager import ModuleCapture
from runtime.compare import OutputComparison, TolerancePolicy, compare_output
from runtime.noise import NOISE_FACTOR
from runtime.onnx_scopes import Boundary, module_boundaries, module_inputs, nearest_upstream, prefix_model, with_outputs

__all__ = [
    "NODE_CHUNK",
    "BoundaryCheck",
    "Localisation",
    "NodeOracle",
    "NoiseFloors",
    "evaluator_oracle",
    "judged_oracle",
    "localise",
    "noise_floors",
]

#: Node outputs exposed per run in the node-by-node localisation.
NODE_CHUNK = 64


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


@dataclass(frozen=True)
class NodeOracle:
    """What the node-by-node method compares a failing runtime's node outputs with.

    make: a backend of the oracle (None: no oracle, ``why`` says why); name: how messages name it; why: said once
    in the message, after the oracle's name, where it is not the default; trusted: False for an oracle that failed
    against the reference in the run like every runtime: a node where it and the runtime differ is named as their
    first disagreement, not as the runtime's divergence (either may be wrong there).
    """

    make: Callable[[], Backend] | None
    name: str
    why: str = ""
    trusted: bool = True
    #: Whether the run judged the oracle against the reference; one it did not (the evaluator not among the run's
    #: runtimes) is judged on the failing outputs before node outputs are compared with it (:func:`judged_oracle`).
    judged: bool = True


def evaluator_oracle() -> NodeOracle:
    """The default oracle: the ONNX reference evaluator (ONNX's semantics)."""
    from runtime.backends.reference import ReferenceEvaluatorBackend

    return NodeOracle(ReferenceEvaluatorBackend, "the ONNX reference evaluator")


@dataclass
class Localisation:
    """Where a failing runtime first diverges from PyTorch.

    status: "localised" (``first`` set), "not_localised" (every boundary passed: the
    divergence is after the last module output), "no_metadata" (no exporter scopes and
    no node-by-node result) or "error" (``message`` says what went wrong).
    method: "exposed" (all boundaries in one run, confirmed on a prefix), "bisect", or
    "nodes" (node by node against the ONNX reference evaluator).
    reproduced: whether the failure was still there with every boundary exposed.
    """

    runtime: str
    status: str
    method: str = ""
    reproduced: bool | None = None
    confirmed: bool | None = None
    first: BoundaryCheck | None = None
    last_passing: str | None = None
    #: Where the first diverging module's input already differs from PyTorch's: the module whose own code
    #: (not one of its submodules) computed that input, ``""`` for the model's own forward; None otherwise.
    own_code_of: str | None = None
    #: The ONNX value where the divergence is first seen (the first diverging module output, or the input found
    #: in step 5) and PyTorch's tensor there: what a repro bundle expects (:mod:`runtime.repro`). Not reported.
    expected_value: str | None = field(default=None, repr=False)
    expected: np.ndarray | None = field(default=None, repr=False, compare=False)
    checks: list[BoundaryCheck] = field(default_factory=list)
    prefix_runs: int = 0
    message: str = ""
    #: What a node-by-node localisation compared with, where not the ONNX reference evaluator: a repro bundle takes
    #: its sub-model's inputs and expected values from it too. Not reported (the message names it).
    oracle: NodeOracle | None = field(default=None, repr=False, compare=False)
    #: The ONNX values of module outputs found to agree with PyTorch, and PyTorch's tensors there: where a repro
    #: bundle cuts the graph to feed its sub-model PyTorch's own values (:mod:`runtime.repro`). Not reported.
    agreed: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def first_module(self) -> str | None:
        """The module (or fused group) whose output diverges first; where its input already diverged, the module
        whose own code computed that input (:attr:`own_code_of`; ``<model>`` for the model's own forward)."""
        if self.own_code_of is not None:
            return self.own_code_of or "<model>"
        return self.first.label if self.first else None


@dataclass(frozen=True)
class NoiseFloors:
    """Per module and tensor (its outputs, its inputs, in capture order), NOISE_FACTOR times the largest distance
    of the captured float32 tensor from a float64 copy's, per channel (dim 1; the whole tensor where it has one
    dim): the reference's own rounding there, which a runtime's float32 evaluation shares (:mod:`runtime.noise`).
    Per channel, so that one large channel's rounding does not hide a fault in a small one. None: no floor."""

    outputs: Mapping[str, list[np.ndarray | None]]
    inputs: Mapping[str, list[np.ndarray | None]]

    def floor(self, module: str, index: int | None, of: str = "outputs") -> np.ndarray | None:
        """The atol floor (broadcastable to the tensor) of tensor ``index`` of ``module``'s outputs or inputs."""
        floors = getattr(self, of).get(module, [])
        return floors[index] if index is not None and index < len(floors) else None


def _channel_floor(a32: np.ndarray, a64: np.ndarray) -> np.ndarray | None:
    """NOISE_FACTOR × max |a32 − a64| per channel (dim 1, kept for broadcasting), over the whole tensor where it has
    fewer than two dims; None where the tensors do not pair, are not floating, or a distance is not finite."""
    if a32.shape != a64.shape or a32.dtype.kind != "f" or a32.size == 0:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        distance = np.abs(a32.astype(np.float64) - a64.astype(np.float64))
    if not np.isfinite(distance).all():
        return None
    axes = tuple(axis for axis in range(distance.ndim) if axis != 1) if distance.ndim >= 2 else None
    return NOISE_FACTOR * distance.max(axis=axes, keepdims=True)


def noise_floors(float32: ModuleCapture, float64: ModuleCapture) -> NoiseFloors:
    """:class:`NoiseFloors` of a capture (the parity reference) against the capture of a float64 copy of the model
    on the same inputs; a module whose tensors do not pair (another count: the float64 run took another path) gets
    none."""
    found: dict[str, dict[str, list[np.ndarray | None]]] = {"outputs": {}, "inputs": {}}
    for kind, floors in found.items():
        ours, theirs = getattr(float32, kind), getattr(float64, kind)
        for module, tensors in ours.items():
            doubles = theirs.get(module, [])
            if len(doubles) == len(tensors):
                floors[module] = [_channel_floor(a32, a64) for a32, a64 in zip(tensors, doubles)]
    return NoiseFloors(found["outputs"], found["inputs"])


def _matched(capture: ModuleCapture, module: str, actual: np.ndarray) -> int | None:
    """The index among ``module``'s captured outputs (it ran once) of the one with ``actual``'s shape. Where it has
    several of that shape (a VAE encoder's (μ, log σ²), an LSTM's (h, c)), the closest to ``actual``: which one an
    ONNX value is cannot be told by shape, and comparing with the other blamed the encoder for its decoder's fault,
    while a fault in the module itself still shows against the closest."""
    if capture.calls.get(module, 0) != 1:
        return None
    outputs = capture.outputs.get(module, [])
    candidates = [index for index, t in enumerate(outputs) if t.shape == actual.shape]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    return min(candidates, key=lambda index: _distance(outputs[index], actual))


def _match(capture: ModuleCapture, module: str, actual: np.ndarray) -> np.ndarray | None:
    """The captured output :func:`_matched` picks, or None."""
    index = _matched(capture, module, actual)
    return None if index is None else capture.outputs[module][index]


def _distance(reference: np.ndarray, actual: np.ndarray) -> float:
    """max |a − r| in float64, NaN and infinite differences counted as infinite (for picking the closest)."""
    if reference.dtype.kind not in "fiub" or actual.dtype.kind not in "fiub":
        return 0.0 if np.array_equal(reference, actual) else float("inf")
    with np.errstate(invalid="ignore", over="ignore"):
        difference = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
    if difference.size == 0:
        return 0.0
    return float(np.nanmax(np.where(np.isfinite(difference), difference, np.inf)))


def _check(
    boundary: Boundary,
    reference: np.ndarray,
    actual: np.ndarray,
    policy: TolerancePolicy,
    floor: np.ndarray | None = None,
) -> BoundaryCheck:
    """``actual`` against ``reference`` under the run's tolerance, its atol raised to ``floor`` (per element)."""
    tolerance = policy.tolerance(boundary.value, actual.dtype.name)
    result: OutputComparison = compare_output(
        boundary.value, reference, actual, tolerance, criteria=policy.criteria, atol_floor=floor
    )  # fmt: skip
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


def _node_check(boundary: Boundary, oracle: np.ndarray, actual: np.ndarray, policy: TolerancePolicy) -> BoundaryCheck:
    """:func:`_check` of a runtime's node output against the ONNX reference evaluator's: there a NaN (or the same
    infinity) at the same element on both sides agrees (the file computes it, and the runtime runs the file
    faithfully), where against PyTorch any non-finite value fails. Elsewhere as :func:`_check`."""
    floating = [a.dtype.kind == "f" or a.dtype.name == "bfloat16" for a in (oracle, actual)]
    if oracle.shape == actual.shape and all(floating):
        both = (np.isnan(oracle) & np.isnan(actual)) | (np.isinf(oracle) & (oracle == actual))
        if both.any():
            oracle = np.where(both, 0, oracle).astype(oracle.dtype)
            actual = np.where(both, 0, actual).astype(actual.dtype)
    return _check(boundary, oracle, actual, policy)


class _Runner:
    """Runs modified models on fresh backends of the failing configuration."""

    def __init__(
        self,
        make_backend: Callable[[], Backend],
        inputs: Mapping[str, np.ndarray],
        workdir: Path,
        prefix: str = "cut",
    ) -> None:
        self.make_backend = make_backend
        self.inputs = inputs
        self.workdir = workdir
        self.prefix = prefix
        self.count = 0

    def run(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """``model``'s outputs on the run's inputs (those it takes), or on ``feeds``."""
        self.count += 1
        path = self.workdir / f"{self.prefix}_{self.count}.onnx"
        save_onnx(model, path)
        backend = self.make_backend()
        backend.load(str(path))
        if feeds is not None:
            return backend.run(dict(feeds))
        wanted = {i.name for i in model.graph.input}
        return backend.run({k: v for k, v in self.inputs.items() if k in wanted})


def localise(
    model: onnx.ModelProto,
    make_backend: Callable[[], Backend],
    runtime: str,
    inputs: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    capture: ModuleCapture | None,
    failing_outputs: list[str],
    policy: TolerancePolicy | None = None,
    method: str = "auto",
    *,
    floors: NoiseFloors | str | None = None,
    node_oracle: NodeOracle | None = None,
) -> Localisation:
    """Localise the failure of ``runtime`` (see the module docstring). Never raises; errors go in the result.

    capture: the PyTorch module outputs, or None (no PyTorch model: node by node).
    method: "auto" (exposed outputs, confirmed on a prefix; bisect when that does not
    reproduce) or "bisect" (prefix models only); both fall back to "nodes" without
    exporter metadata.
    floors: the reference's own rounding per module (:func:`noise_floors`): a module output (input) is judged with
    atol at least :data:`runtime.noise.NOISE_FACTOR` times it, so that float32 rounding accumulated upstream is not
    taken for the first divergence; a string: why there are none (named in the message); None: none.
    node_oracle: what the node-by-node method compares with (default: the ONNX reference evaluator).
    """
    if method not in ("auto", "bisect"):
        raise ValueError(f"method must be 'auto' or 'bisect', got {method!r}")
    policy = policy or TolerancePolicy()
    try:
        with tempfile.TemporaryDirectory(prefix="bkn-localise-") as tmp:
            runner = _Runner(make_backend, inputs, Path(tmp))
            result = None
            measured = floors if isinstance(floors, NoiseFloors) else None
            if capture is not None:
                result = _localise(
                    model, runner, runtime, reference_outputs, capture, failing_outputs, policy, method, measured
                )  # fmt: skip
                if isinstance(floors, str) and result.status != "no_metadata":
                    result.message += f" (module outputs judged without noise floors: {floors})"
            if result is None or result.status == "no_metadata":
                why = "no PyTorch model (saved reference outputs)" if capture is None else "no exporter module scopes"
                oracle = node_oracle or evaluator_oracle()
                if not oracle.judged and oracle.make is not None:
                    oracle = judged_oracle(oracle, model, inputs, reference_outputs, failing_outputs, policy)
                result = _localise_nodes(model, runner, runtime, Path(tmp), policy, why, oracle)
            return result
    except Exception as error:  # a localisation failure must not hide the parity verdict
        return Localisation(runtime, "error", message=f"{type(error).__name__}: {error}")


def judged_oracle(
    oracle: NodeOracle,
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    failing_outputs: list[str],
    policy: TolerancePolicy,
) -> NodeOracle:
    """``oracle`` judged on the failing outputs against the reference (one run of the whole model on ``inputs``, the
    failing input set): where it differs too it is no trusted oracle (the ONNX reference evaluator has wrong kernels:
    its BatchNormalization of opsets 7-13); where it cannot run the file, none (``make`` None)."""
    assert oracle.make is not None
    names = [name for name in failing_outputs if name in reference_outputs]
    try:
        with tempfile.TemporaryDirectory(prefix="bkn-judge-") as tmp:
            computed = _Runner(oracle.make, inputs, Path(tmp), prefix="judge").run(model)
        differs = [
            name
            for name in names
            if name not in computed or not policy.judge(name, reference_outputs[name], computed[name]).passed
        ]
    except Exception as error:
        return replace(oracle, make=None, why=f"{oracle.name} could not run the file ({type(error).__name__})")
    if differs:
        why = "which, not among the run's runtimes, was run here and differs from the reference too"
        return replace(oracle, why=why, trusted=False, judged=True)
    return replace(oracle, judged=True)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _input_dependent(model: onnx.ModelProto) -> set[str]:
    """The values computed from a graph input (a node with a subgraph counts as such: it may read outer values)."""
    dependent = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if _has_subgraph(node) or any(name in dependent for name in node.input):
            dependent.update(v for v in node.output if v)
    return dependent


def _node_boundary(value: str, node: onnx.NodeProto) -> Boundary:
    """``value`` of ``node`` as the node-by-node method reports it (the node stands for the module)."""
    return Boundary(value=value, node=node.name, op_type=node.op_type, position=0, module=node.name)


def _node_values(model: onnx.ModelProto, dependent: set[str]) -> list[tuple[str, onnx.NodeProto]]:
    """Every node output in graph order that depends on a graph input (``dependent``: :func:`_input_dependent`),
    with its node (optional outputs left empty are left out). A value computed from initializers and constants
    alone is the file's, folded by the runtime, not computed from the data: exposed as an output it can come back in
    another type (OpenVINO returned the int64 Slice bound −2⁶³+1 as −2³¹, which the model never sees), so it is not
    compared; the isolated run of a node that reads one computes it on the runtime (:func:`_isolated_nodes`)."""
    return [(v, node) for node in model.graph.node for v in node.output if v and v in dependent]


def _localise_nodes(
    model: onnx.ModelProto,
    runner: _Runner,
    runtime: str,
    workdir: Path,
    policy: TolerancePolicy,
    why: str,
    node_oracle: NodeOracle,
) -> Localisation:
    """Node by node against ``node_oracle`` (``why``: why no module outputs are compared)."""
    if node_oracle.make is None:
        return Localisation(runtime, "not_localised", method="nodes", message=f"{why}, and {node_oracle.why}")
    if runtime == "reference" and node_oracle.name == evaluator_oracle().name:
        return Localisation(
            runtime, "no_metadata", method="nodes",
            message=f"{why}, and the failing runtime is the ONNX reference evaluator itself: "
            "nothing independent to compare its node outputs with",
        )  # fmt: skip
    oracle = _Runner(node_oracle.make, runner.inputs, workdir, prefix="oracle")
    against = node_oracle.name
    stated = f"{against} ({node_oracle.why})" if node_oracle.why else against
    dependent = _input_dependent(model)
    values = _node_values(model, dependent)
    result = Localisation(runtime, "not_localised", method="nodes", oracle=node_oracle)
    previous: BoundaryCheck | None = None
    inherited = 0  # node outputs that differ only by what their inputs carried
    for start in range(0, len(values), NODE_CHUNK):
        chunk = values[start : start + NODE_CHUNK]
        names = [v for v, _ in chunk]
        actual = runner.run(with_outputs(model, names))
        expected = oracle.run(with_outputs(model, names))
        checks: list[tuple[onnx.NodeProto, BoundaryCheck]] = []
        for value, node in chunk:
            if value in actual and value in expected:
                checks.append((node, _node_check(_node_boundary(value, node), expected[value], actual[value], policy)))
        failing = [(node, check) for node, check in checks if not check.passed]
        own = _own_divergences(model, dependent, runner, oracle, failing, expected, policy, against) if failing else {}
        for node, check in checks:
            result.checks.append(check)
            if not check.passed and check.onnx_value in own:
                result.prefix_runs = runner.count
                if not node_oracle.trusted:  # either side may be wrong there: a disagreement, not a localisation
                    result.message = (
                        f"{runtime} and {stated} first disagree at ONNX node {node.name or '(unnamed)'} "
                        f"({node.op_type}, value {check.onnx_value!r}), max abs error {check.max_abs_error:.3g} "
                        f"({own[check.onnx_value]}): which of the two is wrong there is not known"
                    )
                    return result
                result.status = "localised"
                result.first = check
                result.last_passing = previous.onnx_node if previous else None
                result.message = (
                    f"first diverging ONNX node: {node.name or '(unnamed)'} ({node.op_type}, value "
                    f"{check.onnx_value!r}), max abs error {check.max_abs_error:.3g} against {stated} "
                    f"({own[check.onnx_value]})" + _inherited_note(inherited, " before it", against)
                )
                return result
            if check.passed:
                previous = check
            else:
                inherited += 1
    result.prefix_runs = runner.count
    result.message = (
        f"every node output agrees with {stated}, so the runtime computes this file as ONNX defines it: the "
        "reference (PyTorch / saved outputs) differs from ONNX's semantics of this file: the file itself computes "
        "something else (a wrong weight or op in it), or the reference is not this file's"
        if not inherited
        else f"no node, run alone from {against}'s inputs, computes a difference of its own"
        + _inherited_note(inherited, "", against)
        + ": the reference (PyTorch / saved outputs) differs from ONNX's semantics of this file, or the graph "
        "outputs differ only by that rounding (--noise-floor)"
    )
    return result


def _oracle_word(against: str) -> str:
    """How a message refers back to the oracle: "the evaluator" for the default one, else its name."""
    return "the evaluator" if against == evaluator_oracle().name else against


def _inherited_note(count: int, where: str = "", against: str = "the ONNX reference evaluator") -> str:
    if not count:
        return ""
    oracle = _oracle_word(against)
    return (
        f"; {count} node output(s){where} differ beyond tolerance only by what their inputs carried (fed "
        f"{oracle}'s inputs, each computes {oracle}'s value): rounding accumulated upstream"
    )


def _own_divergences(
    model: onnx.ModelProto,
    dependent: set[str],
    runner: _Runner,
    oracle: _Runner,
    failing: list[tuple[onnx.NodeProto, BoundaryCheck]],
    expected: Mapping[str, np.ndarray],
    policy: TolerancePolicy,
    against: str = "the ONNX reference evaluator",
) -> dict[str, str]:
    """Of the failing node outputs, those the node itself makes → how that is known: the node, run alone on the
    failing runtime from the reference evaluator's values of its data inputs (``dependent`` values; those computed
    from weights and constants alone computed by the runtime, as in the file), still differs from the evaluator's
    output. One that agrees there only inherits its inputs' difference (float32 rounding accumulated through the
    layers before it, which each runtime sums in its own order) and is left out. A node with a subgraph (If, Loop,
    Scan), or one whose isolated run fails, is kept, and its reason says it was not run alone."""
    source = _oracle_word(against)
    own = {check.onnx_value: "not run alone: it holds a subgraph" for node, check in failing if _has_subgraph(node)}
    isolable = [(node, check) for node, check in failing if not _has_subgraph(node)]
    if not isolable:
        return own
    wanted = sorted({i for node, _ in isolable for i in node.input if i in dependent})
    try:
        inputs = oracle.run(with_outputs(model, wanted)) if wanted else {}
    except Exception as error:
        return own | {check.onnx_value: f"not run alone: {type(error).__name__}" for _, check in isolable}

    def judge(group: list[tuple[onnx.NodeProto, BoundaryCheck]]) -> None:
        computed = _run_isolated(model, runner, [node for node, _ in group], inputs, expected, dependent)
        for node, check in group:
            alone = computed.get(check.onnx_value)
            if alone is None:
                own[check.onnx_value] = "not run alone: the runtime returned nothing for it"
            elif not _node_check(
                _node_boundary(check.onnx_value, node), expected[check.onnx_value], alone, policy
            ).passed:
                own[check.onnx_value] = f"from {source}'s own inputs it computes the same difference"

    try:
        judge(isolable)
    except Exception as error:  # one node the runtime cannot run alone: each on its own, so the others keep theirs
        if len(isolable) == 1:
            own[isolable[0][1].onnx_value] = f"not run alone: {type(error).__name__}"
        for pair in isolable if len(isolable) > 1 else ():
            try:
                judge([pair])
            except Exception as alone_error:
                own[pair[1].onnx_value] = f"not run alone: {type(alone_error).__name__}"
    return own


def _run_isolated(
    model: onnx.ModelProto,
    runner: _Runner,
    nodes: list[onnx.NodeProto],
    inputs: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    dependent: set[str],
) -> dict[str, np.ndarray]:
    """The outputs (by their names in ``model``) of copies of ``nodes`` run alone on the runtime
    (:func:`_isolated_nodes`)."""
    isolated, feeds, renamed = _isolated_nodes(model, nodes, inputs, expected, dependent)
    computed = runner.run(isolated, feeds)
    return {original: computed[copy] for original, copy in renamed.items() if copy in computed}


def _isolated_nodes(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    inputs: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    dependent: set[str],
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, str]]:
    """A model of copies of ``nodes``, each reading its data inputs (``dependent``) as graph inputs of its own (fed
    ``inputs``, the evaluator's values; one per name, so ``Mul(x, x)`` reads one) and every other input as the file
    computes it: its initializers, and the nodes that compute a value from them alone, copied once.
    Returns (model, feeds, original output name → the copy's output name)."""
    from onnx.helper import make_graph, make_model, make_tensor_value_info, np_dtype_to_tensor_dtype

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {v: (position, node) for position, node in enumerate(model.graph.node) for v in node.output if v}
    constant_nodes: dict[int, onnx.NodeProto] = {}
    used: dict[str, onnx.TensorProto] = {}

    def keep_constant(name: str) -> None:
        """``name`` (computed without the graph inputs) as the file computes it: its producers, their initializers."""
        if name in initializers:
            used[name] = initializers[name]
        elif name in producers and producers[name][0] not in constant_nodes:
            position, node = producers[name]
            constant_nodes[position] = node
            for upstream in node.input:
                if upstream:
                    keep_constant(upstream)

    copies, graph_inputs, graph_outputs = [], [], []
    feeds: dict[str, np.ndarray] = {}
    renamed: dict[str, str] = {}
    for index, node in enumerate(nodes):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name}__isolated{index}"
        for position, name in enumerate(node.input):
            if not name:
                continue
            if name not in dependent:
                keep_constant(name)
                continue
            fed = f"{name}__isolated{index}"
            copy.input[position] = fed
            if fed not in feeds:
                feeds[fed] = np.asarray(inputs[name])
                dtype = np_dtype_to_tensor_dtype(feeds[fed].dtype)
                graph_inputs.append(make_tensor_value_info(fed, dtype, feeds[fed].shape))
        for position, name in enumerate(node.output):
            if not name:
                continue
            copy.output[position] = renamed[name] = f"{name}__isolated{index}"
            if name in expected:
                dtype = np_dtype_to_tensor_dtype(np.asarray(expected[name]).dtype)
                graph_outputs.append(make_tensor_value_info(renamed[name], dtype, None))
        copies.append(copy)
    ordered = [constant_nodes[position] for position in sorted(constant_nodes)] + copies
    graph = make_graph(ordered, "isolated_nodes", graph_inputs, graph_outputs, initializer=list(used.values()))
    isolated = make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    isolated.ir_version = model.ir_version
    return isolated, feeds, renamed


def _compared(boundary: Boundary, capture: ModuleCapture) -> Boundary | None:
    """``boundary`` attributed to the innermost module it leaves that ran once in the PyTorch forward (a block
    whose output is a shared activation's, called twice, is compared as the block), or None."""
    for module in (boundary.module, *boundary.enclosing):
        if module in capture.outputs and capture.calls.get(module) == 1:
            if module == boundary.module:
                return boundary
            return replace(boundary, module=module, modules=(module,), enclosing=())
    return None


def _diverged_input(
    model: onnx.ModelProto,
    runner: _Runner,
    capture: ModuleCapture,
    first: BoundaryCheck,
    policy: TolerancePolicy,
    floors: NoiseFloors | None,
) -> tuple[str, str, float, np.ndarray] | None:
    """(value, the module whose own code computed it, max abs error, PyTorch's tensor) of an input of the first
    diverging module that already differs from that module's PyTorch input (matched by shape), in the same
    runtime; else None. Then the divergence starts before the module, in the code of the module around it
    (functional code in a block's ``forward``), which no module output shows."""
    # A fused group (Conv + folded normalization) is one node in the last module's scope; its input is the
    # group's first module's input in PyTorch.
    first_module = first.modules[0] if first.modules else first.module
    if capture.calls.get(first_module) != 1 or not capture.inputs.get(first_module):
        return None
    inputs = module_inputs(model, first.module, set(capture.outputs), capture.aliases)
    if not inputs:
        return None
    graph_inputs = {value.name for value in model.graph.input}
    computed = [value for value, _ in inputs if value not in graph_inputs]
    exposed = runner.run(with_outputs(model, computed)) if computed else {}
    for value, producer in inputs:
        actual = runner.inputs.get(value) if value in graph_inputs else exposed.get(value)
        recorded = capture.inputs[first_module]
        candidates = [i for i, t in enumerate(recorded) if actual is not None and t.shape == actual.shape]
        if actual is None or len(candidates) != 1:
            continue
        (index,) = candidates
        floor = floors.floor(first_module, index, of="inputs") if floors is not None else None
        tolerance = policy.tolerance(value, actual.dtype.name)
        comparison = compare_output(value, recorded[index], actual, tolerance, atol_floor=floor)
        if not comparison.passed:
            return value, producer, comparison.max_abs_error, recorded[index]
    return None


def _walked_back(
    model: onnx.ModelProto,
    checks: list[tuple[Boundary, BoundaryCheck]],
    failing: int,
    prefix_check: Callable[[int], BoundaryCheck],
) -> tuple[int, int | None]:
    """From a module output whose prefix model fails, up the graph to one whose nearest upstream module outputs all
    agree: (its index, the index of the last of those in graph order, or None where it has none).

    Bisection assumes that once a value diverges everything after it in graph order does; across independent
    branches (a skip connection) it can land on a merge past the fault. Each step checks the prefix models of
    the current output's nearest upstream module outputs and moves to the first that fails, so the result
    is a divergence whose inputs agree, whatever the graph order."""
    index_of = {boundary.value: index for index, (boundary, _) in enumerate(checks)}
    current = failing
    while True:
        upstream = sorted(index_of[v] for v in nearest_upstream(model, checks[current][0].value, set(index_of)))
        diverged = next((index for index in upstream if not prefix_check(index).passed), None)
        if diverged is None:
            return current, (upstream[-1] if upstream else None)
        current = diverged


def _localise(
    model: onnx.ModelProto,
    runner: _Runner,
    runtime: str,
    reference_outputs: Mapping[str, np.ndarray],
    capture: ModuleCapture,
    failing_outputs: list[str],
    policy: TolerancePolicy,
    method: str,
    floors: NoiseFloors | None = None,
) -> Localisation:
    found = module_boundaries(model, set(capture.outputs), capture.aliases)
    boundaries = [b for b in map(_compared, found, repeat(capture)) if b]
    if not boundaries:
        return Localisation(
            runtime, "no_metadata",
            message="the ONNX graph has no module scopes (pkg.torch.onnx.name_scopes); export with "
            "torch.onnx.export(..., dynamo=True) / bkn_export.export.export_onnx to get them",
        )  # fmt: skip
    result = Localisation(runtime, "not_localised")
    exposed = runner.run(with_outputs(model, [b.value for b in boundaries]))
    result.reproduced = any(
        not policy.judge(name, reference_outputs[name], exposed[name]).passed
        for name in failing_outputs
        if name in exposed
    )
    checks: list[tuple[Boundary, BoundaryCheck]] = []
    for boundary in boundaries:
        actual = exposed.get(boundary.value)
        index = _matched(capture, boundary.module, actual) if actual is not None else None
        if actual is None or index is None:
            continue
        reference = capture.outputs[boundary.module][index]
        floor = floors.floor(boundary.module, index) if floors is not None else None
        checks.append((boundary, _check(boundary, reference, actual, policy, floor)))
        if checks[-1][1].passed:
            result.agreed[boundary.value] = reference
    result.checks = [c for _, c in checks]

    verdicts: dict[int, BoundaryCheck] = {}  # boundary index -> its check on its prefix model (run once each)
    prefix_agreed: dict[str, tuple[bool, np.ndarray]] = {}  # boundary value -> (passed, PyTorch's tensor) there

    def prefix_check(index: int) -> BoundaryCheck:
        if index not in verdicts:
            boundary, _ = checks[index]
            outputs = runner.run(prefix_model(model, boundary.value))
            actual = outputs[boundary.value]
            matched = _matched(capture, boundary.module, actual)
            assert matched is not None
            floor = floors.floor(boundary.module, matched) if floors is not None else None
            verdicts[index] = _check(boundary, capture.outputs[boundary.module][matched], actual, policy, floor)
            prefix_agreed[boundary.value] = (verdicts[index].passed, capture.outputs[boundary.module][matched])
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
                "every module output agrees with PyTorch in its prefix model: the divergence is in the nodes after "
                "the last module output"
            )
            return result
        while low < high:
            middle = (low + high) // 2
            if prefix_check(middle).passed:
                low = middle + 1
            else:
                high = middle
        first, last_passing = _walked_back(model, checks, high, prefix_check)
        result.first = verdicts[first]
        result.last_passing = checks[last_passing][1].module if last_passing is not None else None
    if result.method == "bisect":  # the exposed run did not reproduce: only what the prefix models said counts
        result.agreed = {value: tensor for value, (passed, tensor) in prefix_agreed.items() if passed}
    diverged_input = _diverged_input(model, runner, capture, result.first, policy, floors) if result.first else None
    result.prefix_runs = runner.count - 1
    if result.first is not None:
        result.status = "localised"
        if diverged_input is None:
            result.expected_value = result.first.onnx_value
            result.expected = _match(capture, result.first.module, exposed.get(result.first.onnx_value, np.empty(0)))
            result.message = (
                f"first diverging module: {result.first.label}"
                + f" (ONNX node {result.first.onnx_node}, {result.first.op_type}, value {result.first.onnx_value!r})"
                + f", max abs error {result.first.max_abs_error:.3g}"
                + (f"; last agreeing module: {result.last_passing}" if result.last_passing else "")
            )  # fmt: skip
        else:
            value, producer, error, result.expected = diverged_input
            agreeing = value in result.agreed or value in {i.name for i in model.graph.input}
            if agreeing:  # the file reads a value that agrees where PyTorch reads something computed from it
                first_module = result.first.modules[0] if result.first.modules else result.first.module
                producer = first_module.rpartition(".")[0]
            result.own_code_of, result.expected_value = producer, value
            what = "a module output that agrees with PyTorch" if value in result.agreed else "the model input"
            computed = (
                f"the file reads {value!r} as it is, {what}, where {producer or 'the model'}'s forward computes that "
                "input from it: an operation of that forward is missing from the file"
                if agreeing
                else f"computed by {producer or 'the model'}'s forward"
                + (f" after {result.last_passing}" if result.last_passing else "")
            )
            result.message = (
                f"first diverging module: {producer or '<model>'}, in its own code (not a submodule): the input "
                f"of {result.first.label} already differs from PyTorch (value {value!r}, max abs error {error:.3g}); "
                f"{computed}; first diverging module output: {result.first.label} (ONNX node "
                f"{result.first.onnx_node})" + _shared_modules_hedge(capture)
            )
    elif not checks:
        result.message = "no ONNX module output could be matched to a PyTorch module output by shape"
    return result


def _shared_modules_hedge(capture: ModuleCapture) -> str:
    """Where modules run more than once per forward (a reused activation, a tied ``Linear``), their outputs are not
    compared (which call's would it be?), so the code named above may only be where a shared module's fault shows:
    say so, naming them (before, a fault in a shared ``Linear`` was put in a shared Tanh's own code, undoubted)."""
    shared = [name for name, calls in capture.calls.items() if calls > 1]
    if not shared:
        return ""
    names = ", ".join(repr(name) for name in shared[:4]) + (", ..." if len(shared) > 4 else "")
    return (
        f"; modules run more than once per forward ({names}) have no compared output, so the divergence may be in one "
        "of them rather than in the code named"
    )
