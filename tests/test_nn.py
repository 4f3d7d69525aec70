"""Specification of the modules BatchKalmanNorm1d/2d/3d.

* a layer with no predecessor (never wired, or first in its chain) is nn.BatchNorm*d:
  outputs, running statistics, num_batches_tracked and gradients, train and eval;
* batch size 1 trains (where BatchNorm refuses);
* bad input and bad options raise errors that name the layer and the problem;
* no module attribute holds a posterior after a forward pass.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, KalmanOptions, wire_chain
from bkn_export.errors import BKNInputError, ChainWiringError, KalmanOptionsError
from bkn_export.nn import _BatchKalmanNorm

TOL: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
C = 4

# (BatchNorm class, BKN class, input shape)
LAYER_CASES = [
    pytest.param(nn.BatchNorm1d, BatchKalmanNorm1d, (6, C), id="1d-(N,C)"),
    pytest.param(nn.BatchNorm1d, BatchKalmanNorm1d, (5, C, 7), id="1d-(N,C,L)"),
    pytest.param(nn.BatchNorm2d, BatchKalmanNorm2d, (3, C, 5, 6), id="2d"),
    pytest.param(nn.BatchNorm3d, BatchKalmanNorm3d, (2, C, 3, 4, 5), id="3d"),
]


def _first_in_chain(bkn: _BatchKalmanNorm, shape: tuple[int, ...]) -> nn.Module:
    """A model whose chain starts at ``bkn`` (a second, wired layer follows through a 1x1 map)."""
    rank = len(shape)
    follower: nn.Module
    if rank == 2:
        mapping: nn.Module = nn.Linear(C, C)
        follower = BatchKalmanNorm1d(C)
    else:
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[rank]
        mapping = conv(C, C, 1)
        follower = type(bkn)(C)
    model = nn.Sequential(bkn, nn.ReLU(), mapping, follower).double()
    wire_chain(model, torch.randn(shape, dtype=torch.float64))
    assert bkn.link.predecessor is None and follower.has_predecessor
    return model


def _bkn(module: nn.Module) -> _BatchKalmanNorm:
    assert isinstance(module, _BatchKalmanNorm)
    return module


def _affine(layer: nn.Module) -> tuple[Tensor, Tensor]:
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    assert isinstance(weight, Tensor) and isinstance(bias, Tensor)
    return weight, bias


def _randomise_affine(*layers: nn.Module) -> None:
    torch.manual_seed(3)
    weight, bias = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    with torch.no_grad():
        for layer in layers:
            if getattr(layer, "weight", None) is not None:
                for target, value in zip(_affine(layer), (weight, bias)):
                    target.copy_(value)


@pytest.mark.parametrize(("bn_cls", "bkn_cls", "shape"), LAYER_CASES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize(
    ("affine", "track_running_stats"),
    [(True, True), (False, True), (True, False)],
    ids=["affine", "no-affine", "no-tracking"],
)
@pytest.mark.parametrize("wiring", ["unwired", "first-in-chain"])
def test_layer_without_predecessor_is_batchnorm(
    bn_cls: type[nn.Module],
    bkn_cls: type[_BatchKalmanNorm],
    shape: tuple[int, ...],
    momentum: float | None,
    affine: bool,
    track_running_stats: bool,
    wiring: str,
) -> None:
    """Three train steps then eval: outputs, running stats, num_batches_tracked, gradients equal BatchNorm's."""
    options: dict[str, Any] = {"momentum": momentum, "affine": affine, "track_running_stats": track_running_stats}
    bn = bn_cls(C, **options).double()
    bkn = bkn_cls(C, **options).double()
    _randomise_affine(bn, bkn)
    run: nn.Module = bkn
    outputs: list[Tensor] = []
    if wiring == "first-in-chain":
        run = _first_in_chain(bkn, shape)
        bkn.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    expected_params = {"weight", "bias"} if affine else set()
    assert {name for name, _ in bkn.named_parameters()} == expected_params  # owns no BKN parameters

    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * (step + 1) + step).requires_grad_()
        x_bkn = x.detach().clone().requires_grad_()
        grad_y = torch.randn(shape, dtype=torch.float64)
        y_bn = bn(x)
        y_run = run(x_bkn)
        y_bkn = outputs.pop() if wiring == "first-in-chain" else y_run
        torch.testing.assert_close(y_bkn, y_bn, **TOL)
        y_bn.backward(grad_y)
        y_bkn.backward(grad_y)
        torch.testing.assert_close(x_bkn.grad, x.grad, **TOL)
        if affine:
            for mine, theirs in zip(_affine(bkn), _affine(bn)):
                torch.testing.assert_close(mine.grad, theirs.grad, **TOL)
            bn.zero_grad()
            bkn.zero_grad()
        if track_running_stats:
            torch.testing.assert_close(bkn.running_mean, bn.running_mean, **TOL)
            torch.testing.assert_close(bkn.running_var, bn.running_var, **TOL)
            assert bkn.num_batches_tracked is not None
            assert int(bkn.num_batches_tracked) == int(bn.get_buffer("num_batches_tracked")) == step + 1
        else:
            assert bkn.running_mean is None and bkn.running_var is None and bkn.num_batches_tracked is None

    bn.eval()
    run.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(bkn(x), bn(x), **TOL)


def test_unwired_layer_runs_twice_per_forward_as_batchnorm() -> None:
    """A layer built directly is not part of any chain and keeps no state between calls."""
    layer = BatchKalmanNorm2d(3)
    assert layer.link.predecessor is None and not layer.has_predecessor
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, layer.weight, layer.bias, True), **TOL)


# --------------------------------------------------------------------------- eval and wiring


def _wired_chain(transition: str = "propagate", **options: object) -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchKalmanNorm2d(4, transition=transition, **options),  # type: ignore[arg-type]
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        BatchKalmanNorm2d(5, transition=transition, **options),  # type: ignore[arg-type]
        nn.ReLU(),
        nn.Conv2d(5, 5, 1),
        BatchKalmanNorm2d(5, transition=transition, **options),  # type: ignore[arg-type]
    )
    return wire_chain(model, torch.randn(2, 3, 6, 6))  # type: ignore[return-value]


def test_eval_mode_uses_running_statistics_only() -> None:
    """Eval output is F.batch_norm with the running statistics, per sample, whatever the batch."""
    model = _wired_chain()
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6))
    model.eval()
    layer = _bkn(model[4])
    x = torch.randn(3, 5, 6, 6)
    expected = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    batch = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(model(batch)[:1], model(batch[:1]), **TOL)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {"prior_weight_logit", "process_noise_raw"}),
        ({"prior_weight": 0.9, "process_noise": False}, set()),
        ({"transition": "learned"}, {"prior_weight_logit", "process_noise_raw", "transition_matrix"}),
    ],
    ids=["learned-gain", "authors-fixed-gain", "learned-transition"],
)
def test_wired_layers_own_the_parameters_their_options_need(options: dict[str, object], expected: set[str]) -> None:
    model = _wired_chain(**options)  # type: ignore[arg-type]
    first, second = model[1], model[4]
    assert {n for n, _ in first.named_parameters()} == {"weight", "bias"}
    assert {n for n, _ in second.named_parameters()} == {"weight", "bias"} | expected
    if "transition_matrix" in expected:
        assert second.transition_matrix.shape == (5, 4)


@pytest.mark.parametrize("transition", ["propagate", "sampled", "learned"])
def test_wired_layer_blends_prior_and_gradients_reach_the_chain(transition: str) -> None:
    """With a predecessor, the output is not BatchNorm's, and every BKN parameter gets a gradient."""
    model = _wired_chain(transition)
    model.train()
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    layer = _bkn(model[4])
    hidden = model[:4](x)  # what the second norm saw
    batchnorm = F.batch_norm(hidden, None, None, layer.weight, layer.bias, True)
    assert not torch.allclose(model[:5](x), batchnorm, atol=1e-3)
    y.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_no_posterior_is_held_after_a_forward() -> None:
    """The chain's scratch is empty after the pass; no module attribute holds a tensor besides state."""
    model = _wired_chain()
    model.train()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    chain = _bkn(model[1])._chain
    assert chain is not None and chain.posteriors == {}
    for name, module in model.named_modules():
        stray = [k for k, v in vars(module).items() if isinstance(v, Tensor)]
        assert not stray, f"{name} holds tensors {stray}"


def test_sampled_prior_draws_fresh_noise_each_step() -> None:
    model = _wired_chain("sampled", prior_weight=0.9)
    model.train()
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    second = model(x)
    torch.manual_seed(1)
    again = model(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(first, again)


def test_sampled_prior_does_not_fire_the_feeding_layers_hooks() -> None:
    """The Monte Carlo sample goes through the conv's forward, not its __call__: hooks see activations only."""
    model = _wired_chain("sampled", prior_weight=0.9)
    calls: list[int] = []
    model[3].register_forward_hook(lambda _m, _i, _o: calls.append(1))
    model.train()
    model(torch.randn(2, 3, 6, 6))
    assert len(calls) == 1


# --------------------------------------------------------------------------- batch size 1


def test_batch_of_one_trains_where_batchnorm_refuses() -> None:
    """(1, C): BatchNorm raises; a first-in-chain BKN returns β (variance 0) and a wired one blends in the prior."""
    x = torch.randn(1, C)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(C).train()(x)
    model = nn.Sequential(
        nn.Linear(3, C), BatchKalmanNorm1d(C), nn.ReLU(), nn.Linear(C, C), BatchKalmanNorm1d(C, prior_weight=0.5)
    )
    wire_chain(model, torch.randn(2, 3))
    first, second = _bkn(model[1]), _bkn(model[4])
    with torch.no_grad():
        _affine(first)[1].copy_(torch.arange(C, dtype=torch.float32))
    model.train()
    outputs: dict[str, Tensor] = {}
    first.register_forward_hook(lambda _m, _i, out: outputs.__setitem__("first", out))
    y = model(torch.randn(1, 3))
    # first layer: n = 1, S = 0, so y = γ (x - x̄)/sqrt(ε) + β = β exactly up to rounding
    torch.testing.assert_close(outputs["first"], _affine(first)[1].detach().unsqueeze(0), atol=1e-4, rtol=0)
    # running variance takes the posterior variance unscaled at n = 1 (it is 0 here)
    torch.testing.assert_close(first.running_var, torch.full((C,), 0.9))
    assert torch.isfinite(y).all()
    # the wired layer's posterior variance is the prior's p·Σ_pred + p q d² > 0: not collapsed onto β
    assert second.running_var is not None and bool((second.running_var > 0.9).all())
    assert not torch.allclose(y, _affine(second)[1].detach().unsqueeze(0), atol=1e-3)
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- errors


def _named_model() -> nn.Module:
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 1), BatchKalmanNorm2d(4)))
    return wire_chain(model, torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize(
    ("x", "problem"),
    [
        (torch.randn(2, 5, 4, 4), "expected 4 channels"),
        (torch.randn(2, 4, 4), "expected a 4D input"),
        (torch.randn(0, 4, 4, 4), "empty batch"),
        (torch.randn(2, 4, 0, 4), "empty batch"),
    ],
    ids=["channels", "rank", "empty-batch", "empty-spatial"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_input_names_the_layer_and_the_problem(x: Tensor, problem: str, training: bool) -> None:
    model = _named_model()
    layer = _bkn(model.get_submodule("features.1"))
    layer.train(training)
    with pytest.raises(BKNInputError, match=problem) as info:
        layer(x)
    assert "BatchKalmanNorm2d 'features.1'" in str(info.value)
    assert str(tuple(x.shape)) in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transition": "kalman"}, "transition must be one of"),
        ({"prior_weight": 1.0}, r"prior_weight must be in \[0, 1\)"),
        ({"prior_weight": -0.1}, r"prior_weight must be in \[0, 1\)"),
        ({"initial_prior_weight": 1.5}, r"initial_prior_weight must be in \[0, 1\)"),
        ({"fallback_ratio": -1.0}, "fallback_ratio must be >= 0"),
    ],
    ids=["unknown-transition", "prior-weight-1", "prior-weight-negative", "initial-gain", "fallback"],
)
def test_bad_options_are_rejected(options: dict[str, object], message: str) -> None:
    with pytest.raises(KalmanOptionsError, match=message):
        BatchKalmanNorm2d(4, **options)  # type: ignore[arg-type]
    with pytest.raises(KalmanOptionsError, match=message):
        KalmanOptions(**options)  # type: ignore[arg-type]


def test_identity_transition_needs_equal_channel_counts() -> None:
    model = _wired_chain()
    with pytest.raises(ChainWiringError, match=r"needs equal channel counts.*'1'.*4.*'4'.*5"):
        wire_chain(copy.deepcopy(model), torch.randn(2, 3, 6, 6), KalmanOptions(transition="identity"))


def test_eager_cpu_step_matches_the_custom_op_in_values_and_gradients() -> None:
    """kalman_norm_step skips torch.library dispatch in eager CPU mode; results must be the op's, bit for bit."""
    from bkn_export.ops import kalman_norm_step

    torch.manual_seed(3)
    c = 5
    leaves = [
        torch.randn(3, c, 4, 4, dtype=torch.float64),
        torch.randn(c, dtype=torch.float64),
        torch.rand(c, dtype=torch.float64) + 0.5,
        torch.rand(c, dtype=torch.float64) * 0.9,
        torch.randn(c, dtype=torch.float64),
        torch.randn(c, dtype=torch.float64),
    ]
    results = []
    for step in (kalman_norm_step, torch.ops.bkn.batch_kalman_norm):
        inputs = [t.clone().requires_grad_() for t in leaves]
        y, mean, variance = step(*inputs, 1e-5, 0.0)
        (y.square().sum() + mean.sum() + variance.sum()).backward()
        results.append([y, mean, variance, *[t.grad for t in inputs]])
    for eager, op in zip(*results):
        torch.testing.assert_close(eager, op, rtol=0, atol=0)


def test_traced_step_keeps_the_custom_op_node() -> None:
    """Under torch.export the modules still emit bkn::batch_kalman_norm (what the ONNX exporter maps)."""
    model = BatchKalmanNorm2d(3).train()
    exported = torch.export.export(model, (torch.randn(2, 3, 4, 4),))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any("bkn.batch_kalman_norm" in target for target in targets)
