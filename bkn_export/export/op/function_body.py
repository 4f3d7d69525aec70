"""The ONNX function body of ``ai.bkn::BatchKalmanNorm`` (an onnxscript function).

The body is what ONNX Runtime and ``onnx.reference`` run when no plugin takes the node
over. It is written once here and generated for the model's default-domain opset
(``onnx.checker`` rejects a local function whose opset differs from the model's).

Math (:func:`bkn_export.functional.batch_kalman_norm`), per channel c of X: (N, C, *)::

    x̄ = mean(X),  S = mean((X - x̄)²)                       (two-pass, biased)
    p = 0 if fallback_ratio > 0 and mean_c(prior_variance / max(S, 1e-12)) ≥ fallback_ratio
                                                            (no NaN constant; a NaN S keeps the mean NaN and
                                                            the rule off, as ``clamp_min`` in the reference)
    d = x̄ - prior_mean,  q = 1 - p
    μ = prior_mean + q d,  Σ = p prior_variance + q S + p q d²
    Y = scale (X - μ) / sqrt(Σ + epsilon) + B

Cost, for an input of n elements: the statistics are ReduceMean, Sub, Mul, ReduceMean
(exact two-pass variance; ``ReduceSumSquare`` instead of Mul + ReduceMean measured 2.6×
slower on ORT CPU over axes (0, 2)), and Y is one ``BatchNormalization`` in inference
form with the posterior as its mean and variance: a single fused pass instead of Sub,
Div, Mul, Add. ``BatchNormalization`` (opset ≥ 15) takes X in T and its statistics in
U, so half inputs are cast to U once, for the statistics only, and Y needs no cast.
Everything else works on (C,) vectors.

Not used, on purpose: ``BatchNormalization`` in training mode (momentum 0) would return
the batch mean and variance in one node, but ONNX Runtime 1.32's CPU kernel writes its
running-mean output into the ``input_mean`` buffer, which here is the prior (and, for a
graph input, the caller's array): the prior is overwritten before the update reads it.
"""

from __future__ import annotations

import functools

import onnx
import onnxscript
from onnxscript import values

from bkn_export.export.op import op_spec
from bkn_export.functional import _VARIANCE_FLOOR  # floor on the batch variance in the fallback ratio

__all__ = ["function_proto", "onnxscript_function"]


@functools.cache
def onnxscript_function(opset_version: int) -> onnxscript.OnnxFunction:
    """The onnxscript function for ``BatchKalmanNorm`` against ONNX opset ``opset_version``."""
    op_spec.check_opset(opset_version)
    op = values.Opset("", opset_version)
    custom = values.Opset(op_spec.DOMAIN, op_spec.DOMAIN_VERSION)

    # The function's name is the op type; inputs, outputs and attributes follow op_spec
    # (tests compare the generated FunctionProto with op_spec).
    @onnxscript.script(custom, default_opset=op)
    def BatchKalmanNorm(
        X,
        prior_mean,
        prior_variance,
        prior_weight,
        scale,
        B,
        epsilon: float = 1e-5,
        fallback_ratio: float = 0.0,
        plugin_version: str = "1",
        plugin_namespace: str = "bkn",
    ):
        # (N, C, *) -> (N, C, L): one reduction layout for every rank (a view, no copy);
        # the cast is a no-op unless X is a half type. Two-pass variance, free of the
        # E[x²] - E[x]² cancellation.
        flat = op.Reshape(op.CastLike(X, prior_mean), op.Constant(value_ints=[0, 0, -1]))
        axes = op.Constant(value_ints=[0, 2])
        batch_mean_nc = op.ReduceMean(flat, axes, keepdims=1)
        centred = op.Sub(flat, batch_mean_nc)
        batch_variance = op.ReduceMean(op.Mul(centred, centred), axes, keepdims=0)
        batch_mean = op.Reshape(batch_mean_nc, op.Constant(value_ints=[-1]))

        # The fallback rule as one boolean: enabled (fallback_ratio > 0, from the attribute
        # alone, so runtimes fold it when they inline the function) AND the ratio reached.
        # No NaN sentinel and no comparison whose result depends on NaN semantics: engines
        # disagree on those (OpenVINO evaluates GreaterOrEqual(x, NaN) as true).
        ratio = op.CastLike(fallback_ratio, prior_mean)
        floor = op.CastLike(op.Constant(value_float=_VARIANCE_FLOOR), prior_mean)
        zero = op.CastLike(op.Constant(value_float=0.0), prior_mean)
        one = op.CastLike(op.Constant(value_float=1.0), prior_mean)
        enabled = op.Greater(ratio, zero)
        # A NaN channel keeps the mean ratio NaN and the rule off, as the reference's clamp_min does: OpenVINO's
        # Max returns the floor for a NaN (and its GreaterOrEqual(NaN, x) is true), so both are spelled out.
        floored = op.Where(op.IsNaN(batch_variance), batch_variance, op.Max(batch_variance, floor))
        mean_ratio = op.ReduceMean(op.Div(prior_variance, floored), keepdims=0)
        reached = op.And(op.Not(op.IsNaN(mean_ratio)), op.GreaterOrEqual(mean_ratio, ratio))
        fall_back = op.And(enabled, reached)
        p = op.Where(fall_back, zero, prior_weight)
        q = op.Sub(one, p)

        innovation = op.Sub(batch_mean, prior_mean)
        posterior_mean = op.Add(prior_mean, op.Mul(q, innovation))
        posterior_variance = op.Add(
            op.Add(op.Mul(p, prior_variance), op.Mul(q, batch_variance)),
            op.Mul(op.Mul(p, q), op.Mul(innovation, innovation)),
        )
        Y = op.BatchNormalization(X, scale, B, posterior_mean, posterior_variance, epsilon=epsilon, training_mode=0)
        return Y, posterior_mean, posterior_variance

    return BatchKalmanNorm


def function_proto(opset_version: int) -> onnx.FunctionProto:
    """The ``FunctionProto`` (domain ``ai.bkn``) to put into ``ModelProto.functions``.

    Its default-domain import is ``opset_version``: it must equal the model's. Attribute
    defaults are op_spec's.
    """
    proto = onnxscript_function(opset_version).to_function_proto()
    result = onnx.FunctionProto()
    result.CopyFrom(proto)
    del result.attribute_proto[:]
    result.attribute_proto.extend(
        onnx.helper.make_attribute(name, value) for name, value in op_spec.attribute_defaults().items()
    )
    return result
