"""The custom op ``bkn::batch_kalman_norm`` and its backward op: definition, fakes, autograd, dispatch.

One BKN step after the prediction (batch statistics, Kalman update, normalize), as one
opaque op: the ONNX exporter maps it to the custom ONNX op ``ai.bkn::BatchKalmanNorm``
(``bkn_export.export.training``), the TensorRT plugin mirrors it, CUDA runs it as fused
Triton kernels, and ``torch.export`` / ``torch.compile`` see one node with a fake
implementation for shapes. The math is :func:`bkn_export.functional.batch_kalman_norm`
(forward) and :func:`~bkn_export.functional.batch_kalman_norm_backward` (its closed-form
vector-Jacobian product)::

    x̄, S = mean, biased variance of x over (N, *)        d = x̄ - μ_pred,  q = 1 - p
    p ← 0 where the fallback rule fires: mean(Σ_pred / S) ≥ fallback_ratio  (a device-side select)
    μ = p μ_pred + q x̄,  Σ = p Σ_pred + q S + p q d²,  y = γ (x - μ) / sqrt(Σ + ε) + β

This file is the one place that says what runs where::

    torch.ops.bkn.batch_kalman_norm(*KalmanNormInputs)         → (y, posterior_mean, posterior_variance)
    torch.ops.bkn.batch_kalman_norm_backward(∂L/∂outputs, inputs without β) → ∂L/∂(x, μ_pred, Σ_pred, p, γ, β)

    device      both ops                                                    (BACKENDS)
    cpu         cpu_kernels, where cpu_kernels.covers the inputs; else the reference
    cuda        kernels' Triton launchers, where kernels.uses_kernels(x); else the reference
    any other   the functional reference
    fake/meta   _forward_fake / _backward_fake (shapes and dtypes only)
    autograd    forward op → the backward op;
                backward op → VJP of the functional backward (second derivatives, any order)

On the Python side the forward op's arguments travel as one value,
:class:`~bkn_export.functional.KalmanNormInputs`; the ``torch.library`` schemas below
stay flat (the ONNX op and the TensorRT plugin mirror them). The backward op's
arguments are the output gradients (a :class:`~bkn_export.functional.KalmanStep` of
gradients) and the forward's inputs without β (its gradient needs no input).

:func:`kalman_norm_step` is what the modules call: the op itself, except in plain eager
CPU execution, where it runs the CPU row of the table through an ``autograd.Function``
directly (same functions, bit for bit the same results), skipping the op's dispatch layers,
and its backward starts from the forward's batch statistics and update terms instead of
recomputing them: a training step (forward + backward) of a (2, 4, 2, 2) input takes ~175 µs
through the op, ~110 µs this way (torch 2.13, 1 thread, on a shared machine).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format  # ATen's rule for BatchNorm's output layout

from bkn_export import cpu_kernels, kernels, native
from bkn_export import functional as Fk
from bkn_export.functional import KalmanNormInputs, KalmanStep
from bkn_export.tracing import nothing_traces

__all__ = [
    "BACKENDS",
    "BACKWARD_SCHEMA",
    "FORWARD_SCHEMA",
    "Backend",
    "KalmanNormInputs",
    "batch_kalman_norm",
    "batch_kalman_norm_backward",
    "channel_constant",
    "kalman_norm_step",
    "plain_eager_cpu",
]

#: ``bkn::batch_kalman_norm``'s schema; argument names and order are KalmanNormInputs' fields.
FORWARD_SCHEMA = (
    "(Tensor x, Tensor prior_mean, Tensor prior_variance, Tensor prior_weight, Tensor? weight, Tensor? bias, "
    "float eps, float fallback_ratio) -> (Tensor, Tensor, Tensor)"
)

#: ``bkn::batch_kalman_norm_backward``'s schema: ∂L/∂(y, posterior_mean, posterior_variance),
#: then the forward's inputs without ``bias``; returns ∂L/∂(x, prior_mean, prior_variance,
#: prior_weight, weight, bias) (the weight's as zeros when ``weight`` is None).
BACKWARD_SCHEMA = (
    "(Tensor grad_output, Tensor grad_posterior_mean, Tensor grad_posterior_variance, Tensor x, "
    "Tensor prior_mean, Tensor prior_variance, Tensor prior_weight, Tensor? weight, float eps, "
    "float fallback_ratio) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_InputGradients = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _backward_arguments(inputs: KalmanNormInputs, grads: KalmanStep) -> tuple[Any, ...]:
    """The backward op's flat arguments (BACKWARD_SCHEMA) from the forward's inputs and the output gradients."""
    x, prior_mean, prior_variance, prior_weight, weight, _bias, eps, fallback_ratio = inputs
    return (*grads, x, prior_mean, prior_variance, prior_weight, weight, eps, fallback_ratio)


def _split_backward_arguments(args: tuple[Any, ...]) -> tuple[KalmanNormInputs, KalmanStep]:
    """Inverse of :func:`_backward_arguments` (``bias`` comes back as None)."""
    grad_output, grad_mean, grad_variance, x, prior_mean, prior_variance, prior_weight, weight, eps, ratio = args
    inputs = KalmanNormInputs(x, prior_mean, prior_variance, prior_weight, weight, None, eps, ratio)
    return inputs, KalmanStep(grad_output, grad_mean, grad_variance)


# --------------------------------------------------------------------------- the reference


def laid_out(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (x's shape: y or ∂L/∂x) in the layout of BatchNorm's output, ``suggest_memory_format(x)``:
    channels-last where x is channels-last, else contiguous (a transposed ``(N, C, L)`` view gives a contiguous
    output, as ATen's BatchNorm does). The ops' fakes promise this layout and every backend returns it, so that a
    traced graph (torch.compile, torch.export, the ONNX exporter) sees the strides eager execution gives: a
    ``view`` after the layer that works in eager works there too. A copy only where ``t`` is in another layout."""
    layout = suggest_memory_format(x)
    return t if t.is_contiguous(memory_format=layout) else t.contiguous(memory_format=layout)


def _laid_out_step(step: KalmanStep, x: Tensor) -> KalmanStep:
    return KalmanStep(laid_out(step.output, x), step.posterior_mean, step.posterior_variance)


def _laid_out_gradients(grads: _InputGradients, x: Tensor) -> _InputGradients:
    return (laid_out(grads[0], x), *grads[1:])  # type: ignore[return-value]


def _reference_forward(inputs: KalmanNormInputs) -> KalmanStep:
    # A custom op may not return its inputs (aliasing); the functional never does.
    return _laid_out_step(Fk.batch_kalman_norm(*inputs), inputs.x)


def _reference_backward(inputs: KalmanNormInputs, grads: KalmanStep) -> _InputGradients:
    grad_x, grad_mean, grad_variance, grad_p, grad_weight, grad_bias = Fk.batch_kalman_norm_backward(
        *_backward_arguments(inputs, grads)
    )
    assert grad_bias is not None  # the reference always returns Σ g
    if grad_weight is None:  # the op always returns one
        grad_weight = torch.zeros_like(grad_bias)
    return laid_out(grad_x, inputs.x), grad_mean, grad_variance, grad_p, grad_weight, grad_bias


# --------------------------------------------------------------------------- backends


class Backend(NamedTuple):
    """How one device type runs both ops.

    ``covers(inputs, grads)`` says whether ``forward(inputs)`` (grads None) or
    ``backward(inputs, grads)`` takes these inputs; where it does not, the functional
    reference runs instead (same results, same error messages).
    """

    covers: Callable[[KalmanNormInputs, KalmanStep | None], bool]
    forward: Callable[[KalmanNormInputs], KalmanStep]
    backward: Callable[[KalmanNormInputs, KalmanStep], _InputGradients]


def _cuda_covers(inputs: KalmanNormInputs, grads: KalmanStep | None) -> bool:
    return kernels.uses_kernels(inputs.x)


def _cuda_launchers() -> kernels.Launchers:
    launchers = kernels.launchers()
    assert launchers is not None  # kernels.uses_kernels checked it
    return launchers


def _cuda_forward(inputs: KalmanNormInputs) -> KalmanStep:
    with kernels.launching_on(inputs.x):
        return KalmanStep(*_cuda_launchers().forward(*inputs))


def _cuda_backward(inputs: KalmanNormInputs, grads: KalmanStep) -> _InputGradients:
    with kernels.launching_on(inputs.x):
        return _cuda_launchers().backward(*_backward_arguments(inputs, grads))


_TRITON = Backend(_cuda_covers, _cuda_forward, _cuda_backward)

#: Device type → its implementation of both ops (registered below, whatever the machine has). Under
#: :data:`kernels.TRITON_ON_CPU` (tests: Triton's interpreter) the CPU takes the CUDA row.
BACKENDS: dict[str, Backend] = {
    "cpu": _TRITON
    if kernels.TRITON_ON_CPU
    else Backend(cpu_kernels.covers, cpu_kernels.batch_kalman_norm, cpu_kernels.batch_kalman_norm_backward),
    "cuda": _TRITON,
}


def _forward_on(backend: Backend, inputs: KalmanNormInputs) -> KalmanStep:
    if backend.covers(inputs, None):
        return _laid_out_step(backend.forward(inputs), inputs.x)
    return _reference_forward(inputs)


def _backward_on(backend: Backend, inputs: KalmanNormInputs, grads: KalmanStep) -> _InputGradients:
    if backend.covers(inputs, grads):
        return _laid_out_gradients(backend.backward(inputs, grads), inputs.x)
    return _reference_backward(inputs, grads)


# --------------------------------------------------------------------------- the ops and their fakes


@torch.library.custom_op("bkn::batch_kalman_norm", mutates_args=(), schema=FORWARD_SCHEMA)
def batch_kalman_norm(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Devices without a backend: the functional reference. x: (N, C, *); returns (y, μ_{k|k}, Σ_{k|k})."""
    return _reference_forward(KalmanNormInputs(*args))


@torch.library.custom_op("bkn::batch_kalman_norm_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def batch_kalman_norm_backward(*args: Any) -> _InputGradients:
    """Devices without a backend: the functional reference's closed-form gradients."""
    return _reference_backward(*_split_backward_arguments(args))


@batch_kalman_norm.register_fake
def _forward_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    x = KalmanNormInputs(*args).x
    statistics = x.new_empty((x.shape[1],), dtype=Fk.statistics_dtype(x.dtype))
    return torch.empty_like(x, memory_format=suggest_memory_format(x)), statistics, torch.empty_like(statistics)


@batch_kalman_norm_backward.register_fake
def _backward_fake(*args: Any) -> _InputGradients:
    inputs, _ = _split_backward_arguments(args)
    x = inputs.x
    statistics = x.new_empty((x.shape[1],), dtype=Fk.statistics_dtype(x.dtype))
    return (
        torch.empty_like(x, memory_format=suggest_memory_format(x)),
        torch.empty_like(inputs.prior_mean),
        torch.empty_like(inputs.prior_variance),
        torch.empty_like(inputs.prior_weight),
        statistics,
        torch.empty_like(statistics),
    )


# --------------------------------------------------------------------------- autograd


def _save_inputs(ctx: Any, inputs: KalmanNormInputs) -> None:
    ctx.save_for_backward(*inputs[:6])  # the six tensors; eps and fallback_ratio are floats
    ctx.eps, ctx.fallback_ratio = inputs.eps, inputs.fallback_ratio


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _save_inputs(ctx, KalmanNormInputs(*inputs))
    # Outputs that reach no loss come to _backward as None (not zeros autograd would fill per call): the backward
    # op then reads one cached zeros tensor (_defined_gradients).
    ctx.set_materialize_grads(False)


def _saved_inputs(ctx: Any, saved: tuple[Any, ...] | None = None) -> KalmanNormInputs:
    """The forward's inputs from ``ctx`` (``saved``: its ``saved_tensors`` where the caller read them already:
    a checkpoint's saved-tensor hooks unpack each tensor only once)."""
    tensors: tuple[Any, ...] = (*(ctx.saved_tensors if saved is None else saved)[:6], ctx.eps, ctx.fallback_ratio)
    return KalmanNormInputs(*tensors)


def _defined_gradients(grads: tuple[Tensor | None, ...], inputs: KalmanNormInputs) -> KalmanStep:
    """Zeros for the outputs that did not reach the loss (autograd passes None for them)."""
    grad_output, grad_mean, grad_variance = grads
    x = inputs.x
    if grad_mean is None or grad_variance is None:
        zeros = channel_constant(x, 0.0)
        grad_mean = zeros if grad_mean is None else grad_mean
        grad_variance = zeros if grad_variance is None else grad_variance
    return KalmanStep(torch.zeros_like(x) if grad_output is None else grad_output, grad_mean, grad_variance)


#: (C,) constants in the statistics dtype per (value, C, dtype, device), in plain eager execution: read-only inputs
#: of the ops (``mutates_args=()``), never written.
_CHANNEL_CONSTANTS: dict[tuple[float, int, torch.dtype, torch.device], Tensor] = {}
_CHANNEL_CONSTANTS_SIZE = 512


def channel_constant(x: Tensor, value: float) -> Tensor:
    """(C,) filled with ``value`` in ``x: (N, C, *)``'s statistics dtype, on its device: the absent gradients of
    the posteriors (zeros) and a first-in-chain layer's constant prior (zeros, ones). In plain eager execution one
    cached tensor per value, shape, dtype and device, never to be written into: on CUDA such a constant then costs
    no fill kernel per step (made in the first step: run one before capturing a CUDA graph). Traced (compile,
    export, a dispatch mode, a torch.func transform), a fresh tensor, so that graphs build their own."""
    statistics_dtype = Fk.statistics_dtype(x.dtype)
    channels = x.shape[1]
    if not (native.untraced() and type(x) is Tensor):
        return x.new_full((channels,), value, dtype=statistics_dtype)
    key = (float(value), int(channels), statistics_dtype, x.device)
    constant = _CHANNEL_CONSTANTS.get(key)
    if constant is None:
        with torch.inference_mode(False), torch.no_grad():
            constant = torch.full((channels,), value, dtype=statistics_dtype, device=x.device)
        if len(_CHANNEL_CONSTANTS) >= _CHANNEL_CONSTANTS_SIZE:
            _CHANNEL_CONSTANTS.clear()
        _CHANNEL_CONSTANTS[key] = constant
    return constant


def _through_backward_op(inputs: KalmanNormInputs, grads: KalmanStep) -> _InputGradients:
    return torch.ops.bkn.batch_kalman_norm_backward(*_backward_arguments(inputs, grads))  # type: ignore[no-any-return]


def _input_gradients(
    inputs: KalmanNormInputs,
    output_grads: tuple[Tensor | None, ...],
    backward: Callable[[KalmanNormInputs, KalmanStep], _InputGradients],
) -> tuple[Tensor | None, ...]:
    """Gradients of the forward op's 8 inputs (as saved: :func:`_saved_inputs`), computed by ``backward`` (the
    backward op or a backend)."""
    grad_x, grad_mean, grad_variance, grad_p, grad_weight, grad_bias = backward(
        inputs, _defined_gradients(output_grads, inputs)
    )
    weight, bias = inputs.weight, inputs.bias
    return (
        grad_x,
        grad_mean,
        grad_variance,
        grad_p,
        grad_weight.to(weight.dtype) if weight is not None else None,
        grad_bias.to(bias.dtype) if bias is not None else None,
        None,
        None,
    )


def _backward(ctx: Any, *output_grads: Tensor | None) -> tuple[Tensor | None, ...]:
    return _input_gradients(_saved_inputs(ctx), output_grads, _through_backward_op)


def _setup_double_backward(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    step_inputs, grads = _split_backward_arguments(inputs)
    ctx.save_for_backward(*grads, *step_inputs[:5])  # x, the prior, the gain, γ (β is not an input here)
    ctx.eps, ctx.fallback_ratio = step_inputs.eps, step_inputs.fallback_ratio


def _double_backward(ctx: Any, *cotangents: Tensor | None) -> tuple[Tensor | None, ...]:
    """VJP of the backward op: autograd through the functional backward's plain ops, recomputed.

    The functional backward is differentiable (the fallback rule is a ``torch.where`` on
    a comparison, the rest smooth), and ``torch.func.vjp`` keeps the result attached to
    the saved tensors' graph, so third and higher derivatives follow.
    """
    saved: tuple[Tensor | None, ...] = ctx.saved_tensors
    primals = [t for t in saved if t is not None]  # γ may be None

    def backward_of(*tensors: Tensor) -> _InputGradients:
        given = iter(tensors)
        args = [None if t is None else next(given) for t in saved]
        return _reference_backward(*_split_backward_arguments((*args, ctx.eps, ctx.fallback_ratio)))

    outputs, vjp, *_ = torch.func.vjp(backward_of, *primals)
    defined = tuple(torch.zeros_like(o) if c is None else c for c, o in zip(cotangents, outputs))
    grads = iter(vjp(defined))
    return (*(None if t is None else next(grads) for t in saved), None, None)


# --------------------------------------------------------------------------- registration, in one place


def _device_kernels(backend: Backend) -> tuple[Callable[..., KalmanStep], Callable[..., _InputGradients]]:
    def forward(*args: Any) -> KalmanStep:
        return _forward_on(backend, KalmanNormInputs(*args))

    def backward(*args: Any) -> _InputGradients:
        return _backward_on(backend, *_split_backward_arguments(args))

    return forward, backward


for _device, _backend in BACKENDS.items():
    _forward_kernel, _backward_kernel = _device_kernels(_backend)
    batch_kalman_norm.register_kernel(_device)(_forward_kernel)
    batch_kalman_norm_backward.register_kernel(_device)(_backward_kernel)
batch_kalman_norm.register_autograd(_backward, setup_context=_setup_context)
batch_kalman_norm_backward.register_autograd(_double_backward, setup_context=_setup_double_backward)


# --------------------------------------------------------------------------- the modules' entry point

_CPU = BACKENDS["cpu"]


class _EagerCpuBatchKalmanNorm(torch.autograd.Function):
    """The op's CPU row and autograd without torch.library's Python dispatch (see the module docstring).

    ``forward`` takes ``ctx`` instead of a separate ``setup_context``: with the latter,
    ``apply`` binds the arguments through ``inspect.signature`` on every call (~25 µs here,
    against ~110 µs for a whole step on a tiny input). Neither this nor the op supports torch.func
    transforms (torch.library's registered autograd is ctx-style too, torch 2.13).

    Where :func:`cpu_kernels.covers` the inputs, the forward keeps its batch statistics and
    update terms (:class:`cpu_kernels.ForwardState`; only the posterior where the C kernel of
    :mod:`bkn_export.native` computed it: its backward kernel recomputes the rest) and a
    first-order backward starts from them (:func:`cpu_kernels.backward_from_state`) instead of
    recomputing the batch statistics, and skips the
    prior's gradients where autograd needs none (a constant prior: a first-in-chain layer's,
    or a fixed gain); that is bit for bit the backward op's result, which recomputes the same
    state. The posterior
    (an output) is saved with ``save_for_backward``; the other terms are intermediates with
    no autograd history, kept on ``ctx``.
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        inputs = KalmanNormInputs(*args)
        # Outputs that do not reach the loss (every layer's posterior mean in efficientnet-b0 / mobilenetv3)
        # come to backward as None instead of autograd's materialized zeros: one (C,) zeros per layer and step
        # saved; backward and backward_from_state take None for any of the three.
        ctx.set_materialize_grads(False)
        ctx.eps, ctx.fallback_ratio = inputs.eps, inputs.fallback_ratio
        if not _CPU.covers(inputs, None):
            ctx.state = None
            ctx.save_for_backward(*inputs[:6])
            return tuple(_reference_forward(inputs))  # type: ignore[return-value]
        step, state = cpu_kernels.forward_with_state(inputs)
        step = _laid_out_step(step, inputs.x)
        ctx.save_for_backward(*inputs[:6], step.posterior_mean, step.posterior_variance)
        # Not the posterior itself (an output: saved above), or ctx would hold it in a cycle.
        ctx.state = (state.stats, state.prior_weight, state.terms[2:], state.fired)
        return tuple(step)  # type: ignore[return-value]

    @staticmethod
    def backward(ctx: Any, *output_grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        inputs = _saved_inputs(ctx, saved)
        if torch.is_grad_enabled():  # create_graph=True: the backward op has the second derivative
            return _input_gradients(inputs, output_grads, _through_backward_op)
        if ctx.state is None:
            return _input_gradients(inputs, output_grads, functools.partial(_backward_on, _CPU))
        x, weight, bias = inputs.x, inputs.weight, inputs.bias
        mean, variance = saved[6:8]
        if not _state_takes(output_grads, x, mean):
            return _input_gradients(inputs, output_grads, functools.partial(_backward_on, _CPU))
        stats, effective_weight, intermediates, fired = ctx.state
        terms = Fk.UpdateTerms(mean, variance, *intermediates)
        state = cpu_kernels.ForwardState(stats, effective_weight, terms, fired)
        grad_output = output_grads[0]
        if grad_output is None:
            grad_output = torch.zeros_like(x)
        needs = ctx.needs_input_grad
        grads = cpu_kernels.backward_from_state(
            inputs, state, grad_output, output_grads[1], output_grads[2], (needs[1], needs[2], needs[3])
        )
        # The fast path's per-channel tensors have x's dtype: no casts (cpu_kernels.covers).
        weight_grad = grads[4] if weight is not None else None
        bias_grad = grads[5] if bias is not None else None
        return (laid_out(grads[0], x), *grads[1:4], weight_grad, bias_grad, None, None)


def _state_takes(output_grads: tuple[Tensor | None, ...], x: Tensor, posterior: Tensor) -> bool:
    """Whether the saved-state backward takes these output gradients: each in x's dtype and
    device and its output's shape (what autograd passes; else ``cpu_kernels.covers`` decides)."""
    for grad, output in zip(output_grads, (x, posterior, posterior)):
        if grad is not None and (grad.dtype != x.dtype or grad.shape != output.shape or grad.device != x.device):
            return False
    return True


def plain_eager_cpu(x: Tensor) -> bool:
    """True when nothing traces this call: a plain CPU tensor, no compile, export, jit trace or
    dispatch mode (fake tensors, make_fx, FlopCounterMode...)."""
    return (
        type(x) is Tensor
        and x.device.type == "cpu"
        and not kernels.TRITON_ON_CPU  # the CPU takes the CUDA route (tests, Triton's interpreter)
        and nothing_traces()
    )


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
    """``torch.ops.bkn.batch_kalman_norm`` as the modules call it: (y, posterior_mean, posterior_variance).

    x: (N, C, *); prior_*: (C,); weight, bias: (C,) or None. Under tracing (torch.export, the
    ONNX exporter, torch.compile, make_fx, dispatch modes) and on other devices this is the
    custom op itself, so graphs keep one opaque node and CUDA gets the Triton kernels. In
    plain eager CPU execution it runs the op's CPU implementation and autograd directly.
    γ goes through :func:`bkn_export.functional.contiguous_weight`.
    """
    weight = Fk.contiguous_weight(weight)
    if plain_eager_cpu(x):
        return _EagerCpuBatchKalmanNorm.apply(  # type: ignore[no-any-return]
            x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio
        )
    return torch.ops.bkn.batch_kalman_norm(  # type: ignore[no-any-return]
        x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio
    )
