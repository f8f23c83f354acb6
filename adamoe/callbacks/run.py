"""Run bookkeeping: a fixed checkpoint folder and a metrics.json summary."""

import json
import os
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint


def update_metrics_json(log_dir, entries: dict):
    """Merge `entries` into `<log_dir>/metrics.json`, which several callbacks write."""
    path = Path(log_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that saves to `<save_dir>/<name>/checkpoints`, the same folder for
    every version of a run, so that `--ckpt_path last` finds the previous run's last.ckpt."""

    def _fix_dirpath(self, trainer):
        if self.dirpath is None and trainer.loggers:
            logger = trainer.loggers[0]
            self.dirpath = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), "checkpoints")

    def setup(self, trainer, pl_module, stage):
        self._fix_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer):
        self._fix_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)


class MetricsSummary(Callback):
    """Writes `metrics.json` to the run folder at the end of fit: the final and the best
    validation metrics (best by `monitor`), and the wall time of fit."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode

    def on_fit_start(self, trainer, pl_module):
        self.start = time.perf_counter()
        self.best: dict | None = None
        self.last: dict = {}

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics.update(epoch=trainer.current_epoch, step=trainer.global_step)
        self.last = metrics
        value = metrics.get(self.monitor)
        if value is None:
            return
        best = None if self.best is None else self.best[self.monitor]
        if best is None or (value < best if self.mode == "min" else value > best):
            self.best = metrics

    def on_fit_end(self, trainer, pl_module):
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        summary = {"final": self.last, "best": self.best, "wall_time_s": time.perf_counter() - self.start, "global_step": trainer.global_step}
        update_metrics_json(log_dir, summary)
