"""Fused Triton kernels for BKN: the CUDA implementation of ``torch.ops.bkn.*``.

Importing this package (``bkn_export.ops`` does) registers the kernels for CUDA
tensors when Triton is installed and a CUDA device is visible; ``REGISTERED`` says
whether it did. Triton itself is imported only on the first CUDA call.

Modules, in reading order:

* ``layout``: the (N', C, S') strided view of an (N, C, *) tensor and the tile shapes
  (the block sizes, as named constants with the reason for each).
* ``common``: Triton helpers shared by both directions (Chan's merge of moments, the
  Kalman update, the fallback rule).
* ``forward``: train-mode forward kernels and launcher.
* ``backward``: backward kernels and launcher.
* ``inference``: eval-mode forward launcher.
* ``registration``: which inputs take the kernels, and the ``torch.library`` wiring.
* ``interpreter``: run the launchers under ``TRITON_INTERPRET=1`` in a child process
  (how the CPU tests exercise the kernels).

See docs/kernels.md for the design, numerics and how to benchmark.
"""

from __future__ import annotations

from bkn_export.kernels.registration import DISABLE_ENV, SUPPORTED_DTYPES, register, triton_installed, uses_kernels

__all__ = ["DISABLE_ENV", "REGISTERED", "SUPPORTED_DTYPES", "register", "triton_installed", "uses_kernels"]

#: True when the CUDA kernels were registered at import.
REGISTERED: bool = register()
