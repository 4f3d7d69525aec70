"""Watch every BKN layer of a model during a block: :func:`observe`.

What the training-mode export (posteriors and counts as graph outputs) and
:func:`bkn_export.chain_statistics` read, instead of patching the layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from bkn_export.chain.member import standalone_member
from bkn_export.chain.scope import Observer, close_observer, open_observer
from bkn_export.nn import _BatchKalmanNorm

__all__ = ["observe"]


@contextmanager
def observe(model: nn.Module) -> Iterator[Observer]:
    """Within the block, every BKN layer of ``model`` reports its train-mode step to the observer.

    Layers with no chain get a standalone first-in-chain membership for the block (they
    behave as before: BatchNorm) and lose it again afterwards. Eager Python only (and
    non-strict ``torch.export``, which runs it as is); dynamo-traced calls report nothing.
    """
    observer = Observer(model)
    unwired = [m for m in model.modules() if isinstance(m, _BatchKalmanNorm) and m.chain is None]
    for layer in unwired:
        layer.chain = standalone_member(observer.names[id(layer)])
    token = open_observer(observer)
    try:
        yield observer
    finally:
        close_observer(token)
        for layer in unwired:
            layer.chain = None
