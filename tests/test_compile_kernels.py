"""The reference moments under torch.compile: constant tables, eager's values, a bounded kernel count.

Dynamo calls :func:`bkn_export.moments._constant_values` at trace time when the sizes are static, so
a compiled graph holds a conv's coverage tables, pooling and resampling factors and linear-path tables as
constants instead of the ops that rebuild them every step (and piecewise coefficients too); with
symbolic sizes the tables are built in the graph as before. Both must give eager's values and
gradients (float64). The launches of a compiled wired layer (``benchmarks/bench_compile.py``) are
pinned as upper bounds (slow: each probe compiles its graphs twice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bkn_export import moments as M

F64 = torch.float64
#: Ops that build index tables; none of them belongs in a graph traced with static sizes.
TABLE_OPS = {torch.arange, torch.eye}


def _graph_targets(function: Callable[..., Any], *args: Any, dynamic: bool = False) -> tuple[Any, set[Any]]:
    """Run ``function`` compiled (dynamo + aot_eager, one graph); its result and the graph's call targets."""
    targets: set[Any] = set()

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        targets.update(node.target for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(function, backend=backend, fullgraph=True, dynamic=dynamic)
    return compiled(*args), targets


def _channel_moments(channels: int) -> tuple[Tensor, Tensor]:
    mean = torch.linspace(-1.0, 1.5, channels, dtype=F64).requires_grad_()
    variance = torch.linspace(0.2, 2.0, channels, dtype=F64).requires_grad_()
    return mean, variance


def _loss(outputs: tuple[Tensor, ...]) -> Tensor:
    return torch.stack([t.square().sum() for t in outputs]).sum()


def _assert_compiled_equals_eager(function: Callable[..., tuple[Tensor, Tensor]], *inputs: Tensor) -> None:
    """Values and gradients of ``function`` compiled equal eager's, and its graph builds no index table."""
    eager = function(*inputs)
    eager_grads = torch.autograd.grad(_loss(eager), inputs)
    compiled, targets = _graph_targets(function, *inputs)
    compiled_grads = torch.autograd.grad(_loss(compiled), inputs)
    for got, want in zip((*compiled, *compiled_grads), (*eager, *eager_grads), strict=True):
        torch.testing.assert_close(got, want)
    assert not TABLE_OPS & targets, "shape-only tables were rebuilt in the compiled graph"


def _layers() -> dict[str, tuple[nn.Module, tuple[int, ...], dict[str, Any]]]:
    """name -> (layer, input spatial size, conv_moments keywords): borders, strides, repeats, pads."""
    torch.manual_seed(0)
    layers: dict[str, tuple[nn.Module, tuple[int, ...], dict[str, Any]]] = {
        "3x3 pad 1": (nn.Conv2d(5, 4, 3, padding=1), (6, 5), {}),
        "3x3 stride 2 dilation 2, depthwise": (nn.Conv2d(5, 5, 3, 2, 2, 2, groups=5, bias=False), (9, 8), {}),
        "(3, 5) reflect": (nn.Conv2d(5, 4, (3, 5), padding=(1, 2), padding_mode="reflect"), (5, 7), {}),
        "transposed stride 2": (nn.ConvTranspose2d(5, 4, 3, 2, 1, output_padding=1), (4, 5), {}),
        "1d after a replicate pad": (
            nn.Conv1d(5, 4, 3),
            (7,),
            {"input_padding": [(2, 1)], "input_padding_mode": "replicate"},
        ),
        "3d pad 1": (nn.Conv3d(5, 4, 3, padding=1), (4, 3, 5), {}),
    }
    return {name: (layer.to(F64), spatial, keywords) for name, (layer, spatial, keywords) in layers.items()}


LAYERS = _layers()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_compiled_conv_moments_read_constant_tables_and_equal_eager(name: str) -> None:
    layer, spatial, keywords = LAYERS[name]
    mean, variance = _channel_moments(5)

    def moments(m: Tensor, v: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        return M.conv_moments(layer, m, v, spatial, **keywords)[:2]

    weight = layer.weight
    assert isinstance(weight, Tensor)
    _assert_compiled_equals_eager(moments, mean, variance, weight)


def test_compiled_conv_moments_with_symbolic_sizes_build_the_tables_and_equal_eager() -> None:
    layer, _, _ = LAYERS["3x3 stride 2 dilation 2, depthwise"]
    mean, variance = _channel_moments(5)

    def moments(x: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return M.conv_moments(layer, m, v, x.shape[2:])[:2]

    for size in ((9, 8), (11, 7)):
        x = torch.zeros(1, 1, *size)
        compiled, targets = _graph_targets(moments, x, mean, variance, dynamic=True)
        for got, want in zip(compiled, moments(x, mean, variance), strict=True):
            torch.testing.assert_close(got, want)
        assert torch.arange in targets  # symbolic sizes: the tables are ops of the graph


POOLS = {
    "max 3/2/1": nn.MaxPool2d(3, 2, 1),
    "avg 3/2/1 without pad": nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    "adaptive avg (3, 2)": nn.AdaptiveAvgPool2d((3, 2)),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_compiled_pool_moments_read_constant_factors_and_equal_eager(name: str) -> None:
    spec = M.PoolSpec.from_module(POOLS[name])

    def moments(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return M.pool_moments(spec, m, v, (9, 7))[:2]

    _assert_compiled_equals_eager(moments, *_channel_moments(4))


RESAMPLES = {
    "bilinear ×2": M.ResampleSpec("bilinear", scale_factor=2),
    "bicubic to (11, 4), align corners": M.ResampleSpec("bicubic", size=(11, 4), align_corners=True),
}


@pytest.mark.parametrize("name", sorted(RESAMPLES))
def test_compiled_resample_moments_read_a_constant_factor_and_equal_eager(name: str) -> None:
    spec = RESAMPLES[name]

    def moments(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return M.resample_moments(spec, m, v, (9, 7))[:2]

    _assert_compiled_equals_eager(moments, *_channel_moments(4))


PATHS: dict[str, list[Any]] = {
    "nearest → conv": [M.ResampleSpec("nearest", scale_factor=2), "conv"],
    "avg pool → conv → bilinear": [
        M.PoolSpec.from_module(nn.AvgPool2d(3, 2, 1)),
        "conv",
        M.ResampleSpec("bilinear", scale_factor=2),
    ],
    "reflect pad → conv → avg pool": [
        M.PadSpec(((1, 0), (0, 2)), "reflect"),
        "conv",
        M.PoolSpec.from_module(nn.AvgPool2d(2)),
    ],
    "bilinear → avg pool, no conv": [
        M.ResampleSpec("bilinear", scale_factor=2),
        M.PoolSpec.from_module(nn.AvgPool2d(3, 1, 1)),
    ],
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_compiled_linear_path_moments_read_constant_tables_and_equal_eager(name: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, padding=1).to(F64)
    steps = [conv if step == "conv" else step for step in PATHS[name]]

    def moments(m: Tensor, v: Tensor, *weight: Tensor) -> tuple[Tensor, Tensor]:
        return M.linear_path_moments(steps, m, v, (6, 5))[:2]

    weight = (conv.weight,) if conv in steps else ()
    _assert_compiled_equals_eager(moments, *_channel_moments(5), *weight)


@pytest.mark.parametrize("kind", ["hardswish", "relu6", "hardsigmoid"])
def test_compiled_piecewise_moments_read_constant_coefficients_and_equal_eager(kind: str) -> None:
    mean = torch.linspace(-4.0, 4.0, 9, dtype=F64).requires_grad_()
    variance = torch.linspace(0.05, 6.0, 9, dtype=F64).requires_grad_()

    def moments(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return M.elementwise_moments(kind, m, v)

    _assert_compiled_equals_eager(moments, mean, variance)
    _, targets = _graph_targets(moments, mean, variance)
    assert torch.stack not in targets, "the piece coefficients were stacked in the compiled graph"


#: (forward, backward) launches a compiled converted probe adds to the BatchNorm one, as upper
#: bounds: generated kernels in inductor's Triton schedule plus extern calls other than the convs
#: (the BKN op, mm/bmm), for both layers (the first in chain and the wired one), measured by
#: ``python benchmarks/bench_compile.py`` with torch 2.13. Before the shape-only tables became
#: graph constants: propagate 18/13, hardswish 27/19, max pool 21/13, upsampling 28/15.
KERNEL_BOUND = {
    ("relu_conv3x3", "identity"): (8, 7),
    ("relu_conv3x3", "learned"): (9, 9),
    ("relu_conv3x3", "propagate"): (11, 11),
    ("hardswish_dw", "propagate"): (13, 12),
    ("silu_conv1x1", "propagate"): (10, 8),
    ("relu_maxpool_conv3x3", "propagate"): (11, 10),
    ("relu_upsample_conv3x3", "propagate"): (14, 10),
}


@pytest.mark.slow
@pytest.mark.parametrize(("probe", "transition"), sorted(KERNEL_BOUND))
def test_a_compiled_wired_layer_launches_a_bounded_number_of_kernels(probe: str, transition: str) -> None:
    bench_compile = pytest.importorskip("benchmarks.bench_compile")
    base = bench_compile.count_probe(probe, "bn")
    converted = bench_compile.count_probe(probe, transition)
    added = [
        got.kernels + got.extern_no_conv - (want.kernels + want.extern_no_conv)
        for got, want in ((converted.forward, base.forward), (converted.backward, base.backward))
    ]
    assert converted.forward.extern.get("bkn.batch_kalman_norm") == 2
    assert 0 < added[0] <= KERNEL_BOUND[probe, transition][0]
    assert added[1] <= KERNEL_BOUND[probe, transition][1]


class _Residual(nn.Module):
    """conv → BN → hardswish → depthwise conv → BN, plus a shortcut BN and a ReLU → 3×3 conv → BN head:
    fused-kind activations, a residual sum and zero-padded convs on one chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.branch = nn.Sequential(
            nn.Hardswish(), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))

    def forward(self, x: Tensor) -> Tensor:
        stem = self.stem(x)
        return self.head(stem + self.branch(stem))


@pytest.mark.slow  # inductor's C++ compile: ~1 min on a fresh cache
def test_an_inductor_compiled_train_step_equals_eager() -> None:
    """The default inductor backend (what a GPU user would compile with; here its CPU code) computes eager's
    train step in float64: outputs, every parameter gradient and the running statistics."""
    import copy

    from bkn_export import convert_batchnorm
    from bkn_export.chain import fast

    torch.manual_seed(0)
    model = convert_batchnorm(_Residual(), torch.randn(2, 3, 8, 8)).double().train()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with fast.reference_only():
        expected = eager(x)
        expected.square().sum().backward()
    got = compiled(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        assert q.grad is not None and p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
