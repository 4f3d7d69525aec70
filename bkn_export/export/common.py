"""Pieces both exporters (inference and training) share: opset, example inputs, checker."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import onnx
import torch
from torch import Tensor

from bkn_export.errors import BKNError, ExportError, OptionError
from bkn_export.export.op.op_spec import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

__all__ = [
    "GRAPH_OPTIMIZERS",
    "check_model",
    "example_tuple",
    "resolve_graph_optimizer",
    "resolve_opset",
    "run_dynamo_export",
]

#: How much of onnxscript's optimizer runs on the traced graph (:func:`run_dynamo_export`):
#: ``"full"``: torch.onnx's ``optimize=True`` (constant folding, the rewriter's pattern fusions, common
#: subexpressions, unused nodes; the smallest graph); ``"fold"``: constant folding and unused-node removal only (no
#: rewriter, whose pattern matching takes minutes on graphs of tens of thousands of nodes: a DenseNet's training
#: chain); ``"none"``: the graph as torch.onnx traces it (``optimize=False``).
GRAPH_OPTIMIZERS = ("full", "fold", "none")


def resolve_opset(opset: int | None) -> int:
    """``opset`` or :data:`DEFAULT_OPSET`.

    Raises :class:`OptionError` for a value that is not an integer (``20.7`` is refused, not
    truncated; ``True`` too) or lies outside MIN_OPSET..MAX_OPSET.
    """
    if opset is None:
        return DEFAULT_OPSET
    try:
        if isinstance(opset, bool):
            raise TypeError
        chosen = operator.index(opset)
    except TypeError:
        raise OptionError(
            f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET}, got {opset!r} ({type(opset).__name__})"
        ) from None
    if not MIN_OPSET <= chosen <= MAX_OPSET:
        raise OptionError(
            f"opset {chosen} is not supported: choose {MIN_OPSET}..{MAX_OPSET} (the dynamo exporter needs >= "
            f"{MIN_OPSET}; {MAX_OPSET} is the newest the tested stack emits)"
        )
    return chosen


def resolve_graph_optimizer(graph_optimizer: Any) -> str:
    """``graph_optimizer`` if it is one of :data:`GRAPH_OPTIMIZERS`, else :class:`OptionError`."""
    if not isinstance(graph_optimizer, str) or graph_optimizer not in GRAPH_OPTIMIZERS:
        raise OptionError(f"graph_optimizer must be one of {GRAPH_OPTIMIZERS}, got {graph_optimizer!r}")
    return graph_optimizer


def example_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    """``example_inputs`` (a tensor, or a non-empty tuple/list of tensors) as a tuple."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise ExportError(
            f"example_inputs must be a tensor or a tuple of tensors (N, C, *), got {type(example_inputs).__name__}"
        )
    return tuple(inputs)


#: Traced graphs of at least this many nodes draw :func:`run_dynamo_export`'s warning that the full optimizer may take
#: minutes (the training export of MobileNetV3-Large traces to 18,920 nodes: 177 s full, 49 s fold; ResNet-18's
#: 8,424: 43 s, 20 s; benchmarks/RESULTS.md, "Training export time per graph optimizer").
LARGE_GRAPH_NODES = 10_000


def run_dynamo_export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    opset: int,
    dynamic_shapes: Any,
    explain: Callable[[Exception], str],
    graph_optimizer: str = "full",
    lighter_optimizer_hint: str | None = None,
    **options: Any,
) -> torch.onnx.ONNXProgram:
    """``torch.onnx.export(dynamo=True, optimize=False)``, then :data:`GRAPH_OPTIMIZERS` ``graph_optimizer`` on its
    program (``"full"``: ``ONNXProgram.optimize()``, what ``optimize=True`` runs; ``"fold"``: onnxscript's
    ``fold_constants`` and ``remove_unused_nodes``); an exporter failure becomes ExportError(explain(error)).

    lighter_optimizer_hint: where given, a ``"full"`` optimization of a traced graph of :data:`LARGE_GRAPH_NODES`
    or more nodes is preceded by a warning that it may take minutes, ending with this hint (how to ask for a
    lighter one). bkn_export's own errors pass through unchanged. Callers validate ``graph_optimizer`` first
    (:func:`resolve_graph_optimizer`, before any work).
    """
    assert graph_optimizer in GRAPH_OPTIMIZERS, graph_optimizer
    try:
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            optimize=False,
            verbose=False,
            **options,
        )
        if program is not None:
            _optimize(program, graph_optimizer, lighter_optimizer_hint)
    except BKNError:
        raise
    except Exception as error:  # the exporter raises (and wraps model errors in) many types
        raise ExportError(explain(error)) from error
    assert program is not None
    return program


def check_model(proto: onnx.ModelProto, label: str) -> None:
    """onnx.checker with full_check (strict shape inference), as :class:`ExportError` naming ``label``.

    Models of 2 GiB or more cannot be checked in memory (protobuf's limit) and are skipped.
    """
    if proto.ByteSize() >= 2**31 - 1:
        return
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        hint = ""
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if "unsupported type: tensor(bfloat16)" in str(error) and opset is not None and opset < 22:
            hint = (
                "; ONNX defines bfloat16 for Conv and its neighbours from opset 22 on: export with opset=23 "
                f"(this file: {opset})"
            )
        raise ExportError(f"{label} fails onnx.checker: {error}{hint}") from error


def _optimize(program: torch.onnx.ONNXProgram, graph_optimizer: str, lighter_optimizer_hint: str | None) -> None:
    """:func:`run_dynamo_export`'s optimizer step, in place on ``program.model``."""
    if graph_optimizer == "full":
        nodes = program.model.graph.num_nodes()
        if lighter_optimizer_hint is not None and nodes >= LARGE_GRAPH_NODES:
            warnings.warn(
                f"the traced graph has {nodes:,} nodes: onnxscript's full optimizer may take minutes on it "
                f"(MONAI's DenseNet-121, 38,383 nodes: 512 s, against 88 s with constant folding only); "
                f"{lighter_optimizer_hint}",
                stacklevel=4,
            )
        program.optimize()
    elif graph_optimizer == "fold":
        import onnxscript.optimizer

        onnxscript.optimizer.fold_constants(program.model)
        onnxscript.optimizer.remove_unused_nodes(program.model)
