from adamoe.callbacks.run import Checkpoint, MetricsSummary

__all__ = ["Checkpoint", "MetricsSummary"]
