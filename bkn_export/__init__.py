"""bkn-export: Batch Kalman Normalization from PyTorch to ONNX and TensorRT, with runtime parity.

Public API: the modules ``BatchKalmanNorm1d/2d/3d``, ``KalmanOptions``, and
``convert_batchnorm`` / ``wire_chain`` / ``describe_chain`` / ``load_batchnorm_state_dict``.
The math is in :mod:`bkn_export.functional`.
"""

from typing import TYPE_CHECKING

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
from bkn_export.nn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, ChainLink, KalmanOptions

if TYPE_CHECKING:
    from bkn_export.export.fold import fold

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `fold` needs onnx machinery; import it on first use so `import bkn_export` stays light.
    if name == "fold":
        from bkn_export.export.fold import fold

        return fold
    raise AttributeError(f"module 'bkn_export' has no attribute {name!r}")


__all__ = [
    "BKNError",
    "BKNInputError",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "ChainLink",
    "ChainWiringError",
    "CheckpointError",
    "DistributedError",
    "ExportError",
    "InvalidStatisticsError",
    "KalmanOptions",
    "SyncBatchKalmanNorm",
    "UnsupportedLayerError",
    "__version__",
    "bkn_layers",
    "convert_batchnorm",
    "convert_sync_batchkalmannorm",
    "describe_chain",
    "fold",
    "format_chain",
    "load_batchnorm_state_dict",
    "wire_chain",
]
