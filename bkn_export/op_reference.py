"""The functional reference in the shape of the custom ops' outputs.

Every implementation of ``bkn::batch_kalman_norm`` / ``..._backward`` (the default
one in :mod:`bkn_export.ops`, the CPU fast path's fallback, the CUDA registration's
fallback) returns these tuples; this is the one place that adapts
:mod:`bkn_export.functional` to them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bkn_export import functional as Fk

__all__ = ["reference_backward", "reference_forward"]


def reference_forward(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, posterior_mean, posterior_variance) from :func:`functional.batch_kalman_norm`."""
    step = Fk.batch_kalman_norm(x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio)
    # Custom ops may not return their inputs (aliasing); the functional never does.
    return step.output, step.posterior_mean, step.posterior_variance


def reference_backward(
    grad_output: Tensor,
    grad_posterior_mean: Tensor,
    grad_posterior_variance: Tensor,
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads for (x, prior_mean, prior_variance, prior_weight, weight, bias) from the closed form.

    The γ gradient is zeros when ``weight`` is None: the op always returns one.
    """
    grad_x, grad_mean, grad_variance, grad_p, grad_weight, grad_bias = Fk.batch_kalman_norm_backward(
        grad_output,
        grad_posterior_mean,
        grad_posterior_variance,
        x,
        prior_mean,
        prior_variance,
        prior_weight,
        weight,
        eps,
        fallback_ratio,
    )
    assert grad_bias is not None  # the reference always returns Σ g
    if grad_weight is None:
        grad_weight = torch.zeros_like(grad_bias)
    return grad_x, grad_mean, grad_variance, grad_p, grad_weight, grad_bias
