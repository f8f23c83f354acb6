"""LightningModules around the MoE transformer: a shared base and one small class per task."""

import contextlib
import math
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.text import SacreBLEUScore

from adamoe.errors import CheckpointError, ConfigError
from adamoe.gates import Top2Gate
from adamoe.ops import cross_entropy
from adamoe.transformer import GateFactory, Transformer


class WarmupInverseSqrt(LambdaLR):
    """Linear warmup to the optimizer's lr, then decay by 1/sqrt(step) (Vaswani et al.)."""

    def __init__(self, optimizer, warmup_steps: int = 1000):
        w = max(1, warmup_steps)
        super().__init__(optimizer, lambda step: min((step + 1) / w, math.sqrt(w / (step + 1))))


class WarmupCosine(LambdaLR):
    """Linear warmup, then cosine decay to `min_ratio` of the lr at `total_steps`."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 1000, min_ratio: float = 0.0):
        w = max(1, warmup_steps)

        def ratio(step):
            if step < w:
                return (step + 1) / w
            progress = min(1.0, (step - w) / max(1, total_steps - w))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, ratio)


@contextlib.contextmanager
def swapped_gates(model: Transformer, gates: list):
    """Route with `gates` (sharing the trained routers) inside the block."""
    layers = model.moe_layers()
    trained = [layer.gate for layer in layers]
    for layer, gate in zip(layers, gates):
        layer.gate = gate
    try:
        yield
    finally:
        for layer, gate in zip(layers, trained):
            layer.gate = gate


class MoEModule(LightningModule):
    """What every task shares: the MoE transformer, its gates and aux losses, training
    logs, optimizer and schedule, expert parallelism, and prediction files. A task
    implements `step` (loss and routing of a batch) and its evaluation.

    Logs `train/loss` (what is minimized: the task loss plus the MoE aux losses) and
    `train/aux_loss`, plus what the task's `step` returns.

    `inference_gate`, when set, routes validation, test and predict with another rule
    over the same trained routers, e.g. top-1 routing for an adaptively trained model.

    `expert_parallel`: under DDP with W ranks, each rank holds E/W experts of every MoE
    layer and tokens travel to them by all-to-all (`adamoe.parallel`). Dense weights stay
    data-parallel; expert weights are left out of DDP's all-reduce, and their gradients,
    which already sum every rank's tokens, are divided by W to match DDP's mean.
    Checkpoints always hold all E experts (and their optimizer state), so a run saved
    with W ranks resumes with any W that divides E, or on one device.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        d_model: int = 256,
        n_heads: int = 4,
        d_ff: int = 1024,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        num_experts: int = 8,
        moe_every: int = 2,
        gate: GateFactory = Top2Gate,
        activation: str = "relu",
        capacity_factor: float | None = None,
        dropout: float = 0.1,
        tie_embeddings: bool = True,
        inference_gate: GateFactory | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable = WarmupInverseSqrt,
        predict_output: str = "predictions.txt",
        expert_parallel: bool = False,
    ):
        super().__init__()
        # Under LightningCLI this stores the config (gates and optimizer as class paths), so
        # that `--ckpt_path` and `load_from_checkpoint` rebuild the same model.
        self.save_hyperparameters()
        self.model = Transformer(
            vocab_size, pad_id, d_model, n_heads, d_ff, num_encoder_layers, num_decoder_layers, num_experts, moe_every,
            gate, activation, capacity_factor, dropout, tie_embeddings,
        )  # fmt: skip
        # Inference gates share the trained routers; kept out of the module tree so that
        # checkpoints hold each router once.
        self._inference_gates = []
        if inference_gate is not None:
            for layer in self.model.moe_layers():
                g = inference_gate(d_model, num_experts)
                g.router = layer.gate.router
                self._inference_gates.append(g)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self._predictions: list[tuple[int, str]] = []
        self.train_routings: list = []

    def step(self, batch) -> tuple[torch.Tensor, dict, list]:
        """The task loss of a batch, more values to log, and the routing records."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        loss, logs, routings = self.step(batch)
        aux = sum((r.aux_loss for r in routings), loss.new_zeros(()))
        bs = batch["index"].shape[0]
        self.log("train/loss", loss + aux, prog_bar=True, batch_size=bs)
        self.log_dict({"train/aux_loss": aux, **{f"train/{k}": v for k, v in logs.items()}}, batch_size=bs)
        # Callbacks read the routing of this forward pass instead of running another.
        self.train_routings = routings
        return loss + aux

    def _inference(self):
        return swapped_gates(self.model, self._inference_gates) if self._inference_gates else contextlib.nullcontext()

    def log_epoch(self, values: dict):
        # Metric objects' compute() sums their states over all ranks, so every rank holds
        # the same values here: sync_dist averages equal numbers.
        self.log_dict(values, prog_bar=True, sync_dist=True)

    def on_predict_epoch_end(self):
        gathered = [self._predictions]
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._predictions)
        self._predictions = []
        if self.trainer.is_global_zero:
            path = Path(self.hparams.predict_output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(h + "\n" for _, h in sorted(p for part in gathered for p in part)))

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def _ep_world(self) -> int:
        return dist.get_world_size() if self.hparams.expert_parallel and dist.is_available() and dist.is_initialized() else 1

    def _expert_flags(self) -> list[tuple[str, torch.nn.Parameter, bool]]:
        """(name, parameter, is it an expert weight?) in `self.parameters()` order, which is
        also the optimizer's."""
        experts = {id(p) for layer in self.model.moe_layers() for p in layer.experts.parameters()}
        return [(n, p, id(p) in experts) for n, p in self.named_parameters()]

    def configure_model(self):
        W = self._ep_world()
        if W == 1 or any(layer.ep_group is not None for layer in self.model.moe_layers()):
            return
        for layer in self.model.moe_layers():
            layer.shard()
            for p in layer.experts.parameters():
                p.register_hook(lambda g: g / W)
        ignore = [n for n, _, is_expert in self._expert_flags() if is_expert]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignore)

    def _map_expert_state(self, checkpoint, fn):
        """Apply fn(tensor, local parameter) to every expert tensor of a checkpoint: the
        weights and their optimizer state."""
        for i, (name, p, is_expert) in enumerate(self._expert_flags()):
            if not is_expert:
                continue
            checkpoint["state_dict"][name] = fn(checkpoint["state_dict"][name], p)
            for opt in checkpoint.get("optimizer_states", []):
                if i in opt["state"]:
                    opt["state"][i] = {k: fn(v, p) if torch.is_tensor(v) and v.dim() else v for k, v in opt["state"][i].items()}

    def on_save_checkpoint(self, checkpoint):
        # Every rank runs this while a checkpoint is made: each contributes its experts.
        if self._ep_world() > 1:
            self._map_expert_state(checkpoint, lambda t, p: torch.cat(list(self.all_gather(t.contiguous())), 0))

    def on_load_checkpoint(self, checkpoint):
        W = self._ep_world()
        if W > 1:
            rank = dist.get_rank()
            self._map_expert_state(checkpoint, lambda t, p: t[rank * p.shape[0] : (rank + 1) * p.shape[0]])
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



class TranslationModule(MoEModule):
    """Sequence to sequence: label-smoothed cross-entropy (`train/nll` is the plain one).

    Per validation: `val/loss` (token cross-entropy), `val/ppl` and `val/bleu` (sacreBLEU,
    0-100, greedy decodes of the first `bleu_batches` batches of each rank; not logged
    with `bleu_batches: 0`). `test`
    decodes with beam search; `predict` writes one hypothesis a line, in dataset order,
    to `predict_output`.
    """

    def __init__(
        self,
        label_smoothing: float = 0.1,
        bleu_batches: int = -1,
        max_decode_len: int = 256,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_bleu, self.test_bleu = SacreBLEUScore(), SacreBLEUScore()

    def forward(self, batch):
        return self.model(batch["src"], batch["tgt_in"], batch["src_pad"], batch["tgt_pad"])

    def _losses(self, batch):
        logits, routings = self(batch)
        target = batch["tgt_out"]
        pad = self.hparams.pad_id
        smoothed, nll = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), pad, self.hparams.label_smoothing)
        return smoothed, nll, target.ne(pad).sum(), routings

    def step(self, batch):
        smoothed, nll, _, routings = self._losses(batch)
        return smoothed, {"nll": nll}, routings

    def decode(self, batch, beam_size: int) -> list[str]:
        src = batch["src"]
        max_len = min(self.hparams.max_decode_len, int(src.shape[1] * 1.5) + 10)
        out = self.model.generate(src, self.hparams.bos_id, self.hparams.eos_id, max_len, beam_size, self.hparams.length_penalty)
        decode = self.trainer.datamodule.decode
        return [decode(row) for row in out.tolist()]

    def _evaluate(self, batch, batch_idx, loss_metric, bleu_metric, beam_size, bleu_batches):
        with self._inference():
            _, nll, ntokens, _ = self._losses(batch)
            loss_metric.update(nll, weight=ntokens)
            if bleu_batches < 0 or batch_idx < bleu_batches:
                bleu_metric.update(self.decode(batch, beam_size), [[t] for t in batch["target"]])

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, self.val_loss, self.val_bleu, 1, self.hparams.bleu_batches)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, self.test_loss, self.test_bleu, self.hparams.beam_size, -1)

    def _log_eval(self, stage, loss_metric, bleu_metric, bleu: bool = True):
        loss = loss_metric.compute()
        values = {f"{stage}/loss": loss, f"{stage}/ppl": loss.exp()}
        if bleu:
            values[f"{stage}/bleu"] = 100 * bleu_metric.compute()
        self.log_epoch(values)
        loss_metric.reset()
        bleu_metric.reset()

    def on_validation_epoch_end(self):
        self._log_eval("val", self.val_loss, self.val_bleu, self.hparams.bleu_batches != 0)

    def on_test_epoch_end(self):
        self._log_eval("test", self.test_loss, self.test_bleu)

    def predict_step(self, batch, batch_idx):
        with self._inference():
            hyps = self.decode(batch, self.hparams.beam_size)
        self._predictions += zip(batch["index"].tolist(), hyps)
        return hyps


class ClassificationModule(MoEModule):
    """Encoder-only classification: a linear head on the mean (or first-token) encoder
    state. Logs `val/loss`, `val/acc` (accuracy) and `val/f1` (macro F1), likewise for
    test; predict writes one class id a line. `num_classes` comes from the data."""

    def __init__(self, num_classes: int = 2, pooling: Literal["mean", "first"] = "mean", **kwargs):
        # A checkpoint's hyperparameters hold the 0 given here; anything else is a mistake.
        if kwargs.pop("num_decoder_layers", 0):
            raise ConfigError("ClassificationModule is encoder-only: it has no decoder layers")
        if num_classes < 2:
            raise ConfigError(f"ClassificationModule needs num_classes >= 2, got {num_classes}")
        super().__init__(num_decoder_layers=0, **kwargs)
        self.head = torch.nn.Linear(self.hparams.d_model, num_classes)
        self.metrics = torch.nn.ModuleDict(
            {
                stage: torch.nn.ModuleDict(
                    {"loss": MeanMetric(), "acc": MulticlassAccuracy(num_classes, average="micro"), "f1": MulticlassF1Score(num_classes, average="macro")}
                )
                for stage in ("val", "test")
            }
        )

    def forward(self, batch):
        states, routings = self.model.encode(batch["src"], batch["src_pad"])
        if self.hparams.pooling == "first":
            pooled = states[:, 0]
        else:
            real = (~batch["src_pad"]).unsqueeze(-1).to(states.dtype)
            pooled = (states * real).sum(1) / real.sum(1).clamp_min(1)
        return self.head(pooled), routings

    def step(self, batch):
        logits, routings = self(batch)
        return F.cross_entropy(logits.float(), batch["label"]), {}, routings

    def _evaluate(self, stage, batch):
        with self._inference():
            logits, _ = self(batch)
        m = self.metrics[stage]
        m["loss"].update(F.cross_entropy(logits.float(), batch["label"]), weight=batch["label"].numel())
        m["acc"].update(logits, batch["label"])
        m["f1"].update(logits, batch["label"])

    def _log_eval(self, stage):
        self.log_epoch({f"{stage}/{name}": metric.compute() for name, metric in self.metrics[stage].items()})
        for metric in self.metrics[stage].values():
            metric.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate("val", batch)

    def test_step(self, batch, batch_idx):
        self._evaluate("test", batch)

    def on_validation_epoch_end(self):
        self._log_eval("val")

    def on_test_epoch_end(self):
        self._log_eval("test")

    def predict_step(self, batch, batch_idx):
        with self._inference():
            labels = self(batch)[0].argmax(-1).tolist()
        self._predictions += zip(batch["index"].tolist(), map(str, labels))
        return labels


class LanguageModelModule(MoEModule):
    """Decoder-only causal language model. Logs `val/loss` (token cross-entropy) and
    `val/ppl` = exp(val/loss), likewise for test. `predict` continues the first
    `prompt_tokens` tokens of each text, greedily at `temperature` 0, else by sampling
    (from the `top_k` likeliest tokens when top_k > 0), and writes one continuation a line."""

    def __init__(self, prompt_tokens: int = 8, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, **kwargs):
        # A checkpoint's hyperparameters hold the 0 given here; anything else is a mistake.
        if kwargs.pop("num_encoder_layers", 0):
            raise ConfigError("LanguageModelModule is decoder-only: it has no encoder layers")
        super().__init__(num_encoder_layers=0, **kwargs)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def forward(self, batch):
        return self.model.decode(batch["tgt_in"], tgt_pad_BS=batch["tgt_pad"])

    def _nll(self, batch):
        logits, routings = self(batch)
        _, nll = cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["tgt_out"].reshape(-1), self.hparams.pad_id)
        return nll, (~batch["tgt_pad"]).sum(), routings

    def step(self, batch):
        nll, _, routings = self._nll(batch)
        return nll, {}, routings

    def _evaluate(self, metric, batch):
        with self._inference():
            nll, ntokens, _ = self._nll(batch)
        metric.update(nll, weight=ntokens)

    def validation_step(self, batch, batch_idx):
        self._evaluate(self.val_loss, batch)

    def test_step(self, batch, batch_idx):
        self._evaluate(self.test_loss, batch)

    def _log_eval(self, stage, metric):
        loss = metric.compute()
        self.log_epoch({f"{stage}/loss": loss, f"{stage}/ppl": loss.exp()})
        metric.reset()

    def on_validation_epoch_end(self):
        self._log_eval("val", self.val_loss)

    def on_test_epoch_end(self):
        self._log_eval("test", self.test_loss)

    def predict_step(self, batch, batch_idx):
        hp = self.hparams
        # A prompt is the first tokens of a text (after <s>); prompts of one length go together.
        lengths = (~batch["tgt_pad"]).sum(1).clamp(max=hp.prompt_tokens + 1)
        texts = [""] * lengths.numel()
        with self._inference():
            for n in lengths.unique().tolist():
                rows = (lengths == n).nonzero().squeeze(1)
                out = self.model.continue_text(batch["tgt_in"][rows, :n], hp.eos_id, hp.max_new_tokens, hp.temperature, hp.top_k)
                for r, ids in zip(rows.tolist(), out.tolist()):
                    texts[r] = self.trainer.datamodule.decode(ids)
        self._predictions += zip(batch["index"].tolist(), texts)
        return texts
