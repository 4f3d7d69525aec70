"""Running a user's model in another train/eval mode and giving it back as it was found.

``model.train()`` / ``model.eval()`` set every submodule's ``training`` flag, which loses
a mixed state (a frozen BatchNorm in eval inside a training model). Every place that runs
a model in a mode of its own (export, recording the chain, the conversion guard, the
runtime's PyTorch reference) goes through :func:`kept_modes`, so the flags of all
submodules are restored, each to its own value, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "kept_modes"]


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's own ``training`` flag after the block; yields ``model``."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode for the block; each one's own mode restored afterwards."""
    with kept_modes(model):
        model.eval()
        yield model
