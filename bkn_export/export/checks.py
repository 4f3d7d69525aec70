"""Checks a model must pass before its eval computation is exported or folded.

Every normalization layer (BKN or BatchNorm) must have an eval computation that is a
fixed affine map, y = a ⊙ x + s with a = γ / sqrt(r_Σ + ε) and s = β − a r_μ, and that
map must be finite: otherwise the exported file would silently compute NaN or Inf.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bkn_export.errors import InvalidStatisticsError, UnsupportedLayerError
from bkn_export.nn import _BatchKalmanNorm

__all__ = ["NORMALIZATION_TYPES", "check_inference_ready", "normalization_aliases", "normalization_layers"]

#: Layers whose eval computation is an affine map from running statistics.
NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = (_BatchKalmanNorm, nn.modules.batchnorm._BatchNorm)


def normalization_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BKN / BatchNorm layer, in registration order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, NORMALIZATION_TYPES)]


def normalization_aliases(model: nn.Module) -> dict[str, str]:
    """Each further name of a BKN / BatchNorm layer registered under several names (a module two containers
    hold) → its name in :func:`normalization_layers` (the first)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, NORMALIZATION_TYPES):
            canonical = first.setdefault(id(module), name)
            if canonical != name:
                aliases[name] = canonical
    return aliases


def _bad_channels(values: Tensor, negative_too: bool) -> list[int]:
    bad = ~torch.isfinite(values)
    if negative_too:
        bad = bad | (values < 0)
    return [int(i) for i in torch.nonzero(bad).flatten()[:8]]


def _check_statistics(name: str, layer: nn.Module) -> None:
    label = f"{type(layer).__name__} '{name}'"
    running_mean = getattr(layer, "running_mean", None)
    running_var = getattr(layer, "running_var", None)
    if not getattr(layer, "track_running_stats", True) or running_mean is None or running_var is None:
        raise UnsupportedLayerError(
            f"{label} has no running statistics (track_running_stats=False), so its eval output uses "
            "batch statistics and is not an affine map; export it with mode='training' or rebuild it "
            "with track_running_stats=True and train it."
        )
    checks: list[tuple[str, Tensor | None, bool]] = [
        ("running_mean", running_mean, False),
        ("running_var", running_var, True),
        ("weight", getattr(layer, "weight", None), False),
        ("bias", getattr(layer, "bias", None), False),
    ]
    for field, values, nonnegative in checks:
        if values is None:
            continue
        channels = _bad_channels(values.detach(), negative_too=nonnegative)
        if channels:
            what = "NaN/Inf or negative" if nonnegative else "NaN/Inf"
            raise InvalidStatisticsError(
                f"{label}: {field} has {what} values at channels {channels}; the folded model would "
                "compute garbage. Recompute the statistics (e.g. a few training steps in train mode, or "
                "reset_running_stats()) before exporting."
            )
    eps = float(getattr(layer, "eps", 0.0))
    flat = (running_var.detach().double() + eps <= 0).flatten()
    if bool(flat.any()):
        channels = flat.nonzero().flatten().tolist()
        shown = f"{channels[:8]}{' ...' if len(channels) > 8 else ''}"
        raise InvalidStatisticsError(
            f"{label}: running_var + eps is {float((running_var.detach().double() + eps).min()):g} at channels "
            f"{shown} (eps={eps:g}); the eval scale 1/sqrt(running_var + eps) is infinite or undefined there, so "
            "the folded weights would not be finite. Set eps > 0 (BatchNorm's default is 1e-5)."
        )


def check_inference_ready(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Raise unless every layer of ``model`` can be exported as its eval computation.

    Raises :class:`UnsupportedLayerError` naming a lazy layer that was never run
    (uninitialized parameters) or a normalization without running statistics, and
    :class:`InvalidStatisticsError` naming a normalization whose running mean, running
    variance, γ or β has NaN/Inf values, whose running variance is negative, or whose running variance + eps is
    not positive (eps = 0 over a zero variance).
    Returns the normalization layers.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():  # type: ignore[misc]
            raise UnsupportedLayerError(
                f"{type(module).__name__} '{name}' has uninitialized (lazy) parameters; run the model once "
                "on an example input before exporting."
            )
    layers = normalization_layers(model)
    for name, layer in layers:
        _check_statistics(name, layer)
    return layers
