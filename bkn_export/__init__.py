"""bkn-export: Batch Kalman Normalization from PyTorch to ONNX and TensorRT, with runtime parity.

Public API: the modules ``BatchKalmanNorm1d/2d/3d``, ``KalmanOptions``, and
``convert_batchnorm`` / ``wire_chain`` / ``describe_chain`` / ``load_batchnorm_state_dict``.
The math is in :mod:`bkn_export.functional`.
"""

from bkn_export.convert import (
    bkn_layers,
    convert_batchnorm,
    describe_chain,
    format_chain,
    load_batchnorm_state_dict,
    wire_chain,
)
from bkn_export.distributed import SyncBatchKalmanNorm, convert_sync_batchkalmannorm
from bkn_export.errors import (
    BKNError,
    BKNInputError,
    ChainWiringError,
    CheckpointError,
    DistributedError,
    ExportError,
    InvalidStatisticsError,
    UnsupportedLayerError,
)
from bkn_export.export.fold import fold
from bkn_export.nn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, ChainLink, KalmanOptions

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ChainLink",
    "KalmanOptions",
    "convert_batchnorm",
    "fold",
    "wire_chain",
    "describe_chain",
    "format_chain",
    "bkn_layers",
    "load_batchnorm_state_dict",
    "SyncBatchKalmanNorm",
    "convert_sync_batchkalmannorm",
    "BKNError",
    "BKNInputError",
    "ChainWiringError",
    "CheckpointError",
    "DistributedError",
    "ExportError",
    "InvalidStatisticsError",
    "UnsupportedLayerError",
]
