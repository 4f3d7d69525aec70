"""The Kalman chain: which normalization feeds which (by the data flow of an example forward), and how.

record (data flow → source paths), steps (what sits on a path), wiring (a layer's versioned wiring value),
transitions (the prior from the sources' posteriors), scope (the per-call scratch the root owns), member (a
layer's membership); wire, describe, statistics, observe: the public functions.
"""

from bkn_export.chain.describe import ChainLink, describe_chain, format_chain
from bkn_export.chain.member import ChainMembership
from bkn_export.chain.observe import observe
from bkn_export.chain.record import LayerRecord, RecordedChain, SourcePath, record_dataflow
from bkn_export.chain.statistics import LayerStatistics, PriorSource, chain_statistics
from bkn_export.chain.transitions import Identity, Learned, Propagate, Sampled, Transition
from bkn_export.chain.wire import bkn_layers, plan_wiring, wire_chain
from bkn_export.chain.wiring import Wiring

__all__ = [
    "ChainLink",
    "ChainMembership",
    "Identity",
    "LayerRecord",
    "LayerStatistics",
    "Learned",
    "PriorSource",
    "Propagate",
    "RecordedChain",
    "Sampled",
    "SourcePath",
    "Transition",
    "Wiring",
    "bkn_layers",
    "chain_statistics",
    "describe_chain",
    "format_chain",
    "observe",
    "plan_wiring",
    "record_dataflow",
    "wire_chain",
]
