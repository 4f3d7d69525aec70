"""Activation checkpointing for networks with a Kalman chain: :func:`checkpoint`, a drop-in for
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

Why a wrapper. Activation checkpointing runs a segment of the network twice: once in the forward (keeping
only its inputs) and once more during the backward, to rebuild the tensors autograd saved. A wired BKN
layer k reads its prior μ_{k|k-1}, Σ_{k|k-1} from the posteriors its sources published earlier in the same
forward of the root (:mod:`bkn_export.chain.scope`); during the backward that forward is over, so a layer
recomputed by ``torch.utils.checkpoint`` alone would run as first in chain (BatchNorm) and rebuild other
tensors than it saved: the non-reentrant form then stops with a count mismatch, the reentrant form
back-propagates through the wrong function (wrong gradients, no error). Each such recomputation therefore
raises :class:`~bkn_export.errors.RecomputationError` naming the layer (:func:`refuse_unchained`).

What :func:`checkpoint` does instead, with ``torch.utils.checkpoint``'s own ``context_fn`` hook:

* **forward** (the segment's first run, inside the root's forward): each wired layer computes its prior as
  usual, under saved-tensor hooks that keep the prior's saved tensors in memory (they are (C,)-sized moments
  and the weights the paths read, which the model holds anyway), and appends (layer, prior) to the segment's
  record. The Kalman step, the batch statistics and everything else of the segment is checkpointed as torch
  does it: their saved tensors, the activations, are dropped.
* **recomputation**: each wired layer takes its recorded prior (the same tensors, with their graph) instead
  of predicting, runs the same Kalman step on the recomputed input, and neither publishes its posterior nor
  updates its running statistics again: the segment rebuilds bit for bit the tensors the first run saved,
  so the gradients and the running statistics are those of the same step without checkpointing. (An
  ``nn.BatchNorm`` recomputed by ``torch.utils.checkpoint`` updates its running statistics a second time;
  BKN layers, wired or not, do not.)

The record lives as long as the checkpoint's own saved state (it is what ``context_fn``'s contexts hold), so
a graph backpropagated twice (``retain_graph=True``) replays it twice, and nothing outlives the graph.
Nested checkpoints record into every open record. Under ``torch.compile``, dynamo does not trace
:func:`checkpoint` (it cannot trace this ``context_fn``): the call is a graph break and the segment runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import noop_context_fn

from bkn_export.errors import OptionError, RecomputationError

#: A layer's prior for one call (``bkn_export.nn.Prior`` or None), recorded and handed back as it is; this module
#: does not read it, so it does not import the layers (which import this module).
Prior = Any

__all__ = ["checkpoint", "kept", "refuse_unchained", "remember", "replaying"]


@dataclass
class _Record:
    """The wired layers' priors of one checkpointed segment, in the order the forward called them."""

    entries: list[tuple[nn.Module, Prior | None]] = field(default_factory=list)


class _Replay:
    """A cursor over a :class:`_Record` for one recomputation."""

    def __init__(self, record: _Record) -> None:
        self._record = record
        self._next = 0

    def prior_of(self, layer: nn.Module, name: str) -> Prior | None:
        """The prior ``layer`` received in the segment's forward (its next recorded call)."""
        entries = self._record.entries
        if self._next >= len(entries) or entries[self._next][0] is not layer:
            recorded = entries[self._next][0] if self._next < len(entries) else None
            expected = "no further BKN layer" if recorded is None else f"another layer ({type(recorded).__name__})"
            raise RecomputationError(
                f"BKN layer '{name}' ran during the recomputation of a checkpointed segment where its forward "
                f"ran {expected}: the segment must call the same BKN layers in the same order both times "
                "(no data-dependent branch between BKN layers inside bkn_export.checkpoint)."
            )
        prior = entries[self._next][1]
        self._next += 1
        return prior


#: The records of the checkpointed segments whose forward is running (outermost first).
_RECORDING: ContextVar[tuple[_Record, ...]] = ContextVar("bkn_checkpoint_records", default=())
#: The replay of the segment being recomputed, if any.
_REPLAYING: ContextVar[_Replay | None] = ContextVar("bkn_checkpoint_replay", default=None)


def replaying() -> _Replay | None:
    """The replay of the segment :func:`checkpoint` is recomputing, or None: BKN layers then take their
    recorded prior and neither publish nor update running statistics. None while dynamo traces (which cannot
    trace a ContextVar; :func:`checkpoint` itself runs outside dynamo's graph, so its layers run eagerly)."""
    return None if torch.compiler.is_compiling() else _REPLAYING.get()


def _records() -> tuple[_Record, ...]:
    return () if torch.compiler.is_compiling() else _RECORDING.get()


@contextmanager
def kept_in_memory() -> Iterator[None]:
    """Saved tensors created in the block are kept as they are (not dropped by an enclosing checkpoint)."""
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        yield


def _same(tensor: Any) -> Any:
    return tensor


def kept(compute: Callable[[], Prior | None]) -> Prior | None:
    """``compute()`` (a wired layer's prediction); in a :func:`checkpoint` forward with its saved tensors kept
    in memory, since the recomputation takes the recorded prior instead of predicting again."""
    if not _records():
        return compute()
    with kept_in_memory():
        return compute()


def remember(layer: nn.Module, prior: Prior | None) -> None:
    """Append ``layer``'s prior of this call to every open record (nothing outside a :func:`checkpoint` forward)."""
    for record in _records():
        record.entries.append((layer, prior))


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (where checkpoints recompute)."""
    # Private but long-standing (torch >= 2.0; torch.utils.checkpoint itself reads it).
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def refuse_unchained(layer: nn.Module, name: str) -> None:
    """Raise where a wired layer runs in training mode during a backward pass outside its root's forward and
    outside :func:`checkpoint`'s recomputation: ``torch.utils.checkpoint`` recomputing it without its chain
    (see the module docstring). A layer called on its own elsewhere runs as first in chain, as documented."""
    if layer.training and torch.is_grad_enabled() and _in_backward():
        chain = getattr(layer, "chain", None)
        role = (
            "its prior comes from layers that ran earlier in the forward, which the recomputation cannot see"
            if chain is not None and chain.has_predecessor
            else "it is first in its chain, and its statistics feed the priors of later layers, which the "
            "recomputation cannot reach"
        )
        raise RecomputationError(
            f"BKN layer '{name}' is being recomputed during the backward pass without its Kalman chain "
            f"(activation checkpointing with torch.utils.checkpoint): {role}, so the gradients would be those of "
            "another function. Checkpoint the segment with bkn_export.checkpoint(function, *args) instead of "
            "torch.utils.checkpoint.checkpoint (same arguments; use_reentrant=False), or checkpoint the whole "
            "wired model."
        )


class _Recording(AbstractContextManager[None]):
    """The forward context of one checkpointed segment: its layers' priors go into ``record``."""

    def __init__(self, record: _Record) -> None:
        self._record = record
        self._token: Token[tuple[_Record, ...]] | None = None

    def __enter__(self) -> None:
        self._token = _RECORDING.set((*_RECORDING.get(), self._record))

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _RECORDING.reset(self._token)
        self._token = None


class _Replaying(AbstractContextManager[None]):
    """The recomputation context of one checkpointed segment; entered once per recomputation (a graph
    backpropagated twice recomputes twice), each time from the record's start."""

    def __init__(self, record: _Record) -> None:
        self._record = record
        self._tokens: list[Token[_Replay | None]] = []

    def __enter__(self) -> None:
        self._tokens.append(_REPLAYING.set(_Replay(self._record)))

    def __exit__(self, *exc: object) -> None:
        _REPLAYING.reset(self._tokens.pop())


class _Both(AbstractContextManager[None]):
    """Two context managers entered in order and left in reverse (re-enterable: one stack per entry)."""

    def __init__(self, first: AbstractContextManager[Any], second: AbstractContextManager[Any]) -> None:
        self._contexts = (first, second)
        self._stacks: list[ExitStack] = []

    def __enter__(self) -> None:
        stack = ExitStack()
        try:
            for context in self._contexts:
                stack.enter_context(context)
        except BaseException:
            stack.close()
            raise
        self._stacks.append(stack)

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._stacks.pop().__exit__(*exc))


@torch.compiler.disable(
    reason="bkn_export.checkpoint runs its segment eagerly (Dynamo cannot trace the context_fn that replays the "
    "Kalman chain's priors): a graph break; compile the segment's modules inside it instead of fullgraph=True"
)
def checkpoint(
    function: Callable[..., Any],
    *args: Any,
    use_reentrant: bool | None = None,
    context_fn: Callable[[], tuple[AbstractContextManager[Any], AbstractContextManager[Any]]] | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)`` that keeps the
    Kalman chain of the BKN layers inside ``function`` (see the module docstring): the same outputs, and
    after ``backward`` the same gradients and running statistics as ``function(*args)`` without
    checkpointing, bit for bit.

    use_reentrant: only False (or None) is accepted; the reentrant form recomputes under a detached copy of
    the inputs and cannot carry a gradient through a prior that comes from outside the segment.
    context_fn: as torch's (e.g. selective checkpointing); its contexts are entered inside this wrapper's.
    Other keyword arguments (``preserve_rng_state``, ``determinism_check``, ``debug``, ``early_stop``, and the
    function's own keyword arguments) go to torch unchanged. Under ``torch.compile`` the call is a graph break:
    the segment runs eagerly, checkpointed, and its layers read the chain the compiled frames published
    (:func:`bkn_export.chain.scope.scratch_for`).
    """
    if use_reentrant:
        raise OptionError(
            "bkn_export.checkpoint: use_reentrant=True is not supported: reentrant checkpointing detaches the "
            "segment from the prior its BKN layers receive from earlier layers, so no gradient would reach them. "
            "Leave use_reentrant unset (False)."
        )
    user_contexts = context_fn if context_fn is not None else noop_context_fn

    def contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
        record = _Record()
        forward, recompute = user_contexts()
        return _Both(_Recording(record), forward), _Both(_Replaying(record), recompute)

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)
