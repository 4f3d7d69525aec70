"""Repro bundles: the smallest failing sub-model, its inputs, expected outputs, and the command.

On a failure, :func:`write_repro` writes into a folder (``bkn parity --repro DIR``, one
sub-folder per failing runtime)::

    model.onnx      the sub-model around the first diverging value (:func:`runtime.onnx_scopes.sub_model`):
                    after a localisation against PyTorch, the nodes computing that value from the
                    nearest module outputs upstream that agreed with PyTorch (or from the model's
                    inputs); after a node-by-node localisation, the diverging node alone, its inputs
                    as graph inputs; the whole model when the failure was not localised to a node
    inputs.json     its inputs, Polygraphy JSON (``polygraphy run --load-inputs``): PyTorch's tensors
                    at the agreeing module outputs (and the run's inputs), or the oracle's values
                    (the ONNX reference evaluator, or, where it failed in the run, the agreeing runtime
                    the localisation compared with)
    expected.json   the expected outputs as a Polygraphy ``RunResults``, its runner named by where
                    they come from: PyTorch's tensor at the diverging value (runner ``pytorch``: the
                    module's output, or the input it found diverging: what the file should compute),
                    else the oracle's output of the node (runner ``onnx-reference-evaluator``: ONNX's
                    own semantics, or the agreeing runtime's name); for the whole model the run's
                    reference (runner ``expected``: PyTorch's outputs or the saved ones the run loaded)
    README.txt      what failed and the commands that re-check it (``bkn parity`` and ``polygraphy run``)

The bundle is then re-run on the failing runtime and the README says whether it
reproduces (a fused kernel may only fail inside the whole graph).
"""

from __future__ import annotations

import dataclasses
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from runtime._bkn import create_directories, save_onnx, write_text_atomic
from runtime.compare import TolerancePolicy
from runtime.localize import NodeOracle, evaluator_oracle
from runtime.onnx_scopes import node_reads, sub_model
from runtime.precision import computed_precision, value_types

__all__ = ["write_repro"]


def _node_of(model: onnx.ModelProto, value: str) -> onnx.NodeProto | None:
    return next((node for node in model.graph.node if value in node.output), None)


def _sub_model(model: onnx.ModelProto, value: str) -> tuple[onnx.ModelProto, list[str]] | None:
    """The one-node model producing ``value`` (what it reads beyond initializers as graph inputs), or None."""
    node = _node_of(model, value)
    if node is None:
        return None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [name for name in node_reads(node) if name not in initializers]
    return sub_model(model, inputs, value), inputs


def _pytorch_cut(
    model: onnx.ModelProto, value: str, agreed: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], str] | None:
    """The sub-model computing ``value`` from the nearest values upstream that agree with PyTorch (``agreed``: module
    outputs the localisation found agreeing, with PyTorch's tensors there) or from the graph's inputs, with those
    tensors as its inputs, and the README's description of it; None where ``value`` has no producer here.

    Every input is PyTorch's own tensor (or the run's input), so the bundle holds all the nodes between what agrees and
    what differs, the diverging one among them, whatever the file computes upstream: a node alone fed from a
    runtime's or the evaluator's values took the file's own fault as its input where it sat in a block's own code
    (``x + 0.55 * relu(...)``: the bundle was the final Add, which every runtime computes right)."""
    producer = {name: node for node in model.graph.node for name in node.output if name}
    if value not in producer or value in agreed:  # no node of the file between agreement and divergence
        return None
    initializers = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    graph_inputs = {i.name for i in model.graph.input}
    inputs: dict[str, None] = {}
    nodes: set[int] = set()
    pending = node_reads(producer[value])
    nodes.add(id(producer[value]))
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name in initializers:
            continue
        seen.add(name)
        if name in agreed or name in graph_inputs:
            inputs[name] = None
            continue
        if name not in producer:  # a value of no node, input or initializer here: no cut to make
            return None
        node = producer[name]
        if id(node) not in nodes:
            nodes.add(id(node))
            pending.extend(node_reads(node))
    sub = sub_model(model, list(inputs), value)
    names = [i.name for i in sub.graph.input]
    elements = value_types(model)
    sub_feed = {
        name: _as_declared(agreed[name], elements.get(name)) if name in agreed else feed[name] for name in names
    }
    from_pytorch = [name for name in names if name in agreed]
    scope = (
        f"the {len(sub.graph.node)} node(s) computing {value!r} from "
        + (f"the values {', '.join(repr(n) for n in from_pytorch)}, where the file agreed with PyTorch" if from_pytorch
           else "the model's inputs")
        + "; inputs.json: PyTorch's tensors there (and the run's inputs); expected.json: PyTorch's tensor at "
        f"{value!r} (what the file should compute)"
    )  # fmt: skip
    return sub, sub_feed, scope


def _as_declared(array: np.ndarray, element: int | None) -> np.ndarray:
    """PyTorch's tensor in the file's declared type for that value (a float16 file compared with a float32 model)."""
    if element is None or element == onnx.TensorProto.UNDEFINED:
        return array
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(element)
    except Exception:  # a type numpy does not have
        return array
    return array if array.dtype == dtype else array.astype(dtype)


def _evaluate(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], workdir: Path, name: str, oracle: NodeOracle
) -> dict[str, Any]:
    """``model``'s outputs on ``feed`` computed by ``oracle`` (the ONNX reference evaluator, unless the localisation
    took another: :class:`runtime.localize.NodeOracle`)."""
    assert oracle.make is not None
    path = workdir / name
    save_onnx(model, path)
    backend = oracle.make()
    backend.load(str(path))
    return backend.run(dict(feed))


def write_repro(
    model: onnx.ModelProto,
    model_path: Path,
    entry: Any,
    feed: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    result: Any,
    directory: Path,
    policy: TolerancePolicy | None = None,
    oracle: NodeOracle | None = None,
) -> str:
    """Write the bundle for one failing runtime (``entry``, ``result``) into ``directory``; returns a one-line note.

    policy: the run's tolerances and criteria, by which the bundle is re-judged (default: the dtype defaults).
    oracle: what computes a sub-model's inputs (and, without PyTorch's tensor, its expected values) where the
    localisation names none: the run's choice (:func:`runtime.parity._node_oracle`: the evaluator unless it failed
    in the run); default the evaluator. One that cannot compute them (``make`` None) gives a whole-model bundle."""
    from runtime import polygraphy_io
    from runtime.onnx_scopes import with_outputs

    policy = policy or TolerancePolicy()

    create_directories(directory)
    loc = result.localisation
    first_value = loc.first.onnx_value if loc is not None and loc.first is not None else None
    pytorch = loc is not None and loc.expected is not None and loc.expected_value is not None
    chosen = loc.oracle if loc is not None and loc.oracle is not None else oracle
    chosen = chosen or evaluator_oracle()
    default_oracle = chosen.name == evaluator_oracle().name
    if pytorch:
        first_value = loc.expected_value
    unfed = chosen.make is None and first_value is not None
    if unfed:  # nothing trustworthy computes a sub-model's inputs: the whole model
        first_value = None
    with tempfile.TemporaryDirectory(prefix="bkn-repro-") as tmp:
        workdir = Path(tmp)
        # the file reads a value that agrees with PyTorch (a module output, the model input) where PyTorch's forward
        # computes the diverging one from it: no node of the file computes the difference
        missing = pytorch and (first_value in loc.agreed or first_value in {i.name for i in model.graph.input})
        fed_by_pytorch = None
        if pytorch and first_value and not missing:
            fed_by_pytorch = _pytorch_cut(model, first_value, loc.agreed, feed)
        cut = None
        if first_value and not missing and fed_by_pytorch is None:
            cut = _sub_model(model, first_value)
        if cut is not None:
            sub, input_names = cut
            values = _evaluate(with_outputs(model, input_names), feed, workdir, "inputs.onnx", chosen)
            sub_feed = {name: values[name] if name in values else feed[name] for name in input_names}
        if fed_by_pytorch is not None:
            sub, sub_feed, scope = fed_by_pytorch
            expected, runner = {str(first_value): loc.expected}, "pytorch"
        elif cut is not None:
            node = _node_of(model, str(first_value))
            assert node is not None  # _sub_model found it
            scope = f"the node producing {first_value!r} ({node.op_type}, node {node.name!r})"
            if pytorch:
                expected, runner = {str(first_value): loc.expected}, "pytorch"
                scope += f"; inputs.json: {chosen.name}'s values; expected.json: PyTorch's tensor there"
            elif default_oracle:
                expected = _evaluate(sub, sub_feed, workdir, "expected.onnx", chosen)
                runner = "onnx-reference-evaluator"
                scope += "; expected.json: the ONNX reference evaluator's output of that node (ONNX's semantics)"
            else:  # the evaluator failed in the run: the runtime the localisation compared with
                expected, runner = _evaluate(sub, sub_feed, workdir, "expected.onnx", chosen), chosen.name
                scope += (
                    f"; inputs.json / expected.json: {chosen.name}'s values there ({chosen.why}), as the "
                    "localisation compared"
                )
        else:
            sub = model
            sub_feed = dict(feed)
            expected, runner = dict(reference_outputs), "expected"
            scope = f"the whole model {model_path.name} (the failure was not localised to a node)"
            if missing:
                scope = (
                    f"the whole model {model_path.name} (the file reads {first_value!r} as it is, where PyTorch's "
                    "forward computes the diverging input from it: no node of the file computes the difference, an "
                    "operation is missing from it)"
                )
            if unfed:
                scope = (
                    f"the whole model {model_path.name} (the failure was localised, but nothing trustworthy here "
                    f"computes the inputs of a sub-model around it: {chosen.why})"
                )
        save_onnx(sub, directory / "model.onnx")
        polygraphy_io.save_inputs(directory / "inputs.json", [sub_feed])
        polygraphy_io.save_outputs(directory / "expected.json", [expected], runner=runner)
        reproduces = _reproduces(entry, directory / "model.onnx", sub_feed, expected, policy)
        tolerances = _tolerances(sub, expected, policy)
    quoted = {name: shlex.quote(str(directory / name)) for name in ("model.onnx", "inputs.json", "expected.json")}
    command = (
        f"bkn parity {quoted['model.onnx']} --load-inputs {quoted['inputs.json']} "
        f"--load-outputs {quoted['expected.json']} --runtimes {entry.name}{_criteria_flags(policy)}"
    )
    readme = (
        f"Repro of a parity failure of {entry.name} on {model_path}\n\n"
        f"model.onnx: {scope}\n"
        "inputs.json / expected.json: its inputs and expected outputs (Polygraphy JSON)\n"
        f"Re-running model.onnx on {entry.name} reproduces the failure: {reproduces}\n\n"
        f"Re-check:\n  {command}\n{_polygraphy_line(entry.name, directory, tolerances)}"
    )
    write_text_atomic(directory / "README.txt", readme)
    return f"repro bundle for {entry.name} in {directory} (reproduces: {reproduces}): {command}"


def _tolerances(sub: onnx.ModelProto, expected: Mapping[str, Any], policy: TolerancePolicy) -> str:
    """Polygraphy's ``--atol`` / ``--rtol`` for the bundle's outputs, per output, as ``bkn parity`` judges them on the
    bundle (the precision each was computed in, in ``sub``); Polygraphy's defaults are 1e-5 / 1e-5 whatever the dtype,
    and a faithful float16 sub-model failed its re-check."""
    policy = dataclasses.replace(policy, computed_in={**policy.computed_in, **computed_precision(sub)})
    declared = value_types(sub)
    tolerances = {}
    for name, value in expected.items():
        dtype = np.asarray(value).dtype
        if dtype.kind != "f":
            continue
        own = declared.get(name)
        if own is not None and onnx.helper.tensor_dtype_to_np_dtype(own).kind == "f":  # the file's, where narrower
            dtype = min(dtype, onnx.helper.tensor_dtype_to_np_dtype(own), key=lambda d: d.itemsize)
        tolerances[name] = policy.tolerance(name, dtype.name)
    if not tolerances:
        return ""
    atol = " ".join(shlex.quote(f"{name}:{tolerance.atol!r}") for name, tolerance in tolerances.items())
    rtol = " ".join(shlex.quote(f"{name}:{tolerance.rtol!r}") for name, tolerance in tolerances.items())
    return f" --atol {atol} --rtol {rtol}"


def _polygraphy_line(runtime: str, directory: Path, tolerances: str = "") -> str:
    """The ``polygraphy run`` re-check where Polygraphy runs the failing runtime's engine (ONNX Runtime on the CPU,
    TensorRT), with the run's tolerances (``tolerances``: :func:`_tolerances`); none for the others (a ``--onnxrt``
    run would check ONNX Runtime, not the runtime that failed)."""
    flag = "--onnxrt" if runtime.startswith("ort:cpu") else "--trt" if runtime == "tensorrt" else None
    if flag is None:
        return ""
    files = ("model.onnx", "inputs.json", "expected.json")
    model, inputs, outputs = (shlex.quote(str(directory / name)) for name in files)
    return (
        f"  polygraphy run {model} {flag} --load-inputs {inputs} --load-outputs {outputs}{tolerances}\n"
        "  (Polygraphy passes |a - r| <= max(atol, rtol |r|), bkn parity |a - r| <= atol + rtol |r|: an element near "
        "the bound can pass one and fail the other)\n"
    )


def _criteria_flags(policy: TolerancePolicy) -> str:
    """The ``bkn parity`` flags that judge as ``policy`` does globally (per-output tolerances and noise floors name
    the whole file's outputs, not the bundle's: not carried); none for the defaults."""
    criteria = policy.criteria
    flags = [f"--atol {policy.atol!r}"] if policy.atol is not None else []
    flags += [f"--rtol {policy.rtol!r}"] if policy.rtol is not None else []
    if criteria.error_stat != "elementwise":
        flags += [f"--check-error-stat {criteria.error_stat}", f"--error-quantile {criteria.error_quantile!r}"]
    flags += [f"--cosine-min {criteria.cosine_min!r}"] if criteria.cosine_min is not None else []
    flags += [f"--max-mismatch {criteria.max_mismatch!r}"] if criteria.max_mismatch else []
    flags += ["--equal-nan"] if criteria.equal_nan else []
    return "".join(f" {flag}" for flag in flags)


def _reproduces(
    entry: Any, path: Path, feed: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], policy: TolerancePolicy
) -> str:
    try:
        backend = entry.make()
        backend.load(str(path))
        outputs = backend.run(dict(feed))
    except Exception as error:
        return f"yes ({type(error).__name__} on load/run)"
    missing = [name for name in expected if name not in outputs]
    if missing:
        return f"yes (the runtime returned no output {', '.join(repr(name) for name in missing)})"
    failing = [name for name, value in expected.items() if not policy.judge(name, value, outputs[name]).passed]
    return f"yes ({', '.join(failing)} differ)" if failing else "no (the failure needs the surrounding graph)"
