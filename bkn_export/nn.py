"""``BatchKalmanNorm1d/2d/3d``: drop-in replacements for ``nn.BatchNorm1d/2d/3d``.

A module owns state (γ, β, running statistics, and once wired into a Kalman chain with
a predecessor, its gain, process noise and, for ``transition="learned"``, its transition
matrix); the math lives in :mod:`bkn_export.functional` and the train-mode step runs
through the custom op ``torch.ops.bkn.batch_kalman_norm``.

The chain is not this module's business: :func:`bkn_export.wire_chain` (or
:func:`bkn_export.convert_batchnorm`) gives a layer a :class:`ChainMember` — its wiring
value and transition, from :mod:`bkn_export.chain` — and the layer asks it for a prior
and hands it its posterior. The posterior travels as tensors in a scratch that exists
only during one forward of the model that was wired (the *root*): no module attribute
holds a posterior between calls.

A layer with no predecessor — never wired, first in its chain, or **called on its own
outside a forward of its root** — is exactly ``nn.BatchNorm*d`` (prior weight 0) and
owns no BKN parameters. An unwired layer (no chain: nothing reads its posterior) trains
through ATen's BatchNorm itself in plain eager CPU execution where that is exact
(:meth:`_BatchKalmanNorm._is_plain_batchnorm`); traced, it still emits the BKN op.

Batch size 1 in train mode (n = 1 element per channel, e.g. (1, C) input), where
``nn.BatchNorm1d`` raises: the batch variance S is 0. A layer with a predecessor still
has a variance, p Σ_{k|k-1} + p q (x̄ - μ_{k|k-1})² > 0, supplied by the prior, so it
normalizes meaningfully; this is the micro-batch case BKN exists for. A layer without a
predecessor (unwired or first in its chain) has no prior and raises BatchNorm's
``ValueError`` (as a :class:`~bkn_export.errors.BKNInputError`): its output would be y = β
whatever the input and its running variance would decay toward 0. The running variance
takes the posterior variance unscaled at n = 1 (the unbiased factor n/(n-1) is undefined).

An empty input (batch 0, or a spatial size 0) is accepted as ``nn.BatchNorm*d`` accepts
it, in train and eval mode: the output is empty, running statistics keep their values,
``num_batches_tracked`` counts the call, and nothing is published to the chain.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import cpu_kernels, extra_state, fast_prior, per_channel, recompute, triton_step
from bkn_export import functional as Fk
from bkn_export.errors import BKNInputError, ChainWiringError, KalmanOptionsError, UnsupportedTransformError
from bkn_export.ops import channel_constant, kalman_norm_step, plain_eager_cpu  # also registers torch.ops.bkn.*
from bkn_export.tracing import nothing_traces

__all__ = [
    "BKN_PARAMETERS",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ChainMember",
    "KalmanOptions",
    "Prior",
    "PriorSource",
    "Residual",
    "Transition",
]

Transition = Literal["propagate", "sampled", "learned", "identity"]
TRANSITIONS: tuple[str, ...] = ("propagate", "sampled", "learned", "identity")
PriorSourceKind = Literal["input", "output"]
PRIOR_SOURCES: tuple[str, ...] = ("input", "output")
Residual = Literal["sum", "branch"]
RESIDUALS: tuple[str, ...] = ("sum", "branch")
#: The parameters a wired layer with a predecessor may own beyond γ, β (the one list of them).
BKN_PARAMETERS: tuple[str, ...] = ("prior_weight_logit", "process_noise_raw", "transition_matrix")

#: Process noise R_k = softplus(raw); raw = -7 starts R_k near 1e-3.
_INITIAL_PROCESS_NOISE_RAW = -7.0


@dataclass(frozen=True)
class KalmanOptions:
    """BKN options of a layer (shared by a whole converted model by default).

    transition: how the sources' posteriors are carried to this layer
        (:mod:`bkn_export.chain.transitions`): ``propagate`` (analytic, default),
        ``sampled`` (the authors' Monte Carlo), ``learned`` (a free matrix A_k),
        ``identity``.
    prior_weight: a fixed weight p on the prior (the authors use 0.9), or None for a
        learned per-channel gain p = PRIOR_WEIGHT_LIMIT · sigmoid(θ).
    initial_prior_weight: starting p of the learned gain.
    process_noise: learn a per-channel R_k ≥ 0 added to the predicted variance.
    fallback_ratio: the authors' rule; use batch statistics alone when
        mean(Σ_{k|k-1} / S_k) ≥ fallback_ratio (0 disables it; the authors use 100).
    prior_source: which Gaussian of a source normalization enters the path to this
        layer. ``"output"`` (default, normalization-aware): the moments of the source's
        normalized output γ(x − μ_{j|j})/sqrt(Σ_{j|j} + ε) + β for x ~ N(μ_{j|j}, Σ_{j|j})
        (:func:`bkn_export.moments.normalized_output_moments`). ``"input"`` (the authors'):
        the source's posterior of its *input* statistics N(μ_{j|j}, Σ_{j|j}), skipping its
        γ, β. The default was chosen by measurement (benchmarks/RESULTS.md, "Kalman prior:
        convention and accuracy"): on real networks the "input" prior misses the next
        layer's input statistics by orders of magnitude, compounding along the chain.
    residual: the prediction of a layer fed by a residual sum ``s + f(x)``. ``"sum"``
        (default, the authors' ``m + m3, v + v3``): the addends' predictions add, means
        and variances (independent addends), an addend with fewer channels zero-padded.
        ``"branch"``: only the addend whose source normalization ran last (the residual
        branch) is used, as if the shortcut added nothing.
    """

    transition: Transition = "propagate"
    prior_weight: float | None = None
    initial_prior_weight: float = 0.5
    process_noise: bool = True
    fallback_ratio: float = 0.0
    prior_source: PriorSourceKind = "output"
    residual: Residual = "sum"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("transition", TRANSITIONS),
            ("prior_source", PRIOR_SOURCES),
            ("residual", RESIDUALS),
        ):
            if getattr(self, name) not in allowed:
                raise KalmanOptionsError(f"BKN option {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("prior_weight", "initial_prior_weight"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise KalmanOptionsError(
                    f"BKN option {name} must be in [0, 1) (the weight on the prior; 1 would ignore the batch), "
                    f"got {value}"
                )
        if not self.fallback_ratio >= 0:
            raise KalmanOptionsError(
                f"BKN option fallback_ratio must be >= 0 (0 disables it), got {self.fallback_ratio}"
            )

    @classmethod
    def authors(cls) -> KalmanOptions:
        """The settings of the authors' CIFAR micro-batch run (tensorpack code)."""
        return cls(
            transition="sampled",
            prior_weight=0.9,
            process_noise=False,
            fallback_ratio=100.0,
            prior_source="input",
            residual="sum",
        )


class PriorSource(NamedTuple):
    """One Gaussian a transition pushes into a layer's prior (what ``chain_statistics`` shows).

    name: the source normalization's module name; mean, variance: (C_j,) the Gaussian
    entering the path (per ``KalmanOptions.prior_source``); shape: (N, C_j, *) at which
    it enters the path (the source's input shape).
    """

    name: str
    mean: Tensor
    variance: Tensor
    shape: tuple[int, ...]


class Prior(NamedTuple):
    """A layer's prediction μ_{k|k-1}, Σ_{k|k-1}: (C,) each, before process noise.

    known: (C,) 1 where the prediction is defined and 0 on channels with no source (a
    concatenation part with no normalization upstream: those channels take batch
    statistics alone, p = 0), or None where every channel is known. sources: the
    Gaussians that were pushed (for :func:`bkn_export.chain_statistics`).
    """

    mean: Tensor
    variance: Tensor
    known: Tensor | None
    sources: tuple[PriorSource, ...]


class ChainMember(Protocol):
    """What a layer needs from the chain it is wired into (built by :mod:`bkn_export.chain`).

    ``has_predecessor``: whether the layer blends a prior (owns BKN parameters).
    ``transition``: the transition kind, or None for a first-in-chain layer.
    ``prior(layer, x)``: the prior for this call, or None when there is none (first in
    chain, or the layer runs outside a forward of its root).
    ``publish(layer, x, op_prior, posterior_mean, posterior_variance, count, affine)``: hand the
    posterior on; op_prior is (μ_{k|k-1}, Σ_{k|k-1} + R_k, p_k) as the op received them (None where the op's
    kernels assembled the prior: only where ``observed`` is False); affine: the (γ, β) the next layers read, where
    not the layer's own parameters (:mod:`bkn_export.triton_step` returns them as outputs of its node).
    ``observed``: whether an observer records this call's steps.
    ``wiring_state()`` / ``load_state(state, label)``: the wiring saved in / checked
    against the versioned extra state.
    ``name``: the layer's qualified name in its root model.
    """

    @property
    def name(self) -> str: ...

    @property
    def has_predecessor(self) -> bool: ...

    @property
    def transition(self) -> str | None: ...

    @property
    def observed(self) -> bool: ...

    def prior(self, layer: _BatchKalmanNorm, x: Tensor) -> Prior | None: ...

    def publish(
        self,
        layer: _BatchKalmanNorm,
        x: Tensor,
        op_prior: tuple[Tensor, Tensor, Tensor] | None,
        posterior_mean: Tensor,
        posterior_variance: Tensor,
        count: Any,
        affine: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> None: ...

    def wiring_state(self) -> dict[str, Any] | None: ...

    def load_state(self, state: Any, label: str) -> None: ...


#: The extra-state format version this module writes (1: the execution-order link of
#: bkn_export ≤ 0.1; 2: data-flow sources and steps).
EXTRA_STATE_VERSION = 2


class _BatchKalmanNorm(nn.Module):
    """Shared implementation of BatchKalmanNorm{1,2,3}d.

    Args (as ``nn.BatchNorm*d``): num_features C, eps, momentum (None = cumulative
    average), affine, track_running_stats; plus the BKN options of
    :class:`KalmanOptions` as keywords. Input (N, C, *) per subclass.
    """

    _version = 2
    _expected_ranks: tuple[int, ...] = ()
    # Registered parameters and buffers (None when disabled), declared for type checkers.
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    transition_matrix: Tensor  # only on layers wired with transition="learned"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        transition: Transition = "propagate",
        prior_weight: float | None = None,
        initial_prior_weight: float = 0.5,
        process_noise: bool = True,
        fallback_ratio: float = 0.0,
        prior_source: PriorSourceKind = "output",
        residual: Residual = "sum",
    ) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.options = KalmanOptions(
            transition, prior_weight, initial_prior_weight, process_noise, fallback_ratio, prior_source, residual
        )
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))  # type: ignore[arg-type]
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))  # type: ignore[arg-type]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))  # type: ignore[arg-type]
            self.register_buffer("running_var", torch.ones(num_features, **factory))  # type: ignore[arg-type]
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        #: The chain this layer is wired into (set by bkn_export.wire_chain); None: BatchNorm.
        self.chain: ChainMember | None = None

    # ------------------------------------------------------------------ wiring

    @property
    def has_predecessor(self) -> bool:
        return self.chain is not None and self.chain.has_predecessor

    def join_chain(self, member: ChainMember | None, previous_features: int = 0) -> None:
        """Attach ``member`` (None: leave any chain) and own exactly the BKN parameters it needs.

        previous_features: C_{k-1}, the columns of the transition matrix of a
        ``learned`` transition (ignored otherwise). Earlier BKN parameters are dropped. The new ones
        require grad as γ does (a layer whose γ is frozen gets frozen BKN parameters: freezing a
        backbone before converting it keeps all of it frozen); True without γ.
        """
        self.chain = member
        for name in BKN_PARAMETERS:
            self._parameters.pop(name, None)
        if member is None or not member.has_predecessor:
            return
        ref = self.weight if self.weight is not None else self.running_mean
        factory: dict[str, Any] = {"device": ref.device if ref is not None else None, "dtype": torch.float32}
        if ref is not None and ref.dtype.is_floating_point:
            factory["dtype"] = ref.dtype
        trainable = self.weight is None or self.weight.requires_grad
        c = self.num_features
        if self.options.prior_weight is None:
            self.prior_weight_logit = nn.Parameter(torch.empty((c,), **factory), requires_grad=trainable)
        if self.options.process_noise:
            self.process_noise_raw = nn.Parameter(torch.empty((c,), **factory), requires_grad=trainable)
        if member.transition == "learned":
            if previous_features <= 0:
                raise ChainWiringError(f"{self._label()}: a learned transition needs previous_features > 0")
            self.transition_matrix = nn.Parameter(
                torch.empty((c, previous_features), **factory), requires_grad=trainable
            )
        self._reset_bkn_parameters()

    def reset_parameters(self) -> None:
        """``nn.BatchNorm``'s: running statistics reset, γ = 1, β = 0; and the BKN parameters back to their initial
        values (:meth:`join_chain`'s): p = ``initial_prior_weight``, R = softplus of its initial raw value, a
        learned transition matrix the identity (C_k = C_{k-1}) or the average of the previous layer's channels. For
        re-initialisation loops and meta-device initialisation (``to_empty`` then ``reset_parameters``)."""
        self.reset_running_stats()
        if self.weight is not None and self.bias is not None:
            with torch.no_grad():
                self.weight.fill_(1.0)
                self.bias.zero_()
        self._reset_bkn_parameters()

    @torch.no_grad()
    def _reset_bkn_parameters(self) -> None:
        logit = self._parameters.get("prior_weight_logit")
        if logit is not None:
            p0 = self.options.initial_prior_weight / Fk.PRIOR_WEIGHT_LIMIT
            logit.fill_(math.log(p0 / (1.0 - p0)) if p0 > 0 else -20.0)
        raw = self._parameters.get("process_noise_raw")
        if raw is not None:
            raw.fill_(_INITIAL_PROCESS_NOISE_RAW)
        matrix = self._parameters.get("transition_matrix")
        if matrix is not None:
            rows, columns = matrix.shape
            if rows == columns:
                matrix.copy_(torch.eye(rows, dtype=matrix.dtype, device=matrix.device))
            else:
                matrix.fill_(1.0 / columns)

    def prior_weight(self) -> Tensor:
        """p_k: (C,) in [0, PRIOR_WEIGHT_LIMIT)."""
        logit = self._parameters.get("prior_weight_logit")
        if logit is not None:
            return Fk.PRIOR_WEIGHT_LIMIT * torch.sigmoid(logit)
        value = self.options.prior_weight if self.has_predecessor else 0.0
        return torch.full((self.num_features,), float(value or 0.0), device=self._device())

    def process_noise(self) -> Tensor | None:
        """R_k: (C,) ≥ 0 or None."""
        raw = self._parameters.get("process_noise_raw")
        return F.softplus(raw) if raw is not None else None

    def _device(self) -> torch.device:
        for t in (self.weight, self.running_mean):
            if t is not None:
                return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ forward

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script calls this first: refuse by name (the layer's step and chain have no TorchScript form)."""
        raise UnsupportedTransformError(
            f"{self._label()}: BKN layers cannot be compiled with torch.jit.script. Use torch.jit.trace (train or eval "
            "mode), torch.export or torch.compile, or export to ONNX (bkn_export.export.export_onnx)."
        )

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._expected_ranks:
            raise BKNInputError(
                f"{self._label()}: expected a {' or '.join(f'{r}D' for r in self._expected_ranks)} input "
                f"(N, C{', *' if max(self._expected_ranks) > 2 else ''}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise BKNInputError(
                f"{self._label()}: expected {self.num_features} channels in dim 1, got shape {tuple(x.shape)}"
            )

    def _label(self) -> str:
        name = getattr(self.chain, "name", "") or "<unwired>"
        return f"{type(self).__name__} '{name}'"

    def _momentum(self) -> float | Tensor:
        """α: the momentum, or 1 / num_batches_tracked (a 0-dim tensor: no host read) for None."""
        if self.momentum is not None:
            return self.momentum
        assert self.num_batches_tracked is not None and self.running_mean is not None
        return self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            raise UnsupportedTransformError(
                f"{self._label()}: torch.fx.symbolic_trace cannot trace into a BKN layer (its forward branches on "
                "the input and on the chain's state). Use torch.export.export, torch.jit.trace or "
                "bkn_export.export.export_onnx; for an fx graph, trace with the BKN layers as leaf modules (a "
                "torch.fx.Tracer whose is_leaf_module returns True for them) and wire the GraphModule with "
                "bkn_export.wire_chain, then load the state dict again."
            )
        tracing = torch.jit.is_tracing()  # which records sizes as tensors: checks on them would be TracerWarnings
        if not tracing:
            self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not tracing and x.numel() == 0:
            return self._empty(x, use_batch)
        if not use_batch:
            assert self.running_mean is not None and self.running_var is not None
            y = Fk.kalman_norm_inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
            if self.chain is not None and recompute.replaying() is None:
                self._publish_running_statistics(x)
            return y
        return self._batch_step(x)

    def _publish_running_statistics(self, x: Tensor) -> None:
        """An eval-mode layer (frozen, as in fine-tuning with BatchNorm frozen) normalizes with its running statistics:
        they are its estimate of its input's statistics, handed on as its posterior to the layers it feeds (which
        may train). Without it they would have no prior and run as BatchNorm."""
        assert self.chain is not None and self.running_mean is not None and self.running_var is not None
        acc = Fk.statistics_dtype(x.dtype)
        mean, variance = _cast(self.running_mean, acc), _cast(self.running_var, acc)
        self.chain.publish(self, x, None, mean.detach(), variance.detach(), x.numel() // x.shape[1])

    def _batch_step(self, x: Tensor) -> Tensor:
        """Prior, Kalman step, running statistics, publish: the train-mode forward of x (N, C, *)."""
        if nothing_traces() and torch._C._are_functorch_transforms_active():
            raise UnsupportedTransformError(
                f"{self._label()}: the train-mode step of a BKN layer does not run under torch.func transforms "
                "(grad, vmap, jacrev...): its autograd Functions and kernels have no functorch rules. Eval mode "
                "works; in train mode use torch.autograd (create_graph=True is supported for higher-order "
                "gradients); torch.func.functional_call alone, outside a transform, works."
            )
        self._check_batch_step(x)
        if self.chain is None and self._is_plain_batchnorm(x):
            return self._batchnorm_step(x)
        node = self._triton_step(x)
        affine: tuple[Tensor | None, Tensor | None] | None = None
        if node is not None:
            y, posterior_mean, posterior_variance, op_prior, affine = node
            count = x.numel() // x.shape[1]
        else:
            op_prior = self._prior(x)
            y, posterior_mean, posterior_variance, count = self._kalman_step(x, *op_prior)
        if recompute.replaying() is not None:  # bkn_export.checkpoint recomputing: state stays as the forward left it
            return y
        if self.training and self.track_running_stats:
            self._update_running_statistics(posterior_mean, posterior_variance, count)
        if self.chain is not None:
            self.chain.publish(self, x, op_prior, posterior_mean, posterior_variance, count, affine)
        return y

    def _check_batch_step(self, x: Tensor) -> None:
        """BatchNorm's refusals of a batch-statistics step, where BKN's step would be silently degenerate.

        ε ≤ 0 (or NaN): a constant channel (S = 0) divides by sqrt(ε) = 0, and the NaN reaches the gradients and the
        running statistics of the layers after it. One value per channel (n = 1, e.g. a (1, C) input) in a layer with
        no predecessor: without a prior its variance is S = 0, so its output is β whatever the input, γ gets no
        gradient, the layers it feeds see a constant, and its running variance decays toward 0 (eval outputs grow
        without bound); ``nn.BatchNorm*d`` raises there, and so does this layer (a layer with a predecessor takes
        its variance from the prior and accepts n = 1; a layer whose statistics span more than x, a
        ``SyncBatchKalmanNorm``, counts its group's values) unless its fallback rule is on: at n = 1 the rule
        (mean Σ_pred / S ≥ ratio) always fires, since S = 0, and the layer is BatchNorm on one value again.
        Checked in eager calls and under torch.compile (Dynamo guards on the sizes, as it does for BatchNorm's own
        check); not under ``torch.jit.trace`` (which records sizes as tensors) or an export (whose batch axis is
        symbolic)."""
        if not self.eps > 0:
            raise BKNInputError(
                f"{self._label()}: eps must be positive for batch statistics, got {self.eps} (a channel of equal "
                "values would be divided by sqrt(eps) = 0); nn.BatchNorm refuses it too"
            )
        one_value = x.numel() == x.shape[1]  # cheap first: the other conditions are read only at n = 1
        # (a SyncBatchKalmanNorm replaces _kalman_step: its statistics span its process group)
        if not one_value or self._kalman_step_replaced or not _checks_sizes():
            return
        if self.has_predecessor and self.options.fallback_ratio > 0:
            raise BKNInputError(
                f"Expected more than 1 value per channel when training with the fallback rule, got input size "
                f"{tuple(x.shape)} ({self._label()} has fallback_ratio={self.options.fallback_ratio}: with one value "
                "per channel the batch variance is 0, so the rule always fires and the layer drops its prior; its "
                "output would be its bias whatever the input). Train batch 1 with fallback_ratio=0, or a larger batch"
            )
        if not self.has_predecessor:
            raise BKNInputError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                f"({self._label()} has no predecessor in its chain, so no Kalman prior: with one value per channel its "
                "batch variance is 0 and its output would be its bias whatever the input, as nn.BatchNorm refuses "
                "too; a layer that a wired predecessor feeds accepts batch 1)"
            )

    def _triton_step(self, x: Tensor) -> _NodeStep | None:
        """The step as :mod:`bkn_export.triton_step`'s one node (eager, the op's Triton route): (y, μ_{k|k},
        Σ_{k|k}, the prior the op received or None where its kernels assembled it, the node's (γ, β) to publish);
        None elsewhere, and where :attr:`_kalman_step_replaced` (the layer then takes :meth:`_prior` and
        :meth:`_kalman_step`, its subclass's extension points)."""
        if self._kalman_step_replaced or not triton_step.applies(x):
            return None
        prior = self.chain.prior(self, x) if self.chain is not None else None
        acc = Fk.statistics_dtype(x.dtype)
        ratio = self.options.fallback_ratio
        assembly = self._kernel_assembly(prior, acc)
        op_prior: tuple[Tensor, Tensor, Tensor] | None = None
        if assembly is not None:
            assert prior is not None
            mean, variance = _cast(prior.mean, acc), _cast(prior.variance, acc)
            step = triton_step.kalman_norm_step(
                x, mean, variance, None, assembly, self.weight, self.bias, self.eps, ratio
            )
        else:
            op_prior = self._assembled(prior, x)
            step = triton_step.kalman_norm_step(x, *op_prior, None, self.weight, self.bias, self.eps, ratio)
        y, posterior_mean, posterior_variance, weight, bias = step
        return y, posterior_mean, posterior_variance, op_prior, (weight, bias)

    def _kernel_assembly(self, prior: Prior | None, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """(r, l, k) in the statistics dtype for the op's kernels to assemble the prior (:mod:`bkn_export.triton_step`);
        None where the layer assembles it itself (:meth:`_assembled`): no prior, a fixed gain or no process noise, a
        subclass's or this instance's own ``process_noise`` / ``prior_weight``, the fallback rule (it reads every
        channel's assembled Σ_pred first), a known-channel mask with a gradient, or an observer (it records the
        prior the op received)."""
        raw, logit = self._parameters.get("process_noise_raw"), self._parameters.get("prior_weight_logit")
        if prior is None or raw is None or logit is None or not self._assembles_prior_fused:
            return None
        if self.options.fallback_ratio > 0 or (prior.known is not None and prior.known.requires_grad):
            return None
        if self.chain is not None and self.chain.observed:
            return None
        return _cast(raw, acc), _cast(logit, acc), None if prior.known is None else _cast(prior.known, acc)

    def _is_plain_batchnorm(self, x: Tensor) -> bool:
        """Whether this step of an unwired layer (p = 0, its posterior read by nothing but the
        running statistics) may run as ATen's train-mode BatchNorm: what the Kalman step computes
        then, in one op instead of the BKN op plus the running-statistics update.

        Only in plain eager CPU execution (traced, the layer keeps emitting
        ``bkn::batch_kalman_norm``), with this class's own ``_kalman_step`` (a
        :class:`~bkn_export.distributed.SyncBatchKalmanNorm`'s statistics span its group), a float
        momentum (``momentum=None`` would need num_batches_tracked on the host), n > 1 values per
        channel (BatchNorm refuses n = 1) and float32/float64 tensors of one dtype; not on inputs where
        the op's own CPU fast path is the faster one (:func:`cpu_kernels.op_outruns_batchnorm`).
        """
        if self._kalman_step_replaced or self.momentum is None:
            return False
        if not plain_eager_cpu(x) or x.numel() <= x.shape[1] or cpu_kernels.op_outruns_batchnorm(x):
            return False
        return cpu_kernels.fast_path_applies(x, self.weight, self.bias, self.running_mean, self.running_var)

    def _batchnorm_step(self, x: Tensor) -> Tensor:
        """The train-mode step of an unwired layer as ``F.batch_norm(training=True)`` (see
        :meth:`_is_plain_batchnorm`): y = γ (x - x̄) / sqrt(S + ε) + β, and with running
        statistics r_μ ← (1-α) r_μ + α x̄, r_Σ ← (1-α) r_Σ + α n/(n-1) S, which is the Kalman
        step and :func:`~bkn_export.functional.update_running_statistics_` at p = 0 (posterior
        = batch statistics)."""
        update = self.training and self.track_running_stats
        running_mean, running_var = (self.running_mean, self.running_var) if update else (None, None)
        if update and recompute.replaying() is not None:
            # bkn_export.checkpoint's recomputation: the same op (the same tensors saved), its update into copies.
            assert running_mean is not None and running_var is not None
            running_mean, running_var = running_mean.clone(), running_var.clone()
        elif update:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        assert momentum is not None  # _is_plain_batchnorm checked it
        weight = Fk.contiguous_weight(self.weight)
        return F.batch_norm(x, running_mean, running_var, weight, self.bias, True, momentum, self.eps)

    def _empty(self, x: Tensor, use_batch: bool) -> Tensor:
        """BatchNorm on an empty input: an empty output (γ, β in its graph), statistics untouched."""
        if use_batch and self.training and self.num_batches_tracked is not None and recompute.replaying() is None:
            self.num_batches_tracked.add_(1)
        acc = Fk.statistics_dtype(x.dtype)
        mean = self.running_mean if self.running_mean is not None else x.new_zeros((self.num_features,), dtype=acc)
        var = self.running_var if self.running_var is not None else x.new_ones((self.num_features,), dtype=acc)
        return Fk.kalman_norm_inference(x, mean, var, self.weight, self.bias, self.eps)

    def _prior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(μ_{k|k-1}, Σ_{k|k-1} + R_k, p_k), all (C,); p = 0 (BatchNorm) without a prior in this call."""
        return self._assembled(self.chain.prior(self, x) if self.chain is not None else None, x)

    def _assembled(self, prior: Prior | None, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_prior` of the chain's ``prior`` for this call."""
        acc = Fk.statistics_dtype(x.dtype)
        if prior is None:  # cached read-only constants in eager (no fill kernels per step on CUDA)
            zeros = channel_constant(x, 0.0)
            return zeros, channel_constant(x, 1.0), zeros
        variance = _cast(prior.variance, acc)
        if self._assembles_prior_fused:
            raw, logit = self._parameters.get("process_noise_raw"), self._parameters.get("prior_weight_logit")
            if raw is not None and logit is not None:
                known = None if prior.known is None else _cast(prior.known, acc)
                fused = fast_prior.assembled_prior(variance, _cast(raw, acc), _cast(logit, acc), known)
                if fused is not None:
                    return _cast(prior.mean, acc), *fused
        noise = self.process_noise()
        if noise is not None:
            variance = variance + _cast(noise, acc)
        weight = _cast(self.prior_weight(), acc)
        if prior.known is not None:
            weight = weight * _cast(prior.known, acc)
        return _cast(prior.mean, acc), variance, weight

    @property
    def _kalman_step_replaced(self) -> bool:
        """Whether a subclass or the instance itself replaces :meth:`_kalman_step` (a
        :class:`~bkn_export.distributed.SyncBatchKalmanNorm`'s statistics span its group): then no fused route
        (ATen's BatchNorm, :mod:`bkn_export.triton_step`) may take the step in its place."""
        return type(self)._kalman_step is not _KALMAN_STEP or "_kalman_step" in self.__dict__

    @property
    def _assembles_prior_fused(self) -> bool:
        """Whether :meth:`_prior` may add R and form p in one fused node (:mod:`bkn_export.fast_prior`):
        not where a subclass or the instance itself (``conversion_guard.prior_off``) replaces
        :meth:`process_noise` or :meth:`prior_weight`."""
        own = self.__dict__
        return (
            (type(self).process_noise, type(self).prior_weight) == _PRIOR_PARTS
            and "prior_weight" not in own
            and "process_noise" not in own
        )

    def _kalman_step(
        self, x: Tensor, prior_mean: Tensor, prior_variance: Tensor, prior_weight: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Batch statistics, Kalman update, normalize: (y, μ_{k|k}, Σ_{k|k}, n).

        n is the element count per channel the batch statistics span (here x's own).
        The extension point for layers whose statistics span more than ``x``
        (:class:`bkn_export.distributed.SyncBatchKalmanNorm`).
        """
        y, posterior_mean, posterior_variance = kalman_norm_step(
            x, prior_mean, prior_variance, prior_weight, self.weight, self.bias, self.eps, self.options.fallback_ratio
        )
        return y, posterior_mean, posterior_variance, x.numel() // x.shape[1]

    def _update_running_statistics(self, posterior_mean: Tensor, posterior_variance: Tensor, count: int) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        counts_first = self.momentum is None  # the cumulative average reads the counter; else the Triton update counts
        if counts_first:
            self.num_batches_tracked.add_(1)
        if per_channel.update_running_statistics_(  # one Triton launch on CUDA (counting the batch too)
            self.running_mean,
            self.running_var,
            posterior_mean,
            posterior_variance,
            self.momentum,
            count,
            self.num_batches_tracked,
            count_batch=not counts_first,
        ):
            return
        if not counts_first:
            self.num_batches_tracked.add_(1)
        # The posterior is detached inside, so no gradient reaches the buffers.
        Fk.update_running_statistics_(
            self.running_mean, self.running_var, posterior_mean, posterior_variance, self._momentum(), count
        )

    # ------------------------------------------------------------------ state

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """``nn.Module``'s, except that a layer without a predecessor (unwired, or first in its chain: BatchNorm)
        does not miss its wiring entry: a BatchNorm state dict is all such a layer needs, as for the drop-in
        ``BatchKalmanNorm2d(C).load_state_dict(nn.BatchNorm2d(C).state_dict())``.

        A load that finds none of this layer's BKN parameters in the checkpoint but its BatchNorm entries, and
        misses nothing else (a checkpoint of the model before conversion, also one saved before PyTorch 0.4.1,
        without ``num_batches_tracked``) warns, pointing to ``bkn_export.load_batchnorm_state_dict``; PyTorch's
        strict load then fails as before, a non-strict one loads as before."""
        already_missing = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + _EXTRA_STATE_KEY
        if key in missing_keys and not self.has_predecessor:
            missing_keys.remove(key)
        own_bkn = [name for name in BKN_PARAMETERS if getattr(self, name, None) is not None]
        own_missing = [k[len(prefix) :] for k in missing_keys[already_missing:]]
        if (
            own_bkn
            and not any(prefix + name in state_dict for name in own_bkn)
            and all(prefix + name in state_dict for name in ("running_mean", "running_var") if hasattr(self, name))
            and all(name in (*own_bkn, _EXTRA_STATE_KEY, "num_batches_tracked") for name in own_missing)
        ):
            warnings.warn(_BATCHNORM_CHECKPOINT_WARNING, BatchNormCheckpointWarning, stacklevel=3)

    def get_extra_state(self) -> Tensor:
        """The versioned wiring, saved with the state so a checkpoint records its chain: ``{"version": 2, "wiring":
        {...} | None, "options": {...}}`` (None: unwired), as a uint8 tensor of its JSON
        (:mod:`bkn_export.extra_state`: every value of the state dict a tensor). A fresh tensor per call."""
        cached = self.__dict__.get("_encoded_extra_state")
        if cached is None or cached[0] is not self.chain or cached[1] is not self.options:
            wiring = self.chain.wiring_state() if self.chain is not None else None
            state = {"version": EXTRA_STATE_VERSION, "wiring": wiring, "options": _options_state(self.options)}
            cached = (self.chain, self.options, extra_state.encode(state))
            self.__dict__["_encoded_extra_state"] = cached
        return cached[2].clone()

    def set_extra_state(self, state: Any) -> None:
        """Check a checkpoint's wiring against this layer's; raises ChainWiringError on a difference. Options that
        change the layer's computation without a tensor of their own (:data:`_COMPUTING_OPTIONS`: a fixed prior
        weight, the fallback rule, the transition, the prior's source, residual mode) that differ from this
        layer's are warned about: the layer keeps its own, so it does not compute what the saved one did."""
        self._warn_about_saved_options(self.check_saved_state(state))

    def check_saved_state(self, state: Any) -> Any:
        """The decoded extra state of a checkpoint (:meth:`get_extra_state`'s form) if its wiring is this layer's;
        raises ChainWiringError otherwise. Loads nothing (a wired root checks every layer's first:
        :mod:`bkn_export.chain.scope`)."""
        try:
            state = extra_state.decode(state)
        except ValueError as error:
            raise ChainWiringError(f"{self._label()}: {error}") from None
        if self.chain is not None:
            self.chain.load_state(state, self._label())
        elif _saved_has_predecessor(state):
            raise ChainWiringError(
                f"{self._label()}: the checkpoint was saved from a layer wired into a Kalman chain, but this "
                "layer is not wired. Build the model the same way and call "
                "bkn_export.convert_batchnorm(model, example_inputs, ...) (or wire_chain) with the same options "
                "before load_state_dict."
            )
        return state

    def _warn_about_saved_options(self, state: Any) -> None:
        saved = state.get("options") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or not self.has_predecessor:  # first in its chain: BatchNorm whatever they say
            return
        own = json.loads(json.dumps(_options_state(self.options)))  # as saved: JSON values
        differences = [
            f"{name}={saved[name]!r} (this layer: {own[name]!r})"
            for name in _COMPUTING_OPTIONS
            if name in saved and name in own and saved[name] != own[name]
        ]
        if differences:
            warnings.warn(
                f"{self._label()}: the checkpoint was saved with {', '.join(differences)}; the layer keeps its own "
                "options, so it does not compute what the saved layer did. Convert the model with the checkpoint's "
                "options (bkn_export.convert_batchnorm(model, example_inputs, ...)) to reproduce it.",
                UserWarning,
                stacklevel=4,
            )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.chain is not None and self.chain.transition is not None:
            text += f", transition={self.chain.transition!r}"
        return text


#: :meth:`_BatchKalmanNorm._triton_step`'s result: y, μ_{k|k}, Σ_{k|k}, the prior the op received (None: its kernels
#: assembled it), the node's (γ, β) to publish.
_NodeStep = tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None, tuple[Tensor | None, Tensor | None]]


#: The state-dict key suffix of a module's extra state (``torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX``).
_EXTRA_STATE_KEY = "_extra_state"


class BatchNormCheckpointWarning(UserWarning):
    """A BatchNorm checkpoint loaded with ``load_state_dict`` into a converted model (callers that already say so
    filter this category)."""


#: Warned (once per call site, Python's default) where a layer finds none of its BKN parameters in a checkpoint.
_BATCHNORM_CHECKPOINT_WARNING = (
    "a BatchNorm checkpoint (the model's state before conversion?) is loaded into a converted model: its "
    "BatchKalmanNorm layers find none of their BKN parameters in it, and those keep their initial values; "
    "bkn_export.load_batchnorm_state_dict(model, state_dict) loads such a checkpoint, checking every other key"
)


def _checks_sizes() -> bool:
    """Whether size checks run in this call: eager, or traced by torch.compile (not jit trace, not an export)."""
    if torch.jit.is_tracing():
        return False
    # The flag itself, not torch.compiler.is_exporting(): torch 2.11's Dynamo folds that call to True in every
    # torch.compile trace (2.13 reads the flag), which skipped the checks under torch.compile.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return not (flag if isinstance(flag, bool) else torch.compiler.is_exporting())


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call where it is a no-op (per layer and step, it adds up)."""
    return t if t.dtype == dtype else t.to(dtype)


#: The options that change a layer's computation without a tensor of their own (compared on load; the others, an
#: initial value and whether R is learned, show in the state dict's tensors).
_COMPUTING_OPTIONS = ("transition", "prior_weight", "fallback_ratio", "prior_source", "residual")


def _options_state(options: KalmanOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in KalmanOptions.__dataclass_fields__}


def _saved_has_predecessor(state: Any) -> bool:
    """Whether a saved extra state (version 1 or 2) describes a layer with a predecessor."""
    if not isinstance(state, dict):
        return False
    if state.get("version", 1) == 1:
        return bool((state.get("link") or {}).get("predecessor"))
    wiring = state.get("wiring") or {}
    return wiring.get("transition") is not None


#: The base class's Kalman step; a subclass or patch that replaces it keeps the BKN op path.
_KALMAN_STEP = _BatchKalmanNorm._kalman_step
_PRIOR_PARTS = (_BatchKalmanNorm.process_noise, _BatchKalmanNorm.prior_weight)


class BatchKalmanNorm1d(_BatchKalmanNorm):
    """BKN over (N, C) or (N, C, L) inputs; drop-in for ``nn.BatchNorm1d``."""

    _expected_ranks = (2, 3)


class BatchKalmanNorm2d(_BatchKalmanNorm):
    """BKN over (N, C, H, W) inputs; drop-in for ``nn.BatchNorm2d``."""

    _expected_ranks = (4,)


class BatchKalmanNorm3d(_BatchKalmanNorm):
    """BKN over (N, C, D, H, W) inputs; drop-in for ``nn.BatchNorm3d``."""

    _expected_ranks = (5,)
