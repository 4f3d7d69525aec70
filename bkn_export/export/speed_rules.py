"""Exact graph rewrites that only change how fast a runtime runs the graph, never what it computes.

One rule so far, :class:`PReluAsLeakyRelu`::

    PRelu(x, slope)   with slope one constant float32 value a   ->   LeakyRelu(x, alpha=a)

Both compute ``f(x) = x if x >= 0 else a * x`` elementwise (at ``x = 0`` both give a zero; NaN stays NaN), in
float32 with the same ``a`` (the attribute ``alpha`` is a float32, so a float32 slope is carried bit for bit). Why:
ONNX Runtime's CPU ``PRelu`` kernel broadcasts the slope through its generic elementwise path, about 45× slower
than PyTorch's ``prelu`` on a 3-D activation, while its ``LeakyRelu`` is a vectorized unary kernel (MONAI's
3-D UNet with PReLU at batch 8: ORT / PyTorch 1.18 with ``PRelu``, 1.00 with ``LeakyRelu``; benchmarks/RESULTS.md,
"3-D UNet in ONNX Runtime"). ``nn.PReLU()``'s default (``num_parameters=1``) exports as such a ``PRelu``.

Not rewritten (the graph keeps ``PRelu``): a slope with more than one element (``nn.PReLU(C)``: per channel), one
that is not a constant initializer (a graph input, or a computed value under ``graph_optimizer="none"``, which
leaves the exporter's ``Reshape`` of the parameter in place), a slope of higher rank than ``x`` (it would
broadcast ``x`` to a higher rank), and any dtype but float32 (ORT's CPU kernels of both ops are float32 only, and
a float64 slope need not survive float32's ``alpha``).

The replacement node keeps the ``PRelu``'s name and metadata (the PyTorch module it came from: localisation and reports
name it as before) and carries ``bkn_export.rewrite_rule`` with the rule's name. :func:`disabled` turns the rules
off within a block (the benchmark's "as exported by torch" contender, and the tests that compare the two).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

__all__ = ["REWRITE_RULE_TAG", "SPEED_RULES", "PReluAsLeakyRelu", "apply_speed_rules", "disabled"]

#: metadata_props key set on every node a rule of this module creates: the rule's name.
REWRITE_RULE_TAG = "bkn_export.rewrite_rule"

_ENABLED: ContextVar[bool] = ContextVar("bkn_speed_rules", default=True)


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block (this thread / task), :func:`apply_speed_rules` rewrites nothing."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _single_constant(value: ir.Value) -> np.ndarray | None:
    """The one-element numpy array of a constant initializer (not a graph input), else None."""
    if value.const_value is None or value.is_graph_input():
        return None
    array = value.const_value.numpy()
    return array if array.size == 1 else None


class PReluAsLeakyRelu(orp.RewriteRuleClassBase):
    """``PRelu(x, slope)`` -> ``LeakyRelu(x, alpha=slope)`` for a one-element constant float32 slope."""

    def __init__(self) -> None:
        super().__init__(name="PReluAsLeakyRelu")

    def pattern(self, op: Any, x: ir.Value, slope: ir.Value) -> ir.Value:
        return op.PRelu(x, slope, _outputs=["activated"])

    def check(self, context: Any, x: ir.Value, slope: ir.Value, activated: ir.Value) -> orp.MatchResult:
        del context, activated
        result = orp.MatchResult()
        if x.dtype != ir.DataType.FLOAT or slope.dtype != ir.DataType.FLOAT:
            return result.fail("not float32")
        if _single_constant(slope) is None:
            return result.fail("the slope is not one constant value")
        if x.shape is None or slope.shape is None or len(slope.shape) > len(x.shape):
            return result.fail("the slope's rank is unknown or above the input's")
        return result

    def rewrite(self, op: Any, x: ir.Value, slope: ir.Value, activated: ir.Value) -> ir.Value:
        prelu = activated.producer()
        array = _single_constant(slope)
        assert prelu is not None and array is not None
        out = op.LeakyRelu(x, alpha=float(array.reshape(())))
        node = out.producer()
        assert node is not None
        node.name = prelu.name
        for key, text in prelu.metadata_props.items():
            node.metadata_props.setdefault(key, text)
        node.metadata_props[REWRITE_RULE_TAG] = self.name
        return out


#: Every speed rule, in one place.
SPEED_RULES = orp.RewriteRuleSet([PReluAsLeakyRelu.rule()])


def apply_speed_rules(model: ir.Model) -> int:
    """Apply :data:`SPEED_RULES` in place (main graph and functions), unless :func:`disabled`; returns the number
    of rewrites."""
    if not _ENABLED.get():
        return 0
    return SPEED_RULES.apply_to_model(model)
