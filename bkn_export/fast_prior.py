"""Fused eager forms of the per-channel glue around a prediction: one autograd node each.

Per wired layer and train step, two small formulas sit outside the prediction's steps:

* a source's output Gaussian (``prior_source="output"``), from
  :func:`bkn_export.moments.normalized_output_moments`: (β, γ² Σ / (Σ + ε));
* the layer's prior assembly (:meth:`bkn_export.nn.BatchKalmanNorm._prior`): the predicted
  variance plus the process noise R = softplus(r), and the gain p = L · sigmoid(l) (L =
  :data:`bkn_export.functional.PRIOR_WEIGHT_LIMIT`), times the known-channel mask where there is one.

Eagerly, those are eight operators forward and eight autograd nodes backward (Add, Div, Mul ×2;
Mul, Sigmoid, Softplus, Add); here each formula is one ``autograd.Function`` running a C kernel of
:mod:`bkn_export.native` (``csrc/prior.c``) forward and backward (β stays a view of the bias, as in
the reference: a plain tensor, so that the fused prediction steps take it)::

    output variance   v = γ² (Σ/(Σ+ε))        ∂Σ = ∂v γ² ε/(Σ+ε)²,   ∂γ = ∂v 2γ Σ/(Σ+ε)
    prior assembly    v = v_pred + softplus(r)  ∂v_pred = ∂v,  ∂r = ∂v sigmoid(r)
                      p = L sigmoid(l) k        ∂l = ∂p k L s (1 − s),  s = sigmoid(l)

They apply in plain eager execution where :func:`bkn_export.per_channel.takes` the tensors (on the
CPU the C library is built; on CUDA the Triton twins of :mod:`bkn_export.kernels.prior_moments`;
float32/float64, contiguous, one dtype); otherwise — tracing, export, other
devices, ``create_graph=True`` backward, a fixed gain or no process noise — the callers' PyTorch
expressions run, which is also what ``tests/test_native.py`` compares these with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from bkn_export import functional as Fk
from bkn_export import moments, native, per_channel

__all__ = ["assembled_prior", "normalized_output_moments", "unfused"]

_LIMIT = Fk.PRIOR_WEIGHT_LIMIT


_ENABLED: ContextVar[bool] = ContextVar("bkn_fused_prior", default=True)


@contextmanager
def unfused() -> Iterator[None]:
    """Within the block (this thread / task) the callers' own operators run, as under tracing
    (:func:`bkn_export.chain.fast.reference_only` enters it too)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _applies(kernel: str, *tensors: Tensor | None) -> bool:
    """Nothing tracing (:func:`bkn_export.native.untraced`), not :func:`unfused`, and tensors that
    ``kernel`` takes (:mod:`bkn_export.per_channel`: C on CPU, Triton on CUDA)."""
    return native.untraced() and _ENABLED.get() and per_channel.takes(*tensors, kernel=kernel)


def _contiguous(grad: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.contiguous()


def _differentiable(tensor: Tensor) -> Tensor:
    """A saved input to differentiate the reference at: an alias where it has a graph (so that a
    ``create_graph`` backward stays connected to it, and ``autograd.grad`` counts only the paths
    through this use, not through other inputs computed from it), else a detached leaf."""
    return tensor.view_as(tensor) if tensor.requires_grad else tensor.detach().requires_grad_()


class _OutputVariance(torch.autograd.Function):
    """γ² Σ/(Σ+ε) per channel (γ None: Σ/(Σ+ε))."""

    @staticmethod
    def forward(ctx: Any, variance: Tensor, weight: Tensor | None, eps: float) -> Tensor:  # type: ignore[override]
        out = torch.empty_like(variance)
        per_channel.call("output_variance", variance, weight, native.parameters(eps), out)
        ctx.save_for_backward(variance, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        variance, weight = ctx.saved_tensors
        if torch.is_grad_enabled() or not per_channel.takes(
            variance, weight, grad.contiguous(), kernel="output_variance_backward"
        ):
            with torch.enable_grad():
                inputs = [_differentiable(t) for t in (variance, weight) if t is not None]
                if weight is None:
                    value = _reference_variance(inputs[0], None, ctx.eps)
                else:
                    value = _reference_variance(inputs[0], inputs[1], ctx.eps)
                found = torch.autograd.grad(value, inputs, grad, create_graph=torch.is_grad_enabled())
            return found[0], (found[1] if weight is not None else None), None
        grad_variance = torch.empty_like(variance)
        grad_weight = torch.empty_like(variance) if weight is not None and ctx.needs_input_grad[1] else None
        per_channel.call(
            "output_variance_backward",
            variance,
            weight,
            native.parameters(ctx.eps),
            grad.contiguous(),
            grad_variance,
            grad_weight,
        )
        return grad_variance, grad_weight, None


def _reference_variance(variance: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return moments.normalized_output_moments(variance, variance, weight, None, eps)[1]


def normalized_output_moments(
    posterior_mean: Tensor, posterior_variance: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """:func:`bkn_export.moments.normalized_output_moments`, the variance as one fused node where it can be.

    posterior_mean, posterior_variance: (C,); weight γ, bias β: (C,) or None. Returns (β, γ² Σ/(Σ+ε))."""
    same = weight is None or (weight.dtype == posterior_variance.dtype and weight.shape == posterior_variance.shape)
    if not (same and _applies("output_variance", posterior_variance, weight)):
        return moments.normalized_output_moments(posterior_mean, posterior_variance, weight, bias, eps)
    # β as a view, as the reference returns it (a plain tensor: never the Parameter itself).
    out_mean = (
        torch.zeros_like(posterior_mean) if bias is None else bias.to(posterior_mean.dtype).expand_as(posterior_mean)
    )
    return out_mean, _OutputVariance.apply(posterior_variance, weight, eps)


class _PriorAssembly(torch.autograd.Function):
    """(v_pred + softplus(r), L sigmoid(l) k) per channel; k (the known-channel mask) is a constant."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, variance: Tensor, raw: Tensor, logit: Tensor, known: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        out_variance, out_weight = torch.empty_like(variance), torch.empty_like(variance)
        parameters = native.parameters(_LIMIT)
        per_channel.call("prior_assembly", variance, raw, logit, known, parameters, out_variance, out_weight)
        ctx.save_for_backward(raw, logit, known)
        return out_variance, out_weight

    @staticmethod
    def backward(ctx: Any, grad_variance: Tensor | None, grad_weight: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        raw, logit, known = ctx.saved_tensors
        grads = (_contiguous(grad_variance), _contiguous(grad_weight))
        if torch.is_grad_enabled() or not per_channel.takes(raw, *grads, kernel="prior_assembly_backward"):
            with torch.enable_grad():
                inputs = [_differentiable(t) for t in (raw, logit)]
                outputs = _reference_assembly(torch.zeros_like(raw), inputs[0], inputs[1], known)
                pairs = [(o, g) for o, g in zip(outputs, (grad_variance, grad_weight)) if g is not None]
                found = torch.autograd.grad(
                    [o for o, _ in pairs], inputs, [g for _, g in pairs], create_graph=torch.is_grad_enabled(),
                    allow_unused=True,
                )  # fmt: skip
            return grad_variance, found[0], found[1], None
        grad_raw, grad_logit = torch.empty_like(raw), torch.empty_like(raw)
        per_channel.call(
            "prior_assembly_backward", raw, logit, known, native.parameters(_LIMIT), *grads, grad_raw, grad_logit
        )
        return grad_variance, grad_raw, grad_logit, None


def _reference_assembly(variance: Tensor, raw: Tensor, logit: Tensor, known: Tensor | None) -> tuple[Tensor, Tensor]:
    """What :meth:`bkn_export.nn.BatchKalmanNorm._prior` computes unfused (same operators)."""
    weight = Fk.PRIOR_WEIGHT_LIMIT * torch.sigmoid(logit)
    return variance + torch.nn.functional.softplus(raw), weight if known is None else weight * known


def assembled_prior(variance: Tensor, raw: Tensor, logit: Tensor, known: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """(v_pred + softplus(r), L sigmoid(l) [· k]) as one node, or None where the fused form does
    not apply (the caller then runs its own operators). All (C,) of one dtype."""
    if not _applies("prior_assembly", variance, raw, logit, known):
        return None
    if known is not None and known.requires_grad:
        return None
    return _PriorAssembly.apply(variance, raw, logit, known)  # type: ignore[no-any-return]
