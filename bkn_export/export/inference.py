"""Inference export: the eval-mode computation, with every BKN folded where it can be.

Pipeline (each step its own function)::

    check_inference_ready          running statistics finite, variances ≥ 0, layers exportable
    torch.onnx.export(dynamo=True) eval mode, no grad; its optimizer already folds
                                   BatchNormalization into a preceding Conv/ConvTranspose/Gemm
    apply_fold_rules               our rules (export/rules.py) fold what is left that can be
    unfolded_normalizations        the guarantee: no normalization after a foldable op, else FoldError
    build_fold_report + metadata   module -> node, written into metadata_props as JSON
    onnx.checker (full_check)      then an atomic write (export/io.py)

Where nothing can absorb a BKN (after an Add, a ReLU, a graph input, or an op whose
output is also used elsewhere) it stays one ``BatchNormalization`` node in inference
mode: one read and one write of the tensor, with a fused kernel in ONNX Runtime and a
scale layer in TensorRT, which is cheaper than the equivalent ``Mul`` + ``Add`` (two passes).

``fp16=True`` folds in float32 on the PyTorch side (:func:`bkn_export.fold`), converts
the folded copy to float16 and exports that, so the weights are rounded once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from torch import Tensor, nn

import bkn_export
from bkn_export.errors import BKNError, ExportError, FoldError
from bkn_export.export.checks import check_inference_ready
from bkn_export.export.fold import fold
from bkn_export.export.io import DEFAULT_EXTERNAL_DATA_THRESHOLD, check_writable, save_model_atomic
from bkn_export.export.metadata import FOLD_KINDS, attach_metadata, build_fold_report, fold_report_json, node_scopes
from bkn_export.export.op_spec import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from bkn_export.export.result import ExportResult, FoldRecord
from bkn_export.export.rules import Leftover, apply_fold_rules, unfolded_normalizations

__all__ = ["DEFAULT_OPSET", "FP16_TOLERANCE", "eval_mode", "export_inference", "resolve_opset"]

#: Default ONNX opset: what torch 2.13's dynamo exporter emits natively.

#: fp16 export parity bound against the float32 PyTorch eval output y:
#: |y_fp16 - y| <= FP16_TOLERANCE * (1 + |y|) elementwise (float16 has an 11-bit significand, ~4.9e-4 per rounding).
FP16_TOLERANCE = 1e-2

_log = logging.getLogger(__name__)


def resolve_opset(opset: int | None) -> int:
    """``opset`` or :data:`DEFAULT_OPSET`; raises :class:`ExportError` outside MIN_OPSET..MAX_OPSET."""
    chosen = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= chosen <= MAX_OPSET:
        raise ExportError(
            f"opset {chosen} is not supported: choose {MIN_OPSET}..{MAX_OPSET} (the dynamo exporter needs >= "
            f"{MIN_OPSET}; {MAX_OPSET} is the newest the tested stack emits)"
        )
    return chosen


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _as_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise ExportError("example_inputs must be a tensor or a tuple of tensors (N, C, *)")
    return tuple(inputs)


def _tracing_inputs(inputs: tuple[Tensor, ...], dynamic_batch: bool) -> tuple[Tensor, ...]:
    """A batch of 1 would be specialized by torch.export; trace a dynamic batch with 2 rows."""
    if dynamic_batch:
        return tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)
    return inputs


def _dynamic_shapes(inputs: tuple[Tensor, ...], dynamic_batch: bool, dynamic_spatial: bool) -> Any:
    if not (dynamic_batch or dynamic_spatial):
        return None
    batch = torch.export.Dim("batch")
    shapes = []
    for tensor in inputs:
        spec: dict[int, Any] = {}
        if dynamic_batch and tensor.dim() > 0:
            spec[0] = batch
        if dynamic_spatial:
            for dim in range(2, tensor.dim()):
                spec[dim] = torch.export.Dim.DYNAMIC
        shapes.append(spec or None)
    return tuple(shapes)


def _run_exporter(
    model: nn.Module, inputs: tuple[Tensor, ...], opset: int, dynamic_batch: bool, dynamic_spatial: bool
) -> ir.Model:
    dynamic_shapes = _dynamic_shapes(inputs, dynamic_batch, dynamic_spatial)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model,
                _tracing_inputs(inputs, dynamic_batch),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except BKNError:
        raise
    except Exception as error:  # the exporter raises many types; keep its message
        hint = " (drop dynamic_spatial / --dynamic-spatial if the model needs fixed spatial sizes)" * dynamic_spatial
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__} at opset {opset}{hint}: "
            f"{type(error).__name__}: {str(error)[:2000]}"
        ) from error
    assert program is not None
    return program.model


def _finish_graph(model: ir.Model) -> None:
    """Fold what the exporter left, drop dead values, name every node."""
    folds = apply_fold_rules(model)
    _log.debug("bkn_export fold rules applied %d time(s)", folds)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.NameFixPass()(model)


def _check_guarantee(model: ir.Model, normalization_names: list[str]) -> list[Leftover]:
    leftovers = unfolded_normalizations(model.graph)
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


def _records_for_torch_folds(model: ir.Model, torch_report: list[FoldRecord]) -> list[FoldRecord]:
    """fp16 path: a layer folded in PyTorch went into its host module; find the host's ONNX node."""
    records = []
    for record in torch_report:
        if record.target is None:
            continue
        node = next(
            (n for n in model.graph if n.op_type in FOLD_KINDS and record.target in node_scopes(n)),
            None,
        )
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
) -> ExportResult:
    """Export the eval-mode computation of ``model`` to ``path`` with BKN/BatchNorm folded.

    example_inputs: tensor or tuple of tensors (N, C, *) (any batch; values unused).
    dynamic_batch: dim 0 of every input is symbolic ("batch"); dynamic_spatial: dims
    2.. are symbolic too. fp16: float16 weights, inputs and outputs (see FP16_TOLERANCE).
    The model's (and each submodule's) train/eval mode is restored afterwards.

    Returns an :class:`ExportResult` whose ``fold_report`` has one record per
    normalization layer: kind "conv" | "conv_transpose" | "gemm" | "matmul" (folded into
    ``target``) or "standalone" (one BatchNormalization node ``target``, with the reason)
    or "unused". Raises :class:`InvalidStatisticsError`, :class:`UnsupportedLayerError`,
    :class:`FoldError` (the guarantee broke) or :class:`ExportError` (exporter / write).
    """
    opset = resolve_opset(opset)
    check_writable(path)  # fail before the (slow) export, not after
    inputs = _as_tuple(example_inputs)
    normalizations = [name for name, _ in check_inference_ready(model)]
    torch_report: list[FoldRecord] = []
    with eval_mode(model):
        if fp16:
            target, torch_report = _fp16_model(model, inputs)
            export_inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
        else:
            target, export_inputs = model, inputs
        graph_model = _run_exporter(target, export_inputs, opset, dynamic_batch, dynamic_spatial)
    _finish_graph(graph_model)
    leftovers = _check_guarantee(graph_model, normalizations)
    folded_in_torch = {record.module for record in torch_report if record.target is not None}
    report = _records_for_torch_folds(graph_model, torch_report) + build_fold_report(
        graph_model.graph, [n for n in normalizations if n not in folded_in_torch], leftovers
    )
    order = {name: index for index, name in enumerate(normalizations)}
    report.sort(key=lambda record: order.get(record.module, len(order)))
    proto = ir.serde.serialize_model(graph_model)
    metadata = attach_metadata(
        proto,
        {
            "version": bkn_export.__version__,
            "mode": "inference",
            "opset": str(opset),
            "fp16": str(bool(fp16)).lower(),
            "dynamic_batch": str(bool(dynamic_batch)).lower(),
            "dynamic_spatial": str(bool(dynamic_spatial)).lower(),
            "fold_report": fold_report_json(report),
        },
    )
    _check_model(proto, path)
    written = save_model_atomic(proto, path, external_data_threshold=external_data_threshold)
    return ExportResult(
        path=Path(written),
        opset=opset,
        mode="inference",
        fold_report=report,
        metadata=metadata,
        extra={"standalone": [leftover.node for leftover in leftovers], "fp16": fp16},
    )


def _fp16_model(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[nn.Module, list[FoldRecord]]:
    """Fold in float32 (PyTorch side) where fx can trace, then convert to float16."""
    try:
        folded, report = fold(model, inputs)
    except ExportError as error:  # untraceable: fold in the ONNX graph (in float16) instead
        _log.info("fp16 export: %s; folding in the ONNX graph instead", error)
        folded, report = copy.deepcopy(model).eval(), []
    return folded.half(), report


def _check_model(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """onnx.checker with full_check (strict shape inference); models over 2 GiB are checked by the writer's caller."""
    if proto.ByteSize() >= 2**31 - 1:
        return
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the inference export for {os.fspath(path)} fails onnx.checker: {error}") from error
