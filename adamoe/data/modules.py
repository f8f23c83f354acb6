"""One data module per kind of task: what it tokenizes, what it keeps, and its checks."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adamoe.data import store
from adamoe.data.datamodule import TextData
from adamoe.data.sources import DataSource, SyntheticSentiment, SyntheticText, SyntheticTranslation
from adamoe.errors import DataError


class TranslationData(TextData):
    """Sentence pairs (`source`, `target` columns): the embedded translation task by default."""

    COLUMNS = {"source": "src", "target": "tgt"}
    KEEP = ("target",)  # the reference text, for BLEU

    def __init__(self, source: DataSource | None = None, **kwargs):
        super().__init__(source or SyntheticTranslation(), **kwargs)


class ClassificationData(TextData):
    """Texts with labels (`text`, `label` columns): the embedded sentiment task by default.

    Integer labels are used as they are; string labels are numbered in sorted order of the
    training split's labels. Every label must be below `num_classes`, which the CLI links
    into the model.
    """

    COLUMNS = {"text": "src"}
    KEEP = ("label",)

    def __init__(self, source: DataSource | None = None, num_classes: int = 2, **kwargs):
        super().__init__(source or SyntheticSentiment(), **kwargs)
        self.num_classes = num_classes

    def scan_train(self, chunks):
        self.label_names = []
        for chunk in chunks:
            labels = chunk.column("label")
            if pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type):
                self.label_names = sorted(set(self.label_names) | set(pc.unique(labels).to_pylist()))

    def prepare_columns(self, chunk, split):
        labels = chunk.column("label")
        if not (pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type)):
            return chunk
        ids = pc.index_in(labels, value_set=pa.array(self.label_names, labels.type))
        unknown = np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))
        if unknown.size:
            raise DataError(
                f"{split}: label {labels[int(unknown[0])].as_py()!r} does not occur in the training split "
                f"({self.label_names})"
            )
        return chunk.set_column(chunk.column_names.index("label"), "label", ids.cast(pa.int64()))

    def setup(self, stage=None):
        super().setup(stage)
        for split, ds in self.splits.items():
            if "label" not in ds.column_names:  # new text to predict on
                continue
            labels = ds.numbers("label")
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if bad.size:
                raise DataError(
                    f"{split}: sample {bad[0]} has label {labels[bad[0]]}, outside num_classes={self.num_classes}"
                )


class LanguageModelData(TextData):
    """Text (`text` column) for a decoder-only model: the embedded grammar by default.

    Padded (one text per sequence) by default; with `pack_to`, the training split's texts
    are joined (each ending in </s>) and cut into sequences of `pack_to` tokens, the last
    one shorter: nothing is dropped.
    """

    COLUMNS = {"text": "tgt"}

    def __init__(self, source: DataSource | None = None, pack_to: int | None = None, **kwargs):
        super().__init__(source or SyntheticText(), **kwargs)
        self.pack_to = pack_to
        self._packed = False

    def setup(self, stage=None):
        super().setup(stage)
        if self.pack_to and not self._packed:
            self.splits["train"] = store.packed(self.splits["train"], "tgt", self.pack_to)
            self.train_sampler = self._sampler("train", self.train_sampler.order)
            self._packed = True
