from adamoe.callbacks.analysis import RoutingAnalysis
from adamoe.callbacks.budget import Budget
from adamoe.callbacks.checkpoint import AtomicCheckpointIO, Checkpoint, RandomState
from adamoe.callbacks.curriculum import Curriculum
from adamoe.callbacks.faults import NonFiniteGuard
from adamoe.callbacks.memory import KeepFreedMemory
from adamoe.callbacks.stats import ExpertStats
from adamoe.callbacks.summary import MetricsSummary, ParameterSummary, ProgressBar, TensorBoardLayout
from adamoe.callbacks.timing import CollectiveWait, EpochTimer

__all__ = [
    "AtomicCheckpointIO",
    "Budget",
    "Checkpoint",
    "CollectiveWait",
    "Curriculum",
    "EpochTimer",
    "ExpertStats",
    "KeepFreedMemory",
    "MetricsSummary",
    "NonFiniteGuard",
    "ParameterSummary",
    "ProgressBar",
    "RandomState",
    "RoutingAnalysis",
    "TensorBoardLayout",
]
