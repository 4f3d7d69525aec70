"""Record which tensor feeds which module or op on one example forward (data flow, not execution order).

:func:`record_dataflow` runs the model once in eval mode under ``torch.no_grad()`` and
remembers, for every tensor, the node that produced it: forward hooks on the modules it
understands (normalizations, Conv/ConvTranspose/Linear, activations, pooling, upsampling,
dropout, flatten, zero padding) and a ``TorchFunctionMode`` for functional ops and tensor
methods (``F.relu``, ``x.relu_()``, ``torch.cat``, ``+`` / ``+=``, ``x.flatten``,
``x.mean((2, 3))``, ``x[:, a:b]``, ``split``, ``F.interpolate``, ``F.pad``, arithmetic with
numbers, ``clamp`` ...). Ops inside a recognised
module (a conv's own ``F.conv2d``, a BatchNorm's ``F.batch_norm``) are not recorded again.
An in-place op makes itself the tensor's new producer. Tensors are keyed by ``id`` with a
weak reference, so a dead tensor's reused id is never mistaken for it.

Then, for each normalization layer (``BatchNorm*d``, ``SyncBatchNorm``, their
subclasses, BKN layers) in first-call order, it walks the layer's input back through the
producers to normalization outputs and returns a :class:`LayerRecord`: one
:class:`SourcePath` per concatenation part (channel order) or per addend of a residual
sum, each a tuple of steps (:mod:`bkn_export.chain.steps`) from a normalization's output
to this layer's input. A walk that reaches another concatenation or sum after some steps
(a ResNet block's ``conv1`` after ``relu(a + b)``, a UNet decoder conv after
``cat([skip, up])``) continues into its parts: the path's ``origin`` is that
:class:`Combination`. A walk stops, and its part falls back with a note naming the op
or module, where it meets something moments cannot pass (attention, a product such as a
squeeze-excitation gate, a reshape that mixes channels, an unknown module) or the model input.

Choices and limits, each named in the notes where it applies:

* A layer called more than once per forward is wired by its first call.
* A BatchNorm subclass's own ``drop`` / ``act`` children (timm's ``BatchNormAct2d``,
  :mod:`bkn_export.norm_act`) run after the normalization, in that order: the next
  layer's path starts with them. Another subclass with its own forward is noted.
* A parameter-free module the recorder does not know (geffnet's ``HardSwishMe``,
  efficientnet-pytorch's ``MemoryEfficientSwish``) is run once more on a probe tensor and
  taken as the activation it matches, with a note.
* A Conv subclass that pads explicitly and then calls ``F.conv2d`` with its own weight
  (TensorFlow-style "same" padding) is that conv with the padding folded in, if the padding
  is symmetric; asymmetric padding falls back.
* ``x * g`` with ``g`` of shape (N, C, 1, ...) computed from ``x`` by steps alone
  (squeeze-and-excitation) is a :class:`~bkn_export.chain.steps.Gate` step (an
  approximation, stated there); ``x * sigmoid(x)``, ``x * relu6(x + 3) / 6`` and
  ``x * tanh(softplus(x))`` written out are SiLU, Hardswish and Mish.
* A max pooling right after a nondecreasing activation is moved in front of it (exact:
  they commute; see :func:`bkn_export.chain.steps.commute_max_pools`).
* Where a step that combines positions (a conv with a window, a pooling, bilinear
  resampling) reads positions that an earlier step of the path left dependent or unlike
  (resampling, overlapping or padded windows), the note says its variance is approximate:
  the moments take positions as independent. Not where both sit in one run of linear steps
  (:func:`bkn_export.chain.steps.linear_runs`: upsampling → conv, conv → average pooling),
  which the chain pushes as one exact linear map; a nonlinear step or a second conv
  between them (conv → max pooling, upsampling → ReLU → conv) keeps the note.
* A max pooling after an activation it does not commute with (SiLU, GELU, Hardswish ...)
  takes the maximum of non-Gaussian values as of Gaussians: noted.
* A Linear layer is understood on ``(N, C)`` inputs only (its features are the channels).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import random
import sys
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bkn_export import moments
from bkn_export.chain.scope import Submodules
from bkn_export.chain.steps import (
    STOP_GRADIENT,
    Affine,
    ChannelPad,
    Channels,
    Elementwise,
    Flatten,
    Gate,
    Identity,
    LinearRun,
    ParameterScale,
    Pool,
    Resample,
    Reshape,
    ScaleShift,
    Step,
    Subsample,
    combines_positions,
    commute_max_pools,
    linear_runs,
    makes_positions_dependent,
    size_bound,
    step_from_dict,
)
from bkn_export.errors import ChainWiringError
from bkn_export.module_modes import call_example, copied, eval_mode

__all__ = [
    "SEPARATED_POSITIONS",
    "Combination",
    "LayerRecord",
    "RecordedChain",
    "SourcePath",
    "is_normalization",
    "record_dataflow",
]

#: What a path's note says where a flatten or strided selection separates positions that an earlier step left unlike
#: (wiring warns about such layers: :func:`bkn_export.chain.wire.wire_chain`).
SEPARATED_POSITIONS = "gives each position its channel's moments over all positions"

Shape = tuple[int, ...]
Combine = Literal["none", "single", "concat", "sum"]


# --------------------------------------------------------------------------- recorded values


@dataclass(frozen=True)
class Combination:
    """A concatenation along channels (parts in channel order) or a sum (addends) of paths."""

    combine: Literal["concat", "sum"]
    sources: tuple[SourcePath, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"combine": self.combine, "sources": [s.to_dict() for s in self.sources]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Combination:
        return cls(data["combine"], tuple(SourcePath.from_dict(s) for s in data["sources"]))


@dataclass(frozen=True)
class SourcePath:
    """One input part of a normalization layer, walked back to where its statistics come from.

    normalization: the qualified name of the normalization layer whose *output* the path
        starts from, or None (the path starts at ``origin``, or falls back).
    steps: applied in order from there to this part of the layer's input.
    channels: the part's channel count at its end (its share of the layer's input).
    entry_shape: ``(N, C, *)`` where the path starts (the normalization's output, the
        combination's output, or where the walk stopped).
    origin: the concatenation or sum the path starts from, when it does.
    fallback: why the path reaches no normalization ("" when it does, or has an origin).
    """

    normalization: str | None
    steps: tuple[Step, ...]
    channels: int
    entry_shape: Shape
    origin: Combination | None = None
    fallback: str = ""

    @property
    def falls_back(self) -> bool:
        """No normalization and no combination at the start: nothing to push moments from."""
        return self.normalization is None and self.origin is None

    @property
    def reaches_normalization(self) -> bool:
        """Whether some normalization's statistics reach this path (through its origin too)."""
        if self.normalization is not None:
            return True
        return self.origin is not None and any(s.reaches_normalization for s in self.origin.sources)

    def size_bound(self) -> Iterator[str]:
        """What the path's steps (its origin's too) hold that was computed at the wiring example's spatial size by a
        call that may compute it from the input's size (:func:`bkn_export.chain.steps.size_bound`)."""
        if self.origin is not None:
            for source in self.origin.sources:
                yield from source.size_bound()
        for step in self.steps:
            bound = size_bound(step)
            if bound is not None:
                yield bound

    def resized(self, shapes: Mapping[str, Sequence[int]]) -> tuple[str, Shape, Shape] | None:
        """The first normalization this path (or its origin) starts from whose output's spatial size in this call
        (``shapes``: name → output shape) differs from the recorded one, with both sizes; None where all agree."""
        if self.origin is not None:
            for source in self.origin.sources:
                found = source.resized(shapes)
                if found is not None:
                    return found
        if self.normalization is not None and self.normalization in shapes:
            now = tuple(shapes[self.normalization])[2:]
            if now != tuple(self.entry_shape)[2:]:
                return self.normalization, tuple(self.entry_shape)[2:], now
        return None

    def normalizations(self) -> Iterator[str]:
        """Names of the normalization layers the path (and its origin) starts from, depth first."""
        if self.normalization is not None:
            yield self.normalization
        if self.origin is not None:
            for source in self.origin.sources:
                yield from source.normalizations()

    def describe(self) -> str:
        """One line: ``start → step → step``."""
        if self.normalization is not None:
            start = f"'{self.normalization}'"
        elif self.origin is not None:
            joined = " | " if self.origin.combine == "concat" else " + "
            start = f"{self.origin.combine}({joined.join(s.describe() for s in self.origin.sources)})"
        else:
            start = f"<falls back: {self.fallback}>"
        return " → ".join([start, *(step.describe() for step in self.steps)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "normalization": self.normalization,
            "steps": [step.to_dict() for step in self.steps],
            "channels": self.channels,
            "entry_shape": list(self.entry_shape),
            "origin": None if self.origin is None else self.origin.to_dict(),
            "fallback": self.fallback,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourcePath:
        origin = data.get("origin")
        return cls(
            normalization=data["normalization"],
            steps=tuple(step_from_dict(s) for s in data["steps"]),
            channels=int(data["channels"]),
            entry_shape=tuple(data["entry_shape"]),
            origin=None if origin is None else Combination.from_dict(origin),
            fallback=data.get("fallback", ""),
        )


@dataclass(frozen=True)
class LayerRecord:
    """A normalization layer's recorded input: what feeds it, by data flow.

    name: qualified module name; input_shape: ``(N, C, *)`` on the example forward.
    combine: ``"single"`` (one path), ``"concat"`` (one source per part, channel order),
    ``"sum"`` (one source per addend), or ``"none"`` (no normalization upstream; sources
    is empty, the layer is first in its chain). notes: every fallback and limit met.
    calls: how many times the layer ran in the example forward; republished: (source, n) for each source that
    published n > 1 times before each of its calls (:func:`_republished`); repeats: (source, n) for every source,
    how often it published between two calls of the layer, where that was the same between every two
    (:func:`_repeats`). passed: the modules that returned a value on the layer's paths, unchanged (an ``nn.Identity``,
    a block whose forward returns its input) or computed by tensor operators (``return x * 2``): no step names them,
    yet a hook added to one later changes what reaches the layer (:func:`_passed_through`).
    """

    name: str
    input_shape: Shape
    sources: tuple[SourcePath, ...]
    combine: Combine
    notes: tuple[str, ...] = ()
    calls: int = 1
    republished: tuple[tuple[str, int], ...] = ()
    repeats: tuple[tuple[str, int], ...] = ()
    passed: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "sources": [s.to_dict() for s in self.sources],
            "combine": self.combine,
            "notes": list(self.notes),
            "calls": self.calls,
            "republished": [list(item) for item in self.republished],
            "repeats": [list(item) for item in self.repeats],
            "passed": list(self.passed),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerRecord:
        return cls(
            name=data["name"],
            input_shape=tuple(data["input_shape"]),
            sources=tuple(SourcePath.from_dict(s) for s in data["sources"]),
            combine=data["combine"],
            notes=tuple(data.get("notes", ())),
            calls=int(data.get("calls", 1)),
            republished=tuple((str(name), int(count)) for name, count in data.get("republished", ())),
            repeats=tuple((str(name), int(count)) for name, count in data.get("repeats", ())),
            passed=tuple(str(name) for name in data.get("passed", ())),
        )


@dataclass(frozen=True)
class RecordedChain:
    """Every normalization layer that ran, in first-call order, and model-level notes
    (layers that did not run)."""

    layers: tuple[LayerRecord, ...]
    notes: tuple[str, ...] = ()
    #: Per module that ran, the spatial size (dims 2..) of its first input at its first call: what a path's module
    #: reads at the wiring size (:meth:`bkn_export.chain.member.ChainMembership` compares it in later calls).
    module_inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __getitem__(self, name: str) -> LayerRecord:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no normalization layer named {name!r} ran on the example forward (ran: {self.names})")


# --------------------------------------------------------------------------- recognition


def is_normalization(module: nn.Module) -> bool:
    """BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses, and BKN layers.

    BKN layers are recognised by class name (``*BatchKalmanNorm*`` in the MRO), so that
    recording does not import :mod:`bkn_export.nn`, which builds on this package.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return any("BatchKalmanNorm" in cls.__name__ for cls in type(module).__mro__)


def _defining_class(module: nn.Module, table: Mapping[type, Any]) -> type | None:
    """The most derived class of ``module`` in ``table``, if ``module`` runs that class's forward.

    A subclass that overrides ``forward`` (a conv with padding computed at run time), or an
    instance whose ``forward`` is replaced (``conv.forward = lambda x: ...``: a LoRA patch), is
    not that class for our purposes: its own ops are recorded instead.
    """
    if "forward" in module.__dict__:
        return None
    for cls in type(module).__mro__:
        if cls in table:
            return cls if type(module).forward is cls.forward else None  # type: ignore[attr-defined]
    return None


def _attrs(*names: str) -> Callable[[nn.Module], tuple[tuple[str, Any], ...]]:
    return lambda m: tuple((n, getattr(m, n)) for n in names)


_ACTIVATION_MODULES: dict[type, tuple[str, Callable[[nn.Module], tuple[tuple[str, Any], ...]]]] = {
    nn.ReLU: ("relu", _attrs()),
    nn.ReLU6: ("relu6", _attrs()),
    nn.LeakyReLU: ("leaky_relu", _attrs("negative_slope")),
    nn.PReLU: ("prelu", _attrs()),
    nn.Hardtanh: ("hardtanh", _attrs("min_val", "max_val")),
    nn.Hardsigmoid: ("hardsigmoid", _attrs()),
    nn.Hardswish: ("hardswish", _attrs()),
    nn.ELU: ("elu", _attrs("alpha")),
    nn.SELU: ("selu", _attrs()),
    nn.CELU: ("celu", _attrs("alpha")),
    nn.SiLU: ("silu", _attrs()),
    nn.GELU: ("gelu", _attrs("approximate")),
    nn.Sigmoid: ("sigmoid", _attrs()),
    nn.Tanh: ("tanh", _attrs()),
    nn.Mish: ("mish", _attrs()),
    nn.Softplus: ("softplus", _attrs("beta", "threshold")),
}

_POOL_MODULES = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

_TRANSPARENT = object()  # the op's output is its input, as far as moments go: no step


class _Unsupported(Exception):
    """A recognised module or op in a form whose moments are not carried: ``what`` it is, ``why``."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what} ({why})")
        self.what, self.why = what, why


def _leaf_kind(module: nn.Module) -> str | None:
    """'norm', 'activation', 'affine', 'pool', 'resample', 'dropout', 'flatten', 'pad', 'identity' or None."""
    if is_normalization(module):
        return "norm"
    if _defining_class(module, _ACTIVATION_MODULES) is not None:
        return "activation"
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return "affine" if _defining_class(module, _AFFINE_FORWARD) is not None else None
    if isinstance(module, _POOL_MODULES):
        return "pool"
    if isinstance(module, nn.Upsample):
        return "resample"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "dropout"
    if isinstance(module, nn.Flatten):
        return "flatten"
    if _pad_mode(module) is not None:
        return "pad"
    if type(module) is nn.Identity:
        return "identity"
    return None


_AFFINE_FORWARD: dict[type, None] = dict.fromkeys(
    (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
)


def _module_step(name: str, module: nn.Module, kind: str, inp: Tensor, out: Tensor) -> Any:
    """The step a recognised leaf module adds, or _TRANSPARENT; raises _Unsupported with a reason."""
    label = f"'{name}' ({type(module).__name__})"
    if kind == "activation":
        cls = _defining_class(module, _ACTIVATION_MODULES)
        assert cls is not None
        act, params = _ACTIVATION_MODULES[cls]
        return Elementwise(act, params(module), name)
    if kind == "affine":
        if isinstance(module, nn.Linear):
            if inp.dim() != 2:
                raise _Unsupported(label, f"on a {tuple(inp.shape)} input it mixes the last dim, not the channels")
            return Affine(name, "linear")
        assert isinstance(module, nn.modules.conv._ConvNd)
        if inp.dim() != module.weight.dim():
            raise _Unsupported(label, f"on an unbatched {tuple(inp.shape)} input")
        if module.transposed:
            expected = tuple(moments._conv_output_length(module, d, size) for d, size in enumerate(inp.shape[2:]))
            if tuple(out.shape[2:]) != expected:  # called with output_size: another output_padding than its own
                raise _Unsupported(
                    label,
                    f"called with output_size (output {tuple(out.shape[2:])}, its output_padding gives {expected}); "
                    "the moments follow the module's attributes: set output_padding instead",
                )
        return Affine(name, "conv")
    if kind == "pool":
        if not isinstance(out, Tensor):
            raise _Unsupported(label, "returns indices")
        try:
            return Pool(moments.PoolSpec.from_module(module), name)
        except moments.MomentsError as error:
            raise _Unsupported(label, str(error)) from None
    if kind == "resample":
        try:
            return Resample(moments.ResampleSpec.from_module(module), name)
        except moments.MomentsError as error:
            raise _Unsupported(label, str(error)) from None
    if kind == "dropout":
        return Identity("dropout", name)
    if kind == "flatten":
        return _reshape_step(tuple(inp.shape), tuple(out.shape), label)
    return _TRANSPARENT


def _reshape_step(before: Shape, after: Shape, label: str) -> Any:
    """The step for a reshape ``before → after`` of ``(N, C, *)`` that keeps N and the channels.

    Flatten(start ≥ 2) where spatial dims merge, Flatten(1, end) where channels absorb
    leading spatial dims, Reshape(spatial) for any other reshape that keeps N and C.
    """
    if before == after:
        return _TRANSPARENT
    if len(before) < 2 or len(after) < 2 or after[0] != before[0]:
        raise _Unsupported(label, f"reshaping {before} to {after}: the batch dim does not survive")
    for start in range(1, len(before)):
        for end in range(start + 1, len(before)):
            if (*before[:start], math.prod(before[start : end + 1]), *before[end + 1 :]) == after:
                return Flatten(start, -1 if end == len(before) - 1 else end)
    if after[1] == before[1]:
        return Reshape(tuple(after[2:]))
    raise _Unsupported(label, f"reshaping {before} to {after} mixes the channels (dim 1)")


def _op_label(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if func in _POOL_FUNCTIONS:
        return f"F.{_POOL_FUNCTIONS[func]}"
    module = getattr(func, "__module__", None) or ""
    qualname = getattr(func, "__qualname__", name)
    if qualname.startswith("TensorBase.") or qualname.startswith("Tensor."):
        return "Tensor." + qualname.split(".", 1)[1]
    if qualname.startswith("_VariableFunctionsClass."):
        return "torch." + name
    if module == "torch.nn.functional" or module == "torch._C._nn":
        return f"F.{name}"
    return f"{module}.{name}" if module else name


def _functions(*names: str, owners: Sequence[Any] = (F, torch, Tensor)) -> list[Any]:
    found = []
    for owner in owners:
        for name in names:
            func = getattr(owner, name, None)
            if func is not None:
                found.append(func)
    return found


_ELEMENTWISE_FUNCTIONS: dict[Any, tuple[str, tuple[tuple[str, Any], ...]]] = {}
for _names, _kind, _params in (
    (("relu", "relu_"), "relu", ()),
    (("relu6",), "relu6", ()),
    (("leaky_relu", "leaky_relu_"), "leaky_relu", (("negative_slope", 0.01),)),
    (("hardtanh", "hardtanh_"), "hardtanh", (("min_val", -1.0), ("max_val", 1.0))),
    (("hardsigmoid",), "hardsigmoid", ()),
    (("hardswish",), "hardswish", ()),
    (("elu", "elu_"), "elu", (("alpha", 1.0),)),
    (("selu", "selu_"), "selu", ()),
    (("celu", "celu_"), "celu", (("alpha", 1.0),)),
    (("silu",), "silu", ()),
    (("gelu",), "gelu", (("approximate", "none"),)),
    (("sigmoid", "sigmoid_"), "sigmoid", ()),
    (("tanh", "tanh_"), "tanh", ()),
    (("mish",), "mish", ()),
    (("softplus",), "softplus", (("beta", 1.0), ("threshold", 20.0))),
):
    for _func in _functions(*_names):
        _ELEMENTWISE_FUNCTIONS.setdefault(_func, (_kind, _params))

_POOL_FUNCTIONS: dict[Any, str] = {
    getattr(F, f"{kind}_pool{rank}d"): f"{kind}_pool{rank}d"
    for kind in ("max", "avg", "adaptive_avg", "adaptive_max")
    for rank in (1, 2, 3)
}
_RESAMPLE_FUNCTIONS = {F.interpolate, F.upsample}
_DROPOUT_FUNCTIONS = set(
    _functions("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
) | set(_functions("dropout_", "alpha_dropout_", "feature_dropout", "feature_alpha_dropout", owners=(torch,)))
#: What ``x.data`` calls under ``__torch_function__``: the property's getter.
_TENSOR_DATA_GETTER: Callable[..., Any] = inspect.getattr_static(Tensor, "data").__get__
_TRANSPARENT_METHODS = set(
    _functions(
        "contiguous",
        "clone",
        "to",
        "float",
        "double",
        "half",
        "bfloat16",
        "type_as",
        "cpu",
        "cuda",
        "requires_grad_",
        owners=(Tensor,),
    )
) | {torch.clone, torch.as_tensor}  # as_tensor of a tensor: that tensor
#: The same values with no gradient: a stop-gradient step (``Identity(STOP_GRADIENT)``), which the prediction detaches
#: too, so that the chain sends no gradient past the user's ``detach()`` / ``.data`` (a frozen feature extractor).
_STOP_GRADIENT_FUNCTIONS = {*_functions("detach", owners=(Tensor,)), torch.detach, _TENSOR_DATA_GETTER}
#: Functions that make a new tensor of zeros, whatever their arguments.
_ZEROS_FUNCTIONS = {torch.zeros, torch.zeros_like, Tensor.new_zeros}
#: Functions that make a new tensor of one value, by the position of that value among their arguments.
_FULL_FUNCTIONS = {torch.full: 1, torch.full_like: 1, Tensor.new_full: 2}
_RESHAPE_FUNCTIONS = set(
    _functions("flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as", owners=(torch, Tensor))
)
_CONCAT_FUNCTIONS = set(_functions("cat", "concat", "concatenate", owners=(torch,)))
_ADD_FUNCTIONS = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}
_SUB_FUNCTIONS = {torch.sub, Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__isub__}
_MUL_FUNCTIONS = {torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__}
_DIV_FUNCTIONS = {torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__itruediv__}
_NEG_FUNCTIONS = {torch.neg, Tensor.neg, Tensor.__neg__}
_CLAMP_FUNCTIONS = set(_functions("clamp", "clamp_", "clip", "clip_", owners=(torch, Tensor)))
_MEAN_FUNCTIONS = {torch.mean, Tensor.mean}
_SPLIT_FUNCTIONS = set(_functions("split", "chunk", "tensor_split", owners=(torch, Tensor)))
_NARROW_FUNCTIONS = set(_functions("narrow", owners=(torch, Tensor)))
_AFFINE_FUNCTIONS: dict[Any, bool] = {  # -> transposed
    F.conv1d: False, F.conv2d: False, F.conv3d: False, F.linear: False,
    F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True,
}  # fmt: skip
#: A conv's input spatial size, by its name (its first call's, as recorded); empty where not known.
_Sizes = Mapping[str, tuple[int, ...]]
_NO_SIZES: _Sizes = {}
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__"}


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


# --------------------------------------------------------------------------- recording


@dataclass(eq=False)
class _Node:
    """What produced a tensor. ``inputs``: (producer or None, shape) per data input."""

    kind: Literal["input", "norm", "step", "concat", "sum", "pad", "zeros", "opaque"]
    shape: Shape
    inputs: tuple[tuple[_Node | None, Shape], ...] = ()
    step: Step | None = None
    label: str = ""
    post_steps: tuple[Step, ...] = ()
    pads: tuple[int, ...] = ()  # a "pad" node's padding, F.pad order
    pad_mode: str = "zeros"
    pads_fixed: bool = True  # False: an F.pad call's padding, which may be computed from the input's size
    why: str = ""  # an "opaque" node's reason, where it is a known op in an unsupported form
    call: int = 0  # a "norm" node's place among all normalization calls of the forward (1, 2, ...)


@dataclass
class _NormCall:
    """One normalization module's calls in the recorded forward: its first call's input, and every call's
    (input, place among all normalization calls)."""

    name: str
    each: list[tuple[_Node | None, Shape, int]]

    @property
    def input(self) -> _Node | None:
        return self.each[0][0]

    @property
    def input_shape(self) -> Shape:
        return self.each[0][1]

    @property
    def calls(self) -> int:
        return len(self.each)

    @property
    def places(self) -> list[int]:
        return [place for _, _, place in self.each]


class _Recorder(TorchFunctionMode):
    """The producer of every tensor of one forward (hooks + function mode), and each
    normalization layer's first-call input."""

    def __init__(self) -> None:
        super().__init__()
        self.producers: dict[int, tuple[weakref.ref[Tensor], _Node]] = {}  # id(tensor) -> (tensor, producer)
        self.norms: dict[str, _NormCall] = {}
        self.norm_calls = 0  # normalization calls so far in the forward
        self.stack: list[tuple[str, nn.Module]] = []  # modules whose forward is running
        self.leaf_depth = 0  # > 0 inside a recognised module: its own ops are not recorded
        self.busy = False  # the recorder's own tensor calls are not recorded
        self.nodes: list[_Node] = []  # keeps every node alive (and its id unique) for the walks
        self.kinds: list[str | None] = []  # per running module: its leaf kind (None: not a leaf we know)
        self.entries: list[tuple[_Node, ...]] = []  # per running module: its inputs' producers when it was called
        #: id(node) -> the modules that returned that node's value, unchanged or computed (:meth:`_note_passed`)
        self.passed: dict[int, list[str]] = {}
        self.probed: dict[int, Elementwise | Identity | None] = {}  # id(module) -> the step its forward computes
        self.probe_failed: dict[int, Elementwise | Identity] = {}  # id(module) -> its probe's step, not the example's
        self.by_memory: dict[int, set[int]] = {}  # storage address -> ids of recorded tensors on it (_written_through)
        #: a conv's or pooling module's name -> its first call's input spatial size (_fan_in, _one_position)
        self.input_sizes: dict[str, Shape] = {}
        self.module_inputs: dict[str, tuple[int, ...]] = {}  # every module -> its first call's input spatial size
        #: a ParameterScale factor's storage -> (its byte range there, the node that reads it)
        self.factor_nodes: dict[int, list[tuple[tuple[int, int], _Node]]] = {}
        #: every ParameterScale product: (its node, its label, the tensor it read, that tensor's address and bytes then)
        self.factor_reads: list[tuple[_Node, str, Tensor, int, Tensor]] = []
        self.model: nn.Module | None = None  # the recorded model, its modules looked up live (factors_changed)

    # ----------------------------------------------------------------- producers

    def producer(self, tensor: Tensor) -> _Node | None:
        entry = self.producers.get(id(tensor))
        if entry is None or entry[0]() is not tensor:  # a dead tensor's id, reused
            return None
        return entry[1]

    def edge(self, tensor: Tensor) -> tuple[_Node | None, Shape]:
        return self.producer(tensor), tuple(tensor.shape)

    def produce(self, tensor: Tensor, node: _Node) -> None:
        self.producers[id(tensor)] = (weakref.ref(tensor), node)
        self.nodes.append(node)
        memory = _memory(tensor)
        if memory is not None:
            self.by_memory.setdefault(memory, set()).add(id(tensor))

    def steps_node(
        self, steps: tuple[Step, ...], source: tuple[_Node | None, Shape], out: Tensor | None
    ) -> tuple[_Node | None, Shape]:
        """Chain ``steps`` after ``source``; ``out`` (if given) is produced by the last. Returns the
        last edge (intermediate shapes are taken as ``out``'s, or the source's)."""
        shape = tuple(out.shape) if out is not None else source[1]
        edge = source
        for step in steps:
            node = _Node("step", shape, (edge,), step=step)
            self.nodes.append(node)
            edge = (node, shape)
        if out is not None and edge[0] is not None:
            self.produce(out, edge[0])
        return edge

    def step_node(self, step: Any, source: tuple[_Node | None, Shape], out: Tensor) -> None:
        if step is _TRANSPARENT:
            if source[0] is not None:
                self.produce(out, source[0])
            return
        self.produce(out, _Node("step", tuple(out.shape), (source,), step=step))

    def opaque(
        self, label: str, sources: Sequence[tuple[_Node | None, Shape]], outputs: Sequence[Tensor], why: str = ""
    ) -> None:
        """``outputs`` come from ``label`` (an op or module), which moments cannot pass (``why``, if known)."""
        for out in outputs:
            self.produce(out, _Node("opaque", tuple(out.shape), tuple(sources), label=label, why=why))

    def where(self) -> str:
        if not self.stack:
            return ""
        name, module = self.stack[-1]
        where = f"'{name}'" if name else "the model's forward"
        return f" in {where} ({type(module).__name__})"

    # ----------------------------------------------------------------- modules

    def pre_hook(self, name: str, static_kind: str | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            args = (*args, *kwargs.values())
            if args and isinstance(args[0], Tensor):
                self.module_inputs.setdefault(name, tuple(int(d) for d in args[0].shape[2:]))
            if self.factor_reads and is_normalization(module):  # a factor changed before the layer reads its path
                self.busy = True
                try:
                    self.factors_changed()
                finally:
                    self.busy = False
            kind = static_kind
            if kind is None and self.leaf_depth == 0 and not self.busy and _probe_candidate(module, args):
                kind = self._probe(name, module, args[0])
            self.stack.append((name, module))
            self.kinds.append(kind)
            self.entries.append(tuple(node for node in map(self.producer, _tensors(args)) if node is not None))
            if kind is not None:
                self.leaf_depth += 1

        return hook

    def _probe(self, name: str, module: nn.Module, example: Tensor) -> str | None:
        """'probed' if the parameter-free module ``name`` computes a known activation
        (:func:`_identify_activation`); cached per module."""
        self.busy = True
        try:
            if id(module) not in self.probed:
                self.probed[id(module)] = _identify_activation(module, example, name)
            step = self.probed[id(module)]
            if step is None:
                return None
            if not _computes_on(module, step, example):  # this call's values reach what the probe did not cover
                self.probe_failed[id(module)] = step
                return None  # not a leaf on this call: the operators its forward runs are recorded as any others
        finally:
            self.busy = False
        return "probed"

    def post_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            args = (*args, *kwargs.values())
            self.stack.pop()
            kind = self.kinds.pop()
            entries = self.entries.pop()
            if kind is not None:
                self.leaf_depth -= 1
            if self.leaf_depth > 0:
                return
            self.busy = True
            try:
                if kind is None:
                    self._unseen_outputs(name, module, args, output)
                else:
                    self._leaf(name, module, kind, args, output)
                self._note_passed(name, entries, output)
            finally:
                self.busy = False

        return hook

    def _note_passed(self, name: str, entries: tuple[_Node, ...], output: Any) -> None:
        """Note module ``name`` for each recorded value it returned (``output``'s tensors, wherever they sit in its
        results: ``(aux, x)``): one of its inputs unchanged (``entries``: their producers when it was called; the same
        tensor, or one a view or ``contiguous`` gave), or one computed in it from tensor operators that name no module
        (``return x * 2``, ``a + b``, ``torch.cat``, ``F.pad``: :data:`_COMPUTED`). Either way a hook on it changes
        what a path through that value carries, and no step of the path names it (the root aside: its hooks see the
        model's inputs and outputs)."""
        if not name:
            return
        for out in _tensors(output):
            node = self.producer(out)
            if node is None or (node.kind == "step" and getattr(node.step, "module", None) == name):
                continue  # not recorded, or the module's own step (which names it)
            if node.kind in _COMPUTED or any(node is entry for entry in entries):
                # A pad the next conv folds in: that conv's step reads the pad's input, where the walk finds it.
                padded = node.inputs[0][0] if node.kind == "pad" and node.inputs else None
                for noted in (node,) if padded is None else (node, padded):
                    names = self.passed.setdefault(id(noted), [])
                    if name not in names:
                        names.append(name)

    def _unseen_outputs(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        """An unrecognised module whose outputs no recorded op produced (custom autograd
        functions, C++ ops): the module itself is their producer, an opaque one."""
        unseen = [t for t in _tensors(output) if self.producer(t) is None]
        if unseen and name:
            sources = [self.edge(t) for t in _tensors(args)]
            kind = type(module).__name__
            if isinstance(module, ScriptedSubmodule):
                kind = f"TorchScript {getattr(module.scripted, 'original_name', type(module.scripted).__name__)}"
            self.opaque(f"'{name}' ({kind})", sources, unseen)

    def _leaf(self, name: str, module: nn.Module, kind: str, args: Any, output: Any) -> None:
        inputs = list(_tensors(args))
        outputs = list(_tensors(output))
        label = f"'{name}' ({type(module).__name__})"
        if not inputs or not outputs:
            self.opaque(label, [self.edge(t) for t in inputs], outputs)
            return
        inp, out = inputs[0], outputs[0]
        source = self.edge(inp)
        if kind == "norm":
            self._norm(name, module, source, out)
            return
        try:
            if kind == "probed":
                step = self.probed[id(module)]
            elif kind == "pad":
                mode = _pad_mode(module)
                assert mode is not None
                self._pad(_module_pads(module), mode, source, out, label)
                return
            else:
                step = _module_step(name, module, kind, inp, out)
        except _Unsupported as reason:
            self.opaque(reason.what, [source], outputs, reason.why)
            return
        if isinstance(step, Pool) and step.module is not None:
            self.input_sizes.setdefault(step.module, tuple(inp.shape[2:]))
        if isinstance(step, Affine) and step.kind == "conv":
            assert isinstance(module, nn.modules.conv._ConvNd)
            self.input_sizes.setdefault(step.module, tuple(inp.shape[2:]))
            source, step = _fold_padding(source, module, step)
        self.step_node(step, source, out)
        wrote = out is inp or getattr(module, "inplace", False) is True
        if wrote and not _identity_step(step) and _memory(out) is not None and _memory(out) == _memory(inp):
            self._written_through(out, label)  # an in-place module (nn.ReLU(inplace=True)) applied to a view

    def _norm(self, name: str, module: nn.Module, source: tuple[_Node | None, Shape], out: Tensor) -> None:
        self.norm_calls += 1
        if name not in self.norms:
            self.norms[name] = _NormCall(name, [])
        self.norms[name].each.append((*source, self.norm_calls))
        post_steps, unsupported = _norm_post_steps(name, module)
        node = _Node("norm", tuple(out.shape), (source,), label=name, post_steps=post_steps, call=self.norm_calls)
        if unsupported:
            self.nodes.append(node)
            self.opaque(unsupported, [(node, tuple(out.shape))], [out])
        else:
            self.produce(out, node)

    # ----------------------------------------------------------------- functions

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.leaf_depth > 0 or self.busy:
            return func(*args, **kwargs)
        data_kwargs = {key: value for key, value in kwargs.items() if key != "out"}  # out= is written, not read
        sources = [self.edge(t) for t in _tensors(args)] + [self.edge(t) for t in _tensors(data_kwargs)]
        out = func(*args, **kwargs)
        self.busy = True
        try:
            self._function(func, args, kwargs, sources, out)
        finally:
            self.busy = False
        return out

    def _function(
        self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], sources: list[tuple[_Node | None, Shape]],
        out: Any,
    ) -> None:  # fmt: skip
        outputs = list(_tensors(out))
        mutated = _mutated(func, args, kwargs)
        if not outputs and mutated is None:
            return
        label = _op_label(func) + self.where()
        self._record_function(func, args, kwargs, sources, out, outputs, mutated, label)
        if mutated is not None and self.factor_nodes:
            self._factor_written(mutated, label)
        producer = self.producer(mutated) if mutated is not None else None
        unchanged = producer is not None and producer.kind == "step" and _identity_step(producer.step)
        if mutated is not None and not unchanged and getattr(func, "__name__", "") not in _METADATA_INPLACE:
            self._written_through(mutated, label)

    def _record_function(
        self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], sources: list[tuple[_Node | None, Shape]],
        out: Any, outputs: list[Tensor], mutated: Tensor | None, label: str,
    ) -> None:  # fmt: skip
        try:
            if func in _SPLIT_FUNCTIONS and sources and outputs and self._split(args, kwargs, sources[0], outputs):
                return
            if isinstance(out, Tensor) and mutated is None and _zero_filled(func, args, kwargs):
                self.produce(out, _Node("zeros", tuple(out.shape), label=label))
                return
            if isinstance(out, Tensor) and sources:
                if self._recognised(func, args, kwargs, sources, out, label):
                    return
        except _Unsupported as reason:
            label, why = reason.what, reason.why
        else:
            why = ""
        targets = outputs if mutated is None or any(t is mutated for t in outputs) else [*outputs, mutated]
        self.opaque(label, sources, targets, why)

    def _factor_written(self, written: Tensor, label: str) -> None:
        """An in-place op (``label``) wrote the storage of a factor that ParameterScale steps read
        (``self.scale.mul_(0.5)`` after ``h * self.scale``): the step would read the written value when the layer
        predicts, not the one the product used. Each such step's node becomes opaque, so the layers after it start
        their own chain."""
        readers = self.factor_nodes.get(_memory(written) or -1, [])
        span = _byte_span(written)
        for reach, node in [entry for entry in readers if span[0] < entry[0][1] and entry[0][0] < span[1]]:
            readers.remove((reach, node))
            step = node.step
            node.kind, node.step, node.label = "opaque", None, label
            factor = step.describe() if step is not None else ""
            node.why = f"its factor {factor} was changed in place later in the forward"

    def factors_changed(self) -> None:
        """Before each normalization call and after the forward: a ParameterScale step whose factor is no longer,
        looked up as a prediction looks it up (its owner by name from the model, live: a re-assigned holder counts),
        the tensor at the address and with the bytes the product read (rebound: ``self.a = nn.Parameter(...)``,
        ``a.data = ...``, ``a.set_(...)``; written by an operator the recorder does not see as in-place,
        ``torch._foreach_mul_([a], k)``) could read another value when the layer predicts. Its node becomes opaque,
        as for an in-place write the recorder sees (:meth:`_factor_written`). Conservative, as that is: a change
        after the layer that reads the product ran (a schedule stepped at the end of the forward) drops it too."""
        for node, label, held, address, recorded in self.factor_reads:
            step = node.step
            if node.kind != "step" or not isinstance(step, ParameterScale):
                continue  # already made opaque
            holder = _live_module(self.model, step.owner)
            now = getattr(holder, step.name, None)
            if isinstance(now, Tensor) and now is held and now.data_ptr() == address:
                if torch.equal(_bytes_of(now), recorded):
                    continue
            node.kind, node.step, node.label = "opaque", None, label
            if holder is None:
                node.why = f"its factor {step.describe()}: the module holding it cannot be looked up by that name"
                continue
            node.why = (
                f"its factor {step.describe()} was changed later in the forward (rebound, or written by an operator "
                "that is not recorded as in-place)"
            )

    def _written_through(self, written: Tensor, label: str) -> None:
        """An in-place op (``label``) wrote ``written``: every other recorded tensor on the same memory (its base, the
        other views of it: ``y[:, :4].relu_()`` changes ``y``) now holds other values than its producer says. Each
        becomes opaque, so a layer that reads it starts its own chain, with the reason in its note. Conservative:
        a view of channels the write did not touch is made opaque too."""
        memory = _memory(written)
        if memory is None:
            return
        for tensor_id in list(self.by_memory.get(memory, ())):
            entry = self.producers.get(tensor_id)
            if entry is None:
                continue
            ref, node = entry
            tensor = ref()
            if tensor is None or tensor is written or _memory(tensor) != memory:
                continue
            shape = tuple(tensor.shape)
            why = "its memory was changed in place through another view of it"
            self.producers[tensor_id] = (ref, _Node("opaque", shape, ((node, shape),), label=label, why=why))
            self.nodes.append(self.producers[tensor_id][1])

    def _recognised(
        self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], sources: list[tuple[_Node | None, Shape]],
        out: Tensor, label: str,
    ) -> bool:  # fmt: skip
        """Record ``func`` if it is an op whose moments are carried; False if it is not one."""
        source = sources[0]
        first = args[0] if args else None
        if func in _ELEMENTWISE_FUNCTIONS:
            kind, defaults = _ELEMENTWISE_FUNCTIONS[func]
            params = tuple((n, _arg(args, kwargs, i + 1, n, d)) for i, (n, d) in enumerate(defaults))
            if not all(isinstance(value, (int, float, str, bool)) for _, value in params):
                raise _Unsupported(label, f"with parameters {dict(params)} that are not plain numbers")
            self.step_node(Elementwise(kind, params), source, out)
            return True
        if func is F.prelu:
            owner = self._owner_of(_arg(args, kwargs, 1, "weight"))
            if owner is None:
                raise _Unsupported(label, "a weight that is no module's parameter")
            self.step_node(Elementwise("prelu", (), owner), source, out)
            return True
        if func in _POOL_FUNCTIONS:
            try:
                spec = moments.PoolSpec.from_call(_POOL_FUNCTIONS[func], args, kwargs)
            except moments.MomentsError as error:
                raise _Unsupported(label, str(error)) from None
            self.step_node(Pool(spec), source, out)
            return True
        if func in _RESAMPLE_FUNCTIONS:
            try:
                resample = moments.ResampleSpec.from_call(args, kwargs)
            except moments.MomentsError as error:
                raise _Unsupported(label, str(error)) from None
            self.step_node(Resample(resample, size_fixed=resample.size is None), source, out)
            return True
        if func in _AFFINE_FUNCTIONS:
            return self._affine(func, args, kwargs, source, out, label)
        if func is F.pad:
            mode = _arg(args, kwargs, 2, "mode", "constant")
            value = _arg(args, kwargs, 3, "value", None)
            pads = tuple(_arg(args, kwargs, 1, "pad"))
            if mode == "constant" and value in (None, 0):
                mode = "zeros"
            if any(pads) and mode not in ("zeros", "reflect", "replicate", "circular"):
                raise _Unsupported(label, f"{mode} padding {list(pads)}, value {value}")
            spatial_pairs = 2 * (out.dim() - 2)
            if len(pads) > spatial_pairs and any(pads[spatial_pairs:]):  # pads the channels (or the batch)
                if len(pads) > spatial_pairs + 2 or mode != "zeros":
                    raise _Unsupported(label, f"{mode} padding {list(pads)} beyond the channel dim")
                before, after = pads[spatial_pairs], pads[spatial_pairs + 1]
                source = self.steps_node((ChannelPad(before, after),), source, None)
            self._pad(pads[:spatial_pairs], mode, source, out, label, fixed=False)  # may be computed from the size
            return True
        if func in _DROPOUT_FUNCTIONS:
            self.step_node(Identity("dropout"), source, out)
            return True
        if func in _TRANSPARENT_METHODS and isinstance(first, Tensor) and first.shape == out.shape:
            self.step_node(_TRANSPARENT, source, out)
            return True
        if func in _STOP_GRADIENT_FUNCTIONS and isinstance(first, Tensor) and first.shape == out.shape:
            self.step_node(Identity(STOP_GRADIENT), source, out)
            return True
        if func in _RESHAPE_FUNCTIONS and isinstance(first, Tensor):
            self.step_node(_reshape_step(tuple(first.shape), tuple(out.shape), label), source, out)
            return True
        if func is Tensor.__getitem__ and isinstance(first, Tensor):
            self.steps_node(_index_steps(args[1], first.shape, label), source, out)
            return True
        if func in _NARROW_FUNCTIONS and isinstance(first, Tensor):
            dim, start = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "start")
            if not isinstance(dim, int) or dim % first.dim() != 1 or not isinstance(start, int):
                raise _Unsupported(label, f"along dim {dim}: not the channel dim")
            self.step_node(Channels(start % first.shape[1], start % first.shape[1] + out.shape[1]), source, out)
            return True
        if func in _MEAN_FUNCTIONS and isinstance(first, Tensor):
            return self._mean(first, args, kwargs, source, out, label)
        if func in _CONCAT_FUNCTIONS:
            return self._concat(args, kwargs, sources, out, label)
        if func in _ADD_FUNCTIONS:
            return self._add(args, kwargs, sources, out, label)
        if func in _SUB_FUNCTIONS | _DIV_FUNCTIONS | _NEG_FUNCTIONS or func is Tensor.__rsub__:
            self.step_node(_constant_step(func, args, kwargs, label), source, out)
            return True
        if func in _MUL_FUNCTIONS:
            return self._mul(args, kwargs, sources, out, label)
        if func in _CLAMP_FUNCTIONS:
            low, high = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
            if isinstance(low, Tensor) or isinstance(high, Tensor):  # `low == 0` of a tensor bound has no truth value
                raise _Unsupported(label, "with a tensor bound: only clamp(min=0) or clamp(lo, hi) with numbers")
            if low == 0 and high is None:
                self.step_node(Elementwise("relu"), source, out)
            elif isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= high:
                self.step_node(
                    Elementwise("hardtanh", (("min_val", float(low)), ("max_val", float(high)))), source, out
                )
            else:
                raise _Unsupported(label, f"to [{low}, {high}]: only clamp(min=0) or clamp(lo, hi) with numbers")
            return True
        return False

    def _pad(
        self,
        pads: tuple[int, ...],
        mode: str,
        source: tuple[_Node | None, Shape],
        out: Tensor,
        label: str,
        fixed: bool = True,
    ) -> None:
        """Padding ``pads`` (``F.pad`` order: last dim first) in ``mode``: kept as a 'pad' node,
        which only a following conv absorbs (:func:`_fold_padding`); no padding is no step.
        fixed: False for an ``F.pad`` call, whose amounts may come from the input's size."""
        if not any(pads):
            self.step_node(_TRANSPARENT, source, out)
            return
        text = f"{mode} padding {list(pads)} ({label}) not followed by a conv"
        node = _Node("pad", tuple(out.shape), (source,), label=text, pads=pads, pad_mode=mode, pads_fixed=fixed)
        self.produce(out, node)

    def _affine(
        self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], source: tuple[_Node | None, Shape],
        out: Tensor, label: str,
    ) -> bool:  # fmt: skip
        """``F.conv*d`` / ``F.linear`` with the weight of a Conv/Linear module whose own forward
        calls it (a subclass that pads first, e.g. TensorFlow-style "same" padding): recorded as
        that module, with the explicit padding before it folded in (:func:`_fold_padding`)."""
        owner = self._owner_of(_arg(args, kwargs, 1, "weight"))
        module = None if owner is None else self._module(owner)
        if owner is None or module is None:
            raise _Unsupported(label, "a weight that is no Conv/Linear module's parameter")
        if _arg(args, kwargs, 2, "bias") is not getattr(module, "bias", None):
            raise _Unsupported(label, f"a bias other than the one of its module '{owner}'")
        if func is F.linear:
            if not isinstance(module, nn.Linear):
                raise _Unsupported(
                    label,
                    f"the weight of '{owner}' ({type(module).__name__}), which is no nn.Linear: the chain predicts "
                    "through F.linear only as an nn.Linear's own forward (make the layer an nn.Linear, or a "
                    "subclass of it)",
                )
            if out.dim() != 2:
                raise _Unsupported(
                    label,
                    f"'{owner}' on a {tuple(out.shape)} output: the chain predicts through a Linear of (N, C) "
                    "outputs only (a Linear over the last axis of a sequence mixes no channels of a BatchNorm)",
                )
            self.step_node(Affine(owner, "linear"), source, out)
            return True
        transposed = _AFFINE_FUNCTIONS[func]
        if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed != transposed:
            raise _Unsupported(label, f"the weight of '{owner}' ({type(module).__name__})")
        names: tuple[str, ...]
        if transposed:  # (input, weight, bias, stride, padding, output_padding, groups, dilation)
            names = ("stride", "padding", "output_padding", "groups", "dilation")
        else:  # (input, weight, bias, stride, padding, dilation, groups)
            names = ("stride", "padding", "dilation", "groups")
        defaults = {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
        rank = module.weight.dim() - 2
        for index, key in enumerate(names):
            value = _arg(args, kwargs, 3 + index, key, defaults[key])
            expected = getattr(module, key)
            expected = tuple(expected) if isinstance(expected, list) else expected
            if not isinstance(value, str) and key != "groups":
                value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
            if value != expected or module.padding_mode != "zeros":
                raise _Unsupported(
                    label,
                    f"{key}={value} where its module '{owner}' has {expected}, padding_mode {module.padding_mode!r}",
                )
        data = _arg(args, kwargs, 0, "input")
        if isinstance(data, Tensor):
            self.input_sizes.setdefault(owner, tuple(data.shape[2:]))
        source, step = _fold_padding(source, module, Affine(owner, "conv"))
        self.step_node(step, source, out)
        return True

    def _module(self, name: str) -> nn.Module | None:
        for entry_name, module in self.stack:
            if entry_name == name:
                return module
        return None

    def _split(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], source: tuple[_Node | None, Shape], outputs: list[Tensor]
    ) -> bool:
        """``split`` / ``chunk`` / ``tensor_split`` along the channels: one channel range per output (False, so the
        outputs are opaque, where an output is not a plain channel range of the input)."""
        dim = _arg(args, kwargs, 2, "dim", 0)
        first = args[0] if args else None
        if not isinstance(first, Tensor) or not isinstance(dim, int) or first.dim() < 2 or dim % first.dim() != 1:
            return False
        ranges = []
        for out in outputs:  # each output's first channel from where its view starts (tensor_split's indices need
            width = out.shape[1]  # not be sorted: tensor_split(y, [4, 2, 6], 1)[2] is y[:, 2:6])
            offset, stride = out.storage_offset() - first.storage_offset(), first.stride(1)
            if width == 0:
                ranges.append((0, 0))
                continue
            if _memory(out) != _memory(first) or stride <= 0 or offset % stride or out.stride() != first.stride():
                return False
            start = offset // stride
            if not 0 <= start <= start + width <= first.shape[1]:
                return False
            ranges.append((start, start + width))
        for out, (start, stop) in zip(outputs, ranges):
            self.step_node(Channels(start, stop), source, out)
        return True

    def _owner_of(self, parameter: Any) -> str | None:
        """The innermost module on the call stack that holds ``parameter`` directly."""
        for name, module in reversed(self.stack):
            if any(p is parameter for p in module.parameters(recurse=False)):
                return name
        return None

    def _parameter_scale(self, x: Tensor, factor: Tensor, out: Tensor) -> tuple[ParameterScale, Tensor] | None:
        """(the step, the held tensor) for ``x · a`` where ``a`` is a parameter or buffer that a running module holds,
        or a view of all of it in its own order (``gamma.view(1, -1, 1, 1)``, ``gamma[:, None, None]``: the same
        memory, the channel dim at stride 1 of a contiguous tensor; not ``gamma[:1].expand(C)``), of one value or one
        per channel of x broadcast along the channel dim; None for any other factor."""
        if x.shape != out.shape or x.dim() < 2 or factor.numel() not in (1, x.shape[1]):
            return None
        if factor.numel() > 1 and not _channel_factor_shape(tuple(factor.shape), tuple(x.shape)):
            return None
        held = factor if factor._base is None else factor._base
        if held.numel() != factor.numel() or factor.data_ptr() != held.data_ptr() or not held.is_contiguous():
            return None
        if any(size > 1 and stride != 1 for size, stride in zip(factor.shape, factor.stride())):
            return None
        holder = self._holder_of(held)
        if holder is None:
            return None
        return ParameterScale(*holder), held

    def _holder_of(self, tensor: Tensor) -> tuple[str, str] | None:
        """(qualified module name, attribute) of the module that holds ``tensor`` as a parameter or buffer, searched
        from the innermost running module down through its submodules (``self.scale.gamma`` read in a block's
        forward), then outward."""
        for name, running in reversed(self.stack):
            for inner, module in running.named_modules(remove_duplicate=False):
                if isinstance(module, torch.jit.ScriptModule):
                    continue  # held inside TorchScript: its name during recording is the wrapper's, not the model's
                for attribute, held in (*module._parameters.items(), *module._buffers.items()):
                    if held is tensor:
                        return ".".join(part for part in (name, inner) if part), attribute
        return None

    def _mean(
        self, first: Tensor, args: Sequence[Any], kwargs: Mapping[str, Any], source: tuple[_Node | None, Shape],
        out: Tensor, label: str,
    ) -> bool:  # fmt: skip
        """``x.mean(spatial dims)``: global average pooling (and a reshape when not keepdim)."""
        dims = _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        rank = first.dim() - 2
        if dims is None or rank < 1 or _arg(args, kwargs, 3, "dtype") is not None:
            raise _Unsupported(label, f"over {dims}: not a mean over the spatial dims")
        dims = {d % first.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
        if dims != set(range(2, first.dim())):
            raise _Unsupported(label, f"over dims {sorted(dims)} of {tuple(first.shape)}: not the spatial dims")
        pooled_shape = (*first.shape[:2], *([1] * rank))
        spec = moments.PoolSpec.create("adaptive_avg", rank, output_size=1)
        pool = _Node("step", pooled_shape, (source,), step=Pool(spec))
        if keepdim:
            self.produce(out, pool)
        else:
            self.nodes.append(pool)
            self.step_node(Reshape(()), (pool, pooled_shape), out)
        return True

    def _concat(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], sources: list[tuple[_Node | None, Shape]], out: Tensor,
        label: str,
    ) -> bool:  # fmt: skip
        dim = _arg(args, kwargs, 1, "dim", kwargs.get("axis", 0))
        if not isinstance(dim, int) or out.dim() < 2 or dim % out.dim() != 1:
            raise _Unsupported(label, f"along dim {dim} of {tuple(out.shape)}: not the channel dim")
        parts = [s for s in sources if s[1] and s[1][1:2] != (0,)]  # empty parts add no channels
        kept = _zero_parts_as_padding(parts)
        if not kept:  # zeros only
            self.produce(out, _Node("zeros", tuple(out.shape), label=label))
        elif len(kept) == 1 and len(parts) > 1:  # one part and zeros: that part, padded
            node, _ = kept[0]
            if node is not None:
                self.produce(out, node)
        else:
            self.produce(out, _Node("concat", tuple(out.shape), tuple(kept)))
        return True

    def _add(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], sources: list[tuple[_Node | None, Shape]], out: Tensor,
        label: str,
    ) -> bool:  # fmt: skip
        other = _arg(args, kwargs, 1, "other")
        alpha = kwargs.get("alpha", 1)
        if not isinstance(other, Tensor):
            if isinstance(other, (int, float)) and isinstance(alpha, (int, float)):
                step = _TRANSPARENT if other == 0 else ScaleShift(1.0, float(other) * alpha)  # sum() starts at 0
                self.step_node(step, sources[0], out)
                return True
            raise _Unsupported(label, f"of {_short(other)} (alpha={_short(alpha)})")
        if alpha != 1 or len(sources) != 2 or any(shape != tuple(out.shape) for _, shape in sources):
            shapes = [shape for _, shape in sources]
            raise _Unsupported(label, f"of shapes {shapes} (alpha={alpha}): not a residual sum of equal shapes")
        self.produce(out, _Node("sum", tuple(out.shape), tuple(sources)))
        return True

    def _mul(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], sources: list[tuple[_Node | None, Shape]], out: Tensor,
        label: str,
    ) -> bool:  # fmt: skip
        """``x · c`` by a number (a ScaleShift), by a module's scalar or per-channel tensor (a ParameterScale), or
        ``x · g`` by a gate computed from x itself (a Gate)."""
        first, other = (args[0] if args else None), _arg(args, kwargs, 1, "other")
        if isinstance(first, Tensor) and isinstance(other, (int, float)):
            self.step_node(ScaleShift(float(other), 0.0), sources[0], out)
            return True
        if isinstance(first, Tensor) and isinstance(other, Tensor) and len(sources) == 2:
            scaled, source = self._parameter_scale(first, other, out), sources[0]
            if scaled is None:  # a · x
                scaled, source = self._parameter_scale(other, first, out), sources[1]
            if scaled is not None:
                step, held = scaled
                self.step_node(step, source, out)
                node, memory = self.producer(out), _memory(held)
                if node is not None and memory is not None:  # the factor's own bytes: parameters may share a storage
                    self.factor_nodes.setdefault(memory, []).append((_byte_span(held), node))
                if node is not None:
                    self.factor_reads.append((node, label, held, held.data_ptr(), _bytes_of(held).clone()))
                return True
        if not (isinstance(first, Tensor) and isinstance(other, Tensor)) or len(sources) != 2:
            raise _Unsupported(label, f"of {type(first).__name__} and {type(other).__name__}")
        if first.shape == other.shape == out.shape:  # x · f(x), elementwise: a known activation written out?
            for x, factor in ((sources[0], sources[1]), (sources[1], sources[0])):
                steps = _SELF_GATED.get(_branch_from(factor[0], x[0]) or ())
                if steps is not None and x[0] is not None:
                    self.steps_node(steps, x, out)
                    return True
            raise _Unsupported(label, "of x by a function of x that is no known activation")
        if first.shape == out.shape and _is_gate_shape(other.shape, out.shape):
            x, gate = sources[0], sources[1]
        elif other.shape == out.shape and _is_gate_shape(first.shape, out.shape):
            x, gate = sources[1], sources[0]
        else:
            raise _Unsupported(
                label,
                f"of shapes {[s for _, s in sources]}: neither a per-channel gate computed from x nor a whole "
                "parameter or buffer of a module (of one value or one per channel, read as it is: not a slice, copy "
                "or function of it)",
            )
        branch = _branch_from(gate[0], x[0])
        if branch is None:
            raise _Unsupported(label, "by a gate that is not computed from the gated tensor by steps alone")
        self.step_node(Gate(branch), x, out)
        return True


_HARD_SIGMOID_TIMES_6 = (ScaleShift(1.0, 3.0), Elementwise("relu6"))
_CLAMPED_TIMES_6 = (ScaleShift(1.0, 3.0), Elementwise("hardtanh", (("min_val", 0.0), ("max_val", 6.0))))

#: x · f(x) written out, by the steps of f: the activation it is (and a scale, where f lacks its "/ 6").
_SELF_GATED: dict[tuple[Step, ...], tuple[Step, ...]] = {
    (Elementwise("sigmoid"),): (Elementwise("silu"),),
    (Elementwise("hardsigmoid"),): (Elementwise("hardswish"),),
    (*_HARD_SIGMOID_TIMES_6, ScaleShift(1 / 6, 0.0)): (Elementwise("hardswish"),),
    (*_CLAMPED_TIMES_6, ScaleShift(1 / 6, 0.0)): (Elementwise("hardswish"),),
    _HARD_SIGMOID_TIMES_6: (Elementwise("hardswish"), ScaleShift(6.0, 0.0)),
    _CLAMPED_TIMES_6: (Elementwise("hardswish"), ScaleShift(6.0, 0.0)),
    (Elementwise("softplus", (("beta", 1.0), ("threshold", 20.0))), Elementwise("tanh")): (Elementwise("mish"),),
}


def _zero_filled(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether ``func(*args, **kwargs)`` makes a new tensor of zeros: ``torch.zeros``, ``zeros_like``,
    ``new_zeros``, or a ``full`` of 0."""
    if func in _ZEROS_FUNCTIONS:
        return True
    if func in _FULL_FUNCTIONS:
        value = _arg(args, kwargs, _FULL_FUNCTIONS[func], "fill_value")
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    return False


def _zero_parts_as_padding(parts: Sequence[tuple[_Node | None, Shape]]) -> list[tuple[_Node | None, Shape]]:
    """A channel concat's parts with every part of zeros (a ResNet "option A" shortcut, ``torch.cat([x,
    torch.zeros(...)], 1)``) folded into the part after it (or, at the end, before it) as :class:`ChannelPad`:
    exact, a zero channel has mean 0 and variance 0. Empty where every part is zeros; parts unchanged where
    none is."""
    if not any(node is not None and node.kind == "zeros" for node, _ in parts):
        return list(parts)
    kept: list[tuple[_Node | None, Shape]] = []
    zeros = 0
    for node, shape in parts:
        if node is not None and node.kind == "zeros":
            zeros += shape[1]
        elif zeros:
            kept.append(_channel_padded(node, shape, zeros, 0))
            zeros = 0
        else:
            kept.append((node, shape))
    if zeros and kept:
        kept[-1] = _channel_padded(*kept[-1], 0, zeros)
    return kept


def _channel_padded(node: _Node | None, shape: Shape, before: int, after: int) -> tuple[_Node, Shape]:
    """The edge of ``node``'s output with ``before`` / ``after`` zero channels added: one :class:`ChannelPad`
    (merged with the one that made ``node``, if one did)."""
    if node is not None and node.kind == "step" and isinstance(node.step, ChannelPad):
        pad = node.step
        node, shape = node.inputs[0]
        before, after = before + pad.before, after + pad.after
    padded = (shape[0], shape[1] + before + after, *shape[2:])
    return _Node("step", padded, ((node, shape),), step=ChannelPad(before, after)), padded


def _channel_factor_shape(factor: Shape, full: Shape) -> bool:
    """Whether a factor of shape ``factor`` broadcasts against ``full: (N, C, *)`` along the channel dim alone:
    (C, 1, 1), (1, C, 1, 1), (C,) against (N, C)."""
    if len(factor) > len(full):
        return False
    aligned = range(len(full) - len(factor), len(full))
    return all(size == (full[1] if dim == 1 else 1) for dim, size in zip(aligned, factor)) and 1 in aligned


def _is_gate_shape(gate: Sequence[int], full: Sequence[int]) -> bool:
    """(N, C, 1, ...) against (N, C, *): one value per sample and channel."""
    return len(gate) == len(full) > 2 and tuple(gate[:2]) == tuple(full[:2]) and all(g == 1 for g in gate[2:])


def _branch_from(node: _Node | None, origin: _Node | None) -> tuple[Step, ...] | None:
    """The steps from ``origin``'s output to ``node``'s, if only step nodes lie between."""
    steps: list[Step] = []
    while node is not None and node is not origin and node.kind == "step":
        assert node.step is not None
        steps.append(node.step)
        node = node.inputs[0][0]
    if node is None or node is not origin or not steps:
        return None
    return tuple(reversed(steps))


def _short(value: Any) -> str:
    """A value as a note names it: a tensor by its kind and shape (its repr would put every element in the note,
    kilobytes for an activation), anything else by its type and a repr cut to 60 characters."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if isinstance(value, (int, float)) else f"{type(value).__name__} {text}"


def _constant_step(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], label: str) -> ScaleShift:
    """``x - c``, ``c - x``, ``x / c``, ``-x`` as a ScaleShift."""
    if func in _NEG_FUNCTIONS:
        return ScaleShift(-1.0, 0.0)
    other = _arg(args, kwargs, 1, "other")
    if not isinstance(other, (int, float)) or kwargs.get("rounding_mode") is not None:
        raise _Unsupported(label, f"by {_short(other)}, not a number")
    if func in _DIV_FUNCTIONS:
        if other == 0:
            raise _Unsupported(label, "by zero")
        return ScaleShift(1.0 / float(other), 0.0)
    if func is Tensor.__rsub__:
        return ScaleShift(-1.0, float(other))
    return ScaleShift(1.0, -float(other) * kwargs.get("alpha", 1))


def _index_steps(index: Any, shape: torch.Size, label: str) -> tuple[Step, ...]:
    """The steps for ``x[index]`` on ``x: (N, C, *)`` that keeps N: a channel range ``x[:, a:b]``
    and/or strided positions ``x[:, :, i::s, j::t]`` (trailing full slices or ``...`` allowed)."""
    items = list(index) if isinstance(index, tuple) else [index]
    full = slice(None)
    while items and (items[-1] is Ellipsis or items[-1] == full):
        items.pop()
    if not items:
        return ()
    spatial = items[2:]
    if (
        items[0] != full
        or len(items) > len(shape)
        or not all(isinstance(item, slice) and item.step in (None, 1) for item in items[1:2])
        or not all(isinstance(item, slice) and item.stop is None and (item.step or 1) > 0 for item in spatial)
    ):
        raise _Unsupported(label, f"index {index!r}: not a channel range and strided positions")
    steps: list[Step] = []
    if len(items) > 1 and items[1] != full:
        start, stop, _ = items[1].indices(shape[1])
        steps.append(Channels(start, max(start, stop)))
    if spatial:
        rank = len(shape) - 2
        starts = [item.start or 0 for item in spatial] + [0] * (rank - len(spatial))
        strides = [item.step or 1 for item in spatial] + [1] * (rank - len(spatial))
        if any(a < 0 for a in starts):
            raise _Unsupported(label, f"index {index!r}: positions counted from the end")
        steps.append(Subsample(tuple(starts), tuple(strides)))
    return tuple(steps)


_PAD_MODULES: tuple[tuple[type, str], ...] = (
    (nn.modules.padding._ReflectionPadNd, "reflect"),
    (nn.modules.padding._ReplicationPadNd, "replicate"),
    (nn.modules.padding._CircularPadNd, "circular"),
)


def _pad_mode(module: nn.Module) -> str | None:
    """The padding mode of a padding module (zeros for ``ConstantPad*d`` with value 0), or None."""
    if isinstance(module, nn.modules.padding._ConstantPadNd):
        return "zeros" if module.value == 0 else None
    return next((mode for cls, mode in _PAD_MODULES if isinstance(module, cls)), None)


def _module_pads(module: nn.Module) -> tuple[int, ...]:
    """A padding module's padding, in ``F.pad`` order."""
    padding: Any = module.padding
    return tuple(padding) if isinstance(padding, (tuple, list)) else (int(padding),) * 2


def _fold_padding(
    source: tuple[_Node | None, Shape], layer: nn.modules.conv._ConvNd, step: Affine
) -> tuple[tuple[_Node | None, Shape], Affine]:
    """A conv fed directly by a 'pad' node: the pad becomes the step's ``input_padding``
    (per spatial dim, first to last) and the conv reads the pad's input."""
    node = source[0]
    rank = layer.weight.dim() - 2
    if node is None or node.kind != "pad" or layer.transposed or len(node.pads) % 2 or len(node.pads) // 2 > rank:
        return source, step
    pairs = [(node.pads[2 * i], node.pads[2 * i + 1]) for i in range(len(node.pads) // 2)]  # last dim first
    per_dim = ((0, 0),) * (rank - len(pairs)) + tuple(reversed(pairs))
    return node.inputs[0], Affine(step.module, "conv", per_dim, node.pad_mode, node.pads_fixed)


#: Activations a parameter-free module is tried against (its forward on a probe tensor),
#: in order; the first match wins (elu and celu with alpha 1 are the same function).
_PROBE_CANDIDATES: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = (
    ("identity", ()), ("relu", ()), ("relu6", ()), ("leaky_relu", (("negative_slope", 0.01),)),
    ("hardtanh", (("max_val", 1.0), ("min_val", -1.0))), ("hardsigmoid", ()), ("hardswish", ()),
    ("elu", (("alpha", 1.0),)), ("selu", ()), ("silu", ()), ("gelu", (("approximate", "none"),)),
    ("gelu", (("approximate", "tanh"),)), ("sigmoid", ()), ("tanh", ()), ("mish", ()),
    ("softplus", (("beta", 1.0), ("threshold", 20.0))),
)  # fmt: skip
_PROBE_RANGE = 8.0


def _probe_candidate(module: nn.Module, args: Any) -> bool:
    """A leaf module without parameters or buffers, called on one floating-point tensor."""
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None:
        return False
    if next(module.buffers(), None) is not None:
        return False
    return len(args) == 1 and isinstance(args[0], Tensor) and args[0].is_floating_point() and args[0].numel() >= 32


def _identify_activation(module: nn.Module, example: Tensor, name: str) -> Elementwise | Identity | None:
    """The activation that ``module.forward`` computes, found by running it on a probe.

    The probe has ``example``'s shape, dtype and device and values spread evenly over
    [-8, 8] (where every candidate's pieces differ), in a fixed shuffled order (an ordered ramp
    comes back unchanged from ``torch.sort`` or ``cummax``, which would pass for the identity); the
    module must match a candidate there to 1e-4 relative / 1e-5 absolute (e.g. geffnet's
    ``HardSwishMe``, efficientnet-pytorch's ``MemoryEfficientSwish``, custom ``Swish`` modules).

    The probe runs on a deep copy of the module (the model's own keeps no state from it; a module that cannot be
    copied is not probed), and the step found is checked again on every call of the example forward
    (:func:`_computes_on`, on another copy): on a call whose values it does not match (a branch on their range),
    the module is not a leaf and the operators it runs are recorded. The copy runs in its current mode (the
    recording's: eval) and once more in train mode (the caller's RNG state kept): a module that is the identity
    only in eval mode (Gaussian noise, DropPath / stochastic depth) comes back as ``Identity("train-mode",
    name)``, which :mod:`bkn_export.chain.describe` notes as an effect the prior does not model, as it notes
    dropout; any other activation whose train-mode output differs is not taken (None).
    """
    try:  # probed on a copy: a module that keeps state (a feature tap, an observer) keeps none of the probe's values
        module = copy.deepcopy(module)
    except Exception:  # a module that cannot be copied is not probed
        return None
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(example.numel(), generator=generator).to(example.device)
    probe = torch.linspace(-_PROBE_RANGE, _PROBE_RANGE, example.numel(), dtype=example.dtype, device=example.device)
    probe = probe[order].reshape(example.shape)
    candidates = [Elementwise(kind, params, name) for kind, params in _PROBE_CANDIDATES]
    results = [(step, step.apply(probe.clone(), {})) for step in candidates]
    try:
        actual = module.forward(probe.clone())
    except Exception:  # any failure on the probe means "not a plain activation"
        return None
    if not isinstance(actual, Tensor) or actual.shape != probe.shape:
        return None
    matched = next(
        ((step, result) for step, result in results if torch.allclose(actual, result, rtol=1e-4, atol=1e-5)), None
    )
    if matched is None:
        return None
    step, result = matched
    if _same_in_train_mode(module, probe, result):
        return step
    return Identity("train-mode", name) if step.kind == "identity" else None


#: Train-mode runs of a probed module (each from its own seed) and the batch the last one is widened to: a
#: per-sample random effect (DropPath drops a whole sample with probability p) is then seen in the output whatever
#: the example's batch, at the same seeds on every recording. A draw from a global RNG is seen whatever its outcome
#: (:func:`_global_rng_states`).
_TRAIN_PROBE_SEEDS = range(2)
_TRAIN_PROBE_WIDE_BATCH = 64
_TRAIN_PROBE_MAX_ELEMENTS = 1 << 22


def _global_rng_states(devices: Sequence[torch.device]) -> tuple[object, ...]:
    """The global RNGs' states (torch's CPU one and ``devices``' CUDA ones, Python's ``random``, NumPy's where it is
    imported), as values comparable with ``==``."""
    numpy = sys.modules.get("numpy")
    states: list[object] = [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]
    states.append(random.getstate())
    if numpy is not None:
        kind, keys, *rest = numpy.random.get_state()
        states.append((kind, keys.tobytes(), *rest))
    return tuple(bytes(s.numpy()) if isinstance(s, Tensor) else s for s in states)


@contextlib.contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """Python's ``random`` and, where imported, NumPy's global RNG states restored on exit (a module may draw from
    them in train mode; torch's own generators are :func:`torch.random.fork_rng`'s)."""
    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


def _train_mode_probes(probe: Tensor, expected: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(seed, input, expected output) of each train-mode run: the probe, then the probe repeated along the batch to
    :data:`_TRAIN_PROBE_WIDE_BATCH` samples (within :data:`_TRAIN_PROBE_MAX_ELEMENTS`)."""
    for seed in _TRAIN_PROBE_SEEDS:
        yield seed, probe, expected
    repeats = min(_TRAIN_PROBE_WIDE_BATCH // max(probe.shape[0], 1), _TRAIN_PROBE_MAX_ELEMENTS // max(probe.numel(), 1))
    if probe.dim() >= 1 and repeats > 1:
        times = (repeats, *([1] * (probe.dim() - 1)))
        yield len(_TRAIN_PROBE_SEEDS), probe.repeat(times), expected.repeat(times)


def _seed_probe_generators(seed: int, devices: Sequence[torch.device]) -> None:
    """Seed torch's CPU generator and those of ``devices`` only (the ones :func:`torch.random.fork_rng` restores):
    ``torch.manual_seed`` would also reseed every other CUDA device's, leaving the user's CUDA seed changed."""
    torch.default_generator.manual_seed(seed)
    for device in devices:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _computes_on(module: nn.Module, step: Elementwise | Identity, example: Tensor) -> bool:
    """Whether a copy of the probed ``module`` computes ``step`` on ``example`` (a call's own input) as well, to the
    probe's tolerance: the probe covers [-8, 8], an example may reach values where the module differs (a branch on
    the input's range). The copy keeps the model's module free of this run's state."""
    try:
        actual = copy.deepcopy(module).forward(example.clone())
    except Exception:
        return False
    expected = example if isinstance(step, Identity) else step.apply(example.clone(), {})
    return (
        isinstance(actual, Tensor)
        and actual.shape == expected.shape
        and bool(torch.allclose(actual, expected, rtol=1e-4, atol=1e-5, equal_nan=True))
    )


def _same_in_train_mode(module: nn.Module, probe: Tensor, expected: Tensor) -> bool:
    """Whether the leaf ``module`` in train mode also gives ``expected`` on ``probe``, in every run of
    :func:`_train_mode_probes` (seeded: the same answer on every recording), without drawing from a global RNG
    (a module that draws is random in training, whatever this draw gave: DropPath that happened to keep every
    sample). Its mode and every global RNG state (torch's, Python's, NumPy's) are restored after; a module that
    cannot run in train mode is not the same."""
    if module.training:
        return True
    devices = [probe.device] if probe.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _global_rngs_kept():
        try:
            module.train(True)
            for seed, inputs, wanted in _train_mode_probes(probe, expected):
                _seed_probe_generators(seed, devices)
                random.seed(seed)
                numpy = sys.modules.get("numpy")
                if numpy is not None:
                    numpy.random.seed(seed)
                before = _global_rng_states(devices)
                try:
                    trained = module.forward(inputs.clone())
                except Exception:
                    if inputs is probe:  # a module that cannot run in train mode: not taken as a known activation
                        return False
                    continue  # one that takes only the example's batch: judged on the runs at that batch
                if _global_rng_states(devices) != before or not (
                    isinstance(trained, Tensor)
                    and trained.shape == wanted.shape
                    and torch.allclose(trained, wanted, rtol=1e-4, atol=1e-5)
                ):
                    return False
        except Exception:  # train(True) itself refused
            return False
        finally:
            with contextlib.suppress(Exception):
                module.train(False)
    return True


def _mutated(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tensor | None:
    """The tensor an in-place op writes to (its first argument), if ``func`` is one: a ``name_`` method or
    function, an in-place dunder, or a function called with ``inplace=True`` (``F.relu(x, inplace=True)``); or
    the tensor given as ``out=``."""
    name = getattr(func, "__name__", "")
    inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))
    if not inplace:
        position = _inplace_position(func)
        inplace = position is not None and _arg(args, kwargs, position, "inplace", False) is True
    if inplace and args and isinstance(args[0], Tensor):
        return args[0]
    written = kwargs.get("out")
    return written if isinstance(written, Tensor) else None  # torch.mul(a, b, out=y[:, :4])


#: In-place methods that change a tensor's metadata, flags or storage binding, never the values in its memory: the
#: other views of that memory keep their producers (``y.view(...).transpose_(1, 2)`` leaves ``y`` as it was).
_METADATA_INPLACE = frozenset(
    {
        "requires_grad_", "detach_", "share_memory_", "squeeze_", "unsqueeze_", "transpose_", "t_", "swapdims_",
        "swapaxes_", "as_strided_", "set_", "resize_", "resize_as_", "rename_", "refine_names", "align_to",
    }
)  # fmt: skip


def _identity_step(step: Any) -> bool:
    """Whether a recorded step leaves values as they are (dropout in eval, an identity activation)."""
    return isinstance(step, Identity) or (isinstance(step, Elementwise) and step.kind == "identity")


@functools.cache
def _inplace_position(func: Any) -> int | None:
    """The position of ``func``'s ``inplace`` parameter (``torch.nn.functional``'s activations, dropout), if any."""
    try:
        parameters = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return parameters.index("inplace") if "inplace" in parameters else None


def _live_module(model: nn.Module | None, name: str) -> nn.Module | None:
    """``model``'s submodule ``name`` as it is registered now, looked up as a prediction looks it up
    (:class:`bkn_export.chain.scope.Submodules`), or None."""
    if model is None:
        return None
    try:  # a TorchScript module's `_modules` is no dict; an override of get_submodule may raise anything
        return Submodules(model)[name]
    except Exception:
        return None


def _bytes_of(tensor: Tensor) -> Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (NaN compares equal to itself there)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def _byte_span(tensor: Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of its storage that ``tensor`` can reach (offset, sizes and strides)."""
    size = tensor.element_size()
    first = int(tensor.storage_offset()) * size
    reach = sum((int(n) - 1) * abs(int(stride)) for n, stride in zip(tensor.shape, tensor.stride()))
    return first, first + (reach + 1) * size if tensor.numel() else first


def _memory(tensor: Tensor) -> int | None:
    """The address of ``tensor``'s storage (shared by a tensor and its views), None for an empty or storage-less one."""
    try:
        address = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, fake
        return None
    return address or None


def _forward_understood(module: nn.Module) -> bool:
    """A normalization whose forward is torch's or bkn_export's, or normalizes then runs its own
    ``drop`` / ``act`` children (timm's norm-act layers): what :func:`_norm_post_steps` reads."""
    owner = next(cls for cls in type(module).__mro__ if "forward" in cls.__dict__)
    if owner.__module__.startswith(("torch.", "bkn_export.")):
        return True
    return any(name in ("drop", "act") for name, _ in module.named_children())


def _norm_post_steps(name: str, module: nn.Module) -> tuple[tuple[Step, ...], str]:
    """Steps a normalization module applies after normalizing: its ``drop`` then its ``act``
    child (timm's ``BatchNormAct2d`` and BKN's norm-act layers). Returns (steps, reason
    the output cannot carry moments, or "")."""
    children = dict(module.named_children())
    unknown = sorted(set(children) - {"drop", "act"})
    if unknown:
        return (), f"'{name}' ({type(module).__name__}) with submodules {unknown} after the normalization"
    steps: list[Step] = []
    for child_name in ("drop", "act"):
        if child_name not in children:
            continue
        child, qualified = children[child_name], f"{name}.{child_name}"
        kind = _leaf_kind(child)
        if kind == "identity":
            continue
        if kind == "dropout":
            steps.append(Identity("dropout", qualified))
        elif kind == "activation":
            cls = _defining_class(child, _ACTIVATION_MODULES)
            assert cls is not None
            act, params = _ACTIVATION_MODULES[cls]
            steps.append(Elementwise(act, params(child), qualified))
        else:
            return (), f"'{qualified}' ({type(child).__name__}) inside the normalization '{name}'"
    return tuple(steps), ""


# --------------------------------------------------------------------------- walking back


class _Walker:
    """Turns recorded producer nodes into SourcePaths (memoised: a node feeds many layers)."""

    def __init__(self) -> None:
        self._paths: dict[int, SourcePath] = {}

    def path(self, node: _Node | None, shape: Shape) -> SourcePath:
        key = id(node)
        if node is not None and key in self._paths:
            return self._paths[key]
        steps: list[Step] = []
        current, current_shape = node, shape
        while current is not None and current.kind == "step":
            assert current.step is not None
            steps.append(current.step)
            current, current_shape = current.inputs[0]
        steps.reverse()
        channels = shape[1] if len(shape) > 1 else 1
        if current is None:
            path = SourcePath(
                None,
                tuple(steps),
                channels,
                current_shape,
                fallback="reaches a tensor no recorded op produced (a parameter, buffer or constant)",
            )
        elif current.kind == "norm":
            path = SourcePath(
                current.label, commute_max_pools(current.post_steps + tuple(steps)), channels, current.shape
            )
        elif current.kind == "concat" and steps and isinstance(steps[0], Channels):
            path = self._sliced_concat(current, steps[0], steps[1:], channels)
        elif current.kind in ("concat", "sum"):
            origin = self.combination(current)
            path = SourcePath(None, commute_max_pools(tuple(steps)), channels, current.shape, origin=origin)
        elif current.kind == "input":
            path = SourcePath(
                None, tuple(steps), channels, current.shape, fallback=f"reaches the model input {current.label}"
            )
        else:
            why = f" ({current.why})" if current.why else ""
            path = SourcePath(
                None, tuple(steps), channels, current.shape, fallback=f"{current.label} cannot carry moments{why}"
            )
        if node is not None:
            self._paths[key] = path
        return path

    def _sliced_concat(self, node: _Node, first: Channels, rest: Sequence[Step], channels: int) -> SourcePath:
        """The path of ``cat(parts)[:, start:stop]`` then ``rest``: the parts the channel range does not reach are
        left out (exact: a part's moments never reach channels outside its own), so a part that falls back
        (the model input, a constant) no longer makes the sliced channels fall back when it is not among them.
        The range is shifted to the parts kept, and dropped where it keeps all their channels."""
        parts = self.parts(node)
        kept: list[SourcePath] = []
        offset = start = 0
        for part in parts:
            if offset < first.stop and offset + part.channels > first.start:
                if not kept:
                    start = offset
                kept.append(part)
            offset += part.channels
        if len(kept) == len(parts) or not kept:
            return SourcePath(
                None,
                commute_max_pools((first, *rest)),
                channels,
                node.shape,
                origin=Combination("concat", tuple(parts)),
            )
        width = sum(part.channels for part in kept)
        shifted = Channels(first.start - start, first.stop - start)
        slicing: tuple[Step, ...] = () if (shifted.start, shifted.stop) == (0, width) else (shifted,)
        if len(kept) > 1:
            entry = (node.shape[0], width, *node.shape[2:])
            return SourcePath(
                None, commute_max_pools((*slicing, *rest)), channels, entry, origin=Combination("concat", tuple(kept))
            )
        (part,) = kept
        return SourcePath(
            part.normalization,
            commute_max_pools((*part.steps, *slicing, *rest)),
            channels,
            part.entry_shape,
            origin=part.origin,
            fallback=part.fallback,
        )

    def parts(self, node: _Node) -> list[SourcePath]:
        """The parts of a concat / addends of a sum; directly nested ones of the same kind flattened, in order.

        Iterative (a stack of input iterators): a residual stack of n identity-skip blocks nests n sums, more than
        Python's recursion limit for deep networks."""
        parts: list[SourcePath] = []
        pending = [iter(node.inputs)]
        while pending:
            for source, shape in pending[-1]:
                if source is not None and source.kind == node.kind:
                    pending.append(iter(source.inputs))
                    break
                parts.append(self.path(source, shape))
            else:
                pending.pop()
        return parts

    def combination(self, node: _Node) -> Combination:
        assert node.kind in ("concat", "sum")
        return Combination(node.kind, tuple(self.parts(node)))  # type: ignore[arg-type]


def _where(combine: str, index: int, source: SourcePath, prefix: str) -> str:
    if combine == "concat":
        return f"{prefix}concat part {index} ({source.channels} channels)"
    if combine == "sum":
        return f"{prefix}addend {index}"
    return f"{prefix}its input"


def _fallbacks(sources: Sequence[SourcePath], combine: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(where, why) for every part of ``sources`` (nested ones too) that falls back."""
    for index, source in enumerate(sources):
        where = _where(combine, index, source, prefix)
        if source.falls_back:
            yield where, source.fallback
        elif source.origin is not None:
            yield from _fallbacks(source.origin.sources, source.origin.combine, f"{where} → ")


def shared_sources_note(combine: str, parts: Sequence[SourcePath], where: str) -> str | None:
    """The note for a sum or concatenation whose parts start from a common normalization (``x + conv(x)``, RepVGG's
    branches, ``cat([x, relu(x)])`` then a conv): the parts are correlated, and the moments add them, or a later
    step mixes their channels, as if independent. None where no two parts share a source."""
    seen: set[str] = set()
    shared: list[str] = []
    for part in parts:
        names = set(part.normalizations())
        shared += sorted(name for name in names & seen if name not in shared)
        seen |= names
    shared = [name for name in shared if not _disjoint_channels(name, parts)]
    if not shared:
        return None
    kind = "addends" if combine == "sum" else "parts"
    mixed = "the sum" if combine == "sum" else "a later step that mixes their channels (a conv, a Linear)"
    return (
        f"{where}approximate variance: the {kind} of this {combine} share the source "
        f"{', '.join(repr(name) for name in shared)} (they are correlated), and {mixed} takes them as independent"
    )


def bordered_addends_note(
    combine: str, parts: Sequence[SourcePath], where: str, modules: Mapping[str, nn.Module]
) -> str | None:
    """The note for a sum of two or more addends whose means vary with position (each path has a zero-padded conv, a
    strided transposed conv or a padded pooling: :func:`_bordering_step`), or None. Pooled over positions, Var(a
    + b) = Var(a) + Var(b) + 2 Cov_p(M_a(p), M_b(p)); the moments add the pooled variances and leave out that
    covariance of the addends' positional means, which the shared border pattern makes positive (cold QA,
    2026-12-07: 45 % low on a sum of two 3 × 3 convs at 4 × 4, up to 7.5 % in MONAI's HighResNet)."""
    if combine != "sum":
        return None
    bordered = [(index, found) for index, part in enumerate(parts) if (found := _bordering_step(part, modules))]
    if len(bordered) < 2:
        return None
    named = "; ".join(f"addend {index}: {step}" for index, step in bordered[:4])
    return (
        f"{where}approximate variance: addends of this sum have means that vary with position (zero padding at the "
        f"borders, or the phases of a strided transposed conv: {named}), and the sum adds their pooled variances, "
        "leaving out the covariance of those means across positions"
    )


def _bordering_step(path: SourcePath, modules: Mapping[str, nn.Module]) -> str | None:
    """The first step of ``path`` (or its origin's parts) after which the mean varies with position: a conv that reads
    zeros at the borders (its own zero padding, or a pad folded in), a strided transposed conv (each output phase
    sums other taps), a padded pooling that counts the padding (average with ``count_include_pad``, max); None where
    none does."""
    for step in (*(s for part in (path.origin.sources if path.origin else ()) for s in part.steps), *path.steps):
        members = step.steps if isinstance(step, LinearRun) else (step,)
        for member in members:
            if isinstance(member, Affine) and member.kind == "conv":
                layer = modules.get(member.module)
                conv = layer if isinstance(layer, nn.modules.conv._ConvNd) else None
                own = (
                    conv is not None
                    and conv.padding_mode == "zeros"
                    and (conv.padding == "same" or any(p > 0 for p in conv.padding if isinstance(p, int)))
                )
                folded = (
                    member.input_padding is not None
                    and member.input_padding_mode == "zeros"
                    and any(side for pair in member.input_padding for side in pair)
                )
                phased = conv is not None and conv.transposed and any(s > 1 for s in conv.stride)
                if own or folded or phased:
                    return member.describe()
            counted = isinstance(member, Pool) and (member.spec.kind == "max" or member.spec.count_include_pad)
            if isinstance(member, Pool) and any(member.spec.padding) and counted:
                return member.describe()
    return None


#: Steps that keep each channel to itself (what a channel holds may change, never which source channel it came from).
_CHANNEL_WISE = (Elementwise, Identity, Pool, Resample, Subsample, ScaleShift, ParameterScale)


def _source_channels(path: SourcePath) -> set[int] | None:
    """The source channels ``path`` reads, where it starts at a normalization and every step keeps channels apart or
    selects them (``y[:, 4:]``, a pad, an activation, a pooling); None where a step mixes them or the path starts
    at a combination."""
    if path.normalization is None or path.origin is not None or len(path.entry_shape) < 2:
        return None
    held: list[int | None] = list(range(path.entry_shape[1]))
    for step in path.steps:
        if isinstance(step, Channels):
            held = held[step.start : step.stop]
        elif isinstance(step, ChannelPad):
            held = held[max(-step.before, 0) : len(held) - max(-step.after, 0)]  # a negative width crops
            held = [None] * max(step.before, 0) + held + [None] * max(step.after, 0)
        elif not isinstance(step, _CHANNEL_WISE):
            return None
    return {channel for channel in held if channel is not None}


def _disjoint_channels(name: str, parts: Sequence[SourcePath]) -> bool:
    """Whether the parts that start at normalization ``name`` read disjoint sets of its channels (``cat([y[:, 4:],
    y[:, :4]])``): channels of one posterior are independent in the model, so such parts are too."""
    reading = [part for part in parts if name in set(part.normalizations())]
    channel_sets = [_source_channels(part) for part in reading]
    if any(channels is None for channels in channel_sets):
        return False
    union: set[int] = set()
    for channels in channel_sets:
        assert channels is not None
        if union & channels:
            return False
        union |= channels
    return True


def _separates_positions(step: Step) -> bool:
    """Whether ``step`` treats positions one by one in a way that pooled moments cannot describe where positions
    differ: a flatten of the channels with positions (each feature gets its channel's pooled moments; a Linear then
    weighs positions separately), a strided selection (keeps some borders, drops others)."""
    return (isinstance(step, Flatten) and step.start_dim == 1) or isinstance(step, Subsample)


def _dependence(
    path: SourcePath, modules: Mapping[str, nn.Module], where: str, sizes: _Sizes = _NO_SIZES
) -> tuple[str | None, list[str]]:
    """(the step after which the path's positions are dependent, or None; approximation notes)."""
    dependent: str | None = None
    notes: list[str] = []
    if path.origin is not None:
        shared = shared_sources_note(path.origin.combine, path.origin.sources, f"{where}: ")
        if shared is not None:
            notes.append(shared)
        bordered = bordered_addends_note(path.origin.combine, path.origin.sources, f"{where}: ", modules)
        if bordered is not None:
            notes.append(bordered)
        for index, part in enumerate(path.origin.sources):
            part_dependent, part_notes = _dependence(
                part, modules, _where(path.origin.combine, index, part, f"{where} → "), sizes
            )
            notes += part_notes
            dependent = dependent or part_dependent
    shaped = _shaped_origin(path, modules, sizes)  # what made the values reaching the next step non-Gaussian
    for step in linear_runs(path.steps, modules):  # within a LinearRun the moments are exact
        if isinstance(step, Pool) and "max" in step.spec.kind and shaped is not None:
            notes.append(
                f"{where}: approximate: {step.describe()} takes the maximum of {shaped.what} as "
                "of Gaussians (it does not commute with that activation)"
            )
        if isinstance(step, Elementwise) and step.kind != "identity" and shaped is not None:
            notes.append(
                f"{where}: approximate: {step.describe()} takes its input, {shaped.what}, as Gaussian (the moments "
                "of an activation assume a Gaussian input; measured on such inputs: variance 6–76 % off, "
                "several times on near-zero variances)"
            )
        shaped = _shaped_after(shaped, step, modules, sizes)
        if dependent is not None and combines_positions(step, modules):
            notes.append(
                f"{where}: approximate variance: {_combining(step, modules).describe()} combines positions that "
                f"{dependent} left dependent or unlike, and the moments take them as independent and alike"
            )
            dependent = None  # one note per cause
        elif dependent is not None and _separates_positions(step):
            notes.append(
                f"{where}: approximate: {step.describe()} {SEPARATED_POSITIONS}, but {dependent} left positions "
                "unlike (borders differ) or dependent"
            )
            dependent = None
        if makes_positions_dependent(step, modules):
            dependent = _last_dependent(step, modules).describe()
        if _one_position(step, sizes):  # nothing left to be unlike
            dependent = None
    return dependent, notes


def _one_position(step: Step, sizes: _Sizes = _NO_SIZES) -> bool:
    """Whether ``step`` (a run: its last member that is not an identity) leaves one position: an adaptive pooling to
    size 1, or a pooling module whose window covered its whole input in the example forward (``AvgPool2d(4)`` on a
    4×4 map; ``sizes``: its input size then). A flatten after it is exact (its note fired after a global pooling,
    found 2026-12-07's sixth session). A pooling function (``F.avg_pool2d``) has no recorded size: not recognised."""
    if isinstance(step, LinearRun):  # its last member that is not an identity (a dropout after the pooling)
        step = next((member for member in reversed(step.steps) if not isinstance(member, Identity)), step)
    if not isinstance(step, Pool):
        return False
    if step.spec.kind.startswith("adaptive"):
        size = step.spec.output_size
        return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
    spatial = sizes.get(step.module) if step.module is not None else None
    if spatial is None or len(spatial) != step.spec.rank:
        return False
    return all(s == 1 for s in step.spec.output_shape(spatial))


@dataclass(frozen=True)
class _Shaped:
    """Values an activation left non-Gaussian: ``what`` in words; ``channels``: the [start, stop) channel ranges they
    hold (a concatenation's part, sliced, padded), None for every channel."""

    what: str
    channels: tuple[tuple[int, int], ...] | None = None


#: A conv or Linear summing fewer inputs per output than this (in_channels / groups × kernel taps) is not taken to
#: make an activation's outputs Gaussian again: ``relu(depthwise_1x1(relu(x)))`` is ``relu(a relu(x) + b)`` (its
#: prior variance was 76 % off, measured, with no note). A learned weight that leans on few of many inputs is not
#: caught by this count (docs/prior.md, "Activations of non-Gaussian inputs").
_GAUSSIAN_FAN_IN = 16


def _fan_in(step: Step, modules: Mapping[str, nn.Module], sizes: _Sizes = _NO_SIZES) -> int | None:
    """Inputs summed per output of a conv / Linear step (or of a run's last one) or of a fixed-window average pooling
    (its window: AvgPool2d(2) averages 4 values), None for other steps."""
    if isinstance(step, Pool) and step.spec.kind == "avg":
        return math.prod(step.spec.kernel_size)
    if isinstance(step, LinearRun):
        affines = [member for member in step.steps if isinstance(member, Affine)]
        return _fan_in(affines[-1], modules, sizes) if affines else None
    if not isinstance(step, Affine):
        return None
    layer = modules.get(step.module)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # per dim, the taps that meet one output position: those j < k with j·d ≡ r (mod s), at least
        # k // (s / gcd(s, d)) where any does (ConvTranspose2d(8, 8, 2, stride=2): each output sums 8 inputs, not 32)
        size = sizes.get(step.module, ())
        taps = (
            min(max(1, k // (s // math.gcd(s, d))), size[i] if i < len(size) and size[i] > 0 else k)
            for i, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation))
        )
        return layer.in_channels // layer.groups * math.prod(taps)
    if isinstance(layer, nn.modules.conv._ConvNd):
        # taps that can meet the input: at most (n - 1) // d + 1 per axis of an input of n positions (a 3×3 conv,
        # padding 1, on a 1×1 input sums its 8 channels' one value each, not 72 values)
        size = sizes.get(step.module, ())
        taps = (
            min(k, (n - 1) // d + 1) if i < len(size) and (n := size[i]) > 0 else k
            for i, (k, d) in enumerate(zip(layer.kernel_size, layer.dilation))
        )
        return layer.in_channels // layer.groups * math.prod(taps)
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return None


def _shaped_after(
    shaped: _Shaped | None, step: Step, modules: Mapping[str, nn.Module], sizes: _Sizes = _NO_SIZES
) -> _Shaped | None:
    """:class:`_Shaped` after ``step``: an activation makes every channel non-Gaussian; a conv, a Linear or a pooling
    makes them Gaussian-like again (sums over many values; not a conv / Linear of fewer than
    :data:`_GAUSSIAN_FAN_IN` inputs per output); a channel slice or pad moves the ranges; every other step (a scale
    and shift, a gate's per-sample channel scale, a resampling, a reshape) keeps them."""
    if isinstance(step, Elementwise) and step.kind != "identity":
        return _Shaped(f"{step.describe()} outputs")
    fan_in = _fan_in(step, modules, sizes)
    if shaped is not None and fan_in is not None and fan_in < _GAUSSIAN_FAN_IN:
        return _Shaped(f"{shaped.what} summed {fan_in} at a time by {step.describe()}")
    if shaped is None or isinstance(step, (Affine, LinearRun, Pool)):
        return None
    if shaped.channels is None or not isinstance(step, (Channels, ChannelPad)):
        return shaped
    if isinstance(step, Channels):
        kept = tuple(
            (max(a, step.start) - step.start, min(b, step.stop) - step.start)
            for a, b in shaped.channels
            if min(b, step.stop) > max(a, step.start)
        )
    else:
        kept = tuple((a + step.before, b + step.before) for a, b in shaped.channels)
    return _Shaped(shaped.what, kept) if kept else None


def _shaped_origin(path: SourcePath, modules: Mapping[str, nn.Module], sizes: _Sizes = _NO_SIZES) -> _Shaped | None:
    """What makes the values at the start of ``path`` non-Gaussian, or None (a normalization's output, taken as
    Gaussian): a sum with a part that ends non-Gaussian (``relu(bn(x) + relu(y))``), or a concatenation with such
    parts, in their channels."""
    if path.origin is None:
        return None
    ends = [_shaped_end(part, modules, sizes) for part in path.origin.sources]
    shaped = [(part, end) for part, end in zip(path.origin.sources, ends) if end is not None]
    if not shaped:
        return None
    what = f"a {path.origin.combine} with {shaped[0][1].what}"
    if path.origin.combine == "sum":  # an addend's non-Gaussian channels are the sum's
        if any(end.channels is None for _, end in shaped):
            return _Shaped(what)
        return _Shaped(what, tuple(sorted({r for _, end in shaped for r in end.channels or ()})))
    ranges: list[tuple[int, int]] = []
    offset = 0
    for part, end in zip(path.origin.sources, ends):
        if end is not None:
            inner = end.channels if end.channels is not None else ((0, part.channels),)
            ranges += [(offset + a, offset + b) for a, b in inner]
        offset += part.channels
    return _Shaped(what, tuple(ranges))


def _shaped_end(path: SourcePath, modules: Mapping[str, nn.Module], sizes: _Sizes = _NO_SIZES) -> _Shaped | None:
    """What makes the values at the end of ``path`` non-Gaussian, or None."""
    shaped = _shaped_origin(path, modules, sizes)
    for step in linear_runs(path.steps, modules):
        shaped = _shaped_after(shaped, step, modules, sizes)
    return shaped


def _combining(step: Step, modules: Mapping[str, nn.Module]) -> Step:
    """The step itself, or a run's first step that combines positions."""
    if isinstance(step, LinearRun):
        return next(member for member in step.steps if combines_positions(member, modules))
    return step


def _last_dependent(step: Step, modules: Mapping[str, nn.Module]) -> Step:
    """The step itself, or a run's last step that leaves positions dependent."""
    if isinstance(step, LinearRun):
        return [member for member in step.steps if makes_positions_dependent(member, modules)][-1]
    return step


def _walked(node: _Node | None, shape: Shape, walker: _Walker) -> tuple[Combine, tuple[SourcePath, ...]]:
    """How a normalization input produced by ``node`` combines its sources, and their paths."""
    if node is not None and node.kind in ("concat", "sum"):
        return node.kind, tuple(walker.parts(node))  # type: ignore[return-value]
    return "single", (walker.path(node, shape),)


def _normalizations_reaching(node: _Node | None) -> Iterator[_Node]:
    """The normalization calls whose outputs reach ``node`` through the steps, concatenations and sums that the
    walk follows (iterative: deep residual stacks nest thousands of sums)."""
    seen: set[int] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.kind == "norm":
            yield current
        elif current.kind in ("step", "concat", "sum"):
            pending.extend(source for source, _ in current.inputs)


def _stale_source(
    node: _Node | None, place: int, places: Mapping[str, Sequence[int]], wired: Collection[str]
) -> str | None:
    """Why the chain would read the wrong statistics for a normalization call at ``place`` whose input ``node``
    produced: a source module called again between the call that feeds it and this one (``a = bn1(x1); b =
    bn1(x2); bn2(conv(a))``). Within a forward, each layer reads the *latest* statistics its sources published.
    Only the sources in ``wired`` count (those the walked paths keep: a part of a concatenation that a channel
    slice drops is not read). None when every such source's latest call is the one that feeds it."""
    for source in _normalizations_reaching(node):
        if source.label not in wired:
            continue
        calls = places[source.label]
        latest = max(call for call in calls if call < place)
        if latest != source.call:
            return (
                f"its input comes from call {calls.index(source.call) + 1} of '{source.label}', but call "
                f"{calls.index(latest) + 1} of '{source.label}' runs after that and before it, and the chain reads "
                "a source's latest statistics"
            )
    return None


def _origins(sources: Sequence[SourcePath]) -> str:
    """The normalizations (or fallbacks) that ``sources`` start from, in order, for a message."""
    names: list[str] = []
    pending = list(reversed(sources))
    while pending:
        source = pending.pop()
        if source.origin is not None:
            pending.extend(reversed(source.origin.sources))
        elif source.normalization is not None:
            names.append(repr(source.normalization))
        else:
            names.append("no normalization")
    return ", ".join(dict.fromkeys(names))


def _call_conflict(
    call: _NormCall, each: Sequence[tuple[Combine, tuple[SourcePath, ...]]], places: Mapping[str, Sequence[int]]
) -> str | None:
    """Why one wiring cannot give every call of ``call``'s module its right prior, or None. ``each``: every call's
    input walked (:func:`_walked`).

    A layer has one wiring, taken from its first call; a later call whose input comes from other sources (or
    through other steps, or at other shapes) would get a prior from the first call's sources: wrong. So would
    any call whose source was called again in between (:func:`_stale_source`)."""
    first = each[0]
    if not any(source.reaches_normalization for _, sources in each for source in sources):
        return None  # no call has a normalization upstream: first in its chain for that reason alone
    for index, ((node, _, place), walked) in enumerate(zip(call.each, each), 1):
        if walked != first:
            ours, theirs = _origins(walked[1]), _origins(first[1])
            how = (
                "comes from the same sources as call 1's but through other steps or at other shapes"
                if ours == theirs
                else f"does not come from the same sources through the same steps at the same shapes as call 1's "
                f"(from {theirs})"
            )
            return (
                f"it runs {call.calls} times per forward, and call {index}'s input (from {ours}) {how}; one wiring "
                "cannot give both calls their prior"
            )
        wired = {name for path in walked[1] for name in path.normalizations()}
        stale = _stale_source(node, place, places, wired)
        if stale is not None:
            return f"call {index} of {call.calls}: {stale}" if call.calls > 1 else stale
    return None


def _calls_between(call: _NormCall, name: str, places: Mapping[str, Sequence[int]]) -> list[int]:
    """How many times the normalization ``name`` was called before each call of ``call``'s layer in the example
    forward, since the layer's previous call (the first count: since the forward began)."""
    reads = call.places
    return [sum(before < s < read for s in places[name]) for before, read in zip([-1, *reads], reads)]


def _republished(
    call: _NormCall, names: Iterable[str], places: Mapping[str, Sequence[int]]
) -> tuple[tuple[str, int], ...]:
    """(source, n) for each of ``names`` that was called n > 1 times before each call of ``call``'s layer (since its
    previous call) in the example forward, the same n before every call: a source called three times whose last
    call feeds the layer. The runtime warns of a source that published more than once before a read only where it
    did so another number of times."""
    found = []
    for name in dict.fromkeys(names):
        counts = set(_calls_between(call, name, places))
        if len(counts) == 1 and (count := counts.pop()) > 1:
            found.append((name, count))
    return tuple(found)


def _repeats(call: _NormCall, names: Iterable[str], places: Mapping[str, Sequence[int]]) -> tuple[tuple[str, int], ...]:
    """(source, n) for every one of ``names``: how many times it was called between two consecutive calls of
    ``call``'s layer in the example forward, where that is the same n between every two (the layer applied again
    to the same source's output: n = 0; a block applied again, its source first: n = 1). Empty where the layer ran
    once, or the counts differ between calls. A forward that calls the layer more often than the example keeps the
    prior on an extra call only where its sources published as in this pattern since the layer's last call."""
    if call.calls < 2:
        return ()
    pattern = []
    for name in dict.fromkeys(names):
        counts = set(_calls_between(call, name, places)[1:])
        if len(counts) != 1:
            return ()
        pattern.append((name, counts.pop()))
    return tuple(pattern)


#: Nodes a module computes with tensor operators that name no module (``x * 2``, ``a + b``, ``torch.cat``, ``F.pad``):
#: a module that returns one is noted by :meth:`_Recorder._note_passed`.
_COMPUTED = frozenset({"step", "sum", "concat", "pad"})

#: No module returned a recorded value (:func:`_passed_through`).
_NOTHING_PASSED: Mapping[int, Sequence[str]] = {}


def _passed_through(nodes: Iterable[_Node | None], passed: Mapping[int, Sequence[str]]) -> tuple[str, ...]:
    """The modules that returned a value that the walk from ``nodes`` (a layer's inputs) follows: of every
    :data:`_COMPUTED` node on the way and of the normalization outputs it reaches (``passed``: id(node) →
    names, :meth:`_Recorder._note_passed`). A module called on such a value counts whether or not its output is the
    one the path's next step read (``y = identity(x)`` then ``conv(x)``: the same tensor, which the recording cannot
    tell apart); a hook added to it later is then named though the prior may not depend on it. Iterative, as
    :func:`_normalizations_reaching`."""
    if not passed:
        return ()
    found: dict[str, None] = {}
    seen: set[int] = set()
    pending = list(nodes)
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.kind != "norm" and current.kind not in _COMPUTED:
            continue
        found.update(dict.fromkeys(passed.get(id(current), ())))
        if current.kind != "norm":
            pending.extend(source for source, _ in current.inputs)
    return tuple(found)


def _layer_record(
    call: _NormCall,
    walker: _Walker,
    modules: Mapping[str, nn.Module],
    places: Mapping[str, Sequence[int]],
    sizes: _Sizes = _NO_SIZES,
    passed: Mapping[int, Sequence[str]] = _NOTHING_PASSED,
) -> LayerRecord:
    """``places``: each normalization module's calls, by their places among all normalization calls; ``passed``: the
    modules that returned a node's value, by id(node) (:meth:`_Recorder._note_passed`)."""
    each = [_walked(node, shape, walker) for node, shape, _ in call.each]
    combine, sources = each[0]
    fallbacks = list(_fallbacks(sources, combine))
    conflict = _call_conflict(call, each, places)
    if conflict is not None:
        notes = [f"first in its chain: {conflict}"]
        combine, sources = "none", ()
    elif any(source.reaches_normalization for source in sources):
        notes = [f"{where} {why}; this part falls back" for where, why in fallbacks]
        shared = shared_sources_note(combine, sources, "") if combine in ("concat", "sum") else None
        if shared is not None:
            notes.append(shared)
        bordered = bordered_addends_note(combine, sources, "", modules)
        if bordered is not None:
            notes.append(bordered)
        for index, source in enumerate(sources):
            notes += _dependence(source, modules, _where(combine, index, source, ""), sizes)[1]
    else:
        reasons = "; ".join(f"{where} {why}" for where, why in fallbacks)
        notes = [f"first in its chain: no normalization upstream ({reasons})"]
        combine, sources = "none", ()
    if call.calls > 1 and conflict is None and combine != "none":
        notes.append(f"runs {call.calls} times per forward from the same sources; wired by its first call")
    names = [name for source in sources for name in source.normalizations()]
    through = _passed_through((node for node, _, _ in call.each), passed) if sources else ()
    return LayerRecord(
        call.name, call.input_shape, sources, combine, tuple(notes), call.calls, _republished(call, names, places),
        _repeats(call, names, places), through,
    )  # fmt: skip


# --------------------------------------------------------------------------- entry point


def _input_nodes(example_inputs: Any, label: str) -> Iterator[tuple[Tensor, _Node]]:
    if isinstance(example_inputs, Tensor):
        yield example_inputs, _Node("input", tuple(example_inputs.shape), label=label)
    elif isinstance(example_inputs, Mapping):
        for key, value in example_inputs.items():
            yield from _input_nodes(value, f"{label}[{key!r}]")
    elif isinstance(example_inputs, (tuple, list)):
        for index, value in enumerate(example_inputs):
            yield from _input_nodes(value, f"{label}[{index}]")


def record_dataflow(model: nn.Module, example_inputs: Any) -> RecordedChain:
    """Record which tensor feeds which module/op on one forward and walk each normalization's input back.

    model: any ``nn.Module``; example_inputs: a tensor, a tuple/list of positional
    inputs, or a dict of keyword inputs (nested containers allowed; outputs may be
    anything). The forward runs once, in eval mode under ``torch.no_grad()`` (no
    statistic changes; every module's mode is restored). Returns every normalization
    layer that ran, in first-call order, as a :class:`LayerRecord`; layers that did not
    run are named in ``RecordedChain.notes``.
    """
    example_inputs = copied(example_inputs)  # the recorder knows the inputs by identity: copy before registering
    recorder = _Recorder()
    handles = []
    with _scripted_submodules_wrapped(model):
        for name, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # it takes no hooks; the ScriptedSubmodule around it does, its children run inside TorchScript
            handles.extend(_register(recorder, name, module))
        return _recorded(model, example_inputs, recorder, handles)


def _register(recorder: _Recorder, name: str, module: nn.Module) -> list[Any]:
    kind = _leaf_kind(module)
    return [
        module.register_forward_pre_hook(recorder.pre_hook(name, kind), with_kwargs=True),
        # prepend: the recorder sees the module's own output, before a user's forward hook changes it (whose operators
        # it then records as it records any function: `out * 3 + 1` in a hook is two steps after the module)
        module.register_forward_hook(recorder.post_hook(name), with_kwargs=True, always_call=True, prepend=True),
    ]


class ScriptedSubmodule(nn.Module):
    """A TorchScript submodule, wrapped for one recording: ``register_forward_*hook`` raises on a ScriptModule and
    the recorder cannot see the ops it runs, so the wrapper takes the hooks and its outputs are opaque (named)."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.scripted(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """The scripted module's attributes too, as the forward around it reads them (``self.s.alpha``,
        ``hasattr(self.s, "alpha")``): the recording must take the branches the model takes."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "scripted":
                raise
            return getattr(self.scripted, name)


@contextlib.contextmanager
def _scripted_submodules_wrapped(model: nn.Module) -> Iterator[None]:
    """Each outermost TorchScript submodule of ``model`` replaced by a :class:`ScriptedSubmodule` (same name) for the
    block, and put back after it."""
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    scripted_prefixes: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, torch.jit.ScriptModule):
            continue
        if any(name.startswith(prefix) for prefix in scripted_prefixes):
            continue
        scripted_prefixes.append(f"{name}.")
        parent_name, _, key = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        replaced.append((parent, key, module))
    try:
        for parent, key, module in replaced:
            parent._modules[key] = ScriptedSubmodule(module)
        yield
    finally:
        for parent, key, module in replaced:
            parent._modules[key] = module


def _recorded(model: nn.Module, example_inputs: Any, recorder: _Recorder, handles: list[Any]) -> RecordedChain:
    """Run the example forward under ``recorder`` (its hooks in ``handles``, removed after), then walk back."""
    label = "'input'" if isinstance(example_inputs, Tensor) else "input"
    recorder.model = model
    for tensor, node in _input_nodes(example_inputs, label):
        recorder.produce(tensor, node)
    try:
        with eval_mode(model), torch.no_grad(), recorder:
            call_example(model, example_inputs)
    except Exception as error:
        raise ChainWiringError(
            f"the example forward of {type(model).__name__} failed while recording its chain "
            f"({type(error).__name__}: {error}); pass example_inputs the model accepts: a tensor, a tuple of "
            "positional inputs or a dict of keyword inputs"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    recorder.factors_changed()
    walker = _Walker()
    modules = dict(model.named_modules())
    places = {name: call.places for name, call in recorder.norms.items()}
    layers = tuple(
        _layer_record(call, walker, modules, places, recorder.input_sizes, recorder.passed)
        for call in recorder.norms.values()
    )
    notes: list[str] = []
    for name, module in model.named_modules():
        label = f"'{name}' ({type(module).__name__})"
        if is_normalization(module) and name not in recorder.norms:
            notes.append(f"{label} did not run on the example inputs; it is not wired")
        if name in recorder.norms and not _forward_understood(module):
            notes.append(
                f"{label} has its own forward, which this recorder cannot see into: its output is taken as the "
                "normalization's (if it also applies an activation, give the module `drop`/`act` children)"
            )
        probed = recorder.probed.get(id(module))
        failed = recorder.probe_failed.get(id(module))
        if failed is not None:
            notes.append(
                f"{label} matched {failed.describe().split(' ')[0]} on a probe over [-{_PROBE_RANGE:g}, "
                f"{_PROBE_RANGE:g}] but computes something else on the example's values: the operators its forward "
                "ran are recorded instead"
            )
        elif isinstance(probed, Identity):
            notes.append(
                f"{label} is taken as the identity, which its forward is in eval mode on a probe over "
                f"[-{_PROBE_RANGE:g}, {_PROBE_RANGE:g}]; in train mode it computes something else (noise, DropPath / "
                "stochastic depth), an effect the prior does not model"
            )
        elif probed is not None:
            notes.append(
                f"{label} is taken as {probed.describe().split(' ')[0]}: its forward matched it on a probe over "
                f"[-{_PROBE_RANGE:g}, {_PROBE_RANGE:g}]"
            )
    return RecordedChain(layers, tuple(notes), dict(recorder.module_inputs))
