"""LightningDataModules for text tasks: read, check, tokenize, cache, batch.

One base, `TextData`, does the work; a task declares which columns it tokenizes into
which side of the batch (`COLUMNS`) and which it passes through as they are (`KEEP`)."""

import os
import shutil
from pathlib import Path
from typing import Literal

import datasets
import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from adamoe.data import tokenizer as bpe
from adamoe.data.batch import collate
from adamoe.data.batching import ShardedBatchSampler
from adamoe.data.sources import SPLITS, DataError, DataSource, SyntheticSentiment, SyntheticText, SyntheticTranslation, digest
from adamoe.errors import ConfigError

# Part of every cache key: raise it whenever a change to the preprocessing code changes
# the tokenized result, so that no cache made by older code is read.
CACHE_VERSION = "3"


class TextData(LightningDataModule):
    """Text from any `DataSource`, one joint BPE vocabulary, token-budget batches of
    `adamoe.data.batch.Batch`. The README's "Training on your own data" and "Curriculum"
    say what the settings do."""

    COLUMNS: dict[str, str] = {}  # a column to tokenize -> the batch side it becomes: "src" or "tgt"
    KEEP: tuple[str, ...] = ()  # columns that go into the batch as they are

    def __init__(
        self,
        source: DataSource,
        vocab_size: int = 8000,
        max_tokens: int | None = 4096,
        batch_size: int | None = None,
        max_source_len: int = 256,
        max_target_len: int = 256,
        too_long: Literal["error", "filter", "truncate"] = "error",
        curriculum: Literal["none", "random", "paper", "reverse"] = "none",
        curriculum_pool: int = 0,
        predict_split: Literal["train", "val", "test"] = "test",
        cache_dir: str = "data",
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if vocab_size <= len(bpe.SPECIALS):
            raise ConfigError(f"vocab_size={vocab_size} leaves no room beside the {len(bpe.SPECIALS)} special tokens {bpe.SPECIALS}")
        if max_tokens is not None and max_tokens < max(max_source_len, max_target_len):
            raise ConfigError(f"max_tokens={max_tokens} cannot hold one sequence of max length {max(max_source_len, max_target_len)}")
        self.source = source
        self.vocab_size = vocab_size
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.max_len = {side: {"src": max_source_len, "tgt": max_target_len}[side] for side in self.COLUMNS.values()}
        self.too_long = too_long
        self.curriculum, self.curriculum_pool = curriculum, curriculum_pool
        self.predict_split = predict_split
        self.cache_dir = Path(cache_dir)
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = None
        self.splits: dict[str, datasets.Dataset] = {}
        self.train_sampler: ShardedBatchSampler | None = None

    # Ids fixed by the tokenizer's special tokens; the CLI links them into the model.
    pad_id, bos_id, eos_id = bpe.PAD_ID, bpe.BOS_ID, bpe.EOS_ID

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
        return self.cache_dir / "tokenizers" / f"bpe-{digest([*self.cache_key(), str(self.vocab_size)])}.json"

    @property
    def dataset_dir(self) -> Path:
        return self.cache_dir / "datasets" / digest([self.tokenizer_path.name, *self.cache_key()])

    def prepare_data(self):
        """Rank 0 only: read and check the data, train the tokenizer, tokenize, cache."""
        if self.dataset_dir.is_dir() and self.tokenizer_path.exists():
            rank_zero_info(f"Reusing cached dataset {self.dataset_dir} and tokenizer {self.tokenizer_path}")
            return
        raw = {s: self.source.load(s) for s in SPLITS}
        if raw["train"] is None or raw["val"] is None:
            raise DataError(f"{type(self.source).__name__}: the data source needs a train and a val split")
        for split, ds in raw.items():
            missing = [c for c in self.required_columns() if ds is not None and c not in ds.column_names]
            if missing:
                raise DataError(
                    f"{type(self.source).__name__} {split}: no column {missing} for {type(self).__name__}; it has {ds.column_names}"
                )
        raw = self.prepare_columns(raw)
        tok, cached = bpe.load_or_train(self.tokenizer_path, (t for col in self.COLUMNS for t in raw["train"][col]), self.vocab_size)
        rank_zero_info(f"{'Reusing' if cached else 'Trained'} BPE tokenizer {self.tokenizer_path} ({tok.get_vocab_size()} tokens)")

        def encode(rows):
            return {side: [e.ids + [bpe.EOS_ID] for e in tok.encode_batch(rows[col])] for col, side in self.COLUMNS.items()}

        # Built aside and renamed into place: a killed run leaves no half cache to be read.
        for stale in self.dataset_dir.parent.glob(f".{self.dataset_dir.name}.*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.dataset_dir.with_name(f".{self.dataset_dir.name}.{os.getpid()}.tmp")
        for split, ds in raw.items():
            if ds is not None:
                ds.map(encode, batched=True, desc=f"Tokenizing {split}").save_to_disk(str(staging / split))
        try:
            staging.rename(self.dataset_dir)
        except OSError:
            if not self.dataset_dir.is_dir():  # else another process finished the same cache first
                raise
            shutil.rmtree(staging, ignore_errors=True)

    def setup(self, stage: str | None = None):
        """Every rank: load the cached splits and apply the length limits."""
        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        if self.tokenizer.get_vocab_size() > self.vocab_size:
            raise DataError(f"{self.tokenizer_path}: {self.tokenizer.get_vocab_size()} tokens, more than vocab_size={self.vocab_size}")
        for split in SPLITS:
            if split not in self.splits and (self.dataset_dir / split).exists():
                self.splits[split] = self._limit_lengths(split, datasets.load_from_disk(str(self.dataset_dir / split)))
        if self.train_sampler is None:
            order = {"none": "length"}.get(self.curriculum, self.curriculum)
            self.train_sampler = self._sampler("train", order, self.curriculum_pool)

    def required_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.COLUMNS, *self.KEEP]))

    def prepare_columns(self, raw: dict) -> dict:
        """Task-specific conversion of the raw splits before tokenizing."""
        return raw

    def state_dict(self):
        return {"train_sampler": self.train_sampler.state_dict()} if self.train_sampler else {}

    def load_state_dict(self, state):
        if "train_sampler" in state:
            self.train_sampler.load_state_dict(state["train_sampler"])

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # Called once per batch that training actually takes, after any prefetching: the
        # count a resumed run skips.
        if self.trainer is not None and self.trainer.training:
            self.train_sampler.consumed += 1
        return batch

    def _limit_lengths(self, split: str, ds: datasets.Dataset) -> datasets.Dataset:
        for col, limit in self.max_len.items():
            long = [i for i, ids in enumerate(ds[col]) if len(ids) > limit]
            if not long:
                continue
            side = "source" if col == "src" else "target"
            what = f"{split}: {len(long)} of {len(ds)} samples ({len(long) / len(ds):.2%}) have a {side} longer than {limit} tokens"
            if self.too_long == "error":
                raise DataError(f"{what} (first: sample {long[0]}). Raise the limit, or set too_long to 'filter' or 'truncate'")
            rank_zero_info(f"{what}: {'filtered out' if self.too_long == 'filter' else 'truncated'}")
            if self.too_long == "filter":
                drop = set(long)
                ds = ds.select([i for i in range(len(ds)) if i not in drop])
            else:
                ds = ds.map(lambda r, c=col, n=limit: {c: r[c][: n - 1] + [bpe.EOS_ID] if len(r[c]) > n else r[c]})
        return ds

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _sampler(self, split: str, order: str, pool: int = 0) -> ShardedBatchSampler:
        ds = self.splits[split]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        lengths = [max(lens) for lens in zip(*([len(x) for x in ds[side]] for side in self.COLUMNS.values()))]
        return ShardedBatchSampler(lengths, self.max_tokens, self.batch_size, order, self.seed, world, rank, pool)

    def _loader(self, split: str, sampler: ShardedBatchSampler) -> DataLoader:
        ds = self.splits[split]
        columns = {c: ds[c] for c in (*self.COLUMNS.values(), *self.KEEP)}
        # Its own generator: building a loader must not draw from the global random stream,
        # or a resumed run, which builds loaders at other moments, would draw other dropout masks.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            range(len(ds)),
            batch_sampler=sampler,
            collate_fn=lambda idx: collate(idx, columns),
            num_workers=self.num_workers,
            generator=generator,
        )

    def train_dataloader(self):
        # An epoch's number of batches depends on its order. Lightning counts them when it
        # builds the loader, so it must build one every epoch, after the epoch is known.
        if self.trainer is not None:
            if self.trainer.reload_dataloaders_every_n_epochs != 1:
                raise ConfigError(
                    f"{type(self).__name__} needs trainer.reload_dataloaders_every_n_epochs=1: the number of batches changes "
                    "from epoch to epoch with the order, and Lightning counts them once per loader"
                )
            self.train_sampler.set_epoch(self.trainer.current_epoch)
        return self._loader("train", self.train_sampler)

    def val_dataloader(self):
        return self._loader("val", self._sampler("val", "sorted"))

    def test_dataloader(self):
        if "test" not in self.splits:
            raise DataError("the data source has no test split")
        return self._loader("test", self._sampler("test", "sorted"))

    def predict_dataloader(self):
        return self._loader(self.predict_split, self._sampler(self.predict_split, "sorted"))


class TranslationData(TextData):
    """Sentence pairs (`source`, `target` columns): the embedded translation task by default."""

    COLUMNS = {"source": "src", "target": "tgt"}
    KEEP = ("target",)  # the reference text, for BLEU

    def __init__(self, source: DataSource = lazy_instance(SyntheticTranslation), **kwargs):
        super().__init__(source, **kwargs)


class ClassificationData(TextData):
    """Texts with labels (`text`, `label` columns): the embedded sentiment task by default.

    Integer labels are used as they are; string labels are numbered in sorted order of the
    training split's labels. Every label must be below `num_classes`, which the CLI links
    into the model.
    """

    COLUMNS = {"text": "src"}
    KEEP = ("label",)

    def __init__(self, source: DataSource = lazy_instance(SyntheticSentiment), num_classes: int = 2, **kwargs):
        super().__init__(source, **kwargs)
        self.num_classes = num_classes

    def prepare_columns(self, raw):
        names = sorted({v for v in raw["train"]["label"] if isinstance(v, str)})
        ids = {n: i for i, n in enumerate(names)}
        out = {}
        for split, ds in raw.items():
            if ds is not None:
                labels = [ids.get(v, v) if isinstance(v, str) else v for v in ds["label"]]
                unknown = [v for v in labels if isinstance(v, str)]
                if unknown:
                    raise DataError(f"{split}: label {unknown[0]!r} does not occur in the training split ({names})")
                ds = ds.remove_columns("label").add_column("label", labels)
            out[split] = ds
        return out

    def setup(self, stage=None):
        super().setup(stage)
        for split, ds in self.splits.items():
            bad = [i for i, v in enumerate(ds["label"]) if not 0 <= v < self.num_classes]
            if bad:
                raise DataError(f"{split}: sample {bad[0]} has label {ds['label'][bad[0]]}, outside num_classes={self.num_classes}")


class LanguageModelData(TextData):
    """Text (`text` column) for a decoder-only model: the embedded grammar by default.

    Padded (one text per sequence) by default; with `pack_to`, the training split's texts
    are joined (each ending in </s>) and cut into sequences of `pack_to` tokens, the last
    one shorter: nothing is dropped.
    """

    COLUMNS = {"text": "tgt"}

    def __init__(self, source: DataSource = lazy_instance(SyntheticText), pack_to: int | None = None, **kwargs):
        super().__init__(source, **kwargs)
        self.pack_to = pack_to
        self._packed = False

    def setup(self, stage=None):
        super().setup(stage)
        if self.pack_to and not self._packed:
            stream = [t for ids in self.splits["train"]["tgt"] for t in ids]
            blocks = [stream[i : i + self.pack_to] for i in range(0, len(stream), self.pack_to)]
            self.splits["train"] = datasets.Dataset.from_dict({"tgt": blocks})
            self.train_sampler = self._sampler("train", self.train_sampler.order)
            self._packed = True
