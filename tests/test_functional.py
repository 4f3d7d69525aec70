"""Specification of the BKN math (bkn_export.functional), its custom ops and the CPU fast path.

* gradcheck of one BKN step, prediction included, for every transition mode, with and
  without a predecessor (float64);
* the custom op's closed-form backward against autograd of the functional reference,
  with the authors' fallback firing and not firing, and gradcheck/opcheck of the op;
* the ``propagate`` prior's math (:mod:`bkn_export.moments`: ReLU, Linear, conv) against
  a large-sample Monte Carlo estimate of the authors' sampled prior (convs with padding,
  stride, dilation, groups, transposed), and its closed form for convs against running
  the conv on the moment maps; a wired layer's prior under each ``prior_source``;
* the CPU fast path (bkn_export.cpu_kernels) against the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bkn_export.ops  # noqa: F401  (registers torch.ops.bkn.*)
from bkn_export import cpu_kernels
from bkn_export import functional as Fk
from bkn_export import moments as M

EPS = 1e-5
C_PREV, C = 2, 3


_Layer = TypeVar("_Layer", bound=nn.Module)


def _as_function_of(layer: _Layer, weight: Tensor, bias: Tensor | None) -> _Layer:
    """``layer`` with plain-tensor weight/bias (gradcheck inputs) instead of its parameters."""
    del layer.weight
    layer.weight = weight  # type: ignore[assignment]
    del layer.bias
    layer.bias = bias  # type: ignore[assignment]
    return layer


def _posterior_inputs(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    previous_mean = torch.randn(C_PREV, dtype=dtype, requires_grad=True)
    previous_variance = (torch.rand(C_PREV, dtype=dtype) + 0.5).requires_grad_()
    return previous_mean, previous_variance


def _step_inputs(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    return {
        "x": torch.randn(4, C, 3, 3, dtype=dtype, requires_grad=True),
        "gamma": (torch.rand(C, dtype=dtype) + 0.5).requires_grad_(),
        "beta": torch.randn(C, dtype=dtype, requires_grad=True),
        "prior_weight": (torch.rand(C, dtype=dtype) * 0.8 + 0.1).requires_grad_(),
        "process_noise": (torch.rand(C, dtype=dtype) * 0.1).requires_grad_(),
    }


def _prediction_cases() -> dict[str, tuple[Callable[..., tuple[Tensor, Tensor]], list[Tensor]]]:
    """Per transition: (predict(previous_mean, previous_variance, R, *params), params)."""
    conv_weight = (0.3 * torch.randn(C, C_PREV, 3, 3, dtype=torch.float64)).requires_grad_()
    conv_bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    matrix = torch.randn(C, C_PREV, dtype=torch.float64, requires_grad=True)
    sample_noise = torch.randn(4, C_PREV, 5, 5, dtype=torch.float64)  # fixed: the seed of `sampled`

    def propagate(rectify: bool) -> Callable[..., tuple[Tensor, Tensor]]:
        def predict(mean: Tensor, variance: Tensor, noise: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            conv = _as_function_of(nn.Conv2d(C_PREV, C, 3, padding=1, stride=2).double(), w, b)
            if rectify:
                mean, variance = M.elementwise_moments("relu", mean, variance)
            mean, variance, _ = M.conv_moments(conv, mean, variance, (5, 5))
            return mean, variance + noise

        return predict

    def propagate_linear(mean: Tensor, variance: Tensor, noise: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        mean, variance = M.linear_moments(a, b, *M.elementwise_moments("relu", mean, variance))
        return mean, variance + noise

    def sampled(mean: Tensor, variance: Tensor, noise: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        conv = _as_function_of(nn.Conv2d(C_PREV, C, 3).double(), w, b)
        stats = Fk.batch_statistics(conv(torch.relu(_per_channel_sample(mean, variance, sample_noise, False))))
        return stats.mean, stats.variance + noise

    def learned(mean: Tensor, variance: Tensor, noise: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        return Fk.predict_linear(mean, variance, a, noise)

    def identity(mean: Tensor, variance: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        # identity needs C_prev == C: embed the (C_PREV,) posterior in C channels
        pad = torch.ones(C - C_PREV, dtype=mean.dtype)
        return torch.cat([mean, pad]), torch.cat([variance, pad]) + noise

    return {
        "propagate": (propagate(rectify=False), [conv_weight, conv_bias]),
        "propagate-relu": (propagate(rectify=True), [conv_weight, conv_bias]),
        "propagate-linear": (propagate_linear, [matrix, conv_bias]),
        "sampled": (sampled, [conv_weight, conv_bias]),
        "learned": (learned, [matrix]),
        "identity": (identity, []),
    }


@pytest.mark.parametrize(
    "transition", ["propagate", "propagate-relu", "propagate-linear", "sampled", "learned", "identity"]
)
def test_gradcheck_step_with_predecessor(transition: str) -> None:
    """Prediction + update + normalize are differentiable in every input, float64."""
    predict, params = _prediction_cases()[transition]
    previous_mean, previous_variance = _posterior_inputs()
    s = _step_inputs()

    def step(
        x: Tensor, mean: Tensor, variance: Tensor, gamma: Tensor, beta: Tensor, p: Tensor, noise: Tensor, *extra: Tensor
    ) -> tuple[Tensor, ...]:
        prior_mean, prior_variance = predict(mean, variance, noise, *extra)
        return tuple(Fk.batch_kalman_norm(x, prior_mean, prior_variance, p, gamma, beta, EPS))

    inputs = (
        s["x"],
        previous_mean,
        previous_variance,
        s["gamma"],
        s["beta"],
        s["prior_weight"],
        s["process_noise"],
        *params,
    )
    assert torch.autograd.gradcheck(step, inputs)


def test_gradcheck_step_without_predecessor() -> None:
    """First in the chain (p = 0): BatchNorm, differentiable in x, γ, β."""
    s = _step_inputs()
    zeros = torch.zeros(C, dtype=torch.float64)
    ones = torch.ones(C, dtype=torch.float64)

    def step(x: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
        return tuple(Fk.batch_kalman_norm(x, zeros, ones, zeros, gamma, beta, EPS))

    assert torch.autograd.gradcheck(step, (s["x"], s["gamma"], s["beta"]))


# --------------------------------------------------------------------------- custom op


def _op_inputs(
    shape: tuple[int, ...], fallback_fires: bool, dtype: torch.dtype = torch.float64, affine: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    channels = shape[1]
    x = torch.randn(shape, dtype=dtype) * 1.5 + 0.5
    prior_mean = torch.randn(channels, dtype=dtype)
    # mean(Σ_pred / S) is about 1 here, or about 1000 when the fallback should fire
    prior_variance = (torch.rand(channels, dtype=dtype) + 0.5) * (1000.0 if fallback_fires else 1.0)
    prior_weight = torch.rand(channels, dtype=dtype) * 0.8 + 0.1
    weight = torch.rand(channels, dtype=dtype) + 0.5 if affine else None
    bias = torch.randn(channels, dtype=dtype) if affine else None
    return x, prior_mean, prior_variance, prior_weight, weight, bias


FALLBACK_CASES = [  # (fallback_ratio, fires)
    pytest.param(0.0, False, id="no-fallback"),
    pytest.param(100.0, False, id="fallback-not-firing"),
    pytest.param(100.0, True, id="fallback-firing"),
]


@pytest.mark.parametrize(("fallback_ratio", "fires"), FALLBACK_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_closed_form_backward_matches_autograd_of_reference(fallback_ratio: float, fires: bool, affine: bool) -> None:
    """Both the reference backward and the op's (CPU) backward equal autograd of the functional."""
    x, m, v, p, w, b = _op_inputs((5, 3, 4), fires, affine=affine)
    for t in (x, m, v, p, w, b):
        if t is not None:
            t.requires_grad_()
    step = Fk.batch_kalman_norm(x, m, v, p, w, b, EPS, fallback_ratio)
    grad_y = torch.randn_like(step.output)
    grad_mean = torch.randn(3, dtype=torch.float64)
    grad_variance = torch.randn(3, dtype=torch.float64)
    inputs = [t for t in (x, m, v, p, w, b) if t is not None]
    expected = torch.autograd.grad(
        (step.output, step.posterior_mean, step.posterior_variance), inputs, (grad_y, grad_mean, grad_variance)
    )
    x, m, v, p = x.detach(), m.detach(), v.detach(), p.detach()
    w = w.detach() if w is not None else None
    reference = Fk.batch_kalman_norm_backward(grad_y, grad_mean, grad_variance, x, m, v, p, w, EPS, fallback_ratio)
    op = torch.ops.bkn.batch_kalman_norm_backward(grad_y, grad_mean, grad_variance, x, m, v, p, w, EPS, fallback_ratio)
    keep = [0, 1, 2, 3, 4, 5] if affine else [0, 1, 2, 3]
    for computed in (reference, op):
        for want, index in zip(expected, keep):
            torch.testing.assert_close(computed[index], want, rtol=1e-9, atol=1e-10)
    if fires:  # p is the constant 0 where the rule fired: no gradient reaches the gain
        assert torch.count_nonzero(expected[3]) == 0


@pytest.mark.parametrize(("fallback_ratio", "fires"), FALLBACK_CASES)
def test_gradcheck_custom_op(fallback_ratio: float, fires: bool) -> None:
    """The op's registered autograd (closed form) matches finite differences of the op."""
    inputs = tuple(t.requires_grad_() for t in _op_inputs((4, 3, 2, 2), fires) if t is not None)

    def op(*args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.bkn.batch_kalman_norm(*args, EPS, fallback_ratio)

    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_custom_ops(dtype: torch.dtype) -> None:
    """torch.library.opcheck: schema, fake (meta) implementations and autograd registration agree."""
    x, m, v, p, w, b = _op_inputs((3, 4, 5), False, dtype=torch.float32)
    x = x.to(dtype).requires_grad_()
    acc = Fk.statistics_dtype(dtype)
    per_channel = [t.to(acc) for t in (m, v, p, w, b)]  # type: ignore[union-attr]
    torch.library.opcheck(torch.ops.bkn.batch_kalman_norm.default, (x, *per_channel, EPS, 0.0))
    grad_y = torch.randn_like(x)
    zeros = torch.zeros(4, dtype=acc)
    torch.library.opcheck(
        torch.ops.bkn.batch_kalman_norm_backward.default,
        (grad_y, zeros, zeros, x.detach(), *per_channel[:4], EPS, 0.0),
        test_utils=("test_schema", "test_faketensor"),
    )


# --------------------------------------------------------------------------- propagate vs sampled


def _propagate(layer: nn.Module, spatial_shape: tuple[int, ...], mean: Tensor, variance: Tensor, rectify: bool):
    """propagate's prior through (ReLU →) ``layer``: :mod:`bkn_export.moments`."""
    if rectify:
        mean, variance = M.elementwise_moments("relu", mean, variance)
    if isinstance(layer, nn.Linear):
        return M.linear_moments(layer.weight, layer.bias, mean, variance)
    return M.conv_moments(layer, mean, variance, spatial_shape)[:2]


def _monte_carlo_check(layer: nn.Module, noise_shape: tuple[int, ...], rectify: bool) -> None:
    """propagate's prior (mean, variance) vs the sample moments of the authors' sampled prior.

    The sampled prior pools the layer's output over samples and positions; positions of
    one sample are correlated (overlapping windows), samples are independent. So the
    standard errors come from per-sample quantities a_n = mean_p y, b_n = mean_p y²:
    pooled mean ā (SE = sd(a)/√N) and pooled variance b̄ - ā² (delta method:
    SE = sd(b - 2ā a)/√N). Tolerance: 6 standard errors, computed from the sample itself,
    so the check is as tight as the sample size allows and fails with probability
    < 1e-8 when the analytic moments are right.
    """
    torch.manual_seed(1)
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    previous_mean = torch.tensor([0.3, -0.8, 1.2, 0.1, -0.2, 0.6], dtype=torch.float64)[:channels]
    previous_variance = torch.tensor([0.5, 2.0, 0.9, 1.3, 0.2, 1.0], dtype=torch.float64)[:channels]
    mean, variance = _propagate(layer, noise_shape[2:], previous_mean, previous_variance, rectify)
    noise = torch.randn(noise_shape, dtype=torch.float64)

    def run(sample: Tensor) -> Tensor:
        if isinstance(layer, nn.Linear):
            return layer(sample)
        return layer(sample).flatten(2)  # (N, C, positions)

    with torch.no_grad():
        out = run(_per_channel_sample(previous_mean, previous_variance, noise, rectify))
    out = out.unsqueeze(-1) if out.dim() == 2 else out  # (N, C, positions)
    mc_mean, mc_variance = out.mean(dim=(0, 2)), out.var(dim=(0, 2), correction=0)  # the sampled prior
    per_sample_mean, per_sample_square = out.mean(dim=2), (out * out).mean(dim=2)  # (N, C) each
    n = out.shape[0]
    se_mean = per_sample_mean.std(dim=0) / math.sqrt(n)
    se_variance = (per_sample_square - 2 * mc_mean * per_sample_mean).std(dim=0) / math.sqrt(n)
    assert torch.all((mc_mean - mean).abs() <= 6 * se_mean), (mc_mean, mean, se_mean)
    assert torch.all((mc_variance - variance).abs() <= 6 * se_variance), (mc_variance, variance, se_variance)


def _per_channel_sample(mean: Tensor, variance: Tensor, noise: Tensor, rectify: bool) -> Tensor:
    shape = (1, -1, *([1] * (noise.dim() - 2)))
    sample = mean.reshape(shape) + variance.sqrt().reshape(shape) * noise
    return torch.relu(sample) if rectify else sample


@pytest.mark.parametrize("rectify", [False, True], ids=["no-relu", "relu"])
def test_propagate_matches_monte_carlo_linear(rectify: bool) -> None:
    layer = nn.Linear(3, 4).double()
    _monte_carlo_check(layer, (400_000, 3), rectify)


#: (layer, shape of the sample: (N, C_prev, *)); borders matter in all but the first.
_MONTE_CARLO_CONVS: dict[str, tuple[Callable[[], nn.modules.conv._ConvNd], tuple[int, ...]]] = {
    "unpadded": (lambda: nn.Conv2d(3, 2, 3, padding=0), (100_000, 3, 3, 3)),
    "padded": (lambda: nn.Conv2d(3, 2, 3, padding=1), (20_000, 3, 4, 4)),
    "strided": (lambda: nn.Conv2d(3, 2, 3, padding=1, stride=2), (20_000, 3, 5, 5)),
    "dilated": (lambda: nn.Conv2d(3, 2, 3, padding=2, dilation=2), (20_000, 3, 5, 4)),
    "grouped": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), (20_000, 4, 4, 4)),
    "conv1d-same": (lambda: nn.Conv1d(3, 2, 4, padding="same"), (20_000, 3, 7)),
    "conv3d": (lambda: nn.Conv3d(3, 2, 3, padding=1), (10_000, 3, 3, 3, 3)),
    "transposed": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (20_000, 3, 4, 4)),
    "transposed-grouped": (lambda: nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, groups=2), (20_000, 4, 5)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("rectify", [False, True], ids=["no-relu", "relu"])
@pytest.mark.parametrize("case", list(_MONTE_CARLO_CONVS))
def test_propagate_matches_monte_carlo_conv(case: str, rectify: bool) -> None:
    """Through any conv, zero padding included, propagate is the expectation of the sampled prior."""
    make_layer, noise_shape = _MONTE_CARLO_CONVS[case]
    torch.manual_seed(0)
    layer = make_layer().double()
    assert layer.bias is not None
    with torch.no_grad():
        layer.bias.add_(1.0)  # a large bias makes the border's spread of the mean visible
    _monte_carlo_check(layer, noise_shape, rectify)


def _conv_maps_prior(
    layer: nn.modules.conv._ConvNd, spatial_shape: tuple[int, ...], mean: Tensor, variance: Tensor, rectify: bool
):
    """The same prior by running the layer: mean map M = layer(m' broadcast over one sample),
    variance map V = the layer's conv with W² and no bias on v'; pooled over positions
    (law of total variance). O(C·C_prev·K·positions): the independent computation."""
    if rectify:
        mean, variance = M.elementwise_moments("relu", mean, variance)
    shape = (1, -1, *([1] * len(spatial_shape)))
    mean_map = layer(mean.reshape(shape).expand(1, -1, *spatial_shape))
    constant = variance.reshape(shape).expand(1, -1, *spatial_shape)
    if layer.transposed:
        conv_transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(spatial_shape) - 1]
        stride, padding, output_padding = layer.stride, layer.padding, layer.output_padding
        assert not isinstance(padding, str)  # ConvTranspose pads by numbers
        variance_map = conv_transpose(
            constant, layer.weight**2, None, stride, padding, output_padding, layer.groups, layer.dilation
        )
    else:
        variance_map = layer._conv_forward(constant, layer.weight**2, None)
    mean_map, variance_map = mean_map.flatten(2)[0], variance_map.flatten(2)[0]
    return mean_map.mean(dim=1), variance_map.mean(dim=1) + mean_map.var(dim=1, correction=0)


_CONVS: dict[str, Callable[[], nn.modules.conv._ConvNd]] = {
    "padded": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "strided": lambda: nn.Conv2d(3, 4, 3, padding=2, stride=2),
    "rectangular": lambda: nn.Conv2d(3, 4, (3, 5), padding=(1, 2), stride=(2, 1)),
    "dilated": lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2),
    "dilated-strided": lambda: nn.Conv2d(3, 4, 5, padding=1, dilation=2, stride=3),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise-no-bias": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
    "same-even": lambda: nn.Conv2d(3, 4, 4, padding="same"),
    "valid": lambda: nn.Conv2d(3, 4, 3, padding="valid"),
    "unpadded-strided": lambda: nn.Conv2d(3, 4, 3, stride=2),
    "pointwise-grouped": lambda: nn.Conv2d(4, 6, 1, groups=2),
    "circular": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    "conv1d": lambda: nn.Conv1d(3, 4, 5, padding=2, stride=3),
    "conv3d": lambda: nn.Conv3d(2, 4, 3, padding=1),
    "transposed": lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
    "transposed-grouped": lambda: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, groups=2),
    "transposed1d-dilated": lambda: nn.ConvTranspose1d(3, 4, 3, stride=3, padding=2, dilation=2),
    "transposed3d": lambda: nn.ConvTranspose3d(2, 3, 3, stride=2),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("rectify", [False, True], ids=["no-relu", "relu"])
@pytest.mark.parametrize("case", list(_CONVS))
def test_propagate_conv_equals_pooled_conv_maps(case: str, rectify: bool) -> None:
    """The closed form (per-tap coverage tables) equals running the layer on the mean and variance maps."""
    torch.manual_seed(0)
    layer = _CONVS[case]().double()
    rank = layer.weight.dim() - 2
    for spatial_shape in ((8,) * rank, (9, 7, 6)[:rank] if rank > 1 else (11,)):
        mean = torch.randn(layer.in_channels, dtype=torch.float64)
        variance = torch.rand(layer.in_channels, dtype=torch.float64) + 0.5
        with torch.no_grad():
            got = _propagate(layer, spatial_shape, mean, variance, rectify)
            expected = _conv_maps_prior(layer, spatial_shape, mean, variance, rectify)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "case", ["strided", "grouped", "conv1d", "conv3d", "transposed-grouped", "unpadded-strided", "pointwise-grouped"]
)
def test_gradcheck_propagate_conv(case: str) -> None:
    """Gradients of the conv prior reach the previous posterior, the weights, the bias and R (float64)."""
    torch.manual_seed(0)
    template = _CONVS[case]().double()
    assert template.bias is not None
    rank = template.weight.dim() - 2
    spatial_shape = (5, 4, 3)[:rank]
    weight = (0.5 * torch.randn_like(template.weight)).requires_grad_()
    bias = torch.randn_like(template.bias).requires_grad_()
    mean = torch.randn(template.in_channels, dtype=torch.float64, requires_grad=True)
    variance = (torch.rand(template.in_channels, dtype=torch.float64) + 0.5).requires_grad_()
    noise = (torch.rand(template.out_channels, dtype=torch.float64) * 0.1).requires_grad_()

    def predict(m: Tensor, v: Tensor, w: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        layer = _as_function_of(_CONVS[case]().double(), w, b)
        predicted_mean, predicted_variance = _propagate(layer, spatial_shape, m, v, rectify=True)
        return predicted_mean, predicted_variance + r

    assert torch.autograd.gradcheck(predict, (mean, variance, weight, bias, noise))


def test_propagate_conv_rejects_a_spatial_rank_mismatch() -> None:
    with pytest.raises(M.MomentsError, match=r"2d Conv2d needs a 2d spatial shape, got \(5,\)"):
        _propagate(nn.Conv2d(3, 4, 3), (5,), torch.zeros(3), torch.ones(3), rectify=False)


@pytest.mark.parametrize("prior_source", ["input", "output"])
def test_module_propagates_through_its_feeding_conv_at_the_predecessors_input_size(prior_source: str) -> None:
    """A wired layer's prior is its source's Gaussian pushed through ReLU and the conv at the source's input size.

    The Gaussian is the source's posterior of its input statistics N(μ, Σ) with
    ``prior_source="input"`` (the authors'), and the moments of its normalized output
    N(β, γ² Σ/(Σ + ε)) with ``"output"`` (the default).
    """
    from bkn_export import BatchKalmanNorm2d, chain_statistics, wire_chain

    first = BatchKalmanNorm2d(3, prior_source=prior_source)  # type: ignore[arg-type]
    second = BatchKalmanNorm2d(4, prior_source=prior_source)  # type: ignore[arg-type]
    with torch.no_grad():  # γ, β away from their initial 1, 0: the two conventions differ
        first.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        first.bias.copy_(torch.tensor([0.3, -0.7, 1.1]))
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    model = nn.Sequential(first, nn.ReLU(), conv, second)
    wire_chain(model, torch.randn(2, 3, 6, 6))
    x = torch.randn(2, 3, 7, 5)  # another spatial size than the example's
    source, layer = chain_statistics(model, x)
    assert layer.transition == "propagate" and [s.name for s in layer.sources] == ["0"]
    assert layer.sources[0].shape == x.shape
    assert source.posterior_mean is not None and source.posterior_variance is not None
    mean, variance = source.posterior_mean, source.posterior_variance
    if prior_source == "output":
        gamma, beta = first.weight.detach(), first.bias.detach()
        mean, variance = M.normalized_output_moments(mean, variance, gamma, beta, first.eps)
    torch.testing.assert_close(layer.sources[0].mean, mean)
    torch.testing.assert_close(layer.sources[0].variance, variance)
    mean, variance = M.elementwise_moments("relu", mean, variance)
    mean, variance, _ = M.conv_moments(conv, mean, variance, (7, 5))
    noise = second.process_noise()
    assert noise is not None and layer.prior_mean is not None and layer.prior_variance is not None
    torch.testing.assert_close(layer.prior_mean, mean)
    torch.testing.assert_close(layer.prior_variance, variance + noise.detach())


def test_relu_moments_limits() -> None:
    """ReLU of a Gaussian far above 0 is the identity; far below, it is 0; at 0 mean, closed form."""
    mean = torch.tensor([50.0, -50.0, 0.0], dtype=torch.float64)
    variance = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    first, second = M.elementwise_moments("relu", mean, variance)
    half_normal_mean = 1.0 / math.sqrt(2.0 * math.pi)
    torch.testing.assert_close(first, torch.tensor([50.0, 0.0, half_normal_mean], dtype=torch.float64))
    torch.testing.assert_close(
        second, torch.tensor([2.0, 0.0, 0.5 - half_normal_mean**2], dtype=torch.float64), atol=1e-12, rtol=1e-9
    )


@pytest.mark.parametrize(("count", "factor"), [(1, 1.0), (2, 2.0), (10, 10 / 9)])
def test_running_statistics_follow_batchnorm_convention(count: int, factor: float) -> None:
    """r ← (1-α) r + α n/(n-1) Σ; at n = 1 the posterior variance is taken unscaled."""
    running_mean, running_variance = torch.zeros(2), torch.ones(2)
    mean, variance = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    new_mean, new_variance = Fk.running_statistics_update(running_mean, running_variance, mean, variance, 0.25, count)
    torch.testing.assert_close(new_mean, 0.25 * mean)
    torch.testing.assert_close(new_variance, 0.75 + 0.25 * factor * variance)
    assert running_variance.eq(1.0).all()  # inputs untouched


# --------------------------------------------------------------------------- CPU fast path

FAST_SHAPES = [(6, 3), (4, 3, 7), (2, 3, 5, 4), (2, 3, 2, 3, 4), (1, 3)]


@pytest.mark.parametrize("shape", FAST_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("fallback_ratio", "fires"), FALLBACK_CASES)
def test_cpu_fast_path_matches_reference(
    shape: tuple[int, ...], dtype: torch.dtype, fallback_ratio: float, fires: bool
) -> None:
    """The registered CPU kernels give the reference's outputs and gradients."""
    x, m, v, p, w, b = _op_inputs(shape, fires, dtype=dtype)
    assert cpu_kernels.fast_path_applies(x, m, v, p, w, b)
    fast = torch.ops.bkn.batch_kalman_norm(x, m, v, p, w, b, EPS, fallback_ratio)
    reference = Fk.batch_kalman_norm(x, m, v, p, w, b, EPS, fallback_ratio)
    # Rounding of x - μ is amplified by 1/sqrt(Σ + ε): up to 1/sqrt(ε) ≈ 316 at n = 1.
    amplification = float((reference.posterior_variance + EPS).rsqrt().max() * x.abs().max())
    unit = torch.finfo(dtype).eps
    tol: dict[str, Any] = {"rtol": 1e3 * unit, "atol": 1e3 * unit + 8 * unit * amplification}
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, **tol)
    grads = (torch.randn_like(x), torch.randn_like(m), torch.randn_like(m))
    fast_grads = torch.ops.bkn.batch_kalman_norm_backward(*grads, x, m, v, p, w, EPS, fallback_ratio)
    reference_grads = Fk.batch_kalman_norm_backward(*grads, x, m, v, p, w, EPS, fallback_ratio)
    for got_grad, want_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(got_grad, want_grad, **tol)


def test_cpu_kernels_are_the_ops_cpu_implementation() -> None:
    """On CPU the op runs bkn_export.cpu_kernels (bit for bit), not the default reference body."""
    x, m, v, p, w, b = _op_inputs((4, 3, 5, 5), False, dtype=torch.float32)
    via_op = torch.ops.bkn.batch_kalman_norm(x, m, v, p, w, b, EPS, 0.0)
    direct = cpu_kernels.batch_kalman_norm(Fk.KalmanNormInputs(x, m, v, p, w, b, EPS, 0.0))
    for got, want in zip(via_op, direct):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = (torch.randn_like(x), torch.randn_like(m), torch.randn_like(m))
    via_op_grads = torch.ops.bkn.batch_kalman_norm_backward(*grads, x, m, v, p, w, EPS, 0.0)
    direct_grads = cpu_kernels.batch_kalman_norm_backward(
        Fk.KalmanNormInputs(x, m, v, p, w, None, EPS, 0.0), Fk.KalmanStep(*grads)
    )
    for got, want in zip(via_op_grads, direct_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((2, 3, 5, 4), torch.channels_last), ((2, 3, 2, 3, 4), torch.channels_last_3d)],
    ids=["channels_last", "channels_last_3d"],
)
def test_cpu_fast_path_channels_last(shape: tuple[int, ...], memory_format: torch.memory_format) -> None:
    x, m, v, p, w, b = _op_inputs(shape, False)
    x_cl = x.contiguous(memory_format=memory_format)
    y, mean, variance = torch.ops.bkn.batch_kalman_norm(x_cl, m, v, p, w, b, EPS, 0.0)
    step = Fk.batch_kalman_norm(x, m, v, p, w, b, EPS)
    torch.testing.assert_close(y, step.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, step.posterior_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance, step.posterior_variance, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(x)
    got = torch.ops.bkn.batch_kalman_norm_backward(
        grad_y.contiguous(memory_format=memory_format), m, m, x_cl, m, v, p, w, EPS, 0.0
    )
    want = Fk.batch_kalman_norm_backward(grad_y, m, m, x, m, v, p, w, EPS)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)


def test_cpu_fast_path_variance_keeps_precision_for_large_means() -> None:
    """float32 input with mean 1e3 and spread 1: variance within 1e-4 of the float64 value."""
    x64 = torch.randn(16, 4, 8, 8, dtype=torch.float64) + 1000.0
    x32 = x64.float()
    stats = cpu_kernels.batch_statistics(x32)
    exact = Fk.batch_statistics(x32.double())
    torch.testing.assert_close(stats.variance.double(), exact.variance, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(stats.mean.double(), exact.mean, rtol=1e-6, atol=0.0)


def test_cpu_fast_path_backward_with_expanded_grad() -> None:
    """y.sum().backward() hands the backward a stride-0 gradient; grads equal the reference's."""
    inputs = [t.requires_grad_() for t in _op_inputs((3, 2, 4, 4), False) if t is not None]
    torch.ops.bkn.batch_kalman_norm(*inputs, EPS, 0.0)[0].sum().backward()
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    x, m, v, p, w, b = reference_inputs
    step = Fk.batch_kalman_norm(x, m, v, p, w, b, EPS)
    want = torch.autograd.grad(step.output.sum(), reference_inputs)
    for leaf, expected in zip(inputs, want):
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernels_leave_half_types_to_reference(dtype: torch.dtype) -> None:
    """Half inputs accumulate in float32 through the reference (fast path does not apply)."""
    x, m, v, p, w, b = _op_inputs((4, 3, 5), False, dtype=torch.float32)
    x_half = x.to(dtype)
    assert not cpu_kernels.fast_path_applies(x_half, m, v, p, w, b)
    y, mean, variance = torch.ops.bkn.batch_kalman_norm(x_half, m, v, p, w, b, EPS, 0.0)
    step = Fk.batch_kalman_norm(x_half, m, v, p, w, b, EPS)
    assert y.dtype == dtype and mean.dtype == torch.float32
    torch.testing.assert_close(y, step.output, rtol=0, atol=0)
    torch.testing.assert_close(variance, step.posterior_variance, rtol=0, atol=0)
