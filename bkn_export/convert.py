"""BatchNorm → BKN conversion, Kalman-chain wiring, chain description, checkpoint loading.

The chain is recorded from one forward pass on example inputs (in eval mode, so no
statistics change): forward hooks on every leaf module and a ``TorchFunctionMode``
that notices functional ReLUs give the execution order. For each BKN layer:

* its predecessor is the BKN layer that ran before it;
* its feeding layer is the last Conv/ConvTranspose/Linear that ran between the two,
  if its input channels equal the predecessor's and its output channels its own;
* ``rectify`` is set when a ReLU ran between the predecessor and the feeding layer.

``propagate`` and ``sampled`` need a feeding layer; without one the layer falls back to
``identity`` (same channel counts) or ``learned`` (different counts), and the chain
description says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bkn_export.errors import BKNInputError, ChainWiringError, CheckpointError, KalmanOptionsError
from bkn_export.nn import (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    ChainLink,
    KalmanChain,
    KalmanOptions,
    _BatchKalmanNorm,
)

__all__ = [
    "bkn_layers",
    "convert_batchnorm",
    "describe_chain",
    "format_chain",
    "load_batchnorm_state_dict",
    "wire_chain",
]

_FEEDING_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS: set[Callable[..., Any]] = {
    torch.relu,
    torch.relu_,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    Tensor.relu,
    Tensor.relu_,
}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BKN_FOR_RANK = {2: BatchKalmanNorm1d, 3: BatchKalmanNorm1d, 4: BatchKalmanNorm2d, 5: BatchKalmanNorm3d}
_BKN_FOR_BN: dict[type[nn.Module], type[_BatchKalmanNorm]] = {
    nn.BatchNorm1d: BatchKalmanNorm1d,
    nn.BatchNorm2d: BatchKalmanNorm2d,
    nn.BatchNorm3d: BatchKalmanNorm3d,
}


class _ReluRecorder(TorchFunctionMode):
    def __init__(self, events: list[tuple[str, str, nn.Module | None, int]]) -> None:
        super().__init__()
        self.events = events

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _RELU_FUNCTIONS:
            self.events.append(("relu", "", None, 0))
        return func(*args, **(kwargs or {}))


@contextmanager
def _recording(model: nn.Module) -> Iterator[list[tuple[str, str, nn.Module | None, int]]]:
    """Record ("module", name, module, input rank) and ("relu", ...) events of one forward."""
    events: list[tuple[str, str, nn.Module | None, int]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (*_FEEDING_TYPES, *_BN_TYPES, _BatchKalmanNorm, *_RELU_MODULES)):

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any, _name: str = name) -> None:
                rank = inputs[0].dim() if inputs and isinstance(inputs[0], Tensor) else 0
                if isinstance(mod, _RELU_MODULES):
                    events.append(("relu", _name, mod, rank))
                else:
                    events.append(("module", _name, mod, rank))

            handles.append(module.register_forward_hook(hook))
    try:
        with _ReluRecorder(events):
            yield events
    finally:
        for handle in handles:
            handle.remove()


def _run_example(model: nn.Module, example_inputs: Any) -> None:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _channels(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    assert isinstance(layer, nn.modules.conv._ConvNd)
    return layer.in_channels, layer.out_channels


def _num_features(module: nn.Module) -> int:
    return int(module.num_features)  # type: ignore[arg-type]


Event = tuple[str, str, "nn.Module | None", int]


def _plan_links(
    events: list[Event], options: KalmanOptions | None
) -> tuple[list[str], dict[str, tuple[ChainLink, int, nn.Module | None]]]:
    """From recorded events, decide each normalization layer's link.

    Returns the chain order (first call of each layer) and, per layer, its link, the
    position of its predecessor (-1 for none) and its feeding layer.
    """
    norms: list[tuple[int, str, nn.Module]] = []  # (event index, name, module), first calls only
    seen: set[str] = set()
    for index, (kind, name, module, _rank) in enumerate(events):
        if kind == "module" and isinstance(module, (*_BN_TYPES, _BatchKalmanNorm)):
            if name in seen:
                warnings.warn(
                    f"normalization layer '{name}' runs more than once per forward; it is wired by its first call",
                    stacklevel=3,
                )
                continue
            seen.add(name)
            norms.append((index, name, module))
    order = [name for _, name, _ in norms]
    plans: dict[str, tuple[ChainLink, int, nn.Module | None]] = {}
    for position, (_, name, module) in enumerate(norms):
        if position == 0:
            first = ChainLink(name=name, predecessor=None, transition=None, feeding_layer=None, rectify=False)
            plans[name] = (first, -1, None)
            continue
        layer_options = options if options is not None else getattr(module, "options", KalmanOptions())
        plans[name] = _link_to(position, norms, events, layer_options)
    return order, plans


def _link_to(
    position: int,
    norms: list[tuple[int, str, nn.Module]],
    events: list[Event],
    options: KalmanOptions,
) -> tuple[ChainLink, int, nn.Module | None]:
    """Link norm ``position`` to a predecessor, a feeding layer and a transition.

    The predecessor is the previous norm in execution order, unless the feeding layer's
    input channels only match an earlier norm (e.g. a projection shortcut, whose input
    is the block input, not the residual branch): then the most recent such norm.
    """
    index, name, module = norms[position]
    c = _num_features(module)
    wanted = options.transition
    pred_pos = position - 1
    prev_index, _, _ = norms[pred_pos]
    window = range(prev_index + 1, index)
    feeding_index = max(
        (i for i in window if events[i][0] == "module" and isinstance(events[i][2], _FEEDING_TYPES)), default=-1
    )
    feeding: nn.Module | None = events[feeding_index][2] if feeding_index >= 0 else None
    note = ""
    if feeding is not None:
        c_in, _ = _channels(feeding)
        if c_in != _num_features(norms[pred_pos][2]):
            match = next((p for p in range(position - 2, -1, -1) if _num_features(norms[p][2]) == c_in), None)
            if match is not None:
                pred_pos = match
                note = f"predecessor chosen by channel match with feeding layer '{events[feeding_index][1]}'"
    pred_index, pred_name, pred_module = norms[pred_pos]
    c_prev = _num_features(pred_module)
    link = ChainLink(name=name, predecessor=pred_name, transition=wanted, feeding_layer=None, rectify=False, note=note)
    link.num_previous_features = c_prev
    if wanted in ("propagate", "sampled"):
        reason = ""
        if feeding is None:
            reason = f"no Conv/Linear runs between '{pred_name}' and '{name}'"
        else:
            c_in, c_out = _channels(feeding)
            if (c_in, c_out) != (c_prev, c):
                reason = (
                    f"feeding layer '{events[feeding_index][1]}' maps {c_in}->{c_out} channels, "
                    f"not '{pred_name}' ({c_prev}) -> '{name}' ({c})"
                )
        if not reason:
            link.feeding_layer = events[feeding_index][1]
            link.rectify = any(events[i][0] == "relu" for i in range(pred_index + 1, feeding_index))
            return link, pred_pos, feeding
        fallback = "identity" if c == c_prev else "learned"
        link.transition = fallback
        link.note = f"{wanted} unavailable ({reason}); fell back to {fallback}"
        return link, pred_pos, None
    if wanted == "identity" and c != c_prev:
        raise ChainWiringError(
            f"transition='identity' needs equal channel counts, but '{pred_name}' has {c_prev} and "
            f"'{name}' has {c}; use transition='learned' or 'propagate'"
        )
    return link, pred_pos, None


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def _bkn_from_batchnorm(
    bn: nn.modules.batchnorm._NormBase, rank: int, options: KalmanOptions, name: str
) -> _BatchKalmanNorm:
    cls = _BKN_FOR_BN.get(type(bn)) or _BKN_FOR_RANK.get(rank)
    if cls is None:
        raise BKNInputError(f"cannot tell the dimensionality of '{name}' ({type(bn).__name__}, input rank {rank})")
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
        **asdict(options),
    )
    with torch.no_grad():
        for attribute in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            source, target = getattr(bn, attribute), getattr(new, attribute)
            if source is not None and target is not None:
                target.copy_(source)
    new.train(bn.training)
    return new


def convert_batchnorm(
    model: nn.Module, example_inputs: Any, options: KalmanOptions | None = None, **option_overrides: Any
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (and SyncBatchNorm, by SyncBatchKalmanNorm) with BKN; wire the chain.

    model: converted in place (the converted model is also returned, which matters only
    when ``model`` itself is a BatchNorm). example_inputs: a tensor, a tuple of
    positional inputs, or a dict of keyword inputs for one forward pass (run in eval
    mode under no_grad). Options: a :class:`KalmanOptions` and/or its fields as keywords.
    Weights, biases and running statistics are carried over; BKN layers already in the
    model are kept and wired too. A model without normalization layers is returned
    unchanged with a warning.
    """
    options = _merge_options(options, option_overrides)
    with _recording(model) as events:
        _run_example(model, example_inputs)
    ranks = {name: rank for kind, name, _, rank in events if kind == "module"}
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, (*_BN_TYPES, _BatchKalmanNorm))]
    if not norms:
        warnings.warn(
            f"{type(model).__name__} has no BatchNorm or BatchKalmanNorm layers; returned unchanged", stacklevel=2
        )
        return model
    synchronised: dict[str, Any] = {}  # SyncBatchNorm name -> its process group
    for name, module in norms:
        if isinstance(module, _BN_TYPES):
            if name not in ranks:
                warnings.warn(
                    f"'{name}' did not run on the example inputs; it is converted but left unwired", stacklevel=2
                )
            if isinstance(module, nn.SyncBatchNorm):
                synchronised[name] = module.process_group
            bkn = _bkn_from_batchnorm(module, ranks.get(name, 0), options, name)
            bkn.link.name = name
            model = _replace_module(model, name, bkn)
    model = wire_chain(model, example_inputs, options)
    if synchronised:
        # SyncBatchNorm keeps synchronised statistics: it becomes SyncBatchKalmanNorm (same group).
        from bkn_export.distributed import convert_sync_batchkalmannorm

        for name, group in synchronised.items():
            model = _replace_module(model, name, convert_sync_batchkalmannorm(model.get_submodule(name), group))
    return model


def _merge_options(options: KalmanOptions | None, overrides: dict[str, Any]) -> KalmanOptions:
    if isinstance(overrides.get("options"), KalmanOptions):
        options = overrides.pop("options")
    base = options or KalmanOptions()
    if not overrides:
        return base
    fields = {**base.__dict__, **overrides}
    unknown = set(fields) - set(KalmanOptions.__dataclass_fields__)
    if unknown:
        raise KalmanOptionsError(
            f"unknown BKN options {sorted(unknown)}; known: {sorted(KalmanOptions.__dataclass_fields__)}"
        )
    return KalmanOptions(**fields)


def wire_chain(model: nn.Module, example_inputs: Any, options: KalmanOptions | None = None) -> nn.Module:
    """Wire the BKN layers of ``model`` into one Kalman chain by execution order.

    Use it for models built with BKN layers directly. Layers keep their own options
    unless ``options`` is given. Re-wiring replaces earlier BKN parameters.
    """
    with _recording(model) as events:
        _run_example(model, example_inputs)
    order, plans = _plan_links(events, options)
    chain = KalmanChain(order)
    modules = dict(model.named_modules())
    for position, name in enumerate(order):
        layer = modules[name]
        if not isinstance(layer, _BatchKalmanNorm):
            raise ChainWiringError(f"'{name}' is a {type(layer).__name__}; convert it with convert_batchnorm first")
        link, predecessor_position, feeding = plans[name]
        if options is not None:
            layer.options = options
        layer.wire(chain, position, link, predecessor_position, feeding)
    for name, module in modules.items():
        if isinstance(module, _BatchKalmanNorm) and name not in plans:
            module.link = ChainLink(name=name, predecessor=None, transition=None, feeding_layer=None, rectify=False)
    return model


def bkn_layers(model: nn.Module) -> list[tuple[str, _BatchKalmanNorm]]:
    """(name, layer) of every BKN layer, in chain order where wired."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchKalmanNorm)]
    return sorted(layers, key=lambda item: (item[1]._position < 0, item[1]._position))


def describe_chain(model: nn.Module) -> list[ChainLink]:
    """Each BKN layer by module name: predecessor, transition mode, feeding layer, notes."""
    return [
        layer.link if layer.link.name else ChainLink(name, None, None, None, False) for name, layer in bkn_layers(model)
    ]


def format_chain(model: nn.Module) -> str:
    """The chain as a plain-text table (also what ``bkn`` prints)."""
    rows = [("layer", "predecessor", "transition", "feeding layer", "relu", "note")]
    for link in describe_chain(model):
        rows.append(
            (
                link.name,
                link.predecessor or "-",
                link.transition or "batchnorm (first in chain)",
                link.feeding_layer or "-",
                "yes" if link.rectify else "no",
                link.note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


_BKN_ONLY_SUFFIXES = ("prior_weight_logit", "process_noise_raw", "transition_matrix", "_extra_state")


def load_batchnorm_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Load a plain BatchNorm checkpoint into a converted model.

    Every key of ``state_dict`` must exist in ``model``; the only keys allowed to be
    missing are BKN-only ones (gain, process noise, transition, wiring), which keep
    their initial values. Returns the list of BKN-only keys left at their initial values.
    """
    result = model.load_state_dict(state_dict, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.endswith(_BKN_ONLY_SUFFIXES)]
    if unexpected or missing:
        raise CheckpointError(
            "checkpoint does not fit the converted model: "
            + (f"unexpected keys {unexpected}; " if unexpected else "")
            + (f"missing keys {missing}; " if missing else "")
            + "was it saved from the same architecture?"
        )
    return [k for k in result.missing_keys if k.endswith(_BKN_ONLY_SUFFIXES)]
