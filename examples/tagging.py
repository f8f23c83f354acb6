"""A token-level task added without touching adamoe/: tag every word of a text.

    PYTHONPATH=examples python train.py fit --config examples/tagging.yaml
    PYTHONPATH=examples python train.py predict --config examples/tagging.yaml --ckpt_path last \
        --data.init_args.predict_file my_sentences.txt

Word labels become token labels when the data is tokenized (`align_labels`: a word's
label on its first piece, IGNORE_ID on the rest and on </s>); a batch pads them with
IGNORE_ID, which the loss and the accuracy skip. Predict writes one tag per word.
"""

import datasets
import pyarrow as pa
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from adamoe.data import DataSource, Generated, TextData
from adamoe.data.batch import IGNORE_ID
from adamoe.data.synthetic import generate
from adamoe.data.tokenizer import align_labels, word_starts
from adamoe.errors import ConfigError
from adamoe.tasks import MoEModule

ARTICLES = {"der", "die", "das", "ein", "eine"}


def word_tags(text: str) -> list[int]:
    """1 for an article, 2 for the word after one, 0 for any other: a tag that needs context."""
    words = text.split()
    return [1 if w in ARTICLES else 2 if i and words[i - 1] in ARTICLES else 0 for i, w in enumerate(words)]


class ArticlePhrases(Generated):
    """Sentences of the embedded grammar with `word_tags` for each word."""

    def load(self, split):
        texts = generate(self.size(split), seed=self.split_seed(split))[0]
        return datasets.Dataset.from_dict({"text": texts, "tags": [word_tags(t) for t in texts]})


class TaggedTextData(TextData):
    COLUMNS = {"text": "src"}
    KEEP = ("tags",)  # word labels, one list a text: made token labels in `tokenized`

    def __init__(self, source: DataSource | None = None, **kwargs):
        super().__init__(source or ArticlePhrases(), **kwargs)

    def tokenized(self, table, split):
        ids, tags = table.column("src").to_pylist(), table.column("tags").to_pylist()
        aligned = pa.array(
            [align_labels(self.tokenizer, i, t, IGNORE_ID) for i, t in zip(ids, tags)], pa.list_(pa.int32())
        )
        return table.set_column(table.column_names.index("tags"), "tags", aligned)


class TaggingModule(MoEModule):
    """An encoder and a linear head on every token; cross-entropy over the first piece of
    each word. Logs `loss` and `acc` (per word)."""

    def __init__(self, num_tags: int = 3, **kwargs):
        self.num_tags = num_tags  # before the base builds the metrics, which read it
        super().__init__(**kwargs)
        self.head = nn.Linear(self.net.d_model, num_tags)

    def check_config(self, config):
        if config.num_decoder_layers:
            raise ConfigError("TaggingModule is encoder-only: set net.num_decoder_layers: 0")

    def forward(self, batch):
        states, routings = self.net.encode(batch["src"], batch["src_pad"])
        return self.head(states).float(), routings

    def step(self, batch):
        logits, routings = self(batch)
        return F.cross_entropy(logits.flatten(0, 1), batch["tags"].flatten(), ignore_index=IGNORE_ID), {}, routings

    def metrics(self, stage):
        return {
            "loss": MeanMetric(),
            "acc": MulticlassAccuracy(self.num_tags, average="micro", ignore_index=IGNORE_ID),
        }

    def update_metrics(self, metrics, batch, batch_idx, stage):
        logits, _ = self(batch)
        tags = batch["tags"].flatten()
        words = int(tags.ne(IGNORE_ID).sum())
        metrics["loss"].update(F.cross_entropy(logits.flatten(0, 1), tags, ignore_index=IGNORE_ID), weight=words)
        metrics["acc"].update(logits.flatten(0, 1), tags)

    def predict(self, batch):
        tokenizer = self.trainer.datamodule.tokenizer
        tags = self(batch)[0].argmax(-1).tolist()
        lines = []
        for ids, row in zip(batch["src"].tolist(), tags):
            lines.append(" ".join(str(t) for t, start in zip(row, word_starts(tokenizer, ids)) if start))
        return lines
