"""What a user sees of a run: the model's size once, a progress bar, and TensorBoard's first page."""

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info

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
