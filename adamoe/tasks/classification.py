"""Encoder-only classification: a linear head on the pooled encoder states."""

from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from adamoe.data.batch import Batch
from adamoe.errors import ConfigError
from adamoe.tasks.base import MoEModule


def pool(states_BSD: torch.Tensor, pad_BS: torch.Tensor, how: Literal["mean", "first"] = "mean") -> torch.Tensor:
    """One vector per sequence: the first state, or the mean of the real (non-padding) ones."""
    if how == "first":
        return states_BSD[:, 0]
    real_BS1 = (~pad_BS).unsqueeze(-1).to(states_BSD.dtype)
    return (states_BSD * real_BS1).sum(1) / real_BS1.sum(1).clamp_min(1)


class ClassificationModule(MoEModule):
    """Logs `loss`, `acc` (accuracy) and `f1` (macro F1); predict writes one class id a
    line. `num_classes` comes from the data."""

    def __init__(self, num_classes: int = 2, pooling: Literal["mean", "first"] = "mean", **kwargs):
        if num_classes < 2:
            raise ConfigError(f"ClassificationModule needs num_classes >= 2, got {num_classes}")
        self.num_classes, self.pooling = num_classes, pooling  # before the base builds the metrics, which read them
        super().__init__(**kwargs)
        self.head = torch.nn.Linear(self.net.d_model, num_classes)

    def check_config(self, config):
        if config.num_decoder_layers:
            raise ConfigError("ClassificationModule is encoder-only: set net.num_decoder_layers: 0")

    def forward(self, batch: Batch):
        states, routings = self.net.encode(batch["src"], batch["src_pad"])
        return self.head(pool(states, batch["src_pad"], self.pooling)), routings

    def step(self, batch):
        logits, routings = self(batch)
        return F.cross_entropy(logits.float(), batch["label"]), {}, routings

    def metrics(self, stage):
        n = self.num_classes
        return {
            "loss": MeanMetric(),
            "acc": MulticlassAccuracy(n, average="micro"),
            "f1": MulticlassF1Score(n, average="macro"),
        }

    def update_metrics(self, metrics, batch, batch_idx, stage):
        logits, _ = self(batch)
        metrics["loss"].update(F.cross_entropy(logits.float(), batch["label"]), weight=batch["label"].numel())
        metrics["acc"].update(logits, batch["label"])
        metrics["f1"].update(logits, batch["label"])

    def predict(self, batch):
        return [str(label) for label in self(batch)[0].argmax(-1).tolist()]
