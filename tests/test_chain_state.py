"""The chain's per-call state under copying, pickling, ``torch.export`` and ``torch.compile``.

The scratch that carries posteriors exists only during a forward of the wired root: a
deep copy or a pickled-and-loaded model is a root of its own, a traced or compiled train
step keeps the chain as data flow (its outputs, gradients and running statistics are
eager's), and nothing is left open afterwards.
"""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from bkn_export import convert_batchnorm, describe_chain
from bkn_export.chain import fast
from bkn_export.chain.scope import ROOT_ATTRIBUTE, scratch_for


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
