"""Feeds the data module's curriculum with routing complexity and shows what the order does."""

import zlib

import numpy as np
import torch
from lightning.pytorch import Callback

from adamoe.data.batch import token_counts
from adamoe.data.sampler import Plan, spearman


class Curriculum(Callback):
    """Records each training sample's routing complexity (eq. 5) into the batch sampler
    and sums it over ranks at epoch end, so every rank orders the next epoch from the same
    table. Logs what the order did: `curriculum/spearman`, `within_batch_std` (and
    `_random`), and the modeled `ep_ranks`-GPU expert-parallel cost `ep_cost` with its
    `ep_assignments` (README, "Curriculum")."""

    def __init__(self, ep_ranks: int = 8):
        self.ep_ranks = ep_ranks
        self._trainer = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.loads = []
        # Ranks that disagree on the order would silently train on overlapping shards.
        plan = trainer.datamodule.train_sampler.global_batches()
        checksum = torch.tensor(
            [float(zlib.crc32(memoryview(np.ascontiguousarray(plan.order))))]
        )  # no copy of the order
        sums = trainer.strategy.all_gather(checksum.to(trainer.strategy.root_device)).reshape(-1)
        if not torch.all(sums == sums[0]):
            raise RuntimeError(
                f"ranks computed different batch orders for epoch {trainer.current_epoch}: checksums {sums.tolist()}"
            )

    on_fit_start = on_train_epoch_start  # a run resumed mid-epoch starts no epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        routings = pl_module.train_routings
        if not routings:
            return
        B = batch["index"].shape[0]
        src_B, tgt_B = token_counts(batch)
        two_BL = torch.stack([r.extra_expert_counts(B) for r in routings], 1)
        tokens_BL = torch.stack([src_B if side == "source" else tgt_B for side in pl_module.net.moe_layer_sides], 1)
        trainer.datamodule.train_sampler.record(batch["index"], two_BL, tokens_BL)
        self.loads.append(torch.stack([r.expert_load_E for r in routings]).double())

    def state_dict(self):
        # Runs on every rank while a checkpoint is made, before the data module's state.
        trainer = self._trainer
        if trainer is not None and trainer.datamodule is not None and trainer.datamodule.train_sampler is not None:
            trainer.datamodule.train_sampler.sync_partial(lambda t: self._reduce(trainer, t))
        return {}

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer

    @staticmethod
    def _reduce(trainer, t: torch.Tensor) -> torch.Tensor:
        device = trainer.strategy.root_device
        return trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()

    def on_train_epoch_end(self, trainer, pl_module):
        sampler = trainer.datamodule.train_sampler
        plan = sampler.global_batches()
        summed = sampler.end_epoch(lambda t: self._reduce(trainer, t))
        metrics = {}
        if self.loads:
            loads_ILE = self._reduce(trainer, torch.stack(self.loads))
            E = loads_ILE.shape[-1]
            groups = min(self.ep_ranks, E)
            if E % groups == 0:
                metrics["curriculum/ep_cost"] = float(
                    loads_ILE.view(*loads_ILE.shape[:2], groups, -1).sum(-1).amax(-1).sum()
                )
                # With this, groups x ep_cost / ep_assignments is the imbalance factor (1 = even).
                metrics["curriculum/ep_assignments"] = float(loads_ILE.sum())
        if summed is not None:
            two, tokens = summed
            share_N = two.sum(1).double() / tokens.sum(1).clamp_min(1)
            order = torch.from_numpy(plan.order)
            seen = tokens.sum(1)[order] > 0
            metrics["curriculum/spearman"] = spearman(torch.arange(order.numel())[seen].double(), share_N[order][seen])
            metrics["curriculum/within_batch_std"] = _mean_std(share_N.numpy(), plan)
            g = torch.Generator().manual_seed(sampler.seed + sampler.epoch)
            shuffled = Plan(
                plan.order[torch.randperm(len(plan.order), generator=g).numpy()], plan.bounds
            )  # same batch sizes
            metrics["curriculum/within_batch_std_random"] = _mean_std(share_N.numpy(), shuffled)
        if metrics and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self.last_metrics = metrics


def _mean_std(share_N: np.ndarray, plan: Plan) -> float:
    """Mean over batches of more than one sample of the std of `share_N` within the batch."""
    if not len(plan):
        return 0.0
    values, starts, sizes = share_N[plan.order], plan.bounds[:-1], np.diff(plan.bounds)
    mean = np.add.reduceat(values, starts) / sizes
    std = np.sqrt(np.maximum(np.add.reduceat(values**2, starts) / sizes - mean**2, 0))
    return float(std[sizes > 1].mean()) if (sizes > 1).any() else 0.0
