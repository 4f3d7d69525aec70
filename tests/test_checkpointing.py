"""Activation checkpointing (bkn_export.recompute): a checkpointed train step is the plain step, bit for bit.

Each case trains two copies of one converted model for a few SGD steps, one running some segments under
``bkn_export.checkpoint``, and compares outputs, every gradient, every parameter and every buffer exactly;
``torch.utils.checkpoint`` on a segment of a wired model (either form) must raise, not train on other gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import bkn_export
from bkn_export import BatchKalmanNorm2d, RecomputationError, convert_batchnorm
from bkn_export.errors import OptionError

Segment = Callable[[nn.Module, Tensor], Tensor]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _Blocks(nn.Module):
    """Blocks with a residual connection; ``run(block, x)`` runs each block (plainly or checkpointed)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 8)
        self.blocks = nn.ModuleList([_block(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 4)
        self.run: Segment = lambda block, x: block(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.run(self.stem, x)
        for block in self.blocks:
            x = x + self.run(block, x)
        return self.head(x.mean((2, 3)))


def _bkn_checkpoint(block: nn.Module, x: Tensor) -> Tensor:
    return bkn_export.checkpoint(block, x)  # type: ignore[no-any-return]


def _converted(model: nn.Module, example: Tensor) -> nn.Module:
    torch.manual_seed(0)
    return convert_batchnorm(model, example)


def _assert_same_state(plain: nn.Module, checkpointed: nn.Module) -> None:
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), f"gradient of {name}"
    for (name, b), (_, c) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        assert torch.equal(b, c), f"buffer {name}"


def _train_side_by_side(
    model: nn.Module, set_run: Callable[[nn.Module], None], inputs: list[Tensor], steps: int = 3
) -> None:
    plain, checkpointed = model, copy.deepcopy(model)
    set_run(checkpointed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, checkpointed)]
    for _ in range(steps):
        losses = []
        for m, optimizer in zip((plain, checkpointed), optimizers):
            optimizer.zero_grad(set_to_none=True)
            outputs = [m(x) for x in inputs]  # several forwards before one backward
            loss = sum(((out - 0.5) ** 2).mean() for out in outputs)
            assert isinstance(loss, Tensor)
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
        _assert_same_state(plain, checkpointed)
        for optimizer in optimizers:
            optimizer.step()
    _assert_same_state(plain, checkpointed)


def _blocks_model() -> nn.Module:
    torch.manual_seed(0)
    return _converted(_Blocks(), torch.randn(2, 3, 8, 8))


def test_checkpointed_segments_train_as_the_plain_model() -> None:
    model = _blocks_model()
    assert sum(isinstance(m, BatchKalmanNorm2d) for m in model.modules()) == 4

    def set_run(m: nn.Module) -> None:
        m.run = _bkn_checkpoint

    _train_side_by_side(model, set_run, [torch.randn(2, 3, 8, 8)])


def test_fullgraph_compile_says_why_the_checkpointed_segment_breaks_the_graph() -> None:
    """torch.compile(fullgraph=True) stops at bkn_export.checkpoint (it runs eagerly); its error said "reason: None"."""
    model = _blocks_model()
    model.run = _bkn_checkpoint
    compiled = torch.compile(model.train(), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"bkn_export.checkpoint runs its segment eagerly"):
        compiled(torch.randn(2, 3, 8, 8))


def test_two_forwards_before_one_backward() -> None:
    """Each forward's segments replay their own priors (a record per checkpoint call, not per layer)."""
    model = _blocks_model()

    def set_run(m: nn.Module) -> None:
        m.run = _bkn_checkpoint

    generator = torch.Generator().manual_seed(1)
    _train_side_by_side(model, set_run, [torch.randn(2, 3, 8, 8, generator=generator) for _ in range(2)])


def test_some_segments_checkpointed_and_no_early_stop() -> None:
    model = _blocks_model()

    def set_run(m: nn.Module) -> None:
        blocks = list(m.blocks)  # type: ignore[arg-type]

        def run(block: nn.Module, x: Tensor) -> Tensor:
            if block is blocks[1]:
                return bkn_export.checkpoint(block, x, early_stop=False)  # type: ignore[no-any-return]
            return block(x)  # type: ignore[no-any-return]

        m.run = run

    _train_side_by_side(model, set_run, [torch.randn(2, 3, 8, 8)])


def test_nested_checkpoints() -> None:
    model = _blocks_model()

    def set_run(m: nn.Module) -> None:
        def run(block: nn.Module, x: Tensor) -> Tensor:
            def inner(x: Tensor) -> Tensor:
                return block[2](bkn_export.checkpoint(lambda t: block[1](block[0](t)), x))  # type: ignore[no-any-return]

            return bkn_export.checkpoint(inner, x)  # type: ignore[no-any-return]

        m.run = run

    _train_side_by_side(model, set_run, [torch.randn(2, 3, 8, 8)])


def test_backward_twice_with_retained_graph() -> None:
    """A retained graph recomputes each segment once per backward, each time from the record's start."""
    plain = _blocks_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.run = _bkn_checkpoint
    x = torch.randn(2, 3, 8, 8)
    for m in (plain, checkpointed):
        loss = m(x).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()
    _assert_same_state(plain, checkpointed)


def test_unwired_layer_updates_its_running_statistics_once() -> None:
    """Not wired: ATen's train-mode BatchNorm, whose recomputation must not update the statistics twice."""
    torch.manual_seed(0)
    layer = BatchKalmanNorm2d(4)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    reference = copy.deepcopy(layer)
    layer(conv(x)).sum().backward()  # the plain step
    checkpointed_conv = copy.deepcopy(conv)
    bkn_export.checkpoint(lambda t: reference(checkpointed_conv(t)), x).sum().backward()
    _assert_same_state(layer, reference)
    assert torch.equal(conv.weight.grad, checkpointed_conv.weight.grad)
    assert int(reference.num_batches_tracked) == 1


def test_monai_densenet_blocks_checkpointed() -> None:
    """Dense blocks: every layer's prediction reuses paths others computed in the same call (the memo)."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    network = nets.DenseNet(spatial_dims=2, in_channels=3, out_channels=3, block_config=(2, 2), init_features=8,
                            growth_rate=4, bn_size=2)  # fmt: skip
    model = _converted(network, torch.randn(2, 3, 16, 16))
    blocks = [name for name, _ in model.features.named_children() if name.startswith("denseblock")]
    assert blocks

    def set_run(m: nn.Module) -> None:
        for name in blocks:
            block = getattr(m.features, name)
            block.forward = (lambda b, f: lambda x: bkn_export.checkpoint(f, x))(block, block.forward)

    _train_side_by_side(model, set_run, [torch.randn(2, 3, 16, 16)], steps=2)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_of_a_segment_raises(use_reentrant: bool) -> None:
    """Without the chain the recomputation would differ: the non-reentrant form failed with a count mismatch,
    the reentrant form trained on gradients of BatchNorm layers without a word."""
    model = _blocks_model()
    stem = model.stem
    model.run = lambda block, x: block(x) if block is stem else torch_checkpoint(block, x, use_reentrant=use_reentrant)
    loss = model(torch.randn(2, 3, 8, 8)).square().mean()
    with pytest.raises(RecomputationError, match=r"BKN layer 'blocks\.2\.1'.*bkn_export\.checkpoint"):
        loss.backward()


def test_torch_checkpoint_of_the_whole_wired_model_recomputes_its_chain() -> None:
    """The root's forward runs again, chain and all: the same gradients (running statistics updated twice,
    as nn.BatchNorm's under torch.utils.checkpoint)."""
    plain = _blocks_model()
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(2, 3, 8, 8)
    plain(x).square().mean().backward()
    torch_checkpoint(checkpointed, x, use_reentrant=False).square().mean().backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert all(int(m.num_batches_tracked) == 2 for m in checkpointed.modules() if isinstance(m, BatchKalmanNorm2d))


def test_reentrant_is_refused() -> None:
    with pytest.raises(OptionError, match="use_reentrant=True is not supported"):
        bkn_export.checkpoint(nn.Identity(), torch.randn(2), use_reentrant=True)


def test_a_segment_that_calls_other_layers_when_recomputed_raises() -> None:
    model = _blocks_model()
    state = {"recomputing": False}

    def run(block: nn.Module, x: Tensor) -> Tensor:
        if block is model.blocks[1]:

            def segment(t: Tensor) -> Tensor:  # another block (same shapes) on the second run
                return model.blocks[2](t) if state["recomputing"] else block(t)

            return bkn_export.checkpoint(segment, x)  # type: ignore[no-any-return]
        return block(x)  # type: ignore[no-any-return]

    model.run = run
    loss = model(torch.randn(2, 3, 8, 8)).square().mean()
    state["recomputing"] = True
    with pytest.raises(RecomputationError, match=r"BKN layer 'blocks\.2\.1' ran during the recomputation"):
        loss.backward()


def test_called_alone_outside_backward_it_is_first_in_chain() -> None:
    """A wired layer called on its own (not during a backward) stays BatchNorm, as documented."""
    model = _blocks_model()
    layer = model.blocks[1][1]
    x = torch.randn(2, 8, 4, 4)
    reference = nn.BatchNorm2d(8)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if k in reference.state_dict()})
    with pytest.warns(RuntimeWarning, match="ran in train mode outside a forward"):
        torch.testing.assert_close(layer(x), reference(x))


class _UnpackOnce(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that, like a checkpoint's, let each saved tensor be unpacked once."""

    def __init__(self) -> None:
        def pack(tensor: Tensor) -> list[object]:
            return [tensor, False]

        def unpack(holder: list[object]) -> Tensor:
            assert not holder[1], "a backward read ctx.saved_tensors twice"
            holder[1] = True
            return holder[0]  # type: ignore[return-value]

        super().__init__(pack, unpack)


def _geffnet_mobilenetv3() -> nn.Module:
    geffnet = pytest.importorskip("geffnet")
    return geffnet.mobilenetv3_small_100(pretrained=False, num_classes=4)  # type: ignore[no-any-return]


def _efficientnet_b0() -> nn.Module:
    efficientnet = pytest.importorskip("efficientnet_pytorch")
    return efficientnet.EfficientNet.from_name("efficientnet-b0", num_classes=4)  # type: ignore[no-any-return]


@pytest.mark.parametrize("network", [_geffnet_mobilenetv3, _efficientnet_b0])
def test_every_backward_unpacks_its_saved_tensors_once(network: Callable[[], nn.Module]) -> None:
    """What torch.utils.checkpoint requires of every autograd Function (hardswish / SE gate / swish paths,
    the conv moments, the Kalman op); then the whole wired model under torch's checkpoint trains as without."""
    torch.manual_seed(0)
    model = _converted(network(), torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)  # the same dropout / drop-connect masks in every run
    with _UnpackOnce():
        loss = model(x).square().mean()
    loss.backward()
    torch.manual_seed(1)
    reference(x).square().mean().backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    checkpointed = copy.deepcopy(reference)
    for m in (reference, checkpointed):
        m.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    reference(x).square().mean().backward()
    torch.manual_seed(1)  # torch's checkpoint restores the RNG state for the recomputation
    torch_checkpoint(checkpointed, x, use_reentrant=False).square().mean().backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), checkpointed.named_parameters(), strict=True):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("island", ["bkn_export.checkpoint", "torch.compiler.disable"])
def test_an_eager_island_in_a_compiled_forward_keeps_the_chain(island: str) -> None:
    """A compiled root whose forward runs one block eagerly (a graph break into code dynamo does not trace):
    that block's layers read the chain the compiled frames published (before, they ran as first in chain and
    the step had other gradients, without a word)."""
    torch.manual_seed(0)
    eager = _converted(_Blocks().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    compiled_model = copy.deepcopy(eager)
    middle = compiled_model.blocks[1]
    run_island: Segment = (
        _bkn_checkpoint if island == "bkn_export.checkpoint" else lambda block, x: torch.compiler.disable(block)(x)
    )
    compiled_model.run = lambda block, x: run_island(block, x) if block is middle else block(x)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eager(x).square().mean().backward()
    compiled(x).square().mean().backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters(), strict=True):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, b), (_, c) in zip(eager.named_buffers(), compiled_model.named_buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-12, msg=name)
    assert compiled_model.__dict__["_bkn_chain_root"].traced is None


class _Sequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(3, 8), *[_block(8, 8) for _ in range(4)])
        self.head = nn.Linear(8, 4)
        self.segments = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.segments:
            x = bkn_export.checkpoint_sequential(self.features, self.segments, x)
        else:
            x = self.features(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("segments", [1, 2, 3])
def test_checkpoint_sequential_trains_as_the_plain_model(segments: int) -> None:
    torch.manual_seed(0)
    model = _converted(_Sequence(), torch.randn(2, 3, 8, 8))

    def set_run(m: nn.Module) -> None:
        m.segments = segments

    _train_side_by_side(model, set_run, [torch.randn(2, 3, 8, 8)], steps=2)


def test_checkpoint_sequential_splits_as_torch_does() -> None:
    """The same chunks as torch.utils.checkpoint.checkpoint_sequential: each but the last checkpointed."""
    calls: list[str] = []
    modules = [nn.Identity() for _ in range(7)]
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda m, a, o, i=index: calls.append(str(i)))
    x = torch.randn(2, requires_grad=True)
    bkn_export.checkpoint_sequential(modules, 3, x).sum().backward()
    ours = list(calls)
    calls.clear()
    torch.utils.checkpoint.checkpoint_sequential(modules, 3, x, use_reentrant=False).sum().backward()
    assert ours == calls
    with pytest.raises(OptionError, match="segments must be at least 1"):
        bkn_export.checkpoint_sequential(modules, 0, x)


def test_torch_checkpoint_of_a_first_in_chain_layer_says_what_it_feeds() -> None:
    """QA of 2026-12-06: the refusal for a first-in-chain layer said "its prior comes from layers that ran
    earlier", which it has none of; it now says it feeds the priors of later layers."""
    model = _blocks_model()
    stem = model.stem
    model.run = lambda block, x: torch_checkpoint(block, x, use_reentrant=False) if block is stem else block(x)
    loss = model(torch.randn(2, 3, 8, 8)).square().mean()
    with pytest.raises(RecomputationError, match=r"it is first in its chain, and its statistics feed the priors"):
        loss.backward()


def test_checkpoint_sequential_of_the_wired_sequential_itself_trains_as_the_plain_model() -> None:
    """torch's documented use, ``checkpoint_sequential(model, n, x)`` on the converted ``nn.Sequential`` (not inside
    its forward), ran every layer as BatchNorm: the layers are called one by one, and the chain's scratch opens in
    ``model(x)``'s hooks. It opens around the call now: outputs, gradients and statistics are the plain step's."""
    torch.manual_seed(0)
    model = nn.Sequential(*_block(3, 8), *_block(8, 8), *_block(8, 8))
    plain = _converted(model, torch.randn(2, 3, 8, 8)).train()
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(2, 3, 8, 8)
    plain(x).square().sum().backward()
    bkn_export.checkpoint_sequential(checkpointed, 3, x).square().sum().backward()
    _assert_same_state(plain, checkpointed)
