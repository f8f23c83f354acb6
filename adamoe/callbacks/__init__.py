from adamoe.callbacks.analysis import RoutingAnalysis
from adamoe.callbacks.budget import Budget
from adamoe.callbacks.curriculum import Curriculum
from adamoe.callbacks.faults import NonFiniteGuard, RandomState
from adamoe.callbacks.memory import KeepFreedMemory, keep_freed_memory
from adamoe.callbacks.run import AtomicCheckpointIO, Checkpoint, MetricsSummary
from adamoe.callbacks.stats import ExpertStats
from adamoe.callbacks.summary import ParameterSummary, ProgressBar, TensorBoardLayout
from adamoe.callbacks.timing import CollectiveWait, EpochTimer

__all__ = [
    "AtomicCheckpointIO", "Budget", "Checkpoint", "CollectiveWait", "Curriculum", "EpochTimer", "ExpertStats", "KeepFreedMemory",
    "MetricsSummary", "NonFiniteGuard", "ParameterSummary", "ProgressBar", "RandomState", "RoutingAnalysis", "TensorBoardLayout",
    "keep_freed_memory",
]  # fmt: skip
