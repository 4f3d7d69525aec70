"""BatchNorm subclasses with extra behaviour: which convert, to what, and which are refused.

``convert_batchnorm`` replaces a normalization module only by something that computes
the same function (with the prior switched off), so a BatchNorm subclass is sorted by
what it adds (:func:`adapter_for`):

* **forward unchanged** (the subclass overrides only ``__init__``, attributes or
  ``_check_input_dim``): its function is BatchNorm's; it converts to the plain BKN layer.
* **a known family with a fused drop + activation**: timm's ``BatchNormAct2d`` and
  ``SyncBatchNormAct``, recognised by class name in the MRO (timm itself cannot be
  imported beside the CPU torch here, so this module never imports it) and by their
  ``drop`` / ``act`` submodules, with ``forward`` exactly that class's. They become
  :class:`BatchKalmanNormAct2d` (or 1d/3d by input rank; :class:`SyncBatchKalmanNormAct`
  for the synchronised one), which runs BKN, then ``drop``, then ``act`` — the same
  submodule objects under the same names, so state-dict keys are unchanged.
* **a registered adapter** (:func:`register_batchnorm_adapter`): the user says which BKN
  class to build and which submodules to carry over.
* **any other subclass that overrides ``forward``** is refused with
  :class:`~bkn_export.errors.ConversionError`, naming the class and how to register an
  adapter. It is refused even if the conversion guard would find the plain conversion
  identical on the example inputs: one example cannot show that an extra step (a clamp,
  an activation that is the identity on the example's range) is absent.

timm's ``FrozenBatchNormAct2d`` (and torchvision's ``FrozenBatchNorm2d``) is not a
BatchNorm subclass and has no batch statistics to filter: it is left as it is.

In a converted model the layer's own output is the activation's output. The Kalman
chain's prediction for the next layer must therefore push the posterior through
``drop`` (identity in eval) and ``act``: :func:`post_normalization_modules` names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bkn_export.distributed import SyncBatchKalmanNorm
from bkn_export.errors import ConversionError
from bkn_export.nn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, _BatchKalmanNorm

__all__ = [
    "BatchKalmanNormAct1d",
    "BatchKalmanNormAct2d",
    "BatchKalmanNormAct3d",
    "BatchNormAdapter",
    "SyncBatchKalmanNormAct",
    "adapter_for",
    "post_normalization_modules",
    "register_batchnorm_adapter",
    "synchronise_submodules",
]

_TORCH_BATCHNORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
_POST_NORMALIZATION = ("drop", "act")


def _make_act(
    act_layer: Callable[..., nn.Module] | None, act_kwargs: dict[str, Any] | None, inplace: bool, apply_act: bool
) -> nn.Module:
    """timm's activation construction: ``act_layer(**act_kwargs, inplace=inplace)`` or Identity."""
    if act_layer is None or not apply_act:
        return nn.Identity()
    kwargs = dict(act_kwargs or {})
    if inplace:
        kwargs["inplace"] = inplace
    return act_layer(**kwargs)


class _NormActMixin:
    """BKN, then ``drop``, then ``act``: y = act(drop(BKN(x))). Shapes as the BKN layer's.

    Constructor (as timm's ``BatchNormAct2d``): num_features, eps, momentum, affine,
    track_running_stats, apply_act, act_layer (a module class or None), act_kwargs,
    inplace, drop_layer (a module class or None), device, dtype; plus the BKN options
    of :class:`~bkn_export.KalmanOptions` as keywords. So it can be passed to a timm
    model as ``norm_layer``.
    """

    drop: nn.Module
    act: nn.Module

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kalman_options: Any,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **kalman_options
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace, apply_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))  # type: ignore[misc]


class BatchKalmanNormAct1d(_NormActMixin, BatchKalmanNorm1d):
    """BKN over (N, C) or (N, C, L), then ``drop``, then ``act``."""


class BatchKalmanNormAct2d(_NormActMixin, BatchKalmanNorm2d):
    """BKN over (N, C, H, W), then ``drop``, then ``act`` (the BKN form of timm's ``BatchNormAct2d``)."""


class BatchKalmanNormAct3d(_NormActMixin, BatchKalmanNorm3d):
    """BKN over (N, C, D, H, W), then ``drop``, then ``act``."""


class SyncBatchKalmanNormAct(SyncBatchKalmanNorm):
    """:class:`~bkn_export.distributed.SyncBatchKalmanNorm`, then ``drop``, then ``act`` (timm's ``SyncBatchNormAct``).

    Built by :func:`synchronise_submodules` from a converted, wired, synchronised layer.
    """

    drop: nn.Module
    act: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


_ACT_FOR_RANK: dict[int, type[_BatchKalmanNorm]] = {
    2: BatchKalmanNormAct1d,
    3: BatchKalmanNormAct1d,
    4: BatchKalmanNormAct2d,
    5: BatchKalmanNormAct3d,
}


@dataclass(frozen=True)
class BatchNormAdapter:
    """How one BatchNorm subclass converts.

    target: the BKN class to build, given the input rank seen on the example inputs
        (2 or 3: 1d, 4: 2d, 5: 3d); it must be a ``_BatchKalmanNorm`` subclass built with
        BatchNorm's constructor arguments plus the BKN options.
    submodules: names of the original's child modules that the new layer takes over,
        as the same objects under the same names (a name the original lacks is skipped,
        so the target's default stays).
    """

    target: Callable[[int], type[_BatchKalmanNorm]]
    submodules: tuple[str, ...] = ()


_REGISTRY: dict[type[nn.Module], BatchNormAdapter] = {}


def register_batchnorm_adapter(
    batchnorm_class: type[nn.Module],
    target: type[_BatchKalmanNorm] | Callable[[int], type[_BatchKalmanNorm]],
    submodules: tuple[str, ...] = (),
) -> None:
    """Tell ``convert_batchnorm`` how to convert ``batchnorm_class`` (exactly that class, not its subclasses).

    target: a BKN class (e.g. :class:`BatchKalmanNormAct2d`) or a function from the input
    rank to one. submodules: the child modules to carry over (e.g. ``("act",)``). The
    conversion guard still checks the converted layer against the original on the
    example inputs, so a wrong adapter is refused, not applied silently. Example, for a
    BatchNorm2d subclass whose forward is ``self.act(super().forward(x))``::

        register_batchnorm_adapter(MyBatchNormAct, BatchKalmanNormAct2d, submodules=("act",))
    """
    if isinstance(target, type):
        if not issubclass(target, _BatchKalmanNorm):
            raise TypeError(f"adapter target for {batchnorm_class.__name__} must be a BKN class, got {target}")
        fixed = target
        _REGISTRY[batchnorm_class] = BatchNormAdapter(lambda _rank: fixed, tuple(submodules))
    else:
        _REGISTRY[batchnorm_class] = BatchNormAdapter(target, tuple(submodules))


def _known_family(module: nn.Module) -> BatchNormAdapter | None:
    """timm's BatchNormAct2d / SyncBatchNormAct, with ``forward`` not overridden further."""
    forward = type(module).forward
    for base in type(module).__mro__:
        if getattr(base, "forward", None) is not forward:
            continue
        if base.__name__ == "BatchNormAct2d":
            if all(isinstance(getattr(module, n, None), nn.Module) for n in _POST_NORMALIZATION):
                return BatchNormAdapter(lambda _rank: BatchKalmanNormAct2d, _POST_NORMALIZATION)
        if base.__name__ == "SyncBatchNormAct":
            return BatchNormAdapter(_ACT_FOR_RANK.__getitem__, _POST_NORMALIZATION)
    return None


def adapter_for(module: nn.Module, name: str) -> BatchNormAdapter | None:
    """None for a BatchNorm whose forward is torch's own; the adapter for a known subclass; else refuse.

    Raises ConversionError for a BatchNorm subclass that overrides ``forward`` and has
    neither a registered adapter nor a known family.
    """
    registered = _REGISTRY.get(type(module))
    if registered is not None:
        return registered
    if type(module).forward in _TORCH_BATCHNORM_FORWARDS:
        return None
    family = _known_family(module)
    if family is not None:
        return family
    cls = type(module)
    raise ConversionError(
        f"'{name}' is a {cls.__module__}.{cls.__qualname__}, a BatchNorm subclass that overrides forward(); "
        "a plain BatchKalmanNorm would drop whatever that forward adds. Register how to convert it, e.g. "
        f"bkn_export.norm_act.register_batchnorm_adapter({cls.__qualname__}, BatchKalmanNormAct2d, "
        "submodules=('act',)) for a forward of act(batch_norm(x)), or replace the module before converting."
    )


def synchronise_submodules(sync: nn.Module, source: nn.Module) -> nn.Module:
    """Give a freshly synchronised layer the ``drop`` / ``act`` of the BKN layer it replaced.

    ``source`` is a :class:`BatchKalmanNormAct1d/2d/3d` (else ``sync`` is returned as is);
    ``sync`` shares its parameters, buffers and wiring
    (:func:`~bkn_export.distributed.synchronised_layer`). It is re-classed to
    :class:`SyncBatchKalmanNormAct` in place: that class adds only ``forward`` and the two
    submodules, so no state is lost; the same submodule objects are attached.
    """
    if not isinstance(source, _NormActMixin) or not isinstance(sync, SyncBatchKalmanNorm):
        return sync
    sync.__class__ = SyncBatchKalmanNormAct
    for name in _POST_NORMALIZATION:
        sync.add_module(name, getattr(source, name))
    return sync


def post_normalization_modules(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The modules a fused layer applies after its normalization, in order (``()`` for a plain layer)."""
    if isinstance(layer, (_NormActMixin, SyncBatchKalmanNormAct)):
        return tuple(getattr(layer, name) for name in _POST_NORMALIZATION)
    return ()
