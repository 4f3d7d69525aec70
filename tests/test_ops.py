"""Specification of the custom ops ``bkn::batch_kalman_norm`` / ``..._backward`` (bkn_export.ops).

* the op's contract: the flat schema the ONNX op and the TensorRT plugin mirror, spelled
  on the Python side once, as ``KalmanNormInputs``;
* dispatch: one static backend table in ``ops`` (CPU fast path, CUDA Triton launchers,
  the functional reference elsewhere), the same whatever the import order and whether
  CUDA is visible; ``bkn_export.kernels`` registers nothing and imports nothing from the
  package beyond its layout and the errors;
* first and second derivatives (gradcheck and gradgradcheck in float64, as for
  ``nn.BatchNorm2d``) through the op, the backward op, the eager CPU path
  (``kalman_norm_step``) and the modules, 1-d/2-d/3-d, with and without affine
  parameters, with the fallback rule off, firing and holding;
* the fallback rule is a device-side select: the op's implementations trace into one
  graph without a host synchronisation or a data-dependent Python branch;
* the eager CPU backward starts from its forward's saved state (not recomputed), skips the
  gradients of inputs that need none, and equals the reference (float64) either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import bkn_export
from bkn_export import cpu_kernels, native, ops
from bkn_export import functional as Fk
from bkn_export.functional import KalmanNormInputs, KalmanStep

EPS = 1e-5
PACKAGE = Path(bkn_export.__file__).parent

# Prior variance ≈ 1.5, batch variance ≈ 4 (x = 3 + 2 N(0, 1)): mean(Σ_pred / S) ≈ 0.4.
FALLBACK = {"off": 0.0, "fires": 0.2, "holds": 5.0}


def make_inputs(
    shape: tuple[int, ...], affine: bool = True, fallback: str = "off", dtype: torch.dtype = torch.float64
) -> KalmanNormInputs:
    """x ~ 3 + 2 N(0, 1) of ``shape``; a prior near the batch statistics; p in [0, 0.9)."""
    generator = torch.Generator().manual_seed(0)
    channels = shape[1]

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator, dtype=dtype)

    def rand(*size: int) -> Tensor:
        return torch.rand(*size, generator=generator, dtype=dtype)

    return KalmanNormInputs(
        x=3.0 + 2.0 * randn(*shape),
        prior_mean=3.0 + randn(channels),
        prior_variance=1.0 + rand(channels),
        prior_weight=0.9 * rand(channels),
        weight=randn(channels) if affine else None,
        bias=randn(channels) if affine else None,
        eps=EPS,
        fallback_ratio=FALLBACK[fallback],
    )


def fallback_fires(inputs: KalmanNormInputs) -> bool:
    batch_variance = Fk.batch_statistics(inputs.x).variance
    ratio = float((inputs.prior_variance / batch_variance).mean())
    return inputs.fallback_ratio > 0 and ratio >= inputs.fallback_ratio


def as_function_of_tensors(
    step: Callable[..., tuple[Tensor, ...]], inputs: KalmanNormInputs
) -> tuple[Callable[..., tuple[Tensor, ...]], tuple[Tensor, ...]]:
    """``step`` as a function of the inputs' tensors (gradcheck's inputs, requiring grad) and those tensors."""
    tensors = tuple(t.detach().requires_grad_() for t in inputs[:6] if t is not None)
    present = [t is not None for t in inputs[:6]]

    def function(*given: Tensor) -> tuple[Tensor, ...]:
        values = iter(given)
        args = [next(values) if here else None for here in present]
        return tuple(step(*args, inputs.eps, inputs.fallback_ratio))

    return function, tensors


# --------------------------------------------------------------------------- the contract


def test_schema_is_flat_and_named_as_the_inputs() -> None:
    """The registered schema is the pinned flat one, and its arguments are KalmanNormInputs' fields in order."""
    schema = torch.ops.bkn.batch_kalman_norm.default._schema
    assert str(schema) == "bkn::batch_kalman_norm" + ops.FORWARD_SCHEMA
    assert tuple(argument.name for argument in schema.arguments) == KalmanNormInputs._fields
    backward = torch.ops.bkn.batch_kalman_norm_backward.default._schema
    assert str(backward) == "bkn::batch_kalman_norm_backward" + ops.BACKWARD_SCHEMA


def test_schema_is_the_one_the_onnx_op_and_plugin_mirror() -> None:
    """Unchanged from the schema the ONNX translation and the TensorRT plugin were written against."""
    assert ops.FORWARD_SCHEMA == (
        "(Tensor x, Tensor prior_mean, Tensor prior_variance, Tensor prior_weight, Tensor? weight, Tensor? bias, "
        "float eps, float fallback_ratio) -> (Tensor, Tensor, Tensor)"
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_both_ops_including_autograd_registration(dtype: torch.dtype) -> None:
    """torch.library.opcheck: schema, fake implementations, and (now both ops) the autograd registration."""
    inputs = make_inputs((3, 4, 5), dtype=torch.float32)
    acc = Fk.statistics_dtype(dtype)
    x = inputs.x.to(dtype).requires_grad_()
    per_channel = [t.to(acc).requires_grad_() for t in inputs[1:6] if t is not None]
    torch.library.opcheck(torch.ops.bkn.batch_kalman_norm.default, (x, *per_channel, EPS, 0.5))
    grads = (torch.randn_like(x).requires_grad_(), torch.randn(4, dtype=acc), torch.randn(4, dtype=acc))
    torch.library.opcheck(torch.ops.bkn.batch_kalman_norm_backward.default, (*grads, x, *per_channel[:4], EPS, 0.5))


# --------------------------------------------------------------------------- dispatch


_TABLE_SCRIPT = """
import json, sys, torch
if sys.argv[1] == "cuda-faked":
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
for module in sys.argv[2:]:
    __import__(module)
from bkn_export import ops
def name(f):
    return f.__module__ + "." + f.__qualname__
table = {device: [name(f) for f in backend] for device, backend in ops.BACKENDS.items()}
dispatch = {
    op: {key: torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
         for key in ("CPU", "CUDA", "Meta", "Autograd", "CompositeExplicitAutograd")}
    for op in ("bkn::batch_kalman_norm", "bkn::batch_kalman_norm_backward")
}
print(json.dumps({"backends": table, "dispatcher": dispatch}))
"""


def _backend_table(cuda: str, *imports: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _TABLE_SCRIPT, cuda, *imports], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


_ORDERS = {
    "kernels-first, CUDA faked": ("cuda-faked", "bkn_export.kernels", "bkn_export.ops"),
    "ops-first, CUDA faked": ("cuda-faked", "bkn_export.ops", "bkn_export.kernels"),
    "kernels-first, no CUDA": ("cuda-absent", "bkn_export.kernels", "bkn_export.ops"),
    "ops-first, no CUDA": ("cuda-absent", "bkn_export.ops", "bkn_export.kernels"),
}


@pytest.fixture(scope="module")
def plain_table() -> dict[str, Any]:
    """The backend table of a fresh interpreter that imports only ``bkn_export.ops``, without CUDA."""
    return _backend_table("cuda-absent", "bkn_export.ops")


@pytest.mark.parametrize(
    "order",
    [
        "kernels-first, CUDA faked",
        *(pytest.param(name, marks=pytest.mark.slow) for name in _ORDERS if name != "kernels-first, CUDA faked"),
    ],
)
def test_backend_table_does_not_depend_on_import_order_or_cuda(plain_table: dict[str, Any], order: str) -> None:
    """kernels first or ops first, CUDA visible (faked) or not: the same backends, the same dispatcher entries.

    The dispatcher's entries are read with ``torch._C._dispatch_has_kernel_for_dispatch_key``
    (private; torch 2.13): no public API lists an op's registered dispatch keys. Each case
    starts a fresh interpreter (~5 s here); the default suite runs one (kernels imported first,
    CUDA visible), ``-m slow`` the other three.
    """
    assert set(plain_table["backends"]) == {"cpu", "cuda"}
    assert all(all(keys.values()) for keys in plain_table["dispatcher"].values())
    assert _backend_table(*_ORDERS[order]) == plain_table


def test_backends_are_registered_for_cpu_and_cuda_whatever_the_machine() -> None:
    for op in ("bkn::batch_kalman_norm", "bkn::batch_kalman_norm_backward"):
        for key in ("CPU", "CUDA", "Meta", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    assert set(ops.BACKENDS) == {"cpu", "cuda"}
    assert ops.BACKENDS["cpu"].forward is cpu_kernels.batch_kalman_norm


def _imported_modules(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_kernels_import_nothing_from_the_package_but_layout_and_errors() -> None:
    """No import back up into ops (no circle): kernels see only themselves, their layout and the errors."""
    for path in sorted((PACKAGE / "kernels").glob("*.py")):
        for name in _imported_modules(path):
            if name.startswith("bkn_export"):
                assert name.startswith(("bkn_export.kernels.", "bkn_export.errors.")), f"{path.name} imports {name}"
        assert "torch.library" not in path.read_text(), f"{path.name} registers with torch.library"


def test_test_infrastructure_is_not_shipped() -> None:
    assert not (PACKAGE / "kernels" / "interpreter.py").exists()
    assert not (PACKAGE / "kernels" / "registration.py").exists()


def test_cpu_inputs_the_fast_path_does_not_cover_run_the_reference() -> None:
    """Half precision on CPU: the reference's values bit for bit (float32 statistics)."""
    inputs = make_inputs((4, 3, 5), dtype=torch.float32)
    half = inputs._replace(x=inputs.x.to(torch.bfloat16))
    assert not cpu_kernels.covers(half)
    y, mean, variance = torch.ops.bkn.batch_kalman_norm(*half)
    expected = Fk.batch_kalman_norm(*half)
    for got, want in zip((y, mean, variance), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- first and second derivatives

SHAPES = {"(N,C)": (6, 2), "1d": (3, 2, 4), "2d": (2, 2, 3, 2), "3d": (2, 2, 2, 2, 2)}
STEPS: dict[str, Callable[..., tuple[Tensor, ...]]] = {
    "op": torch.ops.bkn.batch_kalman_norm,
    "eager-cpu": ops.kalman_norm_step,
}


@pytest.mark.parametrize("path", STEPS)
@pytest.mark.parametrize("fallback", FALLBACK)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gradcheck_and_gradgradcheck(shape: tuple[int, ...], affine: bool, fallback: str, path: str) -> None:
    """First and second derivatives of (y, posterior_mean, posterior_variance) w.r.t. every tensor input."""
    inputs = make_inputs(shape, affine, fallback)
    assert fallback_fires(inputs) == (fallback == "fires")
    function, tensors = as_function_of_tensors(STEPS[path], inputs)
    assert torch.autograd.gradcheck(function, tensors)
    assert torch.autograd.gradgradcheck(function, tensors)


@pytest.mark.parametrize("fallback", FALLBACK)
def test_gradcheck_of_the_backward_op(fallback: str) -> None:
    """The backward op's own autograd (the second derivative) against finite differences of the backward op."""
    inputs = make_inputs((3, 2, 4), fallback=fallback)
    grads = KalmanStep(
        torch.randn(3, 2, 4, dtype=torch.float64),
        torch.randn(2, dtype=torch.float64),
        torch.randn(2, dtype=torch.float64),
    )
    tensors = tuple(t.detach().requires_grad_() for t in (*grads, *inputs[:5]))

    def backward_op(*given: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.ops.bkn.batch_kalman_norm_backward(*given, inputs.eps, inputs.fallback_ratio))

    assert torch.autograd.gradcheck(backward_op, tensors)


def test_third_derivative_through_the_op() -> None:
    """A gradient penalty differentiated twice more (the backward's VJP stays attached to the graph)."""
    inputs = make_inputs((3, 2, 4), affine=True)
    tensors = tuple(t.detach().requires_grad_() for t in inputs[:5])

    def gradient_norm(*given: Tensor) -> Tensor:
        y, mean, variance = torch.ops.bkn.batch_kalman_norm(*given, None, EPS, 0.0)
        loss = y.sin().sum() + mean.square().sum() + variance.sum()
        grads = torch.autograd.grad(loss, given, create_graph=True)
        return sum(g.square().sum() for g in grads)  # type: ignore[return-value]

    assert torch.autograd.gradgradcheck(gradient_norm, tensors)


def test_eager_double_backward_equals_the_ops() -> None:
    """create_graph=True through kalman_norm_step gives the op's second derivatives, bit for bit."""
    inputs = make_inputs((3, 2, 4))
    results = []
    for step in STEPS.values():
        tensors = [t.detach().requires_grad_() for t in inputs[:6]]
        y, mean, variance = step(*tensors, EPS, 0.0)
        loss = y.sin().sum() + mean.sum() + variance.square().sum()
        first = torch.autograd.grad(loss, tensors, create_graph=True)
        results.append(torch.autograd.grad(sum(g.square().sum() for g in first), tensors))
    for eager, op in zip(*results):
        torch.testing.assert_close(eager, op, rtol=0, atol=0)


def _module_function(module: nn.Module) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    """``module`` in train mode as a function of (input, parameters...) via torch.func.functional_call."""
    names = [name for name, _ in module.named_parameters()]
    parameters = tuple(p.detach().requires_grad_() for _, p in module.named_parameters())

    def function(x: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(zip(names, values)), (x,))  # type: ignore[no-any-return]

    return function, parameters


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (bkn_export.BatchKalmanNorm1d, (4, 3, 5)),
        (bkn_export.BatchKalmanNorm2d, (3, 3, 3, 2)),
        (bkn_export.BatchKalmanNorm3d, (2, 3, 2, 2, 2)),
    ],
    ids=["1d", "2d", "3d"],
)
def test_first_in_chain_layer_double_backward_like_batchnorm(layer: type[nn.Module], shape: tuple[int, ...]) -> None:
    """A layer on its own (p = 0): gradgradcheck passes and its second derivatives equal nn.BatchNorm's."""
    torch.manual_seed(0)
    bkn = layer(shape[1]).double().train()
    batchnorm = getattr(nn, layer.__name__.replace("BatchKalmanNorm", "BatchNorm"))(shape[1]).double().train()
    with torch.no_grad():
        for module in (bkn, batchnorm):
            module.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            module.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    x = (3.0 + 2.0 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    function, parameters = _module_function(bkn)
    assert torch.autograd.gradgradcheck(function, (x, *parameters))
    second = []
    for module in (bkn, batchnorm):
        inputs = [x.detach().requires_grad_(), *(p.detach().requires_grad_() for p in module.parameters())]
        module_function, _ = _module_function(module)
        first = torch.autograd.grad(module_function(*inputs).sin().sum(), inputs, create_graph=True)
        second.append(torch.autograd.grad(sum(g.square().sum() for g in first), inputs))
    for got, want in zip(*second):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_wired_chain_double_backward() -> None:
    """A converted two-layer chain (the second layer's prior is computed from the first's posterior, so the
    prior enters the op as tensors requiring grad): gradgradcheck of the model w.r.t. its input and weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, padding=1),
        nn.BatchNorm2d(2),
    )
    model = bkn_export.convert_batchnorm(model, torch.randn(2, 2, 4, 4), prior_weight=0.5).double().train()
    wired = [m for m in model.modules() if isinstance(m, bkn_export.BatchKalmanNorm2d)]
    assert len(wired) == 2 and wired[1].has_predecessor
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    names = ["0.weight", "3.weight", "4.weight"]  # the first conv, the feeding conv (prediction), the BKN γ
    params = dict(model.named_parameters())
    tensors = tuple(params[name].detach().requires_grad_() for name in names)

    def function(x: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, values)), (x,), strict=False)  # type: ignore[no-any-return]

    assert torch.autograd.gradgradcheck(function, (x, *tensors))


# --------------------------------------------------------------------------- the fallback rule is a device-side select


class _GraphRecorder:
    """A torch.compile backend that keeps the graph it is given and runs it unchanged."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        self.graphs.append(graph)
        return graph.forward

    def targets(self) -> list[str]:
        return [str(node.target) for graph in self.graphs for node in graph.graph.nodes if node.op != "placeholder"]


_HOST_SYNC_METHODS = {"item", "tolist", "cpu", "numpy"}
_HOST_SYNC_FUNCTIONS = ("_local_scalar_dense", "synchronize", "nonzero")


def assert_traces_without_host_sync(function: Callable[..., Any], *args: Any) -> list[str]:
    """Trace ``function`` with Dynamo in one graph (a data-dependent Python branch or ``.item()``
    raises under fullgraph=True) and check no node reads a value back to the host."""
    torch._dynamo.reset()
    recorder = _GraphRecorder()
    compiled = torch.compile(function, backend=recorder, fullgraph=True, dynamic=False)
    compiled(*args)
    targets = recorder.targets()
    assert len(recorder.graphs) == 1
    synced = [t for t in targets if t in _HOST_SYNC_METHODS or any(sync in t for sync in _HOST_SYNC_FUNCTIONS)]
    assert not synced, f"host synchronisation in the traced graph: {synced}"
    return targets


_IMPLEMENTATIONS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "cpu fast path": (cpu_kernels.batch_kalman_norm, cpu_kernels.batch_kalman_norm_backward),
    "reference": (ops._reference_forward, ops._reference_backward),
}


@pytest.mark.parametrize("implementation", _IMPLEMENTATIONS)
@pytest.mark.parametrize("fallback", ["fires", "holds"])
def test_fallback_rule_is_a_device_side_select(implementation: str, fallback: str) -> None:
    """Forward and backward of each op implementation trace into one graph with the rule as a ``where``."""
    inputs = make_inputs((4, 3, 5), fallback=fallback, dtype=torch.float32)
    forward, backward = _IMPLEMENTATIONS[implementation]
    grads = KalmanStep(torch.randn_like(inputs.x), torch.randn(3), torch.randn(3))
    forward_targets = assert_traces_without_host_sync(forward, inputs)
    assert any("where" in target for target in forward_targets)
    assert_traces_without_host_sync(backward, inputs, grads)
    with native.disabled():  # what a trace runs: the C kernels are eager-only (native.untraced)
        eager = forward(inputs)
    compiled = torch.compile(forward, backend="eager", fullgraph=True)(inputs)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _rule_decided_by_a_python_branch(inputs: KalmanNormInputs) -> Tensor:
    batch_variance = inputs.x.var(dim=(0, 2), correction=0)
    if bool((inputs.prior_variance / batch_variance).mean() >= inputs.fallback_ratio):
        return torch.zeros_like(inputs.prior_weight)
    return inputs.prior_weight


def _rule_read_back_with_item(inputs: KalmanNormInputs) -> Tensor:
    ratio = (inputs.prior_variance / inputs.x.var(dim=(0, 2), correction=0)).mean().item()
    return inputs.prior_weight * float(ratio < inputs.fallback_ratio)


@pytest.mark.parametrize(
    ("rule", "error", "message"),
    [
        (_rule_decided_by_a_python_branch, RuntimeError, "data-dependent"),
        (_rule_read_back_with_item, AssertionError, r"host synchronisation in the traced graph: \['item'\]"),
    ],
    ids=["python-branch", "item"],
)
def test_the_host_sync_check_catches_a_host_decided_rule(
    rule: Callable[[KalmanNormInputs], Tensor], error: type[Exception], message: str
) -> None:
    """The check above can fail: a fallback rule decided on the host is refused."""
    with pytest.raises(error, match=message):
        assert_traces_without_host_sync(rule, make_inputs((4, 3, 5), fallback="fires", dtype=torch.float32))


# --------------------------------------------------------------------------- the eager CPU path


def test_dispatch_modes_see_the_op_not_its_decomposition() -> None:
    """Under a TorchDispatchMode (what make_fx and fake tensors use) kalman_norm_step is the opaque op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    inputs = make_inputs((3, 2, 4))
    with Recorder() as recorder:
        ops.kalman_norm_step(*inputs)
    assert recorder.ops == ["bkn.batch_kalman_norm.default"]


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 6, 2, 2), torch.float32),  # ≤ cpu_kernels._SMALL_COUNT values per channel: ATen's statistics kernel
        ((2, 6, 7, 7), torch.float32),
        ((4, 6, 8, 8), torch.float32),  # above it, but ≤ cpu_kernels._SMALL_NUMEL in all: ATen's kernel too
        ((4, 6, 32, 32), torch.float32),  # above both: the centred two-kernel path
        ((2, 6, 8, 8), torch.float64),  # float64: ATen's statistics kernel at every size
    ],
)
def test_cpu_batch_statistics_keep_precision_on_every_branch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Mean 1e4, spread 1: each branch of cpu_kernels.batch_statistics gives the variance of the
    float64 reference within 1e-6 relative in float32 (1e-11 in float64) and its count."""
    x = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 1e4).to(dtype)
    got = cpu_kernels.batch_statistics(x)
    want = Fk.batch_statistics(x.double())
    tolerance = 1e-6 if dtype == torch.float32 else 1e-11
    assert got.count == want.count == x.numel() // x.shape[1]
    torch.testing.assert_close(got.variance.double(), want.variance, rtol=tolerance, atol=0.0)
    torch.testing.assert_close(got.mean.double(), want.mean, rtol=tolerance, atol=0.0)


# ------------------------------------------------------------------- the eager backward from the forward's state

# Which outputs reach the loss: the backward gets None for the others.
_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "all": lambda y, mean, variance: y.sin().sum() + (mean * variance).sum() + variance.square().sum(),
    "output only": lambda y, mean, variance: y.sin().sum(),
    "posterior only": lambda y, mean, variance: mean.square().sum() + variance.sum(),
}


@pytest.mark.parametrize("loss", _LOSSES)
@pytest.mark.parametrize("fallback", FALLBACK)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_eager_backward_from_saved_state_equals_the_reference(affine: bool, fallback: str, loss: str) -> None:
    """float64: the eager path's values and every input gradient (its backward starts from the
    forward's saved statistics and update terms) against autograd through the functional reference."""
    inputs = make_inputs((3, 4, 5, 2), affine, fallback)
    results = []
    for step in (ops.kalman_norm_step, Fk.batch_kalman_norm):
        tensors = [None if t is None else t.detach().requires_grad_() for t in inputs[:6]]
        outputs = step(*tensors, EPS, inputs.fallback_ratio)
        leaves = [t for t in tensors if t is not None]
        grads = torch.autograd.grad(_LOSSES[loss](*outputs), leaves, allow_unused=True)
        results.append([*outputs, *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))])
    for eager, reference in zip(*results):
        torch.testing.assert_close(eager, reference, rtol=1e-10, atol=1e-10)


def test_eager_backward_does_not_recompute_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics and the update run once per step (forward), not again in the backward;
    create_graph=True still goes through the backward op (which recomputes them)."""
    calls: list[str] = []
    original = cpu_kernels.forward_state

    def counting(inputs: KalmanNormInputs) -> cpu_kernels.ForwardState:
        calls.append("state")
        return original(inputs)

    monkeypatch.setattr(cpu_kernels, "forward_state", counting)
    inputs = make_inputs((3, 2, 4))
    tensors = [t.detach().requires_grad_() for t in inputs[:6]]
    y, mean, variance = ops.kalman_norm_step(*tensors, EPS, 0.0)
    assert calls == ["state"]
    (y.sin().sum() + mean.sum()).backward(retain_graph=True)
    assert calls == ["state"]
    torch.autograd.grad(y.sin().sum() + variance.sum(), tensors, create_graph=True)
    assert calls == ["state", "state"]


def test_eager_path_refuses_a_saved_posterior_modified_in_place() -> None:
    """The posterior the backward reuses is saved with save_for_backward: an in-place change raises."""
    inputs = make_inputs((3, 2, 4))
    tensors = [t.detach().requires_grad_() for t in inputs[:6]]
    y, mean, _ = ops.kalman_norm_step(*tensors, EPS, 0.0)
    with torch.no_grad():
        mean.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("fallback", FALLBACK)
@pytest.mark.parametrize("constant", ["prior", "gain", "prior and gain"])
def test_eager_backward_with_a_constant_prior_equals_the_reference(constant: str, fallback: str) -> None:
    """Inputs that need no gradient (a first-in-chain layer's prior, a fixed gain) get none and
    the others are the reference's: the eager backward skips the prior's gradient ops for them."""
    inputs = make_inputs((3, 4, 5, 2), fallback=fallback)
    constants = {"prior": {1, 2}, "gain": {3}, "prior and gain": {1, 2, 3}}[constant]
    results = []
    for step in (ops.kalman_norm_step, Fk.batch_kalman_norm):
        tensors = [t.detach().requires_grad_(i not in constants) for i, t in enumerate(inputs[:6])]
        outputs = step(*tensors, EPS, inputs.fallback_ratio)
        loss = _LOSSES["all"](*outputs)
        results.append(torch.autograd.grad(loss, [t for t in tensors if t.requires_grad]))
    for eager, reference in zip(*results):
        torch.testing.assert_close(eager, reference, rtol=1e-10, atol=1e-10)


def test_eager_backward_returns_no_gradient_for_a_constant_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    """The needs passed to the fast backward follow autograd's needs_input_grad."""
    seen: list[tuple[bool, bool, bool]] = []
    original = cpu_kernels.backward_from_state

    def recording(*args: Any) -> Any:
        seen.append(args[5])
        return original(*args)

    monkeypatch.setattr(cpu_kernels, "backward_from_state", recording)
    inputs = make_inputs((3, 2, 4))
    tensors = [t.detach().requires_grad_(i in (0, 3, 4, 5)) for i, t in enumerate(inputs[:6])]
    ops.kalman_norm_step(*tensors, EPS, 0.0)[0].sum().backward()
    assert seen == [(False, False, True)]


def _absent_gradient_inputs(channels: int = 5) -> KalmanNormInputs:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, channels, 3, 3, generator=generator)
    prior = (torch.randn(channels, generator=generator), torch.rand(channels, generator=generator) + 0.5)
    weight = torch.full((channels,), 0.4)
    return KalmanNormInputs(x, *prior, weight, torch.ones(channels), torch.zeros(channels), 1e-5, 0.0)


def test_absent_posterior_gradients_are_one_cached_zeros_tensor_in_eager() -> None:
    """Posteriors that reach no loss get the same (C,) zeros each call in plain eager execution (on CUDA no fill
    kernel per step; a first-in-chain layer's constant prior the same way), fresh zeros while tracing, and the op
    never writes into them."""
    inputs = _absent_gradient_inputs()
    first = ops._defined_gradients((None, None, None), inputs)
    second = ops._defined_gradients((torch.ones_like(inputs.x), None, None), inputs)
    assert first.posterior_mean is second.posterior_mean is second.posterior_variance
    assert ops.channel_constant(inputs.x, 0.0) is first.posterior_mean  # also a first-in-chain layer's prior
    ones = ops.channel_constant(inputs.x, 1.0)
    assert ones is ops.channel_constant(inputs.x, 1.0) and bool((ones == 1.0).all())
    traced = torch.fx.experimental.proxy_tensor.make_fx(
        lambda x: ops._defined_gradients((None, None, None), inputs._replace(x=x)).posterior_mean
    )(inputs.x)
    assert any("zeros" in str(node.target) for node in traced.graph.nodes)  # built in the graph, not a constant
    leaves = [t.clone().requires_grad_() for t in inputs[:6]]
    y, _, _ = torch.ops.bkn.batch_kalman_norm(*leaves, 1e-5, 0.0)  # the op's own autograd: posteriors unused
    got = torch.autograd.grad(y.square().sum(), leaves)
    zeros = first.posterior_mean
    assert zeros.dtype == torch.float32 and zeros.shape == (5,) and not zeros.any()
    references = [t.clone().requires_grad_() for t in inputs[:6]]
    want = torch.autograd.grad(Fk.batch_kalman_norm(*references, 1e-5, 0.0).output.square().sum(), references)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
