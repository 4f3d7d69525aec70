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
