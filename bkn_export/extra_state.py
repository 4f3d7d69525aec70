"""A BKN layer's extra state (its versioned wiring, :mod:`bkn_export.chain.wiring`) as a tensor in the state dict.

``Module.state_dict()`` puts whatever ``get_extra_state`` returns under ``<layer>._extra_state``. A dict there
breaks the code that expects every value of a state dict to be a tensor: EMA updaters (timm's ``ModelEmaV2``,
ultralytics' ``ModelEMA``: ``v.dtype.is_floating_point``, ``ema_v.copy_(...)``), ``safetensors.save_file``,
dtype/device conversions of checkpoints (``{k: v.half() ...}``). So the state is saved as a 1-D ``uint8`` tensor
of its UTF-8 JSON:

* not floating point, so EMA code that averages floating tensors skips it; code that writes into every value
  writes into a fresh tensor (each ``state_dict()`` call encodes anew), never into the layer's wiring;
* any dtype it is cast to (float16, bfloat16, float32 hold every byte value exactly) decodes to the same bytes
  (values rounded to the nearest integer), on any device.

:func:`decode` also reads the dict that earlier versions saved (``torch.save`` checkpoints keep loading).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["decode", "encode"]


def encode(state: Mapping[str, Any]) -> Tensor:
    """``state`` (JSON-able) as a 1-D uint8 CPU tensor of its UTF-8 JSON."""
    data = json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode(saved: Any) -> Any:
    """A saved extra state as the dict :func:`encode` was given: from a tensor of any dtype or device holding
    its bytes, or as it is when it is not a tensor (a dict saved by an earlier bkn_export; anything else is left
    for the wiring check to refuse). A tensor that is not such bytes raises ValueError naming the problem."""
    if not isinstance(saved, Tensor):
        return saved
    if saved.dim() != 1:
        raise ValueError(f"the extra-state tensor has shape {tuple(saved.shape)}, not the 1-D bytes of a BKN wiring")
    values = saved.detach().to("cpu", torch.float64).round()
    if values.numel() and (values.min() < 0 or values.max() > 255):
        raise ValueError("the extra-state tensor holds values outside 0..255: not the bytes of a BKN wiring")
    try:
        state = json.loads(bytes(values.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the extra-state tensor is not the JSON of a BKN wiring ({error})") from None
    return state
