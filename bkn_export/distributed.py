"""``SyncBatchKalmanNorm``: BKN whose batch statistics span a whole process group.

Under ``DistributedDataParallel`` a plain :class:`~bkn_export.BatchKalmanNorm2d` (like
``nn.BatchNorm2d``) takes its batch statistics over the rank's own micro-batch. This
layer, like ``nn.SyncBatchNorm``, combines them across the process group *before* the
Kalman update, so that ``W`` ranks with ``N`` samples each train exactly as one process
with a batch of ``W·N``. Per training step and layer:

1. every rank gathers ``[C, n_r, dtype]`` (one small fixed-size ``all_gather``), so
   mismatched channel counts or dtypes raise :class:`~bkn_export.errors.DistributedError`
   on every rank instead of hanging or corrupting the next collective, and ranks with
   an empty batch (``n_r = 0``) are known to all;
2. every rank gathers its local statistics ``(x̄_r, S_r)`` — mean and *biased* variance,
   never raw sums of squares — and all ranks combine them with the parallel formula of
   Chan et al. (:func:`combine_batch_statistics`), stable in float32;
3. the prediction, the Kalman update and the normalization are those of
   :mod:`bkn_export.functional` with the global statistics; running statistics follow
   :func:`~bkn_export.functional.running_statistics_update` with ``n = Σ n_r``.

Gradients: the gather in step 2 is an autograd function whose backward all-reduces
(sums) the gradient of the gathered statistics and hands each rank the rows of its own
statistics. Every rank's loss depends on every rank's input through the global
statistics; the sum makes each rank's input gradient that of the *sum of all ranks'
losses*, which is the convention of ``nn.SyncBatchNorm``. DDP then averages parameter
gradients, so a mean loss per rank gives the gradient of the global mean loss.

For the ``sampled`` transition each rank draws its own Monte Carlo sample of the prior;
the sample moments are combined across ranks in the same collective, so all ranks use
one prior (the moments of the union of the samples).

In eval mode the layer is exactly BKN (running statistics, no communication). Training
needs an initialised process group; with a world size of 1 it runs the local custom op.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bkn_export import functional as Fk
from bkn_export.errors import BKNInputError, DistributedError
from bkn_export.module_hooks import take_over_hooks
from bkn_export.nn import _BatchKalmanNorm
from bkn_export.tracing import nothing_traces

__all__ = [
    "SyncBatchKalmanNorm",
    "combine_batch_statistics",
    "convert_sync_batchkalmannorm",
    "process_group_memo",
]

#: Statistics dtypes a rank may send, by position (the dtype code in the header).
_DTYPE_CODES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def combine_batch_statistics(means: Tensor, variances: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the union of W groups (the parallel formula of Chan et al.).

    means, variances: (W, C) per-group mean and biased variance; counts: (W,) elements
    per channel in each group (a group with count 0 contributes nothing; its rows must be
    finite). With n = Σ n_r and w_r = n_r / n::

        x̄ = Σ w_r x̄_r            S = Σ w_r (S_r + (x̄_r − x̄)²)

    i.e. M2 = Σ M2_r + Σ n_r δ_r² with δ_r = x̄_r − x̄: deviations from the mean, never
    raw sums of squares, so no cancellation in float32. Differentiable. Returns (C,), (C,).
    """
    weights = (counts / counts.sum()).to(means.dtype).unsqueeze(1)
    mean = (weights * means).sum(dim=0)
    spread = means - mean
    variance = (weights * (variances + spread * spread)).sum(dim=0)
    return mean, variance


class _AllGatherWithGradient(torch.autograd.Function):
    """all_gather of a (K,) tensor into (W, K); backward sums the gradient over ranks.

    The ``anchor`` input (a 0-dim leaf that requires grad) makes the output require grad
    on every rank whenever grad mode is on, even on a rank whose local rows are constants
    (an empty batch): then every rank runs this backward, and so its all_reduce, and no
    rank waits for a peer that skipped it.
    """

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: Any, anchor: Tensor) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad_gathered: Tensor) -> tuple[Tensor, None, None]:
        # Row r of the gathered tensor is rank r's local statistics on every rank; the
        # total gradient of those statistics is the sum over ranks of each rank's row-r gradient.
        total = grad_gathered.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.rank], None, None


def _gather_header(x: Tensor, channels: int, count: int, group: Any, label: str) -> list[int]:
    """All ranks' element counts; raises DistributedError on every rank if C or dtypes differ."""
    acc = Fk.statistics_dtype(x.dtype)
    header = torch.tensor([channels, count, _DTYPE_CODES.index(acc)], dtype=torch.int64, device=x.device)
    parts = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, header, group=group)
    rows = [part.tolist() for part in parts]
    if len({row[0] for row in rows}) > 1 or len({row[2] for row in rows}) > 1:
        described = ", ".join(f"rank {r}: {row[0]} channels ({_DTYPE_CODES[row[2]]})" for r, row in enumerate(rows))
        raise DistributedError(
            f"{label}: ranks disagree on the input of this synchronized layer ({described}). Every rank must "
            "run the same model on inputs with the same channel count and dtype, calling the synchronized "
            "layers in the same order."
        )
    return [row[1] for row in rows]


def process_group_memo(model: nn.Module) -> dict[int, Any]:
    """``copy.deepcopy`` memo entries that make a copy of ``model`` share the process group of each of its layers
    (``nn.SyncBatchNorm``, :class:`SyncBatchKalmanNorm`): a group cannot be copied or pickled."""
    groups = (getattr(module, "process_group", None) for module in model.modules())
    return {id(group): group for group in groups if group is not None}


class SyncBatchKalmanNorm(_BatchKalmanNorm):
    """BKN over (N, C, *) inputs with batch statistics combined across a process group.

    Args: those of :class:`~bkn_export.BatchKalmanNorm2d` plus ``process_group`` (None:
    the default group). Input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); a rank
    may pass an empty batch in training (it contributes nothing). Build it with
    :func:`convert_sync_batchkalmannorm` from a converted, wired model.
    """

    _expected_ranks = (2, 3, 4, 5)

    def __init__(self, num_features: int, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchKalmanNorm:
        """A deep copy sharing the process group: a group is a handle to the processes, which cannot be copied
        (``copy.deepcopy`` of a sub-group raised "cannot pickle ProcessGroup"); everything else is copied."""
        memo.update(process_group_memo(self))
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                f"{self._label()}: training a SyncBatchKalmanNorm needs an initialised process group; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up its environment), or "
                "train with BatchKalmanNorm (per-process statistics). Eval mode needs no process group."
            )
        return super().forward(x)

    def _syncs(self) -> bool:
        return self.training and dist.get_world_size(self.process_group) > 1

    def _sampled(self) -> bool:
        return self.chain is not None and self.chain.transition == "sampled"

    def _empty(self, x: Tensor, use_batch: bool) -> Tensor:
        # An empty local batch still takes part in the group's collectives.
        if use_batch and self._syncs():
            return self._batch_step(x)
        return super()._empty(x, use_batch)

    def _prior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.numel() > 0 or not self._sampled() or not self._syncs():
            return super()._prior(x)
        # An empty rank draws no sample (count 0: its rows are ignored). R stays in the
        # graph with a zero gradient so every rank reduces the same DDP parameters.
        acc = Fk.statistics_dtype(x.dtype)
        zeros = x.new_zeros((self.num_features,), dtype=acc)
        noise = self.process_noise()
        variance = zeros if noise is None else zeros + 0.0 * noise.to(acc)
        return zeros, variance, self.prior_weight().to(acc)

    def _refuse_one_value(self, total: int, x: Tensor) -> None:
        """BKN's and BatchNorm's refusal of one value per channel in a layer with no prior, for the group's count
        (``nn.SyncBatchNorm`` checks only at world size 1): its variance would be 0 and its output β."""
        if total == 1 and not self.has_predecessor and nothing_traces():
            raise BKNInputError(
                f"Expected more than 1 value per channel when training, got {total} across the process group (this "
                f"rank's input size {tuple(x.shape)}); {self._label()} has no predecessor in its chain, so no Kalman "
                "prior: its batch variance would be 0 and its output its bias whatever the input"
            )

    def _kalman_step(
        self, x: Tensor, prior_mean: Tensor, prior_variance: Tensor, prior_weight: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """The Kalman step with the group's batch statistics: (y, μ_{k|k}, Σ_{k|k}, Σ n_r)."""
        if not self._syncs():
            self._refuse_one_value(x.numel() // self.num_features, x)
            return super()._kalman_step(x, prior_mean, prior_variance, prior_weight)
        group = self.process_group
        c = self.num_features
        count = x.numel() // c
        counts = _gather_header(x, c, count, group, self._label())
        total = sum(counts)
        if total == 0:
            raise BKNInputError(f"{self._label()}: every rank passed an empty batch; there are no statistics")
        self._refuse_one_value(total, x)  # every rank sees the same total: all raise, none waits
        acc = Fk.statistics_dtype(x.dtype)
        if count > 0:
            local_mean, local_variance, _ = Fk.batch_statistics(x)
        else:
            local_mean = local_variance = x.new_zeros((c,), dtype=acc)
        sampled = self._sampled()
        pieces = [local_mean, local_variance] + ([prior_mean, prior_variance] if sampled else [])
        anchor = torch.zeros((), dtype=acc, requires_grad=torch.is_grad_enabled())
        gathered = _AllGatherWithGradient.apply(torch.cat(pieces), group, anchor)
        gathered = gathered.view(len(counts), len(pieces), c)
        weights = torch.tensor(counts, dtype=acc, device=x.device)
        batch_mean, batch_variance = combine_batch_statistics(gathered[:, 0], gathered[:, 1], weights)
        if sampled:
            prior_mean, prior_variance = combine_batch_statistics(gathered[:, 2], gathered[:, 3], weights)
        stats = Fk.BatchStatistics(batch_mean, batch_variance, total)
        mean, variance, _ = Fk.kalman_posterior(
            stats, prior_mean, prior_variance, prior_weight, self.options.fallback_ratio
        )
        weight = self.weight.to(acc) if self.weight is not None else None
        bias = self.bias.to(acc) if self.bias is not None else None
        scale, shift = Fk.inference_affine(mean, variance, weight, bias, self.eps)
        shape = (1, c, *([1] * (x.dim() - 2)))
        y = x.to(acc) * scale.view(shape) + shift.view(shape)
        return y.to(x.dtype), mean, variance, total

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", process_group={self.process_group}" if self.process_group else "")


def synchronised_layer(module: _BatchKalmanNorm, process_group: Any) -> SyncBatchKalmanNorm:
    """A SyncBatchKalmanNorm sharing ``module``'s parameters and buffers, with its options and chain.

    One layer, unchecked: a caller converting a fused layer (``BatchKalmanNormAct*d``) re-attaches what its forward
    adds (:func:`bkn_export.norm_act.synchronise_submodules`), as ``convert_batchnorm`` does for a SyncBatchNormAct.
    """
    sync = SyncBatchKalmanNorm(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group=process_group,
        **asdict(module.options),
    )
    # The same Parameter and buffer objects (as nn.SyncBatchNorm.convert_sync_batchnorm),
    # so an optimizer built before the conversion keeps working.
    sync._parameters.update(module._parameters)
    sync._buffers.update(module._buffers)
    sync.chain = module.chain  # an immutable value: the same wiring, transition and root
    sync.train(module.training)
    return sync


def convert_sync_batchkalmannorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchKalmanNorm1d/2d/3d in ``model`` by a :class:`SyncBatchKalmanNorm`.

    In the spirit of ``nn.SyncBatchNorm.convert_sync_batchnorm``: converted in place and
    returned (which matters only when ``model`` itself is a BKN layer); weights, running
    statistics, BKN parameters (gain, process noise, transition) and the Kalman-chain
    wiring are kept, the parameter objects themselves are shared. Convert and wire first
    (:func:`bkn_export.convert_batchnorm` / :func:`bkn_export.wire_chain`), then call this,
    then wrap in ``DistributedDataParallel``. The state dict keys are unchanged, so a
    checkpoint loads into the non-sync model (e.g. for export). A layer registered under several names becomes
    one synchronised layer under all of them.
    """
    _check_synchronisable(model)
    return _synchronised(model, process_group, {}, "")


def _check_synchronisable(model: nn.Module) -> None:
    """Refuse, before anything changes, a layer that a plain :class:`SyncBatchKalmanNorm` would not reproduce: a
    subclass with its own forward (``BatchKalmanNormAct*d``: the activation would be dropped) or a layer with a
    ``torch.nn.utils.parametrize`` parametrization (γ would revert to the raw tensor)."""
    from torch.nn.utils import parametrize

    from bkn_export.nn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d

    plain = (BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d)
    for name, module in model.named_modules():
        if not isinstance(module, _BatchKalmanNorm) or isinstance(module, SyncBatchKalmanNorm):
            continue
        where = f"'{name}'" if name else "the model"
        if parametrize.is_parametrized(module):
            raise DistributedError(
                f"convert_sync_batchkalmannorm: {where} has parametrized tensors "
                f"({', '.join(getattr(module, 'parametrizations', {}))}), which the synchronised layer would not "
                "keep; remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) first"
            )
        if type(module) not in plain:
            raise DistributedError(
                f"convert_sync_batchkalmannorm: {where} is a {type(module).__name__}, which a SyncBatchKalmanNorm "
                "would not reproduce (its own forward, e.g. a fused activation, would be dropped); build the "
                "model with SyncBatchNorm(Act) layers and convert it with convert_batchnorm instead"
            )


def _synchronised(model: nn.Module, process_group: Any, done: dict[int, nn.Module], name: str) -> nn.Module:
    """:func:`convert_sync_batchkalmannorm` of ``model`` (named ``name`` in the root) with ``done``: id of each module
    visited → what replaces it. A replaced layer's forward hooks move to its replacement (as ``convert_batchnorm``
    moves a BatchNorm's): a review of 2026-12-07 found them dropped, which the chain then reported as removed."""
    if id(model) in done:
        return done[id(model)]
    if isinstance(model, _BatchKalmanNorm) and not isinstance(model, SyncBatchKalmanNorm):
        done[id(model)] = synchronised_layer(model, process_group)
        take_over_hooks(model, done[id(model)], name)
        return done[id(model)]
    done[id(model)] = model
    for child_name, child in list(model._modules.items()):  # every name: named_children() lists a child once
        if child is None:
            continue
        converted = _synchronised(child, process_group, done, f"{name}.{child_name}" if name else child_name)
        if converted is not child:
            setattr(model, child_name, converted)
    return model
