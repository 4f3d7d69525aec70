"""Repro bundles: the smallest failing sub-model, its inputs, expected outputs, and the command.

On a failure, :func:`write_repro` writes into a folder (``bkn parity --repro DIR``, one
sub-folder per failing runtime)::

    model.onnx      the sub-model around the first diverging node (``onnx.utils.extract_model``:
                    that node alone, its inputs as graph inputs), or the whole model when the
                    failure was not localised to a node
    inputs.json     its inputs, Polygraphy JSON (``polygraphy run --load-inputs``)
    expected.json   the expected outputs as a Polygraphy ``RunResults``, its runner named by where
                    they come from: for a sub-model PyTorch's tensor at that value where the
                    localisation matched one (runner ``pytorch``: the module's output, or the input
                    it found diverging: what the file should compute), else the ONNX reference
                    evaluator's (runner ``onnx-reference-evaluator``: ONNX's own semantics), or, where
                    the evaluator failed in the run, the agreeing runtime's the localisation compared
                    with (runner: its name; its values of the sub-model's inputs too); for
                    the whole model the run's reference (runner ``expected``: PyTorch's outputs or
                    the saved ones the run loaded). A sub-model with PyTorch's tensor as its expected
                    value takes its inputs from the oracle only where the failing runtime's own values
                    agree with them (PyTorch has none there); where they differ, the bundle is the
                    whole model and its README names the inputs that differ
    README.txt      what failed and the commands that re-check it (``bkn parity`` and ``polygraphy run``)

The bundle is then re-run on the failing runtime and the README says whether it
reproduces (a fused kernel may only fail inside the whole graph).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from runtime._bkn import create_directories, save_onnx, write_text_atomic
from runtime.compare import TolerancePolicy
from runtime.localize import NodeOracle, evaluator_oracle

__all__ = ["write_repro"]


def _node_of(model: onnx.ModelProto, value: str) -> onnx.NodeProto | None:
    return next((node for node in model.graph.node if value in node.output), None)


def _sub_model(model: onnx.ModelProto, value: str, workdir: Path) -> tuple[onnx.ModelProto, list[str]] | None:
    """The one-node model producing ``value`` (its non-initializer inputs as graph inputs), or None."""
    node = _node_of(model, value)
    if node is None:
        return None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [name for name in node.input if name and name not in initializers]
    source = workdir / "full.onnx"
    target = workdir / "sub.onnx"
    save_onnx(model, source)
    onnx.utils.extract_model(str(source), str(target), inputs, [value], check_model=False)
    sub = onnx.load(str(target))
    if len(model.functions) and not len(sub.functions):
        sub.functions.extend(model.functions)
    return sub, inputs


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
        cut = _sub_model(model, first_value, workdir) if first_value else None
        unconfirmed = None
        if cut is not None:
            sub, input_names = cut
            values = _evaluate(with_outputs(model, input_names), feed, workdir, "inputs.onnx", chosen)
            sub_feed = {name: values[name] if name in values else feed[name] for name in input_names}
            if pytorch:  # PyTorch has no tensor there: the oracle's inputs count where the failing runtime's agree
                unconfirmed = _unconfirmed_inputs(model, entry, feed, sub_feed, workdir, policy)
                if unconfirmed is not None:
                    cut = None
        if cut is not None:
            node = _node_of(model, str(first_value))
            assert node is not None  # _sub_model found it
            scope = f"the node producing {first_value!r} ({node.op_type}, node {node.name!r})"
            if pytorch:
                expected, runner = {str(first_value): loc.expected}, "pytorch"
                scope += "; expected.json: PyTorch's tensor there (what the file should compute)"
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
            if unconfirmed is not None:
                scope = (
                    f"the whole model {model_path.name} (the failure was localised to the node producing "
                    f"{first_value!r}, but {unconfirmed}, so a sub-model around it would not say which is wrong)"
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
    command = (
        f"bkn parity {directory / 'model.onnx'} --load-inputs {directory / 'inputs.json'} "
        f"--load-outputs {directory / 'expected.json'} --runtimes {entry.name}{_criteria_flags(policy)}"
    )
    readme = (
        f"Repro of a parity failure of {entry.name} on {model_path}\n\n"
        f"model.onnx: {scope}\n"
        "inputs.json / expected.json: its inputs and expected outputs (Polygraphy JSON)\n"
        f"Re-running model.onnx on {entry.name} reproduces the failure: {reproduces}\n\n"
        f"Re-check:\n  {command}\n{_polygraphy_line(entry.name, directory)}"
    )
    write_text_atomic(directory / "README.txt", readme)
    return f"repro bundle for {entry.name} in {directory} (reproduces: {reproduces}): {command}"


def _unconfirmed_inputs(
    model: onnx.ModelProto,
    entry: Any,
    feed: Mapping[str, np.ndarray],
    sub_feed: Mapping[str, np.ndarray],
    workdir: Path,
    policy: TolerancePolicy,
) -> str | None:
    """None where the failing runtime's own values of the sub-model's inputs agree with ``sub_feed`` (the oracle's:
    two computations agree, and the values upstream agreed with PyTorch); else why they are not confirmed: the inputs
    that differ (the divergence begins upstream of the node, or the oracle is wrong there), or the runtime could not
    compute them."""
    from runtime.onnx_scopes import with_outputs

    computed = [name for name in sub_feed if name not in feed]
    if not computed:
        return None
    path = workdir / "own.onnx"
    save_onnx(with_outputs(model, computed), path)
    try:
        backend = entry.make()
        backend.load(str(path))
        own = backend.run(dict(feed))
    except Exception as error:
        return f"{entry.name} could not compute its inputs to compare ({type(error).__name__}: {error})"
    differing = [
        name for name in computed if name not in own or not policy.judge(name, sub_feed[name], own[name]).passed
    ]
    if not differing:
        return None
    return (
        f"{entry.name}'s own values of its input(s) {', '.join(repr(name) for name in differing)} already differ from "
        "the oracle's (the divergence begins upstream of that node, inside the layer, or the oracle is wrong there)"
    )


def _polygraphy_line(runtime: str, directory: Path) -> str:
    """The ``polygraphy run`` re-check where Polygraphy runs the failing runtime's engine (ONNX Runtime on the CPU,
    TensorRT); none for the others (a ``--onnxrt`` run would check ONNX Runtime, not the runtime that failed)."""
    flag = "--onnxrt" if runtime.startswith("ort:cpu") else "--trt" if runtime == "tensorrt" else None
    if flag is None:
        return ""
    return (
        f"  polygraphy run {directory / 'model.onnx'} {flag} --load-inputs {directory / 'inputs.json'} "
        f"--load-outputs {directory / 'expected.json'}\n"
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
