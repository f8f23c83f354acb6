"""Reading, checking, tokenizing and caching a data module's splits, on rank 0, once per
cache key: the half of `TextData` that runs before training, with the hooks a task
overrides to take part in it."""

import os
import time
from pathlib import Path

import pyarrow as pa
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from adamoe.data import cache, store
from adamoe.data import tokenizer as bpe
from adamoe.data.sources import SPLITS, digest
from adamoe.errors import ConfigError, DataError

# Part of every cache key: raise it whenever a change to the preprocessing code changes
# the tokenized result, so that no cache made by older code is read.
CACHE_VERSION = "5"
# More <unk> than this in the tokenized training split means the vocabulary cannot cover the data.
UNK_LIMIT = 0.05


class Preparation:
    """A mixin of `TextData`: it reads `source`, `COLUMNS`, `KEEP`, `vocab_size`,
    `bpe_sample`, `cache_dir`, `verify_cache` and `seed`, and sets `tokenizer`."""

    def cache_key(self) -> list[str]:
        """Everything that decides the tokenized splits: the preprocessing code's version, this
        task's class and columns, and the source (its class, settings and files). A task
        whose settings change the cached data adds them here."""
        return [
            CACHE_VERSION,
            f"{type(self).__module__}.{type(self).__qualname__}",
            repr(self.COLUMNS),
            repr(self.KEEP),
            self.source.fingerprint(),
        ]

    @property
    def tokenizer_path(self) -> Path:
        return (
            self.cache_dir
            / "tokenizers"
            / f"bpe-{digest([*self.cache_key(), str(self.vocab_size), str(self.bpe_sample)])}.json"
        )

    @property
    def dataset_dir(self) -> Path:
        return self.cache_dir / "datasets" / digest([self.tokenizer_path.name, *self.cache_key()])

    def prepare_data(self):
        """Rank 0 only: read and check the data, train the tokenizer, tokenize, cache. The
        corpus streams through a chunk at a time. Runs that share a cache take turns: the
        second waits for the first and reuses its cache."""
        self.dataset_dir.parent.mkdir(parents=True, exist_ok=True)
        with cache.lock(self.dataset_dir):
            if cache.verified(self.dataset_dir, self.tokenizer_path, full=self.verify_cache):
                rank_zero_info(f"Reusing cached dataset {self.dataset_dir} and tokenizer {self.tokenizer_path}")
                return
            self._build()

    def _build(self):
        if self.source.chunks("train") is None or self.source.chunks("val") is None:
            raise DataError(f"{type(self.source).__name__}: the data source needs a train and a val split")
        for split in SPLITS:  # an empty or missing split fails here, not after tokenizing the others
            if self.source.chunks(split) is not None:
                next(iter(self._chunks(split)), None)
        self.scan_train(self._chunks("train"))
        started = time.perf_counter()
        tok, cached = bpe.load_or_train(self.tokenizer_path, self._bpe_texts(), self.vocab_size)
        took = "" if cached else f" in {time.perf_counter() - started:.0f} s"
        rank_zero_info(
            f"{'Reusing' if cached else 'Trained'} BPE tokenizer {self.tokenizer_path} ({tok.get_vocab_size()} "
            f"tokens){took}"
        )
        # Built aside and renamed into place: a killed run leaves no half cache to be read.
        cache.remove_orphans(self.dataset_dir)
        staging = self.dataset_dir.with_name(f".{self.dataset_dir.name}.{os.getpid()}.tmp")
        staging.mkdir(parents=True)
        self.tokenizer = tok  # for `tokenized`
        for split in SPLITS:
            if self.source.chunks(split) is not None:
                started = time.perf_counter()
                bar = tqdm(desc=f"Tokenizing {split}", unit=" samples", unit_scale=True, leave=False, disable=None)
                tables = (
                    self.tokenized(store.encode(tok, self.prepare_columns(c, split), self.COLUMNS, self.KEEP), split)
                    for c in self._chunks(split)
                )
                rows = store.write(staging / f"{split}.arrow", tables, progress=bar.update)
                bar.close()
                rank_zero_info(f"Tokenized {split}: {rows:,} samples in {time.perf_counter() - started:.0f} s")
                if split == "train":
                    self._check_vocabulary(staging / "train.arrow")
        cache.write_manifest(staging, self.tokenizer_path)
        staging.rename(self.dataset_dir)

    def _check_vocabulary(self, path: Path):
        """A vocabulary learned from too little text maps most words to <unk>: training on that is training on noise."""
        share = store.token_share(path, set(self.COLUMNS.values()), bpe.UNK_ID)
        if share > UNK_LIMIT:
            raise ConfigError(
                f"{share:.0%} of the training tokens are <unk>: the vocabulary (bpe_sample={self.bpe_sample}) is "
                "learned from too "
                "little text; raise bpe_sample or set it to null"
            )

    def _chunks(self, split: str):
        for chunk in self.source.chunks(split):
            missing = [c for c in dict.fromkeys([*self.COLUMNS, *self.KEEP]) if c not in chunk.column_names]
            if missing:
                raise DataError(
                    f"{type(self.source).__name__} {split}: no column {missing} for {type(self).__name__}; it has "
                    f"{chunk.column_names}"
                )
            yield chunk

    def _bpe_texts(self):
        """The training split's text to learn BPE from: all of it, or a uniform sample of
        `bpe_sample` texts, so that a large corpus is not counted whole."""
        texts = ([t for col in self.COLUMNS for t in chunk.column(col).to_pylist()] for chunk in self._chunks("train"))
        return (
            (t for part in texts for t in part)
            if self.bpe_sample is None
            else bpe.sample(texts, self.bpe_sample, self.seed)
        )

    def scan_train(self, chunks):
        """A task that needs a look at the whole training split before tokenizing (e.g. its
        label names) takes it here, a chunk at a time."""

    def prepare_columns(self, chunk: pa.Table, split: str) -> pa.Table:
        """Task-specific conversion of a raw chunk before tokenizing."""
        return chunk

    def tokenized(self, table: pa.Table, split: str) -> pa.Table:
        """Task-specific conversion of a tokenized chunk, with `self.tokenizer` at hand: for
        columns that follow the tokens, such as word labels turned into token labels
        (`adamoe.data.tokenizer.align_labels`)."""
        return table
