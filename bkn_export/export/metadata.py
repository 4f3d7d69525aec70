"""Provenance of ONNX nodes and the metadata an inference export writes into the file.

The dynamo exporter records, on every node, the PyTorch module scopes it came from
(``pkg.torch.onnx.name_scopes``, e.g. ``['', 'block1', 'block1.norm1', 'op']``; older
versions only ``namespace``). A fold keeps the normalization's metadata on the node
that absorbed it, so a node carrying a normalization layer's scope is where that layer
went: a Conv/ConvTranspose/Gemm/MatMul (folded) or a BatchNormalization (standalone).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict

import onnx
import onnx_ir as ir
from torch import Tensor

from bkn_export._version import package_version
from bkn_export.export.name_scopes import NAME_SCOPES_KEY, read_name_scopes
from bkn_export.export.result import FoldRecord
from bkn_export.export.rules import FOLD_RULE_TAG, NORMALIZATION_OP_TYPES, Leftover

__all__ = [
    "FOLD_KINDS",
    "METADATA_PREFIX",
    "attach_metadata",
    "build_fold_report",
    "example_shapes_entry",
    "export_metadata",
    "fold_report_json",
    "node_scopes",
    "output_order_entry",
    "parse_name_scopes",
    "read_metadata",
]

METADATA_PREFIX = "bkn_export."
#: ONNX op type of the absorbing node -> FoldRecord.kind
FOLD_KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "gemm", "MatMul": "matmul"}
_RULE_KEYS = (FOLD_RULE_TAG, "pkg.onnxscript.rewriter.rule_name")


def parse_name_scopes(text: str | None) -> list[str] | None:
    """The list in a ``pkg.torch.onnx.name_scopes`` value ('' entries dropped).

    None when the value is absent or not a list; [] when it cannot be parsed.
    """
    scopes = read_name_scopes(text)
    return None if scopes is None else [s for s in scopes if s]


def node_scopes(node: ir.Node) -> list[str]:
    """The PyTorch module names a node came from, outermost first ('' for the root omitted)."""
    scopes = parse_name_scopes(node.metadata_props.get(NAME_SCOPES_KEY))
    if scopes is not None:
        return scopes
    namespace = node.metadata_props.get("namespace", "")
    # ": pkg.Model/block1: pkg.Block/block1.norm1: pkg.BKN/op: aten..." -> names before ':'
    return [part.split(":")[0].strip() for part in namespace.split("/") if part.split(":")[0].strip()]


def _owner(node: ir.Node, modules: Mapping[str, str]) -> str | None:
    """The innermost normalization module among the node's scopes, if any, by the name ``modules`` maps it to."""
    for scope in reversed(node_scopes(node)):
        if scope in modules:
            return modules[scope]
    return None


def build_fold_report(
    graph: ir.Graph,
    modules: Iterable[str],
    leftovers: Iterable[Leftover],
    aliases: Mapping[str, str] | None = None,
    feeds: Mapping[str, str] | None = None,
) -> list[FoldRecord]:
    """One record per normalization layer (per call, if called more than once).

    modules: names of the model's normalization layers. aliases: another name of such a layer (a module
    registered under two names: the exporter scopes its nodes by the name the forward reached it through) →
    its name in ``modules``. feeds: a layer → the layer whose normalization reads its output directly (the traced
    program's Conv → BN → BN; :func:`bkn_export.export.inference`'s ``_normalization_feeds``): the exporter's
    optimizer folds both into the Conv, whose node then carries the second layer's scope alone, so the first is
    reported with the node its successor went into. A layer with no node in the graph otherwise is reported
    with kind "unused" (its forward never ran on the example inputs).
    """
    names = list(modules)
    wanted = {**{alias: name for alias, name in (aliases or {}).items() if name in names}, **{n: n for n in names}}
    reasons = {leftover.node: leftover.reason for leftover in leftovers}
    found: dict[str, list[FoldRecord]] = {name: [] for name in names}
    for node in graph.all_nodes():
        owner = _owner(node, wanted)
        if owner is None:
            continue
        rule = next((node.metadata_props[k] for k in _RULE_KEYS if node.metadata_props.get(k)), "")
        if node.op_type in NORMALIZATION_OP_TYPES:
            detail = f"standalone {node.op_type}: " + reasons.get(node.name or "", "not folded")
            found[owner].append(FoldRecord(owner, node.name, "standalone", detail))
        elif node.op_type in FOLD_KINDS:
            detail = f"folded into {node.op_type}" + (f" by {rule}" if rule else "")
            found[owner].append(FoldRecord(owner, node.name, FOLD_KINDS[node.op_type], detail))
    report: list[FoldRecord] = []
    for name in names:
        report.extend(found[name] or _merged_records(name, found, feeds or {}))
    return report


def _merged_records(name: str, found: Mapping[str, list[FoldRecord]], feeds: Mapping[str, str]) -> list[FoldRecord]:
    """The records of a layer with no node of its own: those of the first layer after it in ``feeds`` that has
    a node (its normalization went into the same node), else one "unused" record."""
    after = successor = feeds.get(name)
    seen = {name}
    while successor is not None and successor not in seen:
        records = found.get(successor)
        if records:
            note = f" (merged with the normalization after it, '{after}')"
            return [FoldRecord(name, r.target, r.kind, r.detail + note) for r in records]
        seen.add(successor)
        successor = feeds.get(successor)
    return [FoldRecord(name, None, "unused", "no node in the exported graph")]


def fold_report_json(report: Iterable[FoldRecord]) -> str:
    return json.dumps([asdict(record) for record in report], sort_keys=True)


def export_metadata(mode: str, opset: int, fp16: bool, dynamic_batch: bool, dynamic_spatial: bool) -> dict[str, str]:
    """The metadata entries every export writes (each mode adds its own)."""
    return {
        "version": package_version(),
        "mode": mode,
        "opset": str(opset),
        "fp16": str(bool(fp16)).lower(),
        "dynamic_batch": str(bool(dynamic_batch)).lower(),
        "dynamic_spatial": str(bool(dynamic_spatial)).lower(),
    }


#: Metadata key (after :data:`METADATA_PREFIX`) of the graph outputs' names in the order the PyTorch model
#: returns its tensors (then the file's own extras: running statistics, posteriors), as written at export; a
#: JSON list. ``runtime`` pairs the model's outputs with the file's by it, so a graph tool that reorders
#: outputs afterwards does not mispair them.
OUTPUT_ORDER_KEY = "output_order"


def output_order_entry(model: onnx.ModelProto) -> dict[str, str]:
    """``{OUTPUT_ORDER_KEY: JSON list}`` of ``model``'s graph outputs as they stand (call right after the export,
    whose outputs follow the PyTorch model's flattened tensor outputs)."""
    return {OUTPUT_ORDER_KEY: json.dumps([output.name for output in model.graph.output])}


#: Metadata key (after :data:`METADATA_PREFIX`) of the example inputs' shapes the file was exported at, keyed by
#: graph input name; a JSON object of lists of ints. ``runtime`` gives a symbolic dim other than the batch the
#: example's size by default (a dynamic-spatial file otherwise runs at size 1 there, where most networks compute
#: little).
EXAMPLE_SHAPES_KEY = "example_shapes"


def example_shapes_entry(names: Sequence[str], inputs: Sequence[Tensor]) -> dict[str, str]:
    """``{EXAMPLE_SHAPES_KEY: JSON object}``: each example input's shape under its graph input name (the first
    ``len(inputs)`` of ``names``; tensors only)."""
    shapes = {name: list(tensor.shape) for name, tensor in zip(names, inputs) if isinstance(tensor, Tensor)}
    return {EXAMPLE_SHAPES_KEY: json.dumps(shapes)}


def attach_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> dict[str, str]:
    """Set ``bkn_export.<key>`` metadata_props on ``model`` (replacing earlier values); returns them."""
    written = {METADATA_PREFIX + key: value for key, value in entries.items()}
    kept = [prop for prop in model.metadata_props if prop.key not in written]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in written.items():
        model.metadata_props.add(key=key, value=value)
    return written


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ``bkn_export.*`` metadata_props of ``model``, prefix removed."""
    return {
        prop.key[len(METADATA_PREFIX) :]: prop.value
        for prop in model.metadata_props
        if prop.key.startswith(METADATA_PREFIX)
    }
