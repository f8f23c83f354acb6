from adamoe.callbacks.analysis import RoutingAnalysis
from adamoe.callbacks.run import Checkpoint, MetricsSummary
from adamoe.callbacks.stats import ExpertStats
from adamoe.callbacks.timing import EpochTimer

__all__ = ["Checkpoint", "EpochTimer", "ExpertStats", "MetricsSummary", "RoutingAnalysis"]
