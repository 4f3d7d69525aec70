"""Graph rewrite rules that fold an eval-mode normalization into the op before it.

An eval-mode BKN (or BatchNorm) is the per-channel affine map (see
:func:`bkn_export.functional.inference_affine`)::

    y = a ⊙ x + s,    a = γ / sqrt(r_Σ + ε),    s = β − a r_μ          (a, s: (C,))

and the dynamo exporter lowers it to one ``BatchNormalization`` node. When the node
before it is linear in its input with constant weights, the map is absorbed there:

    Conv           W'[o, ...] = a[o] W[o, ...]                 b' = a b + s
    ConvTranspose  W'[i, j, ...] = a[g·C_out/G + j] W[i, j, ...] (group g of input i)
    Gemm           columns of op(B) scaled by a;              C' = a (β_gemm C) + s, β_gemm := 1
    MatMul(+Add)   W'[:, c] = a[c] W[:, c]  (W: (K, C))        b' = a b + s (an Add appears without a bias)
                   directly (rank-2 output) or through a Transpose whose perm[1] is the last axis

Each rule is a class in onnxscript's rewriter style: ``pattern`` (what to match),
``check`` (when folding is exact) and ``rewrite`` (the replacement); all rules are
registered in :data:`FOLD_RULES`. The math is :mod:`bkn_export.export.fold_math` (shared
with the PyTorch-side ``fold``), in float64, stored in the weight's dtype under new
initializer names, so a weight shared with another node is never changed under it. Each
replacement node carries the BatchNormalization's metadata (the PyTorch module it came
from) plus ``bkn_export.fold_rule`` so the fold report can name module and node.

"Can this normalization fold?" is decided once, by the rules: :func:`unfolded_normalizations`
asks each rule's own ``pattern`` + ``check`` at every normalization left in the graph and
reports its verdict (a rule that matches means the guarantee broke; otherwise the reason
is the failing rule's own ``check`` message, or that no rule's pattern fits).

Why Conv / ConvTranspose / Gemm rules are kept although onnxscript has
``_fuse_batchnorm`` (which the exporter's optimizer runs first): onnxscript 0.7 refuses
to fold into a weight shared by two nodes (its new initializer would reuse the shared
name), which ours fold under new names; and ``pyproject`` allows onnxscript >= 0.5,
whose fusions lack Gemm's ``beta`` and grouped ConvTranspose. The MatMul rules (a
``Linear`` on (N, L, C) transposed to (N, C, L), bias-free MatMuls) have no onnxscript
counterpart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.rewriter import pattern as orp

from bkn_export.export.fold_math import Layout, affine_of, folded_bias, folded_weight

if TYPE_CHECKING:  # the tracer's record type; onnxscript 0.7 does not re-export it from rewriter.pattern
    from onnxscript.rewriter._basics import MatchInfo

__all__ = [
    "FOLDABLE_OP_TYPES",
    "FOLD_RULES",
    "FOLD_RULE_TAG",
    "NORMALIZATION_OP_TYPES",
    "Leftover",
    "apply_fold_rules",
    "unfolded_normalizations",
]

#: metadata_props key set on every node a rule creates: the rule's name.
FOLD_RULE_TAG = "bkn_export.fold_rule"
#: Ops a rule can fold a following normalization into (with constant weights, output used once).
FOLDABLE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops that count as a normalization left in the graph.
NORMALIZATION_OP_TYPES = ("BatchNormalization",)


# --------------------------------------------------------------------------- shared math


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array of a constant initializer (not a graph input), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _batchnorm_affine(batchnorm: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, s) in float64 of an inference-mode BatchNormalization node, or None if not constant."""
    arrays = [_constant(v) for v in batchnorm.inputs[1:5]]
    if len(arrays) != 4 or any(a is None for a in arrays):
        return None
    gamma, beta, mean, variance = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays)  # type: ignore[arg-type]
    scale, shift = affine_of(mean, variance, gamma, beta, batchnorm.attributes.get_float("epsilon", 1e-5))
    return scale.numpy(), shift.numpy()


def _check_batchnorm(batchnorm: ir.Node, result: orp.MatchResult) -> orp.MatchResult:
    """A BatchNormalization is foldable when it is in inference mode with constant parameters."""
    if batchnorm.attributes.get_int("training_mode", 0) != 0:
        return result.fail(f"{batchnorm.name} is in training mode")
    if any(output.uses() or output.is_graph_output() for output in batchnorm.outputs[1:]):
        return result.fail(f"{batchnorm.name} exports its running statistics")
    if _batchnorm_affine(batchnorm) is None:
        return result.fail(f"{batchnorm.name} has non-constant statistics or affine parameters")
    return result


def _matmul_layout_problem(
    weight: np.ndarray, bias: np.ndarray | None, rank: int | None, transpose: ir.Node | None, described: str
) -> str:
    """Why a normalization of MatMul(x, W) [+ b] [-> Transpose] (``described``) cannot fold; "" if it can.

    W must be 2-D, b per output column, and the normalized axis 1 the MatMul's last axis.
    """
    if weight.ndim != 2 or rank is None:
        return f"{described} is not a 2-D constant weight product of known rank"
    channels = weight.shape[1]
    if bias is not None and (bias.size != channels or bias.shape[-1] != channels):
        return f"the bias added after {described} is not per output column"
    if transpose is not None:
        perm = list(transpose.attributes.get_ints("perm", list(range(rank))[::-1]))
        if len(perm) != rank or perm[1] != rank - 1:
            return "the normalized axis is not the output-feature axis of " + described
    elif rank != 2:
        return "the normalized axis is not the output-feature axis of " + described
    return ""


def _tag(values: Sequence[ir.Value], batchnorm: ir.Node, rule_name: str) -> None:
    """Give the replacement nodes the normalization's provenance and the rule's name."""
    for value in values:
        node = value.producer()
        if node is None:
            continue
        for key, text in batchnorm.metadata_props.items():
            node.metadata_props.setdefault(key, text)
        node.metadata_props[FOLD_RULE_TAG] = rule_name


def _fold(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, layout: Layout,
          groups: int = 1) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(W', b') in float64 by :mod:`bkn_export.export.fold_math`."""
    a, s = torch.from_numpy(scale), torch.from_numpy(shift)
    w = folded_weight(torch.from_numpy(weight.astype(np.float64)), a, layout, groups)
    b = folded_bias(None if bias is None else torch.from_numpy(bias.astype(np.float64)), a, s)
    return w.numpy(), b.numpy()


def _new_initializer(op: Any, array: np.ndarray, dtype: np.dtype, name: str) -> ir.Value:
    return op.initializer(ir.tensor(np.ascontiguousarray(array.astype(dtype))), name=name)


# --------------------------------------------------------------------------- rules


class _FoldIntoWeightedOp(orp.RewriteRuleClassBase):
    """BatchNormalization(Op(x, W[, b])) -> Op(x, W', b') for Conv / ConvTranspose / Gemm."""

    op_type: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__(name=f"FoldNormalizationInto{self.op_type}")

    def pattern(self, op: Any, x: ir.Value) -> ir.Value:
        inner = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["inner_out"])
        return op.BatchNormalization(inner, _allow_other_inputs=True, _outputs=["normalized"])

    def check(self, context: Any, x: ir.Value, inner_out: ir.Value, normalized: ir.Value) -> orp.MatchResult:
        del context, x
        result = orp.MatchResult()
        inner, batchnorm = inner_out.producer(), normalized.producer()
        assert inner is not None and batchnorm is not None
        if not _check_batchnorm(batchnorm, result):
            return result
        if _constant(inner.inputs[1]) is None:
            return result.fail(f"{inner.name}: weight is not a constant initializer")
        if len(inner.inputs) > 2 and inner.inputs[2] is not None and _constant(inner.inputs[2]) is None:
            return result.fail(f"{inner.name}: bias is not a constant initializer")
        return self._check_layout(inner, result)

    def _check_layout(self, inner: ir.Node, result: orp.MatchResult) -> orp.MatchResult:
        return result

    def _layout(self, inner: ir.Node) -> Layout:
        """The weight's layout (fold_math): Conv's W is (C_out, C_in/G, *k)."""
        return "out_first"

    def _bias(self, bias: np.ndarray | None, inner: ir.Node) -> np.ndarray | None:
        """The bias the op adds (Gemm scales its C by beta)."""
        return bias

    def rewrite(self, op: Any, x: ir.Value, inner_out: ir.Value, normalized: ir.Value) -> ir.Value:
        inner, batchnorm = inner_out.producer(), normalized.producer()
        assert inner is not None and batchnorm is not None
        affine = _batchnorm_affine(batchnorm)
        assert affine is not None
        scale, shift = affine
        weight_value = inner.inputs[1]
        assert weight_value is not None
        weight = _constant(weight_value)
        assert weight is not None
        bias_value = inner.inputs[2] if len(inner.inputs) > 2 else None
        bias = _constant(bias_value)
        new_weight, new_bias = _fold(
            weight, self._bias(bias, inner), scale, shift, self._layout(inner), inner.attributes.get_int("group", 1)
        )
        attributes = {name: attr for name, attr in inner.attributes.items() if name != "beta"}
        out = op.op(
            self.op_type,
            x,
            _new_initializer(op, new_weight, weight.dtype, f"{batchnorm.name}.folded_weight"),
            _new_initializer(op, new_bias, weight.dtype, f"{batchnorm.name}.folded_bias"),
            **attributes,
        )
        _tag([out], batchnorm, self.name)
        return out


class FoldIntoConv(_FoldIntoWeightedOp):
    """Conv (any group count, depthwise included): W is (C_out, C_in/G, *k)."""

    op_type = "Conv"


class FoldIntoConvTranspose(_FoldIntoWeightedOp):
    """ConvTranspose: W is (C_in, C_out/G, *k); output channel g·C_out/G + j is column j of group g."""

    op_type = "ConvTranspose"

    def _check_layout(self, inner: ir.Node, result: orp.MatchResult) -> orp.MatchResult:
        weight = _constant(inner.inputs[1])
        assert weight is not None
        if weight.shape[0] % inner.attributes.get_int("group", 1) != 0:
            return result.fail(f"{inner.name}: input channels not divisible by group")
        return result

    def _layout(self, inner: ir.Node) -> Layout:
        return "transposed"


class FoldIntoGemm(_FoldIntoWeightedOp):
    """Gemm Y = α op(A) op(B) + β C: the columns of op(B) are scaled; C' = a β C + s, β := 1."""

    op_type = "Gemm"

    def _layout(self, inner: ir.Node) -> Layout:
        return "out_first" if inner.attributes.get_int("transB", 0) else "out_last"  # B: (N, K) or (K, N)

    def _bias(self, bias: np.ndarray | None, inner: ir.Node) -> np.ndarray | None:
        return None if bias is None else inner.attributes.get_float("beta", 1.0) * bias


class FoldIntoMatMul(orp.RewriteRuleClassBase):
    """BatchNormalization([Transpose](MatMul(x, W) [+ b])) -> [Transpose](MatMul(x, W') + b').

    W: (K, C) constant. The normalization's channel axis 1 must be the MatMul's last axis:
    either the MatMul output has rank 2, or a Transpose with perm[1] = rank − 1 sits in
    between (a ``Linear`` on (N, L, K) followed by ``.transpose(1, 2)`` into BKN1d). The
    bias, if any, must broadcast along the last axis only.
    """

    def __init__(self, with_bias: bool, through_transpose: bool) -> None:
        self.with_bias = with_bias
        self.through_transpose = through_transpose
        suffix = ("Add" if with_bias else "") + ("Transpose" if through_transpose else "")
        super().__init__(name=f"FoldNormalizationIntoMatMul{suffix}")

    def pattern(self, op: Any, x: ir.Value, weight: ir.Value, bias: ir.Value) -> ir.Value:
        out = op.MatMul(x, weight, _outputs=["matmul_out"])
        if self.with_bias:
            out = op.Add(out, bias)
        if self.through_transpose:
            out = op.Transpose(out, _allow_other_attributes=True, _outputs=["transposed"])
        return op.BatchNormalization(out, _allow_other_inputs=True, _outputs=["normalized"])

    def check(  # type: ignore[override]
        self, context: Any, normalized: ir.Value, matmul_out: ir.Value, **values: Any
    ) -> orp.MatchResult:
        del context
        result = orp.MatchResult()
        batchnorm = normalized.producer()
        assert batchnorm is not None
        if not _check_batchnorm(batchnorm, result):
            return result
        weight = _constant(values["weight"])
        if weight is None:
            return result.fail("MatMul weight is not a constant initializer")
        bias = _constant(values["bias"]) if self.with_bias else None
        if self.with_bias and bias is None:
            return result.fail("Add operand is not a constant")
        rank = matmul_out.shape.rank() if matmul_out.shape is not None else None
        transpose = values["transposed"].producer() if self.through_transpose else None
        problem = _matmul_layout_problem(weight, bias, rank, transpose, "MatMul")
        return result.fail(problem) if problem else result

    def rewrite(self, op: Any, x: ir.Value, weight: ir.Value, normalized: ir.Value, **values: Any) -> ir.Value:
        batchnorm = normalized.producer()
        assert batchnorm is not None
        affine = _batchnorm_affine(batchnorm)
        assert affine is not None
        scale, shift = affine
        w = _constant(weight)
        assert w is not None
        bias = _constant(values.get("bias")) if self.with_bias else None
        new_weight, new_bias = _fold(w, bias, scale, shift, "out_last")
        matmul = op.MatMul(x, _new_initializer(op, new_weight, w.dtype, f"{batchnorm.name}.folded_weight"))
        out = op.Add(matmul, _new_initializer(op, new_bias, w.dtype, f"{batchnorm.name}.folded_bias"))
        created = [matmul, out]
        if self.through_transpose:
            transpose = values["transposed"].producer()
            out = op.Transpose(out, perm=list(transpose.attributes.get_ints("perm")))
            created.append(out)
        _tag(created, batchnorm, self.name)
        return out


#: Every fold rule, in one place. Order matters only for speed: the common cases first.
FOLD_RULES = orp.RewriteRuleSet(
    [
        FoldIntoConv.rule(),
        FoldIntoConvTranspose.rule(),
        FoldIntoGemm.rule(),
        FoldIntoMatMul.rule(with_bias=True, through_transpose=True),
        FoldIntoMatMul.rule(with_bias=False, through_transpose=True),
        FoldIntoMatMul.rule(with_bias=True, through_transpose=False),
        FoldIntoMatMul.rule(with_bias=False, through_transpose=False),
    ]
)


def apply_fold_rules(model: ir.Model) -> int:
    """Apply :data:`FOLD_RULES` in place until none matches; returns the number of folds."""
    total = 0
    while True:
        count = FOLD_RULES.apply_to_model(model)
        total += count
        if count == 0:
            return total


# --------------------------------------------------------------------------- what is left


@dataclass(frozen=True)
class Leftover:
    """A normalization node still in the graph and why.

    node: its name; producer: the op type and name that feeds it ("graph input" if none);
    foldable: True when a rule should have absorbed it (the export's guarantee is broken).
    """

    node: str
    producer: str
    foldable: bool
    reason: str


def _verdicts(model: ir.Model, node: ir.Node, removable: bool) -> list[tuple[str, MatchInfo]]:
    """(rule name, its verdict at ``node``) for each rule whose pattern got anywhere, in rule order.

    The verdict is the rule's own: its pattern, then its ``check``. ``removable``: require
    the matched nodes to have no other consumers, as a rewrite does. Nothing in the graph
    changes (only ``match`` runs; no replacement is built).
    """
    tracer = orp.MatchingTracer()
    for rule in FOLD_RULES.rules:
        rule.match(model, model.graph, node, check_nodes_are_removable=removable, tracer=tracer)
    return [(str(rule.name), info) for rule in FOLD_RULES.rules for info in tracer.best_matches_map.get(rule, [])]


def _shared_value(info: MatchInfo, normalization: ir.Node) -> str:
    """'the output of <op> '<name>' also feeds N other consumer(s)' for the first matched value used elsewhere."""
    matched = set(info.match_result.nodes)
    for node in info.match_result.nodes:
        if node is normalization:
            continue
        for output in node.outputs:
            others = len([user for user, _ in output.uses() if user not in matched]) + int(output.is_graph_output())
            if others:
                return f"the output of {node.op_type} '{node.name}' also feeds {others} other consumer(s)"
    return "a value between the op and the normalization is used elsewhere"


def _classify(model: ir.Model, normalization: ir.Node) -> Leftover:
    """The Leftover of one normalization node, from the rules' own verdicts."""
    name = normalization.name or ""
    source = normalization.inputs[0]
    producer = source.producer() if source is not None else None
    described = "graph input" if producer is None else f"{producer.op_type} '{producer.name}'"
    verdicts = _verdicts(model, normalization, removable=True)
    for rule, info in verdicts:
        if info.status == orp.MatchStatus.SUCCESS:
            return Leftover(name, described, True, f"rule {rule} applies to it but did not fold it")
    for _, info in verdicts:
        if info.status == orp.MatchStatus.CONDITION_FAILED:
            return Leftover(name, described, False, str(info.match_result.reason))
    for _, info in _verdicts(model, normalization, removable=False):
        if info.status >= orp.MatchStatus.CONDITION_FAILED:  # it matches once other consumers are allowed
            return Leftover(name, described, False, _shared_value(info, normalization))
    if producer is None:
        return Leftover(name, described, False, "its input is a graph input")
    return Leftover(name, described, False, f"it follows {described}, which cannot absorb an affine map")


def unfolded_normalizations(model: ir.Model | ir.Graph) -> list[Leftover]:
    """Every normalization node left in the graph, classified by the rules themselves.

    ``foldable`` (a broken guarantee) is True when a rule of :data:`FOLD_RULES` matches the
    node (its pattern and its ``check``, with the matched nodes used by nothing else).
    Otherwise the reason is, in this order: the ``check`` message of a rule whose pattern
    matched (non-constant weights or statistics, another axis, ...); that a value between
    the op and the normalization also feeds another consumer (a rule matches once that is
    allowed); that the input is a graph input; or that the op before it cannot absorb an
    affine map (an Add, a ReLU, ...).
    """
    if isinstance(model, ir.Graph):
        model = ir.Model(model, ir_version=10)
    return [_classify(model, node) for node in model.graph if node.op_type in NORMALIZATION_OP_TYPES]
