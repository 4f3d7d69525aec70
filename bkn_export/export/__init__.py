"""ONNX export of BKN models: ``export_onnx(model, example_inputs, path, mode=...)``.

* ``mode="inference"`` (:mod:`bkn_export.export.inference`): running statistics folded
  into the preceding Conv/Gemm; a deployed BKN model costs what a BatchNorm model costs.
* ``mode="training"`` (:mod:`bkn_export.export.training`): batch statistics and the
  Kalman chain as ``ai.bkn::BatchKalmanNorm`` nodes with an ONNX function body.
* :func:`save_onnx` (:mod:`bkn_export.export.io`) is the one writer of ONNX files: the model
  and its external data are published as a pair, atomically.

The names below are imported on first use (module ``__getattr__``), so that importing a
light submodule (``op.op_spec``, ``io``) or ``save_onnx`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bkn_export.export.api import SUPPORTED_MODES, export_onnx
    from bkn_export.export.io import save_onnx
    from bkn_export.export.result import ExportResult, FoldRecord

__all__ = ["SUPPORTED_MODES", "ExportResult", "FoldRecord", "export_onnx", "save_onnx"]

_WHERE = {
    "SUPPORTED_MODES": "bkn_export.export.api",
    "export_onnx": "bkn_export.export.api",
    "save_onnx": "bkn_export.export.io",
    "ExportResult": "bkn_export.export.result",
    "FoldRecord": "bkn_export.export.result",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'bkn_export.export' has no attribute {name!r}")
