"""What the console shows of a run: the model's size once, then a progress bar."""

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
