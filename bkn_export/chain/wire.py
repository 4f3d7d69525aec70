"""Wiring: from the recorded data flow of one example forward to each layer's wiring value.

:func:`wire_chain` records the model once (:func:`bkn_export.chain.record.record_dataflow`),
makes the model the chain's root (:func:`bkn_export.chain.scope.attach_root`) and gives
every BKN layer a :class:`~bkn_export.chain.member.ChainMembership` whose
:class:`~bkn_export.chain.wiring.Wiring` :func:`plan_wiring` decides from the layer's
:class:`~bkn_export.chain.record.LayerRecord` and options:

* no normalization upstream (``combine="none"``): first in chain, BatchNorm;
* ``propagate`` / ``sampled``: the recorded sources and their steps, as recorded. A
  concatenation part that reaches no normalization takes batch statistics alone on its
  channels (noted). A single path or a residual addend that reaches none leaves the
  layer first in chain (BatchNorm), noted: with the upstream statistics unknown there is
  nothing to predict from;
* ``residual="branch"``: every sum on the paths keeps only the addend whose source
  normalization ran last (the residual branch), noted;
* ``learned``: a free matrix over the concatenated source Gaussians (C_k × Σ C_j);
* ``identity``: the source Gaussians as they are; the channel counts must match.

The leaf modules on the paths get a forward pre-hook of the root (removed on re-wiring):
a forward in which one of them did not run after its path's source published leaves
that path out of the prior, with a warning (:mod:`bkn_export.chain.scope`).

Every choice is a note that :func:`bkn_export.describe_chain` shows.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from bkn_export.chain.member import ChainMembership, hooked_names
from bkn_export.chain.record import (
    SEPARATED_POSITIONS,
    Combination,
    LayerRecord,
    RecordedChain,
    SourcePath,
    is_normalization,
    record_dataflow,
)
from bkn_export.chain.scope import (
    attach_root,
    global_forward_hooks,
    global_hooks,
    hook_signatures,
    library_hook,
    module_settings_of,
    watch_modules,
)
from bkn_export.chain.train_probe import mode_only_modules
from bkn_export.chain.transitions import path_modules
from bkn_export.chain.wiring import Wiring
from bkn_export.errors import ChainWiringError
from bkn_export.nn import BKN_PARAMETERS, KalmanOptions, _BatchKalmanNorm

__all__ = ["bkn_layers", "plan_wiring", "wire_chain"]


def wire_chain(
    model: nn.Module,
    example_inputs: Any,
    options: KalmanOptions | None = None,
    *,
    recorded: RecordedChain | None = None,
) -> nn.Module:
    """Wire the BKN layers of ``model`` into one Kalman chain by the data flow of one example forward.

    model: the root; its forwards carry the chain (a BKN layer called outside a forward
    of ``model`` runs as first in chain, i.e. BatchNorm). example_inputs: a tensor, a
    tuple of positional inputs or a dict of keyword inputs (one eval-mode, no_grad
    forward; nothing changes). options: applied to every BKN layer (None: each keeps its
    own). recorded: a recording of this model on these inputs, to skip recording again.
    Re-wiring replaces earlier BKN parameters (gain, process noise, transition matrix).
    Returns ``model``. Raises ChainWiringError for a normalization layer that is not BKN.
    """
    if recorded is None:
        recorded = record_dataflow(model, example_inputs)
    modules = dict(model.named_modules())
    _warn_of_mode_only_modules(model, example_inputs)
    for record in recorded.layers:
        if not isinstance(modules.get(record.name), _BatchKalmanNorm):
            kind = type(modules.get(record.name)).__name__
            raise ChainWiringError(f"'{record.name}' is a {kind}; convert it with convert_batchnorm first")
    _warn_of_rewired_parameters(modules)
    root = attach_root(model)
    order = {record.name: position for position, record in enumerate(recorded.layers)}
    features = {name: int(m.num_features) for name, m in modules.items() if is_normalization(m)}  # type: ignore[arg-type]
    patched = frozenset(name for name in features if "forward" in modules[name].__dict__)
    if patched:
        shown = ", ".join(map(repr, sorted(patched)[:3])) + (", ..." if len(patched) > 3 else "")
        warnings.warn(
            f"{len(patched)} normalization layer(s) have a forward set on their instance ({shown}; accelerate's hooks "
            "set one): the chain cannot see what it computes around the normalization, so the layers they feed "
            "start their chains (no prior from them). Delete the "
            "instance's forward (del layer.forward; accelerate.hooks.remove_hook_from_module) before wiring",
            UserWarning,
            stacklevel=3,
        )
    wirings = []
    for record in recorded.layers:
        layer = modules[record.name]
        assert isinstance(layer, _BatchKalmanNorm)
        if options is not None:
            layer.options = options
        wirings.append((layer, plan_wiring(record, layer.options, order, features, layer.num_features, patched)))
    # The modules on the paths: each forward checks that they ran (bkn_export.chain.scope).
    root.watched = watch_modules(model, root, (n for _, w in wirings for path in w.sources for n in path_modules(path)))
    # What each prediction goes through, with the hooks it has now: a train step after those hooks change warns that
    # the prior predicts what they computed when wired (bkn_export.chain.member).
    root.hooks = hook_signatures(model, (n for _, w in wirings for n, _ in hooked_names(w)))
    root.global_hooks = global_hooks()  # torch's global forward hooks, around every one of those modules
    # The settings of the path's modules that its steps hold as constants: a train step after one changes refuses.
    root.settings = module_settings_of(model, (n for _, w in wirings for path in w.sources for n in path_modules(path)))
    inputs = {record.name: tuple(record.input_shape[2:]) for record in recorded.layers}
    for layer, wiring in wirings:
        on_paths = {name for path in wiring.sources for name in path_modules(path)}
        seen = {name: size for name, size in recorded.module_inputs.items() if name in on_paths}
        membership = ChainMembership(root, wiring, inputs.get(wiring.name), seen)
        layer.join_chain(membership, wiring.previous_features)
    _warn_about_hooks(modules, [w for _, w in wirings if w.transition == "propagate" or w.transition == "sampled"])
    _warn_if_no_layer_has_a_prior([w for _, w in wirings])
    _warn_of_separated_positions([w for _, w in wirings if w.transition == "propagate"])
    for name, module in modules.items():
        if isinstance(module, _BatchKalmanNorm) and name not in order:
            if options is not None:
                module.options = options
            note = "did not run on the example inputs: not wired (BatchNorm)"
            module.join_chain(ChainMembership(root, Wiring(name, None, notes=(note,))))
    return model


def _first_five(items: Sequence[str]) -> str:
    """The first five of ``items``, comma-separated, and " ..." where there are more (a warning's list of names)."""
    return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")


def _warn_if_no_layer_has_a_prior(wirings: list[Wiring]) -> None:
    """Warn where two or more layers ran and none has a prior: every one first in its chain, the network trains
    exactly as with BatchNorm (a cold QA found TabNet and Jasper so, each path cut by an operator the chain cannot
    carry: ``chunk``, ``masked_fill``), and nothing said so but ``format_chain``."""
    if len(wirings) < 2 or any(w.transition is not None for w in wirings):
        return
    example = next((w for w in wirings[1:] if w.notes), None)
    reason = f" (e.g. '{example.name}': {example.notes[0]})" if example is not None else ""
    warnings.warn(
        f"none of the {len(wirings)} BKN layers has a Kalman prior: each is first in its chain{reason}, so the "
        "network trains exactly as with BatchNorm. format_chain(model) gives each layer's reason (an operator the "
        "chain cannot carry moments through between two layers, or no normalization upstream of a layer)",
        UserWarning,
        stacklevel=3,
    )


def _warn_of_separated_positions(wirings: list[Wiring]) -> None:
    """Warn, naming them, about layers whose ``propagate`` prior goes through a flatten (or strided selection) of
    positions that an earlier step left unlike (a conv's borders, a pooling): the prior gives every position its
    channel's pooled moments, so a Linear after it weighs border and inner positions alike. Unlike the other named
    approximations this one has no bound: a cold QA (sixth session of 2026-12-07) measured, for Conv1d on 4
    positions → flatten → Linear → BatchNorm1d, a prior variance 2–10× the layer's input's and a mean 11 standard
    deviations off, the posterior at batch 2 twice as far from the population mean as BatchNorm's batch mean;
    ``format_chain`` alone said so."""
    found = [w.name for w in wirings if any(SEPARATED_POSITIONS in note for note in w.notes)]
    if found:
        warnings.warn(
            f"{len(found)} BKN layer(s) predict their prior through a flatten (or strided selection) of positions that "
            "an earlier step left unlike (a conv's borders, a pooling's uneven windows): "
            + _first_five([repr(name) for name in found])
            + ". The prior gives every position its channel's moments over all positions, which is far off where "
            "border positions weigh much (few positions per channel): format_chain(model) names the step; pooling "
            "before the flatten avoids it",
            RuntimeWarning,
            stacklevel=3,
        )


def _warn_of_mode_only_modules(model: nn.Module, example_inputs: Any) -> None:
    """Warn, naming them, about modules the forward runs in one mode only before a normalization
    (:mod:`bkn_export.chain.train_probe`): the wiring saw the eval-mode forward, so a prior whose path crosses a
    train-only module leaves it out, and one whose path crosses an eval-only module has it, though training never
    runs it."""
    found = mode_only_modules(model, example_inputs)
    for names, runs, effect in (
        (found.train, "in train mode that it does not run in eval mode", "leaves them out (it is the prior of the "
         "network without them)"),
        (found.eval, "in eval mode that it does not run in train mode", "has them, though training never runs them"),
    ):  # fmt: skip
        if names:
            warnings.warn(
                f"the forward runs {len(names)} module(s) {runs}: "
                + _first_five([repr(name) for name in names])
                + f". The chain is wired on the eval-mode forward, so a prior whose path crosses them {effect}. Where "
                "such a module sits between two normalizations, make it run in both modes so that the prior and "
                "training agree",
                RuntimeWarning,
                stacklevel=3,
            )


def _warn_of_rewired_parameters(modules: Mapping[str, nn.Module]) -> None:
    """Warn, naming them, where BKN layers hold BKN parameters already (a wired model wired or converted again):
    wiring gives them new ones at their initial values, and what they learned is gone."""
    held = [
        f"'{name}' ({', '.join(p for p in BKN_PARAMETERS if p in module._parameters)})"
        for name, module in modules.items()
        if isinstance(module, _BatchKalmanNorm) and any(p in module._parameters for p in BKN_PARAMETERS)
    ]
    if held:
        warnings.warn(
            f"{len(held)} BKN layer(s) hold BKN parameters already: {_first_five(held)}"
            + ". Wiring the chain again (wire_chain, or convert_batchnorm on a converted model) gives them new "
            "parameters at their initial values, and what they learned is gone (new objects: an optimizer built "
            "before holds the old ones). To keep it, load the saved state_dict after wiring instead",
            UserWarning,
            stacklevel=3,
        )


def _warn_about_hooks(modules: Mapping[str, nn.Module], wirings: list[Wiring]) -> None:
    """Warn, naming them, about forward (pre-)hooks on the modules a prediction goes through (a path's steps, its
    source layers, the other modules that returned a value of it): the recorder follows what a hook computed in the
    eval-mode wiring forward as it follows the forward's own code (its numbers as constants, a module outside the model
    as opaque), so a hook that computes otherwise later (a factor that changes, one that acts only in train mode) is
    predicted as it ran then."""
    paths = [path for w in wirings for path in w.sources]
    names = dict.fromkeys(n for path in paths for n in (*path.normalizations(), *path_modules(path)))
    names.update(dict.fromkeys(n for w in wirings for n in w.passed))
    hooked = []
    for name in names:
        module = modules.get(name)
        if module is None:
            continue
        pre = [h for h in module._forward_pre_hooks.values() if not library_hook(h)]
        post = [h for h in module._forward_hooks.values() if not library_hook(h)]
        if pre or post:
            hooked.append(f"'{name}' ({len(pre)} pre-hook(s), {len(post)} hook(s))")
    if global_forward_hooks():
        hooked.append("every module (global forward hooks)")
    if hooked:
        warnings.warn(
            "forward hooks on modules the Kalman chain predicts through: " + ", ".join(hooked) + ". The prediction "
            "follows what a hook computed in the wiring forward (eval mode) as it follows the forward's own code, "
            "its numbers recorded as constants (format_chain shows the steps): a hook that computes otherwise later "
            "(a factor that changes, one that acts only in train mode) is predicted as it ran then; wire again after "
            "changing it. Hooks that only read are fine; hooks added or removed after wiring are not followed (the "
            "first train step after such a change names it).",
            RuntimeWarning,
            stacklevel=3,
        )


def bkn_layers(model: nn.Module) -> list[tuple[str, _BatchKalmanNorm]]:
    """(name, layer) of every BKN layer: wired ones in first-call order, then the others."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchKalmanNorm)]

    def position(item: tuple[str, _BatchKalmanNorm]) -> tuple[bool, int]:
        wiring = getattr(item[1].chain, "wiring", None)
        order = wiring.order if isinstance(wiring, Wiring) else -1
        return order < 0, order

    return sorted(layers, key=position)


def plan_wiring(
    record: LayerRecord,
    options: KalmanOptions,
    order: Mapping[str, int],
    features: Mapping[str, int],
    channels: int,
    replaced_forwards: frozenset[str] = frozenset(),
) -> Wiring:
    """The wiring of one layer (see the module docstring).

    order: first-call position of every normalization that ran; features: C_j of every
    normalization; channels: C_k of this layer; replaced_forwards: the normalizations whose instance
    has a ``forward`` of its own (a layer they feed starts its chain).
    """
    name = record.name
    notes = list(record.notes)
    position = order.get(name, -1)

    def wiring(kind: str | None, sources: tuple[SourcePath, ...], combine: str, previous: int = 0) -> Wiring:
        # Not the path's own step modules and sources, nor the layer and the blocks that hold it: a block around the
        # layer that returns a value of the path (a U-Net encoder's skip features) does so after the layer ran.
        named = {n for path in sources for n in (*path.normalizations(), *path_modules(path))}
        passed = (
            tuple(n for n in record.passed if n not in named and n != name and not name.startswith(f"{n}."))
            if sources
            else ()
        )
        return Wiring(
            name, kind, sources, combine, options.prior_source, previous, position, tuple(notes), record.calls,
            record.republished, record.repeats, passed,
        )  # fmt: skip

    def first_in_chain(*why: str) -> Wiring:
        notes.extend(why)
        return wiring(None, (), "none")

    if record.combine == "none" or not record.sources:
        return first_in_chain() if notes else first_in_chain("no normalization upstream: first in chain (BatchNorm)")
    sources, combine = record.sources, str(record.combine)
    if options.residual == "branch":
        sources, combine, branch_notes = _branches_only(sources, combine, order)
        notes += branch_notes
    names = tuple(dict.fromkeys(n for s in sources for n in s.normalizations()))
    patched = [n for n in names if n in replaced_forwards]
    if patched:
        return first_in_chain(
            f"first in its chain: its source '{patched[0]}' has a forward set on its instance, which may compute more "
            "than the normalization and which the chain cannot see into (del the instance's forward before wiring)"
        )
    kind = options.transition
    if kind == "identity":
        widths = [features[n] for n in names]
        width = sum(widths) if combine == "concat" else max(widths)
        if width != channels or (combine != "concat" and min(widths) != channels):
            raise ChainWiringError(
                f"transition='identity' needs equal channel counts, but '{names[0]}' has {widths[0]} and "
                f"'{name}' has {channels}; use transition='learned' or 'propagate'"
            )
        return wiring(kind, sources, combine)
    if kind == "learned":
        previous = sum(features[n] for n in names)
        notes.append(f"learned: a free {channels}x{previous} matrix over {list(names)} (no path used)")
        return wiring(kind, sources, combine, previous)
    problem = _unusable(sources, combine, channels)
    if problem:
        return first_in_chain(f"{kind} unavailable ({problem}): batch statistics only, as BatchNorm")
    if combine == "concat":
        offset = 0
        for source in sources:
            if not _fully_known(source):
                notes.append(
                    f"channels {offset}:{offset + source.channels} have no normalization upstream along every "
                    "part: batch statistics alone on them (prior weight 0)"
                )
            offset += source.channels
    return wiring(kind, sources, combine)


def _unusable(sources: tuple[SourcePath, ...], combine: str, channels: int) -> str:
    """Why the sources give no prediction at all ("" when they do)."""
    if combine == "concat":
        total = sum(s.channels for s in sources)
        if total != channels:
            return f"the concatenation's parts have {total} channels, the layer {channels}"
        if not any(s.reaches_normalization for s in sources):
            return "no part reaches a normalization"
        return ""
    for index, source in enumerate(sources):
        where = f"addend {index}" if combine == "sum" else "its input"
        if not _fully_known(source):
            return f"{where} does not reach a normalization along every part"
        if source.channels > channels or (combine != "sum" and source.channels != channels):
            return f"{where} has {source.channels} channels, the layer {channels}"
    return ""


def _fully_known(path: SourcePath) -> bool:
    """Whether every part of ``path`` starts at a normalization (a concatenation part that
    falls back is fine at the top level only, where its channels can take batch statistics)."""
    if path.normalization is not None:
        return True
    if path.origin is None:
        return False
    return all(_fully_known(s) for s in path.origin.sources)


def _latest(path: SourcePath, order: Mapping[str, int]) -> int:
    return max((order.get(n, -1) for n in path.normalizations()), default=-1)


def _branch(path: SourcePath, order: Mapping[str, int], dropped: list[str]) -> SourcePath:
    """``path`` with every sum replaced by its addend whose normalization ran last."""
    if path.origin is None:
        return path
    inner = [_branch(s, order, dropped) for s in path.origin.sources]
    if path.origin.combine == "concat":
        return replace(path, origin=Combination("concat", tuple(inner)))
    best = max(inner, key=lambda s: _latest(s, order))
    dropped.extend(s.describe() for s in inner if s is not best)
    return SourcePath(
        best.normalization, best.steps + path.steps, path.channels, best.entry_shape, best.origin, best.fallback
    )


def _branches_only(
    sources: tuple[SourcePath, ...], combine: str, order: Mapping[str, int]
) -> tuple[tuple[SourcePath, ...], str, list[str]]:
    dropped: list[str] = []
    inner = tuple(_branch(s, order, dropped) for s in sources)
    if combine == "sum":
        best = max(inner, key=lambda s: _latest(s, order))
        dropped.extend(s.describe() for s in inner if s is not best)
        inner, combine = (best,), "single"
    notes = [f"residual='branch': dropped the shortcut {d}" for d in dropped]
    return inner, combine, notes
