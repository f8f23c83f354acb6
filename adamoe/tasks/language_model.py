"""Decoder-only causal language modelling."""

from torchmetrics import MeanMetric

from adamoe.data.batch import Batch
from adamoe.errors import ConfigError
from adamoe.ops import linear_cross_entropy
from adamoe.tasks.base import MoEModule, Perplexity


class LanguageModelModule(MoEModule):
    """Logs `loss` (token cross-entropy) and `ppl`. `predict` continues the first
    `prompt_tokens` tokens of each text, greedily at `temperature` 0, else by sampling
    (from the `top_k` likeliest tokens when top_k > 0), one continuation a line."""

    def __init__(
        self, prompt_tokens: int = 8, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, **kwargs
    ):
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.temperature, self.top_k = temperature, top_k
        super().__init__(**kwargs)

    def check_config(self, config):
        if config.num_encoder_layers:
            raise ConfigError("LanguageModelModule is decoder-only: set net.num_encoder_layers: 0")

    def forward(self, batch: Batch, project: bool = True):
        return self.net.decode(batch["tgt_in"], tgt_pad_BS=batch["tgt_pad"], project=project)

    def step(self, batch):
        h_BSD, routings = self(batch, project=False)
        nll, _ = linear_cross_entropy(
            h_BSD.flatten(0, 1), self.net.output.weight, batch["tgt_out"].flatten(), self.hparams.pad_id
        )
        return nll, {}, routings

    def metrics(self, stage):
        return {"loss": MeanMetric(), "ppl": Perplexity()}

    def update_metrics(self, metrics, batch, batch_idx, stage):
        nll, _, _ = self.step(batch)
        tokens = (~batch["tgt_pad"]).sum()
        metrics["loss"].update(nll, weight=tokens)
        metrics["ppl"].update(nll, weight=tokens)

    def predict(self, batch):
        # A prompt is the first tokens of a text (after <s>); prompts of one length go together.
        lengths = (~batch["tgt_pad"]).sum(1).clamp(max=self.prompt_tokens + 1)
        texts = [""] * lengths.numel()
        for n in lengths.unique().tolist():
            rows = (lengths == n).nonzero().squeeze(1)
            out = self.net.continue_text(
                batch["tgt_in"][rows, :n], self.hparams.eos_id, self.max_new_tokens, self.temperature, self.top_k
            )
            for r, ids in zip(rows.tolist(), out.tolist()):
                texts[r] = self.trainer.datamodule.decode(ids)
        return texts
