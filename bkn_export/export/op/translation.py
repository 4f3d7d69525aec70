"""``torch.ops.bkn.batch_kalman_norm`` → one ``ai.bkn::BatchKalmanNorm`` node.

The training-mode export passes :func:`translation_table` to ``torch.onnx.export`` as
its ``custom_translation_table``; the node's inputs, attributes and identity come from
:mod:`~bkn_export.export.op.op_spec`, its schema from :mod:`~bkn_export.export.op.schema`.
The table also replaces torch.onnx's ``erfc`` (``1 − Erf``, no digit left in the tail in
float32) by :mod:`bkn_export.export.erfc`'s, which the chain's Gaussian moments need.
"""

from __future__ import annotations

from typing import Any

import torch

import bkn_export.ops  # noqa: F401  (defines torch.ops.bkn.batch_kalman_norm)
from bkn_export.export.erfc import ERFC_OVERLOADS, translate_erfc
from bkn_export.export.op import op_spec, schema

__all__ = ["translation_table"]


def _translate_batch_kalman_norm(
    x: Any,
    prior_mean: Any,
    prior_variance: Any,
    prior_weight: Any,
    weight: Any,
    bias: Any,
    eps: float,
    fallback_ratio: float,
) -> Any:
    """torch.ops.bkn.batch_kalman_norm → one ``ai.bkn::BatchKalmanNorm`` node (3 outputs).

    ``weight`` / ``bias`` absent (affine=False) become ones / zeros; a half γ/β is cast
    to the statistics type U, as the op's type constraints require.
    """
    import onnxscript
    from onnxscript import opset18 as op

    custom = onnxscript.values.Opset(op_spec.DOMAIN, op_spec.DOMAIN_VERSION)
    zero: Any = op.Constant(value_float=0.0)
    one: Any = op.Constant(value_float=1.0)
    zeros = op.Mul(prior_mean, op.CastLike(zero, prior_mean))
    scale = op.Add(zeros, op.CastLike(one, prior_mean)) if weight is None else weight
    shift = zeros if bias is None else bias
    if scale.dtype != prior_mean.dtype:
        scale = op.CastLike(scale, prior_mean)
    if shift.dtype != prior_mean.dtype:
        shift = op.CastLike(shift, prior_mean)
    return custom.BatchKalmanNorm(
        x,
        prior_mean,
        prior_variance,
        prior_weight,
        scale,
        shift,
        epsilon=float(eps),
        fallback_ratio=float(fallback_ratio),
        plugin_version=op_spec.PLUGIN_VERSION,
        plugin_namespace=op_spec.PLUGIN_NAMESPACE,
    )


def translation_table() -> dict[Any, Any]:
    """The ``custom_translation_table`` for ``torch.onnx.export`` (registers the schema first):
    the BKN op, and ``erfc`` (:mod:`bkn_export.export.erfc`)."""
    schema.register_schema()
    table: dict[Any, Any] = {torch.ops.bkn.batch_kalman_norm.default: _translate_batch_kalman_norm}
    table.update(dict.fromkeys(ERFC_OVERLOADS, translate_erfc))
    return table
