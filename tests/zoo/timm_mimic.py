"""A faithful mimic of timm's fused BatchNorm + activation layers (``timm/layers/norm_act.py``).

timm cannot be installed beside the CPU torch here (it imports torchvision, whose registry
wheels fail with it), so the conversion is tested against these. Same class names,
attribute names (``drop``, ``act``), constructor signature and forward order as timm's
(read from huggingface/pytorch-image-models); semantics copied, not code:

* ``BatchNormAct2d(nn.BatchNorm2d)``: batch norm (BatchNorm2d's own math on 4-D input), then
  ``drop``, then ``act``; ``act = act_layer(**act_kwargs, inplace=inplace)`` or Identity when
  ``apply_act`` is False or ``act_layer`` is None; ``drop = drop_layer()`` or Identity.
* ``SyncBatchNormAct(nn.SyncBatchNorm)``: SyncBatchNorm's forward, then ``drop`` and ``act``
  if the module has them (timm's converter attaches them after construction).
* ``FrozenBatchNormAct2d(nn.Module)``: fixed statistics as buffers; not a BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _create_act(
    act_layer: Callable[..., nn.Module] | None, act_kwargs: dict[str, Any] | None, inplace: bool, apply_act: bool
) -> nn.Module:
    kwargs = dict(act_kwargs or {})
    if act_layer is None or not apply_act:
        return nn.Identity()
    if inplace:
        kwargs["inplace"] = inplace
    return act_layer(**kwargs)


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Callable[..., nn.Module] | None = nn.ReLU,
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x: Tensor) -> Tensor:
        # BatchNorm2d.forward written out, as timm does (for torchscript), then drop and act.
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class SyncBatchNormAct(nn.SyncBatchNorm):
    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """timm's converter: BatchNormAct2d -> SyncBatchNormAct (drop/act attached), BatchNorm -> SyncBatchNorm."""
    output = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        cls = SyncBatchNormAct if isinstance(module, BatchNormAct2d) else nn.SyncBatchNorm
        output = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if isinstance(module, BatchNormAct2d):
            output.act = module.act
            output.drop = module.drop
        if module.affine:
            with torch.no_grad():
                output.weight = module.weight
                output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        output.add_module(name, convert_sync_batchnorm(child))
    return output


class FrozenBatchNormAct2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5, act_layer: Callable[..., nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = nn.Identity()
        self.act = _create_act(act_layer, None, True, True)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return self.act(self.drop(x * scale + shift))
