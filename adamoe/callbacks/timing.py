"""Epoch time, throughput and time-to-target, reduced over DDP ranks."""

import time

import torch
from lightning.pytorch import Callback

from adamoe.callbacks.summary import update_metrics_json
from adamoe.data.batch import token_counts
from adamoe.errors import ConfigError


def time_to_target(curve: list[dict], target: float, mode: str = "min", time: str = "train_s") -> float | None:
    """When an `EpochTimer` curve first reached `target`, in its `time` column, linearly
    interpolated between the validation before and the one that reached it. None if it
    never did."""
    sign = 1.0 if mode == "min" else -1.0
    for i, point in enumerate(curve):
        if sign * point["value"] <= sign * target:
            if i == 0:
                return point[time]
            prev = curve[i - 1]
            frac = (prev["value"] - target) / (prev["value"] - point["value"])
            return prev[time] + frac * (point[time] - prev[time])
    return None


class EpochTimer(Callback):
    """Epoch time per rank (max and mean), token throughput, and time-to-target: when
    `monitor` first reached `target`, counted to the start of that validation (the paper's
    measure of training time). Each validation adds a point to `curve`, from which
    `time_to_target` reads any other target afterwards. See the README's "Watching a run"."""

    def __init__(
        self, target: float | None = None, monitor: str = "val/loss", mode: str = "min", stop_at_target: bool = False
    ):
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if stop_at_target and target is None:
            raise ConfigError("stop_at_target needs a target")
        self.target, self.monitor, self.mode, self.stop_at_target = target, monitor, mode, stop_at_target

    def on_fit_start(self, trainer, pl_module):
        self.fit_start = time.perf_counter()
        self.epochs: list[dict] = []
        self.reached: dict | None = None
        self.curve: list[dict] = []
        self.train_s = 0.0  # training time of finished epochs, validations excluded
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts no epoch

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start, self.val_time, self.val_start = time.perf_counter(), 0.0, None
        self.tokens = torch.zeros((), dtype=torch.float64, device=pl_module.device)

    def _close_validation(self):
        # Validation ends at the next training batch, not at `on_validation_end`: the
        # checkpoint saved after it is not training time either.
        if self.val_start is not None:
            self.val_time += time.perf_counter() - self.val_start
            self.val_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close_validation()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        src, tgt = token_counts(batch)
        self.tokens += src.sum() + tgt.sum()

    def on_validation_start(self, trainer, pl_module):
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            self.val_start = None
            return
        train_s = self.train_s + self.val_start - self.epoch_start - self.val_time
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        self.curve.append(
            {
                "step": trainer.global_step,
                "wall_s": self.val_start - self.fit_start,
                "train_s": train_s,
                "value": float(value),
            }
        )
        if self.target is None or self.reached is not None:
            return
        if (float(value) <= self.target) if self.mode == "min" else (float(value) >= self.target):
            self.reached = {
                "seconds": self.val_start - self.fit_start,
                "train_s": train_s,
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "value": float(value),
            }
            if trainer.logger is not None:
                trainer.logger.log_metrics({"time/to_target_s": self.reached["seconds"]}, step=trainer.global_step)
            trainer.should_stop = trainer.should_stop or self.stop_at_target

    def on_train_epoch_end(self, trainer, pl_module):
        self._close_validation()
        elapsed = time.perf_counter() - self.epoch_start - self.val_time
        self.train_s += elapsed
        seconds = torch.tensor(elapsed, dtype=torch.float64, device=pl_module.device)
        per_rank = trainer.strategy.all_gather(seconds).reshape(-1)
        tokens = float(trainer.strategy.reduce(self.tokens, reduce_op="sum"))
        epoch = {
            "epoch": trainer.current_epoch,
            "max_s": float(per_rank.max()),
            "mean_s": float(per_rank.mean()),
            "tokens": int(tokens),
            "tokens_per_s": tokens / max(float(per_rank.max()), 1e-9),
        }
        self.epochs.append(epoch)
        if trainer.logger is not None:
            metrics = {f"time/epoch_{k}": epoch[k] for k in ("max_s", "mean_s")}
            metrics["time/tokens_per_s"] = epoch["tokens_per_s"]
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            update_metrics_json(
                log_dir,
                {
                    "epochs": self.epochs,
                    "tokens_per_s": sum(e["tokens"] for e in self.epochs)
                    / max(1e-9, sum(e["max_s"] for e in self.epochs)),
                    "time_to_target": {
                        "target": self.target,
                        "monitor": self.monitor,
                        **(self.reached or {"seconds": None}),
                    },
                    "curve": self.curve,
                },
            )


class CollectiveWait(Callback):
    """Per training step, each rank's seconds inside the expert all-to-all exchanges
    (`adamoe.parallel.CollectiveClock`: the wait for the slowest rank, plus the transfer) and
    the step's time, gathered over the ranks: `parallel/wait_s/rank<r>`, `parallel/wait_s_max`,
    `parallel/step_s`. What the paper's curriculum is meant to cut; expert parallelism only."""

    def on_train_start(self, trainer, pl_module):
        from adamoe.parallel import CollectiveClock

        self.clock = CollectiveClock
        self.clock.on = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock.seconds, self.started = 0.0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mine = torch.tensor([self.clock.seconds, time.perf_counter() - self.started], dtype=torch.float64)
        every = trainer.strategy.all_gather(mine).reshape(-1, 2)  # [ranks, (wait, step)]
        logs = {f"parallel/wait_s/rank{r}": float(w) for r, w in enumerate(every[:, 0])}
        logs |= {"parallel/wait_s_max": float(every[:, 0].max()), "parallel/step_s": float(every[:, 1].max())}
        pl_module.log_dict(logs, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_end(self, trainer, pl_module):
        self.clock.on = False
