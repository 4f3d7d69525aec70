"""Inputs for ``tests/test_kernels_assembled.py`` and the two sequences it compares, run in the Triton interpreter.

:func:`draw_inputs` (this process or the parent: torch only) makes one BKN step's inputs with the prior's last
step left to do (the prediction's variance v, raw r, logit l, known mask k) and hostile per-channel values in
the first channels. :func:`fused_and_separate` (the child: it imports the kernels, interpreted there) runs

* fused: ``batch_kalman_norm_forward(..., assembly=PriorAssembly(r, l, k, L))`` and
  ``batch_kalman_norm_backward_assembled(..., extra_grad_weight, extra_grad_bias)``;
* separate: the ``prior_assembly`` twin (Σ_pred, p), ``batch_kalman_norm_forward`` and
  ``batch_kalman_norm_backward`` with ``prior_weight=p`` and no extras, the ``prior_assembly_backward`` twin on
  the op's (∂Σ_pred, ∂p), and the extras added to the op's ∂γ, ∂β with a float32 torch add;

and returns both, by name. :func:`fallback_extras` runs the non-assembled backward with and without extras.

Test infrastructure, not part of the shipped package. Nothing here imports Triton at module level, so the
parent can import :func:`draw_inputs` without deciding between compiled and interpreted kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bkn_export import functional as Fk

__all__ = [
    "CHANNELS",
    "EPS",
    "HOSTILE",
    "HOSTILE_PERIOD",
    "UNKNOWN_CHANNELS",
    "draw_inputs",
    "fallback_extras",
    "forward_with_assembly",
    "fused_and_separate",
]

EPS = 1e-5
CHANNELS = 12
#: Per-channel values forced into the first channels of every block of HOSTILE_PERIOD channels (the others are
#: random): channel -> {input: value}.
HOSTILE: dict[int, dict[str, float]] = {
    0: {"raw": 25.0},  # softplus' threshold branch (r > 20: softplus(r) = r, ∂r = ∂v)
    1: {"raw": -100.0},  # softplus(r) = exp(r) ~ 4e-44: v + softplus(r) rounds to v; ∂r ~ 0
    2: {"logit": 30.0},  # sigmoid(l) rounds to 1 in float32: p = L; ∂l = ∂p k L s (1 - s) ~ 1e-13
    3: {"logit": -30.0},  # p ~ 1e-13: the prior is all but ignored
    4: {"variance": 1.0e4},  # Σ_pred ≫ S (~4): the update leans on the prior's variance
    5: {"raw": 20.0, "logit": 30.0, "variance": 3.0e3},  # at the threshold (log1p branch), large v, p = L
}
#: Channels whose known mask is 0 (with known), in every block of HOSTILE_PERIOD: ordinary ones and hostile
#: ones (p = 0, ∂l = 0 whatever l).
UNKNOWN_CHANNELS = (3, 5, 8, 10)
#: The kernels' channel block on three kernels (``layout.CHANNEL_BLOCK``): every block gets the hostile values.
HOSTILE_PERIOD = 32


def _normal(generator: torch.Generator, *size: int, scale: float = 1.0, low: float = 0.0) -> Tensor:
    """N(low, scale²) drawn in float64, then rounded to float32 (as ``support.triton_steps.draw``)."""
    return (low + scale * torch.randn(*size, generator=generator, dtype=torch.float64)).to(torch.float32)


def _uniform(generator: torch.Generator, *size: int, scale: float = 1.0, low: float = 0.0) -> Tensor:
    return (low + scale * torch.rand(*size, generator=generator, dtype=torch.float64)).to(torch.float32)


def draw_inputs(
    shape: tuple[int, ...] = (3, CHANNELS, 5, 7),
    seed: int = 0,
    known: bool = True,
    affine: bool = True,
    extras: tuple[bool, bool] = (True, True),
    channels_last: bool = False,
) -> dict[str, Any]:
    """One step's float32 inputs, drawn in float64 and rounded: x ~ 3 + 2 N(0, 1), μ_pred near x̄, v ~ 2-6,
    r ~ N(-1, 3²), l ~ N(0, 2²), known a 0/1 mask (zeros at :data:`UNKNOWN_CHANNELS`) or None, γ, β or None,
    ∂γ / ∂β extras ~ N(0, 10²) or None (``extras`` = (weight's, bias')); :data:`HOSTILE` values in the first
    channels of every block of :data:`HOSTILE_PERIOD`."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = _normal(generator, *shape, scale=2.0, low=3.0)
    grad_output = _normal(generator, *shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    inputs: dict[str, Any] = {
        "x": x,
        "grad_output": grad_output,
        "prior_mean": _normal(generator, channels, low=3.0),
        "variance": _uniform(generator, channels, scale=4.0, low=2.0),
        "raw": _normal(generator, channels, scale=3.0, low=-1.0),
        "logit": _normal(generator, channels, scale=2.0),
        "known": None,
        "weight": _normal(generator, channels),
        "bias": _normal(generator, channels),
        "grad_posterior_mean": _normal(generator, channels),
        "grad_posterior_variance": _normal(generator, channels),
        "extra_grad_weight": _normal(generator, channels, scale=10.0),
        "extra_grad_bias": _normal(generator, channels, scale=10.0),
    }
    starts = range(0, channels, HOSTILE_PERIOD)
    for channel, values in HOSTILE.items():
        for name, value in values.items():
            inputs[name][[start + channel for start in starts if start + channel < channels]] = value
    if known:
        mask = torch.ones(channels, dtype=torch.float32)
        mask[[start + c for start in starts for c in UNKNOWN_CHANNELS if start + c < channels]] = 0.0
        inputs["known"] = mask
    if not affine:
        inputs["weight"] = inputs["bias"] = None
    if not extras[0]:
        inputs["extra_grad_weight"] = None
    if not extras[1]:
        inputs["extra_grad_bias"] = None
    return inputs


def fused_and_separate(inputs: dict[str, Any], single_program: bool) -> dict[str, dict[str, Tensor]]:
    """{"fused": ..., "separate": ...}, each {y, posterior_mean, posterior_variance, grad_x, grad_prior_mean,
    grad_variance, grad_raw, grad_logit, grad_weight, grad_bias}; "separate" also holds the op's own ∂γ, ∂β
    before the extras (op_grad_weight, op_grad_bias) and the twin's (prior_variance, prior_weight)."""
    from bkn_export import native
    from bkn_export.kernels import backward, forward, prior_moments
    from bkn_export.kernels.common import PriorAssembly

    x, grad_output = inputs["x"], inputs["grad_output"]
    prior_mean, variance, raw, logit, known = (inputs[k] for k in ("prior_mean", "variance", "raw", "logit", "known"))
    weight, bias = inputs["weight"], inputs["bias"]
    grad_mean, grad_variance = inputs["grad_posterior_mean"], inputs["grad_posterior_variance"]
    extra_weight, extra_bias = inputs["extra_grad_weight"], inputs["extra_grad_bias"]
    limit = Fk.PRIOR_WEIGHT_LIMIT
    params = native.parameters(limit)

    assembly = PriorAssembly(raw, logit, known, limit)
    y, mean, posterior_variance = forward.batch_kalman_norm_forward(
        x, prior_mean, variance, None, weight, bias, EPS, 0.0, single_program=single_program, assembly=assembly
    )
    grads = backward.batch_kalman_norm_backward_assembled(
        grad_output, grad_mean, grad_variance, x, prior_mean, variance, assembly, weight, EPS,
        single_program=single_program, extra_grad_weight=extra_weight, extra_grad_bias=extra_bias,
    )  # fmt: skip
    names = ("grad_x", "grad_prior_mean", "grad_variance", "grad_raw", "grad_logit", "grad_weight", "grad_bias")
    fused = {"y": y, "posterior_mean": mean, "posterior_variance": posterior_variance, **dict(zip(names, grads))}

    prior_variance, prior_weight = torch.empty_like(variance), torch.empty_like(variance)
    prior_moments.prior_assembly(variance, raw, logit, known, params, prior_variance, prior_weight)
    y, mean, posterior_variance = forward.batch_kalman_norm_forward(
        x, prior_mean, prior_variance, prior_weight, weight, bias, EPS, 0.0, single_program=single_program
    )
    grad_x, grad_prior_mean, grad_prior_variance, grad_prior_weight, op_grad_weight, op_grad_bias = (
        backward.batch_kalman_norm_backward(
            grad_output, grad_mean, grad_variance, x, prior_mean, prior_variance, prior_weight, weight, EPS, 0.0,
            single_program=single_program,
        )
    )  # fmt: skip
    grad_raw, grad_logit = torch.empty_like(raw), torch.empty_like(logit)
    prior_moments.prior_assembly_backward(
        raw, logit, known, params, grad_prior_variance, grad_prior_weight, grad_raw, grad_logit
    )
    # γ's extra only where there is a γ (without one the op's ∂γ is zeros and stays so).
    grad_weight = op_grad_weight + extra_weight if extra_weight is not None and weight is not None else op_grad_weight
    grad_bias = op_grad_bias + extra_bias if extra_bias is not None else op_grad_bias
    separate = {
        "y": y,
        "posterior_mean": mean,
        "posterior_variance": posterior_variance,
        "grad_x": grad_x,
        "grad_prior_mean": grad_prior_mean,
        "grad_variance": grad_prior_variance,
        "grad_raw": grad_raw,
        "grad_logit": grad_logit,
        "grad_weight": grad_weight,
        "grad_bias": grad_bias,
        "op_grad_weight": op_grad_weight,
        "op_grad_bias": op_grad_bias,
        "prior_variance": prior_variance,
        "prior_weight": prior_weight,
    }
    return {"fused": fused, "separate": separate}


def fallback_extras(inputs: dict[str, Any], prior_weight: Tensor, fallback_ratio: float) -> dict[str, Any]:
    """The non-assembled backward (split layout, ``fallback_ratio``) on Σ_pred = ``inputs["variance"]`` and p =
    ``prior_weight``, with the inputs' extras ("with") and without ("without")."""
    from bkn_export.kernels import backward

    arguments = (
        inputs["grad_output"], inputs["grad_posterior_mean"], inputs["grad_posterior_variance"], inputs["x"],
        inputs["prior_mean"], inputs["variance"], prior_weight, inputs["weight"], EPS, fallback_ratio,
    )  # fmt: skip
    extras = {"extra_grad_weight": inputs["extra_grad_weight"], "extra_grad_bias": inputs["extra_grad_bias"]}
    return {
        "with": backward.batch_kalman_norm_backward(*arguments, single_program=False, **extras),
        "without": backward.batch_kalman_norm_backward(*arguments, single_program=False),
    }


def forward_with_assembly(
    arguments: tuple[Any, ...], assembly: tuple[Any, ...] | None, single_program: bool | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``batch_kalman_norm_forward(*arguments, single_program=..., assembly=PriorAssembly(*assembly))`` (None: no
    assembly); the assembly crosses the pipe as a plain tuple (r, l, k, L)."""
    from bkn_export.kernels import forward
    from bkn_export.kernels.common import PriorAssembly

    prior = None if assembly is None else PriorAssembly(*assembly)
    x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio = arguments
    return forward.batch_kalman_norm_forward(
        x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio,
        single_program=single_program, assembly=prior,
    )  # fmt: skip
