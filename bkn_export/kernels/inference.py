"""Inference-mode BKN forward in Triton: y = γ (x - r_μ) / sqrt(r_Σ + ε) + β.

One pass over x with the normalize kernel of the train-mode forward
(``forward._normalize_kernel``), fed the running statistics instead of the posterior.
The modules' eval path keeps ``F.batch_norm`` (cuDNN is already one pass there and the
ONNX exporter folds it into the preceding Conv/Gemm); this launcher is for callers that
want the Triton path for both modes, e.g. channels-last half-precision tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bkn_export.kernels.forward import normalize_into
from bkn_export.kernels.layout import channel_view, choose_tiling, restore_layout, statistics_vector, working_tensor

__all__ = ["kalman_norm_inference"]


def kalman_norm_inference(
    x: Tensor,
    running_mean: Tensor,
    running_variance: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval-mode BKN of ``x: (N, C, *)`` (float32/float16/bfloat16, any layout) with (C,) statistics.

    Same math as :func:`bkn_export.functional.kalman_norm_inference`; the affine is
    computed in float32, y has the dtype and layout of x.
    """
    x_work = working_tensor(x)
    view = channel_view(x_work)
    channels = view.channels
    y_work = torch.empty_like(x_work)
    normalize_into(
        x_work,
        y_work,
        view,
        choose_tiling(view),
        statistics_vector(running_mean, channels, "running_mean"),
        statistics_vector(running_variance, channels, "running_variance"),
        statistics_vector(weight, channels, "weight") if weight is not None else None,
        statistics_vector(bias, channels, "bias") if bias is not None else None,
        eps,
    )
    return restore_layout(y_work, x, x_work)
