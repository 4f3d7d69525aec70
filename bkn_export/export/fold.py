"""Fold eval-mode BKN / BatchNorm layers into the Conv / ConvTranspose / Linear before them, in PyTorch.

For users who deploy PyTorch: ``fold(model)`` returns a new model (the input is left
untouched) in eval mode where each normalization whose input is the output of a
Conv/ConvTranspose/Linear, used by nothing else, is absorbed into that layer and
replaced by ``nn.Identity`` (a norm-act layer by its ``drop`` then ``act``, which
stay). With the eval affine map a, s of
:func:`bkn_export.functional.inference_affine` (the math in :mod:`bkn_export.export.fold_math`,
shared with the ONNX rules)::

    Conv           W'[o] = a[o] W[o]                    b' = a b + s     (W: (C_out, C_in/G, *k))
    ConvTranspose  W'[i, j] = a[g C_out/G + j] W[i, j]   b' = a b + s     (W: (C_in, C_out/G, *k), i in group g)
    Linear         W'[o] = a[o] W[o]                    b' = a b + s     (only with a proven (N, C) output)

The data flow comes from ``torch.fx`` symbolic tracing with Conv/Linear/normalization
layers as leaves. A Linear is folded only when ``example_inputs`` show its output is
(N, C_out): on (N, L, C_out) the normalization's channel axis is L, not C_out.
Normalizations that cannot be folded stay (they compute the same affine map in eval).
The folded model computes the eval-mode function in either mode: it is for inference.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import Tensor, fx, nn

from bkn_export.copying import copy_module
from bkn_export.errors import ExportError
from bkn_export.export.checks import NORMALIZATION_TYPES, check_inference_ready
from bkn_export.export.common import example_tuple
from bkn_export.export.fold_math import affine_of, folded_bias, folded_weight
from bkn_export.export.result import FoldRecord

__all__ = ["FoldResult", "fold"]

_HOST_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


class FoldResult(NamedTuple):
    """model: the folded copy (eval mode); report: one FoldRecord per normalization layer.

    FoldRecord.target is the name of the absorbing module (None if standalone) and kind is
    "conv" | "conv_transpose" | "linear" | "standalone" | "unused".
    """

    model: nn.Module
    report: list[FoldRecord]


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*NORMALIZATION_TYPES, *_HOST_TYPES)) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _LeafTracer().trace(model)
    except Exception as error:  # fx raises many kinds (TraceError, TypeError, ...)
        raise ExportError(
            f"fold: torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}). "
            "Use bkn_export.export.export_onnx(..., mode='inference'), which folds in the ONNX graph."
        ) from error


def _output_ranks(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Rank of each host module's output on ``example_inputs`` (module name -> rank)."""
    ranks: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _HOST_TYPES):
            handles.append(
                module.register_forward_hook(
                    lambda _m, _i, out, name=name: ranks.__setitem__(name, out.dim())  # type: ignore[misc]
                )
            )
    try:
        with torch.no_grad():
            model(*example_tuple(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return ranks


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that two or more modules hold (tied weights)."""
    owners: dict[int, int] = {}
    for module in {id(m): m for m in model.modules()}.values():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def _tensor(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return value.detach().double() if isinstance(value, Tensor) else None


def _folded_host(host: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of ``host`` with the eval affine of ``norm`` absorbed (computed in float64)."""
    running_mean, running_var = _tensor(norm, "running_mean"), _tensor(norm, "running_var")
    assert running_mean is not None and running_var is not None  # check_inference_ready made sure
    scale, shift = affine_of(
        running_mean,
        running_var,
        _tensor(norm, "weight"),
        _tensor(norm, "bias"),
        float(norm.eps),  # type: ignore[arg-type]
    )
    new = copy_module(host)
    original = host.weight
    assert isinstance(original, Tensor)
    transposed = isinstance(host, nn.modules.conv._ConvNd) and host.transposed
    groups = host.groups if isinstance(host, nn.modules.conv._ConvNd) else 1
    folded = folded_weight(original.detach().double(), scale, "transposed" if transposed else "out_first", groups)
    bias = folded_bias(_tensor(host, "bias"), scale, shift)
    new.weight = nn.Parameter(folded.to(dtype=original.dtype, device=original.device))
    new.bias = nn.Parameter(bias.to(dtype=original.dtype, device=original.device))
    return new


class _DropAct(nn.Module):
    """``act(drop(x))``: what is left of a folded norm-act layer (same child names, so module paths stay)."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))  # type: ignore[no-any-return]


def _remainder(norm: nn.Module) -> nn.Module | None:
    """What replaces ``norm`` once its affine map is in the host; None when that is not known.

    A plain normalization (no submodules) -> ``nn.Identity``. A norm-act layer
    (``BatchKalmanNormAct*d``, ``SyncBatchKalmanNormAct``: ``act(drop(norm(x)))``) ->
    ``act(drop(x))`` (:class:`_DropAct`) in eval, so its activation is kept. Any other layer with
    submodules: None (its forward may use them in ways the fold cannot see; it is not folded).
    """
    from bkn_export.norm_act import SyncBatchKalmanNormAct, _NormActMixin

    children = dict(norm.named_children())
    if not children:
        return nn.Identity()
    if isinstance(norm, (_NormActMixin, SyncBatchKalmanNormAct)) and set(children) == {"drop", "act"}:
        return _DropAct(copy.deepcopy(children["drop"]), copy.deepcopy(children["act"])).eval()
    return None


#: The torch classes whose forward the fold rules describe (a subclass may override it: weight standardisation, LoRA).
_PLAIN_HOSTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _own_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward is its known class's: a plain torch host, or a normalization class of this
    package / torch whose forward a subclass did not override (BatchNorm subclasses with extra behaviour)."""
    if isinstance(module, _HOST_TYPES):
        return type(module) in _PLAIN_HOSTS
    known = [base for base in type(module).__mro__ if base.__module__.startswith(("torch.nn", "bkn_export"))]
    return bool(known) and getattr(type(module), "forward", None) is getattr(known[0], "forward", None)


def _has_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks on the module itself, other than this package's (the chain's path watches only observe):
    they would see or change the unfolded values (old-style ``weight_norm`` and pruning are such pre-hooks)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(not (getattr(hook, "__module__", None) or "").startswith("bkn_export.") for hook in hooks)


def _unsafe(
    name: str,
    norm: nn.Module,
    host_name: str,
    host: nn.Module,
    names: dict[int, list[str]],
    shared: set[int],
    graph: fx.Graph,
) -> str:
    """Why folding ``norm`` into ``host`` could change the model ("" when it cannot): the fold rules hold for the
    torch forward of each, called once, under one name, with no hook, parametrization or other reader of the
    host's weights (the ONNX export folds from the graph that actually ran, and is not limited so)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(host):  # first: its class is a generated subclass (ParametrizedConv2d)
        return f"'{host_name}' is parametrized ({', '.join(getattr(host, 'parametrizations', {}))})"
    for label, module in ((host_name, host), (name, norm)):
        if not _own_forward(module):
            return f"'{label}' ({type(module).__name__}) overrides its class's forward"
        if _has_hooks(module):
            return f"'{label}' has forward hooks"
        if len(names.get(id(module), ())) > 1:
            return f"'{label}' is registered under several names {names[id(module)]}"
    prefix = f"{host_name}."
    if any(node.op == "get_attr" and str(node.target).startswith(prefix) for node in graph.nodes):
        return f"the forward reads a tensor of '{host_name}' directly (tied weights)"
    if any(id(p) in shared for p in host.parameters(recurse=False)):
        return f"a parameter of '{host_name}' is shared with another module (tied weights)"
    return ""


def _kind(host: nn.Module) -> str:
    if isinstance(host, nn.Linear):
        return "linear"
    return "conv_transpose" if getattr(host, "transposed", False) else "conv"


def fold(model: nn.Module, example_inputs: Any = None) -> FoldResult:
    """Return a copy of ``model`` with every foldable normalization absorbed, and a report.

    example_inputs: optional tensor or tuple (N, C, *); needed to fold into ``Linear``
    layers (to prove their output is (N, C)). Raises :class:`InvalidStatisticsError` /
    :class:`UnsupportedLayerError` (see :func:`check_inference_ready`) and
    :class:`ExportError` if the model cannot be traced. ``model`` is not modified.
    """
    norms = dict(check_inference_ready(model))
    folded = copy_module(model).eval()
    graph = _trace(folded)
    ranks = _output_ranks(folded, example_inputs) if example_inputs is not None else None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    names: dict[int, list[str]] = {}
    for module_name, module in folded.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(module_name)
    shared = _shared_parameters(folded)
    records: dict[str, FoldRecord] = {}
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or name not in norms:
            continue
        source = node.args[0] if node.args else None
        host_name = str(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        host = folded.get_submodule(host_name) if host_name else None
        reason = ""
        if host is None or not isinstance(host, _HOST_TYPES):
            reason = "its input is not the output of a Conv/ConvTranspose/Linear"
        elif calls[name] > 1 or calls[host_name or ""] > 1:  # type: ignore[index]
            reason = f"'{name}' or '{host_name}' is called more than once"
        elif len(source.users) > 1:  # type: ignore[union-attr]
            reason = f"the output of '{host_name}' is also used elsewhere"
        elif isinstance(host, nn.Linear) and (ranks is None or ranks.get(host_name or "") != 2):
            reason = (
                "a Linear output must be (N, C) to fold; pass example_inputs to prove it"
                if ranks is None
                else f"the output of '{host_name}' is not (N, C)"
            )
        if not reason:
            assert host is not None and host_name is not None
            reason = _unsafe(name, folded.get_submodule(name), host_name, host, names, shared, graph)
        remainder = _remainder(norms[name])
        if not reason and remainder is None:
            children = [child for child, _ in norms[name].named_children()]
            reason = f"'{name}' has submodules {children} whose place in its forward is not known"
        if reason:
            records[name] = FoldRecord(name, None, "standalone", reason)
            continue
        assert host is not None and host_name is not None and remainder is not None
        folded.set_submodule(host_name, _folded_host(host, norms[name]))
        folded.set_submodule(name, remainder)
        records[name] = FoldRecord(name, host_name, _kind(host), f"folded into {type(host).__name__} '{host_name}'")
    report = [records.get(name, FoldRecord(name, None, "unused", "never called in forward")) for name in norms]
    return FoldResult(folded.eval(), report)
