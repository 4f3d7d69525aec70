"""BatchNorm → BKN conversion and checkpoint loading.

Wiring the Kalman chain (``wire_chain``, ``describe_chain``, ``format_chain``,
``bkn_layers``) lives in :mod:`bkn_export.chain`, by the data flow of one example
forward; the names are re-exported here for backward compatibility.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bkn_export.chain import bkn_layers, describe_chain, format_chain, wire_chain
from bkn_export.chain.scope import detach_roots, move_root
from bkn_export.conversion_guard import ConversionGuard, layers_using_prior_in_eval
from bkn_export.copying import copy_module
from bkn_export.distributed import process_group_memo
from bkn_export.errors import BKNInputError, CheckpointError, ConversionError, KalmanOptionsError
from bkn_export.module_hooks import take_over_hooks
from bkn_export.nn import (
    BKN_PARAMETERS,
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    BatchNormCheckpointWarning,
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
    "BatchKalmanNormBase",
    "bkn_layers",
    "convert_batchnorm",
    "describe_chain",
    "format_chain",
    "load_batchnorm_state_dict",
    "wire_chain",
]

#: The common base class of every BKN layer (BatchKalmanNorm1d/2d/3d, SyncBatchKalmanNorm and the
#: fused BatchKalmanNormAct*d). BKN layers are not ``nn.modules.batchnorm._BatchNorm`` instances:
#: code that finds BatchNorms by isinstance (freezing BN, weight-decay exclusion, fusion passes)
#: must test this class too.
BatchKalmanNormBase = _BatchKalmanNorm

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
    parametrized = _parametrized_names(bn)
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    # affine=True with γ and β set to None normalizes without an affine (PyTorch passes None): so does the layer,
    # rather than gaining a trainable γ = 1, β = 0 the model never had
    removed = [attribute for attribute in ("weight", "bias") if bn.affine and getattr(bn, attribute, None) is None]
    if len(removed) == 1:
        raise ConversionError(
            f"'{name}' ({type(bn).__name__}) has affine=True but its {removed[0]} set to None (the other kept): a BKN "
            "layer has both or neither; set both to None (no affine) or give it a "
            f"{removed[0]} (ones for weight, zeros for bias) before converting"
        )
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine and not removed,
        track_running_stats=bn.track_running_stats,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
        **asdict(options),
    )
    _take_over_state(bn, new, parametrized)
    carried = adapter.submodules if adapter is not None else ()
    for child in carried:
        if isinstance(getattr(bn, child, None), nn.Module):
            new.add_module(child, getattr(bn, child))
    left = [child for child, _ in bn.named_children() if child not in carried and child != "parametrizations"]
    if left:
        why = "its adapter does not carry over" if adapter is not None else "its forward (BatchNorm's own) does not use"
        warnings.warn(
            f"'{name}' ({type(bn).__name__}) has submodules {left} that {why}; the BKN layer does not keep them",
            stacklevel=4,
        )
    extra = _extra_state_names(bn)
    if extra:
        warnings.warn(
            f"'{name}' ({type(bn).__name__}) has parameters / buffers {extra} beyond BatchNorm's; the BKN layer "
            "does not keep them (a checkpoint saved before converting holds them as unexpected keys: drop those "
            "keys, or replace the module before converting)",
            stacklevel=4,
        )
    take_over_hooks(bn, new, name)
    new.train(bn.training)
    return new


def _extra_state_names(bn: nn.Module) -> list[str]:
    """The module's own parameters and buffers besides BatchNorm's (a subclass's additions), by name."""
    own = {**bn._parameters, **bn._buffers}
    return [key for key, value in own.items() if value is not None and key not in _STATE]


_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: Why a BatchNorm whose instance holds a ``forward`` cannot be converted, and what to do.
INSTANCE_FORWARD_HINT = (
    "Its forward is replaced on the instance (module.forward = ...; accelerate's hooks set one), which the converted "
    "layer does not carry over. Put what the new forward adds into a module of its own around the BatchNorm (or a "
    "BatchNorm subclass with an adapter: bkn_export.norm_act.register_batchnorm_adapter), or restore the forward "
    "(del module.forward; accelerate.hooks.remove_hook_from_module), before converting."
)


def _parametrized_names(bn: nn.Module) -> tuple[str, ...]:
    """The names of ``bn``'s tensors under ``torch.nn.utils.parametrize`` (e.g. ``("weight",)``)."""
    if not parametrize.is_parametrized(bn):
        return ()
    return tuple(bn.parametrizations.keys())  # type: ignore[union-attr, operator]


def _take_over_state(bn: nn.Module, new: _BatchKalmanNorm, parametrized: tuple[str, ...]) -> None:
    """Give ``new`` the very parameter and buffer objects of ``bn`` (as ``nn.SyncBatchNorm.convert_sync_batchnorm``).

    The objects, not copies of their values: ``requires_grad`` (a frozen BatchNorm stays
    frozen), dtype and device survive, and an optimizer or EMA built before conversion keeps
    updating the tensors the converted layer uses. A parametrized tensor
    (``torch.nn.utils.parametrize``, e.g. a softplus-constrained weight) keeps its
    constraint: ``bn``'s ``ParametrizationList`` (holding the unconstrained ``original`` and
    the parametrization modules) is moved to ``new`` under the same name, so ``new.weight``
    is computed as ``bn.weight`` was and the state-dict keys
    (``parametrizations.weight.original``) are unchanged. ``bn`` itself is not modified.
    """
    for attribute in _STATE:
        if attribute in parametrized:
            # Register a placeholder to make `new` parametrized at `attribute` (a public-API way to
            # get the property), then put bn's own ParametrizationList in its place.
            parametrize.register_parametrization(new, attribute, nn.Identity(), unsafe=True)
            new.parametrizations[attribute] = bn.parametrizations[attribute]  # type: ignore[index, operator]
            continue
        source, target = getattr(bn, attribute, None), getattr(new, attribute, None)
        if source is not None and target is not None:
            setattr(new, attribute, source)


def _working_copy(model: nn.Module, norm_names: list[str]) -> nn.Module:
    """A deep copy of ``model`` sharing every parameter, buffer and module that holds no normalization layer.

    Conversion replaces and wires modules in this copy; its new layers are then put into
    ``model`` by name, so ``model`` changes only when the guard passed, and the modules it
    keeps (Conv, Linear, activations: the feeding layers the chain refers to) stay the
    same objects, as do their parameters (an optimizer built before conversion keeps them).
    """
    # Every name of every module (remove_duplicate=False): a module registered under two names (a block that
    # another container also holds, as MONAI's DynUNet does) holds a normalization if any of its names does.
    named = list(model.named_modules(remove_duplicate=False))
    norms = {id(model.get_submodule(name)) for name in norm_names}
    norm_paths = [path for path, module in named if id(module) in norms]
    holding = {id(m) for prefix, m in named if any(_within(name, prefix) for name in norm_paths)}
    memo: dict[int, Any] = {id(m): m for _, m in named if id(m) not in holding}
    memo.update({id(t): t for t in (*model.parameters(), *model.buffers())})
    memo.update(process_group_memo(model))  # a SyncBatchNorm's sub-group is shared, as it cannot be copied
    try:
        return copy_module(model, memo)
    except Exception as error:  # deepcopy raises whatever an attribute's __deepcopy__/__reduce__ raises
        raise ConversionError(
            f"cannot copy {type(model).__name__} to convert it without touching the original ({error}); "
            "convert_batchnorm converts a copy and swaps the new layers in only after checking them. "
            "Make the model deep-copyable (copy.deepcopy), e.g. by moving non-copyable attributes out of it."
        ) from error


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name under which each module of ``model`` is registered, by ``id``: one name for most
    modules, several for a module that two containers hold (``named_modules()`` lists it once)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


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
    Each new layer takes over its BatchNorm's own parameter and buffer objects (so
    ``requires_grad`` survives and an optimizer built before conversion keeps them; the BKN parameters a wired
    layer gains are new objects, which such an optimizer never sees: build it after conversion), its
    ``torch.nn.utils.parametrize`` parametrizations and its forward/backward hooks (state-dict
    hooks are not carried over: warned); BKN layers already in the model are kept and wired
    too (wiring gives those with a predecessor new BKN parameters at their initial values: warned where they
    held some). A BatchNorm registered under several names (a module two containers hold) becomes one BKN
    layer under all of them, so what was shared stays shared. A model without normalization layers is
    returned unchanged with a warning.

    BatchNorm subclasses: see :mod:`bkn_export.norm_act` (timm's ``BatchNormAct2d`` keeps
    its ``drop``/``act``; a subclass overriding ``forward`` without an adapter is refused).
    The conversion guard (:mod:`bkn_export.conversion_guard`) checks every converted layer
    against its original on the input it saw in the example forward, in eval and train
    mode, and the whole model's eval-mode outputs; on a difference it raises
    :class:`~bkn_export.errors.ConversionError` and ``model`` is left exactly as it was.

    The example forward runs three times on the model (the guard's reference, the chain's recording, the guard's final
    check) and twice more on a deep copy of it without forward hooks, in eval and train mode
    (:mod:`bkn_export.chain.train_probe`: which modules run in one mode only; the copy doubles the model's memory
    for the time of those two forwards, and global forward hooks see them).
    Every buffer of the model outside its normalization layers (a quantization observer's range, a counter) is put
    back to its value from before the conversion, before the final check and after it (whether the conversion
    succeeds or raises); state a module keeps in plain Python attributes (a list of features it taps) is not.
    """
    options = _merge_options(options, option_overrides)
    # Called under torch.inference_mode(), the new BKN parameters would be inference tensors, which no training
    # step can save for backward: they are made, and the chain wired, outside it.
    with torch.inference_mode(False), _buffers_kept(model) as restore:
        return _convert(model, example_inputs, options, restore)


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Yield a function that puts every buffer of ``model`` back to its value on entry; it is called on exit too.

    The example forwards run the model's own modules (the working copy shares every module without a
    normalization): one that updates a buffer in eval mode (``torch.ao`` observers, fake-quantize ranges) would
    otherwise come out of the conversion changed, and answer the guard's final check differently from its first
    forward."""
    with torch.no_grad():
        saved = [
            (buffer, buffer.detach().clone())
            for module in model.modules()
            if not isinstance(module, (*_BN_TYPES, _BatchKalmanNorm))  # their statistics are the conversion's to carry
            for buffer in module.buffers(recurse=False)
            if buffer is not None and not nn.parameter.is_lazy(buffer)
        ]

    def restore() -> None:
        with torch.no_grad():
            for buffer, value in saved:
                if buffer.shape == value.shape and buffer.dtype == value.dtype:
                    buffer.copy_(value)

    try:
        yield restore
    finally:
        restore()


#: A scripted submodule's ``original_name`` where it was one of the BatchNorms the conversion replaces.
_SCRIPTED_BATCHNORM_NAMES = frozenset(kind.__name__ for kind in _BN_TYPES)

#: Where torch's quantized modules live (their BatchNorms subclass _BatchNorm directly).
_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def _refuse_unconvertible(model: nn.Module) -> None:
    """Models whose BatchNorms the conversion cannot see as such: a TorchScript module (its submodules are
    RecursiveScriptModules, so it would be "without BatchNorm" and returned unchanged) or one inside the model, an
    uninitialised
    ``nn.LazyBatchNorm*d`` (materialised into a BatchNorm only by the first forward), a BatchNorm holding one running
    statistic and not the other (it fails in eval mode itself: the model's own error named no layer) and a direct
    subclass of
    ``_BatchNorm`` (no dimensionality: it was "without BatchNorm" alone, and beside BatchNorm2d layers the chain's
    wiring then told the user to convert it with convert_batchnorm first)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise BKNInputError(
            f"{type(model).__name__}: convert_batchnorm takes the nn.Module, not a TorchScript module "
            "(torch.jit.script / torch.jit.load): convert the eager model, then script or export it"
        )
    scripted = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.jit.ScriptModule) and getattr(m, "original_name", "") in _SCRIPTED_BATCHNORM_NAMES
    ]
    if scripted:
        raise BKNInputError(
            f"{', '.join(repr(n) for n in scripted)}: a BatchNorm inside a TorchScript submodule (torch.jit.script "
            "/ torch.jit.load), which convert_batchnorm cannot replace: convert the eager submodule, then script it"
        )
    lazy = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._LazyNormBase)]
    if lazy:
        raise BKNInputError(
            f"{', '.join(repr(n) for n in lazy)}: uninitialised lazy BatchNorm (nn.LazyBatchNorm*d); run one forward "
            "of the model (which gives it its number of features) before converting"
        )
    halved = [
        f"'{name}' ({'running_mean' if m.running_mean is None else 'running_var'} is None)"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None) != (m.running_var is None)
    ]
    if halved:
        raise ConversionError(
            f"{', '.join(halved)}: a BatchNorm with one running statistic and not the other, which BatchNorm itself "
            "cannot run in eval mode (F.batch_norm needs both buffers or neither). Before converting, give it the "
            "missing buffer (running_mean zeros or running_var ones, then re-estimate both with "
            "bkn_export.update_bn), or set both to None with track_running_stats=False and num_batches_tracked=None "
            "(a layer without running statistics)"
        )
    bare = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _BN_TYPES)
    }
    quantized = [name for name, m in bare.items() if type(m).__module__.startswith(_QUANTIZED_MODULES)]
    if quantized:
        raise ConversionError(
            f"{', '.join(repr(n) for n in quantized)}: a quantized BatchNorm (torch.ao quantization), which has no "
            "BatchKalmanNorm counterpart: convert_batchnorm takes a float model; convert it before quantizing, "
            "or remove the quantized module"
        )
    if bare:
        kinds = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in bare.values()})
        raise ConversionError(
            f"{', '.join(repr(n) for n in bare)}: {', '.join(kinds)} subclasses torch.nn.modules.batchnorm._BatchNorm "
            "directly, not nn.BatchNorm1d / 2d / 3d or nn.SyncBatchNorm: convert_batchnorm cannot tell which "
            "BatchKalmanNorm1d / 2d / 3d replaces it, nor what its class adds. Make it subclass the nn.BatchNorm*d "
            "of its input (its forward() is then checked like any BatchNorm subclass's), or replace the module "
            "before converting"
        )


def _warn_frozen(model: nn.Module) -> None:
    """Warn, naming them, about frozen BatchNorms (torchvision's, Hugging Face's and detectron2's
    ``FrozenBatchNorm2d``: fixed statistics and affine, found by class name, as they share no base class): they are
    left as they are, since they use no batch statistics, and a chain that reaches one computing its affine from
    buffers ends there (the layer after it says so)."""
    frozen = [
        (name, type(module).__name__)
        for name, module in model.named_modules()
        if "FrozenBatchNorm" in type(module).__name__ and not isinstance(module, nn.modules.batchnorm._NormBase)
    ]
    if frozen:
        shown = ", ".join(f"'{name}' ({kind})" for name, kind in frozen[:5]) + (" ..." if len(frozen) > 5 else "")
        warnings.warn(
            f"{len(frozen)} frozen BatchNorm(s) left as they are: {shown}. They use fixed statistics in train mode "
            "too, so there is nothing for BKN to estimate; to train one as a BKN layer, replace it with the "
            "nn.BatchNorm*d holding its state (weight, bias, running_mean, running_var) before converting",
            stacklevel=4,
        )


def _convert(
    model: nn.Module, example_inputs: Any, options: KalmanOptions, restore_buffers: Callable[[], None]
) -> nn.Module:
    """:func:`convert_batchnorm` with its options merged; ``restore_buffers`` puts the model's buffers back to their
    values before the conversion (called before the guard's final forward)."""
    _refuse_unconvertible(model)
    _warn_frozen(model)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, (*_BN_TYPES, _BatchKalmanNorm))}
    if not originals:
        warnings.warn(
            f"{type(model).__name__} has no BatchNorm or BatchKalmanNorm layers; returned unchanged", stacklevel=3
        )
        return model
    # Before the guard's example forward: torch 2.11's F.batch_norm raises a bare ValueError for eps <= 0 even in
    # eval mode (2.13 only in train mode), which would hide this error naming the layer.
    for name, source in originals.items():
        if isinstance(source, _BN_TYPES) and "forward" in source.__dict__:
            # Before any forward: the guard's copies would call the original through the instance's forward (a
            # closure over it), and a train-mode check would update its running statistics before refusing.
            raise ConversionError(f"'{name}' ({type(source).__name__}) cannot be converted. {INSTANCE_FORWARD_HINT}")
        if isinstance(source, _BN_TYPES) and not source.eps > 0:
            raise ConversionError(
                f"'{name}' ({type(source).__name__}) has eps={source.eps}: PyTorch's BatchNorm refuses to train "
                "with eps <= 0 (the conversion checks each layer in train mode), and a channel of equal values "
                "would divide by zero; set its eps > 0 (BatchNorm's default is 1e-5) before converting"
            )
    guard = ConversionGuard.record(model, example_inputs, list(originals))
    candidate = _working_copy(model, list(originals))
    candidate_aliases = _aliases(candidate)
    synchronised: dict[str, Any] = {}  # SyncBatchNorm name -> its process group
    converted: list[str] = []
    for name, module in list(candidate.named_modules()):
        if isinstance(module, _BN_TYPES):
            if name not in guard.inputs:
                warnings.warn(
                    f"'{name}' did not run on the example inputs; it is converted but left unwired and unchecked",
                    stacklevel=3,
                )
            if isinstance(module, nn.SyncBatchNorm):
                synchronised[name] = module.process_group
            rank = guard.inputs[name].dim() if name in guard.inputs else 0
            # Built from the original module: the new layer takes over its parameter, buffer,
            # submodule and hook objects (the working copy holds deep copies of the latter two).
            source = originals[name]
            assert isinstance(source, _BN_TYPES)  # the same module tree: the copy's BatchNorm is a copy of it
            if isinstance(source, nn.SyncBatchNorm) and _parametrized_names(source):
                raise ConversionError(
                    f"'{name}' is a parametrized SyncBatchNorm (torch.nn.utils.parametrize on "
                    f"{list(_parametrized_names(source))}); SyncBatchKalmanNorm cannot keep the parametrization. "
                    "Replace it with a plain nn.BatchNorm*d holding the same state, or remove "
                    "the parametrization (parametrize.remove_parametrizations) before converting"
                )
            bkn = _bkn_from_batchnorm(source, rank, options, name)
            for alias in candidate_aliases[id(module)]:  # one layer under each name the BatchNorm had
                candidate = _replace_module(candidate, alias, bkn)
            converted.append(name)
    candidate = wire_chain(candidate, example_inputs, options)
    restore_buffers()  # the guard's final forward starts from the buffers its first one saw
    try:
        candidate = _check_and_synchronise(candidate, originals, converted, synchronised, guard, example_inputs)
    except BaseException:
        # The copy shares every module without a normalization with `model`: the path hooks the
        # wiring put there must not outlive a refused conversion.
        detach_roots(candidate)
        raise
    if "" in originals:  # the model is itself a normalization layer
        return candidate
    model_aliases = _aliases(model)
    for name, original in originals.items():
        for alias in model_aliases[id(original)]:
            _replace_module(model, alias, candidate.get_submodule(name))
    move_root(candidate, model)  # the chain was wired on the copy; its forwards are now model's
    _warn_about_eval_batch_statistics(model)
    return model


def _warn_about_eval_batch_statistics(model: nn.Module) -> None:
    """Name the converted layers whose eval outputs differ from their BatchNorm's by design: without running
    statistics (``track_running_stats=False``) a layer normalizes by its batch statistics in eval mode too, and a
    wired one blends them with its Kalman prior (the guard compared the model with their prior weight at 0)."""
    blended = [name for name, _ in layers_using_prior_in_eval(model)]
    if not blended:
        return
    shown = ", ".join(repr(name) for name in blended[:5]) + (
        f" and {len(blended) - 5} more" if len(blended) > 5 else ""
    )
    warnings.warn(
        f"{len(blended)} converted layer(s) without running statistics (track_running_stats=False: {shown}) "
        "normalize by their batch statistics in eval mode too, blended with their Kalman prior: the converted "
        "model's eval outputs differ from the BatchNorm model's by design (the conversion checked them with that "
        "prior's weight held at 0). To keep BatchNorm's eval outputs, give those layers running statistics "
        "(track_running_stats=True) before converting, or run eval under "
        "bkn_export.conversion_guard.prior_off([...those layers...])",
        RuntimeWarning,
        stacklevel=4,
    )


def _check_and_synchronise(
    candidate: nn.Module,
    originals: Mapping[str, nn.Module],
    converted: list[str],
    synchronised: Mapping[str, Any],
    guard: ConversionGuard,
    example_inputs: Any,
) -> nn.Module:
    """The guard's per-layer checks, SyncBatchNorm → SyncBatchKalmanNorm, then the whole-model check."""
    guard.check_layers(originals, {name: candidate.get_submodule(name) for name in converted})
    if synchronised:
        # SyncBatchNorm keeps synchronised statistics: it becomes SyncBatchKalmanNorm (same group).
        from bkn_export.distributed import synchronised_layer

        for name, group in synchronised.items():
            layer = candidate.get_submodule(name)
            if type(layer) not in _SYNCHRONISABLE or not isinstance(layer, _BatchKalmanNorm):
                raise ConversionError(
                    f"'{name}' ({type(originals[name]).__name__}) is synchronised, but its adapter builds a "
                    f"{type(layer).__name__}, which has no synchronised form; convert it to a BatchKalmanNorm*d "
                    "or BatchKalmanNormAct*d, or replace it with a non-synchronised BatchNorm before converting"
                )
            sync = synchronise_submodules(synchronised_layer(layer, group), layer)
            take_over_hooks(layer, sync, name)
            candidate = _replace_module(candidate, name, sync)
    guard.check_model(candidate, example_inputs)
    return candidate


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


#: The state-dict key endings of entries that a BatchNorm model has no counterpart for.
BKN_ONLY_SUFFIXES = (*BKN_PARAMETERS, "_extra_state")


def load_batchnorm_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Load a plain BatchNorm checkpoint into a converted model.

    Every key of ``state_dict`` must exist in ``model`` with the same tensor shape; the only
    keys allowed to be missing are BKN-only ones (gain, process noise, transition, wiring),
    which keep their initial values, and ``num_batches_tracked`` where ``nn.BatchNorm`` itself
    would fill it in (a checkpoint saved before PyTorch 0.4.1, as old model-zoo weights are: no
    such key and no module version ≥ 2 in the checkpoint's metadata), which keeps the model's
    current count as BatchNorm's loader does. Returns the list of keys left at the model's
    values (those two kinds). A checkpoint that does not fit raises :class:`CheckpointError`
    naming the keys (and a ``module.`` prefix left by ``DataParallel`` / DDP) before anything
    is loaded: the model is left as it was.
    """
    own = model.state_dict()
    saved_by_bkn = [k for k in state_dict if k.endswith(BKN_ONLY_SUFFIXES)]
    if saved_by_bkn:
        raise CheckpointError(
            f"the checkpoint was saved from a BKN model (it has BKN keys: {saved_by_bkn[:3]}"
            + (" ..." if len(saved_by_bkn) > 3 else "")
            + "), not a BatchNorm one; load it with model.load_state_dict(state_dict), which checks its wiring "
            "(nothing was loaded)"
        )
    unexpected = [k for k in state_dict if k not in own]
    kept = [k for k in own if k not in state_dict and batchnorm_fills_in(k, state_dict)]
    missing = [k for k in own if k not in state_dict and not k.endswith(BKN_ONLY_SUFFIXES) and k not in kept]
    resized = [
        f"{k} {tuple(v.shape)} (the model's {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and isinstance(v, Tensor) and isinstance(own[k], Tensor) and v.shape != own[k].shape
    ]
    if unexpected or missing or resized:
        raise CheckpointError(
            "checkpoint does not fit the converted model (nothing was loaded): "
            + (f"{len(unexpected)} unexpected key(s) ({summarize_keys(unexpected)}); " if unexpected else "")
            + (f"{len(missing)} missing key(s) ({summarize_keys(missing)}); " if missing else "")
            + (f"other shapes: {summarize_keys(resized)}; " if resized else "")
            + module_prefix_hint(unexpected, own)
            + "was it saved from the same architecture?"
        )
    with warnings.catch_warnings():  # the layers' pointer to this very function
        warnings.simplefilter("ignore", BatchNormCheckpointWarning)
        result = model.load_state_dict(state_dict, strict=False)
    return [k for k in result.missing_keys if k.endswith(BKN_ONLY_SUFFIXES) or k in kept]


_COUNT_KEY = "num_batches_tracked"


def batchnorm_fills_in(key: str, state_dict: Mapping[str, Any]) -> bool:
    """Whether ``nn.BatchNorm``'s loader would fill in this missing key: a ``num_batches_tracked`` of a
    module whose version in the checkpoint's ``_metadata`` is absent or below 2 (saved before PyTorch 0.4.1)."""
    if key != _COUNT_KEY and not key.endswith("." + _COUNT_KEY):
        return False
    module = key[: -len(_COUNT_KEY)].rstrip(".")
    metadata = getattr(state_dict, "_metadata", None) or {}
    version = metadata.get(module, {}).get("version")
    return version is None or version < 2


def module_prefix_hint(unexpected: Sequence[str], own: Mapping[str, Any]) -> str:
    """A hint where every unexpected key is one of the model's behind a ``module.`` prefix, else ''."""
    prefix = "module."
    if unexpected and all(k.startswith(prefix) and k[len(prefix) :] in own for k in unexpected):
        return (
            f"the checkpoint's keys start with {prefix!r} (saved from a DataParallel / DistributedDataParallel "
            "wrapper): strip it first, e.g. torch.nn.modules.utils.consume_prefix_in_state_dict_if_present("
            "state_dict, 'module.'); "
        )
    return ""


def summarize_keys(keys: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` keys, and how many more: an error message stays one readable line."""
    head = ", ".join(keys[:shown])
    return head + (f", ... and {len(keys) - shown} more" if len(keys) > shown else "")
