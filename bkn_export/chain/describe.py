"""What the chain does, in words: :func:`describe_chain` and :func:`format_chain`.

Every layer is listed with its transition, each source as ``'norm' → step → step``,
how the sources combine, what is approximate on its paths, and every note the wiring
made (fallbacks, channels without a prior, dropped shortcuts). Nothing falls back
silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from bkn_export import moments
from bkn_export.chain.record import SourcePath
from bkn_export.chain.steps import Affine, Elementwise, Gate, Identity, Pool, Reshape, Step
from bkn_export.chain.wire import bkn_layers
from bkn_export.chain.wiring import Wiring

__all__ = ["ChainLink", "describe_chain", "format_chain"]


@dataclass(frozen=True)
class ChainLink:
    """How one BKN layer is wired (what :func:`describe_chain` reports).

    name: the layer; predecessor: the first source normalization (None: first in
    chain); transition: None for first in chain; feeding_layer / rectify: for a single
    path from one normalization, its last Conv/Linear and whether a ReLU runs before it
    (the one-predecessor view of earlier versions); note: the wiring's notes;
    num_previous_features: C_src of a learned matrix; sources: each source path in
    words; combine: ``none``, ``single``, ``concat`` or ``sum``; approximations: what on
    the paths is not exact under the independence assumption.
    """

    name: str
    predecessor: str | None = None
    transition: str | None = None
    feeding_layer: str | None = None
    rectify: bool = False
    note: str = ""
    num_previous_features: int = 0
    sources: tuple[str, ...] = ()
    combine: str = "none"
    approximations: tuple[str, ...] = ()


def _steps(paths: tuple[SourcePath, ...]) -> Iterator[Step]:
    for path in paths:
        if path.origin is not None:
            yield from _steps(path.origin.sources)
        yield from _flat(path.steps)


def _flat(steps: tuple[Step, ...]) -> Iterator[Step]:
    """Steps in order, a gate's own branch before the gate."""
    for step in steps:
        if isinstance(step, Gate):
            yield from _flat(step.branch)
        yield step


#: The softplus threshold at which moments.GAUSS_HERMITE_ACCURACY's bound was measured (its docstring).
_SOFTPLUS_MEASURED_THRESHOLD = 5.0


def _approximation(step: Step) -> str:
    accuracy = getattr(moments, "ACCURACY", {})
    if isinstance(step, Pool) and "max" in step.spec.kind:
        return f"{step.describe()}: the maximum's moments are approximated (bkn_export.moments.pool_moments)"
    if isinstance(step, Elementwise):
        note = accuracy.get(step.kind, "")
        threshold = dict(step.params).get("threshold") if step.kind == "softplus" else None
        if isinstance(threshold, (int, float)) and threshold < _SOFTPLUS_MEASURED_THRESHOLD:
            note += (
                f"; that bound holds from threshold {_SOFTPLUS_MEASURED_THRESHOLD:g} up: at threshold {threshold:g} "
                "the jump where softplus switches to x adds error (measured: up to 2.5 % mean / 9.6 % variance at "
                "threshold 1, 10 % / 27 % at 0)"
            )
        return "" if not note or note.startswith("exact") else f"{step.describe()}: {note}"
    if isinstance(step, Gate):
        return f"{step.describe()}: the gate is taken as independent of the values it scales"
    if isinstance(step, Reshape) and step.spatial:
        return f"{step.describe()}: spatial size fixed to the example's"
    if isinstance(step, Identity) and step.what == "dropout":
        return f"{step.describe()}: dropout's train-mode effect not modelled (its variance; alpha dropout's mean too)"
    if isinstance(step, Identity) and step.what == "train-mode":
        return f"{step.describe()}: its train-mode effect (noise, DropPath) not modelled"
    return ""


def _feeding(path: SourcePath) -> tuple[str | None, bool]:
    affines = [i for i, s in enumerate(path.steps) if isinstance(s, Affine)]
    if path.normalization is None or path.origin is not None or not affines:
        return None, False
    last = affines[-1]
    relu = any(isinstance(s, Elementwise) and s.kind == "relu" for s in path.steps[:last])
    return path.steps[last].module, relu  # type: ignore[union-attr]


def _steps_change_values(path: SourcePath) -> bool:
    """Whether a path has a recorded step other than an identity (dropout in eval, an identity activation)."""
    if path.origin is not None:
        return True
    return any(
        not (isinstance(step, Identity) or (isinstance(step, Elementwise) and step.kind == "identity"))
        for step in path.steps
    )


def link_for(name: str, wiring: Wiring | None) -> ChainLink:
    """The description of one layer's wiring (None: not wired)."""
    if wiring is None:
        return ChainLink(name, note="not wired: BatchNorm")
    feeding, relu = (None, False)
    if wiring.transition is not None and len(wiring.sources) == 1:
        feeding, relu = _feeding(wiring.sources[0])
    approximations = tuple(dict.fromkeys(a for a in map(_approximation, _steps(wiring.sources)) if a))
    if wiring.transition == "sampled":
        approximations += ("sampled: Monte Carlo, one sample per position",)
    if wiring.transition == "identity" and any(_steps_change_values(path) for path in wiring.sources):
        # the recorded steps are described but not run: channel c of the layer gets channel c of the sources, whatever
        # a conv, a slice or a reordering concat between them did (channels swapped by a concat: variance 178 % off)
        approximations += (
            "identity: each channel takes the same channel of the sources' posteriors; the recorded steps between "
            "(convs, activations, slices, reorderings) are not modelled",
        )
    names = wiring.source_names
    return ChainLink(
        name=name,
        predecessor=names[0] if names and wiring.transition is not None else None,
        transition=wiring.transition,
        feeding_layer=feeding,
        rectify=relu,
        note="; ".join(wiring.notes),
        num_previous_features=wiring.previous_features,
        sources=tuple(s.describe() for s in wiring.sources),
        combine=wiring.combine,
        approximations=approximations,
    )


def describe_chain(model: nn.Module) -> list[ChainLink]:
    """Each BKN layer of ``model`` (first-call order): transition, sources, approximations, notes."""
    links = []
    for name, layer in bkn_layers(model):
        wiring = getattr(layer.chain, "wiring", None)
        links.append(link_for(name, wiring if isinstance(wiring, Wiring) and layer.chain is not None else None))
    return links


def format_chain(model: nn.Module) -> str:
    """The chain as a plain-text table (also what ``bkn`` prints): one row per layer."""
    rows = [("layer", "transition", "sources", "notes")]
    for link in describe_chain(model):
        joiner = " | " if link.combine == "concat" else " + "
        notes = [link.note] if link.note else []
        notes += [f"approximate: {a}" for a in link.approximations]
        rows.append(
            (
                link.name,
                link.transition or "batchnorm (first in chain)",
                joiner.join(link.sources) or "-",
                "; ".join(notes),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
