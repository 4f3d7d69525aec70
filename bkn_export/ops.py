"""The custom op ``torch.ops.bkn.batch_kalman_norm`` (and its backward op).

The op is one BKN step after the prediction (batch statistics, Kalman update,
normalize); its math is :func:`bkn_export.functional.batch_kalman_norm`. Keeping it an
opaque op gives three things: the ONNX exporter can map it to the custom ONNX op
``ai.bkn::BatchKalmanNorm`` (``bkn_export.export.training``), the CUDA implementation
can be a fused Triton kernel (``bkn_export.kernels``), and ``torch.export`` /
``torch.compile`` see one node with a fake implementation for shapes.

The default implementations (any device without a registered kernel) are the
functional reference; on CPU both ops run :mod:`bkn_export.cpu_kernels`, a fast path
with fewer passes that is tested against the reference. Autograd uses the closed-form
backward, itself a custom op so that devices can provide a fused kernel for it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from bkn_export import cpu_kernels
from bkn_export import functional as Fk
from bkn_export.op_reference import reference_backward, reference_forward

__all__ = ["batch_kalman_norm", "batch_kalman_norm_backward", "kalman_norm_step"]


@torch.library.custom_op("bkn::batch_kalman_norm", mutates_args=())
def batch_kalman_norm(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: (N, C, *); prior_*: (C,); returns (y, posterior_mean, posterior_variance)."""
    return reference_forward(x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio)


@batch_kalman_norm.register_fake
def _batch_kalman_norm_fake(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = Fk.statistics_dtype(x.dtype)
    channels = x.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty((channels,), dtype=acc),
        x.new_empty((channels,), dtype=acc),
    )


@torch.library.custom_op("bkn::batch_kalman_norm_backward", mutates_args=())
def batch_kalman_norm_backward(
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
    """Gradients for (x, prior_mean, prior_variance, prior_weight, weight, bias).

    The weight gradient is returned even when ``weight`` is None (autograd drops it).
    """
    return reference_backward(
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


@batch_kalman_norm_backward.register_fake
def _batch_kalman_norm_backward_fake(
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
    acc = Fk.statistics_dtype(x.dtype)
    channels = x.shape[1]
    return (
        torch.empty_like(x),
        torch.empty_like(prior_mean),
        torch.empty_like(prior_variance),
        torch.empty_like(prior_weight),
        x.new_empty((channels,), dtype=acc),
        x.new_empty((channels,), dtype=acc),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio = inputs
    ctx.save_for_backward(x, prior_mean, prior_variance, prior_weight, weight)
    ctx.eps = eps
    ctx.fallback_ratio = fallback_ratio
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_with(
    implementation: Callable[..., tuple[Tensor, ...]],
    ctx: Any,
    grad_output: Tensor | None,
    grad_mean: Tensor | None,
    grad_variance: Tensor | None,
) -> tuple[Any, ...]:
    """Gradients of the forward op's 8 inputs, computed by ``implementation`` (the backward op or a kernel)."""
    x, prior_mean, prior_variance, prior_weight, weight = ctx.saved_tensors
    acc = Fk.statistics_dtype(x.dtype)
    channels = x.shape[1]
    # Autograd passes None for outputs that did not reach the loss.
    if grad_output is None:
        grad_output = torch.zeros_like(x)
    if grad_mean is None:
        grad_mean = x.new_zeros((channels,), dtype=acc)
    if grad_variance is None:
        grad_variance = x.new_zeros((channels,), dtype=acc)
    grad_x, g_mean, g_var, g_p, g_weight, g_bias = implementation(
        grad_output,
        grad_mean,
        grad_variance,
        x,
        prior_mean,
        prior_variance,
        prior_weight,
        weight,
        ctx.eps,
        ctx.fallback_ratio,
    )
    return (
        grad_x,
        g_mean,
        g_var,
        g_p,
        g_weight.to(weight.dtype) if weight is not None else None,
        g_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
        None,
        None,
    )


def _backward(ctx: Any, grad_output: Tensor, grad_mean: Tensor, grad_variance: Tensor) -> tuple[Any, ...]:
    return _backward_with(batch_kalman_norm_backward, ctx, grad_output, grad_mean, grad_variance)


class _EagerCpuBatchKalmanNorm(torch.autograd.Function):
    """The op's CPU kernels and autograd without torch.library's Python dispatch.

    Same kernels (:mod:`bkn_export.cpu_kernels`), same context and backward as the op;
    used only by :func:`kalman_norm_step` in plain eager CPU execution, where the op's
    dispatch layers cost about a third of a small layer's training step.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        outputs = cpu_kernels.batch_kalman_norm(*inputs)
        _setup_context(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _backward_with(cpu_kernels.batch_kalman_norm_backward, ctx, *grads)


def _plain_eager_cpu(x: Tensor) -> bool:
    """True when nothing traces or transforms this call: eager CPU, a plain tensor, no mode active."""
    return (
        type(x) is Tensor
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not _is_exporting()
        and _current_dispatch_mode() is None
        and not torch._C._are_functorch_transforms_active()
    )


def _is_exporting() -> bool:
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check()) if check is not None else False


def kalman_norm_step(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.bkn.batch_kalman_norm`` as the modules call it.

    Under tracing (torch.export, the ONNX exporter, torch.compile, functorch) and on other
    devices this is the custom op itself, so graphs keep one opaque node and CUDA gets the
    Triton kernels. In plain eager CPU execution it runs the op's CPU kernels and autograd
    directly (identical results), skipping the dispatch overhead.
    """
    if _plain_eager_cpu(x):
        return _EagerCpuBatchKalmanNorm.apply(  # type: ignore[no-any-return]
            x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio
        )
    return torch.ops.bkn.batch_kalman_norm(  # type: ignore[no-any-return]
        x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio
    )


batch_kalman_norm.register_autograd(_backward, setup_context=_setup_context)
batch_kalman_norm.register_kernel("cpu")(cpu_kernels.batch_kalman_norm)
batch_kalman_norm_backward.register_kernel("cpu")(cpu_kernels.batch_kalman_norm_backward)

# Registers the Triton kernels for CUDA tensors when triton and a GPU are present; it never
# imports triton here, so CPU use cannot break for want of it.
from bkn_export import kernels as _kernels  # noqa: E402, F401
