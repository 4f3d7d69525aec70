"""``chain_statistics``: each BKN layer's prior, batch and posterior statistics on one forward.

How users debug a chain, and how the tests check a transition against a Monte Carlo of
the real modules between the sources and the layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bkn_export import functional as Fk
from bkn_export.chain.observe import observe
from bkn_export.nn import PriorSource, _BatchKalmanNorm

__all__ = ["LayerStatistics", "PriorSource", "chain_statistics"]


@dataclass(frozen=True)
class LayerStatistics:
    """One BKN layer's train-mode step (all per-channel tensors (C,), detached).

    name: the layer; transition: its transition kind (None: first in chain); sources:
    one :class:`PriorSource` per Gaussian the transition pushed into the prior (empty
    without a prior); prior_mean, prior_variance: μ_{k|k-1}, Σ_{k|k-1} + R_k as the op
    received them (None without a prior: first in chain); batch_mean, batch_variance:
    x̄_k and biased S_k of the layer's input; posterior_mean, posterior_variance:
    μ_{k|k}, Σ_{k|k}; prior_weight: p_k after the fallback rule (and 0 on channels
    without a prior); input_shape: (N, C, *); unrun: each recorded path whose watched
    modules did not run after its source published in this forward (that source counted
    as absent), as ``"path: 'module' did not run ..."``, or whose padding or resample size was
    given at the wiring size while its source outputs another size now (``"path: the
    padding ... was given at the wiring size ..."``); empty when every path ran and fits.
    """

    name: str
    transition: str | None
    sources: tuple[PriorSource, ...]
    prior_mean: Tensor | None
    prior_variance: Tensor | None
    batch_mean: Tensor
    batch_variance: Tensor
    posterior_mean: Tensor
    posterior_variance: Tensor
    prior_weight: Tensor
    input_shape: tuple[int, ...]
    unrun: tuple[str, ...] = ()


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Restore every module's mode, every buffer and the RNG states after the block.

    A buffer the forward resized (a ``torch.ao`` observer's, which starts empty) or replaced gets its own tensor and
    values back; every buffer and mode is restored even where one cannot be, and an error of the block itself is
    never hidden by the restore (a cold QA, sixth session of 2026-12-07: a QAT model's resized observer buffer made the
    restore raise, which left the model in train mode with the running statistics the run had updated)."""
    modes = {module: module.training for module in model.modules()}
    registered = {module: (dict(module._buffers), set(module._non_persistent_buffers_set)) for module in modes}
    buffers = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    except BaseException:
        failed = _restore(modes, registered, buffers)
        if failed:
            warnings.warn(f"chain_statistics could not restore {', '.join(failed)}", RuntimeWarning, stacklevel=3)
        raise
    failed = _restore(modes, registered, buffers)
    if failed:
        raise RuntimeError(f"chain_statistics could not restore {', '.join(failed)} after its run")


def _restore(
    modes: dict[nn.Module, bool],
    registered: dict[nn.Module, tuple[dict[str, Tensor | None], set[str]]],
    buffers: list[tuple[nn.Module, str, Tensor, Tensor]],
) -> list[str]:
    """Put back each module's mode, its buffer entries as they were registered (one the run registered removed, one
    that was None None again), and each buffer (the same tensor, its saved values and shape); the buffers that could
    not be (with the error), named."""
    for module, (entries, non_persistent) in registered.items():
        module._buffers.clear()
        module._buffers.update(entries)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(non_persistent)
    failed = []
    with torch.no_grad():
        for module, name, buffer, saved in buffers:
            try:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
                else:
                    buffer.data = saved  # its shape back (an observer's resize_ changed it)
            except Exception as error:  # torch's own error types; the rest are still restored
                failed.append(f"buffer '{name}' of {type(module).__name__} ({type(error).__name__}: {error})")
    for module, mode in modes.items():
        module.training = mode
    return failed


def _run(model: nn.Module, example_inputs: Any) -> None:
    if isinstance(example_inputs, Mapping):
        model(**example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        model(*example_inputs)
    else:
        model(example_inputs)


def chain_statistics(model: nn.Module, example_inputs: Any) -> list[LayerStatistics]:
    """Run ``model`` once in train mode on ``example_inputs`` and report every BKN layer's step.

    A model already in train mode runs with every module's mode as it stands, as a train step runs it: a layer
    frozen with ``.eval()`` inside it runs no Kalman step (it is not in the list) and hands its running statistics
    on as its posterior, which the later layers' priors reported here start from. A model in eval mode is put in
    train mode as a whole for the run. (Before 2026-12-06 every module was put in train mode: a frozen layer was
    reported with its batch statistics, and the later priors with them.)

    example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    Changes no parameter, running statistic, module mode or RNG state (the forward runs
    under no_grad; buffers, modes and the RNG are restored). Returns one
    :class:`LayerStatistics` per BKN layer that ran, in execution (first-call) order.
    """
    with _untouched(model), observe(model) as observer:
        if not model.training:  # a model in train mode keeps its frozen (eval-mode) layers as training runs them
            model.train()
        _run(model, example_inputs)
    modules = dict(model.named_modules())
    result = []
    for name, seen in observer.observations.items():
        layer = modules[name]
        assert isinstance(layer, _BatchKalmanNorm)
        prior_mean, prior_variance, prior_weight = seen.op_prior
        effective = Fk.effective_prior_weight(
            prior_weight, prior_variance, seen.batch.variance, layer.options.fallback_ratio
        )
        has_prior = seen.prior is not None
        result.append(
            LayerStatistics(
                name=name,
                transition=layer.chain.transition if layer.chain is not None else None,
                sources=seen.prior.sources if seen.prior is not None else (),
                prior_mean=prior_mean if has_prior else None,
                prior_variance=prior_variance if has_prior else None,
                batch_mean=seen.batch.mean,
                batch_variance=seen.batch.variance,
                posterior_mean=seen.published.posterior_mean,
                posterior_variance=seen.published.posterior_variance,
                prior_weight=effective,
                input_shape=tuple(seen.published.input_shape),
                unrun=observer.unrun.get(name, ()),
            )
        )
    return result
