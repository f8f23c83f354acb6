"""Learning-rate schedules, stepped every optimizer step.

A schedule's lengths may be shares of the run: `warmup_steps` below 1 is that share of
`total_steps`, and `total_steps` left unset is the run's length, which the task sets from
the trainer (`max_steps`, or the epochs' batches). When `max_time` ends the run first, the
length is estimated from the time the first `ESTIMATE_AFTER` steps took; until then the
rate stays near the start of its warmup. The length is kept in the checkpoint.
"""

import math

from torch.optim.lr_scheduler import LambdaLR

ESTIMATE_AFTER = 20
UNKNOWN = 10**9  # the run's length before it is known: a warmup share of it is long


class RunSchedule(LambdaLR):
    """The base of the schedules: a warmup of a number of steps or a share of the run."""

    def __init__(self, optimizer, warmup_steps: float = 1000, total_steps: int | None = None):
        if warmup_steps < 0 or total_steps is not None and total_steps < 1:
            raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.run_length = total_steps is None  # set (and estimated) from the run
        super().__init__(optimizer, self.ratio)

    def set_length(self, total_steps: int | None):
        """The run's length, found after the schedule was made: the current rate follows it at once."""
        self.total_steps = total_steps
        for group, base, ratio in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * ratio(self.last_epoch)

    def warmup(self) -> int:
        share = self.warmup_steps < 1
        return max(1, round(self.warmup_steps * (self.total_steps or UNKNOWN) if share else self.warmup_steps))

    def ratio(self, step: int) -> float:
        raise NotImplementedError


class WarmupInverseSqrt(RunSchedule):
    """Linear warmup to the optimizer's lr, then decay by 1/sqrt(step) (Vaswani et al.)."""

    def ratio(self, step):
        w = self.warmup()
        return min((step + 1) / w, math.sqrt(w / (step + 1)))


class WarmupCosine(RunSchedule):
    """Linear warmup, then cosine decay to `min_ratio` of the lr at `total_steps`."""

    def __init__(self, optimizer, total_steps: int | None = None, warmup_steps: float = 1000, min_ratio: float = 0.0):
        self.min_ratio = min_ratio
        super().__init__(optimizer, warmup_steps, total_steps)

    def ratio(self, step):
        w, total = self.warmup(), self.total_steps or UNKNOWN
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, total - w))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run_length(trainer) -> int | None:
    """The run's optimizer steps as the trainer's limits say, or None when only time limits it."""
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) and total > 0 else None


def estimate_length(trainer, done: int) -> int | None:
    """Steps the run will take: its step limit, or sooner where `max_time` ends it at the pace of the steps so far."""
    from lightning.pytorch.callbacks import Timer

    limit = run_length(trainer)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    elapsed = timer.time_elapsed("train") if timer is not None else 0
    if remaining is None or elapsed <= 0:
        return limit
    by_time = done + int(remaining / (elapsed / done))
    return min(limit, by_time) if limit else by_time
