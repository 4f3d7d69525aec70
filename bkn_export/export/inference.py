"""Inference export: the eval-mode computation, with every BKN folded where it can be.

The steps of the shared pipeline (:mod:`bkn_export.export.pipeline`), with this mode's own::

    validate_request               opset, names, threshold, path (before anything slow)
    check_inference_ready          running statistics finite, variances ≥ 0, layers exportable
    check_finite_parameters        no NaN/Inf weight (named)
    trace                          eval mode, no grad, torch.onnx.export(dynamo=True); its
                                   optimizer already folds BatchNormalization into a preceding
                                   Conv/ConvTranspose/Gemm
    apply_fold_rules               our rules (export/rules.py) fold what is left that can be
    _check_guarantee               no normalization left that a rule matches, else FoldError
    build_fold_report + metadata   module -> node, written into metadata_props as JSON
    check_model (+ dynamic sizes)  onnx.checker full_check; verify_dynamic_spatial
    save_onnx                      the atomic write (export/io.py)

Where nothing can absorb a BKN (after an Add, a ReLU, a graph input, or an op whose
output is also used elsewhere) it stays one ``BatchNormalization`` node in inference
mode: one read and one write of the tensor, with a fused kernel in ONNX Runtime and a
scale layer in TensorRT, which is cheaper than the equivalent ``Mul`` + ``Add`` (two passes).

``fp16=True`` folds in float32 on the PyTorch side (:func:`bkn_export.fold`), converts
the folded copy to float16 and exports that, so the weights are rounded once.
"""

from __future__ import annotations

import logging
import operator
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from torch import Tensor, nn

from bkn_export.copying import copy_module
from bkn_export.errors import ExportError, FoldError
from bkn_export.export.checks import check_inference_ready, normalization_aliases
from bkn_export.export.common import dynamic_shape_hint, export_failure_cause, resolve_opset
from bkn_export.export.fold import fold
from bkn_export.export.io import DEFAULT_EXTERNAL_DATA_THRESHOLD, save_onnx
from bkn_export.export.metadata import (
    FOLD_KINDS,
    attach_metadata,
    build_fold_report,
    example_shapes_entry,
    export_metadata,
    fold_report_json,
    node_scopes,
    output_order_entry,
)
from bkn_export.export.op.op_spec import DEFAULT_OPSET
from bkn_export.export.pipeline import (
    Traceable,
    check_exported,
    check_finite_parameters,
    trace,
    validate_request,
)
from bkn_export.export.result import ExportResult, FoldRecord
from bkn_export.export.rules import Leftover, apply_fold_rules, unfolded_normalizations
from bkn_export.module_modes import copied, eval_mode

__all__ = ["DEFAULT_OPSET", "FP16_TOLERANCE", "eval_mode", "export_inference", "resolve_opset"]

#: fp16 export parity bound against the float32 PyTorch eval output y:
#: |y_fp16 - y| <= FP16_TOLERANCE * (1 + |y|) elementwise (float16 has an 11-bit significand, ~4.9e-4 per rounding).
FP16_TOLERANCE = 1e-2

_log = logging.getLogger(__name__)


def _explain(model: nn.Module, opset: int, dynamic_spatial: bool) -> Callable[[Exception], str]:
    hint = " (drop dynamic_spatial / --dynamic-spatial if the model needs fixed spatial sizes)" * dynamic_spatial

    def explain(error: Exception) -> str:  # the exporter's root cause
        return f"torch.onnx.export failed for {type(model).__name__} at opset {opset}{hint}. Cause: " + (
            export_failure_cause(error) + dynamic_shape_hint(error)
        )

    return explain


def _finish_graph(model: ir.Model) -> None:
    """Fold what the exporter left, store folded weights in their data's dtype, drop dead values, name every
    node."""
    folds = apply_fold_rules(model)
    _log.debug("bkn_export fold rules applied %d time(s)", folds)
    _weights_in_data_dtype(model.graph)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.NameFixPass()(model)


def _weights_in_data_dtype(graph: ir.Graph) -> None:
    """Round a folded Conv / ConvTranspose / Gemm weight or bias that is not in its input's dtype into it.

    onnxscript's ``FuseBatchNormIntoConv`` (the exporter's optimizer, before our rules) multiplies a bfloat16
    weight by a float32 scale and stores the float32 product, which ``onnx.checker`` refuses ("W has
    inconsistent type"); rounded once into bfloat16, it is what our own rules store."""
    for node in graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.inputs[0] is None:
            continue
        data_type = node.inputs[0].dtype
        if data_type not in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16):
            continue
        for index, value in enumerate(node.inputs[1:3], start=1):
            if value is None or value.const_value is None or value.is_graph_input():
                continue
            tensor = value.const_value
            if tensor.dtype == data_type:
                continue
            rounded = ir.Value(
                name=f"{value.name}.{data_type.name.lower()}",
                type=ir.TensorType(data_type),
                shape=value.shape,
                const_value=ir.tensor(tensor.numpy().astype(data_type.numpy())),
            )
            graph.register_initializer(rounded)
            node.replace_input_with(index, rounded)


def _check_guarantee(model: ir.Model, normalization_names: list[str]) -> list[Leftover]:
    leftovers = unfolded_normalizations(model)
    broken = [leftover for leftover in leftovers if leftover.foldable]
    if broken:
        node_owner = {node.name: node_scopes(node) for node in model.graph}
        lines = "; ".join(f"node '{b.node}' (from {node_owner.get(b.node)}): {b.reason}" for b in broken)
        raise FoldError(
            f"inference export left normalization(s) after a foldable op: {lines}. This is a bug in "
            "bkn_export's fold rules; please report it with the model. Known normalization layers: "
            f"{normalization_names}"
        )
    return leftovers


#: The traced program's eval-mode normalization ops (what BatchNorm and BKN layers trace to).
_NORMALIZATION_TARGETS = ("_native_batch_norm_legit_no_training", "batch_norm", "native_batch_norm")


def _is_normalization(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in _NORMALIZATION_TARGETS


def _normalization_module(node: torch.fx.Node, names: set[str]) -> str | None:
    """The innermost module of ``names`` a traced node came from (its ``nn_module_stack``), if any."""
    stack = node.meta.get("nn_module_stack") or {}
    return next((path for path, _ in reversed(list(stack.values())) if path in names), None)


def _normalization_feeds(program: torch.onnx.ONNXProgram, names: Sequence[str]) -> dict[str, str]:
    """Layer → the layer whose normalization op reads its normalization's output directly (through the op's
    ``getitem`` only), from the traced program: Conv → BN → BN, which the exporter's optimizer folds into one
    Conv node scoped to the second layer alone (:func:`~bkn_export.export.metadata.build_fold_report`)."""
    exported = getattr(program, "exported_program", None)
    if exported is None:
        return {}
    wanted, feeds = set(names), {}
    for node in exported.graph.nodes:
        if not _is_normalization(node):
            continue
        reader = _normalization_module(node, wanted)
        source = node.args[0] if node.args else None
        while isinstance(source, torch.fx.Node) and source.target is operator.getitem:
            source = source.args[0]
        if reader is None or not isinstance(source, torch.fx.Node) or not _is_normalization(source):
            continue
        writer = _normalization_module(source, wanted)
        if writer is not None and writer != reader:
            feeds[writer] = reader
    return feeds


def _records_for_torch_folds(model: ir.Model, torch_report: list[FoldRecord]) -> list[FoldRecord]:
    """fp16 path: a layer folded in PyTorch went into its host module; find the host's ONNX node."""
    hosts = [(n, node_scopes(n)) for n in model.graph if n.op_type in FOLD_KINDS]
    records = []
    for record in torch_report:
        if record.target is None:
            continue
        node = next((n for n, scopes in hosts if record.target in scopes), None)
        kind = FOLD_KINDS[node.op_type] if node is not None else record.kind
        records.append(
            FoldRecord(record.module, node.name if node is not None else None, kind, f"{record.detail} (in PyTorch)")
        )
    return records


def export_inference(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    fp16: bool = False,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export the eval-mode computation of ``model`` to ``path`` with BKN/BatchNorm folded.

    example_inputs: tensor or tuple of tensors (N, C, *) (any batch; values unused).
    dynamic_batch: dim 0 of every input is symbolic ("batch"); dynamic_spatial: dims
    2.. are symbolic too, verified by running the file at two other sizes
    (:func:`~bkn_export.export.pipeline.verify_dynamic_spatial`). fp16: float16 weights,
    inputs and outputs (see FP16_TOLERANCE). input_names / output_names: graph I/O names
    (default: forward()'s argument names; ``output`` or ``output_<i>``).
    The model's (and each submodule's) train/eval mode is restored afterwards.

    Returns an :class:`ExportResult` whose ``fold_report`` has one record per
    normalization layer: kind "conv" | "conv_transpose" | "gemm" | "matmul" (folded into
    ``target``) or "standalone" (one BatchNormalization node ``target``, with the reason)
    or "unused". Raises :class:`InvalidStatisticsError`, :class:`NonFiniteWeightsError`,
    :class:`UnsupportedLayerError`, :class:`FoldError` (the guarantee broke),
    :class:`ExportError` (exporter, checker, dynamic_spatial), :class:`OptionError` (opset,
    threshold, names) or :class:`OutputWriteError` (the path).
    """
    request = validate_request(
        example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial, fp16=fp16,
        external_data_threshold=external_data_threshold, input_names=input_names, output_names=output_names,
    )  # fmt: skip
    normalizations = [name for name, _ in check_inference_ready(model)]
    check_finite_parameters(model)
    torch_report: list[FoldRecord] = []
    explain = _explain(model, request.opset, request.dynamic_spatial)
    with eval_mode(model), torch.no_grad():
        if request.fp16:
            target, torch_report = _fp16_model(model, request.inputs)
            inputs = tuple(t.half() if t.is_floating_point() else t for t in request.inputs)
        else:
            target, inputs = model, request.inputs
        traceable = Traceable(module=target, model=model, inputs=inputs)
        traced = trace(traceable, request, explain)
        graph_model = traced.program.model
        _finish_graph(graph_model)
        leftovers = _check_guarantee(graph_model, normalizations)
        folded_in_torch = {record.module for record in torch_report if record.target is not None}
        report = _records_for_torch_folds(graph_model, torch_report) + build_fold_report(
            graph_model.graph,
            [n for n in normalizations if n not in folded_in_torch],
            leftovers,
            normalization_aliases(model),
            _normalization_feeds(traced.program, normalizations),
        )
        order = {name: index for index, name in enumerate(normalizations)}
        report.sort(key=lambda record: order.get(record.module, len(order)))
        proto = ir.serde.serialize_model(graph_model)
        metadata = attach_metadata(
            proto,
            {
                **export_metadata("inference", request.opset, request.fp16, request.dynamic_batch, dynamic_spatial),
                "fold_report": fold_report_json(report),
                **output_order_entry(proto),
                **example_shapes_entry(traced.input_names, request.inputs),
            },
        )
        checked_sizes = check_exported(proto, request, traceable, traced, f"the inference export for {os.fspath(path)}")
    written = save_onnx(proto, path, external_data_threshold=request.external_data_threshold)
    return ExportResult(
        path=Path(written),
        opset=request.opset,
        mode="inference",
        fold_report=report,
        metadata=metadata,
        extra={
            "standalone": [leftover.node for leftover in leftovers],
            "fp16": request.fp16,
            "dynamic_spatial_checked": checked_sizes,
        },
    )


def _fp16_model(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[nn.Module, list[FoldRecord]]:
    """Fold a float64 copy on the PyTorch side where fx can trace and the folded copy computes what the copy
    computes on the example inputs, then convert it to float16 (each weight rounded once); else fold in the ONNX
    graph (from what actually ran)."""
    wide = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    reference = copy_module(model).eval().double()
    try:
        folded, report = fold(reference, wide)
    except ExportError as error:  # untraceable: fold in the ONNX graph (in float16) instead
        _log.info("fp16 export: %s; folding in the ONNX graph instead", error)
        return copy_module(model).eval().half(), []
    difference = _fold_difference(reference, folded, wide)
    if difference is not None:
        warnings.warn(
            f"export_onnx(fp16=True): the PyTorch-side fold changed the model's output ({difference}); folding in "
            "the ONNX graph instead (from what the forward computes). Please report the model's structure.",
            stacklevel=4,
        )
        return copy_module(model).eval().half(), []
    return folded.half(), report


def _fold_difference(reference: nn.Module, folded: nn.Module, inputs: tuple[Tensor, ...]) -> str | None:
    """None when ``folded`` computes ``reference``'s eval function on ``inputs`` (both float64: to 1e-9 of the
    output's magnitude); else what differs, in words (also when the check cannot run)."""
    try:
        with torch.no_grad():
            # each forward on its own copy: a forward that changes its input in place would feed the other its result
            expected = _tensors(reference(*copied(inputs)))
            pairs = list(zip(expected, _tensors(folded(*copied(inputs))), strict=True))
    except Exception as error:  # a model that does not run in float64, an output structure that changed
        return f"the float64 check could not run: {type(error).__name__}: {error}"
    for index, (want, have) in enumerate(pairs):
        if not (want.is_floating_point() or want.is_complex()):  # bool / integer outputs (a mask, an argmax): exact
            if not torch.equal(want, have):
                return f"output {index}: {want.dtype} values differ"
            continue
        scale = float(want.abs().max()) if want.numel() else 0.0
        difference = float((have - want).abs().max()) if want.numel() else 0.0
        if not difference <= 1e-9 * max(scale, 1.0):
            return f"output {index}: max abs difference {difference:.3g} at magnitude {scale:.3g}"
    return None


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a forward's output (a tensor, or nested tuples / lists / dicts of them), in order."""
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, Tensor)]
