"""torch.export.export and torch.compile of a wired BKN model, in train and eval mode.

Train mode keeps one ``bkn.batch_kalman_norm`` node per layer (what the training-mode ONNX
export maps to ``ai.bkn::BatchKalmanNorm``); eval mode lowers to ``batch_norm`` with the
running statistics (what the inference export folds). Compile tests use the
``aot_eager`` backend (traces forward and backward through the fake implementations);
the inductor run is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from bkn_export import BatchKalmanNorm2d, wire_chain
from bkn_export.chain import fast
from bkn_export.chain.scope import ROOT_ATTRIBUTE, scratch_for


def _model(transition: str = "propagate") -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BatchKalmanNorm2d(4, transition=transition),  # type: ignore[arg-type]
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        BatchKalmanNorm2d(6, transition=transition),  # type: ignore[arg-type]
    )
    return wire_chain(model, torch.randn(2, 3, 5, 5))


def _no_scratch_left(model: nn.Module) -> bool:
    """Neither the eager nor the traced slot of the root holds a scratch after the call."""
    root = model.__dict__[ROOT_ATTRIBUTE]
    return scratch_for(root) is None and root.traced is None


def _bkn_nodes(program: torch.export.ExportedProgram) -> int:
    return sum(1 for node in program.graph.nodes if node.target is torch.ops.bkn.batch_kalman_norm.default)


@pytest.mark.parametrize("transition", ["propagate", "learned"])
def test_export_train_mode(transition: str) -> None:
    model = _model(transition).train()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5)
    program = torch.export.export(model, (x,))
    assert _bkn_nodes(program) == 2
    exported = program.module()
    torch.testing.assert_close(exported(x), eager(x))
    for name, buffer in eager.named_buffers():  # running statistics updated alike
        torch.testing.assert_close(exported.get_buffer(name), buffer, msg=name)
    assert _no_scratch_left(model)


def test_export_eval_mode_lowers_to_batch_norm() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 5, 5)
    program = torch.export.export(model, (x,))
    assert _bkn_nodes(program) == 0
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_matches_eager(training: bool) -> None:
    model = _model().train(training)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 5, 5, requires_grad=training)
    x_eager = x.detach().clone().requires_grad_(training)
    # The compiled graph traces the reference moments; eager's fused forms (bkn_export.chain.fast) equal
    # them to rounding (tests/test_speed.py, float64), which float32 gradients here would exceed.
    with fast.reference_only():
        y_eager = eager(x_eager)
        if training:
            y_eager.square().sum().backward()
    y = compiled(x)
    torch.testing.assert_close(y, y_eager)
    if training:
        y.square().sum().backward()
        torch.testing.assert_close(x.grad, x_eager.grad)
        for (name, p), (_, p_eager) in zip(model.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(p.grad, p_eager.grad, msg=name)
    assert _no_scratch_left(model)


@pytest.mark.slow
def test_compile_inductor_train_step() -> None:
    model = _model().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 5, 5)
    y: Tensor = compiled(x)
    torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()


class _TransposedNorm(nn.Module):
    """A conformer's convolution module: BatchNorm1d on a transposed ``(N, L, C)`` tensor, then a ``view`` that
    needs the contiguous layout BatchNorm gives its output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.linear(x).transpose(1, 2))
        return y.view(y.shape[0], -1)


@pytest.mark.parametrize("layout", ["transposed-1d", "channels-last-2d", "channels-last-3d", "sliced-2d"])
def test_the_op_returns_batchnorms_output_layout_traced_and_eager(layout: str) -> None:
    """Found 2026-12-06: the op's fake gave ``empty_like(x)`` (a transposed input's strides) while every backend
    returned BatchNorm's layout (contiguous there), so ``y.view(...)`` after a BKN layer on a transposed input worked
    in eager and failed under torch.compile ("Cannot view a tensor"). Eager, fake and traced outputs now all take
    ``suggest_memory_format(x)``, as ATen's BatchNorm does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bkn_export import convert_batchnorm

    torch.manual_seed(0)
    x = {
        "transposed-1d": torch.randn(2, 5, 8).transpose(1, 2),
        "channels-last-2d": torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last),
        "channels-last-3d": torch.randn(2, 8, 3, 4, 5).to(memory_format=torch.channels_last_3d),
        "sliced-2d": torch.randn(2, 16, 5, 6)[:, ::2],
    }[layout]
    norm = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()](8).train()
    model = convert_batchnorm(nn.Sequential(norm), x.detach().clone()).train()
    x.requires_grad_(True)
    expected = nn.Sequential(copy.deepcopy(norm)).train()(x)  # BatchNorm's own layout
    y = model(x)
    assert y.stride() == expected.stride()
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        fake = model(fake_mode.from_tensor(x.detach()))
    assert fake.stride() == y.stride()
    with torch.no_grad(), fast.reference_only():
        reference = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert reference.stride() == y.stride()
    torch.testing.assert_close(reference, y)
    assert grad.shape == x.shape


def test_a_view_after_a_layer_on_a_transposed_input_compiles() -> None:
    from bkn_export import convert_batchnorm

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    model = convert_batchnorm(_TransposedNorm(), x).train()
    eager = model(x)
    torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), eager)
