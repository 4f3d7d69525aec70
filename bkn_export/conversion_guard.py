"""The conversion guard: a converted model computes what the original computed, or conversion is refused.

``convert_batchnorm`` calls it on every conversion. Before anything changes, one eval-mode
forward of the original model on the example inputs records the outputs and, with forward
pre-hooks, a clone of the input each normalization module received (its first call). Then,
for every converted layer, called on its own (outside a forward of the root model, which by
the chain's contract is exactly a first-in-chain layer: prior weight p = 0, i.e. BatchNorm):

* **eval mode**: ``converted(x)`` against ``original(x)``;
* **train mode**: the output, and the running-statistics update (``running_mean``,
  ``running_var``, ``num_batches_tracked``), both modules on deep copies so nothing in the
  model changes; dropout-like submodules see the same random stream (one seed for both);
* **the whole model**: the converted model's eval-mode outputs against the original's.

Any difference beyond tolerance raises :class:`~bkn_export.errors.ConversionError` naming the
module, the mode and the largest difference; the caller then leaves the model as it was.
Cost: one more eval forward, a clone of every normalization input (memory: their total size)
and, per layer, two calls each of a copy of the original and of the converted module.

Tolerance (per dtype of the compared tensor, elementwise ``|a − b| ≤ atol + rtol·|b|``),
:data:`TOLERANCES`: float64 1e-10, float32 5e-5, float16 5e-3, bfloat16 4e-2 (atol = rtol).
Eval mode is the same ``F.batch_norm`` call on both sides (bitwise equal in practice); the
tolerance is for train mode, where BatchNorm's fused kernel and BKN's op reduce in a
different order. Measured float32 worst case: 3.3e-6 on a (64, 8, 16, 16) input with mean
100 and std 10 (the rounding grows with mean/std); a missing activation, a different eps
or a lost running statistic is orders of magnitude above it. A train-mode *output* also gets
a per-channel allowance for ill-conditioned channels, :func:`conditioning_slack`
(4 · u · max|x_c| / sqrt(S_c + ε) · |γ_c|), because there both implementations lose the same
digits: in MONAI's 3-D ResNet-10 at batch 2 and 16³ input, ``layer4`` sees 2 values per
channel with max|x|/std ≈ 3.6e4, and BatchNorm and BKN differ by 9.6e-5 (each 6.1e-5 from
float64).

Exempt, by design (each also stated in the README):

* **BatchNorm raises**: one value per channel in train mode (e.g. a (1, C) input):
  ``nn.BatchNorm*d`` raises, and so does a BKN layer without a predecessor (a layer with
  one accepts it: :mod:`bkn_export.nn`). Where the original raises on the example input in
  train mode, only eval mode is compared.
* **Synchronised layers** (``nn.SyncBatchNorm``): the layer is checked before it is made a
  ``SyncBatchKalmanNorm``, with one process's statistics, which is what ``nn.SyncBatchNorm``
  computes without a process group. ``SyncBatchKalmanNorm`` refuses to train without a
  process group, where ``nn.SyncBatchNorm`` silently falls back to local statistics. When a
  process group is initialised during conversion, only eval mode is compared for them (the
  train-mode reference would run a collective on one rank alone).

* **No running statistics** (``track_running_stats=False``): in eval mode BatchNorm uses the
  batch statistics alone; a wired BKN layer with a predecessor uses them blended with its
  Kalman prior (it has no running statistics to use instead), so the whole model's eval
  outputs differ by design. Each such layer is still checked on its own (p = 0, eval and
  train mode), and the whole-model comparison runs with those layers' prior weight held at
  p = 0 (:func:`prior_off`), so every other difference is still caught.

Not exempt, and checked: ``momentum=None`` (both take the cumulative average).
A module constructed with running statistics whose ``track_running_stats`` was switched off
afterwards is refused: BatchNorm then normalizes with the buffers in eval mode and leaves
them untouched in training, which a BKN layer does not express.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from bkn_export.distributed import process_group_memo
from bkn_export.errors import ConversionError
from bkn_export.module_modes import copied, eval_forward

__all__ = [
    "TOLERANCES",
    "ConversionGuard",
    "Tolerance",
    "check_layer",
    "check_outputs",
    "conditioning_slack",
    "eval_forward",
    "prior_off",
    "tolerance_for",
]

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
_SEED = 20_251_130


@dataclass(frozen=True)
class Tolerance:
    """Elementwise ``|actual − expected| ≤ atol + rtol · |expected|``."""

    rtol: float
    atol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-10, 1e-10),
    torch.float32: Tolerance(5e-5, 5e-5),
    torch.float16: Tolerance(5e-3, 5e-3),
    torch.bfloat16: Tolerance(4e-2, 4e-2),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The guard's tolerance for tensors of ``dtype``; integers and bools compare exactly."""
    return TOLERANCES.get(dtype, Tolerance(0.0, 0.0))


def _excess(actual: Tensor, expected: Tensor, slack: Tensor | None = None) -> tuple[float, bool]:
    """(largest |actual − expected|, within tolerance) for two tensors of one shape.

    slack: an extra allowance broadcast against the tensors (float64), or None.
    """
    if actual.shape != expected.shape:
        return float("inf"), False
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64)
    both_nan = torch.isnan(a) & torch.isnan(b)
    difference = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
    difference = torch.where(torch.isnan(difference), torch.full_like(a, float("inf")), difference)
    tolerance = tolerance_for(expected.dtype)
    bound = tolerance.atol + tolerance.rtol * b.abs().nan_to_num(0.0)
    if slack is not None:
        bound = bound + slack
    largest = float(difference.max()) if difference.numel() else 0.0
    return largest, bool((difference <= bound).all())


@contextmanager
def _seeded(x: Tensor) -> Iterator[None]:
    """The same random stream for the original and the converted module (dropout in a fused layer)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        yield


def _run(module: nn.Module, x: Tensor, training: bool) -> tuple[nn.Module, Tensor]:
    """Run a deep copy of ``module`` in the given mode on a clone of ``x``; return the copy and its output."""
    twin = copy.deepcopy(module, process_group_memo(module)).train(training)
    with torch.no_grad(), _seeded(x), warnings.catch_warnings():
        # Called on its own on purpose: no prior (the layer would warn that it ran outside its model's forward).
        warnings.filterwarnings("ignore", r"BKN layer .* ran in train mode outside a forward", RuntimeWarning)
        output = twin(x.clone())
    return twin, output


def conditioning_slack(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Per-channel rounding allowance of a train-mode normalization of ``x: (N, C, *)``: (1, C, 1, ...) float64.

    4 · u · κ_c · |γ_c| with u the unit roundoff of ``x``'s dtype and κ_c = max|x_c| / sqrt(S_c + ε)
    (S_c the biased batch variance): computing (x − x̄)/sqrt(S + ε) in floating point loses
    about u · κ relative to the normalized scale (the subtraction of a mean that is large
    against the spread), once per implementation, so two implementations may differ by twice
    that; 4 leaves room for an activation of slope up to 2 after the normalization. Zero in
    practice for well-conditioned channels (κ ≈ 3–10 gives ~1e-6 in float32, under the fixed
    tolerance); it matters where a channel holds a few nearly equal values (a batch of 2 at
    1×1×1 resolution: κ ≈ 4e4, BatchNorm and BKN then differ by ~1e-4 in float32, each ~6e-5
    from the float64 result).
    """
    x64 = x.detach().to(torch.float64)
    dims = [0, *range(2, x.dim())]
    variance = x64.var(dim=dims, correction=0)
    condition = x64.abs().amax(dim=dims) / torch.sqrt(variance + eps)
    scale = weight.detach().to(torch.float64).abs() if weight is not None else torch.ones_like(condition)
    roundoff = torch.finfo(x.dtype).eps / 2 if x.dtype.is_floating_point else 0.0
    return (4.0 * roundoff * condition * scale).reshape(1, -1, *([1] * (x.dim() - 2)))


def _refuse(
    name: str, original: nn.Module, converted: nn.Module, what: str, largest: float, hint: str = ""
) -> NoReturn:
    advice = hint or (
        "If the module adds behaviour to BatchNorm, register an adapter "
        "(bkn_export.norm_act.register_batchnorm_adapter) or replace it before converting."
    )
    raise ConversionError(
        f"converting '{name}' ({type(original).__name__} -> {type(converted).__name__}) would change {what}: "
        f"largest difference {largest:.3g}, beyond the guard's tolerance (bkn_export.conversion_guard.TOLERANCES); "
        f"convert_batchnorm leaves the model unchanged when it raises this. {advice}"
    )


def _hint(original: nn.Module) -> str:
    """The likely cause of a refusal, where the module's running-statistics setup explains it; else ''."""
    tracking = getattr(original, "track_running_stats", True)
    if not tracking and getattr(original, "running_mean", None) is not None:
        return (
            "It has running statistics but track_running_stats=False, so BatchNorm normalizes with the "
            "buffers in eval mode and never updates them; BKN cannot express that. Set "
            "track_running_stats=True, or set running_mean, running_var and num_batches_tracked to None, "
            "before converting."
        )
    if (
        tracking
        and getattr(original, "momentum", 0.1) is None
        and getattr(original, "running_mean", None) is not None
        and getattr(original, "num_batches_tracked", None) is None
    ):
        return (
            "It has momentum=None (a cumulative average of the batch statistics) but num_batches_tracked is None, so "
            "BatchNorm never updates its running statistics in training (the average has no count); a BKN layer "
            "keeps one. Before converting, give it num_batches_tracked again (torch.tensor(0)), or set a momentum."
        )
    missing = [name for name in ("running_mean", "running_var") if getattr(original, name, None) is None]
    counted = getattr(original, "num_batches_tracked", None) is not None
    if missing and (tracking or counted):
        # F.batch_norm uses batch statistics whenever both buffers are None, whatever track_running_stats says,
        # while the BKN layer built from track_running_stats=True starts fresh running statistics (0 and 1)
        return (
            f"Its {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} None while "
            f"track_running_stats={tracking}"
            f"{' and num_batches_tracked is kept' if counted else ''}, so BatchNorm normalizes with the batch "
            "statistics in eval mode too and keeps no running statistics; a BKN layer expresses that only as a "
            "layer without running statistics. Before converting, either declare it as one (set "
            f"{'' if tracking else 'running_mean and running_var to None (both) and '}"
            f"{'track_running_stats=False and ' if tracking else ''}num_batches_tracked=None), or give it running "
            "statistics again (running_mean zeros, running_var ones, track_running_stats=True, then re-estimate "
            "them with bkn_export.update_bn)."
        )
    return ""


def check_layer(name: str, original: nn.Module, converted: nn.Module, x: Tensor) -> None:
    """Raise ConversionError unless ``converted`` computes what ``original`` computes on ``x``.

    original: the BatchNorm (or subclass) as found; converted: its BKN replacement, called on
    its own (p = 0). x: (N, C, *) the input ``original`` saw in the example forward. Compared
    in eval mode (output) and train mode (output and running statistics), on deep copies.
    """
    hint = _hint(original)
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ConversionError(
            f"cannot check the conversion of '{name}' ({type(original).__name__}): its input in the example forward "
            f"holds {bad} non-finite value(s) (NaN / inf) of {x.numel()}. Pass a finite example; if it is finite, a "
            "module before this layer produced them (a diverged or damaged checkpoint: look at the running "
            "statistics and weights upstream)"
        )
    _, expected = _run(original, x, training=False)
    _, actual = _run(converted, x, training=False)
    largest, ok = _excess(actual, expected)
    if not ok:
        _refuse(name, original, converted, "its eval-mode output", largest, hint)
    if isinstance(original, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized():
        return  # its train mode would run a collective on this rank alone: only eval mode is compared
    try:
        expected_module, expected = _run(original, x, training=True)
    except ValueError as error:
        if "more than 1 value per channel" in str(error):
            return  # BatchNorm refuses one value per channel in training (a BKN layer without a prior too)
        raise
    actual_module, actual = _run(converted, x, training=True)
    slack = None
    if actual.shape == x.shape:
        slack = conditioning_slack(x, getattr(original, "weight", None), float(getattr(original, "eps", 0.0)))
    largest, ok = _excess(actual, expected, slack)
    if not ok:
        _refuse(name, original, converted, "its train-mode output", largest, hint)
    for statistic in _STATISTICS:
        before = getattr(expected_module, statistic, None)
        after = getattr(actual_module, statistic, None)
        if before is None and after is None:
            continue
        if before is None or after is None:
            _refuse(name, original, converted, f"whether it keeps {statistic}", float("inf"), hint)
        largest, ok = _excess(after, before)
        if not ok:
            _refuse(name, original, converted, f"its train-mode {statistic} update", largest, hint)


def check_outputs(expected: Any, actual: Any, what: str = "the model's eval-mode outputs") -> None:
    """Raise ConversionError unless two output structures (tensors in tuples/lists/dicts) match."""
    expected_leaves, expected_spec = tree_flatten(expected)
    actual_leaves, actual_spec = tree_flatten(actual)
    if expected_spec != actual_spec:
        raise ConversionError(
            f"conversion would change the structure of {what} ({expected_spec} -> {actual_spec}); "
            "the model was left unchanged"
        )
    for index, (before, after) in enumerate(zip(expected_leaves, actual_leaves)):
        if isinstance(before, Tensor) and isinstance(after, Tensor):
            largest, ok = _excess(after, before)
        elif isinstance(before, (tuple, list, dict)) and type(before) is type(after):
            # a container subclass torch's pytree does not flatten: compared item by item
            check_outputs(_items(before), _items(after), f"{what} (output {index})")
            continue
        else:
            try:
                same = bool(before == after)
            except RuntimeError as error:  # an object holding tensors that pytree does not flatten (a dataclass)
                raise ConversionError(
                    f"cannot compare {what} (output {index}, a {type(before).__name__}: {error}); register the type "
                    "with torch.utils._pytree (register_dataclass / register_pytree_node) so its tensors are "
                    "compared. The model was left unchanged"
                ) from error
            largest, ok = (0.0, True) if same else (float("inf"), False)
        if not ok:
            raise ConversionError(
                f"conversion would change {what} (output {index}): largest difference {largest:.3g}, beyond the "
                "guard's tolerance (bkn_export.conversion_guard.TOLERANCES). The model was left unchanged; "
                "every normalization layer matched on its own, so look for code that inspects module types "
                "(isinstance(m, nn.BatchNorm2d)) in the model's forward, or a forward that changes the model's own "
                "parameters or buffers (a decay or counter step: each forward then computes with other values) or "
                "draws random numbers in eval mode."
            )


def _items(container: tuple[Any, ...] | list[Any] | dict[Any, Any]) -> tuple[Any, ...] | dict[Any, Any]:
    """A tuple / list / dict subclass as the plain container of its items."""
    return dict(container) if isinstance(container, dict) else tuple(container)


class ConversionGuard:
    """What the original model computed on the example inputs, recorded before conversion.

    ``inputs``: per normalization module name, a clone of its first call's input (N, C, *);
    ``outputs``: a clone of the model's eval-mode outputs.
    """

    def __init__(self, inputs: dict[str, Tensor], outputs: Any) -> None:
        self.inputs = inputs
        self.outputs = outputs

    @classmethod
    def record(cls, model: nn.Module, example_inputs: Any, names: list[str]) -> ConversionGuard:
        """One eval-mode forward of ``model`` with pre-hooks on the modules called ``names``."""
        inputs: dict[str, Tensor] = {}
        handles = []
        modules = dict(model.named_modules())
        for name in names:

            def hook(_module: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                if _name not in inputs and args and isinstance(args[0], Tensor):
                    inputs[_name] = args[0].detach().clone()

            handles.append(modules[name].register_forward_pre_hook(hook))
        try:
            outputs = copied(eval_forward(model, example_inputs))
        finally:
            for handle in handles:
                handle.remove()
        return cls(inputs, outputs)

    def check_layers(self, originals: Mapping[str, nn.Module], converted: Mapping[str, nn.Module]) -> None:
        """:func:`check_layer` for every name in ``converted`` that ran in the example forward."""
        for name, layer in converted.items():
            x = self.inputs.get(name)
            if x is not None:
                check_layer(name, originals[name], layer, x)

    def check_model(self, converted_model: nn.Module, example_inputs: Any) -> None:
        """The converted model's eval-mode outputs against the recorded ones.

        Layers without running statistics (``track_running_stats=False``) that have a
        predecessor blend their Kalman prior into the batch statistics in eval mode too, by
        design, where BatchNorm uses the batch statistics alone; for this comparison their
        prior weight is held at p = 0 (:func:`prior_off`), so everything else in the model is
        still compared. Those layers themselves were compared one by one (p = 0) in
        :meth:`check_layers`.
        """
        with prior_off([layer for _, layer in layers_using_prior_in_eval(converted_model)]):
            actual = eval_forward(converted_model, example_inputs)
        check_outputs(self.outputs, actual)


def layers_using_prior_in_eval(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the BKN layers with a predecessor and no running statistics: the ones whose eval output
    differs from BatchNorm's."""
    from bkn_export.nn import _BatchKalmanNorm

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchKalmanNorm) and m.has_predecessor and not m.track_running_stats
    ]


@contextmanager
def prior_off(layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, each of ``layers`` (BKN layers) weighs its prior by p = 0, i.e. computes BatchNorm.

    The prior is still predicted and the posterior still published (so the rest of the
    chain runs as usual); only the weight on it is zero. Implemented by shadowing the
    layer's ``prior_weight()`` method on the instance; removed on exit.
    """
    for layer in layers:
        original = layer.prior_weight

        def zero(_original: Any = original) -> Tensor:
            return torch.zeros_like(_original())

        object.__setattr__(layer, "prior_weight", zero)
    try:
        yield
    finally:
        for layer in layers:
            if "prior_weight" in vars(layer):
                object.__delattr__(layer, "prior_weight")
