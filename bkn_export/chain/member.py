"""A layer's membership of a chain: its wiring value, its transition, and its root.

:class:`ChainMembership` is what :func:`bkn_export.wire_chain` gives each BKN layer
(``layer.chain``; the :class:`bkn_export.nn.ChainMember` protocol). It is an immutable
value: a synchronised copy of a layer (``SyncBatchKalmanNorm``) and a deep copy of the
model carry it as it is.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from bkn_export import recompute
from bkn_export.chain.scope import (
    ChainRoot,
    ChainScratch,
    HookSignature,
    Published,
    Settings,
    global_hook_change,
    hook_change,
    observers,
    raw_signature,
    scratch_for,
    settings_change,
    settings_moved,
)
from bkn_export.chain.transitions import Transition, path_modules, path_sequences, transition_for, unrun_module
from bkn_export.chain.wiring import Wiring, check_saved_wiring, saved_form
from bkn_export.errors import ChainWiringError
from bkn_export.nn import Prior, _BatchKalmanNorm

__all__ = ["ChainMembership", "hooked_names", "standalone_member"]


@dataclass(frozen=True)
class ChainMembership:
    """A layer's place in the chain of ``root``.

    root: the wired root's token (None: a standalone layer, which only reports to
    observers); wiring: the layer's :class:`Wiring`; input_spatial, module_inputs: the spatial size of the layer's
    input, and of each path module's, in the example forward the chain was wired on (None, empty: not known), which a
    path holding a size given at that size is checked against.
    """

    root: ChainRoot | None = field(compare=False, repr=False)
    wiring: Wiring
    input_spatial: tuple[int, ...] | None = field(default=None, compare=False, repr=False)
    #: Per module on the layer's paths, the spatial size of its input in the example forward (empty: not known).
    module_inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    _transition: Transition | None = field(init=False, compare=False, repr=False)
    #: The normalization layers whose posteriors reach this layer (``wiring.source_names``).
    _sources: tuple[str, ...] = field(init=False, compare=False, repr=False)
    #: ``wiring.republished`` and ``wiring.repeats`` as mappings, source → count (read on every call).
    _republished: dict[str, int] = field(init=False, compare=False, repr=False)
    _repeats: dict[str, int] = field(init=False, compare=False, repr=False)
    #: Whether the layer has warned that a recorded path did not run (once per layer).
    _warned: list[bool] = field(init=False, compare=False, repr=False, default_factory=list)
    #: Whether the layer has warned that it ran outside a forward of its root (once per layer).
    _warned_outside: list[bool] = field(init=False, compare=False, repr=False, default_factory=list)
    #: Whether the layer has warned that a source published twice before it read one (once per layer).
    _warned_replaced: list[bool] = field(init=False, compare=False, repr=False, default_factory=list)
    #: Whether the layer has warned that it ran more often than in the example forward (once per layer).
    _warned_extra: list[bool] = field(init=False, compare=False, repr=False, default_factory=list)
    #: The modules whose hooks the layer's prediction assumes as wired, and which of their hooks (:func:`hooked_names`).
    _hooked: tuple[tuple[str, tuple[bool, bool, bool]], ...] = field(init=False, compare=False, repr=False)
    #: The paths (index into ``wiring.sources``) whose steps hold a padding, resample size or reshape given at the
    #: wiring size (:meth:`SourcePath.size_bound`), where the transition pushes moments through the steps.
    _size_bound: tuple[int, ...] = field(init=False, compare=False, repr=False)
    #: Whether the layer has warned that such a path met another spatial size (once per layer).
    _warned_resized: list[bool] = field(init=False, compare=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_transition", transition_for(self.wiring))
        stepped = self.wiring.transition in ("propagate", "sampled")
        bound = tuple(i for i, path in enumerate(self.wiring.sources) if stepped and any(path.size_bound()))
        object.__setattr__(self, "_size_bound", bound)
        object.__setattr__(self, "_sources", self.wiring.source_names)
        object.__setattr__(self, "_republished", dict(self.wiring.republished))
        object.__setattr__(self, "_repeats", dict(self.wiring.repeats))
        object.__setattr__(self, "_hooked", hooked_names(self.wiring))

    @property
    def name(self) -> str:
        return self.wiring.name

    @property
    def has_predecessor(self) -> bool:
        return self.wiring.transition is not None

    @property
    def transition(self) -> str | None:
        return self.wiring.transition

    @property
    def observed(self) -> bool:
        return bool(observers())

    def prior(self, layer: _BatchKalmanNorm, x: Tensor) -> Prior | None:
        """This call's prior from the root's scratch; None outside a forward of the root.

        A recorded path whose watched modules did not run after its source published in
        this call counts as absent (a RuntimeWarning, once per layer and not while dynamo
        traces; observers, hence ``chain_statistics``, see it on every call). A call beyond
        the number the example forward made (``wiring.calls``: a block repeated a data-dependent
        number of times) has no recorded wiring, and its sources' latest statistics are not its
        input's: it takes no prior (BatchNorm), with a RuntimeWarning.
        """
        replay = recompute.replaying()
        if replay is not None:  # bkn_export.checkpoint recomputes a segment: the prior its forward predicted
            prior = replay.prior_of(layer, self.name)
            recompute.remember(layer, prior)  # a checkpoint nested in the segment records it again
            return prior
        prior = None
        unrun: dict[int, str] = {}
        resized: dict[int, str] = {}
        if self.root is not None:
            scratch = scratch_for(self.root)
            if scratch is None:
                recompute.refuse_unchained(layer, self.name)
                if self._transition is not None:
                    self._warn_outside_root()
            elif self._transition is not None and not self._recorded_call(scratch):
                scratch.unread_publications(self.name, self._sources)  # this read happened, prior or not
                self._warn_extra_call(scratch.publications[self.name] + 1)
            elif self._transition is not None:
                unrun = self._unrun(scratch)
                unpublished = self._unpublished(scratch)
                if unrun or unpublished:
                    self._warn([self._describe(i, m) for i, m in unrun.items()] + unpublished)
                resized = self._resized(scratch, tuple(x.shape[2:])) if self._size_bound else {}
                if resized:
                    self._warn_resized(list(resized.values()))
                rehooked, parametrizations = self._inspect_modules(scratch)
                if rehooked:
                    self._warn_rehooked(rehooked)
                replaced = [  # where the example forward did the same, the latest is the input
                    (name, count)
                    for name, count in scratch.unread_publications(self.name, self._sources)
                    if self._republished.get(name) != count
                ]
                if replaced:
                    self._warn_replaced(replaced)
                left_out = frozenset(unrun) | set(resized)
                predict = functools.partial(
                    self._transition.predict,
                    layer,
                    scratch.published,
                    scratch.modules,
                    x,
                    scratch.predictions,
                    left_out,
                )
                with _in_eval_mode(parametrizations) if parametrizations else nullcontext():
                    prior = recompute.kept(predict)
        recompute.remember(layer, prior)
        for observer in observers():
            absent = tuple(self._describe(i, m) for i, m in unrun.items()) + tuple(resized.values())
            observer.saw_prior(layer, prior, absent)
        return prior

    def _inspect_modules(self, scratch: ChainScratch) -> tuple[list[str], list[nn.Module]]:
        """One pass over the modules this layer's prediction goes through (a step's module, a source layer, this
        layer, a container a path enters or leaves): (what changed in their hooks since wiring, their
        parametrizations in train mode); raises :class:`ChainWiringError` where a path module's settings that its step
        holds as constants changed (:func:`bkn_export.chain.scope.module_settings`: ``LeakyReLU.negative_slope``, a
        pooling's kernel; a cold QA of 2026-12-07's sixth session: a prior variance 37 % low after a slope change,
        8.4× high after Hardtanh's bounds, with no word), as it does for a module replaced after wiring.

        Hooks: forward hooks or pre-hooks added or removed, or an instance ``forward`` set or deleted, since the chain
        was wired (:func:`bkn_export.chain.scope.hook_change`; the library's own hooks and torch's weight
        reparametrizations aside). The recorded path computes what each module did when wired (a hook's effect
        recorded with it), which the change may make another computation; a hook that only reads changes nothing,
        and which kind it is cannot be told, so the prior stays and a warning names the change. torch's global
        forward (pre-)hooks run around every module, so they are compared too, once per forward (by the first layer
        that inspects: :func:`bkn_export.chain.scope.global_hook_change`). Not compared once the model has warned,
        while Dynamo traces (it guards on hooks itself), nor for a root pickled before the hooks were kept
        (``ChainRoot.hooks`` empty; ``ChainRoot.global_hooks`` None: the global ones only).

        Parametrizations (``torch.nn.utils.parametrize``): the prediction reads their weights in eval mode
        (:func:`_in_eval_mode`)."""
        assert self.root is not None  # called within a forward of the root
        wired = self.root.hooks
        compare = bool(wired) and not self.root.warned_hooks and not torch.compiler.is_compiling()
        modules = scratch.modules
        changes: list[str] = []
        parametrizations: list[nn.Module] = []
        hooked = self.__dict__.get("_hooked")
        if hooked is None:  # a membership pickled before the field existed: unpickling runs no __post_init__
            hooked = hooked_names(self.wiring)
            object.__setattr__(self, "_hooked", hooked)
        compiling = torch.compiler.is_compiling()
        held = self.root.settings if not compiling else {}
        if not compiling and wired:  # one pass per forward over the root's modules: which of this layer's to inspect
            if scratch.inspected is None:
                scratch.inspected = _moved_modules(self.root, modules)
                wired_globals = self.root.global_hooks
                if compare and wired_globals is not None and (change := global_hook_change(wired_globals)):
                    changes.append(f"every module: {change}")
            kinds_of = self.__dict__.get("_hooked_kinds")
            if kinds_of is None:
                kinds_of = dict(hooked)
                object.__setattr__(self, "_hooked_kinds", kinds_of)
            hooked = tuple((name, kinds_of[name]) for name in scratch.inspected if name in kinds_of)
        changed_settings: list[str] = []
        for name, kinds in hooked:
            found = _inspect(modules, name, kinds, wired.get(name) if compare else None, held)
            if found is None:
                continue
            if found.change is not None:
                changes.append(f"'{name}': {found.change}")
            if found.setting is not None:
                changed_settings.append(found.setting)
            parametrizations += found.parametrizations
        if changed_settings:
            raise ChainWiringError(
                f"BKN layer '{self.wiring.name}': the model changed after its Kalman chain was wired: "
                f"{'; '.join(changed_settings)}. The prior's path holds those settings as recorded, so it would "
                "predict the network as it was. Wire the model again: bkn_export.wire_chain(model, example_inputs)"
            )
        return changes, parametrizations

    def _resized(self, scratch: ChainScratch, spatial: tuple[Any, ...]) -> dict[int, str]:
        """Index into ``wiring.sources`` → why that path counts as absent in this call: its steps hold a padding,
        resample size or reshape given at the wiring example's spatial size, and this call runs another size: its
        source's output, this layer's input (``spatial``; a source pooled to 1 × 1 at every size, then resampled to
        the input's size) or the input of a module on the path (both ends of the path pooled) has another size than
        in the example forward. While torch.export or a jit trace
        records the call with symbolic spatial sizes, such a path raises :class:`ChainWiringError`: the graph would
        compute it at every size (eager training leaves it out at other sizes)."""
        shapes = {name: published.input_shape for name, published in scratch.published.items()}
        reads = {name: scratch.module_inputs[name] for name in self.module_inputs if name in scratch.module_inputs}
        if torch.jit.is_tracing():  # sizes are tensors while a trace records them, concrete for this trace
            shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
            reads = {name: tuple(int(d) for d in shape) for name, shape in reads.items()}
            spatial = tuple(int(d) for d in spatial)
        traced = torch.compiler.is_exporting() or torch.jit.is_tracing()
        sizes = (*shapes.values(), (0, 0, *spatial), *((0, 0, *read) for read in reads.values()))
        if traced and not all(type(d) is int for shape in sizes for d in shape[2:]):
            raise ChainWiringError(
                f"BKN layer '{self.wiring.name}': the model is traced (torch.export / jit) with symbolic spatial "
                f"sizes, and its prior's path holds what the forward gave at the wiring size ({self.size_bound[0]}); "
                "the traced graph would compute that path at every size, where the network may pad, resample or "
                "reshape otherwise. Trace at static spatial sizes (the size the chain was wired at), or in eval mode"
            )
        found = {}
        for index in self._size_bound:
            path = self.wiring.sources[index]
            changed = path.resized(shapes)
            if changed is not None:
                source, recorded, now = changed
                where = f"'{source}' outputs {list(now)} in this call, {list(recorded)} when wired"
            elif self.input_spatial is not None and spatial != self.input_spatial:
                where = f"this layer's input is {list(spatial)} in this call, {list(self.input_spatial)} when wired"
            elif moved := next((m for m in path_modules(path) if m in reads and reads[m] != self.module_inputs[m]), ""):
                # both ends of the path keep their size (pooled): a module on it reads another size
                wired = list(self.module_inputs[moved])
                where = f"'{moved}' reads {list(reads[moved])} in this call, {wired} when wired"
            else:
                continue
            bound = "; ".join(dict.fromkeys(path.size_bound()))
            found[index] = f"{path.describe()}: {bound} was given at the wiring size; {where}"
        if found and traced:  # a file would compute the stale path, where eager training leaves it out
            raise ChainWiringError(
                f"BKN layer '{self.wiring.name}': the example inputs run another size than the chain was wired at "
                f"({'; '.join(found.values())}), so the recorded path does not predict this size; export at the "
                "wiring size, or wire the chain at this size first (bkn_export.wire_chain(model, example_inputs))"
            )
        return found

    @property
    def size_bound(self) -> tuple[str, ...]:
        """Per recorded path whose steps hold a padding, resample size or reshape given at the wiring size (the
        transition pushes moments through them), the path and what it holds; empty for most layers."""
        return tuple(
            f"{self.wiring.sources[i].describe()}: {'; '.join(dict.fromkeys(self.wiring.sources[i].size_bound()))}"
            for i in self._size_bound
        )

    def _recorded_call(self, scratch: ChainScratch) -> bool:
        """Whether this call is one the example forward's wiring covers: one of its first ``wiring.calls``, or a
        later one whose sources published since the layer's last call as often as between the recorded calls
        (``wiring.repeats``: the layer applied again to the same source's output, or a block applied again)."""
        if scratch.publications.get(self.name, 0) < self.wiring.calls:
            return True
        repeats = self._repeats
        return bool(repeats) and scratch.publications_since_read(self.name, self._sources) == repeats

    def _unrun(self, scratch: ChainScratch) -> dict[int, str]:
        """Index into ``wiring.sources`` → the watched module on that path that did not run."""
        assert self.root is not None  # called within a forward of the root
        watched = self.root.watched  # the modules on the root's paths (bkn_export.chain.scope.watch_modules)
        if not watched:
            return {}
        found = {}
        for index, path in enumerate(self.wiring.sources):
            if path.normalization is not None and path.normalization not in scratch.published:
                continue  # the source did not run at all: no prior anyway
            missing = unrun_module(path, scratch, watched)
            if missing is not None:
                _still_recorded(scratch, missing)
                found[index] = missing
        return found

    def _unpublished(self, scratch: ChainScratch) -> list[str]:
        """The sources that published nothing in this call (skipped by stochastic depth or a branch not taken,
        replaced by an unwired layer): their paths give no prior."""
        published = scratch.published
        if all(name in published for name in self._sources):  # the usual case, first: once per layer and step
            return []
        return [
            f"{path.describe()}: its source '{name}' did not run in this call (or ran unwired)"
            for path in self.wiring.sources
            for name in dict.fromkeys(path.normalizations())
            if name not in published
        ]

    def _describe(self, index: int, module: str) -> str:
        return f"{self.wiring.sources[index].describe()}: '{module}' did not run after its source in this call"

    def _warn_outside_root(self) -> None:
        """Once per layer: a layer with a predecessor ran in train mode outside a forward of its root (called on its
        own, or from a model rebuilt around it: a torch.fx GraphModule...), so without its prior, as BatchNorm."""
        _warn_once(
            self._warned_outside,
            f"BKN layer '{self.wiring.name}' ran in train mode outside a forward of the model it is wired in, so "
            "without its Kalman prior (as BatchNorm). Call the model, model(x), not model.forward(x): the chain is "
            "carried by the model's call, which .forward() skips. If the layer is part of another model now (a "
            "torch.fx GraphModule, a copy of a submodule, a wrapper built around the layers), wire that model: "
            "bkn_export.wire_chain(model, example_inputs). Warned once per layer.",
            stacklevel=4,
        )

    def _warn_extra_call(self, call: int) -> None:
        recorded = self.wiring.calls
        how = (
            "how a later call is fed was not recorded"
            if recorded == 1 or not self.wiring.repeats
            else "its sources did not publish since its last call as they did between the recorded calls"
        )
        _warn_once(
            self._warned_extra,
            f"BKN layer '{self.wiring.name}' runs call {call} in this forward; the example forward the chain was "
            f"recorded on ran it {recorded} time{'s' * (recorded != 1)}, and {how}, so the chain cannot tell which "
            "statistics this call's input comes from (a block fed by its own output, in a loop run more often "
            "than in the example): this call and any like it run without the Kalman prior, as BatchNorm. Wire the "
            "model on an example that runs the layer as often as training does (bkn_export.wire_chain). Warned "
            "once per layer (not while torch.compile traces: a warning there would break the graph).",
            stacklevel=2,
        )

    def _warn_replaced(self, sources: list[tuple[str, int]]) -> None:
        counts = ", ".join(f"'{name}' {count} times" for name, count in sources)
        example = ", ".join(f"'{name}' {self._republished.get(name, 1)}" for name, _ in sources)
        _warn_once(
            self._warned_replaced,
            f"BKN layer '{self.wiring.name}': its source(s) published more than once in this forward before it read "
            f"one ({counts}; in the example forward: {example}), so it reads the latest, which may belong to "
            "another input: the "
            "same layers run on interleaved inputs (a = block(a); b = block(b), or two streams through shared "
            "layers). The chain is recorded per layer name, one posterior at a time: run each input through the "
            "shared layers in turn (a = block2(block1(a)), then b), or give each stream its own layers. Warned "
            "once per layer.",
            stacklevel=2,
        )

    def _warn_rehooked(self, changes: list[str]) -> None:
        assert self.root is not None
        _warn_once(
            self.root.warned_hooks,
            f"BKN layer '{self.wiring.name}': modules its Kalman prior goes through have other forward hooks than when "
            f"the chain was wired ({'; '.join(changes)}). The prior predicts the network as wired, with what each hook "
            "did then (format_chain shows the steps): a hook added since that changes a module's input or output "
            "(returns a value, or edits a tensor in place) is not in it, and one removed since still is. Hooks that "
            "only read change nothing. Where a hook changes what the network computes, wire the chain again "
            "(bkn_export.wire_chain(model, example_inputs); save the state dict first and load it after, to keep "
            "what the BKN layers learned). Warned once per model.",
            stacklevel=2,
        )

    def _warn_resized(self, problems: list[str]) -> None:
        _warn_once(
            self._warned_resized,
            f"BKN layer '{self.wiring.name}': a recorded path holds a padding, resample size or reshape that the "
            "forward gave at the wiring size (F.pad, F.interpolate(size=...), view / reshape), which it may compute "
            "from the input's size (TF-style 'same' padding, size=skip.shape[2:]; the chain cannot tell that from a "
            f"constant), and this call runs another size ({'; '.join(problems)}). At this size the network may pad, "
            "resample or reshape otherwise, and the recorded path cannot say whether it does, so that source counts "
            "as absent (no prior on its channels; none at all where it is an addend of a sum: BatchNorm statistics "
            "there). Wire the chain at the size you train at (bkn_export.wire_chain(model, example_inputs)). Warned "
            "once per layer; chain_statistics shows every call.",
            stacklevel=2,
        )

    def _warn(self, problems: list[str]) -> None:
        _warn_once(
            self._warned,
            f"BKN layer '{self.wiring.name}': a recorded path did not run in this forward ({'; '.join(problems)}); "
            "that source counts as absent (no prior on its channels; none at all where it is an addend of a sum: "
            "BatchNorm statistics there). The chain was recorded on one example forward: if this branch is "
            "expected, re-wire on inputs that take it (bkn_export.wire_chain). Warned once per layer; "
            "chain_statistics shows every call.",
            stacklevel=2,
        )

    def publish(
        self,
        layer: _BatchKalmanNorm,
        x: Tensor,
        op_prior: tuple[Tensor, Tensor, Tensor] | None,
        posterior_mean: Tensor,
        posterior_variance: Tensor,
        count: Any,
        affine: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> None:
        """Hand the posterior on to the layers this one feeds (and to observers, which need ``op_prior``).

        affine: the (γ, β) the next layers read where not ``layer``'s parameters themselves (the outputs of
        :mod:`bkn_export.triton_step`'s node, so that their gradients reach it)."""
        weight, bias = affine if affine is not None else (layer.weight, layer.bias)
        if not torch.is_grad_enabled():  # the user's no_grad region: the prior read outside it must not reach γ, β
            weight = None if weight is None else weight.detach()
            bias = None if bias is None else bias.detach()
        published = Published(posterior_mean, posterior_variance, count, tuple(x.shape), weight, bias, layer.eps)
        if self.root is not None:
            scratch = scratch_for(self.root)
            if scratch is not None:
                scratch.publish(self.wiring.name, published)
        if op_prior is None and not layer.training:  # an eval-mode layer's running statistics: no step to record
            return
        for observer in observers():
            assert op_prior is not None, "the op assembled the prior under an observer (ChainMember.observed)"
            observer.saw_posterior(layer, published, op_prior, x)

    def wiring_state(self) -> dict[str, Any] | None:
        return saved_form(self.wiring) if self.root is not None else None

    def load_state(self, state: Any, label: str) -> None:
        check_saved_wiring(state, self.wiring, label)


#: Which changes of a module's hooks change a prediction through it (:func:`bkn_export.chain.scope.hook_change`'s
#: kinds: pre-hooks, forward hooks, an instance forward): all, on a step's module; its output's, on a source layer;
#: its input's, on the layer itself.
_STEP_HOOKS, _SOURCE_HOOKS, _OWN_HOOKS = (True, True, True), (False, True, True), (True, False, False)


class _Inspected(NamedTuple):
    """What :meth:`ChainMembership._inspect_modules` found on one module in one forward: its hook change (or None),
    its settings' change named with the module (or None), its parametrizations in train mode."""

    change: str | None
    setting: str | None
    parametrizations: list[nn.Module]


def _moved_modules(root: ChainRoot, modules: Mapping[str, nn.Module]) -> tuple[str, ...]:
    """The modules of ``root``'s wiring whose hooks or forward changed in any way since wiring (raw keys: the
    library's own hooks too), whose held settings moved, or that hold parametrizations: the only ones a layer's
    :meth:`ChainMembership._inspect_modules` needs to look at (usually none). Once per forward: a DenseNet's layers
    share most of their modules, and looking at each per layer cost 5 ms a step."""
    moved = []
    for name, signature in root.hooks.items():
        try:
            module = modules[name]
        except KeyError:
            continue
        settings = root.settings.get(name)
        if (
            raw_signature(module) != signature.raw
            or (settings is not None and settings_moved(module, settings))
            or isinstance(module._modules.get("parametrizations"), nn.ModuleDict)
        ):
            moved.append(name)
    for name, settings in root.settings.items():  # a path module whose hooks were not kept (an older pickle)
        if name not in root.hooks and name in modules and settings_moved(modules[name], settings):
            moved.append(name)
    return tuple(moved)


def _inspect(
    modules: Mapping[str, nn.Module],
    name: str,
    kinds: tuple[bool, bool, bool],
    signature: HookSignature | None,
    held: Mapping[str, Settings],
) -> _Inspected | None:
    """:class:`_Inspected` of module ``name`` (None where the model holds no such module)."""
    try:
        module = modules[name]
    except KeyError:
        return None
    change = hook_change(module, signature, kinds) if signature is not None else None
    settings = held.get(name)
    setting = settings_change(module, settings) if settings is not None else None
    owned = module._modules.get("parametrizations")  # what parametrize.is_parametrized reads, without getattr
    parametrizations = [p for p in owned.modules() if p.training] if isinstance(owned, nn.ModuleDict) else []
    described = None if setting is None else f"'{name}' ({type(module).__name__}): {setting}"
    return _Inspected(change, described, parametrizations)


def hooked_names(wiring: Wiring) -> tuple[tuple[str, tuple[bool, bool, bool]], ...]:
    """The modules whose hooks a layer's prediction assumes as wired, with which of their hooks count: the layer itself
    (its pre-hooks change its input), its source layers, every module its paths go through (those with a step, the
    containers a path enters or leaves: :func:`_crossed_containers`, and the other modules that returned a value of
    the path: ``wiring.passed``, an ``nn.Identity`` or a ``return x * 2``); none for a layer without a
    predecessor."""
    if not wiring.sources:
        return ()
    found: dict[str, tuple[bool, bool, bool]] = {wiring.name: _OWN_HOOKS}
    for path in wiring.sources:
        found.update({name: _SOURCE_HOOKS for name in path.normalizations() if name not in found})
        found.update({name: _STEP_HOOKS for name in path_modules(path) if name not in found})
    sequences = [[*sequence, wiring.name] for path in wiring.sources for sequence in path_sequences(path)]
    for name, kinds in _crossed_containers(sequences).items():
        if name not in found:
            found[name] = kinds
    found.update({name: _STEP_HOOKS for name in wiring.passed if name not in found})  # after containers: their kinds
    return tuple(found.items())


def _crossed_containers(sequences: list[list[str]]) -> dict[str, tuple[bool, bool, bool]]:
    """The modules holding some names of a path but not the whole path (a block whose output a path from a
    normalization inside it leaves by; the block it enters): a forward hook on such a container changes what the path
    carries where the path leaves it, a pre-hook where the path enters it, a forward set on its instance either way.
    sequences: runs of qualified module names in the order a value goes through them (:func:`path_sequences`, the
    layer last). Returns name → which of :func:`~bkn_export.chain.scope.hook_change`'s kinds count; the root ('')
    never (its hooks see the model's inputs and outputs)."""
    crossed: dict[str, tuple[bool, bool, bool]] = {}
    for sequence in sequences:
        ancestors = {name.rsplit(".", depth)[0] for name in sequence for depth in range(1, name.count(".") + 1)}
        for ancestor in ancestors:
            prefix = ancestor + "."
            inside = [name.startswith(prefix) for name in sequence]
            enters = any(not a and b for a, b in itertools.pairwise(inside))
            leaves = any(a and not b for a, b in itertools.pairwise(inside))
            if enters or leaves:
                was = crossed.get(ancestor, (False, False, False))
                crossed[ancestor] = (was[0] or enters, was[1] or leaves, True)
    return crossed


@contextmanager
def _in_eval_mode(parametrizations: list[nn.Module]) -> Iterator[None]:
    """``parametrizations`` (the train-mode ``torch.nn.utils.parametrize`` modules of the modules a prediction goes
    through) in eval mode while it reads their weights, and back after. Each read of a parametrized weight runs the
    parametrization; in train mode ``parametrizations.spectral_norm`` then runs another power iteration and updates
    its vectors (a cold QA, fifth session of 2026-12-07: 5–8 iterations per forward where the network runs 1, and
    a prior of another σ than the conv's). In eval mode it takes σ from the vectors the module's own read just
    updated: the weight the module ran, and no side effect. A parametrization that draws noise in train mode gives
    its expectation."""
    for parametrization in parametrizations:
        parametrization.training = False
    try:
        yield
    finally:
        for parametrization in parametrizations:
            parametrization.training = True


def _still_recorded(scratch: ChainScratch, name: str) -> None:
    """Raise :class:`ChainWiringError` where the watched module ``name`` that did not run is no longer the module the
    chain recorded (replaced, e.g. ``model.head = nn.Linear(...)`` after wiring, or deleted): its path would otherwise
    count as a branch not taken and the layers it feeds would train as BatchNorm, under a warning that blames a module
    that did run. A recorded module that did not run (a branch not taken) passes."""
    try:
        scratch.modules[name]  # the lookup refuses a module the chain did not record under this name
    except KeyError:
        raise ChainWiringError(
            f"the model changed after its Kalman chain was wired: '{name}', on a recorded path, is no longer in the "
            "model. Wire the model again: bkn_export.wire_chain(model, example_inputs)"
        ) from None


def _warn_once(flag: list[bool], text: str, stacklevel: int) -> None:
    """A RuntimeWarning unless ``flag`` (a layer's once-per-layer marker) is set, which it then is; none while
    Dynamo traces (it would be a graph break). stacklevel: as the caller would pass to ``warnings.warn``."""
    if flag or torch.compiler.is_compiling():
        return
    flag.append(True)
    warnings.warn(text, RuntimeWarning, stacklevel=stacklevel + 1)


def standalone_member(name: str) -> ChainMembership:
    """A first-in-chain membership with no root: the layer is BatchNorm and reports to observers."""
    return ChainMembership(None, Wiring(name, None, notes=("not wired: BatchNorm",)))
