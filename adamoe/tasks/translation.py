"""Sequence to sequence: label-smoothed cross-entropy, BLEU, beam search."""

from torchmetrics import MeanMetric
from torchmetrics.text import SacreBLEUScore

from adamoe.data.batch import Batch
from adamoe.errors import ConfigError
from adamoe.ops import linear_cross_entropy
from adamoe.tasks.base import MoEModule, Perplexity


class Bleu(SacreBLEUScore):
    """sacreBLEU on its usual 0-100 scale (torchmetrics computes 0-1)."""

    def compute(self):
        return 100 * super().compute()


class TranslationModule(MoEModule):
    """`train/loss` is label-smoothed, `train/nll` the plain cross-entropy. Evaluation logs
    `loss` (token cross-entropy), `ppl` and `bleu` (sacreBLEU, 0-100): greedy on the first
    `bleu_batches` validation batches of each rank (-1 all, 0 none), beam search on test.

    Args:
        label_smoothing: the share of the target probability spread over the vocabulary
        bleu_batches: validation batches of each rank decoded for val/bleu (-1: all, 0: none)
        max_decode_len: the most tokens a translation may have
        beam_size: beams of the test and predict search
        length_penalty: the exponent of the length a beam's score is divided by
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
        # Before the base's __init__, which builds the metrics, and they read them.
        self.label_smoothing, self.bleu_batches, self.max_decode_len = label_smoothing, bleu_batches, max_decode_len
        self.beam_size, self.length_penalty = beam_size, length_penalty
        super().__init__(**kwargs)

    def check_config(self, config):
        if not (config.num_encoder_layers and config.num_decoder_layers):
            raise ConfigError(
                "TranslationModule needs an encoder and a decoder: net.num_encoder_layers and net.num_decoder_layers "
                "must be >= 1, "
                f"got {config.num_encoder_layers} and {config.num_decoder_layers}"
            )

    def forward(self, batch: Batch, project: bool = True):
        return self.net(batch["src"], batch["tgt_in"], batch["src_pad"], batch["tgt_pad"], project=project)

    def _losses(self, batch: Batch):
        h_BSD, routings = self(batch, project=False)
        smoothed, nll = linear_cross_entropy(
            h_BSD.flatten(0, 1),
            self.net.output.weight,
            batch["tgt_out"].flatten(),
            self.hparams.pad_id,
            self.label_smoothing,
        )
        return smoothed, nll, routings

    def step(self, batch):
        smoothed, nll, routings = self._losses(batch)
        return smoothed, {"nll": nll}, routings

    def metrics(self, stage):
        metrics = {"loss": MeanMetric(), "ppl": Perplexity()}
        if stage == "test" or self.bleu_batches != 0:
            metrics["bleu"] = Bleu()
        return metrics

    def update_metrics(self, metrics, batch, batch_idx, stage):
        _, nll, _ = self._losses(batch)
        tokens = (~batch["tgt_pad"]).sum()
        metrics["loss"].update(nll, weight=tokens)
        metrics["ppl"].update(nll, weight=tokens)
        if "bleu" in metrics and (stage == "test" or self.bleu_batches < 0 or batch_idx < self.bleu_batches):
            beam = self.beam_size if stage == "test" else 1
            metrics["bleu"].update(self.decode(batch, beam), [[t] for t in batch["target"]])

    def decode(self, batch: Batch, beam_size: int) -> list[str]:
        src = batch["src"]
        max_len = min(self.max_decode_len, int(src.shape[1] * 1.5) + 10)
        out = self.net.generate(src, self.hparams.bos_id, self.hparams.eos_id, max_len, beam_size, self.length_penalty)
        return [self.trainer.datamodule.decode(row) for row in out.tolist()]

    def predict(self, batch):
        return self.decode(batch, self.beam_size)
