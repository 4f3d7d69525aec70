"""The head of a prediction path as one autograd node: a source's output Gaussian, an activation's moments and
a conv's / Linear's moments in one ``autograd.Function``.

A wired layer's prediction from a source normalization j usually starts with the same two or three formulas
(``benchmarks/bench_networks.py --profile``)::

    v0 = γ_j² Σ_j / (Σ_j + ε)                   (prior_source "output": the source's output Gaussian (β_j, v0))
    (m1, v1) = moments of f(X), X ~ N(m0, v0)   (ReLU, piecewise, Gauss–Hermite: :mod:`bkn_export.chain.fast`)
    (M, V) = moments of W X + b                 (a conv / Linear: :func:`bkn_export.chain.fast.affine_moments`)

Each is its own fused ``autograd.Function`` (:mod:`bkn_export.fast_prior`, :mod:`bkn_export.chain.fast`), one C
kernel (CPU) or Triton twin (CUDA) per direction. :class:`_PathMoments` runs their forward and backward bodies as
stages of one node: the same kernels in the same order on the same values, so its results are bit for bit
those of the separate Functions (tested), with one autograd node where there were two or three. A stage's body
sees a :class:`_StageContext` in place of its own ctx.

:func:`predict_source_path` is what :class:`bkn_export.chain.transitions.Propagate` calls for a path that starts
at a normalization; it returns None (the caller then runs the steps one by one) where fewer than two stages
apply, e.g. nothing fused applies (tracing, :func:`bkn_export.chain.fast.reference_only`, another dtype) or the
path starts with a step the fused forms do not cover (prelu, pooling, a squeeze-and-excitation gate).
Under ``create_graph=True`` the backward differentiates the separate Functions again (second derivatives).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from bkn_export import fast_prior, kernels, native, per_channel
from bkn_export.chain import fast
from bkn_export.chain.scope import Published
from bkn_export.chain.steps import Affine, Elementwise, Moments, Spatial, Step, linear_runs

__all__ = ["PathPlan", "SourcePrediction", "predict_source_path", "predict_steps", "separate"]


_ENABLED: ContextVar[bool] = ContextVar("bkn_path_moments", default=True)


@contextmanager
def separate() -> Iterator[None]:
    """Within the block (this thread / task) every path runs its steps as separate nodes (the fused forms still
    apply one by one): what tests and benchmarks compare :class:`_PathMoments` with."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


class _StageContext:
    """What the moments Functions use of an autograd ctx (``save_for_backward``, ``saved_tensors``,
    ``needs_input_grad``, attributes), so that their bodies run as stages of :class:`_PathMoments`."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple[Any, ...] = ()

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved_tensors = tensors


class PathPlan(NamedTuple):
    """The stages of one :class:`_PathMoments` node (constants of the path; at least two stages).

    eps: the source's ε where the node starts with its output variance γ² Σ/(Σ + ε), else None.
    activation: the moments Function of the activation and its constant arguments, or None.
    affine: a conv's coverage tables (f, H) or (None, None) for a conv without borders or a Linear; None
    without an affine stage.
    """

    eps: float | None
    activation: tuple[type[torch.autograd.Function], tuple[Any, ...]] | None
    affine: tuple[Tensor | None, Tensor | None] | None


class _PathMoments(torch.autograd.Function):
    """(M, V, v0) of a path's head (module docstring); v0 is the source's output variance (empty without that
    stage). Inputs: mean, variance (C_in,) — the source's β (or zeros) and Σ under the output-variance stage,
    else the Gaussian's own moments —; γ or None; W (C_out, C_in/g, *k) or None; the affine bias or None."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        plan: PathPlan,
        mean: Tensor,
        variance: Tensor,
        source_weight: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.plan = plan
        ctx.save_for_backward(mean, variance, source_weight, weight, bias)  # checked for in-place changes
        ctx.set_materialize_grads(False)  # v0 mostly reaches no loss: no zeros made for it
        arguments = _fused_arguments(plan, mean, variance, source_weight, weight, bias)
        ctx.fused = ctx.stages = None
        if arguments is not None:  # CUDA: one Triton launch for the whole head
            launcher = kernels.path_kernels()
            assert launcher is not None
            with kernels.launching_on(variance):
                out_mean, out_variance, fused_gaussian, taps = launcher.path_moments(*arguments)
            ctx.fused = (arguments, taps)  # the kernel's gaussian output is its own tensor: returned as it is
            return out_mean, out_variance, _gaussian_output(ctx, fused_gaussian, variance)
        needs = ctx.needs_input_grad
        stages: list[_StageContext | None] = [None, None, None]
        gaussian = None
        if plan.eps is not None:
            stages[0] = _StageContext((needs[2], needs[3], False))
            variance = fast_prior._OutputVariance.forward(stages[0], variance, source_weight, plan.eps)
            gaussian = variance
        if plan.activation is not None:
            function, constants = plan.activation
            stages[1] = _StageContext((True, True, *(False for _ in constants)))
            mean, variance = function.forward(stages[1], mean, variance, *constants)
        if plan.affine is not None:
            assert weight is not None
            stages[2] = _StageContext((needs[4], True, True, False, False))
            mean, variance = fast._AffineMoments.forward(stages[2], weight, mean, variance, *plan.affine)
            if bias is not None:
                mean = mean + bias
        ctx.stages = stages
        # A view: the stage keeps the tensor itself; the output (whose grad_fn is this node) must not be it.
        return mean, variance, _gaussian_output(ctx, None if gaussian is None else gaussian.view_as(gaussian), variance)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_mean: Tensor | None, grad_variance: Tensor | None, grad_gaussian: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        plan: PathPlan = ctx.plan
        if torch.is_grad_enabled():  # create_graph=True: the separate Functions, differentiated again
            grads = (grad_mean, grad_variance, grad_gaussian)
            return (None, *_differentiated(plan, saved, grads, ctx.needs_input_grad))
        if ctx.fused is not None:  # CUDA: two Triton launches (the rows' pass, then the inputs')
            arguments, taps = ctx.fused
            launcher = kernels.path_kernels()
            assert launcher is not None
            with kernels.launching_on(saved[1]):
                grads = launcher.path_moments_backward(
                    *arguments, taps, grad_mean, grad_variance, grad_gaussian,
                    weight_shape=None if saved[3] is None else tuple(saved[3].shape),
                )  # fmt: skip
            grad_mean_in, grad_variance_in, grad_source_weight, grad_weight, grad_bias = grads
            needs = ctx.needs_input_grad
            return (
                None, grad_mean_in, grad_variance_in, grad_source_weight if needs[3] else None,
                grad_weight if needs[4] else None, grad_bias if needs[5] else None,
            )  # fmt: skip
        outvar, activation, affine = ctx.stages
        grad_weight = grad_bias = grad_source_weight = None
        if plan.affine is not None:
            grad_bias = grad_mean if saved[4] is not None else None
            grad_weight, grad_mean, grad_variance = fast._AffineMoments.backward(affine, grad_mean, grad_variance)[:3]
        if plan.activation is not None:
            grad_mean, grad_variance = plan.activation[0].backward(activation, grad_mean, grad_variance)[:2]
        if plan.eps is not None:
            if grad_gaussian is not None:
                grad_variance = grad_gaussian if grad_variance is None else grad_variance + grad_gaussian
            if grad_variance is None:
                grad_variance = torch.zeros_like(saved[1])
            grad_variance, grad_source_weight = fast_prior._OutputVariance.backward(outvar, grad_variance)[:2]
        return None, grad_mean, grad_variance, grad_source_weight, grad_weight, grad_bias


def _gaussian_output(ctx: Any, gaussian: Tensor | None, like: Tensor) -> Tensor:
    """The node's third output: the source's output variance, or an empty non-differentiable tensor without that
    stage."""
    if gaussian is not None:
        return gaussian
    empty = like.new_empty(0)
    ctx.mark_non_differentiable(empty)
    return empty


def _fused_arguments(
    plan: PathPlan,
    mean: Tensor,
    variance: Tensor,
    source_weight: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Any, ...] | None:
    """The arguments of :func:`bkn_export.kernels.path_moments.path_moments` for this head where its fused
    kernels take it (the Triton route: CUDA; every stage a kernel the twins would run), else None (the stages)."""
    if not (per_channel.triton_route(variance) and native.enabled()):
        return None
    launcher = kernels.path_kernels()
    if launcher is None:
        return None
    activation: tuple[str, Tensor | None] | None = None
    if plan.activation is not None:
        function, constants = plan.activation
        if function is fast._ReluMoments:
            activation = ("relu", None)
        elif function is fast._PiecewiseMoments and constants[0].native is not None:
            activation = ("piecewise", constants[0].native)
        elif function is fast._GaussHermiteMoments and constants[3] is not None:
            activation = ("smooth", constants[3])
        else:
            return None
    matrix = parameters = fraction = pairs = None
    if plan.affine is not None:
        assert weight is not None
        fraction, pairs = plan.affine
        matrix = fast._taps_view(weight)
        parameters = fast._native_affine(matrix, mean, variance, fraction, pairs)
        if parameters is None:
            return None
    arguments = (mean, variance, source_weight, plan.eps, activation, matrix, fraction, pairs, parameters, bias)
    return arguments if launcher.path_moments_take(*arguments) else None


def _separate(
    plan: PathPlan,
    mean: Tensor,
    variance: Tensor,
    source_weight: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """What :class:`_PathMoments` computes, as the separate Functions (one node each): (M, V, v0 or None)."""
    gaussian = None
    if plan.eps is not None:
        variance = fast_prior._OutputVariance.apply(variance, source_weight, plan.eps)
        gaussian = variance
    if plan.activation is not None:
        function, constants = plan.activation
        mean, variance = function.apply(mean, variance, *constants)
    if plan.affine is not None:
        mean, variance = fast._AffineMoments.apply(weight, mean, variance, *plan.affine)
        if bias is not None:
            mean = mean + bias
    return mean, variance, gaussian


def _differentiated(
    plan: PathPlan, saved: tuple[Tensor | None, ...], grads: tuple[Tensor | None, ...], needs: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """create_graph=True: the vector-Jacobian product of :func:`_separate`, recomputed with autograd."""
    with torch.enable_grad():
        inputs = [None if t is None else fast_prior._differentiable(t) for t in saved]
        mean, variance = inputs[0], inputs[1]
        assert mean is not None and variance is not None
        outputs = _separate(plan, mean, variance, *inputs[2:])
        pairs = [(o, g) for o, g in zip(outputs, grads) if o is not None and g is not None and o.requires_grad]
        wanted = [(i, t) for i, t in enumerate(inputs) if t is not None and needs[i + 1]]
        if not pairs or not wanted:
            return (None,) * len(inputs)
        found = torch.autograd.grad(
            [o for o, _ in pairs], [t for _, t in wanted], [g for _, g in pairs], create_graph=True, allow_unused=True
        )
    result: list[Tensor | None] = [None] * len(inputs)
    for (index, _), grad in zip(wanted, found):
        result[index] = grad
    return tuple(result)


class SourcePrediction(NamedTuple):
    """A path's moments at its end (C,), its spatial size there, and the source's Gaussian (mean, variance) the
    path started from (for :class:`~bkn_export.nn.PriorSource`; its variance an output of the node where the node
    computed it)."""

    mean: Tensor
    variance: Tensor
    spatial: Spatial
    gaussian: tuple[Tensor, Tensor]


def _activation(step: Step, mean: Tensor) -> tuple[type[torch.autograd.Function], tuple[Any, ...]] | None:
    if not isinstance(step, Elementwise) or step.kind == "prelu":
        return None
    return fast.elementwise_function(step.kind, step.params, mean)


def _affine(
    step: Step, modules: Mapping[str, nn.Module], spatial: Spatial, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, Tensor | None], Spatial] | None:
    """(W, b, (f, H), output spatial size) of a conv / Linear step that :func:`fast.affine_moments` covers."""
    if not isinstance(step, Affine):
        return None
    layer = modules.get(step.module)
    if step.kind == "linear" and isinstance(layer, nn.Linear):
        tables: tuple[Tensor | None, Tensor | None] = (None, None)
        out_spatial = spatial
    elif step.kind == "conv" and isinstance(layer, nn.modules.conv._ConvNd):
        if not fast.conv_covered(layer, step.input_padding, step.input_padding_mode):
            return None
        rank = len(layer.kernel_size)
        if len(spatial) != rank:
            return None
        padding = step.input_padding if step.input_padding is not None else ((0, 0),) * rank
        coverage, out_spatial = fast._conv_geometry(layer, tuple(spatial), padding, dtype)
        tables = (None, None) if coverage is None else coverage
    else:
        return None
    assert layer is not None
    if layer.weight.shape[1] == 0 or layer.weight.dtype != dtype:
        return None
    bias = layer.bias
    if bias is not None and bias.dtype != dtype:
        return None
    return layer.weight, bias, tables, tuple(out_spatial)


def predict_source_path(
    entry: Published,
    start: tuple[Tensor, Tensor] | None,
    output_gaussian: bool,
    steps: tuple[Step, ...],
    modules: Mapping[str, nn.Module],
) -> SourcePrediction | None:
    """The moments at the end of a path from a source normalization, its head as one :class:`_PathMoments`
    node; None where fewer than two stages apply (the caller then runs the steps one by one).

    entry: what the source published; start: its Gaussian (mean, variance) where the caller already has it,
    else None: the node starts from the posterior, with the output variance as its first stage when
    ``output_gaussian`` (prior_source "output"; else the Gaussian is the posterior itself).
    """
    posterior_mean, posterior_variance = entry.posterior_mean, entry.posterior_variance
    if not (fast.uses_fused(posterior_variance) and _ENABLED.get()):  # uses_fused first: Dynamo and ContextVars
        return None
    dtype = posterior_variance.dtype
    eps: float | None = None
    source_weight: Tensor | None = None
    if start is not None:
        mean, variance = start
    elif output_gaussian:
        gamma, beta = entry.weight, entry.bias
        if any(t is not None and (t.dtype != dtype or t.shape != posterior_variance.shape) for t in (gamma, beta)):
            return None
        if not fast_prior._applies("output_variance", posterior_variance, gamma):
            return None
        eps, source_weight, variance = entry.eps, gamma, posterior_variance
        # β as a view, as the reference returns it (a plain tensor: the fused forms take no Parameter).
        mean = torch.zeros_like(posterior_mean) if beta is None else beta.expand_as(posterior_mean)
    else:
        mean, variance = posterior_mean, posterior_variance
    if type(mean) is not Tensor or type(variance) is not Tensor:  # the fused forms' own condition (uses_fused)
        return None
    grouped = linear_runs(steps, modules)
    head = _head(grouped, mean, variance, eps, source_weight, tuple(entry.input_shape[2:]), modules)
    if head is None:
        return None
    (out_mean, out_variance, spatial), gaussian = head
    return SourcePrediction(out_mean, out_variance, tuple(spatial), (mean, gaussian if eps is not None else variance))


def predict_steps(
    steps: tuple[Step, ...], mean: Tensor, variance: Tensor, spatial: Spatial, modules: Mapping[str, nn.Module]
) -> Moments:
    """:func:`bkn_export.chain.fast.predict_steps`, with an (activation, conv / Linear) head as one node
    (a path that starts from a combination of sources)."""
    if not (fast.uses_fused(mean) and _ENABLED.get() and type(variance) is Tensor):
        return fast.predict_steps(steps, mean, variance, spatial, modules)
    grouped = linear_runs(steps, modules)
    head = _head(grouped, mean, variance, None, None, tuple(spatial), modules)
    if head is None:
        return fast.predict_grouped(grouped, mean, variance, spatial, modules)
    return head[0]


def _head(
    grouped: tuple[Step, ...],
    mean: Tensor,
    variance: Tensor,
    eps: float | None,
    source_weight: Tensor | None,
    spatial: Spatial,
    modules: Mapping[str, nn.Module],
) -> tuple[Moments, Tensor] | None:
    """The moments after ``grouped`` (steps grouped by ``linear_runs``) with their head — the output variance
    (``eps`` given), an activation, a conv / Linear — as one :class:`_PathMoments` node, and the node's third
    output; None where fewer than two stages apply."""
    consumed = 0
    activation = _activation(grouped[0], mean) if grouped else None
    if activation is not None:
        consumed = 1
    affine = _affine(grouped[consumed], modules, spatial, variance.dtype) if len(grouped) > consumed else None
    weight = bias = None
    tables = None
    if affine is not None:
        weight, bias, tables, spatial = affine
        consumed += 1
    if (eps is not None) + (activation is not None) + (affine is not None) < 2:
        return None
    plan = PathPlan(eps, activation, tables)
    out_mean, out_variance, gaussian = _PathMoments.apply(plan, mean, variance, source_weight, weight, bias)
    return fast.predict_grouped(grouped[consumed:], out_mean, out_variance, spatial, modules), gaussian
