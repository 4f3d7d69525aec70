"""Running a user's model on example inputs, in another train/eval mode, and giving it back as it was found.

``model.train()`` / ``model.eval()`` set every submodule's ``training`` flag, which loses
a mixed state (a frozen BatchNorm in eval inside a training model). Every place that runs
a model in a mode of its own (export, recording the chain, the conversion guard, the
runtime's PyTorch reference) goes through :func:`kept_modes`, so the flags of all
submodules are restored, each to its own value, also after an exception.
:func:`call_example` is the one reading of "example inputs": a tensor, a tuple/list of
positional inputs or a dict of keyword inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "call_example",
    "copied",
    "eval_forward",
    "eval_mode",
    "frozen_layers",
    "frozen_layers_note",
    "kept_modes",
    "train_layers_only",
]


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


def train_layers_only(layers: Iterable[nn.Module]) -> None:
    """Set ``training = True`` on each of ``layers`` itself, not on its children.

    ``layer.train()`` is recursive: on a normalization layer that carries submodules (a
    ``BatchKalmanNormAct2d`` with a ``drop`` Dropout and an ``act``) it would switch the
    Dropout to train mode too, so a training-mode export would bake a fixed random mask into
    the graph and the PyTorch reference would be random. Here only the layers' own flags
    change (batch statistics); every child keeps the mode it has (eval, after ``model.eval()``).
    """
    for layer in layers:
        layer.training = True


def frozen_layers(model: nn.Module, layers: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Names of the normalization ``layers`` the user froze: in eval mode while ``model`` or another of ``layers``
    is in train mode (``layer.eval()`` inside a training model, as in fine-tuning). A model in eval mode throughout
    has none: a training-mode run switches all its layers to batch statistics.

    A training-mode export and its PyTorch reference keep these in eval mode, as the model runs them: they
    normalize with their running statistics and hand those on as their posterior (``bkn_export.nn``), and their
    running statistics are not graph inputs/outputs (eval mode does not update them).
    """
    layers = list(layers)
    frozen = [name for name, layer in layers if not layer.training]
    return frozen if frozen and (model.training or len(frozen) < len(layers)) else []


def frozen_layers_note(frozen: Sequence[str]) -> str:
    """One sentence for a report, naming up to five of the ``frozen`` layers (:func:`frozen_layers`)."""
    shown = ", ".join(repr(name) for name in frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
    return (
        f"{len(frozen)} BKN layer(s) in eval mode while the model or other BKN layers train ({shown}) run as the "
        "model runs them, in eval mode: on their running statistics (a layer that tracks none: on its batch), "
        "handed on to the layers they feed, never updated"
    )


def copied(value: Any) -> Any:
    """``value`` (a tensor, or nested tuples / lists / dicts holding tensors) with every tensor detached and cloned;
    a ``torch.Size`` kept whole (pytree would rebuild it as a tuple), anything else as it is. Every forward this
    package runs on a caller's inputs gets such a copy: a forward that changes its input in place (``x.mul_(2)``)
    must change neither the caller's tensors nor the next forward's inputs."""
    leaves, spec = tree_flatten(value, is_leaf=lambda item: isinstance(item, torch.Size))
    return spec.unflatten([leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])


def call_example(model: nn.Module, example_inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def eval_forward(model: nn.Module, example_inputs: Any) -> Any:
    """One eval-mode, no-grad forward on a :func:`copied` ``example_inputs`` (a tensor, a tuple/list of positional
    inputs, or a dict of keyword inputs); every module's train/eval flag restored afterwards."""
    with eval_mode(model), torch.no_grad():
        return call_example(model, copied(example_inputs))
