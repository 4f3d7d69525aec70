"""BatchNorm → BKN conversion and checkpoint loading.

Wiring the Kalman chain (``wire_chain``, ``describe_chain``, ``format_chain``,
``bkn_layers``) lives in :mod:`bkn_export.chain`, by the data flow of one example
forward; the names are re-exported here for backward compatibility.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from bkn_export.chain import bkn_layers, describe_chain, format_chain, wire_chain
from bkn_export.chain.scope import move_root
from bkn_export.conversion_guard import ConversionGuard
from bkn_export.errors import BKNInputError, CheckpointError, ConversionError, KalmanOptionsError
from bkn_export.nn import (
    BKN_PARAMETERS,
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    KalmanOptions,
    _BatchKalmanNorm,
)
from bkn_export.norm_act import (
    BatchKalmanNormAct1d,
    BatchKalmanNormAct2d,
    BatchKalmanNormAct3d,
    adapter_for,
    synchronise_submodules,
)

__all__ = [
    "bkn_layers",
    "convert_batchnorm",
    "describe_chain",
    "format_chain",
    "load_batchnorm_state_dict",
    "wire_chain",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BKN_FOR_RANK = {2: BatchKalmanNorm1d, 3: BatchKalmanNorm1d, 4: BatchKalmanNorm2d, 5: BatchKalmanNorm3d}
_BKN_FOR_BN: dict[type[nn.Module], type[_BatchKalmanNorm]] = {
    nn.BatchNorm1d: BatchKalmanNorm1d,
    nn.BatchNorm2d: BatchKalmanNorm2d,
    nn.BatchNorm3d: BatchKalmanNorm3d,
}

_SYNCHRONISABLE = (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    BatchKalmanNormAct1d,
    BatchKalmanNormAct2d,
    BatchKalmanNormAct3d,
)


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
    """The BKN layer replacing ``bn``: its class (by type, adapter or input rank), state and extra submodules.

    Raises ConversionError for a BatchNorm subclass whose ``forward`` adds behaviour that no
    adapter carries over (:func:`bkn_export.norm_act.adapter_for`).
    """
    adapter = adapter_for(bn, name)
    if adapter is not None:
        try:
            cls: type[_BatchKalmanNorm] | None = adapter.target(rank)
        except KeyError:
            cls = None
    else:
        cls = next((bkn for bn_type, bkn in _BKN_FOR_BN.items() if isinstance(bn, bn_type)), None)
        cls = cls or _BKN_FOR_RANK.get(rank)
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
    carried = adapter.submodules if adapter is not None else ()
    for child in carried:
        if isinstance(getattr(bn, child, None), nn.Module):
            new.add_module(child, getattr(bn, child))
    left = [child for child, _ in bn.named_children() if child not in carried]
    if left:
        why = "its adapter does not carry over" if adapter is not None else "its forward (BatchNorm's own) does not use"
        warnings.warn(
            f"'{name}' ({type(bn).__name__}) has submodules {left} that {why}; the BKN layer does not keep them",
            stacklevel=3,
        )
    new.train(bn.training)
    return new


def _working_copy(model: nn.Module, norm_names: list[str]) -> nn.Module:
    """A deep copy of ``model`` sharing every parameter, buffer and module that holds no normalization layer.

    Conversion replaces and wires modules in this copy; its new layers are then put into
    ``model`` by name, so ``model`` changes only when the guard passed, and the modules it
    keeps (Conv, Linear, activations: the feeding layers the chain refers to) stay the
    same objects, as do their parameters (an optimizer built before conversion keeps them).
    """
    modules = dict(model.named_modules())
    holding = {id(m) for name in norm_names for prefix, m in modules.items() if _within(name, prefix)}
    memo: dict[int, Any] = {id(m): m for m in modules.values() if id(m) not in holding}
    memo.update({id(t): t for t in (*model.parameters(), *model.buffers())})
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # deepcopy raises whatever an attribute's __deepcopy__/__reduce__ raises
        raise ConversionError(
            f"cannot copy {type(model).__name__} to convert it without touching the original ({error}); "
            "convert_batchnorm converts a copy and swaps the new layers in only after checking them. "
            "Make the model deep-copyable (copy.deepcopy), e.g. by moving non-copyable attributes out of it."
        ) from error


def _within(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or lies below it ("" is the root)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


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

    BatchNorm subclasses: see :mod:`bkn_export.norm_act` (timm's ``BatchNormAct2d`` keeps
    its ``drop``/``act``; a subclass overriding ``forward`` without an adapter is refused).
    The conversion guard (:mod:`bkn_export.conversion_guard`) checks every converted layer
    against its original on the input it saw in the example forward, in eval and train
    mode, and the whole model's eval-mode outputs; on a difference it raises
    :class:`~bkn_export.errors.ConversionError` and ``model`` is left exactly as it was.
    """
    options = _merge_options(options, option_overrides)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, (*_BN_TYPES, _BatchKalmanNorm))}
    if not originals:
        warnings.warn(
            f"{type(model).__name__} has no BatchNorm or BatchKalmanNorm layers; returned unchanged", stacklevel=2
        )
        return model
    guard = ConversionGuard.record(model, example_inputs, list(originals))
    candidate = _working_copy(model, list(originals))
    synchronised: dict[str, Any] = {}  # SyncBatchNorm name -> its process group
    converted: list[str] = []
    for name, module in list(candidate.named_modules()):
        if isinstance(module, _BN_TYPES):
            if name not in guard.inputs:
                warnings.warn(
                    f"'{name}' did not run on the example inputs; it is converted but left unwired and unchecked",
                    stacklevel=2,
                )
            if isinstance(module, nn.SyncBatchNorm):
                synchronised[name] = module.process_group
            rank = guard.inputs[name].dim() if name in guard.inputs else 0
            bkn = _bkn_from_batchnorm(module, rank, options, name)
            candidate = _replace_module(candidate, name, bkn)
            converted.append(name)
    candidate = wire_chain(candidate, example_inputs, options)
    guard.check_layers(originals, {name: candidate.get_submodule(name) for name in converted})
    if synchronised:
        # SyncBatchNorm keeps synchronised statistics: it becomes SyncBatchKalmanNorm (same group).
        from bkn_export.distributed import convert_sync_batchkalmannorm

        for name, group in synchronised.items():
            layer = candidate.get_submodule(name)
            if type(layer) not in _SYNCHRONISABLE:
                raise ConversionError(
                    f"'{name}' ({type(originals[name]).__name__}) is synchronised, but its adapter builds a "
                    f"{type(layer).__name__}, which has no synchronised form; convert it to a BatchKalmanNorm*d "
                    "or BatchKalmanNormAct*d, or replace it with a non-synchronised BatchNorm before converting"
                )
            sync = synchronise_submodules(convert_sync_batchkalmannorm(layer, group), layer)
            candidate = _replace_module(candidate, name, sync)
    guard.check_model(candidate, example_inputs)
    if "" in originals:  # the model is itself a normalization layer
        return candidate
    for name in originals:
        _replace_module(model, name, candidate.get_submodule(name))
    move_root(candidate, model)  # the chain was wired on the copy; its forwards are now model's
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


_BKN_ONLY_SUFFIXES = (*BKN_PARAMETERS, "_extra_state")


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
