"""torch.jit: tracing a converted model works in train and eval mode (before: train mode crashed in the running
statistics' n/(n-1), which tracing sees as a tensor); scripting is refused by name (before: "Unknown type
annotation: 'Tensor | None'")."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bkn_export import convert_batchnorm
from bkn_export.errors import UnsupportedTransformError


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    return convert_batchnorm(net, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("train", [True, False])
def test_a_traced_step_is_the_eager_step(train: bool) -> None:
    model = _model().train(train)
    eager, traced_copy = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(traced_copy, torch.randn(2, 3, 8, 8), check_trace=False)
    if not train:  # nothing of ours is specialised by the trace in eval mode
        assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    traced_copy.load_state_dict(eager.state_dict())  # undo the trace's own step
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced(x), eager(x), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(eager.named_buffers(), traced_copy.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_scripting_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedTransformError, match=r"BatchKalmanNorm2d '1'.*torch\.jit\.script"):
        torch.jit.script(_model())


def test_fx_symbolic_trace_is_refused_by_name_with_the_leaf_module_route() -> None:
    """torch.fx.symbolic_trace failed inside the layer with fx's opaque "symbolically traced variables cannot be used
    as inputs to control flow"; it now names the layer and the ways that work, one of which is checked here: the BKN
    layers as leaf modules, the GraphModule wired again and given the state back, computes the model's outputs."""
    model = _model()
    with pytest.raises(UnsupportedTransformError, match=r"BatchKalmanNorm2d '1'.*symbolic_trace.*leaf modules"):
        torch.fx.symbolic_trace(model)

    from bkn_export import wire_chain
    from bkn_export.nn import _BatchKalmanNorm

    class _LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, _BatchKalmanNorm) or super().is_leaf_module(module, name)

    graph_module = torch.fx.GraphModule(model, _LeafTracer().trace(model))
    example = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="hold BKN parameters already"):  # the documented re-initialisation
        wire_chain(graph_module, example)
    graph_module.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(graph_module.eval()(x), model.eval()(x), rtol=0, atol=0)
