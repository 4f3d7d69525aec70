"""Specification of the modules BatchKalmanNorm1d/2d/3d.

* a layer with no predecessor (never wired, or first in its chain) is nn.BatchNorm*d:
  outputs, running statistics, num_batches_tracked and gradients, train and eval;
* an unwired layer's eager CPU route through ATen's BatchNorm equals the functional
  reference at p = 0 (float64, values, first and second derivatives, running statistics)
  and is taken only where that is exact;
* batch size 1 trains (where BatchNorm refuses);
* bad input and bad options raise errors that name the layer and the problem;
* no module attribute holds a posterior after a forward pass.
"""

from __future__ import annotations

import copy
import threading
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    KalmanOptions,
    convert_batchnorm,
    cpu_kernels,
    native,
    ops,
    wire_chain,
)
from bkn_export import functional as Fk
from bkn_export.chain.scope import ROOT_ATTRIBUTE, scratch_for
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
    assert not bkn.has_predecessor and follower.has_predecessor
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
    assert layer.chain is None and not layer.has_predecessor
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
    layer = _bkn(model[4])
    seen: list[tuple[Tensor, Tensor]] = []
    layer.register_forward_hook(lambda _m, inputs, out: seen.append((inputs[0].detach(), out.detach())))
    y = model(x)
    hidden, output = seen[0]  # what the second norm saw and gave, within the root's forward
    batchnorm = F.batch_norm(hidden, None, None, layer.weight, layer.bias, True)
    assert not torch.allclose(output, batchnorm, atol=1e-3)
    y.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def _stray_tensors(model: nn.Module) -> dict[str, list[str]]:
    """Module attributes (besides parameters and buffers) that hold tensors."""
    stray = {
        name: [k for k, v in vars(module).items() if isinstance(v, Tensor)] for name, module in model.named_modules()
    }
    return {name: keys for name, keys in stray.items() if keys}


def test_no_posterior_is_held_after_a_forward() -> None:
    """After a train step no module attribute holds a tensor besides its state, and no scratch is open."""
    model = _wired_chain()
    model.train()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert _stray_tensors(model) == {}
    root = model.__dict__[ROOT_ATTRIBUTE]
    assert scratch_for(root) is None and root.traced is None


def test_a_forward_that_raises_leaves_no_scratch_open() -> None:
    """The root's scratch is dropped even when the forward raises; the next call works as usual."""
    model = _wired_chain()
    model.train()
    root = model.__dict__[ROOT_ATTRIBUTE]
    failing = model[6]

    def fail(_module: nn.Module, _inputs: Any) -> None:
        assert scratch_for(root) is not None  # inside the forward, the scratch is open
        raise RuntimeError("planted")

    handle = failing.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="planted"):
        model(torch.randn(2, 3, 6, 6))
    assert scratch_for(root) is None
    handle.remove()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x), copy.deepcopy(model)(x))


def test_layer_called_outside_its_roots_forward_is_batchnorm() -> None:
    """A wired layer with a predecessor, called on its own, is nn.BatchNorm2d (p = 0): documented behaviour."""
    model = _wired_chain()
    model.train()
    layer = _bkn(model[4])
    assert layer.has_predecessor
    x = torch.randn(2, 5, 6, 6)
    expected = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    with pytest.warns(RuntimeWarning, match=r"BKN layer '4' ran in train mode outside a forward.*wire_chain"):
        torch.testing.assert_close(layer(x), expected, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per layer


def test_calling_forward_directly_names_the_call_that_carries_the_chain() -> None:
    """model.forward(x) skips the call hooks that open the chain: the layers run as BatchNorm, and the warning says
    to call model(x) (a tester read the outputs 0.78 apart from model(x) with no word about .forward)."""
    model = _wired_chain()
    model.train()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match=r"outside a forward.*Call the model, model\(x\), not model\.forward\(x\)"):
        model.forward(x)


def test_threads_never_see_each_others_posteriors() -> None:
    """Two threads in the middle of a forward of the same model at once get their own priors.

    A pre-hook on the conv between the chain's layers holds each thread there until the
    other arrives: both have published their first layer's posterior before either reads it.
    """
    model = _wired_chain()
    model.train()
    inputs = [torch.randn(2, 3, 6, 6), 3.0 * torch.randn(2, 3, 6, 6) + 1.0]
    expected = [model(x).detach() for x in inputs]  # outputs do not depend on the running statistics
    barrier = threading.Barrier(2, timeout=30)

    def meet(_module: nn.Module, _inputs: Any) -> None:
        barrier.wait()

    model[3].register_forward_pre_hook(meet)
    results: dict[int, Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, model(inputs[i]).detach())) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, y in enumerate(expected):
        torch.testing.assert_close(results[i], y, rtol=0, atol=0)


# --------------------------------------------------------------------------- batch size 1


def test_batch_of_one_is_refused_without_a_prior_as_batchnorm_refuses_it() -> None:
    """(1, C) in train mode: BatchNorm raises, and so does a BKN layer without a predecessor (unwired or first in its
    chain): its variance would be 0, its output β whatever the input, its running variance decaying toward 0. The
    same error class (ValueError) and message as BatchNorm's; nothing of the layer's state changes."""
    x = torch.randn(1, C)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(C).train()(x)
    unwired = BatchKalmanNorm1d(C).train()
    with pytest.raises(BKNInputError, match=r"Expected more than 1 value per channel when training.*no predecessor"):
        unwired(x)
    assert int(unwired.num_batches_tracked) == 0  # type: ignore[arg-type]
    model = nn.Sequential(nn.Linear(3, C), BatchKalmanNorm1d(C), nn.ReLU(), nn.Linear(C, C), BatchKalmanNorm1d(C))
    wire_chain(model, torch.randn(2, 3))
    with pytest.raises(BKNInputError, match=r"Expected more than 1 value per channel.*'1'"):
        model.train()(torch.randn(1, 3))
    BatchKalmanNorm2d(C).train()(torch.randn(1, C, 2, 1))  # two values per channel: accepted, as by BatchNorm
    BatchKalmanNorm1d(C).eval()(x)  # eval mode: running statistics


def test_batch_of_one_trains_a_layer_with_a_predecessor() -> None:
    """A layer that a wired predecessor feeds accepts (1, C): its variance p Σ_pred + p q d² > 0 comes from the prior
    (the head of a conv net at batch 1, behind global pooling, whose first layer sees H·W values per channel)."""
    torch.manual_seed(0)
    head = BatchKalmanNorm1d(C, prior_weight=0.5)
    model = nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1), BatchKalmanNorm2d(C), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(C, C), head,
    )  # fmt: skip
    wire_chain(model, torch.randn(2, 3, 4, 4))
    assert head.has_predecessor
    model.train()
    outputs = torch.cat([model(torch.randn(1, 3, 4, 4) * scale) for scale in (0.5, 1.0, 2.0)])
    assert torch.isfinite(outputs).all()
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # depends on the input: not collapsed onto β
    assert head.running_var is not None and bool((head.running_var > 0.05).all())
    outputs.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert _affine(head)[0].grad is not None and bool(_affine(head)[0].grad.abs().sum() > 0)


def test_batch_of_one_is_refused_where_the_fallback_rule_would_always_fire() -> None:
    """With fallback_ratio > 0, one value per channel gives S = 0, so mean(Σ_pred / S) ≥ ratio always: the layer
    would drop its prior and output β whatever the input, its running variance decaying; refused, state unchanged.
    The same model without the rule trains at batch 1."""
    torch.manual_seed(0)

    def head_model(**options: object) -> nn.Sequential:
        model = nn.Sequential(
            nn.Conv2d(3, C, 3, padding=1), BatchKalmanNorm2d(C), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(C, C), BatchKalmanNorm1d(C, **options),  # type: ignore[arg-type]
        )  # fmt: skip
        return wire_chain(model, torch.randn(2, 3, 4, 4)).train()  # type: ignore[return-value]

    guarded = head_model(fallback_ratio=100.0)
    guarded(torch.randn(2, 3, 4, 4))  # two values per channel: accepted
    before = _bkn(guarded[6]).running_var.clone()  # type: ignore[union-attr]
    with pytest.raises(BKNInputError, match=r"fallback rule.*\(1, 4\).*'6' has fallback_ratio=100.0"):
        guarded(torch.randn(1, 3, 4, 4))
    torch.testing.assert_close(_bkn(guarded[6]).running_var, before, rtol=0, atol=0)
    unguarded = head_model()
    outputs = torch.cat([unguarded(torch.randn(1, 3, 4, 4) * scale) for scale in (0.5, 2.0)])
    assert torch.isfinite(outputs).all() and not torch.allclose(outputs[0], outputs[1], atol=1e-3)


def test_batch_of_one_is_refused_under_torch_compile_too() -> None:
    """torch.compile used to skip the size check (it ran only where nothing traces) and train a first-in-chain layer
    on one value per channel: output β whatever the input, running variance decaying as 0.9ⁿ."""
    model = nn.Sequential(nn.Linear(3, C), BatchKalmanNorm1d(C), nn.ReLU(), nn.Linear(C, C), BatchKalmanNorm1d(C))
    wire_chain(model, torch.randn(2, 3))
    compiled = torch.compile(model.train(), backend="eager")
    compiled(torch.randn(2, 3))
    with pytest.raises(BKNInputError, match=r"Expected more than 1 value per channel.*'1'"):
        compiled(torch.randn(1, 3))
    assert int(_bkn(model[1]).num_batches_tracked) == 1  # type: ignore[arg-type]


def test_reset_parameters_restores_every_initial_value_as_batchnorms_does() -> None:
    """Re-initialisation loops and meta-device initialisation (to_empty, then reset_parameters) reach BKN layers: γ,
    β, running statistics and the BKN parameters (p, R, a learned transition matrix) as a freshly wired layer's."""
    fresh = _wired_chain("learned")
    trained = copy.deepcopy(fresh).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        trained(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
    emptied = copy.deepcopy(trained).to_empty(device="cpu")
    for model in (trained, emptied):
        assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        for layer in model.modules():
            if isinstance(layer, _BatchKalmanNorm):
                layer.reset_parameters()
        for (name, got), expected in zip(model.state_dict().items(), fresh.state_dict().values()):
            if not name.endswith(("_extra_state",)) and not name.startswith(("0.", "3.", "6.")):  # convs: not reset
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_freezing_before_conversion_keeps_the_new_bkn_parameters_frozen() -> None:
    """A backbone frozen with requires_grad_(False) before conversion stays frozen: the BKN parameters a frozen layer
    gains (p, R) do not require grad; the trainable head's do."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4),
    )  # fmt: skip
    model[:6].requires_grad_(False)
    convert_batchnorm(model, torch.randn(2, 3, 8, 8))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"8.weight", "8.bias", "9.weight", "9.bias", "9.prior_weight_logit", "9.process_noise_raw"}
    assert {name for name, _ in model.named_parameters()} >= {"4.prior_weight_logit", "4.process_noise_raw"}


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_a_batch_step_with_eps_not_positive_is_refused(eps: float) -> None:
    """ε ≤ 0 divides a channel of equal values by 0 (NaN in every gradient and in the next layers' running
    statistics); nn.BatchNorm refuses it in train mode, and so does every BKN batch step, wired or not."""
    model = nn.Sequential(nn.Conv2d(3, C, 3), BatchKalmanNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1), BatchKalmanNorm2d(C))
    wire_chain(model, torch.randn(2, 3, 5, 5))
    _bkn(model[4]).eps = eps
    with pytest.raises(BKNInputError, match="eps must be positive"):
        model.train()(torch.randn(2, 3, 5, 5))
    layer = BatchKalmanNorm2d(C, track_running_stats=False)
    layer.eps = eps
    with pytest.raises(BKNInputError, match="eps must be positive"):
        layer.eval()(torch.randn(2, C, 3, 3))


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
    ],
    ids=["channels", "rank"],
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


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)], ids=["batch-0", "spatial-0"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("position", ["first", "wired"])
def test_empty_input_is_accepted_as_batchnorm_accepts_it(shape: tuple[int, ...], training: bool, position: str) -> None:
    """Empty output of the input's shape, running statistics kept, num_batches_tracked counted, gradients flow."""
    bn = nn.BatchNorm2d(4).train(training)
    model = _wired_chain()
    layer = BatchKalmanNorm2d(4) if position == "first" else _bkn(model[4])
    model.train(training)
    layer.train(training)
    state = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, Tensor)}
    c = layer.num_features
    x = torch.randn(shape[0], c, *shape[2:], requires_grad=True)
    x_bn = torch.randn(shape[0], 4, *shape[2:], requires_grad=True)
    y, y_bn = layer(x), bn(x_bn)
    assert y.shape == x.shape and y_bn.shape == x_bn.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.running_mean is not None and layer.running_var is not None and layer.num_batches_tracked is not None
    torch.testing.assert_close(layer.running_mean, state["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(layer.running_var, state["running_var"], rtol=0, atol=0)
    counted = int(layer.num_batches_tracked) - int(state["num_batches_tracked"])
    assert counted == int(bn.get_buffer("num_batches_tracked")) == int(training)


def test_empty_batch_flows_through_a_wired_chain() -> None:
    model = _wired_chain()
    model.train()
    y = model(torch.randn(0, 3, 6, 6))
    assert y.shape == (0, 5, 6, 6)


def test_cumulative_momentum_reads_no_host_value() -> None:
    """momentum=None: α = 1/num_batches_tracked stays a tensor; the traced step has no .item() / host sync."""
    layer = BatchKalmanNorm2d(3, momentum=None).train()
    exported = torch.export.export(layer, (torch.randn(2, 3, 4, 4),))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert not any(t.startswith("aten.item") or "_local_scalar_dense" in t for t in targets), targets
    assert any("reciprocal" in t for t in targets), targets


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


# --------------------------------------------------------------------------- the unwired layer's BatchNorm route


def _kalman_step_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the BKN op's entry point from the modules."""
    import bkn_export.nn as bkn_nn

    calls: list[int] = []
    step = bkn_nn.kalman_norm_step

    def spy(*args: Any) -> Any:
        calls.append(1)
        return step(*args)

    monkeypatch.setattr(bkn_nn, "kalman_norm_step", spy)
    return calls


def _two_orders(output: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """First derivatives of sum(sin(output)) (create_graph) and those of their squared norm."""
    first = torch.autograd.grad(output.sin().sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), inputs)
    return [*first, *second]


@pytest.mark.parametrize(("bn_cls", "bkn_cls", "shape"), LAYER_CASES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_unwired_layer_equals_the_functional_reference(
    bn_cls: type[nn.Module], bkn_cls: type[_BatchKalmanNorm], shape: tuple[int, ...], affine: bool
) -> None:
    """float64, the ATen route of an unwired layer against the reference at p = 0: outputs, the
    gradients of x, γ, β (first and, with create_graph, second order) and the running statistics."""
    torch.manual_seed(5)
    layer = bkn_cls(C, affine=affine, momentum=0.3).double().train()
    _randomise_affine(layer)
    assert layer._is_plain_batchnorm(torch.randn(shape, dtype=torch.float64))
    running_mean, running_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    zeros, ones = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(2):
        x = (torch.randn(shape, dtype=torch.float64) * (step + 2) + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        params_ref = [p.detach().clone().requires_grad_() for p in params]
        weight_ref, bias_ref = params_ref if affine else (None, None)
        y = layer(x)
        reference = Fk.batch_kalman_norm(x_ref, zeros, ones, zeros, weight_ref, bias_ref, layer.eps)
        torch.testing.assert_close(y, reference.output, rtol=1e-10, atol=1e-10)
        Fk.update_running_statistics_(
            running_mean, running_var, reference.posterior_mean, reference.posterior_variance, 0.3, x.numel() // C
        )
        assert layer.running_mean is not None and layer.running_var is not None
        torch.testing.assert_close(layer.running_mean, running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, running_var, rtol=1e-12, atol=1e-12)
        assert int(layer.num_batches_tracked) == step + 1  # type: ignore[arg-type]
        got, want = _two_orders(y, [x, *params]), _two_orders(reference.output, [x_ref, *params_ref])
        for mine, theirs in zip(got, want):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)


def test_unwired_layer_takes_the_batchnorm_route_only_where_it_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route is taken by an unwired float32/float64 layer with a float momentum and n > 1; a
    first-in-chain layer (its posterior is published), momentum=None and other dtypes keep the op."""
    calls = _kalman_step_calls(monkeypatch)

    def op_calls(layer: nn.Module, x: Tensor) -> int:
        before = len(calls)
        layer(x)
        return len(calls) - before

    x = torch.randn(3, C, 2, 2)
    assert op_calls(BatchKalmanNorm2d(C).train(), x) == 0
    assert op_calls(BatchKalmanNorm2d(C, track_running_stats=False).eval(), x) == 0
    assert op_calls(BatchKalmanNorm2d(C).double().train(), x.double()) == 0
    assert op_calls(BatchKalmanNorm2d(C, momentum=None).train(), x) == 1
    assert op_calls(BatchKalmanNorm2d(C).train(), x.double()) == 1  # float32 layer, float64 input
    assert op_calls(BatchKalmanNorm2d(C).train(), x.bfloat16()) == 1
    first = BatchKalmanNorm2d(C)
    model = _first_in_chain(first, (3, C, 2, 2))
    assert op_calls(model.train(), x.double()) == 2  # first in chain and its follower


def test_a_large_input_takes_the_op_where_it_outruns_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one torch thread and the C kernels, an unwired layer steps inputs above
    cpu_kernels._OP_OUTRUNS_BATCHNORM elements through the op (its one-pass statistics and ∂L/∂x are then
    the faster): outputs, gradients and running statistics still BatchNorm's, to float32 rounding."""
    if native.library() is None:
        pytest.skip(f"bkn_export.native: {native.status()}")
    calls = _kalman_step_calls(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.manual_seed(2)
    x = torch.randn(2, 8, 96, 96) * 2.0 + 1.0  # 147456 elements
    assert x.numel() > cpu_kernels._OP_OUTRUNS_BATCHNORM
    layer, reference = BatchKalmanNorm2d(8).train(), nn.BatchNorm2d(8).train()
    for module in (layer, reference):
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, 8))
            module.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    outputs = [module(t) for module, t in zip((layer, reference), inputs)]
    assert len(calls) == 1
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(x)
    for output in outputs:
        output.backward(grad)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
    small = torch.randn(2, 8, 8, 8)
    layer(small)
    assert len(calls) == 1  # below the size: ATen's BatchNorm


def test_a_patched_kalman_step_turns_the_route_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A subclass or a patch that replaces _kalman_step (SyncBatchKalmanNorm, the ONNX parity
    recorder) gets every call: its statistics may span more than x."""
    seen: list[int] = []
    original = _BatchKalmanNorm._kalman_step

    def recording(self: _BatchKalmanNorm, *args: Any) -> Any:
        seen.append(1)
        return original(self, *args)

    monkeypatch.setattr(_BatchKalmanNorm, "_kalman_step", recording)
    BatchKalmanNorm2d(C).train()(torch.randn(3, C, 2, 2))
    assert seen == [1]


def test_a_subclass_prior_is_the_prior_the_op_receives(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_prior`` is an extension point (SyncBatchKalmanNorm replaces it for an empty rank of the ``sampled``
    transition): a subclass that replaces it, together with ``_kalman_step``, gets every train step's prior
    from it, and the op receives exactly what it returned."""
    received: list[tuple[Tensor, ...]] = []
    prior = (torch.full((C,), 0.5), torch.full((C,), 2.0), torch.full((C,), 0.25))

    class _OwnPrior(BatchKalmanNorm2d):
        def _prior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return prior

        def _kalman_step(self, x: Tensor, *op_prior: Tensor) -> Any:
            received.append(op_prior)
            return super()._kalman_step(x, *op_prior)

    layer = _OwnPrior(C).train()
    x = torch.randn(3, C, 2, 2)
    y = layer(x)
    assert len(received) == 1 and all(a is b for a, b in zip(received[0], prior, strict=True))
    expected = Fk.batch_kalman_norm(x, *prior, layer.weight, layer.bias, layer.eps).output
    torch.testing.assert_close(y, expected)


def test_a_first_in_chain_layer_reads_cached_constant_priors_that_stay_constant() -> None:
    """In eager training a layer without a prior passes the op cached (C,) zeros and ones
    (:func:`bkn_export.ops.channel_constant`); steps leave them as they were."""
    torch.manual_seed(0)
    model = convert_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        torch.randn(2, 3, 6, 6),
    ).train()
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        model(x).square().sum().backward()
    zeros, ones = ops.channel_constant(torch.empty(2, 4, 1, 1), 0.0), ops.channel_constant(torch.empty(2, 4, 1, 1), 1.0)
    assert not zeros.any() and bool((ones == 1.0).all())
    first = model[1]
    assert first.chain is not None and not first.has_predecessor
    prior = first._prior(torch.randn(2, 4, 4, 4))
    assert prior[0] is zeros and prior[1] is ones and prior[2] is zeros


def test_a_torch_fx_graph_module_around_the_layers_warns_that_they_lost_their_prior() -> None:
    """torch.fx with BKN layers as leaves builds a new root whose forward never opens the chain: every layer ran as
    BatchNorm without a word (found by a tester); now each such layer warns once, naming wire_chain."""
    model = _wired_chain()

    class _LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module: torch.nn.Module, name: str) -> bool:
            return isinstance(module, _BatchKalmanNorm) or super().is_leaf_module(module, name)

    graph_module = torch.fx.GraphModule(model, _LeafTracer().trace(model)).train()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match=r"BKN layer '4' ran in train mode outside a forward"):
        graph_module(x)
    state = copy.deepcopy(model.state_dict())
    expected = model.train()(x)  # train-mode outputs do not depend on the running statistics
    wire_chain(graph_module, x)  # as the warning says: the GraphModule is now the root
    graph_module.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(graph_module(x), expected, rtol=0, atol=0)


def test_wiring_a_wired_model_again_warns_that_its_bkn_parameters_restart() -> None:
    """wire_chain (and convert_batchnorm) on a wired model give its layers new BKN parameters at their initial values:
    convert_batchnorm warned, wire_chain replaced what was learned without a word."""
    model = _wired_chain()
    with torch.no_grad():
        model[4].process_noise_raw.fill_(3.0)
    with pytest.warns(UserWarning, match=r"2 BKN layer\(s\) hold BKN parameters already: '4' \(prior_weight_logit"):
        wire_chain(model, torch.randn(2, 3, 6, 6))
    assert float(model[4].process_noise_raw[0]) != 3.0
    with pytest.warns(UserWarning, match="hold BKN parameters already"):
        convert_batchnorm(model, torch.randn(2, 3, 6, 6))
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), BatchKalmanNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), BatchKalmanNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wire_chain(fresh, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_strided_gamma_gets_the_gradients_a_contiguous_one_gets(training: bool) -> None:
    """γ a strided view made a Parameter (``Parameter(big[::2])``) over (N, C) inputs: the C kernels read it by
    position and ATen's CPU BatchNorm backward ignores its strides (nn.BatchNorm1d's input gradient is wrong there
    too); the layer's input gradient was off by 9.35 (|g| 5.78)."""

    def gradients(strided: bool) -> tuple[Tensor, Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, C), nn.BatchNorm1d(C), nn.ReLU(), nn.Linear(C, C), nn.BatchNorm1d(C))
        model = model.double()
        for index in (1, 4):
            gamma = model[index].weight.detach() + torch.arange(float(C), dtype=torch.float64)
            if strided:
                big = torch.zeros(2 * C, dtype=torch.float64)
                big[::2] = gamma
                gamma = big[::2]
            model[index].weight = nn.Parameter(gamma)
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        convert_batchnorm(model, x.detach())
        model.train(training)
        y = model(x)
        (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        assert x.grad is not None and model[0].weight.grad is not None
        return x.grad, model[0].weight.grad

    for got, expected in zip(gradients(strided=True), gradients(strided=False)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_batchnorm_state_dict_loads_strictly_into_a_layer_without_a_predecessor() -> None:
    """The drop-in: ``BatchKalmanNorm2d(C).load_state_dict(nn.BatchNorm2d(C).state_dict())`` used to miss the wiring
    entry; a layer that a predecessor feeds still needs its own (and its BKN parameters)."""
    batchnorm = nn.BatchNorm2d(C)
    batchnorm.train()(torch.randn(3, C, 4, 4) * 2 + 1)
    layer = BatchKalmanNorm2d(C)
    layer.load_state_dict(batchnorm.state_dict())
    assert layer.running_var is not None and torch.equal(layer.running_var, batchnorm.running_var)
    wired = _wired_chain()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"prior_weight_logit\".*\"_extra_state\""):
        wired[4].load_state_dict(nn.BatchNorm2d(5).state_dict(), strict=True)
