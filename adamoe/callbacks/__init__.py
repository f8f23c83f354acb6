from adamoe.callbacks.analysis import RoutingAnalysis
from adamoe.callbacks.curriculum import Curriculum
from adamoe.callbacks.run import Checkpoint, MetricsSummary
from adamoe.callbacks.stats import ExpertStats
from adamoe.callbacks.timing import EpochTimer

__all__ = ["Checkpoint", "Curriculum", "EpochTimer", "ExpertStats", "MetricsSummary", "RoutingAnalysis"]
