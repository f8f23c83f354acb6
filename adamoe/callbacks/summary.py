"""What a user sees of a run: the model's size once, a progress bar, TensorBoard's first
page, and `metrics.json` at the end."""

import json
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

from adamoe.errors import ConfigError
from adamoe.moe import MoELayer


def count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


class ParameterSummary(Callback):
    """The model's parameters in one line: in all, in the experts, and how many experts
    each MoE layer has. It replaces Lightning's module table, which lists every submodule."""

    def on_fit_start(self, trainer, pl_module):
        layers = [m for m in pl_module.modules() if isinstance(m, MoELayer)]
        held = [sum(p.numel() for p in m.experts.parameters()) for m in layers]
        # Under expert parallelism a rank holds a slice of each layer's experts: count whole layers.
        experts = sum(n * m.num_experts // m.experts.w0_EDF.shape[0] for n, m in zip(held, layers))
        total = sum(p.numel() for p in pl_module.parameters()) - sum(held) + experts
        what = f"{type(pl_module).__name__}: {count(total)} parameters"
        if layers:
            sizes = sorted({m.num_experts for m in layers})
            what += f", {count(experts)} of them in {len(layers)} MoE layers of {'/'.join(map(str, sizes))} experts"
        rank_zero_info(what)


class ProgressBar(RichProgressBar):
    """Lightning's progress bar without the logger's version number, which the run's
    folder name already says."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


# TensorBoard's custom-scalars page: the charts to look at first, one group per row. Each
# chart gathers the tags that match its patterns, so a task shows the metrics it has.
LAYOUT = {
    "Training": {
        "loss": ["Multiline", [r"^train/loss$", r"^val/loss$"]],
        "quality": ["Multiline", [r"^val/(bleu|acc|f1|ppl|mse)$"]],
        "learning rate": ["Multiline", [r"^lr-"]],
    },
    "Experts": {
        "experts per token": ["Multiline", [r"^experts/[^/]+/experts_per_token$"]],
        "load imbalance (max/mean)": ["Multiline", [r"^experts/[^/]+/load_imbalance$"]],
        "auxiliary loss": ["Multiline", [r"^train/aux_loss$"]],
    },
}


class TensorBoardLayout(Callback):
    """Writes `LAYOUT` (or `layout`) as TensorBoard's custom-scalars page, which opens on
    loss, quality, learning rate, experts per token and load imbalance rather than on
    the alphabetical list of every tag."""

    def __init__(self, layout: dict | None = None):
        self.layout = layout or LAYOUT

    def on_fit_start(self, trainer, pl_module):
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and hasattr(experiment, "add_custom_scalars"):
            experiment.add_custom_scalars(self.layout)


def update_metrics_json(log_dir, entries: dict):
    """Merge `entries` into `<log_dir>/metrics.json`, which several callbacks write."""
    path = Path(log_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


class MetricsSummary(Callback):
    """Writes `metrics.json` to the run folder at the end of fit: the final and the best
    validation metrics (best by `monitor`; by default the checkpoint's monitor), and the
    wall time of fit."""

    def __init__(self, monitor: str | None = None, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode

    def on_fit_start(self, trainer, pl_module):
        ckpt = trainer.checkpoint_callback
        if self.monitor is None:
            self.monitor, self.mode = (
                (ckpt.monitor, ckpt.mode) if ckpt is not None and ckpt.monitor else ("val/loss", "min")
            )
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
        summary = {
            "final": self.last,
            "best": self.best,
            "wall_time_s": time.perf_counter() - self.start,
            "global_step": trainer.global_step,
        }
        if getattr(pl_module, "hparams", {}).get("convert_from"):
            summary["converted_from"] = str(pl_module.hparams.convert_from)
        update_metrics_json(log_dir, summary)
