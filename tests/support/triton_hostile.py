"""Hostile train steps for the Triton route of :mod:`bkn_export.per_channel` (tests/test_triton_route_hostile.py).

Each case builds a small network whose wired layers meet one awkward input of the Triton twins (a layout, a
frozen parameter, a mode, a size), converts it and runs one step; :func:`network_step` returns what the step
produces. The test runs it in a Triton interpreter child started with ``BKN_TRITON_ON_CPU=1`` (the twins on CPU
tensors) and in its own process (the C kernels, or the PyTorch forms under ``native.disabled()``), and compares.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bkn_export import convert_batchnorm, native, per_channel
from bkn_export.chain import path_moments
from support.triton_steps import counted_launches, draw


def _grouped() -> tuple[nn.Module, tuple[int, ...]]:
    """Grouped (not depthwise) convs with border tables: 5×5 (a backward program per group of rows) and 3×3
    of 20 rows per group (several programs per group: partial sums added by a second kernel); a strided
    bias-free 3×3, a 1×1 with bias."""
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 5, padding=2, groups=2, bias=False), nn.BatchNorm2d(12), nn.Hardswish(),
        nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6), nn.SiLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 40, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(40),
    )  # fmt: skip
    return net, (2, 4, 9, 9)


def _plain_norms() -> tuple[nn.Module, tuple[int, ...]]:
    """γ None (affine=False), momentum=None, a BatchNorm without running statistics."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU6(),
        nn.Conv2d(8, 5, 1, bias=False), nn.BatchNorm2d(5, track_running_stats=False), nn.Sigmoid(),
        nn.Conv2d(5, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, affine=False, momentum=None),
    )  # fmt: skip
    return net, (2, 3, 8, 8)


def _wide() -> tuple[nn.Module, tuple[int, ...]]:
    """More than 1024 channels (several programs of the per-channel kernels; Linear rows and inputs beyond
    one tile)."""
    net = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 1030, bias=False), nn.BatchNorm1d(1030), nn.Tanh(),
        nn.Linear(1030, 3), nn.BatchNorm1d(3),
    )  # fmt: skip
    return net, (4, 6)


def _shared_source() -> tuple[nn.Module, tuple[int, ...]]:
    """One BKN layer's output feeding two convs (each its own prediction from the same source)."""

    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
            self.left = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.right = nn.Sequential(nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4))
            self.both = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(4))

        def forward(self, x: Tensor) -> Tensor:
            x = self.stem(x)
            return self.left(x) + self.right(x) * self.both(x)

    return Fork(), (2, 3, 7, 7)


def _long_kernels() -> tuple[nn.Module, tuple[int, ...]]:
    """A Conv1d of 512 taps (the most the twins take) with padding (border tables 512 × 512), a depthwise
    Conv1d, a 1-channel layer and a 3-d conv."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, bias=False), nn.BatchNorm1d(3), nn.ReLU())
            self.wide = nn.Sequential(nn.Conv1d(3, 2, 512, padding=256, bias=False), nn.BatchNorm1d(2), nn.SiLU())
            self.depthwise = nn.Sequential(nn.Conv1d(2, 2, 7, padding=3, groups=2, bias=False), nn.BatchNorm1d(2))
            self.single = nn.Sequential(nn.Conv1d(2, 1, 1, bias=False), nn.BatchNorm1d(1), nn.ReLU())
            self.volume = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1, bias=False), nn.BatchNorm3d(3), nn.ReLU())
            self.tail = nn.Sequential(nn.Conv3d(3, 2, 3, padding=1, bias=False), nn.BatchNorm3d(2))

        def forward(self, x: Tensor) -> Tensor:
            line = self.single(self.depthwise(self.wide(self.stem(x))))
            return self.tail(self.volume(line.reshape(line.shape[0], 1, 3, 2, -1)))

    return Mixed(), (2, 2, 17)


CASES: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "grouped": _grouped,
    "plain_norms": _plain_norms,
    "wide": _wide,
    "shared_source": _shared_source,
    "long_kernels": _long_kernels,
}


def _affine_geometry(name: str, args: tuple[Any, ...]) -> str | None:
    """For the affine twin or a fused path head with an affine stage, which geometry took it: the parameters
    [B, K, groups] (the twin's sixth argument, the head's ninth)."""
    if name == "affine_moments":
        parameters = args[5]
    elif name == "path_moments" and args[8] is not None:
        parameters = args[8]
    else:
        return None
    inputs, taps, groups = (int(v) for v in parameters.tolist())
    prefix = "affine" if name == "affine_moments" else "path head"
    return f"{prefix} B={inputs} K={taps} groups={groups}"


def network_step(
    case: str,
    dtype: str,
    seed: int = 0,
    forms: str = "kernels",
    layout: str = "contiguous",
    frozen: str = "",
    mode: str = "grad",
    steps: int = 1,
    poison: float = 0.0,
    heads: str = "fused",
) -> dict[str, object]:
    """``steps`` train steps of case ``case`` in ``dtype``; returns outputs, gradients, buffers, twin calls.

    forms: "kernels" (per_channel's route) or "pytorch" (``native.disabled()``). layout: "contiguous" or
    "channels_last" (model and input; 4-d only). frozen: "weight" (γ and conv / Linear weights without
    gradient), "all" (every parameter). mode: "grad" (backward of a weighted sum), "no_grad", "inference"
    (forward only, under that mode: running statistics still update), "double" (a create_graph backward,
    then the gradient of the gradients' squared norm), "eval" (eval mode, then as "grad": layers without
    running statistics still normalise by the batch, with their prior). heads: "fused" (a path's head as one
    node: on the Triton route the fused kernels of ``kernels.path_moments``) or "separate"
    (:func:`bkn_export.chain.path_moments.separate`: each stage's own twin)."""
    torch.manual_seed(seed)
    float_type = getattr(torch, dtype)
    net, shape = CASES[case]()
    net = net.to(float_type)
    model = convert_batchnorm(net, draw(shape, float_type))
    model.train(mode != "eval")
    for name, parameter in model.named_parameters():
        if frozen == "all" or (frozen == "weight" and name.endswith("weight")):
            parameter.requires_grad_(False)
    inputs = [draw(shape, float_type) for _ in range(steps)]
    if poison:
        inputs[0].view(-1)[: shape[-1]] = poison
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        inputs = [x.to(memory_format=torch.channels_last) for x in inputs]
    counts: collections.Counter[str] = collections.Counter()
    result: dict[str, object] = {}
    with contextlib.ExitStack() as routes:
        if forms == "pytorch":
            routes.enter_context(native.disabled())
        if heads == "separate":
            routes.enter_context(path_moments.separate())
        if per_channel.triton_route(inputs[0]):
            routes.enter_context(counted_launches(counts, _affine_geometry))
        for index, x in enumerate(inputs):
            if mode == "no_grad":
                with torch.no_grad():
                    output = model(x)
            elif mode == "inference":
                with torch.inference_mode():
                    output = model(x)
                output = output.clone()
            else:
                output = model(x.requires_grad_())
                weights = torch.linspace(-1.0, 1.0, output.numel(), dtype=float_type).reshape(output.shape)
                loss = (output * weights).sum()
                if mode == "double":
                    wanted = [p for p in model.parameters() if p.requires_grad]
                    grads = torch.autograd.grad(loss, [x, *wanted], create_graph=True)
                    sum(g.pow(2).sum() for g in grads).backward()  # type: ignore[union-attr]
                    result[f"input_grad.{index}"] = grads[0].detach().clone()
                else:
                    loss.backward()
                    result[f"input_grad.{index}"] = x.grad.clone()  # type: ignore[union-attr]
            result[f"output.{index}"] = output.detach().contiguous().clone()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            result[f"grad.{name}"] = parameter.grad.contiguous().clone()
    for name, buffer in model.named_buffers():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            result[f"buffer.{name}"] = buffer.clone()
    result["launches"] = dict(counts)
    return result


def compiled_step(dtype: str = "float64") -> dict[str, Tensor]:
    """A train step of case "plain_norms" under ``torch.compile(fullgraph=True)`` (backend "eager"): the
    per-channel route must stay out of the traced graph (no ContextVar read before the tracing check)."""
    torch.manual_seed(0)
    float_type = getattr(torch, dtype)
    net, shape = CASES["plain_norms"]()
    model = convert_batchnorm(net.to(float_type), draw(shape, float_type))
    model.train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    output = compiled(draw(shape, float_type))
    output.sum().backward()
    result = {"output": output.detach()}
    for name, buffer in model.named_buffers():
        result[f"buffer.{name}"] = buffer.clone()
    return result


def meta_step(case: str = "grouped") -> tuple[int, ...]:
    """A train step of ``case`` on the meta device (shapes only): the per-channel route must leave meta tensors
    to the PyTorch forms. Returns the output's shape."""
    torch.manual_seed(0)
    net, shape = CASES[case]()
    model = convert_batchnorm(net.double(), torch.randn(*shape, dtype=torch.float64)).to("meta")
    model.train()
    output = model(torch.randn(*shape, dtype=torch.float64, device="meta", requires_grad=True))
    output.sum().backward()
    return tuple(output.shape)


def affine_step(
    rows: int, inputs: int, taps: int, groups: int, tables: bool, dtype: str, forms: str = "kernels"
) -> dict[str, Tensor]:
    """:func:`bkn_export.chain.fast.affine_moments` of a random W (rows, inputs, taps) in ``groups`` groups, with
    random coverage tables or none, forward and backward (both output gradients). Returns M, V, ∂W, ∂μ, ∂σ² and
    whether the twin ran ("twin": 1 or 0)."""
    from bkn_export.chain import fast

    generator = torch.Generator().manual_seed(rows * 1000 + inputs * 10 + taps)
    float_type = getattr(torch, dtype)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(float_type)

    weight = draw(rows, inputs, taps).requires_grad_()
    mean = draw(groups * inputs).requires_grad_()
    variance = draw(groups * inputs).exp().requires_grad_()
    coverage = None
    if tables:
        valid = (torch.rand(30, taps, generator=generator, dtype=torch.float64) < 0.8).to(float_type)
        coverage = (valid.mean(0), valid.t() @ valid / 30)
    counts: collections.Counter[str] = collections.Counter()
    with contextlib.ExitStack() as routes:
        if forms == "pytorch":
            routes.enter_context(native.disabled())
        if per_channel.triton_route(mean):
            routes.enter_context(counted_launches(counts, _affine_geometry))
        out_mean, out_variance = fast.affine_moments(weight, None, mean, variance, coverage)
        grad_mean, grad_variance = draw(rows), draw(rows)
        torch.autograd.backward((out_mean, out_variance), (grad_mean, grad_variance))
    assert weight.grad is not None and mean.grad is not None and variance.grad is not None
    return {
        "mean": out_mean.detach(), "variance": out_variance.detach(), "grad_weight": weight.grad,
        "grad_mean": mean.grad, "grad_variance": variance.grad,
        "twin": torch.tensor(counts["affine_moments_backward"]),
    }  # fmt: skip


#: Tensor methods that read a value on the host (a device synchronisation on CUDA; illegal in a graph capture).
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def host_reads(case: str = "grouped", dtype: str = "float32") -> list[tuple[str, str, int, str, str]]:
    """The host reads of tensor values during a train step of ``case`` (after conversion, which reads on
    purpose): (method, dtype, dims, bkn_export file, function) per distinct read, the innermost bkn_export
    frame. In a float32 step every data tensor is float32, so a read of one shows as float32."""
    import traceback

    torch.manual_seed(0)
    float_type = getattr(torch, dtype)
    net, shape = CASES[case]()
    model = convert_batchnorm(net.to(float_type), draw(shape, float_type))
    model.train()
    reads: set[tuple[str, str, int, str, str]] = set()
    originals = {name: getattr(Tensor, name) for name in _HOST_READS}

    def recording(name: str):  # type: ignore[no-untyped-def]
        original = originals[name]

        def read(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            frames = [f for f in traceback.extract_stack()[:-1] if "/bkn_export/" in f.filename]
            if frames:
                where = frames[-1]
                file = where.filename.rsplit("/bkn_export/", 1)[1]
                reads.add((name, str(self.dtype), self.dim(), file, where.name))
            return original(self, *args, **kwargs)

        return read

    try:
        for name in _HOST_READS:
            setattr(Tensor, name, recording(name))
        for _ in range(2):
            model(draw(shape, float_type)).sum().backward()
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)
    return sorted(reads)


def stale_running_statistics() -> str:
    """A graph that saved a running mean, then a train step that updates it in place: autograd must refuse the
    backward (the buffer's version moved on), as it does after torch's own in-place update. Returns the error
    message, or "no error" with the gradient it computed from the updated buffer."""
    torch.manual_seed(0)
    net, shape = CASES["plain_norms"]()
    model = convert_batchnorm(net.double(), draw(shape, torch.float64))
    model.train()
    running_mean = model.get_buffer("4.running_mean")
    scale = torch.ones(running_mean.shape, dtype=torch.float64, requires_grad=True)
    saved = (scale * running_mean).sum()  # mul saves the running mean for ∂/∂scale
    model(draw(shape, torch.float64))
    try:
        saved.backward()
    except RuntimeError as error:
        return str(error)
    return f"no error: gradient {scale.grad}"
