"""ONNX export of BKN models: ``export_onnx(model, example_inputs, path, mode=...)``.

* ``mode="inference"`` (:mod:`bkn_export.export.inference`): running statistics folded
  into the preceding Conv/Gemm; a deployed BKN model costs what a BatchNorm model costs.
* ``mode="training"`` (:mod:`bkn_export.export.training`): batch statistics and the
  Kalman chain as ``ai.bkn::BatchKalmanNorm`` nodes with an ONNX function body.
* :func:`save_onnx` (:mod:`bkn_export.export.io`) is the one writer of ONNX files: the model
  and its external data are published as a pair, atomically.
"""

from bkn_export.export.api import SUPPORTED_MODES, export_onnx
from bkn_export.export.io import save_onnx
from bkn_export.export.result import ExportResult, FoldRecord

__all__ = ["SUPPORTED_MODES", "ExportResult", "FoldRecord", "export_onnx", "save_onnx"]
