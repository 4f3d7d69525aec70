"""A layer's wiring: an immutable, versioned value saved with the checkpoint.

Extra-state format of a BKN layer (``get_extra_state``; in the state dict as the uint8 tensor of its JSON,
:mod:`bkn_export.extra_state`), version 2::

    {"version": 2, "wiring": {"name", "transition", "combine", "prior_source",
                              "previous_features", "order", "notes",
                              "sources": [SourcePath.to_dict(), ...]} | None,
     "options": {KalmanOptions fields}}

Version 1 (bkn_export ≤ 0.1, execution-order wiring) was
``{"version": 1, "link": {"name", "predecessor", "transition", "feeding_layer",
"rectify", "note", "num_previous_features"}, "options": {...}}``. A version-1
checkpoint loads when its link computes what this model's wiring computes (no
predecessor on both sides; or one source from the same predecessor through the same
ReLU and feeding layer, the same transition, ``prior_source="input"``); otherwise
:func:`check_saved_wiring` raises :class:`~bkn_export.errors.ChainWiringError` saying to
re-convert.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from bkn_export.chain.record import SourcePath
from bkn_export.chain.steps import STOP_GRADIENT
from bkn_export.errors import ChainWiringError
from bkn_export.nn import EXTRA_STATE_VERSION

__all__ = ["Wiring", "check_saved_wiring"]


@dataclass(frozen=True)
class Wiring:
    """How one BKN layer is wired into its chain.

    name: the layer's qualified name in its root; transition: ``propagate``,
    ``sampled``, ``learned``, ``identity``, or None (first in chain: BatchNorm);
    sources: one :class:`~bkn_export.chain.record.SourcePath` per concatenation part (in
    channel order) or per residual addend (empty for a first-in-chain layer); combine:
    ``none``, ``single``, ``concat`` or ``sum``; prior_source: ``input`` or ``output``
    (:class:`~bkn_export.nn.KalmanOptions`); previous_features: C_src, the columns of a
    learned transition matrix (0 otherwise); order: the layer's first-call position in
    the root's forward (-1: it did not run on the example inputs); notes: every
    fallback, approximation and choice made while wiring; calls: how many times the layer ran in the example
    forward (a forward that runs it more often gives the extra calls no prior: :class:`ChainMembership`);
    republished: (source, n) for each source that published n > 1 times before each read in the example forward
    (a source called three times, the layer reading its last call): no warning where a forward does the same;
    repeats: (source, n) for every source, how often it published between two calls of the layer in the example
    forward (empty where the layer ran once or the counts differed): a call beyond ``calls`` keeps its prior only
    where its sources published so since the layer's last call. passed: the other modules that returned a value on
    the layer's paths (no step of a path names them: :attr:`~bkn_export.chain.record.LayerRecord.passed`),
    whose hooks the prediction assumes as wired all the same; not kept in a checkpoint (:func:`saved_form`).
    """

    version: ClassVar[int] = EXTRA_STATE_VERSION

    name: str
    transition: str | None
    sources: tuple[SourcePath, ...] = ()
    combine: str = "none"
    prior_source: str = "input"
    previous_features: int = 0
    order: int = -1
    notes: tuple[str, ...] = ()
    calls: int = 1
    republished: tuple[tuple[str, int], ...] = ()
    repeats: tuple[tuple[str, int], ...] = ()
    passed: tuple[str, ...] = ()

    @property
    def source_names(self) -> tuple[str, ...]:
        """The normalization layers whose statistics reach this layer, depth first, each once."""
        return tuple(dict.fromkeys(_names(self.sources)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transition": self.transition,
            "sources": [s.to_dict() for s in self.sources],
            "combine": self.combine,
            "prior_source": self.prior_source,
            "previous_features": self.previous_features,
            "order": self.order,
            "notes": list(self.notes),
            "calls": self.calls,
            "republished": [list(item) for item in self.republished],
            "repeats": [list(item) for item in self.repeats],
            "passed": list(self.passed),
        }


def _names(sources: tuple[SourcePath, ...]) -> Iterator[str]:
    for source in sources:
        yield from source.normalizations()


#: Wiring keys a checkpoint does not keep: what only the hook check reads (the other modules that returned a path's
#: value), which computes nothing, so that a checkpoint saved now is the one an earlier bkn_export saved.
_UNSAVED_WIRING_KEYS = frozenset({"passed"})


def saved_form(wiring: Wiring) -> dict[str, Any]:
    """``wiring.to_dict()`` as a checkpoint keeps it: without stop-gradient steps, which change no value (so that a
    checkpoint is the same whether the forward detaches or not, and an earlier bkn_export, which records none, loads
    it), nor :data:`_UNSAVED_WIRING_KEYS`; the saved wiring is only compared, never wired from."""
    data = {key: value for key, value in wiring.to_dict().items() if key not in _UNSAVED_WIRING_KEYS}
    data["sources"] = [_without_stops(path) for path in data.get("sources", ())]
    return data


def _without_stops(path: Mapping[str, Any]) -> dict[str, Any]:
    origin = path.get("origin")
    if origin is not None:
        origin = {**origin, "sources": [_without_stops(source) for source in origin.get("sources", ())]}
    return {**path, "steps": _steps_without_stops(path.get("steps")), "origin": origin}


#: Step keys a checkpoint does not keep: how the forward computed a step's constants (whether at every size or at the
#: wiring size), which changes no value at the size wired, so that an earlier bkn_export's checkpoint still loads.
_UNSAVED_STEP_KEYS = frozenset({"input_padding_fixed", "size_fixed"})


def _steps_without_stops(steps: Any) -> Any:
    """A saved step list without stop-gradient steps (or :data:`_UNSAVED_STEP_KEYS`), at every depth (a gate's branch,
    a linear run's members)."""
    if not isinstance(steps, list):
        return steps
    kept = []
    for step in steps:
        if isinstance(step, Mapping):
            if step.get("what") == STOP_GRADIENT:
                continue
            step = {
                key: _steps_without_stops(value) if key in ("branch", "steps") else value
                for key, value in step.items()
                if key not in _UNSAVED_STEP_KEYS
            }
        kept.append(step)
    return kept


def _path_signature(path: Mapping[str, Any]) -> dict[str, Any]:
    """What makes a saved path compute what it computes (no example shapes, no wording)."""
    origin = path.get("origin")
    return {
        "normalization": path.get("normalization"),
        "steps": path.get("steps"),
        "channels": path.get("channels"),
        "origin": None
        if origin is None
        else {"combine": origin.get("combine"), "sources": [_path_signature(s) for s in origin.get("sources", ())]},
    }


def _signature(wiring: Mapping[str, Any] | None) -> dict[str, Any]:
    if wiring is None or wiring.get("transition") is None:
        return {"transition": None}
    return {
        "transition": wiring.get("transition"),
        "combine": wiring.get("combine"),
        "prior_source": wiring.get("prior_source"),
        "previous_features": wiring.get("previous_features"),
        "sources": [_path_signature(s) for s in wiring.get("sources", ())],
    }


def _summary(signature: Mapping[str, Any]) -> str:
    if signature.get("transition") is None:
        return "first in chain (BatchNorm)"
    names = [s.get("normalization") or "<combination>" for s in signature.get("sources", ())]
    return f"transition={signature['transition']!r}, combine={signature.get('combine')!r}, sources={names}"


def _steps_text(steps: Any) -> str:
    """A saved step list as 'relu -> affine 2' (kind or step name, then the module where there is one)."""
    if not isinstance(steps, (list, tuple)):
        return repr(steps)
    parts = []
    for step in steps:
        if isinstance(step, Mapping):
            head = step.get("kind") or step.get("step") or "?"
            parts.append(f"{head} {step['module']}" if step.get("module") else str(head))
        else:
            parts.append(repr(step))
    return "[" + " -> ".join(parts) + "]"


def _settings_differ(saved: list[Any], current: list[Any]) -> tuple[str, str]:
    """The first pair of steps of one kind whose settings differ, as their saved dicts (a padding given at another
    wiring size: ``input_padding`` [[0, 1], [0, 1]] against [[1, 1], [1, 1]])."""
    for a, b in zip(saved, current):
        if a != b:
            return f"step {a!r}", f"step {b!r}"
    return _steps_text(saved), _steps_text(current)


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], where: str = "") -> list[str]:
    """'field: saved X, this model Y' for every field that differs (sources path by path, steps as lists)."""
    found = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        name = f"{where}{key}"
        if key == "sources" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for index, (x, y) in enumerate(zip(a, b)):
                if isinstance(x, Mapping) and isinstance(y, Mapping):
                    found += _differences(x, y, f"{name}[{index}].")
        elif key == "origin" and isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{name}.")
        elif key == "steps":
            text_a, text_b = _steps_text(a), _steps_text(b)
            if text_a == text_b and isinstance(a, list) and isinstance(b, list):  # the steps' settings differ
                text_a, text_b = _settings_differ(a, b)
            found.append(f"{name}: saved {text_a}, this model {text_b}")
        elif key == "sources":
            found.append(f"{name}: saved {len(a or [])} path(s), this model {len(b or [])}")
        else:
            found.append(f"{name}: saved {a!r}, this model {b!r}")
    return found


#: The fields of a saved step that the wiring example's spatial size may have given (:func:`~bkn_export.chain.steps.
#: size_bound`: a resample's size, a padding before a conv, a reshape's spatial sizes; checkpoints keep no mark of
#: which were computed from the input's size).
_SIZE_FIELDS = frozenset({"size", "input_padding", "spatial"})


def _without_sizes(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _without_sizes(item) for key, item in value.items() if key not in _SIZE_FIELDS}
    if isinstance(value, list):
        return [_without_sizes(item) for item in value]
    return value


def _size_bound_steps_differ(saved: Any, current: Any) -> bool:
    """Whether two saved wirings (or parts of them) hold a pair of steps of one kind that differ only in what the wiring
    example's size may have given (:data:`_SIZE_FIELDS`): the same network wired at different input sizes."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        if "step" in saved and saved.get("step") == current.get("step") and saved != current:
            return _without_sizes(saved) == _without_sizes(current)
        return any(_size_bound_steps_differ(saved[key], current[key]) for key in saved.keys() & current.keys())
    if isinstance(saved, list) and isinstance(current, list):
        return any(_size_bound_steps_differ(a, b) for a, b in zip(saved, current))
    return False


def _v1_equivalent(link: Mapping[str, Any], current: Wiring) -> bool:
    """Whether a version-1 link computes what ``current`` computes."""
    predecessor = link.get("predecessor")
    if predecessor is None:
        return current.transition is None
    if current.transition != link.get("transition") or current.prior_source != "input":
        return False
    if len(current.sources) != 1 or current.sources[0].normalization != predecessor:
        return False
    path = current.sources[0]
    if path.origin is not None:
        return False
    if current.transition in ("learned", "identity"):
        return True
    steps = [s.to_dict() for s in path.steps if s.to_dict().get("step") != "identity"]
    expected: list[tuple[str, str | None]] = [("relu", None)] if link.get("rectify") else []
    expected.append(("affine", link.get("feeding_layer")))
    actual = [
        ("relu", None)
        if s.get("step") == "elementwise" and s.get("kind") == "relu"
        else (s.get("step"), s.get("module"))
        for s in steps
    ]
    return actual == expected


_NAME_KEYS = ("name", "normalization", "module", "owner")


def _without_root_prefix(saved: Any, current: Any) -> tuple[Any, Any]:
    """Both wirings with the module-name prefix that one has over the other removed from every name in it: a
    model wired inside a wrapper (names ``net.bn0``...) saved and loaded into the model wired on its own
    (``bn0``), after the state dict's keys lost the same prefix, or the other way round. Unchanged where the
    layer names differ otherwise (or either wiring is None)."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return saved, current
    saved_name, current_name = saved.get("name"), current.get("name")
    if not isinstance(saved_name, str) or not isinstance(current_name, str) or saved_name == current_name:
        return saved, current
    if saved_name.endswith("." + current_name):
        return _strip_names(saved, saved_name[: -len(current_name)]), current
    if current_name.endswith("." + saved_name):
        return saved, _strip_names(current, current_name[: -len(saved_name)])
    return saved, current


def _strip_names(value: Any, prefix: str) -> Any:
    if isinstance(value, list):
        return [_strip_names(item, prefix) for item in value]
    if not isinstance(value, dict):
        return value
    return {
        key: _stripped(item, prefix)
        if key in _NAME_KEYS and not _attribute_name(value, key)
        else _strip_names(item, prefix)
        for key, item in value.items()
    }


def _attribute_name(entry: Mapping[str, Any], key: str) -> bool:
    """Whether ``entry[key]`` names an attribute, not a module: a ParameterScale step's ``name`` (its ``owner`` is
    the module)."""
    return key == "name" and entry.get("step") == "parameter_scale"


def _stripped(name: Any, prefix: str) -> Any:
    """``name`` without the root prefix ``prefix`` (ending in '.'); the prefix's own module (a factor the wrapped
    model's root holds: ``net`` for ``net.``) becomes the root, ''."""
    if not isinstance(name, str):
        return _strip_names(name, prefix)
    if name == prefix[:-1]:
        return ""
    return name[len(prefix) :] if name.startswith(prefix) else name


def check_saved_wiring(saved: Any, current: Wiring, label: str) -> None:
    """Raise ChainWiringError unless the saved extra state ``saved`` describes ``current``'s wiring."""
    if not isinstance(saved, Mapping) or "version" not in saved:
        raise ChainWiringError(
            f"{label}: the checkpoint's wiring entry is not a BKN extra state ({type(saved).__name__}); "
            "re-convert the original model with bkn_export.convert_batchnorm(model, example_inputs, ...)"
        )
    version = saved["version"]
    if version == 1:
        link = saved.get("link") or {}
        if not _v1_equivalent(link, current):
            raise ChainWiringError(
                f"{label}: the checkpoint was saved by an earlier bkn_export (wiring format 1: predecessor "
                f"{link.get('predecessor')!r}, transition {link.get('transition')!r}, feeding layer "
                f"{link.get('feeding_layer')!r}), whose chain differs from this model's data-flow wiring "
                f"({_summary(_signature(current.to_dict()))}). Re-convert: build the BatchNorm model, call "
                "bkn_export.convert_batchnorm(model, example_inputs, ...) and load its BatchNorm weights with "
                "bkn_export.load_batchnorm_state_dict, then train again."
            )
        return
    if version != EXTRA_STATE_VERSION:
        raise ChainWiringError(
            f"{label}: the checkpoint's wiring has format version {version!r}; this bkn_export reads 1 and "
            f"{EXTRA_STATE_VERSION}. Load it with the bkn_export that saved it, or re-convert the model."
        )
    # Both as JSON values (a saved state is JSON; an earlier bkn_export's dict may hold tuples for lists).
    saved_wiring = json.loads(json.dumps(saved.get("wiring")))
    current_wiring = json.loads(json.dumps(saved_form(current)))  # as a checkpoint keeps it: no stop-gradient steps
    saved_wiring, current_wiring = _without_root_prefix(saved_wiring, current_wiring)
    saved_signature = _signature(saved_wiring)
    current_signature = _signature(current_wiring)
    if saved_signature != current_signature:
        saved_summary, current_summary = _summary(saved_signature), _summary(current_signature)
        summaries = (
            f" (it was saved with wiring {saved_summary} but this model is wired {current_summary})"
            if saved_summary != current_summary
            else ""
        )
        sized = (
            " and example inputs of the size the checkpoint was wired at (a padding, resample size or reshape "
            "given at the wiring size differs: the two may have been wired at different input sizes)"
            if _size_bound_steps_differ(saved_signature, current_signature)
            else ""
        )
        gained = (
            " If it is the same model, saved by an earlier bkn_export: this version predicts this layer through a "
            "path the earlier one could not follow (a product with a module's parameter, ReZero / LayerScale, since "
            "2026-12-07); keep the checkpoint's weights with model.load_state_dict({k: v for k, v in "
            "state_dict.items() if not k.endswith('_extra_state')}, strict=False), which leaves the layer's new BKN "
            "parameters at their initial values."
            if saved_signature.get("transition") is None and current_signature.get("transition") is not None
            else ""
        )
        raise ChainWiringError(
            f"{label}: the checkpoint's wiring differs in "
            f"{'; '.join(_differences(saved_signature, current_signature)) or 'the wiring'}{summaries}. Build the "
            f"model the same way and call bkn_export.convert_batchnorm(model, example_inputs, ...) with the same "
            f"options{sized} before load_state_dict.{gained}"
        )
