"""Property-based specification of one BKN training step (the op the modules call).

Over shapes (N, C) .. (N, C, D, H, W), batch sizes 1-8, dtypes float64/32/16/bfloat16,
with and without a prior:

* outputs are finite, keep the input's shape and dtype; the posterior has the statistics dtype;
* float32 agrees with float64, and half types with float32 on the same values (statistics
  accumulated in float32), to the tolerances stated at each check;
* a channels_last input gives the same values;
* the modules train under torch.autocast (CPU, bfloat16).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import bkn_export.ops  # noqa: F401  (registers torch.ops.bkn.*)
from bkn_export import BatchKalmanNorm2d, wire_chain
from bkn_export import functional as Fk

EPS = 1e-5
SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def steps(draw: st.DrawFn) -> dict[str, Tensor]:
    """One op call: x (float64 master copy) and float64 per-channel inputs."""
    rank = draw(st.integers(2, 5))
    batch = draw(st.integers(1, 8))
    channels = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=rank - 2, max_size=rank - 2))
    seed = draw(st.integers(0, 2**31 - 1))
    with_prior = draw(st.booleans())
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *spatial)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    offset = draw(st.sampled_from([0.0, 3.0]))
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
    per_channel = {
        "prior_mean": torch.randn(channels, generator=generator, dtype=torch.float64),
        "prior_variance": torch.rand(channels, generator=generator, dtype=torch.float64) + 0.1,
        "prior_weight": (torch.rand(channels, generator=generator, dtype=torch.float64) * 0.95)
        if with_prior
        else torch.zeros(channels, dtype=torch.float64),
        "weight": torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5,
        "bias": torch.randn(channels, generator=generator, dtype=torch.float64),
    }
    return {"x": x, **per_channel}


def _run(
    case: dict[str, Tensor], dtype: torch.dtype, memory_format: torch.memory_format | None = None
) -> tuple[Tensor, ...]:
    x = case["x"].to(dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    acc = Fk.statistics_dtype(dtype)
    per_channel = [case[k].to(acc) for k in ("prior_mean", "prior_variance", "prior_weight", "weight", "bias")]
    return tuple(torch.ops.bkn.batch_kalman_norm(x, *per_channel, EPS, 0.0))


def _scale_of_terms(case: dict[str, Tensor], variance: Tensor) -> float:
    """Largest |γ (x - μ) / sqrt(Σ + ε)| term bound: rounding in x - μ is amplified by it.

    At n = 1 without a prior Σ = 0 and the amplification is 1/sqrt(ε) ≈ 316."""
    x = case["x"]
    weight = case["weight"]
    bound = (x.abs().max() + 1.0) * weight.abs().max() * (variance.double() + EPS).rsqrt().max()
    return float(bound)


@SETTINGS
@given(steps(), st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_outputs_are_finite_and_keep_shape_and_dtype(case: dict[str, Tensor], dtype: torch.dtype) -> None:
    y, mean, variance = _run(case, dtype)
    x = case["x"]
    assert y.shape == x.shape and y.dtype == dtype
    assert mean.shape == variance.shape == (x.shape[1],)
    assert mean.dtype == variance.dtype == Fk.statistics_dtype(dtype)
    assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(variance).all()
    assert (variance >= 0).all()


@SETTINGS
@given(steps())
def test_float32_agrees_with_float64(case: dict[str, Tensor]) -> None:
    """Tolerance: 1e-5 relative on the statistics; on y, 1e-5 of the largest normalization term."""
    y64, mean64, variance64 = _run(case, torch.float64)
    y32, mean32, variance32 = _run(case, torch.float32)
    spread = float(case["x"].abs().max()) + 1.0
    torch.testing.assert_close(mean32.double(), mean64, rtol=1e-5, atol=1e-6 * spread)
    torch.testing.assert_close(variance32.double(), variance64, rtol=1e-4, atol=1e-6 * spread**2)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5 * _scale_of_terms(case, variance64))


@SETTINGS
@given(steps(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_types_accumulate_in_float32(case: dict[str, Tensor], dtype: torch.dtype) -> None:
    """On the same (half-representable) values, half and float32 share statistics; y differs by output rounding."""
    half_case = dict(case, x=case["x"].to(dtype).double())
    y_half, mean_half, variance_half = _run(half_case, dtype)
    y32, mean32, variance32 = _run(half_case, torch.float32)
    torch.testing.assert_close(mean_half, mean32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(variance_half, variance32, rtol=1e-5, atol=1e-6)
    unit = torch.finfo(dtype).eps  # y is float32 math rounded once to the half type
    torch.testing.assert_close(
        y_half.float(), y32, rtol=unit, atol=unit + 1e-5 * _scale_of_terms(half_case, variance32)
    )


@SETTINGS
@given(steps().filter(lambda c: c["x"].dim() in (4, 5)), st.sampled_from([torch.float64, torch.float32]))
def test_channels_last_gives_the_same_values(case: dict[str, Tensor], dtype: torch.dtype) -> None:
    memory_format = torch.channels_last if case["x"].dim() == 4 else torch.channels_last_3d
    contiguous = _run(case, dtype)
    channels_last = _run(case, dtype, memory_format)
    unit = torch.finfo(dtype).eps
    torch.testing.assert_close(channels_last[1], contiguous[1], rtol=64 * unit, atol=64 * unit)
    torch.testing.assert_close(channels_last[2], contiguous[2], rtol=1e3 * unit, atol=1e3 * unit)
    tolerance = 64 * unit * _scale_of_terms(case, contiguous[2])
    torch.testing.assert_close(channels_last[0], contiguous[0], rtol=64 * unit, atol=tolerance)


def _small_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchKalmanNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        BatchKalmanNorm2d(4),
    )
    return wire_chain(model, torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_trains_under_cpu_autocast_bfloat16(batch: int) -> None:
    """Convs run in bfloat16 under autocast; BKN takes the bfloat16 input and float32 parameters."""
    model = _small_model().train()
    reference = _small_model().train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(batch, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    expected = reference(x)
    # bfloat16 carries 8 bits: 2^-7 relative, on activations of order 1 after normalization
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05 * (1 + float(expected.detach().abs().max())))
    y.float().square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def _cached_tables() -> list[tuple[torch.dtype, Tensor]]:
    """(key dtype, table) of every constant table the moments cache (coverage and linear-path tables)."""
    from bkn_export import moments
    from bkn_export.chain import fast

    found = [(key[-2], t) for key, tables in moments._COVERAGE_TABLES.items() for t in tables if t is not None]
    found += [(key[-2], t) for key, tables in moments._PATH_TABLES.items() for t in tables]
    found += [(key[-1], t) for key, (coverage, _) in fast._COVERAGE.items() for t in coverage or ()]
    return found


def test_tables_built_under_autocast_keep_their_dtype() -> None:
    """The first step of a model under bfloat16 autocast builds the cached coverage tables: their matrix products
    must run in the tables' own dtype (autocast ran them in bfloat16, the cache kept a bfloat16 H under the float32
    key, and that step failed: "expected m1 and m2 to have the same dtype"), and float32 steps after it work."""
    from bkn_export import moments
    from bkn_export.chain import fast

    for cache in (moments._COVERAGE_TABLES, moments._PATH_TABLES, fast._COVERAGE):
        cache.clear()
    model = _small_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 5, 5)).float().sum().backward()
    tables = _cached_tables()
    assert tables, "the padded 3x3 conv's prior builds coverage tables"
    assert all(table.dtype == dtype for dtype, table in tables)
    model(torch.randn(2, 3, 5, 5)).sum().backward()  # float32, from the same cache
