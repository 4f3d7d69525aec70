"""The Triton kernels as the CUDA implementation of ``torch.ops.bkn.*``.

``register()`` adds a "cuda" kernel to both custom ops. The op's autograd formula
(``bkn_export.ops``) already calls ``batch_kalman_norm_backward``, so registering both
gives a fused forward *and* backward on CUDA tensors; CPU keeps its own kernels and
``torch.compile`` keeps seeing one opaque node with the ops' fake implementations.

Nothing here imports Triton: registration only checks that it is installed, and the
kernel modules are imported on the first CUDA call. So ``import bkn_export`` stays
fast and never fails for want of Triton, and a broken Triton install degrades to the
reference with one warning instead of breaking the op.

Inputs the kernels do not cover run the reference (:mod:`bkn_export.functional`):
dtypes other than float32/float16/bfloat16, tensors of more than 2³¹ - 1 elements,
empty batches (whose error message then matches the CPU path), and every input while
the environment variable ``BKN_DISABLE_TRITON=1`` is set.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from bkn_export.kernels.layout import MAX_ELEMENTS
from bkn_export.op_reference import reference_backward, reference_forward

__all__ = ["DISABLE_ENV", "SUPPORTED_DTYPES", "register", "triton_installed", "uses_kernels"]

#: Input dtypes with a Triton path (statistics always accumulate in float32).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Set to "1" to run the PyTorch reference on CUDA instead (debugging, A/B timing).
DISABLE_ENV = "BKN_DISABLE_TRITON"


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _launchers() -> tuple[ModuleType, ModuleType] | None:
    try:
        from bkn_export.kernels import backward, forward
    except ImportError as error:
        warnings.warn(
            f"bkn_export.kernels: Triton could not be imported ({error}); BKN on CUDA runs the PyTorch "
            "reference. Reinstall a Triton that matches your torch to get the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return forward, backward


def uses_kernels(x: Tensor) -> bool:
    """Whether a CUDA call with input ``x: (N, C, *)`` runs the Triton kernels."""
    return (
        x.is_cuda
        and x.dtype in SUPPORTED_DTYPES
        and x.dim() >= 2
        and 0 < x.numel() <= MAX_ELEMENTS
        and os.environ.get(DISABLE_ENV, "0") != "1"
        and _launchers() is not None
    )


def _forward_cuda(
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if not uses_kernels(x):
        return reference_forward(x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio)
    launchers = _launchers()
    assert launchers is not None
    with torch.cuda.device(x.device):  # Triton launches on the current device
        return launchers[0].batch_kalman_norm_forward(
            x, prior_mean, prior_variance, prior_weight, weight, bias, eps, fallback_ratio
        )


def _backward_cuda(
    grad_output: Tensor,
    grad_posterior_mean: Tensor,
    grad_posterior_variance: Tensor,
    x: Tensor,
    prior_mean: Tensor,
    prior_variance: Tensor,
    prior_weight: Tensor,
    weight: Tensor | None,
    eps: float,
    fallback_ratio: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not uses_kernels(x):
        return reference_backward(
            grad_output,
            grad_posterior_mean,
            grad_posterior_variance,
            x,
            prior_mean,
            prior_variance,
            prior_weight,
            weight,
            eps,
            fallback_ratio,
        )
    launchers = _launchers()
    assert launchers is not None
    with torch.cuda.device(x.device):
        return launchers[1].batch_kalman_norm_backward(
            grad_output,
            grad_posterior_mean,
            grad_posterior_variance,
            x,
            prior_mean,
            prior_variance,
            prior_weight,
            weight,
            eps,
            fallback_ratio,
        )


_registered = False


def register() -> bool:
    """Register the CUDA kernels of both ops once; False (and nothing registered) when
    Triton is not installed or this torch sees no CUDA device."""
    global _registered
    if _registered:
        return True
    if not (triton_installed() and torch.cuda.is_available()):
        return False
    import bkn_export.ops  # noqa: F401  (defines the ops; no-op when it is the importer)

    torch.library.register_kernel("bkn::batch_kalman_norm", "cuda", _forward_cuda)
    torch.library.register_kernel("bkn::batch_kalman_norm_backward", "cuda", _backward_cuda)
    _registered = True
    return True
