"""The chain's per-call state under copying, pickling, ``torch.export`` and ``torch.compile``.

The scratch that carries posteriors exists only during a forward of the wired root: a
deep copy or a pickled-and-loaded model is a root of its own, a traced or compiled train
step keeps the chain as data flow (its outputs, gradients and running statistics are
eager's), and nothing is left open afterwards.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from bkn_export import (
    BatchKalmanNorm2d,
    ChainWiringError,
    LayerStatistics,
    chain_statistics,
    convert_batchnorm,
    describe_chain,
    wire_chain,
)
from bkn_export import nn as bkn_nn
from bkn_export.chain import fast
from bkn_export.chain.scope import ROOT_ATTRIBUTE, PathWatch, Published, forward_scope, scratch_for


class Branchy(nn.Module):
    """SiLU + average pooling into a conv, a concatenation, and a residual sum: every path kind."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv_a = nn.Conv2d(6, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(10, 6, 1)
        self.bn_b = nn.BatchNorm2d(6)
        self.bn_c = nn.BatchNorm2d(6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn0(self.stem(x))
        a = self.bn_a(self.conv_a(F.avg_pool2d(F.silu(h), 2)))
        b = self.bn_b(self.conv_b(torch.cat([F.avg_pool2d(h, 2), torch.relu(a)], dim=1)))
        return self.bn_c(torch.relu(b + F.avg_pool2d(h, 2)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return convert_batchnorm(Branchy(), torch.randn(2, 3, 8, 8)).train()


def _closed(model: nn.Module) -> bool:
    root = model.__dict__[ROOT_ATTRIBUTE]
    return scratch_for(root) is None and root.traced is None


def test_every_layer_after_the_first_has_a_prior() -> None:
    links = describe_chain(_model())
    assert [link.transition for link in links] == [None, "propagate", "propagate", "propagate"]


def test_export_train_mode_keeps_the_chain() -> None:
    model = _model()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    nodes = [n for n in program.graph.nodes if n.target is torch.ops.bkn.batch_kalman_norm.default]
    assert len(nodes) == 4
    # each wired layer's prior inputs depend on an earlier layer's posterior outputs
    posteriors = {a for n in nodes for a in n.users}
    fed = [n for n in nodes[1:] if any(_depends_on(n.args[1], p) for p in posteriors)]
    assert len(fed) == 3
    torch.testing.assert_close(program.module()(x), eager(x))
    assert _closed(model)


def _depends_on(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if current in seen:
            continue
        seen.add(current)
        stack.extend(a for a in current.all_input_nodes)
    return False


def test_compile_train_step_matches_eager() -> None:
    model = _model()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    # The compiled graph traces the reference moments; eager's fused forms (bkn_export.chain.fast) equal
    # them to rounding (tests/test_speed.py, float64), which float32 gradients here would exceed.
    with fast.reference_only():
        y_eager = eager(x_eager)
        y_eager.square().sum().backward()
    y = compiled(x)
    torch.testing.assert_close(y, y_eager)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad)
    for (name, p), (_, p_eager) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, p_eager.grad, msg=name)
    for (name, b), (_, b_eager) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, b_eager, msg=name)
    assert _closed(model)
    compiled(torch.randn(2, 3, 8, 8, requires_grad=True))
    assert counter.frame_count == 1  # one graph: the per-call scratch causes no recompilation


def test_a_deep_copy_is_a_chain_of_its_own() -> None:
    model = _model()
    clone = copy.deepcopy(model)
    assert clone.__dict__[ROOT_ATTRIBUTE] is not model.__dict__[ROOT_ATTRIBUTE]
    assert clone.get_submodule("bn_b").chain.root is clone.__dict__[ROOT_ATTRIBUTE]  # type: ignore[union-attr]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(clone(x), model(x))


def test_a_pickled_model_keeps_its_chain() -> None:
    model = _model()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert describe_chain(loaded) == describe_chain(model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_wired_model_inside_a_larger_one_keeps_its_chain() -> None:
    """The root is the model that was wired; calling it from an unwired parent opens its scratch as usual."""
    model = _model()
    parent = nn.Sequential(nn.Identity(), model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(parent(x), copy.deepcopy(model)(x))
    assert _closed(model)


# --------------------------------------------------------------------------- paths that did not run


class Switch(nn.Module):
    """bn1 → relu → c2 → bn2 on the recorded branch; ``branch = 3`` takes c3 (×10) instead."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.branch = 2

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.bn1(self.c1(x)))
        if self.branch == 2:
            return self.bn2(self.c2(a))
        return self.bn2(self.c3(a) * 10.0)


def _switch() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    return convert_batchnorm(Switch().eval(), x, prior_weight=0.9), x


def _statistics(model: nn.Module, x: Tensor, name: str) -> tuple[LayerStatistics, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = {s.name: s for s in chain_statistics(model, x)}
    return layers[name], [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _watches(module: nn.Module) -> int:
    return sum(isinstance(h, PathWatch) for h in module._forward_pre_hooks.values())


def test_the_recorded_branch_keeps_the_prior() -> None:
    model, x = _switch()
    bn2, warned = _statistics(model, x, "bn2")
    assert bn2.prior_mean is not None and bn2.unrun == () and warned == []
    torch.testing.assert_close(bn2.prior_weight, torch.full((8,), 0.9))


def test_a_branch_that_skips_a_module_of_the_path_drops_the_prior_and_warns_once() -> None:
    """QA repro: the prior pushed through c2 (mean −0.2, var 0.1) must not meet c3's batch (mean 3.7, var 9.6)."""
    model, x = _switch()
    model.branch = 3
    bn2, warned = _statistics(model, x, "bn2")
    assert bn2.prior_mean is None and bn2.sources == ()
    torch.testing.assert_close(bn2.prior_weight, torch.zeros(8))
    assert bn2.unrun == ("'bn1' → relu() → conv 'c2': 'c2' did not run after its source in this call",)
    assert len(warned) == 1 and "'bn2'" in warned[0] and "'c2' did not run" in warned[0]
    # once per layer; every call still falls back and reports it
    again, warned_again = _statistics(model, x, "bn2")
    assert warned_again == [] and again.prior_mean is None and again.unrun == bn2.unrun
    # the recorded branch again: the prior is back
    model.branch = 2
    back, _ = _statistics(model, x, "bn2")
    assert back.prior_mean is not None and back.unrun == ()


def test_a_source_skipped_in_this_call_drops_its_path_and_warns_once() -> None:
    """Stochastic depth that skips a block, or a source replaced by an unwired layer, publishes nothing: the layers it
    feeds lose its path's prior, which they used to do without a word (a skipped module on a path did warn)."""

    class Skippable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.bn0 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.skip = False

        def forward(self, x: Tensor) -> Tensor:
            a = torch.relu(self.bn0(self.c0(x)))
            if not self.skip:  # a drop-path block
                a = a + torch.relu(self.bn1(self.c1(a)))
            return self.bn2(self.c2(a))

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = convert_batchnorm(Skippable().eval(), x)
    bn2, warned = _statistics(model, x, "bn2")
    assert bn2.prior_mean is not None and warned == []
    model.skip = True
    bn2, warned = _statistics(model, x, "bn2")
    assert bn2.prior_mean is None
    assert len(warned) == 1 and "'bn2'" in warned[0] and "its source 'bn1' did not run in this call" in warned[0]
    _, warned_again = _statistics(model, x, "bn2")
    assert warned_again == []


def test_a_module_of_the_path_that_ran_before_the_source_does_not_count() -> None:
    """c2 runs in this forward, but before bn1 publishes: the path did not run as recorded."""

    class Early(Switch):
        def forward(self, x: Tensor) -> Tensor:
            self.c2(torch.zeros(1, 8, 4, 4))
            a = torch.relu(self.bn1(self.c1(x)))
            return self.bn2(self.c3(a) if self.branch == 3 else self.c2(a))

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = convert_batchnorm(Early().eval(), x)
    model.branch = 3
    bn2, warned = _statistics(model, x, "bn2")
    assert bn2.prior_mean is None and len(warned) == 1


class Shared(nn.Module):
    """One conv module on two paths: bn1 → c → bn2 and bn3 → c → bn4; ``late=False`` feeds bn4 from d."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.bn3, self.bn4 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 1)
        self.late = True

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.c(self.bn1(x)))
        z = self.bn3(y)
        return self.bn4(self.c(z) if self.late else self.d(z))


def test_a_module_on_two_paths_is_watched_once_and_checked_per_path() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    model = convert_batchnorm(Shared(), x)
    assert _watches(model.c) == 1
    layers = {s.name: s for s in chain_statistics(model, x)}
    assert layers["bn2"].prior_mean is not None and layers["bn4"].prior_mean is not None
    model.late = False  # c still runs (for bn2), but not after bn3 published
    bn4, warned = _statistics(model, x, "bn4")
    assert bn4.prior_mean is None and "'c' did not run" in bn4.unrun[0] and len(warned) == 1
    bn2, _ = _statistics(model, x, "bn2")
    assert bn2.prior_mean is not None and bn2.unrun == ()


class Twice(nn.Module):
    """The path bn1 → relu → c → bn2 runs twice per forward (a weight-shared block applied twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(2):
            x = self.bn2(self.c(torch.relu(self.bn1(x))))
        return x


def test_a_path_that_runs_twice_keeps_the_prior_on_both_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    model = convert_batchnorm(Twice(), x, prior_weight=0.7).train()
    weights: list[Tensor] = []
    step = bkn_nn.kalman_norm_step

    def spy(*args: Any) -> Any:
        weights.append(args[3].detach().clone())
        return step(*args)

    monkeypatch.setattr(bkn_nn, "kalman_norm_step", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model(x)
    # calls: bn1, bn2, bn1, bn2; bn1 is first in chain (p = 0), bn2 has its prior both times
    assert [float(w.max()) for w in weights] == pytest.approx([0.0, 0.7, 0.0, 0.7])


def test_watch_hooks_are_replaced_on_rewiring_and_not_saved() -> None:
    model, x = _switch()
    convert_batchnorm(model, x)  # re-converting re-wires
    wire_chain(model, x)
    assert _watches(model.c2) == 1 and _watches(model.c1) == 0 and _watches(model.c3) == 0
    assert all(not isinstance(v, PathWatch) for v in model.state_dict().values())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # the checkpoint holds tensors and plain data only
    clone = copy.deepcopy(model)
    hook = next(h for h in clone.c2._forward_pre_hooks.values() if isinstance(h, PathWatch))
    assert hook.root is clone.__dict__[ROOT_ATTRIBUTE]  # a copy watches its own forwards


def test_compiled_forward_drops_the_prior_of_a_branch_that_did_not_run() -> None:
    """Compiled or eager, bn2 falls back to BatchNorm on branch 3: the model computes what its original does."""
    torch.manual_seed(0)
    torch.randn(2, 1, 8, 8)  # as _switch draws x first
    original = Switch().train()
    original.branch = 3
    model, x = _switch()
    model.train()
    model.branch = 3
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with fast.reference_only(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = eager(x)
    torch.testing.assert_close(expected, original(x))
    torch.testing.assert_close(compiled(x), expected)


def test_a_posterior_published_by_hand_is_not_checked_against_module_calls() -> None:
    """forward_scope (benchmarks call one layer at a time): the conv on the path never runs, the prior is kept."""
    model = nn.Sequential(BatchKalmanNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), BatchKalmanNorm2d(4))
    wire_chain(model, torch.randn(2, 4, 5, 5))
    model.train()
    x = torch.randn(2, 4, 5, 5)
    source = Published(torch.zeros(4), torch.ones(4), 50, (2, 4, 5, 5), None, None, 1e-5)
    with forward_scope(model) as scratch, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        scratch.published["0"] = source
        prior = model[3].chain.prior(model[3], x)  # type: ignore[union-attr]
    assert prior is not None and prior.sources[0].name == "0"


class _DenseBlock(nn.Module):
    """A DenseNet-style block: each BatchNorm sees the concatenation of every earlier output, so one
    source feeds several later layers and a call reuses its Gaussian and its path predictions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(4 + 2 * i), nn.ReLU(), nn.Conv2d(4 + 2 * i, 2, 3, padding=1, bias=False))
            for i in range(3)
        )
        self.head = nn.BatchNorm2d(10)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.head(torch.cat(features, 1))


def test_a_compiled_dense_block_reuses_predictions_in_one_graph() -> None:
    """The per-call memo of shared predictions is plain data to dynamo: no graph break, no recompilation."""
    torch.manual_seed(0)
    model = convert_batchnorm(_DenseBlock(), torch.randn(2, 3, 8, 8)).train()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    with fast.reference_only():
        expected = eager(x)
    torch.testing.assert_close(compiled(x), expected)
    compiled(torch.randn(2, 3, 8, 8))
    assert counter.frame_count == 1


def test_a_model_edited_in_place_after_wiring_is_refused_not_predicted_through_other_modules() -> None:
    """Sequential.insert renames every module after the insertion: the recorded names then point at other modules
    (conv '3' is now at '6'), whose watches stamp their recorded names, so the path check passed and the prior was
    predicted through the wrong convs (train outputs 1.74 apart, no warning; a ReLU at a conv's name crashed with a
    MomentsError). The lookup now names the change and asks for wiring again, which works."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
    )  # fmt: skip
    x = torch.randn(2, 2, 6, 6)
    convert_batchnorm(model, x)
    shifted = copy.deepcopy(model)
    shifted.insert(0, nn.Identity())
    with pytest.raises(ChainWiringError, match=r"'4' is now the Conv2d the chain recorded as '3'"):
        shifted.train()(x)
    for _ in range(3):
        model.insert(0, nn.Identity())
    with pytest.raises(ChainWiringError, match=r"changed after its Kalman chain was wired: '2' is now a Identity"):
        model.train()(x)
    wire_chain(model, x)
    assert torch.isfinite(model.train()(x)).all()
    model[6] = nn.Sequential(model[6], nn.Dropout(0.0))  # wrapped: the recorded conv still runs, one level down
    with pytest.raises(ChainWiringError, match=r"'6' is now a Sequential, not the module the chain recorded there"):
        model.train()(x)
    copied = copy.deepcopy(model)  # the copy knows its watched names too
    with pytest.raises(ChainWiringError, match=r"'6' is now a Sequential"):
        copied.train()(x)


def test_shared_layers_run_on_interleaved_inputs_warn_that_a_posterior_was_replaced_unread() -> None:
    """a = blk1(a); b = blk1(b); a = blk2(a): blk2 reads blk1's latest posterior, b's, for a (train outputs 0.35
    from running a alone, prior_source "input"), with only the wiring note "runs 2 times per forward from the same
    sources". One input after the other through the same layers reads each posterior before the next: no warning."""

    class Streams(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk1 = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.blk2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.interleaved = False

        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            if self.interleaved:
                a, b = self.blk1(a), self.blk1(b)
                return self.blk2(a) + self.blk2(b)
            return self.blk2(self.blk1(a)) + self.blk2(self.blk1(b))

    torch.manual_seed(0)
    a, b = torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6) * 3
    model = convert_batchnorm(Streams(), (a, b)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(a, b)
    model.interleaved = True
    with pytest.warns(
        RuntimeWarning,
        match=r"'blk2.1': its source\(s\) published more than once in this forward before it read one "
        r"\('blk1.1' 2 times; in the example forward: 'blk1.1' 1\)",
    ):
        model(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        model(a, b)


class _RepeatedBlock(nn.Module):
    """A weight-tied block repeated ``x.shape[-1] // 4`` times: once on a width-4 example, three times at width 12."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        with torch.no_grad():
            self.block[2].weight.fill_(4.0)
            self.block[2].bias.fill_(3.0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for _ in range(x.shape[-1] // 4):
            x = self.block(x)
        return x


def test_calls_beyond_the_recorded_ones_take_no_prior_and_warn() -> None:
    """Third QA of 2026-12-06: wired on an example that runs the block once, trained on inputs that run it three
    times, calls 2 and 3 of 'block.2' took a prior from 'stem.1' (mean -0.26) while their input came from
    'block.2' itself (batch mean -2.65), with no warning. Calls beyond the recorded number now run without the
    prior (BatchNorm), with a warning naming the counts; the recorded calls keep theirs."""
    torch.manual_seed(0)
    model = convert_batchnorm(_RepeatedBlock(), torch.randn(8, 4, 4, 4)).train()
    layer = model.block[2]
    assert layer.chain.wiring.calls == 1
    priors: list[object] = []
    original = type(layer.chain).prior

    def spy(self: Any, module: Any, x: Tensor) -> Any:
        prior = original(self, module, x)
        if module is layer:
            priors.append(prior)
        return prior

    x = torch.randn(8, 4, 4, 12)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(layer.chain), "prior", spy)
        with pytest.warns(
            RuntimeWarning,
            match=r"'block.2' runs call 2 in this forward; the example forward .* ran it 1 time, and how a later "
            r"call is fed was not recorded",
        ):
            model(x)
    assert priors[0] is not None and priors[1:] == [None, None]
    wired_again = convert_batchnorm(_RepeatedBlock(), torch.randn(8, 4, 4, 12))
    assert wired_again.block[2].chain.wiring.calls == 3


class _ThreeCallsOfOneSource(nn.Module):
    """``src`` runs on three inputs, then ``cons`` reads its last call: the example shows the latest posterior is
    the one that feeds ``cons``."""

    def __init__(self) -> None:
        super().__init__()
        self.src = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.cons = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        ys = [self.src(a), self.src(b), self.src(c)]
        return self.cons(ys[-1])


def test_a_source_published_as_often_as_in_the_example_does_not_warn() -> None:
    """QA of 2026-12-06: the warning "published twice in this forward before it read one ... may belong to another
    input" fired where the recording proved the latest call is the layer's input. The wiring keeps how often each
    source published before each read in the example (``republished``); a forward that does the same is quiet."""
    torch.manual_seed(0)
    inputs = tuple(torch.randn(2, 2, 6, 6) for _ in range(3))
    model = convert_batchnorm(_ThreeCallsOfOneSource(), inputs).train()
    assert model.cons[1].chain.wiring.republished == (("src.1", 3),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(*inputs)


class _SameSourceRepeated(nn.Module):
    """``b1`` applied ``k`` times to the same ``b0`` output (test-time repeats of a head): every call's input comes
    from ``b0``'s one call."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.c0, self.b0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b0(self.c0(x)))
        return torch.stack([self.b1(self.c1(h)) for _ in range(self.k)])


def test_calls_beyond_the_recorded_ones_that_repeat_the_recorded_pattern_keep_the_prior() -> None:
    """QA of the extra-call rule: ``b1`` wired on two calls of the same source output, run five times, lost its
    prior on calls 3-5 (0.08 off calls 1-2 on identical inputs) with a warning whose reason was false. The wiring
    records how often each source published between two calls (``repeats``: 'b0' 0 times); an extra call whose
    sources did the same since the layer's last call keeps the prior, silently."""
    torch.manual_seed(0)
    model = convert_batchnorm(_SameSourceRepeated(2), torch.randn(4, 3, 6, 6)).train()
    assert model.b1.chain.wiring.repeats == (("b0", 0),)
    model.k = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs = model(torch.randn(4, 3, 6, 6))
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=0, atol=0)
