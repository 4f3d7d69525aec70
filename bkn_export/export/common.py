"""Pieces both exporters (inference and training) share: opset, example inputs, checker."""

from __future__ import annotations

import logging
import operator
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import Tensor

from bkn_export.errors import BKNError, ExportError, OptionError, StaticShapeNeededError
from bkn_export.export.op.op_spec import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

__all__ = [
    "GRAPH_OPTIMIZERS",
    "check_conv_biases",
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
            "example_inputs must be a tensor, a tuple of tensors (N, C, *) or a dict of them keyed by forward()'s "
            f"argument names, got {type(example_inputs).__name__}"
        )
    return tuple(inputs)


#: Traced graphs of at least this many nodes draw :func:`run_dynamo_export`'s warning that the full optimizer may take
#: minutes (the training export of MobileNetV3-Large traces to 18,920 nodes: 177 s full, 49 s fold; ResNet-18's
#: 8,424: 43 s, 20 s; benchmarks/RESULTS.md, "Training export time per graph optimizer").
LARGE_GRAPH_NODES = 10_000


#: The FutureWarning torch.export's decomposition raises on every export (copying its own pytree specs).
_LEAF_SPEC_NOTICE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"

#: Dynamo's notice, when the exporter retries a failed trace with it, that the forward wrote the chain's scratch slot
#: on the root's token (:mod:`bkn_export.chain.scope`: set and cleared within the traced call, by design), when that
#: slot is the only side effect it lists (torch 2.13 names it ``...['_bkn_chain_root']``, 2.11 ``..._bkn_chain_root``).
_CHAIN_SLOT_NOTICE = (
    r"While compiling, we found certain side effects happened in the model\.forward\. Here are the list of "
    r"potential sources you can double check: \[\"[^\",]*(?:\['_bkn_chain_root'\]|\._bkn_chain_root)\"\]$"
)


#: The terminal colour codes torch.onnx puts into its error messages.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def root_cause(error: BaseException) -> BaseException:
    """The last exception of ``error``'s chain of explicit causes (``raise ... from``)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def export_failure_cause(error: BaseException) -> str:
    """The root cause of an exporter failure in one line, without the exporter's colour codes and boilerplate, and
    the model code torch.export stopped at where its messages name it (" Raised at: <file, line> <source>")."""
    cause = root_cause(error)
    lines = _ANSI_ESCAPE.sub("", str(cause)).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}{_failing_call(error)}"


_BATCH_MISMATCH = re.compile(
    r"L\[(?P<first>[^.]+?)\]\.size\(\)\[0\] = (?P<m>\d+) is not equal to "
    r"L\[(?P<second>[^.]+?)\]\.size\(\)\[0\] = (?P<n>\d+)"
)


def _guarded_input(source: str) -> str:
    """An input as torch.export's guards name it: ``'x'`` (a forward argument) → "input 'x'"; ``'args'][1`` (the
    second of a wrapper's positional inputs) → "input 2"."""
    position = re.fullmatch(r"'args'\]\[(\d+)", source)
    return f"input {int(position[1]) + 1}" if position else f"input {source}"


def dynamic_shape_hint(error: BaseException) -> str:
    """What to do where a dynamic size made the export fail; "" where the root cause is not one of these:

    * an operator attribute that depends on a dynamic size (the root cause names a ``SymbolicTensor`` attribute:
      geffnet's CondConv folds the batch into the channels, ``groups = N · groups``);
    * inputs whose first axes differ (torch.export: "L['edge_index'].size()[0] = 2 is not equal to
      L['x'].size()[0] = 6"): a dynamic batch makes axis 0 of every input one size, which an input whose first
      axis is not the batch (a graph's edge indices) cannot follow."""
    cause = root_cause(error)
    text = str(cause)
    if "SymbolicTensor" in text and "attribute" in text.lower():
        return (
            ". An operator attribute depends on the input's batch (or spatial) size, which ONNX attributes cannot: "
            "e.g. a grouped conv with groups = batch × groups (CondConv). Export with a static batch "
            "(dynamic_batch=False, --static-batch) and without dynamic_spatial"
        )
    mismatch = _BATCH_MISMATCH.search(text)
    if mismatch:
        return (
            f". A dynamic batch makes axis 0 of every input one batch size, but {_guarded_input(mismatch['first'])} "
            f"has {mismatch['m']} there and {_guarded_input(mismatch['second'])} {mismatch['n']}: an input whose "
            "first axis is not the batch (edge indices, a fixed table) cannot follow it. Export with a static batch "
            "(dynamic_batch=False, --static-batch)"
        )
    return ""


def _failing_call(error: BaseException) -> str:
    """The model code torch.export stopped at ("The following call raised this error:" and the file, line and
    source it names), from the exporter's messages along the chain of causes; "" where none names one."""
    marker = "The following call raised this error:"
    current: BaseException | None = error
    while current is not None:
        text = _ANSI_ESCAPE.sub("", str(current))
        if marker in text:
            lines = [line for line in text.split(marker, 1)[1].splitlines() if line.strip()][:2]
            if lines:
                return " Raised at: " + " ".join(line.strip() for line in lines)
        current = current.__cause__
    return ""


def _without_torchvision_notices(record: logging.LogRecord) -> bool:
    """Drop the exporter's "torchvision is not installed. Skipping torchvision::nms" lines (one per torchvision op,
    printed on every first export in a process): BKN models need none of those ops; every other record passes."""
    return "torchvision is not installed" not in record.getMessage()


def _without_guard_tracebacks(record: logging.LogRecord) -> bool:
    """Drop torch's "Error while creating guard" / "Created at" logs (about 30 lines of internal traceback on
    stderr, printed before the exception that the export reports in one line, its cause included)."""
    message = record.getMessage()
    return not message.startswith(("Error while creating guard", "Created at:"))


#: torch loggers whose records :func:`_without_guard_tracebacks` filters during an export.
_GUARD_LOGGERS = ("torch._guards",)


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

    Then, in every form, a Conv / ConvTranspose bias that is provably all zeros and not a 1-D parameter is removed
    (:func:`_drop_zero_conv_biases`: exact), and :func:`check_conv_biases` refuses any constant bias left that is
    not of shape ``(C_out,)``, before anything is written.

    lighter_optimizer_hint: where given, a ``"full"`` optimization of a traced graph of :data:`LARGE_GRAPH_NODES`
    or more nodes is preceded by a warning that it may take minutes, ending with this hint (how to ask for a
    lighter one). bkn_export's own errors pass through unchanged. Callers validate ``graph_optimizer`` first
    (:func:`resolve_graph_optimizer`, before any work).
    """
    assert graph_optimizer in GRAPH_OPTIMIZERS, graph_optimizer
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(_without_torchvision_notices)
    for name in _GUARD_LOGGERS:
        logging.getLogger(name).addFilter(_without_guard_tracebacks)
    try:
        with warnings.catch_warnings():
            # torch.export's own deep copy of its pytree specs (torch 2.13): nothing a caller can change.
            warnings.filterwarnings("ignore", message=_LEAF_SPEC_NOTICE, category=FutureWarning)
            warnings.filterwarnings("ignore", message=_CHAIN_SLOT_NOTICE, category=UserWarning)
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
        kind = StaticShapeNeededError if dynamic_shape_hint(error) else ExportError
        raise kind(explain(error)) from error
    finally:
        registration.removeFilter(_without_torchvision_notices)
        for name in _GUARD_LOGGERS:
            logging.getLogger(name).removeFilter(_without_guard_tracebacks)
    assert program is not None
    if options.get("output_names") is not None:
        _name_outputs(program.model.graph, list(options["output_names"]))
    if options.get("input_names") is not None:
        _keep_input_names(program.model.graph, list(options["input_names"]))
    _drop_zero_conv_biases(program.model)
    check_conv_biases(program.model)
    return program


def _name_outputs(graph: ir.Graph, names: list[str]) -> None:
    """Give graph output i the name ``names[i]``, an Identity node in front of every repeat of a value.

    A model that returns one tensor at two positions (MONAI's VarAutoEncoder in eval mode returns ``mu`` as ``z``
    too) gets one value for both; the exporter names it twice, so the first position took the last name and the
    repeat a name of its own (``[recon, z, logvar, z_alias_3]`` for ``[recon, mu, logvar, z]``): a runtime asked
    for ``mu`` had no such output."""
    if len(names) != len(graph.outputs):
        return
    seen: set[ir.Value] = set()
    for index, value in enumerate(graph.outputs):
        if value in seen or value.is_graph_input():
            identity = ir.node("Identity", inputs=[value])
            copy = identity.outputs[0]
            copy.shape, copy.type = value.shape, value.type
            graph.append(identity)
            graph.outputs[index] = value = copy
        seen.add(value)
    wanted = set(names)
    taken = {v.name for node in graph for v in node.outputs} | {v.name for v in graph.inputs}
    outputs = set(graph.outputs)
    clash = [n for n in wanted if n in taken and not any(v.name == n for v in outputs)]
    if clash:
        raise ExportError(f"output names {sorted(clash)} are already the names of other values in the graph")
    for index, value in enumerate(graph.outputs):  # two passes: a wanted name may be held by another output
        value.name = f"__bkn_output_{index}"
    for value, name in zip(graph.outputs, names):
        value.name = name


def _keep_input_names(graph: ir.Graph, names: list[str]) -> None:
    """Give graph input i the name ``names[i]`` again where the exporter renamed it: an input the model also
    returns (``forward(x, y) -> (f(x), y)``) became ``output_1_orig`` behind an Identity named for the output, so
    the file could not be fed by ``forward()``'s names."""
    taken = {v.name for node in graph for v in node.outputs} | {v.name for v in graph.inputs}
    for value, name in zip(graph.inputs, names):
        if value.name != name and name not in taken:
            taken.discard(value.name)
            value.name = name
            taken.add(name)


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
    """:func:`run_dynamo_export`'s optimizer step, in place on ``program.model``: onnxscript's optimizer, then (with
    either optimizer) the exact rewrites of :mod:`bkn_export.export.speed_rules` (a single-slope ``PRelu`` as
    ``LeakyRelu``)."""
    import onnxscript.optimizer

    from bkn_export.export.speed_rules import apply_speed_rules

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
        onnxscript.optimizer.fold_constants(program.model)
        onnxscript.optimizer.remove_unused_nodes(program.model)
    if graph_optimizer != "none":
        rewrites = apply_speed_rules(program.model)
        if rewrites:
            onnxscript.optimizer.remove_unused_nodes(program.model)


# --------------------------------------------------------------------------- Conv biases

#: The ops whose optional third input is a bias of shape (C_out,).
_CONVOLUTIONS = ("Conv", "ConvTranspose")
#: Ops whose output is all zeros when their first (data) input is.
_ZERO_PRESERVING = ("Cast", "CastLike", "Expand")


def _conv_biases(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    """(node, bias) of every Conv / ConvTranspose with a bias, in the main graph, its subgraphs and the model's
    functions."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return [
        (node, node.inputs[2])
        for node in nodes
        if node.op_type in _CONVOLUTIONS
        and node.domain in ("", "ai.onnx")
        and len(node.inputs) >= 3
        and node.inputs[2] is not None
    ]


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor ``value`` always holds (an initializer that is not also a graph input, which a caller could
    override, or a Constant node's output), else None."""
    if value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node: not provably anything
        return None


def _provably_zero(value: ir.Value | None) -> bool:
    """Whether ``value`` is all zeros whatever the inputs: a zero constant, possibly through Cast / CastLike /
    Expand (which keep a zero tensor zero)."""
    while value is not None:
        tensor = _constant(value)
        if tensor is not None:
            return not np.any(tensor.numpy())
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _ZERO_PRESERVING:
            return False
        value = node.inputs[0] if node.inputs else None
    return False


def _drop_zero_conv_biases(model: ir.Model) -> int:
    """Remove the bias input of every Conv / ConvTranspose whose bias is provably all zeros, unless it is a 1-D
    initializer (a parameter of the model, e.g. a zero-initialised bias, which a reader may look up by name); then
    remove what only fed it. Returns how many biases were removed.

    Exact: ``conv(x, w) + 0 == conv(x, w)``. Needed because onnxscript's ``aten_conv3d`` (torch.onnx's translation
    of a bias-free Conv3d, up to at least onnxscript 0.7.2; microsoft/onnxscript#2931, fix proposed in #2935)
    stands in a zero bias of shape ``(C_out, 2)``, copied from its complex variant: ONNX Runtime, the reference
    evaluator and OpenVINO refuse the Conv ("bias must be a 1D tensor of size output_channels") while onnx.checker
    passes it. The full optimizer leaves no such bias; ``"fold"`` folds it into a 2-D zero initializer, ``"none"``
    keeps the ``Expand(CastLike(0, x), Concat(Shape(w)[:1], [2]))`` chain.
    """
    removed = 0
    for node, bias in _conv_biases(model):
        if not _provably_zero(bias) or (bias.is_initializer() and len(_static_dims(bias) or ()) == 1):
            continue
        node.resize_inputs(2)
        _remove_if_dead(bias)
        removed += 1
    return removed


def _remove_if_dead(value: ir.Value) -> None:
    """Remove ``value``'s producer (or initializer) if nothing uses it any more, then its inputs in turn: only
    what a removed bias leaves behind, so ``graph_optimizer="none"`` keeps the rest of the graph as traced."""
    pending = [value]
    while pending:
        value = pending.pop()
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        node = value.producer()
        if node is None:
            if value.is_initializer() and value.graph is not None and value.name is not None:
                value.graph.initializers.pop(value.name)
            continue
        if any(output.uses() or output.is_graph_output() for output in node.outputs) or node.graph is None:
            continue
        inputs = [v for v in node.inputs if v is not None]
        node.graph.remove(node, safe=True)
        pending.extend(inputs)


def _static_dims(value: ir.Value) -> tuple[int, ...] | None:
    """``value``'s shape if every dimension is a known integer (a constant's, else the traced shape), else None."""
    tensor = _constant(value)
    shape = tensor.shape if tensor is not None else value.shape
    if shape is None:
        return None
    dims = tuple(dim for dim in shape if isinstance(dim, int))
    return dims if len(dims) == len(shape) else None


def check_conv_biases(model: ir.Model) -> None:
    """Refuse a Conv / ConvTranspose whose bias is a constant not of shape ``(C_out,)`` (Conv: ``W.shape[0]``;
    ConvTranspose: ``W.shape[1] * group``), as :class:`ExportError` naming the node and the shapes.

    onnx.checker does not look at a bias's shape, but every runtime refuses such a Conv; raised before the file
    is written. Where the weight's shape is not static only the bias's rank is checked.
    """
    for node, bias in _conv_biases(model):
        if _constant(bias) is None:
            continue
        weight = node.inputs[1]
        bias_dims = _static_dims(bias)
        weight_dims = _static_dims(weight) if weight is not None else None
        out_channels: int | None = None
        if weight_dims is not None and len(weight_dims) >= 2:
            group = node.attributes.get_int("group", 1)
            out_channels = weight_dims[0] if node.op_type == "Conv" else weight_dims[1] * group
        if bias_dims is not None and len(bias_dims) == 1 and out_channels in (None, bias_dims[0]):
            continue
        wanted = f"[{out_channels}]" if out_channels is not None else "1-D"
        raise ExportError(
            f"{node.op_type} node {node.name!r}: its bias {bias.name!r} has shape "
            f"{list(bias_dims) if bias_dims is not None else 'unknown'} (weight "
            f"{list(weight_dims) if weight_dims is not None else 'unknown'}), but ONNX needs a bias of shape {wanted} "
            "(C_out): ONNX Runtime, OpenVINO and the reference evaluator would refuse the node, so the file was not "
            "written. The exporter made this bias: report the model with the torch and onnxscript versions"
        )
