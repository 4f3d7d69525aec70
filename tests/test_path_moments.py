"""A prediction path's head as one autograd node (:mod:`bkn_export.chain.path_moments`).

:class:`~bkn_export.chain.path_moments._PathMoments` runs the bodies of the separate fused Functions (the
source's output variance, the activation's moments, the conv's / Linear's moments) as stages of one node, so a
converted network's train step must give the same loss, gradients and running statistics *bit for bit* with
the node as with the separate Functions (:func:`~bkn_export.chain.path_moments.separate`), on the C kernels and
on the PyTorch forms, in float32 and float64. Also: the node is in the graph and the separate ones are not;
second derivatives; an in-place change of W between forward and backward is caught; ``chain_statistics``
reports the same source Gaussians.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.autograd_graph import graph_nodes
from torch import Tensor, nn

from bkn_export import chain_statistics, convert_batchnorm, fast_prior, native
from bkn_export.chain import path_moments


class _Dense(nn.Module):
    """Two dense-block layers (DenseNet): each BN → ReLU → conv's output concatenated to the input, so a
    source's path feeds every later layer (the call's memo shares it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.one = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.two = nn.Sequential(nn.ReLU(), nn.Conv2d(10, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(14, 5, 3, padding=1), nn.BatchNorm2d(5))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.one(x)], 1)
        x = torch.cat([x, self.two(x)], 1)
        return self.head(x)


class _Residual(nn.Module):
    """A source that feeds two layers: the next conv's BN, and (through the sum) the one after."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardswish())
        self.out = nn.Sequential(nn.Conv2d(6, 4, 1, bias=True), nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.out(x + self.body(x))


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "relu 3x3": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    ),
    "hardswish depthwise": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 6, 1, bias=True),
        nn.BatchNorm2d(6),
    ),
    "silu 1x1": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
    ),
    "linear": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 8), nn.BatchNorm1d(8)
    ),
    "conv straight after BN": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    ),
    "dense block": _Dense,
    "residual": _Residual,
}


def _step(
    network: str, dtype: torch.dtype, prior_source: str, fused: bool, kernels: bool
) -> tuple[Tensor, list[Tensor | None], list[Tensor]]:
    torch.manual_seed(0)
    model = NETWORKS[network]().to(dtype)
    x = torch.randn(3, 3, 4, 4, dtype=dtype)
    model = convert_batchnorm(model, x, prior_source=prior_source).train()
    with contextlib.ExitStack() as stack:
        if not fused:
            stack.enter_context(path_moments.separate())
        if not kernels:
            stack.enter_context(native.disabled())
        loss = model(x).sin().sum()
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("prior_source", ["output", "input"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pytorch-forms"])
def test_a_train_step_is_bit_for_bit_the_separate_functions(
    network: str, dtype: torch.dtype, prior_source: str, kernels: bool
) -> None:
    loss, grads, buffers = _step(network, dtype, prior_source, True, kernels)
    loss_ref, grads_ref, buffers_ref = _step(network, dtype, prior_source, False, kernels)
    assert torch.equal(loss, loss_ref)
    assert len(grads) == len(grads_ref)
    for index, (got, want) in enumerate(zip(grads, grads_ref)):
        assert (got is None) == (want is None), f"parameter {index}"
        assert got is None or torch.equal(got, want), f"parameter {index}"
    assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_ref))


def _node_names(loss: Tensor) -> set[str]:
    return {type(node).__name__ for node in graph_nodes(loss)}


def test_the_graph_holds_one_node_per_path_head() -> None:
    """ReLU → 3×3 conv from a source with γ, β: one _PathMoments node instead of three."""
    torch.manual_seed(0)
    model = convert_batchnorm(NETWORKS["relu 3x3"](), torch.randn(2, 3, 8, 8)).train()
    names = _node_names(model(torch.randn(2, 3, 8, 8)).sum())
    assert "_PathMomentsBackward" in names
    assert not names & {"_OutputVarianceBackward", "_ReluMomentsBackward", "_AffineMomentsBackward"}
    with path_moments.separate():
        names = _node_names(model(torch.randn(2, 3, 8, 8)).sum())
    assert {"_OutputVarianceBackward", "_ReluMomentsBackward", "_AffineMomentsBackward"} <= names
    assert "_PathMomentsBackward" not in names


@pytest.mark.parametrize("network", ["relu 3x3", "hardswish depthwise", "silu 1x1"])
def test_second_derivatives_are_the_separate_functions(network: str) -> None:
    """create_graph=True: the node's backward differentiates the separate Functions again."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = convert_batchnorm(NETWORKS[network]().double(), torch.randn(3, 3, 4, 4, dtype=torch.float64)).train()
        x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
        with contextlib.nullcontext() if fused else path_moments.separate():
            loss = model(x).sin().sum()
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True, allow_unused=True)
            penalty = sum(g.square().sum() for g in grads if g is not None)
            second = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)
        results.append(second)
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_changing_the_weight_before_backward_is_caught() -> None:
    """The node saves its inputs with save_for_backward: an in-place change of W after the forward raises."""
    torch.manual_seed(0)
    model = convert_batchnorm(NETWORKS["relu 3x3"](), torch.randn(2, 3, 8, 8)).train()
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    with torch.no_grad():
        model[3].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_chain_statistics_reports_the_same_source_gaussians() -> None:
    torch.manual_seed(0)
    model = convert_batchnorm(_Dense(), torch.randn(2, 3, 4, 4))
    x = torch.randn(2, 3, 4, 4)
    fused = chain_statistics(model, x)
    with path_moments.separate():
        separate = chain_statistics(model, x)
    assert [s.name for s in fused] == [s.name for s in separate]
    for a, b in zip(fused, separate):
        assert [g.name for g in a.sources] == [g.name for g in b.sources]
        for g, h in zip(a.sources, b.sources):
            assert torch.equal(g.mean, h.mean) and torch.equal(g.variance, h.variance) and g.shape == h.shape
        assert (a.prior_mean is None) == (b.prior_mean is None)
        if a.prior_mean is not None:
            assert torch.equal(a.prior_mean, b.prior_mean) and torch.equal(a.prior_variance, b.prior_variance)


def test_each_source_gaussian_is_computed_once_per_forward_on_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernels a source's output variance is often the first stage of a path's head: still computed once
    per source and forward (the others start from it), as ``tests/test_speed.py`` checks on the PyTorch forms."""
    torch.manual_seed(0)
    model = convert_batchnorm(_Dense().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64)).train()
    sources: list[Tensor] = []
    original = fast_prior._OutputVariance.forward

    def counting(ctx: Any, variance: Tensor, *args: Any) -> Any:
        sources.append(variance)
        return original(ctx, variance, *args)

    monkeypatch.setattr(fast_prior._OutputVariance, "forward", staticmethod(counting))
    model(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert len(sources) == len({id(t) for t in sources}) == 3  # stem, one, two (head: no consumer)


def test_the_node_leaves_no_reference_cycle() -> None:
    """The node's third output (the source's output variance) is a view of what its stage keeps, not that tensor:
    the graph and its tensors are freed by reference counting alone (a cycle through the node would hold them
    until a garbage collection)."""
    torch.manual_seed(0)
    model = convert_batchnorm(NETWORKS["relu 3x3"](), torch.randn(2, 3, 8, 8)).train()
    gc.collect()
    gc.disable()
    try:
        loss = model(torch.randn(2, 3, 8, 8)).sum()
        heads = [node for node in graph_nodes(loss) if type(node).__name__ == "_PathMomentsBackward"]
        assert len(heads) == 1
        kept = weakref.ref(heads[0].stages[1].saved_tensors[1])  # the ReLU stage's input: the output variance
        del heads
        loss.backward()
        del loss
        assert kept() is None
    finally:
        gc.enable()
