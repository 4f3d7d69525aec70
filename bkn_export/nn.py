"""``BatchKalmanNorm1d/2d/3d``: drop-in replacements for ``nn.BatchNorm1d/2d/3d``.

A module owns state (γ, β, running statistics, and once wired into a Kalman chain,
its gain, process noise and transition parameters); the math lives in
:mod:`bkn_export.functional` and the train-mode step runs through the custom op
``torch.ops.bkn.batch_kalman_norm``.

A layer that is not wired into a chain, or is first in its chain, is exactly
BatchNorm (prior weight 0) and owns no BKN parameters. Wiring is done by
:func:`bkn_export.convert_batchnorm` / :func:`bkn_export.wire_chain`, which record the
execution order on example inputs. The posterior of one layer reaches the next as a
tensor within one forward pass, through the chain's per-pass scratch dict, which the
first layer of the chain resets and the last one empties: no module attribute holds a
posterior between calls. (A pass that stops early, by an exception or by running only
part of the model, leaves the scratch filled until the chain's first layer runs again.)

Batch size 1 in train mode (n = 1 element per channel, e.g. (1, C) input), where
``nn.BatchNorm1d`` raises: the batch variance S is 0. A layer with a predecessor still
has a variance, p Σ_{k|k-1} + p q (x̄ - μ_{k|k-1})² > 0, supplied by the prior, so it
normalizes meaningfully; this is the micro-batch case BKN exists for. A first-in-chain
layer has no prior and degenerates to y = β (x - x̄ = 0), as BatchNorm would if it
accepted the input. The running variance takes the posterior variance unscaled at
n = 1 (the unbiased factor n/(n-1) is undefined).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn_export import functional as Fk
from bkn_export.errors import BKNInputError, ChainWiringError, KalmanOptionsError
from bkn_export.ops import kalman_norm_step  # also registers torch.ops.bkn.*

__all__ = [
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ChainLink",
    "KalmanChain",
    "KalmanOptions",
    "Transition",
]

Transition = Literal["propagate", "sampled", "learned", "identity"]
TRANSITIONS: tuple[str, ...] = ("propagate", "sampled", "learned", "identity")

#: Process noise R_k = softplus(raw); raw = -7 starts R_k near 1e-3.
_INITIAL_PROCESS_NOISE_RAW = -7.0


@dataclass(frozen=True)
class KalmanOptions:
    """BKN options of a layer (shared by a whole converted model by default).

    transition: how the previous posterior is carried forward (see functional).
    prior_weight: a fixed weight p on the prior (the authors use 0.9), or None for a
        learned per-channel gain p = PRIOR_WEIGHT_LIMIT · sigmoid(θ).
    initial_prior_weight: starting p of the learned gain.
    process_noise: learn a per-channel R_k ≥ 0 added to the predicted variance.
    fallback_ratio: the authors' rule; use batch statistics alone when
        mean(Σ_{k|k-1} / S_k) ≥ fallback_ratio (0 disables it; the authors use 100).
    """

    transition: Transition = "propagate"
    prior_weight: float | None = None
    initial_prior_weight: float = 0.5
    process_noise: bool = True
    fallback_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.transition not in TRANSITIONS:
            raise KalmanOptionsError(f"BKN option transition must be one of {TRANSITIONS}, got {self.transition!r}")
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
        return cls(transition="sampled", prior_weight=0.9, process_noise=False, fallback_ratio=100.0)


@dataclass
class ChainLink:
    """How one BKN layer is wired (what :func:`describe_chain` reports)."""

    name: str
    predecessor: str | None
    transition: str | None
    feeding_layer: str | None
    rectify: bool
    note: str = ""
    num_previous_features: int = 0


@dataclass
class KalmanChain:
    """The layers of one model's Kalman chain, in execution order, and per-pass scratch.

    ``posteriors`` maps a layer's position to its posterior (mean, variance, input
    shape) during one forward pass only.
    """

    names: list[str]
    posteriors: dict[int, tuple[Tensor, Tensor, torch.Size]] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict[int, Any]) -> KalmanChain:
        return KalmanChain(list(self.names))

    def __getstate__(self) -> dict[str, Any]:
        return {"names": list(self.names)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.names = state["names"]
        self.posteriors = {}


class _BatchKalmanNorm(nn.Module):
    """Shared implementation of BatchKalmanNorm{1,2,3}d.

    Args (as ``nn.BatchNorm*d``): num_features C, eps, momentum (None = cumulative
    average), affine, track_running_stats; plus the BKN options of
    :class:`KalmanOptions` as keywords. Input (N, C, *) per subclass.
    """

    _version = 1
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
        self.options = KalmanOptions(transition, prior_weight, initial_prior_weight, process_noise, fallback_ratio)
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
        # Wiring (set by wire_chain); an unwired layer is BatchNorm.
        self.link = ChainLink(name="", predecessor=None, transition=None, feeding_layer=None, rectify=False)
        self._chain: KalmanChain | None = None
        self._position = -1
        self._predecessor_position = -1
        self._feeding: tuple[nn.Module, ...] = ()  # a tuple so it is not registered as a submodule

    # ------------------------------------------------------------------ wiring

    @property
    def has_predecessor(self) -> bool:
        return self._predecessor_position >= 0

    def wire(
        self,
        chain: KalmanChain,
        position: int,
        link: ChainLink,
        predecessor_position: int,
        feeding_layer: nn.Module | None,
    ) -> None:
        """Attach this layer to ``chain`` and create its BKN parameters (if it has a predecessor)."""
        self._chain = chain
        self._position = position
        self._predecessor_position = predecessor_position
        self._feeding = (feeding_layer,) if feeding_layer is not None else ()
        self.link = link
        for name in ("prior_weight_logit", "process_noise_raw", "transition_matrix"):
            if name in self._parameters:
                del self._parameters[name]
        if predecessor_position < 0:
            return
        ref = self.weight if self.weight is not None else self.running_mean
        factory: dict[str, Any] = {"device": ref.device if ref is not None else None, "dtype": torch.float32}
        if ref is not None and ref.dtype.is_floating_point:
            factory["dtype"] = ref.dtype
        c = self.num_features
        if self.options.prior_weight is None:
            p0 = self.options.initial_prior_weight / Fk.PRIOR_WEIGHT_LIMIT
            logit = math.log(p0 / (1.0 - p0)) if p0 > 0 else -20.0
            self.prior_weight_logit = nn.Parameter(torch.full((c,), logit, **factory))
        if self.options.process_noise:
            self.process_noise_raw = nn.Parameter(torch.full((c,), _INITIAL_PROCESS_NOISE_RAW, **factory))
        if link.transition == "learned":
            c_prev = link.num_previous_features
            if c == c_prev:
                initial = torch.eye(c, **factory)
            else:
                initial = torch.full((c, c_prev), 1.0 / c_prev, **factory)
            self.transition_matrix = nn.Parameter(initial)

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
        if x.shape[0] == 0 or x.numel() == 0:
            raise BKNInputError(f"{self._label()}: got an empty batch of shape {tuple(x.shape)}")

    def _label(self) -> str:
        name = self.link.name or "<unwired>"
        return f"{type(self).__name__} '{name}'"

    def _momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        assert self.num_batches_tracked is not None
        return 1.0 / float(self.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not use_batch:
            assert self.running_mean is not None and self.running_var is not None
            return Fk.kalman_norm_inference(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        chain = self._chain
        if chain is not None and self._position == 0:
            chain.posteriors.clear()  # a new forward pass starts
        prior_mean, prior_variance, prior_weight = self._prediction(x)
        y, posterior_mean, posterior_variance, count = self._kalman_step(x, prior_mean, prior_variance, prior_weight)
        if self.training and self.track_running_stats:
            self._update_running_statistics(posterior_mean, posterior_variance, count)
        if chain is not None:
            if self._position == len(chain.names) - 1:
                chain.posteriors.clear()  # the pass ends: hold nothing between calls
            else:
                chain.posteriors[self._position] = (posterior_mean, posterior_variance, x.shape)
        return y

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

    def _prediction(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(μ_{k|k-1}, Σ_{k|k-1}, p_k), all (C,); p = 0 (BatchNorm) without a predecessor posterior."""
        acc = Fk.statistics_dtype(x.dtype)
        c = self.num_features
        previous = None
        if self._chain is not None and self._predecessor_position >= 0:
            previous = self._chain.posteriors.get(self._predecessor_position)
        if previous is None:
            zeros = x.new_zeros((c,), dtype=acc)
            return zeros, x.new_ones((c,), dtype=acc), zeros
        prev_mean, prev_variance, prev_shape = previous
        noise = self.process_noise()
        mode = self.link.transition
        if mode == "propagate":
            layer = self._feeding[0]
            spatial_shape = prev_shape[2:]
            if isinstance(layer, nn.modules.conv._ConvNd) and len(spatial_shape) == layer.weight.dim() - 2:
                # The spatial size `sampled` draws: the predecessor's input, so borders count exactly.
                mean, variance = Fk.predict_propagate_conv(
                    prev_mean, prev_variance, layer, spatial_shape, noise, self.link.rectify
                )
            else:  # Linear, or a conv whose input rank differs from the predecessor's: no borders known
                sum_w, sum_w2, layer_bias = Fk.channel_maps(layer)
                mean, variance = Fk.predict_propagate(
                    prev_mean, prev_variance, sum_w, sum_w2, layer_bias, noise, self.link.rectify
                )
        elif mode == "sampled":
            sample_noise = torch.randn(prev_shape, device=x.device, dtype=prev_mean.dtype)
            mean, variance = Fk.predict_sampled(
                prev_mean, prev_variance, sample_noise, self._run_feeding_layer, noise, self.link.rectify
            )
        elif mode == "learned":
            mean, variance = Fk.predict_linear(prev_mean, prev_variance, self.transition_matrix, noise)
        else:
            mean, variance = Fk.predict_identity(prev_mean, prev_variance, noise)
        return mean.to(acc), variance.to(acc), self.prior_weight().to(acc)

    def _run_feeding_layer(self, sample: Tensor) -> Tensor:
        """Apply the feeding layer to a (N, C_prev, *) sample; Linear layers see channels last.

        ``forward``, not ``__call__``: the sample is not an activation, so the layer's hooks
        (feature extractors, activation recorders) must not see it.
        """
        layer = self._feeding[0]
        if isinstance(layer, nn.Linear):
            rows = sample.movedim(1, -1).reshape(-1, sample.shape[1])
            return F.linear(rows.to(layer.weight.dtype), layer.weight, layer.bias)
        assert isinstance(layer, nn.modules.conv._ConvNd)
        return layer.forward(sample.to(layer.weight.dtype))

    def _update_running_statistics(self, posterior_mean: Tensor, posterior_variance: Tensor, count: int) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
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

    def get_extra_state(self) -> dict[str, Any]:
        """The wiring, saved with the state so a checkpoint records its chain."""
        return {"version": self._version, "link": asdict(self.link), "options": asdict(self.options)}

    def set_extra_state(self, state: Any) -> None:
        saved = dict(state.get("link", {})) if isinstance(state, dict) else {}
        current = asdict(self.link)
        keys = ("predecessor", "transition", "feeding_layer", "rectify")
        if any(saved.get(k) != current[k] for k in keys):
            raise ChainWiringError(
                f"{self._label()}: the checkpoint was saved with wiring "
                f"{ {k: saved.get(k) for k in keys} } but this model is wired "
                f"{ {k: current[k] for k in keys} }. Build the model the same way and call "
                "bkn_export.convert_batchnorm(model, example_inputs, ...) with the same options "
                "before load_state_dict."
            )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.has_predecessor:
            text += f", predecessor={self.link.predecessor!r}, transition={self.link.transition!r}"
        return text


class BatchKalmanNorm1d(_BatchKalmanNorm):
    """BKN over (N, C) or (N, C, L) inputs; drop-in for ``nn.BatchNorm1d``."""

    _expected_ranks = (2, 3)


class BatchKalmanNorm2d(_BatchKalmanNorm):
    """BKN over (N, C, H, W) inputs; drop-in for ``nn.BatchNorm2d``."""

    _expected_ranks = (4,)


class BatchKalmanNorm3d(_BatchKalmanNorm):
    """BKN over (N, C, D, H, W) inputs; drop-in for ``nn.BatchNorm3d``."""

    _expected_ranks = (5,)
