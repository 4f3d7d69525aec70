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
registered in :data:`FOLD_RULES`. The folded weights are computed in float64 and
stored in the weight's dtype, under new initializer names, so a weight shared with
another node is never changed under it. Each replacement node carries the
BatchNormalization's metadata (the PyTorch module it came from) plus
``bkn_export.fold_rule`` so the fold report can name module and node.

The exporter's own optimizer already applies onnxscript's Conv/ConvTranspose/Gemm
fusions; these rules are applied after it and catch what it leaves (a MatMul from a
``Linear`` on (N, L, C) inputs transposed to (N, C, L), bias-free MatMuls, weights
shared between nodes, other onnxscript versions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

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
#: Ops whose output a following normalization can always be folded into (constant weights, single use).
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
    gamma, beta, mean, variance = (np.asarray(a, dtype=np.float64) for a in arrays)  # type: ignore[arg-type]
    epsilon = batchnorm.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(variance + epsilon)
    return scale, beta - mean * scale


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

    def _scaled_weight(self, weight: np.ndarray, scale: np.ndarray, inner: ir.Node) -> np.ndarray:
        """W' for output-channel scale ``scale`` (C,)."""
        return weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))

    def _shifted_bias(
        self, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, inner: ir.Node
    ) -> np.ndarray:
        return shift if bias is None else bias * scale + shift

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
        new_weight = self._scaled_weight(weight.astype(np.float64), scale, inner)
        new_bias = self._shifted_bias(None if bias is None else bias.astype(np.float64), scale, shift, inner)
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

    def _scaled_weight(self, weight: np.ndarray, scale: np.ndarray, inner: ir.Node) -> np.ndarray:
        groups = inner.attributes.get_int("group", 1)
        c_in, c_out_per_group, *kernel = weight.shape
        blocks = weight.reshape(groups, c_in // groups, c_out_per_group, *kernel)
        per_group = scale.reshape(groups, 1, c_out_per_group, *([1] * len(kernel)))
        return (blocks * per_group).reshape(weight.shape)


class FoldIntoGemm(_FoldIntoWeightedOp):
    """Gemm Y = α op(A) op(B) + β C: the columns of op(B) are scaled; C' = a β C + s, β := 1."""

    op_type = "Gemm"

    def _scaled_weight(self, weight: np.ndarray, scale: np.ndarray, inner: ir.Node) -> np.ndarray:
        if inner.attributes.get_int("transB", 0):
            return weight * scale[:, None]  # B: (N, K)
        return weight * scale[None, :]  # B: (K, N)

    def _shifted_bias(
        self, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, inner: ir.Node
    ) -> np.ndarray:
        if bias is None:
            return shift
        return inner.attributes.get_float("beta", 1.0) * bias * scale + shift


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
        new_weight = w.astype(np.float64) * scale[None, :]
        bias = _constant(values.get("bias")) if self.with_bias else None
        new_bias = shift if bias is None else bias.astype(np.float64).reshape(-1) * scale + shift
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


def _single_use(value: ir.Value) -> bool:
    return len(value.uses()) + int(value.is_graph_output()) == 1


def _linear_chain(value: ir.Value) -> tuple[ir.Node | None, ir.Node | None, ir.Value | None, str]:
    """(absorbing candidate, Transpose between, bias operand of an Add, why not) for a normalization input.

    Looks through a Transpose and a constant-bias Add over a MatMul (the forms of a
    ``Linear``). The candidate is the op right before the normalization otherwise.
    """
    node = value.producer()
    transpose = None
    if node is not None and node.op_type == "Transpose" and node.inputs[0] is not None:
        inner = node.inputs[0].producer()
        if inner is not None and inner.op_type in ("Add", "MatMul"):
            if not _single_use(node.inputs[0]):
                return inner, node, None, f"the output of {inner.op_type} '{inner.name}' is also used elsewhere"
            transpose, node = node, inner
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        for operand, other in (node.inputs, node.inputs[::-1]):
            inner = operand.producer() if operand is not None else None
            if inner is not None and inner.op_type == "MatMul" and _constant(other) is not None:
                if not _single_use(operand):  # type: ignore[arg-type]
                    return inner, transpose, other, f"the output of MatMul '{inner.name}' is also used elsewhere"
                return inner, transpose, other, ""
    if transpose is not None and node is not None and node.op_type != "MatMul":
        return transpose, None, None, ""  # e.g. Transpose(Add(a, b)): nothing absorbs
    return node, transpose, None, ""


def _fold_blocker(normalization: ir.Node) -> tuple[str, str]:
    """(producer description, reason it cannot be folded); reason "" means a rule should have folded it.

    Mirrors the ``check`` of the rules above, so "foldable" means exactly "a rule applies".
    """
    source = normalization.inputs[0]
    assert source is not None
    producer, transpose, bias, blocked = _linear_chain(source)
    if producer is None:
        return "graph input", "its input is a graph input"
    described = f"{producer.op_type} '{producer.name}'"
    if blocked:
        return described, blocked
    if producer.op_type not in FOLDABLE_OP_TYPES or (transpose is not None and producer.op_type != "MatMul"):
        return described, f"it follows {described}, which cannot absorb an affine map"
    output = producer.outputs[0]
    if not _single_use(output):
        return described, f"the output of {described} also feeds {len(output.uses()) - 1} other consumer(s)"
    weight = _constant(producer.inputs[1]) if len(producer.inputs) > 1 else None
    if weight is None:
        return described, f"{described} has a non-constant weight"
    if producer.op_type != "MatMul" and len(producer.inputs) > 2 and producer.inputs[2] is not None:
        if _constant(producer.inputs[2]) is None:
            return described, f"{described} has a non-constant bias"
    batchnorm_check = _check_batchnorm(normalization, orp.MatchResult())
    if not batchnorm_check:
        return described, batchnorm_check.reason
    if producer.op_type == "MatMul":
        rank = output.shape.rank() if output.shape is not None else None
        return described, _matmul_layout_problem(weight, _constant(bias), rank, transpose, described)
    return described, ""


def unfolded_normalizations(graph: ir.Graph) -> list[Leftover]:
    """Every normalization node left in ``graph``, classified.

    ``foldable`` (a broken guarantee) is True when a rule of :data:`FOLD_RULES` applies
    to it: fed by a Conv / ConvTranspose / Gemm / MatMul(+bias)(+Transpose) with constant
    weights, used by nothing else, normalizing the output-feature axis, with constant
    statistics. Otherwise the reason says what prevents folding (an Add, a ReLU, a graph
    input, a second consumer, non-constant weights, another axis).
    """
    leftovers: list[Leftover] = []
    for node in graph:
        if node.op_type not in NORMALIZATION_OP_TYPES:
            continue
        described, reason = _fold_blocker(node)
        if reason:
            leftovers.append(Leftover(node.name or "", described, False, reason))
        else:
            leftovers.append(Leftover(node.name or "", described, True, f"no rule folded it into {described}"))
    return leftovers
