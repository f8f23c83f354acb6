"""A task added without touching adamoe/: predict a number for each text (regression).

    PYTHONPATH=examples python train.py fit --config examples/regression.yaml

The three pieces a task needs: a data source, a data module that declares its batch
columns, and a LightningModule that writes `step`, `metrics`, `update_metrics` and
`predict`. Gates, the MoE layers, statistics, checkpoints and DDP come with the base classes.
"""

import datasets
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from adamoe.data import DataSource, Generated, TextData
from adamoe.data.synthetic import generate
from adamoe.errors import ConfigError
from adamoe.tasks import MoEModule
from adamoe.tasks.classification import pool


def clause_score(text: str) -> float:
    """1 for a subordinate clause ("dass"), plus 0.5 for a negation ("nicht")."""
    words = text.split()
    return float("dass" in words) + 0.5 * ("nicht" in words)


class Clauses(Generated):
    """Sentences of the embedded grammar, scored by what their clauses hold (`clause_score`)."""

    def load(self, split):
        texts = generate(self.size(split), seed=self.split_seed(split))[0]
        return datasets.Dataset.from_dict({"text": texts, "score": [clause_score(t) for t in texts]})


class ScoredTextData(TextData):
    COLUMNS = {"text": "src"}  # tokenized into the batch's `src` and `src_pad`
    KEEP = ("score",)  # into the batch as it is: a float tensor

    def __init__(self, source: DataSource | None = None, **kwargs):
        super().__init__(source or Clauses(), **kwargs)


class RegressionModule(MoEModule):
    """An encoder, mean-pooled, and a linear head; mean squared error. Logs `mse` and `mae`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = nn.Linear(self.net.d_model, 1)

    def check_config(self, config):
        if config.num_decoder_layers:
            raise ConfigError("RegressionModule is encoder-only: set net.num_decoder_layers: 0")

    def forward(self, batch):
        states, routings = self.net.encode(batch["src"], batch["src_pad"])
        return self.head(pool(states, batch["src_pad"])).squeeze(-1).float(), routings

    def step(self, batch):
        prediction, routings = self(batch)
        return F.mse_loss(prediction, batch["score"].float()), {}, routings

    def metrics(self, stage):
        return {"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}

    def update_metrics(self, metrics, batch, batch_idx, stage):
        prediction, _ = self(batch)
        for metric in metrics.values():
            metric.update(prediction, batch["score"].float())

    def predict(self, batch):
        return [f"{v:.4f}" for v in self(batch)[0].tolist()]
