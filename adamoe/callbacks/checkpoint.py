"""Resuming: checkpoints that a kill cannot corrupt, saved on a signal, and the random
streams a resumed run continues from."""

import datetime
import os
import random
import signal
import threading
import time
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from adamoe.errors import ConfigError, Interrupted


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its target and renames it into place: a kill or a full
    disk mid-write leaves the previous file whole. (Lightning's own writer stages in the
    system temp folder, which is often another file system: the final move is a copy.)"""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that a kill or a signal cannot cost more than a little training. It
    saves into its run's folder, `<save_dir>/<name>/<version>/checkpoints` (Lightning's own
    default), where `--ckpt_path last` looks for the newest run's last.ckpt.

    `save_last_every` (default 30 minutes) also writes `last.ckpt` during an epoch, so
    that a killed run loses at most that much training, however long its epochs. Ctrl-C
    (SIGINT) or a scheduler's SIGTERM writes `last.ckpt` at the end of the current step and
    stops the run with `Interrupted`, which says how to resume; a second Ctrl-C stops at once.
    """

    def __init__(self, *args, save_last_every: datetime.timedelta | None = datetime.timedelta(minutes=30), **kwargs):
        super().__init__(*args, **kwargs)
        self.save_last_every = save_last_every
        self._signal: int | None = None
        self._stopped: Interrupted | None = None
        self._handlers: dict = {}

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.monitor and hasattr(pl_module, "metric_names"):
            known = pl_module.metric_names()
            if self.monitor not in known:
                task = type(pl_module).__name__
                raise ConfigError(
                    f"checkpoint.monitor {self.monitor!r} is not logged by {task}; it logs {sorted(known)}"
                )
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(".*.tmp"):  # left by a writer that was killed
                stale.unlink(missing_ok=True)

    def load_state_dict(self, state_dict):
        # Another folder is another run (an evaluation, a copied checkpoint): nothing of the
        # saved bookkeeping applies to it.
        if (
            self.dirpath
            and state_dict.get("dirpath")
            and Path(state_dict["dirpath"]).resolve() != Path(self.dirpath).resolve()
        ):
            return
        # Paths in a checkpoint are data: a file this callback would later delete as a worse
        # top-k checkpoint must lie in its own folder.
        folder = Path(self.dirpath or state_dict.get("dirpath") or ".").resolve()
        state_dict = dict(state_dict)
        state_dict["best_k_models"] = {
            p: v for p, v in state_dict.get("best_k_models", {}).items() if Path(p).resolve().parent == folder
        }
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if state_dict.get(key) and Path(state_dict[key]).resolve().parent != folder:
                state_dict[key] = ""
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._last_saved_at = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self._signal = signum
        signal.signal(signum, self._handlers.get(signum, signal.SIG_DFL))  # a second one is not caught

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.fast_dev_run:
            return
        # Every rank saves the same step: a signal that reached any rank stops them all.
        stop = trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False)
        due = False
        if self.save_last and self.save_last_every is not None:
            # Saving is collective (every rank contributes state): rank 0's clock decides for all.
            due = trainer.strategy.broadcast(
                time.monotonic() - self._last_saved_at >= self.save_last_every.total_seconds()
            )
        if stop or due:
            # Written directly rather than through ModelCheckpoint's bookkeeping, which would
            # then skip the top-k save of a validation at this same step.
            path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path, self.save_weights_only)
            self.last_model_path = path
            self._last_saved_at = time.monotonic()
        if stop:
            name = signal.Signals(self._signal).name if self._signal else "a signal to another rank"
            self._stopped = Interrupted(
                f"stopped by {name} at step {trainer.global_step}, saved {path}; resume with the same command and "
                f"--ckpt_path {path}",
                128 + (self._signal or signal.SIGTERM),
            )

    # Raised at the next hook, once this step's metrics are logged, rather than through
    # `should_stop`, which would validate first: a scheduler's grace after SIGTERM is short.
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._stopped is not None:
            raise self._stopped

    def on_validation_start(self, trainer, pl_module):
        super().on_validation_start(trainer, pl_module)
        if self._stopped is not None:
            raise self._stopped

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        self._last_saved_at = time.monotonic()


class RandomState(Callback):
    """Saves every rank's random streams (torch, CUDA, Python's `random`) in checkpoints and
    restores them just before the first training batch of a resumed run, so that dropout
    draws the same masks as the run that was never stopped. With another number of ranks
    the streams cannot match; the run goes on and says so."""

    def state_dict(self):
        trainer = self._trainer
        state = torch.cat(
            [torch.get_rng_state(), torch.tensor(random.getstate()[1], dtype=torch.int64).view(torch.uint8)]
        )
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            state = torch.cat([state, torch.cuda.get_rng_state(trainer.strategy.root_device)])
        gathered = trainer.strategy.all_gather(state.to(trainer.strategy.root_device))
        return {"per_rank": gathered.reshape(trainer.world_size, -1).cpu(), "python_version": random.getstate()[0]}

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer
        self._pending = None

    def load_state_dict(self, state):
        self._pending = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state, self._pending = self._pending, None
        if state is None:
            return
        if state["per_rank"].shape[0] != trainer.world_size:
            rank_zero_warn(
                f"checkpoint saved with {state['per_rank'].shape[0]} ranks, resumed with {trainer.world_size}: random "
                "streams start anew"
            )
            return
        row = state["per_rank"][trainer.global_rank]
        n_torch = torch.get_rng_state().numel()
        n_py = 625 * 8  # Mersenne Twister: 624 words and a position, saved as int64 bytes
        torch.set_rng_state(row[:n_torch].clone())
        random.setstate(
            (state["python_version"], tuple(row[n_torch : n_torch + n_py].view(torch.int64).tolist()), None)
        )
        if row.numel() > n_torch + n_py:
            torch.cuda.set_rng_state(row[n_torch + n_py :].clone(), trainer.strategy.root_device)
