"""Specification of bkn_export.moments: per-channel Gaussian moments through the layers between two norms.

The model: every position of every sample is an independent draw from N(mean_c, variance_c)
per channel. Each function must give the mean and the variance of the layer's output pooled
over positions (what batch statistics over (N, *) estimate):

* against a Monte Carlo of the REAL torch module or functional (positions drawn i.i.d.,
  fixed seed): within 10 % in mean (relative to the largest |mean| or std over channels)
  and 10 % in variance (relative, per channel), the contract the chain relies on;
* where the layer is linear (conv, avg pooling, interpolation), exactly (float64, 1e-9)
  against the layer's own Jacobian: M_p = f(μ-map), V_p = Σ_j J_pj² σ²_j, pooled by the
  law of total variance, so that a small error in the border bookkeeping cannot hide in
  the Monte Carlo tolerance;
* closed forms against a dense float64 quadrature, and the Gauss–Hermite kinds against the
  accuracy they state (the full grid of docs/prior.md runs with ``-m slow``; run this file
  as a script to print that table);
* gradients (gradcheck), determinism and ``torch.export``.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import moments as M

# --------------------------------------------------------------------------- helpers

# Each channel puts enough mass on every piece of every activation for a Monte Carlo to see it.
CHANNEL_MEANS = (-1.0, -0.5, 0.0, 0.7, 2.5)
CHANNEL_VARIANCES = (0.5, 1.0, 2.0, 0.05, 4.0)


def _channel_moments(dtype: torch.dtype = torch.float64, channels: int = 5) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(CHANNEL_MEANS, dtype=dtype)[:channels]
    variance = torch.tensor(CHANNEL_VARIANCES, dtype=dtype)[:channels]
    return mean, variance


def _sample(mean: Tensor, variance: Tensor, batch: int, spatial: Sequence[int], seed: int = 0) -> Tensor:
    """(batch, C, *spatial): every position an independent draw from N(mean_c, variance_c)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (1, -1, *([1] * len(spatial)))
    noise = torch.randn(batch, mean.shape[0], *spatial, generator=generator, dtype=mean.dtype)
    return mean.reshape(shape) + variance.sqrt().reshape(shape) * noise


def _batch_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    dims = [0, *range(2, y.dim())]
    variance, mean = torch.var_mean(y, dim=dims, correction=0)
    return mean, variance


def _monte_carlo(
    layer: Callable[[Tensor], Tensor], mean: Tensor, variance: Tensor, spatial: Sequence[int], batch: int
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return _batch_moments(layer(_sample(mean, variance, batch, spatial)))


def _assert_within_contract(predicted: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]) -> None:
    """The chain's contract: mean within 10 % of the largest |mean| or std, variance within 10 % per channel."""
    pred_mean, pred_var = (t.detach() for t in predicted)
    ref_mean, ref_var = reference
    scale = torch.maximum(ref_mean.abs().max(), ref_var.sqrt().max())
    mean_error = ((pred_mean - ref_mean).abs() / scale).max().item()
    var_error = ((pred_var - ref_var).abs() / ref_var.clamp_min(1e-12)).max().item()
    assert mean_error <= 0.10, f"mean off by {mean_error:.3f} of scale: {pred_mean} vs {ref_mean}"
    assert var_error <= 0.10, f"variance off by {var_error:.3f}: {pred_var} vs {ref_var}"


def _jacobian_moments(
    layer: Callable[[Tensor], Tensor], mean: Tensor, variance: Tensor, spatial: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Exact pooled moments of a linear(+bias) layer from its Jacobian (float64, one sample)."""
    channels = mean.shape[0]
    shape = (1, channels, *spatial)
    mean_map = mean.reshape(1, -1, *([1] * len(spatial))).expand(shape).contiguous()
    variance_map = variance.reshape(1, -1, *([1] * len(spatial))).expand(shape).reshape(-1)
    with torch.no_grad():
        out_mean = layer(mean_map)
    jacobian = torch.autograd.functional.jacobian(layer, mean_map, vectorize=True)
    out_channels = out_mean.shape[1]
    jacobian = jacobian.reshape(out_channels, -1, variance_map.numel())
    position_mean = out_mean.reshape(out_channels, -1)
    position_variance = (jacobian * jacobian) @ variance_map
    pooled_mean = position_mean.mean(dim=1)
    spread = position_mean.var(dim=1, correction=0)
    return pooled_mean, position_variance.mean(dim=1) + spread


def _assert_exact(predicted: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor], rtol: float = 1e-9) -> None:
    torch.testing.assert_close(predicted[0].detach(), reference[0], rtol=rtol, atol=rtol)
    torch.testing.assert_close(predicted[1].detach(), reference[1], rtol=rtol, atol=rtol)


# --------------------------------------------------------------------------- elementwise

# kind, params for elementwise_moments, the real module
ELEMENTWISE_CASES: list[tuple[str, dict[str, Any], Callable[[], nn.Module]]] = [
    ("identity", {}, nn.Identity),
    ("relu", {}, nn.ReLU),
    ("relu6", {}, nn.ReLU6),
    ("leaky_relu", {"negative_slope": 0.2}, lambda: nn.LeakyReLU(0.2)),
    ("hardtanh", {"min_val": -0.5, "max_val": 2.0}, lambda: nn.Hardtanh(-0.5, 2.0)),
    ("hardsigmoid", {}, nn.Hardsigmoid),
    ("hardswish", {}, nn.Hardswish),
    ("elu", {"alpha": 0.7}, lambda: nn.ELU(0.7)),
    ("selu", {}, nn.SELU),
    ("celu", {"alpha": 1.5}, lambda: nn.CELU(1.5)),
    ("silu", {}, nn.SiLU),
    ("gelu", {}, nn.GELU),
    ("gelu", {"approximate": "tanh"}, lambda: nn.GELU("tanh")),
    ("sigmoid", {}, nn.Sigmoid),
    ("tanh", {}, nn.Tanh),
    ("mish", {}, nn.Mish),
    ("softplus", {"beta": 2.0, "threshold": 5.0}, lambda: nn.Softplus(2.0, 5.0)),
]


def _case_id(case: tuple[str, dict[str, Any], Any]) -> str:
    return case[0] + "".join(f"-{v}" for v in case[1].values())


@pytest.mark.parametrize("case", ELEMENTWISE_CASES, ids=_case_id)
def test_elementwise_matches_monte_carlo_of_the_module(
    case: tuple[str, dict[str, Any], Callable[[], nn.Module]],
) -> None:
    kind, params, module = case
    mean, variance = _channel_moments()
    predicted = M.elementwise_moments(kind, mean, variance, **params)
    _assert_within_contract(predicted, _monte_carlo(module(), mean, variance, (), batch=400_000))


def test_prelu_uses_one_slope_per_channel() -> None:
    mean, variance = _channel_moments()
    module = nn.PReLU(5).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.1, -0.3, 0.5, 2.0, 0.0]))
    predicted = M.elementwise_moments("prelu", mean, variance, weight=module.weight)
    _assert_within_contract(predicted, _monte_carlo(module, mean, variance, (), batch=400_000))


def test_every_listed_kind_is_specified() -> None:
    assert {case[0] for case in ELEMENTWISE_CASES} | {"prelu"} == set(M.ELEMENTWISE_KINDS)
    assert set(M.ACCURACY) == set(M.ELEMENTWISE_KINDS)


def _dense_reference(function: Callable[[Tensor], Tensor], mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """float64 moments of f(μ + σZ) by a 240 001-point trapezoid rule on z ∈ [−12, 12]."""
    z = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    weight = torch.exp(-0.5 * z * z)
    weight = weight / weight.sum()
    out_mean = torch.empty_like(mean)
    out_variance = torch.empty_like(mean)
    for k in range(mean.numel()):
        values = function(mean[k] + std[k] * z)
        out_mean[k] = values @ weight
        out_variance[k] = (values - out_mean[k]) ** 2 @ weight
    return out_mean, out_variance


def _grid(mean_points: int, std_points: int) -> tuple[Tensor, Tensor]:
    """μ ∈ [−4, 4] × σ ∈ [0.05, 10] (log-spaced), flattened."""
    means = torch.linspace(-4.0, 4.0, mean_points, dtype=torch.float64)
    stds = torch.logspace(math.log10(0.05), 1.0, std_points, dtype=torch.float64)
    grid_mean, grid_std = torch.meshgrid(means, stds, indexing="ij")
    return grid_mean.reshape(-1), grid_std.reshape(-1)


_Case = tuple[str, dict[str, Any], Callable[[], nn.Module]]


@functools.lru_cache(maxsize=32)
def _reference_on_grid(case_id: str, mean_points: int, std_points: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(μ, σ, reference mean, reference variance) on the grid, for the case named ``case_id``."""
    function = next(case[2] for case in ELEMENTWISE_CASES if _case_id(case) == case_id)()
    mean, std = _grid(mean_points, std_points)
    return (mean, std, *_dense_reference(function, mean, std))


def _relative_errors(case: _Case, mean_points: int, std_points: int, nodes: int | None = None) -> tuple[float, float]:
    """Max relative error of mean (to max(|mean|, std)) and of variance over the grid.

    Output variances below 1e-12 (a saturated activation: f(X) is constant to float64
    precision) count as 1e-12, below what the reference quadrature resolves.
    """
    mean, std, reference_mean, reference_variance = _reference_on_grid(_case_id(case), mean_points, std_points)
    params = case[1] if nodes is None else {**case[1], "nodes": nodes}
    predicted_mean, predicted_variance = M.elementwise_moments(case[0], mean, std * std, **params)
    scale = torch.maximum(reference_mean.abs(), reference_variance.sqrt()).clamp_min(1e-6)
    mean_error = ((predicted_mean - reference_mean).abs() / scale).max().item()
    variance_error = ((predicted_variance - reference_variance).abs() / reference_variance.clamp_min(1e-12)).max()
    return mean_error, variance_error.item()


CLOSED_FORM_CASES = [c for c in ELEMENTWISE_CASES if c[0] not in M.GAUSS_HERMITE_NODES and c[0] != "identity"]
QUADRATURE_CASES = [c for c in ELEMENTWISE_CASES if c[0] in M.GAUSS_HERMITE_NODES]


@pytest.mark.parametrize("case", CLOSED_FORM_CASES, ids=_case_id)
def test_closed_forms_are_exact(case: tuple[str, dict[str, Any], Any]) -> None:
    """Against a dense float64 quadrature (itself accurate to ~1e-8 on these kinked functions)."""
    mean_error, variance_error = _relative_errors(case, 9, 7)
    assert mean_error < 1e-7 and variance_error < 1e-7, (mean_error, variance_error)


@pytest.mark.parametrize("case", QUADRATURE_CASES, ids=_case_id)
def test_gauss_hermite_meets_its_stated_accuracy(case: tuple[str, dict[str, Any], Any]) -> None:
    mean_error, variance_error = _relative_errors(case, 9, 7)
    mean_bound, variance_bound = M.GAUSS_HERMITE_ACCURACY[case[0]]
    assert mean_error <= mean_bound and variance_error <= variance_bound <= 0.05, (mean_error, variance_error)


@pytest.mark.slow
@pytest.mark.parametrize("case", ELEMENTWISE_CASES[1:], ids=_case_id)
def test_elementwise_accuracy_full_grid(case: tuple[str, dict[str, Any], Any]) -> None:
    """The table of docs/prior.md: 33 × 25 points of μ ∈ [−4, 4], σ ∈ [0.05, 10]."""
    mean_error, variance_error = _relative_errors(case, 33, 25)
    if case[0] in M.GAUSS_HERMITE_NODES:
        mean_bound, variance_bound = M.GAUSS_HERMITE_ACCURACY[case[0]]
    else:
        mean_bound, variance_bound = 1e-7, 1e-7
    assert mean_error <= mean_bound and variance_error <= variance_bound, (mean_error, variance_error)


def test_too_few_gauss_hermite_nodes_break_the_bound() -> None:
    """The node count matters: tanh at 16 nodes misses the 5 % variance bound (so the test above can fail)."""
    mean, std = _grid(9, 7)
    _, variance = M.elementwise_moments("tanh", mean, std * std, nodes=16)
    _, reference = _dense_reference(torch.tanh, mean, std)
    assert ((variance - reference).abs() / reference).max() > 0.05


@pytest.mark.parametrize("case", ELEMENTWISE_CASES, ids=_case_id)
def test_float32_agrees_with_float64(case: tuple[str, dict[str, Any], Any]) -> None:
    """float32 loses no more than its rounding of the inputs' scale s = |μ| + σ."""
    mean, std = _grid(9, 7)
    wide = M.elementwise_moments(case[0], mean, std * std, **case[1])
    narrow = M.elementwise_moments(case[0], mean.float(), (std * std).float(), **case[1])
    assert narrow[0].dtype == narrow[1].dtype == torch.float32
    input_scale = mean.abs() + std
    mean_bound = 1e-4 * torch.maximum(wide[0].abs(), wide[1].sqrt()) + 1e-6 * input_scale
    variance_bound = 1e-3 * wide[1] + 1e-6 * input_scale**2
    assert ((narrow[0].double() - wide[0]).abs() <= mean_bound).all()
    assert ((narrow[1].double() - wide[1]).abs() <= variance_bound).all()


def test_tiny_and_huge_variances_stay_finite() -> None:
    mean = torch.tensor([-50.0, 0.0, 50.0, 3.0], dtype=torch.float32)
    for variance in (torch.full((4,), 1e-14), torch.full((4,), 1e4)):
        for kind in M.ELEMENTWISE_KINDS:
            params = {"weight": torch.tensor([0.2])} if kind == "prelu" else {}
            out_mean, out_variance = M.elementwise_moments(kind, mean, variance, **params)
            assert torch.isfinite(out_mean).all() and torch.isfinite(out_variance).all(), kind
            assert (out_variance >= 0).all(), kind


def test_unknown_kind_and_parameters_raise() -> None:
    mean, variance = _channel_moments()
    with pytest.raises(M.MomentsError, match="unknown activation 'swishy'"):
        M.elementwise_moments("swishy", mean, variance)
    with pytest.raises(M.MomentsError, match="negative_slope"):
        M.elementwise_moments("leaky_relu", mean, variance, slope=0.1)
    with pytest.raises(M.MomentsError, match="prelu"):
        M.elementwise_moments("prelu", mean, variance)
    with pytest.raises(M.MomentsError, match="nodes"):
        M.elementwise_moments("silu", mean, variance, nodes=4)


# --------------------------------------------------------------------------- max of normals


def _max_moments_by_scipy(n: int, integrate: Any, stats: Any) -> tuple[float, float]:
    """Mean and variance of the max of n standard normals by scipy's adaptive quadrature."""

    def density(z: float) -> float:
        return n * stats.norm.pdf(z) * math.exp((n - 1) * stats.norm.logcdf(z))

    first = integrate.quad(lambda z: z * density(z), -12, 12, points=[3.0], limit=200)[0]
    second = integrate.quad(lambda z: (z - first) ** 2 * density(z), -12, 12, points=[3.0], limit=200)[0]
    return first, second


def test_max_of_normals_known_values() -> None:
    """n = 1, 2, 3 in closed form; large n against scipy's adaptive quadrature."""
    counts = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    mean, variance = M.max_of_normals_moments(counts)
    expected_mean = torch.tensor([0.0, 1 / math.sqrt(math.pi), 1.5 / math.sqrt(math.pi)], dtype=torch.float64)
    expected_variance = torch.tensor(
        [1.0, 1 - 1 / math.pi, 1 + math.sqrt(3) / (2 * math.pi) - 9 / (4 * math.pi)], dtype=torch.float64
    )
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(variance, expected_variance, rtol=0, atol=1e-6)
    integrate = pytest.importorskip("scipy.integrate")
    stats = pytest.importorskip("scipy.stats")
    for n in (9, 49, 1000, 10**6):
        first, second = _max_moments_by_scipy(n, integrate, stats)
        got_mean, got_variance = M.max_of_normals_moments(torch.tensor(float(n), dtype=torch.float64))
        assert abs(got_mean.item() - first) < 1e-6 and abs(got_variance.item() - second) < 1e-6, n


# --------------------------------------------------------------------------- pooling

POOL_MODULES: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (lambda: nn.AvgPool1d(3, 2, 1), (9,)),
    (lambda: nn.AvgPool2d(3, 2, 1), (7, 6)),
    (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), (7, 6)),
    (lambda: nn.AvgPool2d((2, 3), (2, 1), (1, 0), ceil_mode=True), (7, 6)),
    (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (8, 5)),
    (lambda: nn.AvgPool2d(2, divisor_override=3), (6, 6)),
    (lambda: nn.AvgPool1d(2, 2, 1, ceil_mode=True), (5,)),  # ceil_mode drops the last window
    (lambda: nn.AvgPool3d(2, 1, 1), (3, 4, 3)),
    (lambda: nn.AdaptiveAvgPool2d(1), (5, 7)),
    (lambda: nn.AdaptiveAvgPool2d((3, None)), (7, 5)),
    (lambda: nn.AdaptiveAvgPool1d(4), (10,)),
]
MAX_POOL_MODULES: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (lambda: nn.MaxPool2d(2), (6, 6)),
    (lambda: nn.MaxPool2d(3, 2, 1), (7, 6)),
    (lambda: nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), (9, 8)),
    (lambda: nn.MaxPool1d(5, 1, 2), (7,)),
    (lambda: nn.MaxPool2d(2, 2, 1, ceil_mode=True), (5, 6)),  # ceil_mode drops the last window in H
    (lambda: nn.MaxPool3d(2, 2, 1), (3, 4, 4)),
    (lambda: nn.AdaptiveMaxPool2d(1), (5, 5)),
    (lambda: nn.AdaptiveMaxPool2d((2, 3)), (5, 7)),
]


def _pool_id(case: tuple[Callable[[], nn.Module], tuple[int, ...]]) -> str:
    return f"{case[0]()}@{case[1]}".replace(" ", "")


@pytest.mark.parametrize("case", POOL_MODULES, ids=_pool_id)
def test_average_pooling_is_exact(case: tuple[Callable[[], nn.Module], tuple[int, ...]]) -> None:
    module, spatial = case[0](), case[1]
    mean, variance = _channel_moments()
    out_mean, out_variance, out_spatial = M.pool_moments(M.PoolSpec.from_module(module), mean, variance, spatial)
    assert out_spatial == tuple(module(torch.zeros(1, 5, *spatial)).shape[2:])
    _assert_exact((out_mean, out_variance), _jacobian_moments(module, mean, variance, spatial))


@pytest.mark.parametrize("case", POOL_MODULES + MAX_POOL_MODULES, ids=_pool_id)
def test_pooling_matches_monte_carlo_of_the_module(case: tuple[Callable[[], nn.Module], tuple[int, ...]]) -> None:
    module, spatial = case[0](), case[1]
    mean, variance = _channel_moments()
    out_mean, out_variance, out_spatial = M.pool_moments(M.PoolSpec.from_module(module), mean, variance, spatial)
    assert out_spatial == tuple(module(torch.zeros(1, 5, *spatial)).shape[2:])
    _assert_within_contract((out_mean, out_variance), _monte_carlo(module, mean, variance, spatial, batch=20_000))


@pytest.mark.parametrize(
    ("function", "args", "kwargs", "module"),
    [
        (
            "avg_pool2d",
            (3, 2),
            {"padding": 1, "count_include_pad": False},
            nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        ),
        ("torch.nn.functional.max_pool1d", (3,), {"stride": 1, "dilation": 2}, nn.MaxPool1d(3, 1, dilation=2)),
        ("adaptive_avg_pool3d", ((1, 2, None),), {}, nn.AdaptiveAvgPool3d((1, 2, None))),
        ("adaptive_max_pool2d", (), {"output_size": 2}, nn.AdaptiveMaxPool2d(2)),
    ],
)
def test_functional_calls_give_the_module_spec(
    function: str, args: tuple[Any, ...], kwargs: dict[str, Any], module: nn.Module
) -> None:
    assert M.PoolSpec.from_call(function, args, kwargs) == M.PoolSpec.from_module(module)
    assert M.PoolSpec.from_call(function, (torch.zeros(1), *args), kwargs) == M.PoolSpec.from_module(module)


def test_unsupported_pools_raise() -> None:
    with pytest.raises(M.MomentsError, match="LPPool2d"):
        M.PoolSpec.from_module(nn.LPPool2d(2, 2))
    with pytest.raises(M.MomentsError, match="return_indices"):
        M.PoolSpec.from_module(nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(M.MomentsError, match="lp_pool2d"):
        M.PoolSpec.from_call("lp_pool2d", (2, 2), {})


# --------------------------------------------------------------------------- resampling

RESAMPLE_CASES: list[tuple[dict[str, Any], tuple[int, ...]]] = [
    ({"scale_factor": 2, "mode": "nearest"}, (4, 5)),
    ({"size": (7, 3), "mode": "nearest-exact"}, (4, 5)),
    ({"scale_factor": 2, "mode": "bilinear", "align_corners": False}, (4, 5)),
    ({"scale_factor": 2, "mode": "bilinear", "align_corners": True}, (4, 5)),
    ({"size": (7, 9), "mode": "bilinear", "align_corners": False}, (4, 5)),
    ({"scale_factor": 1.7, "mode": "bilinear", "recompute_scale_factor": True}, (4, 5)),
    ({"scale_factor": 0.5, "mode": "bilinear"}, (8, 6)),
    ({"scale_factor": 3, "mode": "linear", "align_corners": True}, (5,)),
    ({"size": (5, 4, 6), "mode": "trilinear"}, (3, 3, 4)),
    ({"scale_factor": 2, "mode": "bicubic", "align_corners": False}, (4, 5)),
    ({"scale_factor": 2, "mode": "bicubic", "align_corners": True}, (4, 5)),
    ({"size": (3, 2), "mode": "area"}, (7, 5)),
]


def _interpolation(kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    return lambda x: F.interpolate(x, **kwargs)


@pytest.mark.parametrize("case", RESAMPLE_CASES, ids=lambda c: f"{c[0]}@{c[1]}".replace(" ", ""))
def test_interpolation_is_exact(case: tuple[dict[str, Any], tuple[int, ...]]) -> None:
    kwargs, spatial = case
    mean, variance = _channel_moments()
    spec = M.ResampleSpec.from_call((), kwargs)
    out_mean, out_variance, out_spatial = M.resample_moments(spec, mean, variance, spatial)
    assert out_spatial == tuple(F.interpolate(torch.zeros(1, 5, *spatial), **kwargs).shape[2:])
    _assert_exact((out_mean, out_variance), _jacobian_moments(_interpolation(kwargs), mean, variance, spatial))


@pytest.mark.parametrize("case", RESAMPLE_CASES[2:5], ids=lambda c: f"{c[0]}@{c[1]}".replace(" ", ""))
def test_interpolation_matches_monte_carlo(case: tuple[dict[str, Any], tuple[int, ...]]) -> None:
    kwargs, spatial = case
    mean, variance = _channel_moments()
    module = nn.Upsample(**kwargs)
    out_mean, out_variance, _ = M.resample_moments(M.ResampleSpec.from_module(module), mean, variance, spatial)
    _assert_within_contract((out_mean, out_variance), _monte_carlo(module, mean, variance, spatial, batch=20_000))


def test_upsampling_modules_and_antialias() -> None:
    assert M.ResampleSpec.from_module(nn.UpsamplingBilinear2d(scale_factor=2)).align_corners is True
    with pytest.raises(M.MomentsError, match="antialias"):
        M.ResampleSpec.from_call((None, 2, "bilinear"), {"antialias": True})
    with pytest.raises(M.MomentsError, match="Conv2d"):
        M.ResampleSpec.from_module(nn.Conv2d(1, 1, 1))


# --------------------------------------------------------------------------- conv / linear

CONV_CASES: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (lambda: nn.Conv2d(5, 4, 3, padding=1), (6, 5)),
    (lambda: nn.Conv2d(5, 4, 3, padding=0, bias=False), (6, 5)),
    (lambda: nn.Conv2d(5, 4, (3, 2), stride=2, padding=(1, 1), dilation=(1, 2)), (7, 6)),
    (lambda: nn.Conv2d(5, 5, 3, padding="same", groups=5), (6, 5)),
    (lambda: nn.Conv2d(5, 4, 3, padding=1, padding_mode="reflect"), (6, 5)),
    (lambda: nn.Conv2d(5, 4, 5, padding=2, padding_mode="reflect", stride=2), (6, 5)),
    (lambda: nn.Conv2d(5, 4, 3, padding=2, padding_mode="replicate", dilation=2), (6, 5)),
    (lambda: nn.Conv2d(5, 4, 4, padding="same", padding_mode="replicate"), (6, 5)),
    (lambda: nn.Conv2d(5, 4, 3, padding=1, padding_mode="circular"), (6, 5)),
    (lambda: nn.Conv2d(5, 4, 5, padding=(3, 2), padding_mode="circular"), (3, 2)),  # windows wrap onto themselves
    (lambda: nn.Conv1d(5, 6, 7, padding=3, padding_mode="circular", groups=1), (4,)),
    (lambda: nn.Conv3d(5, 2, 3, padding=1, padding_mode="reflect"), (3, 4, 3)),
    (lambda: nn.Conv2d(5, 4, 3, padding=1, padding_mode="reflect", groups=1, bias=False), (2, 2)),
    (lambda: nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1), (4, 3)),
    (lambda: nn.ConvTranspose1d(5, 4, 4, stride=3, dilation=2), (5,)),
]


def _conv_id(case: tuple[Callable[[], nn.Module], tuple[int, ...]]) -> str:
    return f"{case[0]()}@{case[1]}".replace(" ", "")


def _conv(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return factory().double()


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_is_exact_for_every_padding_mode(case: tuple[Callable[[], nn.Module], tuple[int, ...]]) -> None:
    layer, spatial = _conv(case[0]), case[1]
    mean, variance = _channel_moments()
    out_mean, out_variance, out_spatial = M.conv_moments(layer, mean, variance, spatial)
    assert out_spatial == tuple(layer(torch.zeros(1, 5, *spatial, dtype=torch.float64)).shape[2:])
    _assert_exact((out_mean, out_variance), _jacobian_moments(layer, mean, variance, spatial))


@pytest.mark.parametrize("case", CONV_CASES[4:11:2], ids=_conv_id)
def test_conv_matches_monte_carlo_of_the_module(case: tuple[Callable[[], nn.Module], tuple[int, ...]]) -> None:
    layer, spatial = _conv(case[0]), case[1]
    mean, variance = _channel_moments()
    predicted = M.conv_moments(layer, mean, variance, spatial)[:2]
    _assert_within_contract(predicted, _monte_carlo(layer, mean, variance, spatial, batch=20_000))


# (pad module, its (left, right) per spatial dim in order, its mode, the conv after it, input size)
PADDED_CONV_CASES: list[
    tuple[Callable[[], nn.Module], list[tuple[int, int]], str, Callable[[], nn.Module], tuple[int, ...]]
] = [
    (lambda: nn.ZeroPad2d((1, 0, 2, 1)), [(2, 1), (1, 0)], "zeros", lambda: nn.Conv2d(5, 4, 3, stride=2), (7, 6)),
    (lambda: nn.ReflectionPad2d(1), [(1, 1), (1, 1)], "reflect", lambda: nn.Conv2d(5, 4, 3), (5, 4)),
    (lambda: nn.ReplicationPad1d((2, 1)), [(2, 1)], "replicate", lambda: nn.Conv1d(5, 4, 3, padding=1), (5,)),
    (
        lambda: nn.CircularPad2d((2, 2, 1, 0)),
        [(1, 0), (2, 2)],
        "circular",
        lambda: nn.Conv2d(5, 4, 3, padding=1, padding_mode="reflect"),
        (4, 3),
    ),
]


@pytest.mark.parametrize("case", PADDED_CONV_CASES, ids=lambda c: f"{c[0]()}+{c[3]()}".replace(" ", ""))
def test_conv_after_an_explicit_pad_is_exact(case: tuple[Any, ...]) -> None:
    """A pad module before the conv (ReflectionPad2d + Conv2d, TF-style asymmetric "same" …) composes exactly."""
    pad, pairs, mode, conv_factory, spatial = case
    layer = _conv(conv_factory)
    path = nn.Sequential(pad(), layer)
    mean, variance = _channel_moments()
    out_mean, out_variance, out_spatial = M.conv_moments(
        layer, mean, variance, spatial, input_padding=pairs, input_padding_mode=mode
    )
    assert out_spatial == tuple(path(torch.zeros(1, 5, *spatial, dtype=torch.float64)).shape[2:])
    _assert_exact((out_mean, out_variance), _jacobian_moments(path, mean, variance, spatial))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_index_map_is_what_f_pad_does(mode: str) -> None:
    """The input each tap reads is the one F.pad copies into the border (pad an arange, unfold it)."""
    layer = nn.Conv1d(1, 1, 3, stride=2, padding=2, dilation=2, padding_mode=mode)
    size = 5
    padded = F.pad(torch.arange(size, dtype=torch.float64).reshape(1, 1, -1), (2, 2), mode=mode).reshape(-1)
    windows = padded.unfold(0, 2 * (3 - 1) + 1, 2)[:, ::2]  # (L_out, K): dilation 2
    assert torch.equal(M._conv_index_map(layer, 0, size), windows.long())


# Paths of linear steps whose intermediate positions are correlated: pushed step by step they are
# not exact (docs/prior.md), as one linear path they are.
LINEAR_PATHS: list[tuple[Callable[[], list[nn.Module]], tuple[int, ...]]] = [
    (lambda: [nn.AvgPool2d(3, 2, 1), nn.Conv2d(5, 4, 3, padding=1)], (9, 8)),
    (lambda: [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(5, 4, 3, padding=1)], (4, 5)),
    (lambda: [nn.Upsample(scale_factor=2), nn.Conv2d(5, 4, 3, padding=1, padding_mode="reflect")], (4, 3)),
    (lambda: [nn.Conv2d(5, 4, 3, padding=1), nn.AvgPool2d(2)], (6, 8)),
    (
        lambda: [
            nn.Conv2d(5, 4, 3, stride=2, bias=True),
            nn.Upsample(size=(5, 4), mode="bilinear", align_corners=True),
            nn.AvgPool2d(2, 2, 1, ceil_mode=True, count_include_pad=False),
        ],
        (9, 8),
    ),
    (lambda: [nn.ReflectionPad2d((1, 0, 1, 2)), nn.Conv2d(5, 4, 3), nn.AvgPool2d(2, divisor_override=3)], (6, 5)),
    (lambda: [nn.AvgPool2d(3, 1, 1), nn.Upsample(scale_factor=2, mode="bicubic")], (4, 5)),  # no conv
    (lambda: [nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1), nn.AvgPool2d(2)], (3, 4)),
    (
        lambda: [
            nn.Upsample(scale_factor=3, mode="linear", align_corners=True),
            nn.Conv1d(5, 6, 5, padding=2, padding_mode="circular"),
        ],
        (3,),
    ),
    (lambda: [nn.AvgPool3d(2, 1, 1), nn.Conv3d(5, 2, 3, padding=1, groups=1)], (3, 2, 3)),
    (lambda: [nn.Upsample(size=(3, 2), mode="area"), nn.Conv2d(5, 5, 3, padding=1, groups=5)], (7, 5)),
    (lambda: [nn.ZeroPad2d((1, 0, 0, 2)), nn.Conv2d(5, 4, 3, stride=2, padding_mode="zeros")], (7, 6)),
]


def _linear_step(module: nn.Module) -> M.LinearStep:
    if isinstance(module, nn.Upsample):
        return M.ResampleSpec.from_module(module)
    if isinstance(module, (nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.ZeroPad2d)):
        flat = module.padding  # F.pad order: last dim first
        pairs = tuple((flat[2 * k], flat[2 * k + 1]) for k in reversed(range(len(flat) // 2)))
        mode = (
            "reflect"
            if "Reflection" in type(module).__name__
            else "zeros"
            if "Zero" in type(module).__name__
            else "replicate"
        )
        return M.PadSpec(pairs, mode)
    if isinstance(module, nn.modules.conv._ConvNd):
        return module
    return M.PoolSpec.from_module(module)


def _path_id(case: tuple[Callable[[], list[nn.Module]], tuple[int, ...]]) -> str:
    return "+".join(type(m).__name__ for m in case[0]()) + f"@{case[1]}"


@pytest.mark.parametrize("case", LINEAR_PATHS, ids=_path_id)
def test_linear_paths_are_exact(case: tuple[Callable[[], list[nn.Module]], tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    modules, spatial = [m.double() for m in case[0]()], case[1]
    path = nn.Sequential(*modules)
    mean, variance = _channel_moments()
    out_mean, out_variance, out_spatial = M.linear_path_moments(
        [_linear_step(m) for m in modules], mean, variance, spatial
    )
    assert out_spatial == tuple(path(torch.zeros(1, 5, *spatial, dtype=torch.float64)).shape[2:])
    _assert_exact((out_mean, out_variance), _jacobian_moments(path, mean, variance, spatial))


@pytest.mark.parametrize("case", LINEAR_PATHS[:2], ids=_path_id)
def test_linear_paths_match_monte_carlo_where_step_by_step_does_not(
    case: tuple[Callable[[], list[nn.Module]], tuple[int, ...]],
) -> None:
    torch.manual_seed(0)
    modules, spatial = [m.double() for m in case[0]()], (12, 12)
    mean, variance = _channel_moments()
    reference = _monte_carlo(nn.Sequential(*modules), mean, variance, spatial, batch=2_000)
    predicted = M.linear_path_moments([_linear_step(m) for m in modules], mean, variance, spatial)[:2]
    _assert_within_contract(predicted, reference)
    step_mean, step_variance, step_spatial = mean, variance, spatial
    for module in modules:
        step = _linear_step(module)
        if isinstance(step, M.PoolSpec):
            step_mean, step_variance, step_spatial = M.pool_moments(step, step_mean, step_variance, step_spatial)
        elif isinstance(step, M.ResampleSpec):
            step_mean, step_variance, step_spatial = M.resample_moments(step, step_mean, step_variance, step_spatial)
        else:
            step_mean, step_variance, step_spatial = M.conv_moments(module, step_mean, step_variance, step_spatial)
    with pytest.raises(AssertionError, match="off by"):  # mean or variance outside the 10 % contract
        _assert_within_contract((step_mean, step_variance), reference)


def test_a_single_conv_path_is_conv_moments() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 4, 3, stride=2, padding=1, padding_mode="replicate").double()
    mean, variance = _channel_moments()
    path = M.linear_path_moments([layer], mean, variance, (7, 6))
    single = M.conv_moments(layer, mean, variance, (7, 6))
    assert path[2] == single[2]
    _assert_exact(path[:2], single[:2], rtol=1e-12)


def test_linear_paths_reject_max_pooling_and_two_convs() -> None:
    mean, variance = _channel_moments()
    with pytest.raises(M.MomentsError, match="not linear"):
        M.linear_path_moments([M.PoolSpec.from_module(nn.MaxPool2d(2))], mean, variance, (4, 4))
    with pytest.raises(M.MomentsError, match="at most one"):
        M.linear_path_moments([nn.Conv2d(5, 5, 1), nn.Conv2d(5, 5, 1)], mean, variance, (4, 4))


def test_linear_moments_match_monte_carlo() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    mean, variance = _channel_moments()
    predicted = M.linear_moments(layer.weight, layer.bias, mean, variance)
    _assert_within_contract(predicted, _monte_carlo(layer, mean, variance, (), batch=200_000))
    _assert_exact(predicted, _jacobian_moments(lambda x: layer(x.reshape(1, -1)), mean, variance, ()))


def test_conv_rejects_other_layers_and_ranks() -> None:
    mean, variance = _channel_moments()
    with pytest.raises(M.MomentsError, match="Linear"):
        M.conv_moments(nn.Linear(5, 2), mean, variance, (3, 3))
    with pytest.raises(M.MomentsError, match=r"2d Conv2d needs a 2d spatial shape, got \(3,\)"):
        M.conv_moments(nn.Conv2d(5, 2, 3), mean, variance, (3,))


# --------------------------------------------------------------------------- normalized output


@pytest.mark.parametrize("affine", [True, False])
def test_normalized_output_moments_match_monte_carlo(affine: bool) -> None:
    mean, variance = _channel_moments()
    weight = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.1], dtype=torch.float64) if affine else None
    bias = torch.tensor([0.3, -1.0, 0.0, 2.0, 5.0], dtype=torch.float64) if affine else None
    eps = 0.1

    def normalize(x: Tensor) -> Tensor:
        return F.batch_norm(x, mean, variance, weight, bias, training=False, eps=eps)

    predicted = M.normalized_output_moments(mean, variance, weight, bias, eps)
    _assert_within_contract(predicted, _monte_carlo(normalize, mean, variance, (), batch=200_000))


# --------------------------------------------------------------------------- autograd, export


def _gradcheck(function: Callable[..., Any], *inputs: Tensor) -> None:
    def flat(*args: Tensor) -> tuple[Tensor, ...]:
        out = function(*args)
        return tuple(t for t in out if isinstance(t, Tensor))

    assert torch.autograd.gradcheck(flat, inputs, eps=1e-6, atol=1e-5)


def _leaf_moments() -> tuple[Tensor, Tensor]:
    mean, variance = _channel_moments()
    return mean.clone().requires_grad_(), variance.clone().requires_grad_()


@pytest.mark.parametrize("kind", ["relu6", "hardswish", "elu", "silu", "tanh", "prelu"])
def test_elementwise_gradients(kind: str) -> None:
    mean, variance = _leaf_moments()
    if kind == "prelu":
        slope = torch.tensor([0.1, 0.2, -0.3, 0.4, 0.5], dtype=torch.float64, requires_grad=True)
        _gradcheck(lambda m, v, w: M.elementwise_moments(kind, m, v, weight=w), mean, variance, slope)
    else:
        _gradcheck(lambda m, v: M.elementwise_moments(kind, m, v), mean, variance)


def test_exponential_kinds_are_smooth_across_their_branch_switch() -> None:
    """ELU's closed form switches formulas at μ/σ + σ = 0 and, inside, at 3: gradients stay exact there."""
    mean = torch.tensor([-0.25, -1.0, -4.0, -2.9, 1.0], dtype=torch.float64, requires_grad=True)
    variance = torch.tensor([0.25, 1.0, 4.0, 0.01, 9.0], dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda m, v: M.elementwise_moments("elu", m, v), mean, variance)
    _gradcheck(lambda m, v: M.elementwise_moments("celu", m, v, alpha=0.5), mean, variance)


def test_linear_path_gradients() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 3, 3, padding=1, padding_mode="reflect").double()
    steps: list[M.LinearStep] = [
        M.ResampleSpec("bilinear", scale_factor=2),
        layer,
        M.PoolSpec.from_module(nn.AvgPool2d(2)),
    ]
    _gradcheck(lambda m, v: M.linear_path_moments(steps, m, v, (3, 4))[:2], *_leaf_moments())


@pytest.mark.parametrize("module", [nn.AvgPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)], ids=str)
def test_pool_gradients(module: nn.Module) -> None:
    spec = M.PoolSpec.from_module(module)
    _gradcheck(lambda m, v: M.pool_moments(spec, m, v, (7, 6))[:2], *_leaf_moments())


def test_resample_gradients() -> None:
    spec = M.ResampleSpec("bilinear", scale_factor=2)
    _gradcheck(lambda m, v: M.resample_moments(spec, m, v, (4, 5))[:2], *_leaf_moments())


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_conv_gradients_reach_weights(padding_mode: str) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 3, 3, padding=1, padding_mode=padding_mode).double()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def moments(m: Tensor, v: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        functional_layer = nn.Conv2d(5, 3, 3, padding=1, padding_mode=padding_mode).double()
        del functional_layer.weight, functional_layer.bias
        functional_layer.weight, functional_layer.bias = w, b  # type: ignore[assignment]
        return M.conv_moments(functional_layer, m, v, (4, 5))[:2]

    _gradcheck(moments, *_leaf_moments(), weight, bias)


class _PriorPath(nn.Module):
    """A path as the chain pushes it, sized by its input x: (N, C, H, W) (only its shape is read):
    SiLU → AvgPool (ceil_mode) → reflect-padded conv → MaxPool → bilinear ×2 → Hardswish; and
    AvgPool(3, 2, 1) → reflect-padded conv → bilinear ×2 as one linear path."""

    def __init__(self) -> None:
        super().__init__()
        self.avg_pool = M.PoolSpec.from_module(nn.AvgPool2d(3, 2, 1, ceil_mode=True))
        self.conv = nn.Conv2d(5, 3, 3, padding=1, padding_mode="reflect")
        self.max_pool = M.PoolSpec.from_module(nn.MaxPool2d(3, 2, 1))
        self.upsample = M.ResampleSpec("bilinear", scale_factor=2)

    def forward(self, x: Tensor, mean: Tensor, variance: Tensor) -> tuple[Tensor, ...]:
        linear_path = [M.PoolSpec.from_module(nn.AvgPool2d(3, 2, 1)), self.conv, self.upsample]
        path_mean, path_variance, _ = M.linear_path_moments(linear_path, mean, variance, x.shape[2:])
        mean, variance = M.elementwise_moments("silu", mean, variance)
        mean, variance, spatial = M.pool_moments(self.avg_pool, mean, variance, x.shape[2:])
        mean, variance, spatial = M.conv_moments(self.conv, mean, variance, spatial)
        mean, variance, spatial = M.pool_moments(self.max_pool, mean, variance, spatial)
        mean, variance, _ = M.resample_moments(self.upsample, mean, variance, spatial)
        return (*M.elementwise_moments("hardswish", mean, variance), path_mean, path_variance)


def test_a_path_exports_with_dynamic_spatial_size() -> None:
    """torch.export traces the path without specializing on H, W and runs as eager does."""
    module = _PriorPath()
    mean, variance = _channel_moments(torch.float32)
    size = {2: torch.export.Dim("height", min=8, max=64), 3: torch.export.Dim("width", min=8, max=64)}
    program = torch.export.export(
        module, (torch.zeros(1, 5, 16, 12), mean, variance), dynamic_shapes={"x": size, "mean": None, "variance": None}
    )
    for shape in [(1, 5, 16, 12), (1, 5, 23, 9)]:
        x = torch.zeros(shape)
        for eager, exported in zip(module(x, mean, variance), program.module()(x, mean, variance)):
            torch.testing.assert_close(eager, exported)


class _AllKinds(nn.Module):
    """Every elementwise kind, max pooling → reflect conv, and a linear path, on the same moments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.max_pool = M.PoolSpec.from_module(nn.MaxPool2d(3, 2, 1))
        self.path: list[M.LinearStep] = [
            M.PoolSpec.from_module(nn.AvgPool2d(3, 2, 1)),
            self.conv,
            M.ResampleSpec("bilinear", scale_factor=2),
        ]

    def forward(self, mean: Tensor, variance: Tensor) -> tuple[Tensor, ...]:
        outputs: list[Tensor] = []
        for kind in M.ELEMENTWISE_KINDS:
            params = {"weight": torch.full((1,), 0.25)} if kind == "prelu" else {}
            outputs += M.elementwise_moments(kind, mean, variance, **params)
        pooled_mean, pooled_variance, spatial = M.pool_moments(self.max_pool, mean, variance, (8, 8))
        outputs += M.conv_moments(self.conv, pooled_mean, pooled_variance, spatial)[:2]
        outputs += M.linear_path_moments(self.path, mean, variance, (8, 8))[:2]
        return tuple(outputs)


_CACHED_POOLS = [
    M.PoolSpec.from_module(pool)
    for pool in (
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.AdaptiveAvgPool2d((2, 3)),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.AdaptiveMaxPool2d(3),
    )
]


def _constants_path(mean: Tensor, variance: Tensor) -> tuple[Tensor, ...]:
    """Every kind of constant the module caches in eager mode: piecewise edges and coefficients,
    a Gauss–Hermite rule, zero- and reflect-padded conv coverage tables, pooling factors."""
    zero_padded = nn.Conv2d(5, 4, 3, padding=1, stride=2).double()
    reflected = nn.Conv2d(5, 3, 3, padding=1, padding_mode="reflect").double()
    torch.manual_seed(0)
    outputs = [*M.elementwise_moments("hardswish", mean, variance), *M.elementwise_moments("silu", mean, variance)]
    outputs += M.conv_moments(zero_padded, mean, variance, (7, 6))[:2]
    outputs += M.conv_moments(reflected, mean, variance, (5, 5))[:2]
    for spec in _CACHED_POOLS:
        outputs += M.pool_moments(spec, mean, variance, (7, 6))[:2]
    return tuple(outputs)


def test_cached_constants_give_the_uncached_values_and_hold_no_graph() -> None:
    """Eager calls take constants from bounded caches; the values equal a call that builds them
    (under an active dispatch mode nothing is cached), and no cached tensor requires grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            return func(*args, **(kwargs or {}))

    mean, variance = _leaf_moments()
    first = _constants_path(mean, variance)
    second = _constants_path(mean, variance)  # from the caches
    with _Passthrough():
        built = _constants_path(mean, variance)
    for a, b, c in zip(first, second, built, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    torch.stack([t.sum() for t in second]).sum().backward()
    assert mean.grad is not None and torch.isfinite(mean.grad).all()
    cached = [*M._COVERAGE_TABLES.values()]
    assert cached, "conv_moments cached no coverage table in eager mode"
    tensors = [t for entry in cached for t in entry if t is not None]
    assert M._piece_edges.cache_info().currsize > 0 and M._hermite_tensors.cache_info().currsize > 0
    hits = M._pool_factors.cache_info().hits
    tensors += [t for spec in _CACHED_POOLS for t in M._pool_factors(spec, (7, 6), torch.float64, torch.device("cpu"))]
    assert M._pool_factors.cache_info().hits == hits + len(_CACHED_POOLS)  # the path cached each one
    assert not any(t.requires_grad for t in tensors)
    assert M._piece_edges.cache_info().maxsize == M._CACHE_SIZE


def test_a_call_in_inference_mode_does_not_poison_later_training_calls() -> None:
    """Constants built under torch.inference_mode cannot be saved for backward: such calls build
    their own, so a later call with gradients still back-propagates."""
    mean, variance = _channel_moments()
    M._COVERAGE_TABLES.clear()
    M._piece_edges.cache_clear()
    M._piece_coefficients.cache_clear()
    M._hermite_tensors.cache_clear()
    M._pool_factors.cache_clear()
    with torch.inference_mode():
        _constants_path(mean, variance)
    leaf_mean, leaf_variance = _leaf_moments()
    torch.stack([t.sum() for t in _constants_path(leaf_mean, leaf_variance)]).sum().backward()
    assert leaf_variance.grad is not None and torch.isfinite(leaf_variance.grad).all()


@pytest.mark.slow  # ~20 s; the chain's own compile test runs in the default suite
def test_a_path_compiles_without_graph_breaks() -> None:
    """torch.compile(fullgraph=True) traces the steps (constants, no numpy in the traced code)."""
    path = _PriorPath()
    mean, variance = _channel_moments(torch.float32)
    x = torch.zeros(1, 5, 12, 10)
    compiled_path = torch.compile(path, fullgraph=True, backend="aot_eager")
    for eager, traced in zip(path(x, mean, variance), compiled_path(x, mean, variance)):
        torch.testing.assert_close(eager, traced)


@pytest.mark.slow
def test_every_step_compiles_without_graph_breaks() -> None:
    """The same for every elementwise kind, max pooling and a linear path."""
    mean, variance = _channel_moments(torch.float32)
    all_kinds = _AllKinds()
    wide_mean, wide_variance = torch.cat([mean, mean[:1]]), torch.cat([variance, variance[:1]])
    compiled = torch.compile(all_kinds, fullgraph=True, backend="aot_eager")
    for eager, traced in zip(all_kinds(wide_mean, wide_variance), compiled(wide_mean, wide_variance)):
        torch.testing.assert_close(eager, traced)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_without_nan() -> None:
    """The training-mode ONNX graph computes the same moments (saturated inputs and variance 0 included)."""
    ort = pytest.importorskip("onnxruntime")
    module = _AllKinds()
    mean = torch.tensor([-50.0, -3.0, 0.0, 0.5, 3.0, 50.0])
    variance = torch.tensor([0.0, 1e-8, 1.0, 100.0, 0.01, 1.0])
    program = torch.onnx.export(module, (mean, variance), dynamo=True)
    assert program is not None
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [entry.name for entry in session.get_inputs()]
    outputs = session.run(None, dict(zip(names, [mean.numpy(), variance.numpy()])))
    for got, expected in zip(outputs, module(mean, variance)):
        assert torch.isfinite(torch.from_numpy(got)).all()
        torch.testing.assert_close(torch.from_numpy(got), expected.detach(), rtol=1e-3, atol=1e-6)


def test_deterministic() -> None:
    module = _PriorPath().double()
    mean, variance = _channel_moments()
    x = torch.zeros(1, 5, 11, 10)
    first, second = module(x, mean, variance), module(x, mean, variance)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --------------------------------------------------------------------------- the docs table


def accuracy_table() -> str:
    """The elementwise accuracy tables of docs/prior.md (full grid; minutes)."""
    rows = ["| kind | method | max rel. error, mean | max rel. error, variance |", "|---|---|---|---|"]
    sweep = ["| kind | " + " | ".join(f"{n} nodes" for n in NODE_SWEEP) + " |", "|---" * (len(NODE_SWEEP) + 1) + "|"]
    for case in ELEMENTWISE_CASES[1:]:
        mean_error, variance_error = _relative_errors(case, 33, 25)
        nodes = M.GAUSS_HERMITE_NODES.get(case[0])
        method = f"Gauss–Hermite, {nodes} nodes" if nodes else "closed form"
        rows.append(f"| {_case_id(case)} | {method} | {mean_error:.1e} | {variance_error:.1e} |")
        if nodes:
            cells = [" / ".join(f"{e:.1e}" for e in _relative_errors(case, 33, 25, count)) for count in NODE_SWEEP]
            sweep.append(f"| {_case_id(case)} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\nmean / variance error by node count:\n\n" + "\n".join(sweep)


NODE_SWEEP = (16, 32, 64, 128, 256)


def _errors(predicted: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]) -> str:
    scale = torch.maximum(reference[0].abs().max(), reference[1].sqrt().max())
    mean_error = ((predicted[0].detach() - reference[0]).abs() / scale).max().item()
    variance_error = ((predicted[1].detach() - reference[1]).abs() / reference[1]).max().item()
    return f"{100 * mean_error:.1f} % / {100 * variance_error:.1f} %"


def _step_by_step(
    modules: Sequence[nn.Module], mean: Tensor, variance: Tensor, spatial: Sequence[int]
) -> tuple[Tensor, Tensor]:
    for module in modules:
        if isinstance(module, nn.modules.conv._ConvNd):
            mean, variance, spatial = M.conv_moments(module, mean, variance, spatial)
        elif isinstance(module, nn.Upsample):
            mean, variance, spatial = M.resample_moments(M.ResampleSpec.from_module(module), mean, variance, spatial)
        else:
            mean, variance, spatial = M.pool_moments(M.PoolSpec.from_module(module), mean, variance, spatial)
    return mean, variance


def independence_table() -> str:
    """What treating intermediate positions as independent costs, and what one linear path recovers:
    a 3×3 conv (default init, or smoothing: all weights 1/9) with a pooling or resampling step
    before or after it, pushed step by step and (where linear) as one linear path, against a
    Monte Carlo of the real modules on 16×16 inputs, 4 000 samples (seconds)."""
    rows = [
        "| path | conv | step by step: mean / variance error | one linear path: mean / variance error |",
        "|---|---|---|---|",
    ]
    mean, variance = _channel_moments()
    spatial = (16, 16)
    for conv_name in ("default init", "smoothing (1/9)"):
        torch.manual_seed(0)
        conv = nn.Conv2d(5, 5, 3, padding=1).double()
        if conv_name.startswith("smoothing"):
            with torch.no_grad():
                conv.weight.zero_()
                for c in range(5):
                    conv.weight[c, c] = 1 / 9
        paths: list[list[nn.Module]] = [
            [conv, nn.MaxPool2d(2)],
            [conv, nn.MaxPool2d(3, 2, 1)],
            [conv, nn.AdaptiveMaxPool2d(1)],
            [conv, nn.AvgPool2d(2)],
            [nn.AvgPool2d(3, 2, 1), conv],
            [nn.AvgPool2d(2), conv],
            [nn.Upsample(scale_factor=2, mode="bilinear"), conv],
            [nn.Upsample(scale_factor=2), conv],
        ]
        for modules in paths:
            with torch.no_grad():
                reference = _monte_carlo(nn.Sequential(*modules), mean, variance, spatial, batch=4_000)
                stepwise = _errors(_step_by_step(modules, mean, variance, spatial), reference)
                linear = all(not isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) for m in modules)
                whole = (
                    _errors(
                        M.linear_path_moments([_linear_step(m) for m in modules], mean, variance, spatial)[:2],
                        reference,
                    )
                    if linear
                    else "not linear"
                )
            name = " → ".join("Conv3×3" if m is conv else str(m).replace(", padding=0", "") for m in modules)
            rows.append(f"| {name} | {conv_name} | {stepwise} | {whole} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--accuracy-table" in sys.argv:
        print(accuracy_table())
    if "--independence-table" in sys.argv:
        print(independence_table())
