"""What every task shares: the network, its gates and aux losses, training logs,
evaluation, optimizer and schedule, expert parallelism, and prediction files."""

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, Metric

from adamoe import schedulers
from adamoe.convert import ExpertInit, convert
from adamoe.data.batch import Batch
from adamoe.errors import CheckpointError, ConfigError, read_checkpoint
from adamoe.gates import Routing
from adamoe.parallel import expert_group, gather_experts, parallelize_experts, record_parameter_names, slice_experts
from adamoe.schedulers import RunSchedule, WarmupInverseSqrt
from adamoe.transformer import GateFactory, Network, Transformer, TransformerConfig

STAGES = ("val", "test")


@contextlib.contextmanager
def swapped_gates(net: nn.Module, gates: list):
    """Route with `gates` (sharing the trained routers) inside the block."""
    layers = net.moe_layers()
    trained = [layer.gate for layer in layers]
    for layer, gate in zip(layers, gates):
        layer.gate = gate
    try:
        yield
    finally:
        for layer, gate in zip(layers, trained):
            layer.gate = gate


class Perplexity(MeanMetric):
    """exp of the token-weighted mean cross-entropy."""

    def compute(self):
        return super().compute().exp()


class MoEModule(LightningModule):
    """The base of every task (see the README's "Fork it"). A task implements `step`,
    `metrics`, `update_metrics` and `predict`.

    `net` is a `TransformerConfig`, built here with the data's vocabulary, or a ready
    `Network` (an `nn.Module` with the `Transformer` interface). `inference_gate` routes
    validation, test and predict with another rule over the trained routers.
    `expert_parallel` spreads the experts over the DDP ranks (`adamoe.parallel`).
    `convert_from` starts a new run from a dense checkpoint of the same task: every shared
    weight copied, every MoE layer's experts filled as `convert_experts` says
    (`adamoe.convert`).

    Args:
        net: the network's shape (a TransformerConfig), or a ready Network
        vocab_size: set from the data
        pad_id: set from the data
        bos_id: set from the data
        eos_id: set from the data
        inference_gate: the gate validation, test and predict route with (null: the trained one)
        optimizer: the optimizer class and its arguments
        lr_scheduler: the learning-rate schedule, stepped every step
        predict_output: where predict writes (null: predictions.txt in the run's folder)
        expert_parallel: spread each MoE layer's experts over the DDP ranks
        convert_from: a dense checkpoint of the same task to start from
        convert_experts: how the experts of a conversion start: random, or copies of the FFN
        convert_noise: Gaussian noise on copied experts, in units of the FFN weights' std
    """

    def __init__(
        self,
        net: TransformerConfig | Network,
        vocab_size: int = 8000,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        inference_gate: GateFactory | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable = WarmupInverseSqrt,
        predict_output: str | None = None,
        expert_parallel: bool = False,
        convert_from: str | None = None,
        convert_experts: ExpertInit = "random",
        convert_noise: float = 0.0,
    ):
        super().__init__()
        # Under LightningCLI this stores the config (gates and optimizer as class paths), so
        # that `--ckpt_path` and `load_from_checkpoint` rebuild the same model.
        self.save_hyperparameters()
        if isinstance(net, TransformerConfig):
            self.check_config(net)
            net = Transformer(net, vocab_size, pad_id)
        self.net = net
        # Inference gates share the trained routers; kept out of the module tree so that
        # checkpoints hold each router once.
        self._inference_gates = []
        for layer in net.moe_layers() if inference_gate is not None else []:
            gate = inference_gate(layer.gate.router.in_features, layer.num_experts)
            gate.router = layer.gate.router
            self._inference_gates.append(gate)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.stage_metrics = nn.ModuleDict({stage: nn.ModuleDict(self.metrics(stage)) for stage in STAGES})
        self._predictions: list[tuple[int, str]] = []
        self.train_routings: list[Routing] = []

    # What a task writes.
    def check_config(self, config: TransformerConfig):
        """Raise a ConfigError for a shape the task cannot use (e.g. a decoder for an encoder task)."""

    def step(self, batch: Batch) -> tuple[torch.Tensor, dict, list[Routing]]:
        """The training loss of a batch, more values to log, and the routing records."""
        raise NotImplementedError

    def metrics(self, stage: str) -> dict[str, Metric]:
        """New metric objects for `stage` (val or test), logged as `{stage}/{name}`."""
        raise NotImplementedError

    def update_metrics(self, metrics: nn.ModuleDict, batch: Batch, batch_idx: int, stage: str):
        raise NotImplementedError

    def predict(self, batch: Batch) -> list[str]:
        """One line of output per sample."""
        raise NotImplementedError

    # What every task shares.
    def training_step(self, batch: Batch, batch_idx):
        loss, logs, routings = self.step(batch)
        aux = sum((r.aux_loss for r in routings), loss.new_zeros(()))
        bs = batch["index"].shape[0]
        self.log("train/loss", loss + aux, prog_bar=True, batch_size=bs)
        self.log_dict({"train/aux_loss": aux, **{f"train/{k}": v for k, v in logs.items()}}, batch_size=bs)
        # Callbacks read the routing of this forward pass instead of running another.
        self.train_routings = routings
        return loss + aux

    def _inference(self):
        return swapped_gates(self.net, self._inference_gates) if self._inference_gates else contextlib.nullcontext()

    def _evaluate(self, stage: str, batch: Batch, batch_idx: int):
        with self._inference():
            self.update_metrics(self.stage_metrics[stage], batch, batch_idx, stage)

    def validation_step(self, batch: Batch, batch_idx):
        self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: Batch, batch_idx):
        self._evaluate("test", batch, batch_idx)

    def _log_metrics(self, stage: str):
        metrics = self.stage_metrics[stage]
        # The sanity check's numbers, from untrained weights, would stay in the bar until the
        # first validation. compute() sums every metric's state over the ranks, so every rank
        # logs the same values: sync_dist then averages equal numbers.
        if self._trainer is None or not self.trainer.sanity_checking:
            self.log_dict(
                {f"{stage}/{name}": m.compute() for name, m in metrics.items()}, prog_bar=True, sync_dist=True
            )
        for m in metrics.values():
            m.reset()

    def on_validation_epoch_end(self):
        self._log_metrics("val")

    def on_test_epoch_end(self):
        self._log_metrics("test")

    def predict_step(self, batch: Batch, batch_idx):
        with self._inference():
            lines = self.predict(batch)
        self._predictions += zip(batch["index"].tolist(), lines)
        return lines

    def on_predict_epoch_end(self):
        gathered = [self._predictions]
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._predictions)
        self._predictions = []
        if self.trainer.is_global_zero:
            path = self.predictions_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(line + "\n" for _, line in sorted(p for part in gathered for p in part)))

    def configure_optimizers(self):
        try:
            optimizer = self.optimizer(self.parameters())
        except ValueError as e:  # torch's own checks of the optimizer's settings
            raise ConfigError(f"model.optimizer: {e}") from None
        rates = [g["lr"] for g in optimizer.param_groups if not g["lr"] > 0]
        if rates:
            raise ConfigError(f"the learning rate must be positive, got {rates[0]} ({type(optimizer).__name__})")
        scheduler = self.lr_scheduler(optimizer)
        if isinstance(scheduler, RunSchedule) and scheduler.run_length:
            scheduler.set_length(schedulers.run_length(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        scheduler = self.lr_schedulers()
        if (
            isinstance(scheduler, RunSchedule)
            and scheduler.run_length
            and self.global_step == schedulers.ESTIMATE_AFTER
        ):
            # Rank 0's clock decides: every rank must follow one schedule.
            scheduler.set_length(
                self.trainer.strategy.broadcast(schedulers.estimate_length(self.trainer, self.global_step))
            )
            rank_zero_info(
                f"The learning-rate schedule spans {scheduler.total_steps} steps (warmup {scheduler.warmup()})"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, because
        # fp16's loss scaler unscales inside the fused step. bf16 has no scaler: the gradients
        # are already true, so they are clipped here; with a scaler, Lightning decides.
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            clip = (
                torch.nn.utils.clip_grad_norm_
                if gradient_clip_algorithm in (None, "norm")
                else torch.nn.utils.clip_grad_value_
            )
            clip([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def metric_names(self) -> set[str]:
        """What the task logs, for checking a monitored name before the first step."""
        return {"train/loss", "train/aux_loss"} | {
            f"{stage}/{name}" for stage in STAGES for name in self.stage_metrics[stage]
        }

    def on_predict_start(self):
        # By default beside the predict run's config, in its own log folder.
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        self.predictions_path = Path(self.hparams.predict_output or Path(log_dir or ".") / "predictions.txt")
        if self.predictions_path.is_dir():
            raise ConfigError(f"predict_output {self.predictions_path} is a folder; give a file name")

    def setup(self, stage: str):
        # A resumed run's own checkpoint is loaded after this and replaces what it would copy.
        if self.hparams.convert_from and not self.trainer.ckpt_path and not getattr(self, "_converted", False):
            self._converted = True
            path = Path(self.hparams.convert_from)
            if not path.is_file():
                raise CheckpointError(f"convert_from {path}: no such checkpoint file")
            ckpt = read_checkpoint(path)
            if "state_dict" not in ckpt:
                raise CheckpointError(f"{path}: not a checkpoint (no state_dict)")
            saved_class, state = ckpt.get("hyper_parameters", {}).get("_class_path"), ckpt["state_dict"]
            if saved_class and saved_class.rsplit(".", 1)[-1] != type(self).__qualname__:
                raise CheckpointError(
                    f"convert_from {path} was saved by {saved_class}, for another task than {type(self).__qualname__}"
                )
            prefix = "net."
            dense = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            for notice in convert(self.net, dense, self.hparams.convert_experts, self.hparams.convert_noise, str(path)):
                rank_zero_info(notice)
            rank_zero_info(f"Converted {path} into this MoE model ({self.hparams.convert_experts} experts)")

    def configure_model(self):
        if (
            self.hparams.expert_parallel
            and dist.is_available()
            and dist.is_initialized()
            and expert_group(self) is None
        ):
            parallelize_experts(self)

    def on_save_checkpoint(self, checkpoint):
        if self._trainer is not None:
            record_parameter_names(checkpoint, self, self.trainer.optimizers)
        gather_experts(checkpoint, self)

    def on_load_checkpoint(self, checkpoint):
        slice_experts(checkpoint, self)
        check_compatible(checkpoint, self)


def check_compatible(checkpoint: dict, module: LightningModule):
    """A checkpoint of another task or model size fails here with the differences listed,
    instead of in `load_state_dict` with a page of them."""
    saved_class = checkpoint.get("hyper_parameters", {}).get("_class_path")
    ours = {n: tuple(t.shape) for n, t in module.state_dict().items()}
    theirs = {n: tuple(t.shape) for n, t in checkpoint["state_dict"].items()}
    problems = [f"{n}: checkpoint {theirs[n]}, model {ours[n]}" for n in ours if n in theirs and theirs[n] != ours[n]]
    problems += [f"missing {n}" for n in ours if n not in theirs] + [f"unexpected {n}" for n in theirs if n not in ours]
    if problems:
        other = saved_class and saved_class.rsplit(".", 1)[-1] != type(module).__qualname__
        task = f" (saved by {saved_class}, loading into {type(module).__qualname__})" if other else ""
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise CheckpointError(f"checkpoint does not fit this model{task}: {'; '.join(problems[:6])}{more}")
