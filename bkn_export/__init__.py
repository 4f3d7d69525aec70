"""bkn-export: Batch Kalman Normalization from PyTorch to ONNX and TensorRT, with runtime parity.

Public API: the modules ``BatchKalmanNorm1d/2d/3d``, ``KalmanOptions``, and
``convert_batchnorm`` / ``wire_chain`` / ``describe_chain`` / ``load_batchnorm_state_dict``.
The math is in :mod:`bkn_export.functional`.
"""

from typing import TYPE_CHECKING

# The exceptions import nothing heavy; everything else is imported on first use (module
# __getattr__), so that `bkn --help`, `bkn parity --help` and the pytest plugin start
# without torch. `from bkn_export import X` and `bkn_export.X` work as before.
from bkn_export.errors import (
    BKNError,
    BKNInputError,
    ChainWiringError,
    CheckpointError,
    DistributedError,
    ExportError,
    InvalidStatisticsError,
    RecomputationError,
    UnsupportedLayerError,
)

if TYPE_CHECKING:
    from bkn_export.chain import (
        ChainLink,
        LayerStatistics,
        PriorSource,
        bkn_layers,
        chain_statistics,
        describe_chain,
        format_chain,
        wire_chain,
    )
    from bkn_export.convert import BatchKalmanNormBase, convert_batchnorm, load_batchnorm_state_dict
    from bkn_export.distributed import SyncBatchKalmanNorm, convert_sync_batchkalmannorm
    from bkn_export.export.fold import fold
    from bkn_export.nn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, KalmanOptions
    from bkn_export.param_groups import parameter_groups
    from bkn_export.recompute import checkpoint
    from bkn_export.sequential_checkpoint import checkpoint_sequential
    from bkn_export.swa import update_bn

    __version__: str

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    **dict.fromkeys(
        ("ChainLink", "LayerStatistics", "PriorSource", "bkn_layers", "chain_statistics", "describe_chain",
         "format_chain", "wire_chain"),
        "bkn_export.chain",
    ),
    **dict.fromkeys(("BatchKalmanNormBase", "convert_batchnorm", "load_batchnorm_state_dict"), "bkn_export.convert"),
    **dict.fromkeys(("SyncBatchKalmanNorm", "convert_sync_batchkalmannorm"), "bkn_export.distributed"),
    **dict.fromkeys(("BatchKalmanNorm1d", "BatchKalmanNorm2d", "BatchKalmanNorm3d", "KalmanOptions"), "bkn_export.nn"),
    "fold": "bkn_export.export.fold",
    "checkpoint": "bkn_export.recompute",
    "checkpoint_sequential": "bkn_export.sequential_checkpoint",
    "update_bn": "bkn_export.swa",
    "parameter_groups": "bkn_export.param_groups",
}  # fmt: skip


def __getattr__(name: str) -> object:
    if name == "__version__":  # importlib.metadata takes ~0.1 s to import: read on first use
        from bkn_export._version import package_version

        globals()[name] = version = package_version()
        return version
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bkn_export' has no attribute {name!r}")


__all__ = [
    "BKNError",
    "BKNInputError",
    "BatchKalmanNorm1d",
    "BatchKalmanNorm2d",
    "BatchKalmanNorm3d",
    "BatchKalmanNormBase",
    "ChainLink",
    "ChainWiringError",
    "CheckpointError",
    "DistributedError",
    "ExportError",
    "InvalidStatisticsError",
    "KalmanOptions",
    "LayerStatistics",
    "PriorSource",
    "RecomputationError",
    "SyncBatchKalmanNorm",
    "UnsupportedLayerError",
    "__version__",
    "bkn_layers",
    "chain_statistics",
    "checkpoint",
    "checkpoint_sequential",
    "convert_batchnorm",
    "convert_sync_batchkalmannorm",
    "describe_chain",
    "fold",
    "format_chain",
    "load_batchnorm_state_dict",
    "parameter_groups",
    "update_bn",
    "wire_chain",
]
