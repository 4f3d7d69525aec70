"""The chain's per-call state: what each layer published during one forward of its root.

A wired *root* (the model :func:`bkn_export.wire_chain` was called on) carries a
:class:`ChainRoot` token and two hooks: a forward pre-hook opens a fresh
:class:`ChainScratch` for the call, and a forward hook registered with
``always_call=True`` drops it, so that a forward that raises leaves nothing behind.
Within the call, each wired layer publishes its posterior into the scratch under its
name and reads its sources' posteriors from it; when the call returns, the scratch is
gone. No module attribute holds a posterior between calls, and nothing is cleared by
position.

Where the scratch lives during the call:

* eager (and non-strict ``torch.export``, which runs the Python code as is): a
  ``contextvars.ContextVar`` mapping each open root to its scratch, so two threads (or
  asyncio tasks) running the same model never see each other's posteriors;
* while dynamo traces (``torch.compile``, strict ``torch.export``), which cannot trace a
  ContextVar: a slot on the root's token, set and cleared within the traced call (the
  traced graph itself carries the posteriors as plain data flow, and dynamo compiles
  one frame at a time). Compile the root you wired: a layer traced by dynamo inside a
  compiled *submodule* of an eager root does not see the eager scratch and runs as
  first in chain. The other way round works: where a compiled forward of the root runs
  part of itself eagerly (a graph break into code dynamo does not trace:
  ``torch.compiler.disable``, :func:`bkn_export.checkpoint`), dynamo has replayed the traced
  frame's side effects, so the token's slot holds the scratch with real tensors and the
  eager layers read it (an eager forward of the root clears a slot that a compiled forward
  which raised left behind).

A layer called outside a forward of its root finds no scratch and behaves exactly as a
first-in-chain layer, i.e. as ``nn.BatchNorm*d``.

Which paths ran: the scratch keeps a call counter (``clock``). Each publication stamps the
counter (``published_at``), and :func:`watch_modules` puts a forward pre-hook
(:class:`PathWatch`) on every leaf module that sits on a recorded path (the Conv/Linear of
an ``Affine`` step, and the module of a ``Pool``, ``Resample``, ``Elementwise`` or
``Identity`` step that came from one), which appends the counter to ``calls[name]``.
:func:`bkn_export.chain.transitions.unrun_module` then checks, per call, that the modules of
a path ran after its source published (not their order among themselves). Functional steps (``F.relu``,
``F.avg_pool2d``, arithmetic) leave no trace and are not checked; neither is whether a
module that ran was fed by the recorded source.

:func:`bkn_export.chain.observe.observe` opens an additional scratch in which *every* BKN layer of a model
publishes (wired or not), with its prior and batch statistics: what the training-mode
export and :func:`bkn_export.chain_statistics` read instead of patching the layers.
"""

from __future__ import annotations

import numbers
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from bkn_export import functional as Fk
from bkn_export.errors import ChainWiringError
from bkn_export.nn import _EXTRA_STATE_KEY, Prior, _BatchKalmanNorm

__all__ = [
    "ChainRoot",
    "ChainScratch",
    "GlobalHooks",
    "HookSignature",
    "Observation",
    "Observer",
    "PathWatch",
    "Published",
    "Settings",
    "Submodules",
    "attach_root",
    "close_observer",
    "detach_roots",
    "forward_scope",
    "global_forward_hooks",
    "global_hook_change",
    "global_hooks",
    "hook_change",
    "hook_signature",
    "hook_signatures",
    "library_hook",
    "module_settings",
    "module_settings_of",
    "move_root",
    "observers",
    "open_observer",
    "raw_signature",
    "root_scope",
    "scratch_for",
    "settings_change",
    "settings_moved",
    "watch_modules",
]

#: The attribute of a wired root module that holds its ChainRoot token.
ROOT_ATTRIBUTE = "_bkn_chain_root"


class Published(NamedTuple):
    """What one layer hands on within a call.

    posterior_mean, posterior_variance: (C,) μ_{j|j}, Σ_{j|j}; count: elements per channel
    its statistics span (an int, a SymInt while tracing); input_shape: (N, C, *) of its
    input; weight, bias: γ, β (C,) or None (detached where the layer ran in the user's ``torch.no_grad()`` region:
    its Gaussian is then a constant of the prior, as its output is of the data); eps: ε (for
    ``prior_source="output"``).
    """

    posterior_mean: Tensor
    posterior_variance: Tensor
    count: Any
    input_shape: tuple[int, ...]
    weight: Tensor | None
    bias: Tensor | None
    eps: float


class ChainRoot:
    """The identity of one wired root model (compared by identity; copied with the model).

    ``traced`` holds the open scratch only while dynamo traces a call of the root; ``watched`` the names of the
    modules its paths go through that carry a :class:`PathWatch` (:func:`watch_modules`).
    """

    __slots__ = ("global_hooks", "hooks", "settings", "traced", "warned_hooks", "watched")

    def __init__(
        self,
        watched: frozenset[str] = frozenset(),
        hooks: Any = None,
        settings: Any = None,
        global_hooks: Any = None,
        *_: Any,
    ) -> None:
        self.traced: ChainScratch | None = None
        self.watched = watched
        #: Per module a prediction goes through (path modules, source layers, the layers themselves), its hooks as
        #: wired (:func:`hook_signatures`); empty for a pickle of a root from before 2026-12-07's fifth session
        #: (which passed an input shape or nothing here): nothing is compared then.
        self.hooks: dict[str, HookSignature] = dict(hooks) if isinstance(hooks, dict) else {}
        #: Per module on a path whose settings the recording took as constants (an activation's slope, a pooling's
        #: kernel), those settings as wired (:func:`module_settings_of`); empty for a pickle from before 2026-12-07's
        #: sixth session: nothing is compared then.
        self.settings: dict[str, Settings] = dict(settings) if isinstance(settings, dict) else {}
        #: torch's global forward (pre-)hooks as wired (:func:`global_hooks`); None for a pickle of a root from before
        #: they were kept (which passed three arguments): nothing is compared then.
        self.global_hooks: GlobalHooks | None = global_hooks if isinstance(global_hooks, GlobalHooks) else None
        #: Whether a layer has warned that those hooks changed (once per root; a copy warns again).
        self.warned_hooks: list[bool] = []

    def __reduce__(
        self,
    ) -> tuple[
        type[ChainRoot], tuple[frozenset[str], dict[str, HookSignature], dict[str, Settings], GlobalHooks | None]
    ]:
        # A copy (deepcopy, pickle) is a new identity with no open scratch; hook keys and settings survive both (the
        # global hooks' keys mean something in the process that took them only: GlobalHooks.process).
        return ChainRoot, (self.watched, self.hooks, self.settings, self.global_hooks)


class Submodules(Mapping[str, nn.Module]):
    """The live modules of ``root`` by qualified name (what steps look their modules up in).

    Lookups walk the module tree (``get_submodule``): nothing is copied per call. Each name's
    module is remembered after its first lookup: a scratch (one forward of the root) makes its
    own instance, and a path's steps look up the same names for every layer they feed.
    """

    def __init__(self, root: nn.Module, token: ChainRoot | None = None) -> None:
        self._root = root
        self._token = token
        self._found: dict[str, nn.Module] = {}

    def __getitem__(self, name: str) -> nn.Module:
        module = self._found.get(name)
        if module is not None:
            return module
        module = self._registered(name)
        if module is None:
            try:
                module = self._root.get_submodule(name)
            except AttributeError:
                raise KeyError(name) from None
        self._check_recorded(name, module)
        self._found[name] = module
        return module

    def _check_recorded(self, name: str, module: nn.Module) -> None:
        """Refuse a module that the chain recorded under another name: the model was edited in place after wiring
        (``Sequential.insert``, deleting a block), so names now point at other modules, and a prediction through
        them would describe another network (its :class:`PathWatch` stamps its recorded names, so the path check
        passes), or one under a watched name that is not the recorded one (replaced, wrapped or moved). A module the
        chain does not watch passes."""
        if self._token is None:
            return
        watches = [h for h in module._forward_pre_hooks.values() if isinstance(h, PathWatch) and h.root is self._token]
        for watch in watches:
            if name not in watch.names:
                raise ChainWiringError(
                    f"the model changed after its Kalman chain was wired: '{name}' is now the "
                    f"{type(module).__name__} the chain recorded as {' / '.join(repr(n) for n in watch.names)} "
                    "(modules were inserted, removed or moved in place, renaming others). Wire the model again: "
                    "bkn_export.wire_chain(model, example_inputs)"
                )
        if not watches and name in self._token.watched:
            raise ChainWiringError(
                f"the model changed after its Kalman chain was wired: '{name}' is now a {type(module).__name__}, not "
                "the module the chain recorded there (replaced, wrapped or moved in place). Wire the model again: "
                "bkn_export.wire_chain(model, example_inputs)"
            )

    def _registered(self, name: str) -> nn.Module | None:
        """The module registered under ``name`` (each atom a key of its parent's ``_modules``, as
        ``named_modules`` names it), or None: ``get_submodule`` then decides (an attribute that is a
        module without being registered, or a KeyError). Without ``getattr``'s two lookups per atom."""
        module: nn.Module | None = self._root
        for atom in name.split(".") if name else ():
            module = module._modules.get(atom) if module is not None else None
        return module

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._root.named_modules())

    def __len__(self) -> int:
        return sum(1 for _ in self._root.named_modules())


class ChainScratch:
    """The posteriors published during one forward of a root, by layer name.

    predictions: the moments already pushed through a path in this call (what
    :meth:`bkn_export.chain.transitions.Transition.predict` reuses), keyed by the path's
    start and steps, with the published entry they were computed from.
    clock: a counter of publications and watched module calls in this call;
    published_at: the clock at each layer's latest publication (a posterior put into
    ``published`` by hand has none, and its paths are not checked); calls: the clock at
    every call of each watched module (:class:`PathWatch`), in order.
    """

    def __init__(self, root: ChainRoot, modules: Mapping[str, nn.Module]) -> None:
        self.root = root
        self.modules = modules
        #: Per watched module, the spatial size (dims 2..) of its first input at its latest call in this call.
        self.module_inputs: dict[str, tuple[Any, ...]] = {}
        self.published: dict[str, Published] = {}
        self.predictions: dict[Any, Any] = {}
        #: The wired modules whose hooks, settings or parametrizations the layers' checks look at in this call,
        #: found on the first check (:func:`bkn_export.chain.member._moved_modules`); None before it.
        self.inspected: tuple[str, ...] | None = None
        self.token: Token[Mapping[ChainRoot, ChainScratch]] | None = None
        self.clock = 0
        self.published_at: dict[str, int] = {}
        #: Per layer, how many times it published in this call; per (reader, source), that count at the last read.
        self.publications: dict[str, int] = {}
        self.reads: dict[tuple[str, str], int] = {}
        self.calls: dict[str, list[int]] = {}

    def publish(self, name: str, published: Published) -> None:
        """Hand on ``name``'s posterior, stamped with the clock and counted."""
        self.clock += 1
        self.published[name] = published
        self.published_at[name] = self.clock
        self.publications[name] = self.publications.get(name, 0) + 1

    def publications_since_read(self, reader: str, sources: Iterable[str]) -> dict[str, int]:
        """How many times each source of ``reader`` published since its last read in this call (not noting a read)."""
        return {source: self.publications.get(source, 0) - self.reads.get((reader, source), 0) for source in sources}

    def unread_publications(self, reader: str, sources: Iterable[str]) -> list[tuple[str, int]]:
        """The sources of ``reader`` that published more than once since its last read in this call, with how many
        times (their earlier posterior replaced before it read one: the same layers run on interleaved inputs,
        ``a = block(a); b = block(b)``), noting this read."""
        since = self.publications_since_read(reader, sources)
        for source in since:
            self.reads[(reader, source)] = self.publications.get(source, 0)
        return [(source, count) for source, count in since.items() if count > 1]


_OPEN: ContextVar[Mapping[ChainRoot, ChainScratch]] = ContextVar("bkn_chain_scratches", default=MappingProxyType({}))


def scratch_for(root: ChainRoot) -> ChainScratch | None:
    """The scratch of the current call of ``root`` in this thread/task, or None outside one."""
    if torch.compiler.is_dynamo_compiling():
        return root.traced
    scratch = _OPEN.get().get(root)
    # Outside dynamo's trace inside a compiled forward of the root (a graph break into code dynamo does not
    # trace: torch._dynamo.disable, bkn_export.checkpoint): dynamo has replayed the traced frame's side effects,
    # so the token holds the scratch, with the published posteriors as real tensors.
    return root.traced if scratch is None else scratch


def _open_scratch(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a wired root: a fresh scratch for this call."""
    root: ChainRoot = module.__dict__[ROOT_ATTRIBUTE]
    scratch = ChainScratch(root, Submodules(module, root))
    if torch.compiler.is_dynamo_compiling():
        root.traced = scratch
        return
    root.traced = None  # left behind by a compiled forward that raised: not this call's
    scratch.token = _OPEN.set(MappingProxyType({**_OPEN.get(), root: scratch}))


def _close_scratch(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (always called, also when the forward raises): drop this call's scratch."""
    root: ChainRoot = module.__dict__[ROOT_ATTRIBUTE]
    if torch.compiler.is_dynamo_compiling():
        root.traced = None
        return
    scratch = _OPEN.get().get(root)
    if scratch is not None and scratch.token is not None:
        _OPEN.reset(scratch.token)


@contextmanager
def forward_scope(model: nn.Module) -> Iterator[ChainScratch]:
    """The scratch of a forward of the wired root ``model``, opened by hand (eager only).

    What the root's hooks do around ``model(...)``, for code that calls layers of the
    chain one by one (benchmarks, tests) and publishes a source's posterior itself. A
    posterior put into ``scratch.published`` by hand carries no clock, so the paths from
    it are not checked for having run (:class:`ChainScratch`).
    """
    _open_scratch(model, ())
    try:
        scratch = scratch_for(model.__dict__[ROOT_ATTRIBUTE])
        assert scratch is not None
        yield scratch
    finally:
        _close_scratch(model, (), None)


def root_scope(model: Any) -> AbstractContextManager[Any]:
    """:func:`forward_scope` where ``model`` is a wired root with no forward of it running (a call that runs its
    modules one by one, outside ``model(x)``: ``checkpoint_sequential(model, ...)``); nothing otherwise (not a root,
    or inside its forward already)."""
    root = model.__dict__.get(ROOT_ATTRIBUTE) if isinstance(model, nn.Module) else None
    if root is None or scratch_for(root) is not None:
        return nullcontext()
    return forward_scope(model)


def attach_root(model: nn.Module) -> ChainRoot:
    """Make ``model`` a chain root: a new token and the two hooks (earlier ones of the tree removed)."""
    root = ChainRoot()
    _install(model, root)
    return root


def _install(model: nn.Module, root: ChainRoot) -> None:
    detach_roots(model)
    model.__dict__[ROOT_ATTRIBUTE] = root
    # First among the pre-hooks, so that no other pre-hook can fail before the scratch is open.
    model.register_forward_pre_hook(_open_scratch, prepend=True)
    model.register_forward_hook(_close_scratch, always_call=True)
    model.register_load_state_dict_pre_hook(_check_saved_wirings)


def _check_saved_wirings(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook of a wired root: the saved wiring of every layer of its chain is checked before any
    tensor of the root is loaded, so that a refused checkpoint (ChainWiringError) leaves the model as it was (each
    layer's own check ran as it loaded, after the layers before it)."""
    root = module.__dict__.get(ROOT_ATTRIBUTE)
    for name, layer in module.named_modules():
        if not isinstance(layer, _BatchKalmanNorm) or getattr(layer.chain, "root", None) is not root:
            continue
        key = f"{prefix}{name}.{_EXTRA_STATE_KEY}" if name else f"{prefix}{_EXTRA_STATE_KEY}"
        if key in state_dict:
            layer.check_saved_state(state_dict[key])


def move_root(source: nn.Module, target: nn.Module) -> None:
    """Make ``target`` the root of the chain wired on ``source`` (same token: its layers follow).

    For a conversion that wires a working copy and then moves the new layers into the
    original model. A ``source`` that is not a root leaves ``target`` as it is.
    """
    root = source.__dict__.get(ROOT_ATTRIBUTE)
    if source is target or not isinstance(root, ChainRoot):
        return
    watched = [
        name
        for module in source.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, PathWatch) and hook.root is root
        for name in hook.names
    ]
    detach_roots(source)
    _install(target, root)
    watch_modules(target, root, watched)
    root.hooks = hook_signatures(target, root.hooks)  # the target's own modules, with their new watches
    root.settings = module_settings_of(target, root.settings)


class PathWatch:
    """Forward pre-hook on a module of a recorded path: stamps each call into the open scratch, with the spatial size
    of its input (:attr:`ChainScratch.module_inputs`).

    root: the chain's token; names: the module's qualified names in the root (one module
    may be registered under several). Outside a forward of the root it does nothing.
    """

    __slots__ = ("names", "root")

    def __init__(self, root: ChainRoot, names: tuple[str, ...]) -> None:
        self.root = root
        self.names = names

    def __call__(self, module: nn.Module, args: Any) -> None:
        scratch = scratch_for(self.root)
        if scratch is None:
            return
        scratch.clock += 1
        spatial = tuple(args[0].shape[2:]) if args and isinstance(args[0], Tensor) else None
        for name in self.names:
            scratch.calls.setdefault(name, []).append(scratch.clock)
            if spatial is not None:
                scratch.module_inputs[name] = spatial


class HookSignature(NamedTuple):
    """A module's forward hooks and forward as a prediction through it assumes them (:func:`hook_signature`).

    raw: the keys of all its forward pre-hooks and forward hooks and whether its instance replaces ``forward``
    (compared first: unchanged in the usual case); user: the same without the library's own hooks
    (:func:`library_hook`), which come and go around calls (parity's localisation, export) and compute nothing.
    """

    raw: tuple[tuple[int, ...], tuple[int, ...], bool]
    user: tuple[tuple[int, ...], tuple[int, ...], bool]


def library_hook(hook: Any) -> bool:
    """Whether ``hook`` leaves a module's computation as the chain recorded it: bkn_export's and its runtime's own
    hooks (which read or stamp), torch's weight reparametrizations (``weight_norm``, ``spectral_norm``, ``prune``:
    pre-hooks that set the weight, which the prediction reads in the weight), torch.distributed's (FSDP's
    gathering of a module's parameters around its forward) and torch's ``ModuleTracker`` (global hooks that note
    which module runs, for ``FlopCounterMode``)."""
    if isinstance(hook, (PathWatch, WeightNorm, SpectralNorm, BasePruningMethod)):
        return True
    module = getattr(hook, "__module__", None) or ""
    return module.startswith(("bkn_export.", "runtime.", "torch.distributed.", "torch.utils.module_tracker"))


def raw_signature(module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """The keys of ``module``'s forward pre-hooks and forward hooks, and whether its instance sets ``forward``."""
    return tuple(module._forward_pre_hooks), tuple(module._forward_hooks), "forward" in module.__dict__


def hook_signature(module: nn.Module) -> HookSignature:
    """``module``'s :class:`HookSignature` now."""
    raw = raw_signature(module)
    user_pre = tuple(key for key, hook in module._forward_pre_hooks.items() if not library_hook(hook))
    user_post = tuple(key for key, hook in module._forward_hooks.items() if not library_hook(hook))
    return HookSignature(raw, (user_pre, user_post, raw[2]))


def hook_change(
    module: nn.Module, wired: HookSignature, kinds: tuple[bool, bool, bool] = (True, True, True)
) -> str | None:
    """What changed in ``module``'s own hooks or forward since ``wired`` was taken, or None: forward pre-hooks or
    forward hooks added or removed (not the library's, :func:`library_hook`), or a ``forward`` set or deleted on the
    instance; ``kinds`` says which of those three count (a layer's own output hooks do not change its input). The raw
    keys are compared first: unchanged in the usual case (it runs in every wired layer's train step)."""
    if raw_signature(module) == wired.raw:
        return None
    now = hook_signature(module).user
    changes = []
    for counts, kind, then, current in zip(kinds[:2], ("forward pre-hook", "forward hook"), wired.user[:2], now[:2]):
        if counts:
            changes += _keys_change(kind, then, current)
    if kinds[2] and now[2] != wired.user[2]:
        changes.append("its forward set on the instance" if now[2] else "the forward set on its instance removed")
    return ", ".join(changes) or None


def _keys_change(kind: str, wired: Iterable[int], now: Iterable[int]) -> list[str]:
    """How many hooks of ``kind`` were added and removed between the keys ``wired`` and ``now`` (a hook removed and
    registered again has a new key: one of each)."""
    then, current = set(wired), set(now)
    counts = ((len(current - then), "added"), (len(then - current), "removed"))
    return [f"{n} {kind}(s) {how}" for n, how in counts if n]


class GlobalHooks(NamedTuple):
    """The keys of torch's global forward pre-hooks and forward hooks (``register_module_forward_pre_hook``,
    ``register_module_forward_hook``: they run around every module's forward), the library's own aside
    (:func:`library_hook`), and the process that took them (:data:`_PROCESS`): a key is a counter of that process
    (another process numbers its hooks from 0 again), so in another one only how many there are can be compared."""

    pre_hooks: frozenset[int]
    hooks: frozenset[int]
    process: str = ""


#: This process's token for :class:`GlobalHooks`: random, not its pid (a container's processes reuse pids: each is
#: pid 1 in its own namespace), and new in a forked child (whose own hooks then number on from its parent's).
_PROCESS = uuid.uuid4().hex


def _new_process_token() -> None:
    global _PROCESS
    _PROCESS = uuid.uuid4().hex


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_process_token)


def global_hooks() -> GlobalHooks:
    """The :class:`GlobalHooks` registered now."""
    pre, post = torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks
    return GlobalHooks(
        frozenset(key for key, hook in pre.items() if not library_hook(hook)),
        frozenset(key for key, hook in post.items() if not library_hook(hook)),
        _PROCESS,
    )


def _same_keys(hooks: Mapping[int, Any], wired: frozenset[int]) -> bool:
    """Whether ``hooks`` holds the keys ``wired``, without a keys view where both are empty."""
    return (not hooks and not wired) or hooks.keys() == wired


def global_hook_change(wired: GlobalHooks) -> str | None:
    """What changed in torch's global forward (pre-)hooks since ``wired`` was taken, or None (the library's own hooks
    aside). The keys are compared as they are first: unchanged in the usual case (it runs once in every train step),
    and with no global hook then or now, nothing is allocated. Taken in another process (a model pickled there),
    only the numbers of hooks are compared: one hook replaced by another is not seen then."""
    pre, post = torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks
    same_process = wired.process == _PROCESS
    if same_process and _same_keys(pre, wired.pre_hooks) and _same_keys(post, wired.hooks):
        return None
    now = global_hooks()
    pairs = (
        ("global forward pre-hook", wired.pre_hooks, now.pre_hooks),
        ("global forward hook", wired.hooks, now.hooks),
    )
    if same_process:
        changes = [change for kind, then, current in pairs for change in _keys_change(kind, then, current)]
    else:
        changes = [change for kind, then, current in pairs for change in _count_change(kind, len(then), len(current))]
    return ", ".join(changes) or None


def _count_change(kind: str, wired: int, now: int) -> list[str]:
    """How many hooks of ``kind`` more or fewer there are than the ``wired`` number, as :func:`_keys_change` says it."""
    if now == wired:
        return []
    return [f"{abs(now - wired)} {kind}(s) {'added' if now > wired else 'removed'} (wired in another process)"]


def hook_signatures(model: nn.Module, names: Iterable[str]) -> dict[str, HookSignature]:
    """:func:`hook_signature` of each module of ``model`` named in ``names`` (names that are no module skipped, and a
    ``ModuleList`` / ``ModuleDict``: never called, its hooks never run)."""
    found = {}
    for name in dict.fromkeys(names):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            found[name] = hook_signature(module)
    return found


#: A module's settings as :func:`module_settings` reads them: (attribute, value) pairs.
Settings = tuple[tuple[str, Any], ...]


def module_settings(module: nn.Module) -> Settings | None:
    """The settings of ``module`` that a recorded step holds as constants: the attributes its class declares in
    torch's ``__constants__`` (LeakyReLU's ``negative_slope``, Hardtanh's bounds, a pooling's kernel, stride and
    padding, Upsample's scale and mode, Flatten's dims, a pad's widths), ``inplace`` aside (it changes no value); None
    for a module whose steps read it at every call (a conv, a Linear: their weights, stride and padding are followed),
    a normalization, dropout (no step) or a class without ``__constants__``."""
    if isinstance(
        module,
        (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd),
    ) or isinstance(module, _BatchKalmanNorm):
        return None
    constants = getattr(type(module), "__constants__", None)
    if not isinstance(constants, (list, tuple)):
        return None
    names = [name for name in constants if isinstance(name, str) and name != "inplace"]
    found = tuple((name, value) for name in names if _plain(value := module.__dict__.get(name)))
    return found or None


def _plain(value: Any) -> bool:
    """Whether ``value`` is a number (NumPy's too), string, None or a tuple / list of those (compared by value; a
    tensor is not)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(item) for item in value)
    return value is None or (isinstance(value, (numbers.Number, str)) and not isinstance(value, Tensor))


def _same(value: Any, wired: Any) -> bool:
    """``value == wired``, NaN equal to NaN (a pad's value, unpickled), element by element in tuples."""
    if value is wired:
        return True
    if isinstance(value, (tuple, list)) and isinstance(wired, (tuple, list)):
        return len(value) == len(wired) and all(_same(a, b) for a, b in zip(value, wired))
    try:
        return bool(value == wired) or (value != value and wired != wired)  # NaN: unequal to itself
    except (TypeError, ValueError):
        return False


def settings_moved(module: nn.Module, wired: Settings) -> bool:
    """Whether a setting of ``module`` differs from ``wired`` (per call: a lookup and compare per setting)."""
    held = module.__dict__
    return any(held.get(name) is not value and not _same(held.get(name), value) for name, value in wired)


def module_settings_of(model: nn.Module, names: Iterable[str]) -> dict[str, Settings]:
    """:func:`module_settings` of each module of ``model`` named in ``names`` that has such settings."""
    found = {}
    for name in dict.fromkeys(names):
        try:
            settings = module_settings(model.get_submodule(name))
        except AttributeError:
            continue
        if settings is not None:
            found[name] = settings
    return found


def settings_change(module: nn.Module, wired: Settings) -> str | None:
    """What changed in ``module``'s settings since ``wired`` was taken (``negative_slope 0.1 → 0.5``), or None."""
    if not settings_moved(module, wired):
        return None
    held = module.__dict__
    changed = [f"{name} {value!r} → {held.get(name)!r}" for name, value in wired if not _same(held.get(name), value)]
    return ", ".join(changed)


def global_forward_hooks() -> bool:
    """Whether global forward (pre-)hooks are registered (``nn.modules.module.register_module_forward_hook``), the
    library's own aside (:func:`library_hook`)."""
    hooks = global_hooks()
    return bool(hooks.pre_hooks or hooks.hooks)


def watch_modules(model: nn.Module, root: ChainRoot, names: Iterable[str]) -> frozenset[str]:
    """Put one :class:`PathWatch` of ``root`` on each module named in ``names`` (once per module
    object); returns the names now watched.

    Only leaf modules are watched: a module with children may run a step inside a forward
    that also runs the normalizations around it, so its call says nothing about the order.
    """
    by_module: dict[int, tuple[nn.Module, list[str]]] = {}
    for name in dict.fromkeys(names):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if next(module.children(), None) is not None:
            continue
        by_module.setdefault(id(module), (module, []))[1].append(name)
    for module, module_names in by_module.values():
        module.register_forward_pre_hook(PathWatch(root, tuple(module_names)))
    return frozenset(n for _, module_names in by_module.values() for n in module_names)


def detach_roots(model: nn.Module) -> None:
    """Remove the chain-root tokens and hooks from ``model`` and every submodule, with the
    :class:`PathWatch` hooks of those roots (also where they sit on modules of this tree)."""
    modules = list(model.modules())
    roots = {id(r) for m in modules if isinstance(r := m.__dict__.get(ROOT_ATTRIBUTE), ChainRoot)}
    for module in modules:
        module.__dict__.pop(ROOT_ATTRIBUTE, None)
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _open_scratch or (isinstance(hook, PathWatch) and id(hook.root) in roots):
                del module._forward_pre_hooks[key]
        for key, hook in list(module._forward_hooks.items()):
            if hook is _close_scratch:
                del module._forward_hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        for key, hook in list(module._load_state_dict_pre_hooks.items()):
            if getattr(hook, "hook", None) is _check_saved_wirings:
                del module._load_state_dict_pre_hooks[key]


# --------------------------------------------------------------------------- observation


class Observation(NamedTuple):
    """One layer's train-mode step as an :class:`Observer` saw it (first call per forward).

    prior: the transition's prediction with the Gaussians it pushed (None: no prior in
    this call); op_prior: (μ_{k|k-1}, Σ_{k|k-1} + R_k, p_k) as the op received them;
    batch: the layer's batch statistics of its local input; published: the posterior.
    """

    prior: Prior | None
    op_prior: tuple[Tensor, Tensor, Tensor]
    batch: Fk.BatchStatistics
    published: Published


class Observer:
    """Collects an :class:`Observation` per BKN layer of ``model``, in call order."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): name for name, m in model.named_modules() if isinstance(m, _BatchKalmanNorm)}
        self._known = frozenset(self.names.values())
        self.observations: dict[str, Observation] = {}
        #: Per layer name: what each of its calls in this forward published, in call order (a layer that the
        #: forward calls twice, its weights shared, updates its running statistics twice).
        self.calls: dict[str, list[Published]] = {}
        #: Per layer name: the recorded paths that did not run (first call per forward).
        self.unrun: dict[str, tuple[str, ...]] = {}
        self._priors: dict[int, Prior | None] = {}

    def _name(self, layer: nn.Module) -> str | None:
        """``layer``'s name in the observed model; for a copy of one of its layers, the name its chain membership
        carries (``torch.export`` traces a module registered under two names, as MONAI's DynUNet registers its
        blocks, through copies of it)."""
        name = self.names.get(id(layer))
        if name is None:
            chain = getattr(layer, "chain", None)
            carried = getattr(chain, "name", None)
            if carried in self._known:
                return str(carried)
        return name

    def saw_prior(self, layer: nn.Module, prior: Prior | None, unrun: tuple[str, ...] = ()) -> None:
        name = self._name(layer)
        if name is not None:
            self._priors[id(layer)] = prior
            if name not in self.observations:
                self.unrun[name] = unrun

    def saw_posterior(
        self, layer: nn.Module, published: Published, op_prior: tuple[Tensor, Tensor, Tensor], x: Tensor
    ) -> None:
        name = self._name(layer)
        if name is not None:
            self.calls.setdefault(name, []).append(published)
        if name is not None and name not in self.observations:
            prior = self._priors.pop(id(layer), None)
            self.observations[name] = Observation(prior, op_prior, Fk.batch_statistics(x), published)


_OBSERVERS: ContextVar[tuple[Observer, ...]] = ContextVar("bkn_chain_observers", default=())


def observers() -> tuple[Observer, ...]:
    """The observers open in this thread/task (none while dynamo traces)."""
    if torch.compiler.is_dynamo_compiling():
        return ()
    return _OBSERVERS.get()


def open_observer(observer: Observer) -> Token[tuple[Observer, ...]]:
    """Start reporting to ``observer`` in this thread/task; pass the token to :func:`close_observer`."""
    return _OBSERVERS.set((*_OBSERVERS.get(), observer))


def close_observer(token: Token[tuple[Observer, ...]]) -> None:
    _OBSERVERS.reset(token)
