"""Fused Triton kernels for BKN training: plain launchers for CUDA tensors.

This package registers nothing. :mod:`bkn_export.ops` makes it the CUDA implementation
of ``torch.ops.bkn.batch_kalman_norm`` and its backward: inputs that
:func:`uses_kernels` accepts go to :func:`launchers`' forward and backward, any other
input to the functional reference (the fallback lives in ``ops``, beside the CPU one).

Importing this package does not import Triton. The kernel modules are imported on the
first call of :func:`launchers`, so ``import bkn_export`` stays fast and never fails for
want of Triton, and a broken Triton install warns once and leaves CUDA on the reference.
Nothing here imports from ``bkn_export`` beyond ``kernels.layout`` and ``errors``.

Modules, in reading order:

* ``layout``: the (N', C, S') strided view of an (N, C, *) tensor and the tile shapes
  (the block sizes, as named constants with the reason for each).
* ``common``: Triton helpers shared by both directions (Chan's merge of moments, the
  Kalman update, the fallback rule).
* ``forward``: train-mode forward kernels and their launcher.
* ``backward``: backward kernels and their launcher.

See docs/kernels.md for the design, numerics and how to test and benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bkn_export.kernels.layout import MAX_CHANNELS, MAX_ELEMENTS

__all__ = [
    "DISABLE_ENV",
    "MOMENT_MODULES",
    "SUPPORTED_DTYPES",
    "TRITON_ON_CPU",
    "TRITON_ON_CPU_ENV",
    "Launchers",
    "launchers",
    "launching_on",
    "moment_kernels_take",
    "moment_launchers",
    "path_kernels",
    "triton_device",
    "triton_installed",
    "uses_kernels",
]

#: Input dtypes with a Triton path (statistics always accumulate in float32).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Set to "1" to run the PyTorch reference on CUDA instead (debugging, A/B timing).
DISABLE_ENV = "BKN_DISABLE_TRITON"

#: Set to "1" together with ``TRITON_INTERPRET=1`` (both at import) to run every Triton kernel on CPU
#: tensors, in Triton's interpreter: the CPU then takes the CUDA device's route (the op's launchers, the
#: prediction's twins). Slow; for tests and launch counts on a machine without a GPU, never for training.
TRITON_ON_CPU_ENV = "BKN_TRITON_ON_CPU"
TRITON_ON_CPU = os.environ.get(TRITON_ON_CPU_ENV) == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def launching_on(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Triton launches on the current CUDA device: make it ``x``'s (a model on ``cuda:1``); nothing for CPU tensors
    under :data:`TRITON_ON_CPU`."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def triton_device(x: Tensor) -> bool:
    """Whether ``x``'s device runs the Triton kernels: CUDA (and the CPU under :data:`TRITON_ON_CPU`)."""
    return x.is_cuda or (TRITON_ON_CPU and x.is_cpu)


class Launchers(NamedTuple):
    """The op's launchers (``forward.batch_kalman_norm_forward``, ``backward.batch_kalman_norm_backward``,
    ``backward.batch_kalman_norm_backward_assembled``).

    The first two take the flat arguments of their op's schema, plus an optional ``single_program`` (and the
    keyword extensions :mod:`bkn_export.triton_step` uses: ``assembly``, ``extra_grad_weight``, ``extra_grad_bias``);
    the third is the backward of a forward that assembled its prior.
    """

    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]
    backward_assembled: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]


@functools.cache
def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def launchers() -> Launchers | None:
    """The Triton launchers, imported on first use; None (with one warning) when Triton cannot be imported."""
    try:
        from bkn_export.kernels.backward import batch_kalman_norm_backward, batch_kalman_norm_backward_assembled
        from bkn_export.kernels.forward import batch_kalman_norm_forward
    except ImportError as error:
        warnings.warn(
            f"bkn_export.kernels: Triton could not be imported ({error}); BKN on CUDA runs the PyTorch "
            "reference. Reinstall a Triton that matches your torch to get the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return Launchers(batch_kalman_norm_forward, batch_kalman_norm_backward, batch_kalman_norm_backward_assembled)


def uses_kernels(x: Tensor) -> bool:
    """Whether a call with input ``x: (N, C, *)`` runs the Triton kernels.

    Only CUDA tensors (CPU ones under :data:`TRITON_ON_CPU`) of a supported dtype with 1 to
    2³¹ - 1 elements (the kernels index with 32 bits; an empty batch goes to the reference so
    that its error message matches the CPU path's) and at most 65535 channels (CUDA's grid axis y:
    :data:`~bkn_export.kernels.layout.MAX_CHANNELS`), while ``BKN_DISABLE_TRITON`` is not "1" and
    Triton imports.
    """
    return (
        triton_device(x)
        and x.dtype in SUPPORTED_DTYPES
        and x.dim() >= 2
        and 0 < x.numel() <= MAX_ELEMENTS
        and x.shape[1] <= MAX_CHANNELS
        and os.environ.get(DISABLE_ENV, "0") != "1"
        and triton_installed()
        and launchers() is not None
    )


#: The modules of the Triton twins of the per-channel C kernels (:mod:`bkn_export.per_channel`); each
#: exports ``LAUNCHERS`` (C kernel name → launcher with the C kernel's arguments) and ``LAUNCHES``.
MOMENT_MODULES = ("elementwise_moments", "affine_moments", "prior_moments")

#: Data dtypes the twins take (they compute in the data's precision; see each module).
MOMENT_DTYPES = (torch.float32, torch.float64)


@functools.cache
def moment_launchers() -> Mapping[str, Callable[..., None]] | None:
    """Every twin's launcher by C kernel name, imported on first use; None (with one warning) when
    Triton cannot be imported."""
    found: dict[str, Callable[..., None]] = {}
    try:
        for name in MOMENT_MODULES:
            found.update(importlib.import_module(f"{__name__}.{name}").LAUNCHERS)
    except ImportError as error:
        warnings.warn(
            f"bkn_export.kernels: Triton could not be imported ({error}); BKN's prediction on CUDA runs "
            "PyTorch operators. Reinstall a Triton that matches your torch to get the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return found


@functools.cache
def path_kernels() -> ModuleType | None:
    """:mod:`bkn_export.kernels.path_moments` (a prediction path's head in one launch each way), imported on first
    use; None where Triton cannot be imported (:func:`moment_launchers` warns)."""
    if not triton_installed() or moment_launchers() is None:
        return None
    return importlib.import_module(f"{__name__}.path_moments")


def moment_kernels_take(kernel: str, *tensors: Tensor | None) -> bool:
    """Whether twin ``kernel`` runs on these tensors: Triton available and not disabled
    (``BKN_DISABLE_TRITON``), and every given tensor a contiguous plain tensor or parameter of the
    first one's dtype (float32/float64), shape and device."""
    first = tensors[0]
    assert first is not None
    if first.dtype not in MOMENT_DTYPES or os.environ.get(DISABLE_ENV, "0") == "1" or not triton_installed():
        return False
    launchers_by_name = moment_launchers()
    if launchers_by_name is None or kernel not in launchers_by_name:
        return False
    dtype, shape, device = first.dtype, first.shape, first.device
    for tensor in tensors:
        if tensor is None:
            continue
        if (
            type(tensor) not in (Tensor, torch.nn.Parameter)
            or tensor.dtype != dtype
            or tensor.shape != shape
            or tensor.device != device
            or not tensor.is_contiguous()
        ):
            return False
    return True
