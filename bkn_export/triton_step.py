"""A BKN layer's train step on the Triton route in eager execution: the op with the prior's last step and γ's and
β's other gradients in its own kernels.

``torch.ops.bkn.batch_kalman_norm`` (:mod:`bkn_export.ops`) is the contract the ONNX op and the TensorRT plugin
mirror: it takes the assembled prior and returns (y, μ_{k|k}, Σ_{k|k}). Around it, a wired layer's step on a GPU
launched three kernels more than the op's math needs, each a launch of a few (C,) vectors:

* the prior assembly, forward and backward (:mod:`bkn_export.fast_prior`)::

      Σ_pred = v + softplus(r),  p = L sigmoid(l) [· k]      (v: the prediction's variance)

* autograd's additions for γ and β, read twice: by this layer's op and by the next layers' predictions
  (``prior_source="output"``: the source's output Gaussian (β, γ² Σ/(Σ + ε))).

:class:`_TritonKalmanStep` is one autograd node that runs the op's Triton kernels with the assembly inside them
(:class:`bkn_export.kernels.common.PriorAssembly`: the same float64 formulas as the separate launch, rounded once)
and returns γ and β as outputs of its own (views of the parameters, this node their ``grad_fn``), which the
layer publishes for its chain: the next layers' predictions then read those, their gradients of γ and β arrive
here as output gradients, and the backward kernel adds them to the op's own in the store it makes anyway. The
values and gradients are the op's and the separate assembly's (bit for bit under Triton's interpreter:
``tests/test_triton_step.py``); the launches per wired layer drop from 4 / 7 to 3 / 4 (forward / backward,
``benchmarks/count_launches.py``).

Where it applies: :func:`applies` (eager, untraced, the op's Triton route). The assembly only where the layer
assembles its prior with both parameters (``process_noise`` and ``prior_weight`` learned), without the fallback
rule (which reads every channel's assembled Σ_pred first) and with no observer (which records the assembled
prior): elsewhere the caller assembles it and passes p. Second derivatives (``create_graph=True``) differentiate
the separate form (the op, which has them, and the assembly's PyTorch operators) again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bkn_export import fast_prior, kernels
from bkn_export import functional as Fk
from bkn_export.kernels.layout import as_dtype
from bkn_export.ops import channel_constant
from bkn_export.tracing import nothing_traces

__all__ = ["TritonStep", "applies", "kalman_norm_step"]

#: (y, μ_{k|k}, Σ_{k|k}, γ, β): γ and β as this node's outputs (None where the layer has none).
TritonStep = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]


def applies(x: Tensor) -> bool:
    """Whether the step of input ``x: (N, C, *)`` runs here: the op's Triton route
    (:func:`bkn_export.kernels.uses_kernels`) with nothing tracing the call (compile, export, jit trace, a
    dispatch mode): graphs keep the op."""
    return type(x) is Tensor and kernels.uses_kernels(x) and nothing_traces()


def kalman_norm_step(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor | None,
    assembly: tuple[Tensor, Tensor, Tensor | None] | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> TritonStep:
    """The op's step (:func:`bkn_export.ops.kalman_norm_step`) where :func:`applies`, γ and β returned too.

    x: (N, C, *); prior_mean, prior_variance: (C,) in the statistics dtype. Either ``prior_weight`` p (C,) and
    ``assembly`` None, or ``assembly`` (r, l, k or None), prior_weight None and ``prior_variance`` the
    prediction's v: then Σ_pred = v + softplus(r), p = L sigmoid(l) [· k] (L = ``PRIOR_WEIGHT_LIMIT``) in the
    op's kernels (fallback_ratio 0 only). weight γ, bias β: (C,) or None.
    """
    raw, logit, known = assembly if assembly is not None else (None, None, None)
    return _TritonKalmanStep.apply(  # type: ignore[no-any-return]
        x, prior_mean, prior_variance, prior_weight, raw, logit, known, weight, bias, eps, fallback_ratio
    )


def _assembly(raw: Tensor | None, logit: Tensor | None, known: Tensor | None) -> Any:
    if raw is None:
        return None
    assert logit is not None
    from bkn_export.kernels.common import PriorAssembly  # imports Triton: only once the route is taken

    return PriorAssembly(raw, logit, known, Fk.PRIOR_WEIGHT_LIMIT)


class _TritonKalmanStep(torch.autograd.Function):
    """Inputs: x, μ_pred, Σ_pred (or v), p (or None), r, l, k (or None), γ, β, ε, fallback_ratio; outputs: y,
    μ_{k|k}, Σ_{k|k}, γ, β (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        prior_mean: Tensor,
        prior_variance: Tensor,
        prior_weight: Tensor | None,
        raw: Tensor | None,
        logit: Tensor | None,
        known: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        fallback_ratio: float,
    ) -> tuple[Tensor | None, ...]:
        ctx.set_materialize_grads(False)  # absent output gradients come as None: no zeros made per call
        ctx.eps, ctx.fallback_ratio = eps, fallback_ratio
        ctx.save_for_backward(x, prior_mean, prior_variance, prior_weight, raw, logit, known, weight, bias)
        launchers = kernels.launchers()
        assert launchers is not None  # applies() checked it
        with kernels.launching_on(x):
            y, mean, variance = launchers.forward(
                x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio,
                assembly=_assembly(raw, logit, known),
            )  # fmt: skip
        # γ and β themselves: autograd returns them as views with this node as their grad_fn.
        return y, mean, variance, weight, bias

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiated(ctx, grads)
        x, prior_mean, prior_variance, prior_weight, raw, logit, known, weight, bias = ctx.saved_tensors
        grad_output, grad_mean, grad_variance, grad_weight_extra, grad_bias_extra = grads
        grad_output = torch.zeros_like(x) if grad_output is None else grad_output
        zeros = channel_constant(x, 0.0) if grad_mean is None or grad_variance is None else None
        grad_mean = zeros if grad_mean is None else grad_mean
        grad_variance = zeros if grad_variance is None else grad_variance
        launchers = kernels.launchers()
        assert launchers is not None
        extras = {"extra_grad_weight": grad_weight_extra, "extra_grad_bias": grad_bias_extra}
        grad_raw = grad_logit = grad_prior_weight = None
        with kernels.launching_on(x):
            if raw is None:
                grad_x, grad_prior_mean, grad_prior_variance, grad_prior_weight, grad_weight, grad_bias = (
                    launchers.backward(
                        grad_output, grad_mean, grad_variance, x, prior_mean, prior_variance, prior_weight, weight,
                        ctx.eps, ctx.fallback_ratio, **extras,
                    )
                )  # fmt: skip
            else:
                grad_x, grad_prior_mean, grad_prior_variance, grad_raw, grad_logit, grad_weight, grad_bias = (
                    launchers.backward_assembled(
                        grad_output, grad_mean, grad_variance, x, prior_mean, prior_variance,
                        _assembly(raw, logit, known), weight, ctx.eps, **extras,
                    )
                )  # fmt: skip
                grad_raw, grad_logit = as_dtype(grad_raw, raw.dtype), as_dtype(grad_logit, logit.dtype)
                grad_prior_mean = as_dtype(grad_prior_mean, prior_mean.dtype)
                grad_prior_variance = as_dtype(grad_prior_variance, prior_variance.dtype)
        return (
            grad_x,
            grad_prior_mean,
            grad_prior_variance,
            grad_prior_weight,
            grad_raw,
            grad_logit,
            None,
            as_dtype(grad_weight, weight.dtype) if weight is not None else None,
            as_dtype(grad_bias, bias.dtype) if bias is not None else None,
            None,
            None,
        )


def _separate(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor | None,
    raw: Tensor | None,
    logit: Tensor | None,
    known: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor | None, ...]:
    """What :class:`_TritonKalmanStep` computes, as the op and the assembly's PyTorch operators."""
    if raw is not None:
        assert logit is not None
        prior_variance, prior_weight = fast_prior._reference_assembly(prior_variance, raw, logit, known)
    assert prior_weight is not None
    y, mean, variance = torch.ops.bkn.batch_kalman_norm(
        x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio
    )
    return y, mean, variance, weight, bias


def _differentiated(ctx: Any, grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """create_graph=True: the vector-Jacobian product of :func:`_separate`, recomputed with autograd (the op's
    registered double backward gives the second derivatives)."""
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        inputs = [None if t is None else fast_prior._differentiable(t) for t in saved]
        x, prior_mean, prior_variance, prior_weight, raw, logit, known, weight, bias = inputs
        assert x is not None and prior_mean is not None and prior_variance is not None
        outputs = _separate(
            x, prior_mean, prior_variance, prior_weight, raw, logit, known, weight, bias, ctx.eps, ctx.fallback_ratio
        )
        pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and g is not None]
        wanted = [(i, t) for i, t in enumerate(inputs) if t is not None and needs[i]]
        result: list[Tensor | None] = [None] * (len(saved) + 2)
        if not pairs or not wanted:
            return tuple(result)
        # γ and β are their own outputs here: their output gradients pass straight through (as autograd's add).
        found = torch.autograd.grad(
            [o for o, _ in pairs], [t for _, t in wanted], [g for _, g in pairs], create_graph=True, allow_unused=True
        )
    for (index, _), grad in zip(wanted, found):
        result[index] = grad
    return tuple(result)
