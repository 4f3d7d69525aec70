"""Deep copies of a user's model that survive tensors it keeps from an earlier forward.

``copy.deepcopy`` refuses a tensor that is not a graph leaf ("Only Tensors created explicitly by the user (graph
leaves) support the deepcopy protocol"): a model that stores activations of its last forward as plain attributes
(MONAI's ``DynUNet`` keeps its deep-supervision heads in ``self.heads``) cannot be copied after a training step.
:func:`copy_module` copies such a tensor detached (its value, not its autograd history) and leaves the model itself
untouched; parameters and buffers are copied as ``deepcopy`` copies them.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["copy_module"]

M = TypeVar("M", bound=nn.Module)

#: Module attributes deepcopy walks that are not the model's own tensors (parameters, buffers and submodules are
#: leaves or modules: deepcopy copies them as it does).
_MODULE_SLOTS = frozenset({"_parameters", "_buffers", "_modules"})


def copy_module(model: M, memo: dict[int, Any] | None = None) -> M:
    """``copy.deepcopy(model, memo)``, with every non-leaf tensor held in a module's plain attributes (directly or in
    lists, tuples and dicts) copied detached. memo: objects to keep or replace, by id, as deepcopy's (not changed)."""
    try:
        return copy.deepcopy(model, dict(memo or {}))
    except RuntimeError as error:
        if "deepcopy protocol" not in str(error):
            raise
    detached: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name not in _MODULE_SLOTS:
                _detached_into(value, detached)
    return copy.deepcopy(model, {**detached, **(memo or {})})


def _detached_into(value: Any, memo: dict[int, Any], depth: int = 0) -> None:
    if isinstance(value, torch.Tensor):
        if not value.is_leaf:
            memo[id(value)] = value.detach().clone()
    elif depth < 8 and isinstance(value, (list, tuple)):
        for item in value:
            _detached_into(item, memo, depth + 1)
    elif depth < 8 and isinstance(value, dict):
        for item in value.values():
            _detached_into(item, memo, depth + 1)
