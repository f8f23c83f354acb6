"""Expert statistics: what the routers did, summed over steps and DDP ranks."""

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import Tensor

from adamoe.data.batch import token_counts
from adamoe.gates import Routing
from adamoe.gates import counts as occurrences
from adamoe.parallel import expert_group

# Columns of a layer's count row; the E expert loads follow, then the E + 1 counts of
# tokens on 0, 1, ..., E experts.
TOKENS, TWO_EXPERT, ASSIGNMENTS, DROPPED, ENTROPY, AUX, STEPS, EP_RECEIVED, EP_BYTES = range(9)
FIELDS = 9


def loads(counts_LC: Tensor) -> Tensor:
    """Each layer's assignments per expert, [L, E]."""
    E = (counts_LC.shape[1] - FIELDS - 1) // 2
    return counts_LC[:, FIELDS : FIELDS + E]


def experts_per_token(counts_LC: Tensor) -> Tensor:
    """Each layer's non-padding tokens on 0, 1, ..., E experts, [L, E + 1]."""
    E = (counts_LC.shape[1] - FIELDS - 1) // 2
    return counts_LC[:, FIELDS + E :]


def routing_counts(routings: list[Routing], dispatchers: list | None = None) -> Tensor:
    """One float64 row per MoE layer: counts that add up over steps and ranks. The
    dispatchers (one a layer, as last called) give what crossed between ranks."""
    rows = []
    for r, d in zip(routings, dispatchers or [None] * len(routings)):
        # Host numbers, copied from pinned memory without waiting: a copy from pageable
        # memory to a GPU waits for everything queued before it.
        device = r.expert_load_E.device
        head = torch.tensor(
            [
                r.num_tokens,
                0,
                r.token_index_N.numel(),
                r.dropped,
                0,
                0,
                1,
                d.received if d else 0,
                d.sent_bytes if d else 0,
            ],
            dtype=torch.float64,
            pin_memory=device.type == "cuda",
        ).to(device, non_blocking=True)
        head[TWO_EXPERT] = (r.experts_per_token_T >= 2).sum()
        head[ENTROPY] = r.router_entropy.detach()
        head[AUX] = r.aux_loss.detach()
        per_token = occurrences(r.experts_per_token_T, r.expert_load_E.numel() + 1).double()
        per_token[0] -= r.experts_per_token_T.numel() - r.num_tokens  # padding counts as 0 experts
        rows.append(torch.cat([head, r.expert_load_E.double(), per_token]))
    return torch.stack(rows)


def summarize(counts_LC: Tensor, names: list[str]) -> dict[str, float]:
    """Scalars from summed counts: per layer, then for the whole model."""
    out = {}
    load_LE = loads(counts_LC)
    for i, name in enumerate(names):
        c, tokens = counts_LC[i], counts_LC[i, TOKENS].clamp_min(1)
        load = load_LE[i]
        out[f"experts/{name}/two_expert_share"] = float(c[TWO_EXPERT] / tokens)
        out[f"experts/{name}/experts_per_token"] = float(c[ASSIGNMENTS] / tokens)
        out[f"experts/{name}/load_imbalance"] = float(load.max() / load.mean().clamp_min(1e-12))
        out[f"experts/{name}/router_entropy"] = float(c[ENTROPY] / tokens)
        out[f"experts/{name}/aux_loss"] = float(c[AUX] / c[STEPS].clamp_min(1))  # mean over steps and ranks
        out[f"experts/{name}/dropped"] = float(c[DROPPED])
    if len(names):
        tokens = counts_LC[:, TOKENS].sum().clamp_min(1)
        out["experts/model/two_expert_share"] = float(counts_LC[:, TWO_EXPERT].sum() / tokens)
        out["experts/model/experts_per_token"] = float(counts_LC[:, ASSIGNMENTS].sum() / tokens)
    return out


class ExpertStats(Callback):
    """What the routers did, per MoE layer and for the model, every `log_every_n_steps`
    and per epoch (`_epoch`), from the routing each training step returned, summed over
    steps and DDP ranks; with expert parallelism also the straggler and all-to-all bytes.
    At epoch end, the paper's Figure 2, and the expert-load heatmap: each cell the share of
    a layer's assignments that an expert took, in percent, coloured by its distance from
    the even share (white), every `heatmap_every_n_steps` or, by default, every epoch."""

    def __init__(self, heatmap_every_n_steps: int | None = None):
        self.heatmap_every_n_steps = heatmap_every_n_steps

    def on_fit_start(self, trainer, pl_module):
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts no epoch

    def on_train_epoch_start(self, trainer, pl_module):
        self.step_counts = self.epoch_counts = self.heat_counts = None
        self.step_tokens = self.epoch_tokens = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dispatchers = [layer.dispatcher for layer in pl_module.net.moe_layers()]
        counts = routing_counts(pl_module.train_routings, dispatchers) if pl_module.train_routings else None
        tokens = torch.stack([t.sum() for t in token_counts(batch)]).double()
        self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        self.epoch_counts = counts if self.epoch_counts is None else self.epoch_counts + counts
        self.heat_counts = counts if self.heat_counts is None else self.heat_counts + counts
        every = self.heatmap_every_n_steps
        if every and counts is not None and trainer.global_step % every == 0:
            total = trainer.strategy.reduce(self.heat_counts.clone(), reduce_op="sum")  # every rank takes part
            if trainer.is_global_zero:
                self._heatmap(trainer, pl_module.net.moe_layer_names, total)
            self.heat_counts = None
        self.step_tokens = self.step_tokens + tokens
        self.epoch_tokens = self.epoch_tokens + tokens
        self.batches += 1
        if self.batches % trainer.log_every_n_steps == 0:
            self._log(trainer, pl_module, self.step_counts, self.step_tokens, "")
            self.step_counts, self.step_tokens = None, torch.zeros_like(self.step_tokens)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.batches:
            counts = self._log(trainer, pl_module, self.epoch_counts, self.epoch_tokens, "_epoch")
            if counts is not None and trainer.is_global_zero:
                self._figures(trainer, pl_module.net.moe_layer_names, counts)

    def _log(self, trainer, pl_module, counts, tokens, suffix):
        model = pl_module.net
        # Every rank reduces, also those with nothing to say: the collectives must match.
        # Reductions may work in place, and the step and epoch sums can share a tensor: copy.
        tokens = trainer.strategy.reduce(tokens.clone(), reduce_op="sum")
        ep = counts is not None and expert_group(model) is not None
        if ep:
            steps = counts[0, STEPS].clamp_min(1)
            received_WL = trainer.strategy.all_gather(counts[:, EP_RECEIVED] / steps).reshape(-1, counts.shape[0])
        if counts is not None:
            counts = trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        metrics = summarize(counts, model.moe_layer_names) if counts is not None else {}
        if ep:
            for i, name in enumerate(model.moe_layer_names):
                metrics[f"experts/{name}/ep_received_max"] = float(received_WL[:, i].max())
                metrics[f"experts/{name}/ep_received_mean"] = float(received_WL[:, i].mean())
            metrics["experts/model/ep_bytes_per_step"] = float(counts[:, EP_BYTES].sum() / steps)
        assignments = int(counts[:, ASSIGNMENTS].sum()) if counts is not None else 0
        src, tgt = int(tokens[0]), int(tokens[1])
        metrics["experts/model/active_flops_per_token"] = model.forward_flops(src, tgt, assignments) / max(1, src + tgt)
        if not any(layer.capacity_factor for layer in model.moe_layers()):
            metrics = {k: v for k, v in metrics.items() if not k.endswith("/dropped")}
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics({k + suffix: v for k, v in metrics.items()}, step=trainer.global_step)
            experiment = getattr(trainer.logger, "experiment", None)
            if counts is not None and hasattr(experiment, "add_histogram_raw"):
                self._histograms(experiment, model.moe_layer_names, counts.cpu(), suffix, trainer.global_step)
        return counts

    @staticmethod
    def _histograms(experiment, names, counts, suffix, step):
        """Per layer: the loads of the experts, and how many tokens got 0, 1, ..., E experts."""
        for name, load, per_token in zip(names, loads(counts), experts_per_token(counts)):
            experiment.add_histogram(f"experts/{name}/tokens_per_expert{suffix}", load, step)
            k = torch.arange(len(per_token), dtype=torch.float64)
            used = k[per_token > 0] if bool((per_token > 0).any()) else k[:1]
            total, first, second = per_token.sum(), (k * per_token).sum(), (k**2 * per_token).sum()
            experiment.add_histogram_raw(
                f"experts/{name}/experts_per_token_hist{suffix}", float(used.min()), float(used.max()),
                float(total), float(first), float(second), (k + 0.5).tolist(), per_token.tolist(), step,
            )  # fmt: skip

    def _heatmap(self, trainer, names, counts):
        if not hasattr(getattr(trainer.logger, "experiment", None), "add_figure"):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm

        load = loads(counts).cpu()
        share = (load / load.sum(1, keepdim=True).clamp_min(1)).numpy()
        E = load.shape[1]
        fig, ax = plt.subplots(figsize=(max(5, 1.5 + 0.6 * E), max(3, 1 + 0.45 * len(names))), layout="constrained")
        im = ax.imshow(
            share, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1 / E, vmin=0, vmax=max(2 / E, share.max())), aspect="auto"
        )
        for (row, col), value in np.ndenumerate(share):
            ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set(xticks=range(E), xticklabels=[str(e) for e in range(E)], yticks=range(len(names)), yticklabels=names)
        ax.set(xlabel="expert", title=f"% of each layer's assignments per expert (even: {100 / E:.1f}%, white)")
        fig.colorbar(im, ax=ax)
        trainer.logger.experiment.add_figure("experts/load_heatmap", fig, trainer.global_step)

    def _figures(self, trainer, names, counts):
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_figure"):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.heatmap_every_n_steps:
            self._heatmap(trainer, names, counts)
        two = (counts[:, TWO_EXPERT] / counts[:, TOKENS].clamp_min(1)).cpu().numpy()
        fig, ax = plt.subplots(figsize=(max(5, 1 + 0.6 * len(names)), 3.5), layout="constrained")
        ax.bar(names, two)
        ax.set(ylabel="share of tokens on two experts", ylim=(0, 1), title="two-expert share per layer")
        experiment.add_figure("experts/two_expert_share", fig, trainer.global_step)
