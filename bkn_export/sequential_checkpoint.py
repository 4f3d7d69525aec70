"""``checkpoint_sequential`` for networks with a Kalman chain: :func:`bkn_export.recompute.checkpoint` per chunk.

It lives above the chain (:mod:`bkn_export.chain.scope`), which it asks for the forward's scratch when it is given
the wired root itself, as torch documents the call (the modules are then called one by one, not through
``model(x)``, whose hooks open the scratch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from bkn_export.chain.scope import root_scope
from bkn_export.errors import OptionError
from bkn_export.recompute import checkpoint

__all__ = ["checkpoint_sequential"]


def checkpoint_sequential(
    functions: nn.Sequential | list[nn.Module],
    segments: int,
    input: Any,
    use_reentrant: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.utils.checkpoint.checkpoint_sequential(functions, segments, input, use_reentrant=False)`` through
    :func:`~bkn_export.recompute.checkpoint`: ``functions`` (an ``nn.Sequential`` or a list of modules) split into
    ``segments`` chunks of ``len // segments`` modules as torch splits them, each but the last checkpointed, the
    last run as it is. Called on the wired root itself, it opens the forward's chain scratch around the call
    (:func:`bkn_export.chain.scope.root_scope`). kwargs: ``preserve_rng_state`` and the other keyword arguments of
    :func:`~bkn_export.recompute.checkpoint`."""
    if segments < 1:
        raise OptionError(f"bkn_export.checkpoint_sequential: segments must be at least 1, got {segments}")
    modules = list(functions.children()) if isinstance(functions, nn.Sequential) else list(functions)

    def run(start: int, stop: int) -> Callable[[Any], Any]:
        def forward(value: Any) -> Any:
            for module in modules[start:stop]:
                value = module(value)
            return value

        return forward

    size = len(modules) // segments
    stop = 0
    with root_scope(functions):
        for start in range(0, size * (segments - 1), size):
            stop = start + size
            input = checkpoint(run(start, stop), input, use_reentrant=use_reentrant, **kwargs)
        return run(stop, len(modules))(input)
