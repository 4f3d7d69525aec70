"""Transitions: how a layer's prior (μ_{k|k-1}, Σ_{k|k-1}) comes from its sources' posteriors.

A transition object is built from a layer's :class:`~bkn_export.chain.wiring.Wiring`
and called once per train-mode forward with what the sources published in this call
(:class:`~bkn_export.chain.scope.Published`, by layer name) and the live modules. Every
source normalization j contributes one Gaussian per channel, chosen by
``KalmanOptions.prior_source``:

* ``"input"`` (the authors'): its posterior N(μ_{j|j}, Σ_{j|j}) of its *input*
  statistics, skipping its γ, β;
* ``"output"`` (normalization-aware): the moments of its normalized output
  γ(x − μ_{j|j})/sqrt(Σ_{j|j} + ε) + β, x ~ N(μ_{j|j}, Σ_{j|j})
  (:func:`bkn_export.moments.normalized_output_moments`),

entering the path at the source's input shape (N, C_j, *). Positions are treated as
i.i.d. and channels as independent (the assumption the authors' sampling makes).

* :class:`Propagate` (deterministic, exportable): each Gaussian pushed analytically
  through the steps of its path (``step.predict``, :mod:`bkn_export.moments`); a
  concatenation concatenates its parts' moments, a sum adds its addends' means and
  variances (independent addends; an addend with fewer channels is zero-padded at the
  end), recursively where a path starts from a combination.
* :class:`Sampled` (the authors' Monte Carlo): one sample per position of one example,
  shape (1, C_j, *spatial_j) (as the authors draw one per position per micro-batch
  group; an input without spatial dims, (N, C_j), draws one per sample instead, since
  one position would have no spread), reparameterised z = μ + sqrt(Σ)·ε so that
  gradients reach the sources; the real ops of each path run on it (``step.apply``),
  parts are concatenated / addends added as samples, and the prior is the biased
  per-channel mean and variance of the result. Its mean is unbiased; its variance is
  the biased variance of P drawn positions (low by (P−1)/P where they are independent,
  e.g. the N rows of a Linear feed; otherwise by a factor that depends on their overlap).
* :class:`Learned`: a free matrix A_k (C_k, C_src) over the concatenated source
  Gaussians: μ = A m, Σ = (A∘A) v (no path is used).
* :class:`Identity`: the sources' Gaussians combined as they are (no steps).

Before a transition predicts, :func:`unrun_module` checks each recorded path against this
call: every watched module on it (:mod:`bkn_export.chain.scope`, leaf modules of ``Affine``,
``Pool``, ``Resample``, ``Elementwise`` and ``Identity`` steps) must have run after the
source published (after the latest source, for steps after a combination; their order
among themselves is not checked). A path that did not counts as absent for the call
(``known = 0`` on its concatenation channels; no prior for a single path, a sum, or a
``learned`` / ``identity`` transition).
Functional steps cannot be checked.

Channels that no normalization reaches (a concatenation part that falls back) get a
prior of N(0, 1) and ``known = 0``: the layer gives them prior weight 0, i.e. batch
statistics alone. Any other part that falls back, or a source that did not run in this
call, leaves the layer without a prior for the call (batch statistics, as BatchNorm).
Process noise R_k is the layer's and is added by the layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from bkn_export import fast_prior
from bkn_export import functional as Fk
from bkn_export.chain import path_moments
from bkn_export.chain.record import SourcePath
from bkn_export.chain.scope import ChainScratch, Published
from bkn_export.chain.steps import Gate, LinearRun, Step, apply_steps
from bkn_export.chain.steps import Identity as IdentityStep
from bkn_export.chain.wiring import Wiring
from bkn_export.nn import Prior, PriorSource, _BatchKalmanNorm

__all__ = [
    "Identity",
    "Learned",
    "Propagate",
    "Sampled",
    "Transition",
    "path_modules",
    "path_sequences",
    "source_gaussian",
    "transition_for",
    "unrun_module",
]

_VARIANCE_FLOOR = 1e-12


def source_gaussian(name: str, published: Published, prior_source: str) -> PriorSource:
    """The Gaussian a source normalization contributes (per ``prior_source``), at its input shape."""
    mean, variance = published.posterior_mean, published.posterior_variance
    if prior_source == "output":
        mean, variance = fast_prior.normalized_output_moments(
            mean, variance, published.weight, published.bias, published.eps
        )
    return PriorSource(name, mean, variance, tuple(published.input_shape))


def _step_modules(steps: Sequence[Step]) -> Iterator[str]:
    for step in steps:
        if isinstance(step, Gate):
            yield from _step_modules(step.branch)
        elif isinstance(step, LinearRun):
            yield from _step_modules(step.steps)
        else:
            module = getattr(step, "module", None)
            if isinstance(module, str):
                yield module


def path_modules(path: SourcePath) -> Iterator[str]:
    """The qualified names of the modules on ``path`` (and its origin's paths), in order."""
    if path.origin is not None:
        for source in path.origin.sources:
            yield from path_modules(source)
    yield from _step_modules(path.steps)


def path_sequences(path: SourcePath) -> list[list[str]]:
    """``path`` as the runs of names a value goes through, from a source normalization (or the start of a path that
    reaches none) to the path's end: one per source the path combines, each the source's name, then its modules in
    order (a squeeze-and-excitation gate's branch where the gate stands)."""
    tail = list(_step_modules(path.steps))
    if path.normalization is not None:
        return [[path.normalization, *tail]]
    if path.origin is not None:
        return [[*head, *tail] for source in path.origin.sources for head in path_sequences(source)]
    return [tail]


def _path_start(path: SourcePath, scratch: ChainScratch, watched: AbstractSet[str]) -> int | str | None:
    """The clock at which ``path``'s input was ready in this call (its source's publication; for a
    combination, the latest of its parts' starts), or the name of a watched module on it that did not
    run after that (None: not checkable, e.g. a posterior published by hand).

    Each watched module must have run after the path's start; their order among themselves is not
    checked, as the recording may reorder steps that commute (a ReLU and a max pooling).
    """
    start: int | None
    if path.normalization is not None:
        start = scratch.published_at.get(path.normalization)
    elif path.origin is not None:
        starts = [_path_start(source, scratch, watched) for source in path.origin.sources]
        missing = next((s for s in starts if isinstance(s, str)), None)
        if missing is not None:
            return missing
        known = [s for s in starts if isinstance(s, int)]
        start = max(known) if known else None
    else:
        start = None
    if start is None:
        return None
    for name in _step_modules(path.steps):
        if name in watched and all(tick <= start for tick in scratch.calls.get(name, ())):
            return name
    return start


def unrun_module(path: SourcePath, scratch: ChainScratch, watched: AbstractSet[str]) -> str | None:
    """A module of ``watched`` on ``path`` that did not run after the path's source published in
    this call (None: every one did, or the path cannot be checked)."""
    start = _path_start(path, scratch, watched)
    return start if isinstance(start, str) else None


class _Part(NamedTuple):
    """Moments (C,) of one part at its end, spatial size, and which channels are known."""

    mean: Tensor
    variance: Tensor
    spatial: tuple[int, ...]
    known: Tensor | None  # (C,) 0/1, None: all known


def _pad(t: Tensor, channels: int) -> Tensor:
    return torch.cat([t, t.new_zeros((channels - t.shape[0],))]) if t.shape[0] < channels else t


def _combine(combine: str, parts: Sequence[_Part | None], channels: Sequence[int], total: int) -> _Part | None:
    """Concatenate or add parts' moments; None where the result is not known at all."""
    if combine == "concat":
        if all(p is None for p in parts):
            return None
        ref = next(p for p in parts if p is not None)
        means, variances, known = [], [], []
        for part, c in zip(parts, channels):
            if part is None:
                means.append(ref.mean.new_zeros((c,)))
                variances.append(ref.mean.new_ones((c,)))
                known.append(ref.mean.new_zeros((c,)))
            else:
                means.append(part.mean)
                variances.append(part.variance)
                known.append(part.known if part.known is not None else part.mean.new_ones((c,)))
        mask = torch.cat(known)
        return _Part(
            torch.cat(means), torch.cat(variances), ref.spatial, mask if any(p is None for p in parts) else None
        )
    if any(p is None or p.known is not None for p in parts):  # an unknown addend: the sum is unknown
        return None
    known_parts = [p for p in parts if p is not None]
    if combine == "sum":
        mean = sum((_pad(p.mean, total) for p in known_parts[1:]), _pad(known_parts[0].mean, total))
        variance = sum((_pad(p.variance, total) for p in known_parts[1:]), _pad(known_parts[0].variance, total))
        return _Part(mean, variance, known_parts[0].spatial, None)
    return known_parts[0]


class Transition:
    """Base: a layer's wiring value → its prior for one call (see the module docstring)."""

    kind: ClassVar[str] = ""

    def __init__(self, wiring: Wiring) -> None:
        self.wiring = wiring

    def predict(
        self,
        layer: _BatchKalmanNorm,
        published: Mapping[str, Published],
        modules: Mapping[str, nn.Module],
        x: Tensor,
        memo: MutableMapping[Any, Any] | None = None,
        absent: AbstractSet[int] = frozenset(),
    ) -> Prior | None:
        """μ_{k|k-1}, Σ_{k|k-1}: (C,) each for ``layer`` (input x: (N, C, *)), or None (no prior this call).

        memo: the call's store of predictions already pushed through a path (the root's
        scratch keeps one per forward): a path from one source's posterior through the
        same steps gives the same moments to every layer it feeds (DenseNet: each dense
        layer's output reaches all later layers of its block), so it is computed once; so
        is each source's Gaussian (:func:`source_gaussian`).
        absent: indices into ``wiring.sources`` of the paths that did not run in this call
        (:func:`unrun_module`): they count as absent.
        """
        raise NotImplementedError

    def _gaussians(
        self, published: Mapping[str, Published], memo: MutableMapping[Any, Any] | None = None
    ) -> dict[str, PriorSource] | None:
        """Each source normalization's Gaussian, or None if one did not publish in this call
        (taken from ``memo`` where this call already computed it from the same published entry)."""
        gaussians = _SourceGaussians.of(self.wiring, published, memo)
        return None if gaussians is None else dict(gaussians.items())


class _SourceGaussians(Mapping[str, PriorSource]):
    """Each source normalization's Gaussian for one call (:func:`source_gaussian`), computed on first use or
    taken from the call's memo, or :meth:`offer` ed by a path that computed it on its way
    (:func:`bkn_export.chain.path_moments.predict_source_path`). Iterates in the wiring's source order."""

    def __init__(
        self, wiring: Wiring, published: Mapping[str, Published], memo: MutableMapping[Any, Any] | None
    ) -> None:
        self._names = wiring.source_names
        self._prior_source = wiring.prior_source
        self._published = published
        self._memo = memo
        self._values: dict[str, PriorSource] = {}

    @classmethod
    def of(
        cls, wiring: Wiring, published: Mapping[str, Published], memo: MutableMapping[Any, Any] | None
    ) -> _SourceGaussians | None:
        """None if a source did not publish in this call."""
        if any(published.get(name) is None for name in wiring.source_names):
            return None
        return cls(wiring, published, memo)

    def _key(self, name: str) -> tuple[str, str, str]:
        return ("source gaussian", name, self._prior_source)  # path keys have 4 elements

    def __getitem__(self, name: str) -> PriorSource:
        value = self._values.get(name)
        if value is None:
            entry = self._published[name]
            compute = functools.partial(source_gaussian, name, entry, self._prior_source)
            value = self._values[name] = _remembered(self._memo, self._key(name), entry, compute)
        return value

    def known(self, name: str) -> PriorSource | None:
        """The Gaussian where this call already has it (here or in the memo), without computing it."""
        value = self._values.get(name)
        if value is None and self._memo is not None:
            hit = self._memo.get(self._key(name))
            if hit is not None and hit[0] is self._published[name]:
                value = self._values[name] = hit[1]
        return value

    def offer(self, name: str, gaussian: PriorSource) -> None:
        """A Gaussian computed elsewhere from this call's published entry (kept unless one is known)."""
        if self.known(name) is None:
            self._values[name] = gaussian
            if self._memo is not None:
                self._memo[self._key(name)] = (self._published[name], gaussian)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_Value = TypeVar("_Value")


def _remembered(
    memo: MutableMapping[Any, Any] | None, key: Any, source: Published, compute: Callable[[], _Value]
) -> _Value:
    """``compute()``, or what it gave earlier in this call for the same published ``source``
    (memo: key → (source, value); an entry counts only while its source is the one it was computed from)."""
    if memo is None:
        return compute()
    hit = memo.get(key)
    if hit is not None and hit[0] is source:
        return hit[1]  # type: ignore[no-any-return]
    value = compute()
    memo[key] = (source, value)
    return value


def _as_prior(part: _Part | None, sources: Iterator[PriorSource]) -> Prior | None:
    if part is None:
        return None
    return Prior(part.mean, part.variance, part.known, tuple(sources))


def _delivered(
    gaussians: Mapping[str, PriorSource], paths: Sequence[SourcePath], parts: Sequence[_Part | None]
) -> Iterator[PriorSource]:
    """The Gaussians of the sources whose paths delivered a part (not a path counted as absent in this call, nor one
    that reached no source), in the wiring's source order: what a prior lists as its sources."""
    delivered = {name for path, got in zip(paths, parts) if got is not None for name in path.normalizations()}
    return (gaussians[name] for name in gaussians if name in delivered)


class _PathTransition(Transition):
    """A transition that turns each recorded source path into moments, then combines them (wiring.combine)."""

    def predict(
        self,
        layer: _BatchKalmanNorm,
        published: Mapping[str, Published],
        modules: Mapping[str, nn.Module],
        x: Tensor,
        memo: MutableMapping[Any, Any] | None = None,
        absent: AbstractSet[int] = frozenset(),
    ) -> Prior | None:
        wiring = self.wiring
        gaussians = _SourceGaussians.of(wiring, published, memo)  # computed as the paths need them
        if gaussians is None:
            return None
        parts = [
            None if index in absent else self._source_part(path, gaussians, modules, published, memo)
            for index, path in enumerate(wiring.sources)
        ]
        combined = _combine(wiring.combine, parts, [p.channels for p in wiring.sources], layer.num_features)
        return _as_prior(combined, _delivered(gaussians, wiring.sources, parts))

    def _source_part(
        self,
        path: SourcePath,
        gaussians: Mapping[str, PriorSource],
        modules: Mapping[str, nn.Module],
        published: Mapping[str, Published],
        memo: MutableMapping[Any, Any] | None,
    ) -> _Part | None:
        """The moments one source path delivers to this layer, or None where it reaches no source."""
        raise NotImplementedError


class Propagate(_PathTransition):
    """Analytic: each source's Gaussian pushed through its path's steps, then combined."""

    kind = "propagate"

    def _source_part(
        self,
        path: SourcePath,
        gaussians: Mapping[str, PriorSource],
        modules: Mapping[str, nn.Module],
        published: Mapping[str, Published],
        memo: MutableMapping[Any, Any] | None,
    ) -> _Part | None:
        if path.normalization is not None and path.steps and memo is not None:
            key = (path.normalization, path.steps, path.entry_shape, self.wiring.prior_source)
            return _remembered(
                memo,
                key,
                published[path.normalization],
                lambda: self._source_part(path, gaussians, modules, published, None),
            )
        if path.normalization is not None:
            head = self._fused_head(path, gaussians, modules, published)
            if head is not None:
                return head
            entry = gaussians[path.normalization]
            start = _Part(entry.mean, entry.variance, tuple(entry.shape[2:]), None)
        elif path.origin is not None:
            parts = [self._source_part(p, gaussians, modules, published, memo) for p in path.origin.sources]
            channels = [p.channels for p in path.origin.sources]
            start_or_none = _combine(path.origin.combine, parts, channels, max(channels))
            if start_or_none is None or (start_or_none.known is not None and path.steps):
                return None
            start = start_or_none
        else:
            return None
        if not path.steps:
            return start
        mean, variance, spatial = path_moments.predict_steps(
            path.steps, start.mean, start.variance, start.spatial, modules
        )
        return _Part(mean, variance, tuple(spatial), None)

    def _fused_head(
        self,
        path: SourcePath,
        gaussians: Mapping[str, PriorSource],
        modules: Mapping[str, nn.Module],
        published: Mapping[str, Published],
    ) -> _Part | None:
        """The path's moments with its head (the source's output variance, an activation, a conv / Linear) as one
        autograd node (:func:`bkn_export.chain.path_moments.predict_source_path`), or None where that does not
        apply. Starts from the source's Gaussian where this call already has it; else computes it on the way and
        offers it to ``gaussians`` (one computation per source and call, as before)."""
        name = path.normalization
        if not path.steps or name is None or not isinstance(gaussians, _SourceGaussians):
            return None
        known = gaussians.known(name)
        entry = published[name]
        start = None if known is None else (known.mean, known.variance)
        output_gaussian = self.wiring.prior_source == "output"
        found = path_moments.predict_source_path(entry, start, output_gaussian, path.steps, modules)
        if found is None:
            return None
        if known is None:
            gaussians.offer(name, PriorSource(name, *found.gaussian, tuple(entry.input_shape)))
        return _Part(found.mean, found.variance, found.spatial, None)


class Sampled(_PathTransition):
    """Monte Carlo: one reparameterised sample per position through the real ops (module docstring)."""

    kind = "sampled"

    def _source_part(
        self,
        path: SourcePath,
        gaussians: Mapping[str, PriorSource],
        modules: Mapping[str, nn.Module],
        published: Mapping[str, Published],
        memo: MutableMapping[Any, Any] | None,
    ) -> _Part | None:
        sample = self._path(path, gaussians, modules)
        if sample is None:
            return None
        stats = Fk.batch_statistics(sample)
        return _Part(stats.mean, stats.variance, tuple(sample.shape[2:]), None)

    def _path(
        self, path: SourcePath, gaussians: Mapping[str, PriorSource], modules: Mapping[str, nn.Module]
    ) -> Tensor | None:
        if path.normalization is not None:
            sample = _draw(gaussians[path.normalization])
        elif path.origin is not None:
            parts = [self._path(p, gaussians, modules) for p in path.origin.sources]
            if any(p is None for p in parts):
                return None
            known = [p for p in parts if p is not None]
            if path.origin.combine == "concat":
                sample = torch.cat(known, dim=1)
            else:
                width = max(p.shape[1] for p in known)
                sample = sum((_pad_channels(p, width) for p in known[1:]), _pad_channels(known[0], width))
        else:
            return None
        return apply_steps(path.steps, sample, modules)


def _draw(gaussian: PriorSource) -> Tensor:
    """z = μ + sqrt(Σ)·ε: (1, C, *spatial), or (N, C) for an input without spatial dims."""
    shape = gaussian.shape
    draw_shape = (1, *shape[1:]) if len(shape) > 2 else tuple(shape)
    noise = torch.randn(draw_shape, device=gaussian.mean.device, dtype=gaussian.mean.dtype)
    view = (1, -1, *([1] * (len(draw_shape) - 2)))
    std = torch.sqrt(gaussian.variance.clamp_min(_VARIANCE_FLOOR))
    return gaussian.mean.reshape(view) + std.reshape(view) * noise


def _pad_channels(sample: Tensor, channels: int) -> Tensor:
    missing = channels - sample.shape[1]
    if missing <= 0:
        return sample
    return torch.cat([sample, sample.new_zeros((sample.shape[0], missing, *sample.shape[2:]))], dim=1)


def stopped_sources(paths: Sequence[SourcePath]) -> frozenset[str]:
    """The source normalizations every one of whose paths to the layer crosses a stop-gradient step (``detach()``,
    ``.data``): the transitions that do not walk the steps (``learned``, ``identity``) take their Gaussians
    detached, so that the prior's gradient stops where the data's does."""
    all_stopped: dict[str, bool] = {}

    def walk(path: SourcePath, stopped: bool) -> None:
        stopped = stopped or any(isinstance(step, IdentityStep) and step.stops_gradient for step in path.steps)
        if path.normalization is not None:
            all_stopped[path.normalization] = all_stopped.get(path.normalization, True) and stopped
        if path.origin is not None:
            for source in path.origin.sources:
                walk(source, stopped)

    for path in paths:
        walk(path, False)
    return frozenset(name for name, stopped in all_stopped.items() if stopped)


def _cut(gaussians: Mapping[str, PriorSource], stopped: frozenset[str]) -> dict[str, PriorSource]:
    return {
        name: g._replace(mean=g.mean.detach(), variance=g.variance.detach()) if name in stopped else g
        for name, g in gaussians.items()
    }


class Learned(Transition):
    """A free matrix A_k (C_k, C_src) over the concatenated source Gaussians (the layer's parameter)."""

    kind = "learned"

    def predict(
        self,
        layer: _BatchKalmanNorm,
        published: Mapping[str, Published],
        modules: Mapping[str, nn.Module],
        x: Tensor,
        memo: MutableMapping[Any, Any] | None = None,
        absent: AbstractSet[int] = frozenset(),
    ) -> Prior | None:
        gaussians = self._gaussians(published, memo)
        if gaussians is None or absent:  # the matrix was learned for the recorded paths
            return None
        gaussians = _cut(gaussians, stopped_sources(self.wiring.sources))
        mean = torch.cat([g.mean for g in gaussians.values()])
        variance = torch.cat([g.variance for g in gaussians.values()])
        predicted_mean, predicted_variance = Fk.predict_linear(mean, variance, layer.transition_matrix, None)
        return Prior(predicted_mean, predicted_variance, None, tuple(gaussians.values()))


class Identity(Transition):
    """The sources' Gaussians combined as they are (equal channel counts; no steps)."""

    kind = "identity"

    def predict(
        self,
        layer: _BatchKalmanNorm,
        published: Mapping[str, Published],
        modules: Mapping[str, nn.Module],
        x: Tensor,
        memo: MutableMapping[Any, Any] | None = None,
        absent: AbstractSet[int] = frozenset(),
    ) -> Prior | None:
        gaussians = self._gaussians(published, memo)
        if gaussians is None or absent:
            return None
        gaussians = _cut(gaussians, stopped_sources(self.wiring.sources))
        parts = [_Part(gaussians[name].mean, gaussians[name].variance, (), None) for name in self.wiring.source_names]
        combine = "concat" if self.wiring.combine == "concat" else "sum"
        channels = [int(g.mean.shape[0]) for g in gaussians.values()]
        return _as_prior(_combine(combine, parts, channels, layer.num_features), iter(gaussians.values()))


_TRANSITIONS: dict[str, type[Transition]] = {t.kind: t for t in (Propagate, Sampled, Learned, Identity)}


def transition_for(wiring: Wiring) -> Transition | None:
    """The transition object of ``wiring`` (None for a first-in-chain layer)."""
    if wiring.transition is None:
        return None
    return _TRANSITIONS[wiring.transition](wiring)
