"""A converted network's train step, run once per route of :mod:`bkn_export.per_channel`.

:func:`train_step` builds a small network whose wired layers cover every fused prediction kind
(ReLU, ReLU6 and hardswish (piecewise), SiLU and sigmoid (Gauss–Hermite), a squeeze-and-excitation
gate, 3×3 / strided / depthwise / 1×1 convs with and without border tables, a Linear, a residual
sum), converts it, runs one forward + backward and returns what a step produces. The test calls it
in this process (C kernels, or PyTorch forms under ``native.disabled()``) and in a Triton
interpreter child started with ``BKN_TRITON_ON_CPU=1`` (the Triton twins on CPU tensors), and
compares. ``launches`` counts, in the child, the calls of each twin (proof that the route ran).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

import bkn_export
from bkn_export import convert_batchnorm, kernels, native, per_channel, triton_step


class _Excite(nn.Module):
    """Squeeze-and-excitation: x · sigmoid(conv(relu(conv(mean over positions))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, 4, 1)
        self.expand = nn.Conv2d(4, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16))
        self.act = nn.Hardswish()
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16))
        self.silu = nn.SiLU()
        self.excite = _Excite(16)
        self.project = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.head = nn.Linear(16, 12)
        self.head_norm = nn.BatchNorm1d(12)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(self.stem(x))
        x = self.act(x)
        x = x + self.project(self.excite(self.silu(self.depthwise(x))))  # a residual sum
        return self.head_norm(self.head(x.mean((2, 3))))


def draw(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A standard normal draw made in float64, then rounded: the same values in every dtype (torch.randn in
    float32 draws other numbers than in float64 beyond 16 elements), so that a float32 step can be compared
    with the float64 one."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


@contextlib.contextmanager
def counted_launches(
    counts: collections.Counter[str], detail: Callable[[str, tuple[Any, ...]], str | None] | None = None
) -> Iterator[None]:
    """Count the calls of each Triton twin (wrapping the launcher table's entries for the block) and of the fused
    path-head launchers (``kernels.path_moments``: ``path_moments``, ``path_moments_backward``); ``detail`` may
    name one more key to count for a call (its launcher name and positional arguments)."""
    table = kernels.moment_launchers()
    path_module = kernels.path_kernels()
    if table is None or path_module is None:
        yield
        return
    assert isinstance(table, dict)
    originals = dict(table)
    path_originals = {name: getattr(path_module, name) for name in ("path_moments", "path_moments_backward")}

    def counting(name: str):  # type: ignore[no-untyped-def]
        launcher = originals[name]

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            counts[name] += 1
            extra = None if detail is None else detail(name, args)
            if extra is not None:
                counts[extra] += 1
            return launcher(*args, **kwargs)

        return run

    originals.update(path_originals)
    table.update({name: counting(name) for name in table})
    for name in path_originals:
        setattr(path_module, name, counting(name))
    try:
        yield
    finally:
        table.update({name: originals[name] for name in table})
        for name, launcher in path_originals.items():
            setattr(path_module, name, launcher)


def tensors_of(step: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of a step's result (:func:`train_step`'s, without its counters)."""
    return {k: v for k, v in step.items() if isinstance(v, Tensor)}


def _converted(dtype: str, seed: int, device: str = "cpu", **options: Any) -> nn.Module:
    """The converted :class:`_Net` in ``dtype``, seeded, in train mode (the draws after it seeded too)."""
    torch.manual_seed(seed)
    float_type = getattr(torch, dtype)
    net = _Net().to(float_type)
    example = draw((2, 3, 12, 12), float_type)  # the same values in either dtype
    return convert_batchnorm(net, example, **options).to(device).train()


def _routes(forms: str) -> contextlib.ExitStack:
    routes = contextlib.ExitStack()
    if forms == "pytorch":
        routes.enter_context(native.disabled())
    if forms == "separate":
        routes.enter_context(_without_triton_step())
    return routes


def gradient_penalty_step(dtype: str, seed: int, forms: str = "kernels") -> dict[str, Tensor]:
    """Second derivatives through every layer's step: the gradients of ‖∂L/∂θ‖² (``create_graph=True``) of
    the converted :class:`_Net`, by parameter name (``forms`` as in :func:`train_step`)."""
    model = _converted(dtype, seed)
    float_type = getattr(torch, dtype)
    x = draw((2, 3, 12, 12), float_type)
    parameters = [p for p in model.parameters() if p.requires_grad]
    with _routes(forms):
        loss = (model(x) * torch.linspace(-1.0, 1.0, 24, dtype=float_type).reshape(2, 12)).sum()
        grads = torch.autograd.grad(loss, parameters, create_graph=True, allow_unused=True)
        sum(g.square().sum() for g in grads if g is not None).backward()  # type: ignore[union-attr]
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def observed_statistics(dtype: str, seed: int, forms: str = "kernels") -> dict[str, Tensor]:
    """:func:`bkn_export.chain_statistics` of the converted :class:`_Net` (an observer records every layer's
    step, the prior the op received included), by layer and field."""
    from bkn_export import chain_statistics

    model = _converted(dtype, seed)
    x = draw((2, 3, 12, 12), getattr(torch, dtype))
    with _routes(forms):
        found = chain_statistics(model, x)
    result: dict[str, Tensor] = {}
    for layer in found:
        for field in dataclasses.fields(layer):
            value = getattr(layer, field.name)
            if isinstance(value, Tensor):
                result[f"{layer.name}.{field.name}"] = value
    return result


@contextlib.contextmanager
def _without_triton_step() -> Iterator[None]:
    """Every layer takes the op (``torch.ops.bkn.batch_kalman_norm``) instead of :mod:`bkn_export.triton_step`."""
    original = triton_step.applies
    triton_step.applies = lambda x: False  # type: ignore[assignment]
    try:
        yield
    finally:
        triton_step.applies = original  # type: ignore[assignment]


class _UnpackOnce(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that, like torch.utils.checkpoint's, let each saved tensor be unpacked once."""

    def __init__(self) -> None:
        def unpack(holder: list[Any]) -> Tensor:
            assert not holder[1], "a backward read ctx.saved_tensors twice"
            holder[1] = True
            return holder[0]  # type: ignore[no-any-return]

        super().__init__(lambda tensor: [tensor, False], unpack)


def _checkpointed(model: nn.Module, checkpointing: str) -> Callable[[Tensor], Tensor]:
    """The model's forward as ``checkpointing`` says: "none"; "segments" (its depthwise block, and the gate and
    projection after it, under :func:`bkn_export.checkpoint`); "whole" (the wired model under
    ``torch.utils.checkpoint``); "unpack-once" (:class:`_UnpackOnce` hooks around the forward)."""
    if checkpointing == "segments":
        for name in ("depthwise", "excite", "project"):
            module = getattr(model, name)
            module.forward = functools.partial(bkn_export.checkpoint, module.forward)
        return model
    if checkpointing == "whole":
        return functools.partial(torch.utils.checkpoint.checkpoint, model, use_reentrant=False)
    if checkpointing == "unpack-once":

        def forward(x: Tensor) -> Tensor:
            with _UnpackOnce():
                return model(x)  # type: ignore[no-any-return]

        return forward
    assert checkpointing == "none", checkpointing
    return model


def train_step(
    dtype: str, seed: int = 0, forms: str = "kernels", device: str = "cpu", checkpointing: str = "none", **options: Any
) -> dict[str, Tensor | dict[str, int]]:
    """One train step of the converted :class:`_Net` (batch 2, 12×12) in ``dtype`` ("float32"/"float64")
    on ``device`` (converted on the CPU, then moved; results come back on the CPU).

    forms: "kernels" (whatever :mod:`bkn_export.per_channel` routes to), "pytorch" (the PyTorch
    forms: ``native.disabled()``, C kernels and Triton twins off; the op keeps its own kernels) or "separate"
    (kernels, but every layer's step as the op with the prior assembled by its own launch and autograd adding
    γ's and β's gradients: :mod:`bkn_export.triton_step` switched off).
    Returns the output, every parameter's gradient, every running statistic (by name) and, under
    "launches", the twin calls counted. checkpointing: see :func:`_checkpointed`. ``options``: BKN options for
    the conversion."""
    model = _converted(dtype, seed, device, **options)
    forward = _checkpointed(model, checkpointing)
    float_type = getattr(torch, dtype)
    model.train()
    x = draw((2, 3, 12, 12), float_type).to(device)
    counts: collections.Counter[str] = collections.Counter()
    routes = _routes(forms)
    with routes:
        if per_channel.triton_route(x):
            routes.enter_context(counted_launches(counts))
        output = forward(x)
        weights = torch.linspace(-1.0, 1.0, output.numel(), dtype=float_type, device=output.device)
        (output * weights.reshape(output.shape)).sum().backward()
    result: dict[str, Tensor | dict[str, int]] = {"output": output.detach().cpu()}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            result[f"grad.{name}"] = parameter.grad.cpu()
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            result[f"buffer.{name}"] = buffer.cpu()
    result["launches"] = dict(counts)
    result["triton_route"] = {x.device.type: int(per_channel.triton_route(x))}
    return result


#: Tensor methods that copy a value to the host (on a GPU each is a synchronisation).
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def host_reads(dtype: str, seed: int = 0, momentum: float | None = None) -> dict[str, int]:
    """Where one eager train step of the converted :class:`_Net` reads a tensor's value on the host, counted by
    "method file:function" of the innermost ``bkn_export`` frame (reads made inside Triton's interpreter, which
    is the stand-in for the device, are not counted). Every layer's ``momentum`` is set first (None: the
    cumulative average, α = 1 / num_batches_tracked). One step runs first unrecorded (the chain's first call)."""
    model = _converted(dtype, seed)
    for module in model.modules():
        if hasattr(module, "num_batches_tracked"):
            module.momentum = momentum
    x = draw((2, 3, 12, 12), getattr(torch, dtype))
    model(x).square().mean().backward()
    reads: collections.Counter[str] = collections.Counter()

    def recorded(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            stack = traceback.extract_stack()[:-1]
            ours = [frame for frame in stack if "/bkn_export/" in frame.filename]
            if ours and not any("/triton/" in frame.filename for frame in stack):
                site = ours[-1]
                reads[f"{method} {site.filename.rsplit('/bkn_export/', 1)[1]}:{site.name}"] += 1
            return original(self, *args, **kwargs)

        return read

    originals = {method: getattr(Tensor, method) for method in _HOST_READS}
    try:
        for method, original in originals.items():
            setattr(Tensor, method, recorded(method, original))
        model(x).square().mean().backward()
    finally:
        for method, original in originals.items():
            setattr(Tensor, method, original)
    return dict(reads)


def cumulative_running_statistics(dtype: str) -> dict[str, Tensor]:
    """Running statistics of the converted :class:`_Net` with ``momentum=None`` after two train steps
    (the cumulative average reads num_batches_tracked), by buffer name."""
    torch.manual_seed(3)
    float_type = getattr(torch, dtype)
    net = _Net().to(float_type)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model = convert_batchnorm(net, draw((2, 3, 12, 12), float_type))
    model.train()
    for _ in range(2):
        model(draw((2, 3, 12, 12), float_type)).sum().backward()
    return {
        name: buffer.clone()
        for name, buffer in model.named_buffers()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def launches(probe: str, variant: str) -> dict[str, int]:
    """Kernel launches of one train step of a ``benchmarks/count_launches.py`` probe as ``variant`` ("bn",
    "bkn", "bkn_pytorch_forms"): {"forward": n, "backward": n}, Triton launches and ATen operators together."""
    from benchmarks import count_launches

    counted = count_launches.count(probe, variant)
    return {"forward": counted.forward.total, "backward": counted.backward.total}
