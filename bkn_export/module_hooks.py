"""Moving a module's hooks to the module that replaces it (a conversion), so that they keep firing and their handles
keep working."""

from __future__ import annotations

import warnings

from torch import nn

__all__ = ["take_over_hooks"]

_CARRIED_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_call",
    "_backward_pre_hooks",
    "_backward_hooks",
)
_UNCARRIED_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def take_over_hooks(bn: nn.Module, new: nn.Module, name: str) -> None:
    """Move ``bn``'s forward (pre-)hooks and backward hooks to ``new``: the same dicts, so their handles still work.

    The hooks fire on the converted layer as they did on the BatchNorm (with kwargs and
    always_call as registered; ``handle.remove()`` removes them from the converted layer).
    State-dict hooks are not carried over: warned, naming the module. The hooks are moved
    before the guard's checks, so (as on the BatchNorm during the guard's recording forward)
    they also run in the conversion's own forward passes. The dicts stay shared with ``bn``,
    which the converted model no longer holds.
    """
    for attribute in _CARRIED_HOOKS:
        theirs = getattr(bn, attribute, None)
        if not theirs:
            continue
        ours = getattr(new, attribute)
        if ours:
            ours.update(theirs)
        else:
            object.__setattr__(new, attribute, theirs)
    if getattr(bn, "_is_full_backward_hook", None) is not None:
        object.__setattr__(new, "_is_full_backward_hook", bn._is_full_backward_hook)
    dropped = [attribute.strip("_") for attribute in _UNCARRIED_HOOKS if getattr(bn, attribute, None)]
    if dropped:
        warnings.warn(
            f"'{name}' ({type(bn).__name__}) has {', '.join(dropped)} registered, which the BKN layer does not keep; "
            "register them again on the converted layer",
            stacklevel=5,
        )
