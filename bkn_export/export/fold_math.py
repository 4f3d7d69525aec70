"""The fold math, once: absorbing a per-channel affine map into the weighted op before it.

An eval-mode normalization is y = a ⊙ z + s per output channel c, with
(a, s) = :func:`bkn_export.functional.inference_affine` (a = γ / sqrt(r_Σ + ε),
s = β − a r_μ). When z = W x + b comes from a Conv / ConvTranspose / Linear / Gemm / MatMul
with constant weights, y = W' x + b' with::

    b' = a ⊙ b + s                       (b' = s without a bias)
    W' = W scaled by a along its output-channel axis, by layout:
      "out_first"   W: (C_out, ...)                 Conv, Linear, Gemm with transB=1
      "out_last"    W: (K, C_out)                   Gemm with transB=0, MatMul
      "transposed"  W: (C_in, C_out/G, *k), G groups ConvTranspose: output channel g·C_out/G + j
                                                    is column j of the input channels of group g

Used by the ONNX rewrite rules (:mod:`bkn_export.export.rules`, on numpy arrays) and by
the PyTorch-side :func:`bkn_export.fold` (on tensors). Computed in float64 by the callers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from bkn_export import functional as Fk

__all__ = ["Layout", "affine_of", "folded_bias", "folded_weight"]

Layout = Literal["out_first", "out_last", "transposed"]


def affine_of(
    running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(a, s), each (C,): the eval map y = a ⊙ x + s of a normalization (float64 inputs give float64)."""
    return Fk.inference_affine(running_mean, running_var, weight, bias, eps)


def folded_weight(weight: Tensor, scale: Tensor, layout: Layout, groups: int = 1) -> Tensor:
    """W' = W with output channel c scaled by scale[c]; see the module docstring for the layouts."""
    if layout == "out_first":
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    if layout == "out_last":
        return weight * scale.reshape(1, -1)
    c_in, c_out_per_group, *kernel = weight.shape
    blocks = weight.reshape(groups, c_in // groups, c_out_per_group, *kernel)
    return (blocks * scale.reshape(groups, 1, c_out_per_group, *([1] * len(kernel)))).reshape(weight.shape)


def folded_bias(bias: Tensor | None, scale: Tensor, shift: Tensor) -> Tensor:
    """b' = a ⊙ b + s (s when there is no bias); ``bias`` broadcast to (C,)."""
    return shift.clone() if bias is None else torch.as_tensor(bias).reshape(-1) * scale + shift
