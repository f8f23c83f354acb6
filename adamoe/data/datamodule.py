"""LightningDataModules for text tasks: read, check, tokenize, cache (`adamoe.data.prepare`),
then batch.

One base, `TextData`, does the work; a task declares which columns it tokenizes into
which side of the batch (`COLUMNS`) and which it passes through as they are (`KEEP`)."""

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from lightning.pytorch import LightningDataModule
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from adamoe.data import store
from adamoe.data import tokenizer as bpe
from adamoe.data.batch import collate
from adamoe.data.prepare import Preparation
from adamoe.data.sampler import ShardedBatchSampler
from adamoe.data.sources import SPLITS, DataSource
from adamoe.errors import ConfigError, DataError


class TextData(Preparation, LightningDataModule):
    """Text from any `DataSource`, one joint BPE vocabulary, token-budget batches of `Batch`;
    the README's "Training on your own data" and "Curriculum" say more of the settings.

    Args:
        source: where the text comes from (ParallelText, TextLines, TableFiles, HubDataset, ...)
        vocab_size: BPE vocabulary size, special tokens included
        max_tokens: a batch's token budget, padding included (null: batch_size sequences)
        batch_size: sequences a batch, when max_tokens is null
        max_source_len: the longest source sequence, in tokens
        max_target_len: the longest target sequence, in tokens
        too_long: a longer sample stops the run (error), is left out (filter) or cut (truncate)
        curriculum: the training order: none (length buckets, shuffled), random, paper (the paper's) or reverse
        curriculum_pool: samples sorted by length together under a curriculum (0: all)
        shuffle_batches: shuffle the batches of a curriculum's order
        bpe_sample: training texts the tokenizer learns from (null: all)
        predict_split: the split predict runs on
        predict_file: a text file to predict on instead, one input a line
        cache_dir: where tokenizers and tokenized splits are cached
        verify_cache: hash every cached file before use
        num_workers: data loader worker processes
        seed: the seed of the data order
    """

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
        shuffle_batches: bool = False,
        bpe_sample: int | None = 2_000_000,
        predict_split: Literal["train", "val", "test"] = "test",
        predict_file: str | None = None,
        cache_dir: str = "data",
        verify_cache: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if vocab_size <= len(bpe.SPECIALS):
            raise ConfigError(
                f"vocab_size={vocab_size} leaves no room beside the {len(bpe.SPECIALS)} special tokens {bpe.SPECIALS}"
            )
        if bpe_sample is not None and bpe_sample < 1:
            raise ConfigError(f"bpe_sample must be a positive number of texts or null (all of them), got {bpe_sample}")
        if batch_size is not None and batch_size < 1 or max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"batch_size and max_tokens must be positive or null, got {batch_size} and {max_tokens}")
        if max_tokens is not None and max_tokens < max(max_source_len, max_target_len):
            raise ConfigError(
                f"max_tokens={max_tokens} cannot hold one sequence of max length {max(max_source_len, max_target_len)}"
            )
        self.source = source
        self.vocab_size = vocab_size
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.max_len = {side: {"src": max_source_len, "tgt": max_target_len}[side] for side in self.COLUMNS.values()}
        self.too_long = too_long
        self.curriculum, self.curriculum_pool, self.shuffle_batches = curriculum, curriculum_pool, shuffle_batches
        self.bpe_sample = bpe_sample
        self.predict_split, self.predict_file = predict_split, predict_file
        self.cache_dir = Path(cache_dir)
        self.verify_cache = verify_cache
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = None
        self.splits: dict[str, store.Split] = {}
        self.train_sampler: ShardedBatchSampler | None = None

    # Ids fixed by the tokenizer's special tokens; the CLI links them into the model.
    pad_id, bos_id, eos_id = bpe.PAD_ID, bpe.BOS_ID, bpe.EOS_ID

    def setup(self, stage: str | None = None):
        """Every rank: memory-map the cached splits and apply the length limits."""
        try:
            self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise DataError(
                f"{self.tokenizer_path}: cannot read the tokenizer ({e}); run again to rebuild the cache"
            ) from None
        if self.tokenizer.get_vocab_size() > self.vocab_size:
            raise DataError(
                f"{self.tokenizer_path}: {self.tokenizer.get_vocab_size()} tokens, more than "
                f"vocab_size={self.vocab_size}"
            )
        for split in SPLITS:
            path = self.dataset_dir / f"{split}.arrow"
            if split not in self.splits and path.exists():
                try:
                    opened = store.Split.open(path, self.COLUMNS.values())
                except (pa.ArrowInvalid, OSError) as e:
                    raise DataError(
                        f"{path}: cannot read the cached split ({e}); run again to rebuild the cache"
                    ) from None
                self.splits[split] = store.limit_lengths(opened, split, self.max_len, self.too_long, self._locate)
        if stage == "predict" and self.predict_file and "predict" not in self.splits:
            column, side = next(iter(self.COLUMNS.items()))  # the input: a source sentence, a text, a prompt
            self.splits["predict"] = store.read_inputs(
                Path(self.predict_file), self.tokenizer, column, side, self.max_len[side], self.too_long == "truncate"
            )
        if self.train_sampler is None:
            order = {"none": "length"}.get(self.curriculum, self.curriculum)
            self.train_sampler = self._sampler("train", order, self.curriculum_pool)

    def state_dict(self):
        return {"train_sampler": self.train_sampler.state_dict()} if self.train_sampler else {}

    def load_state_dict(self, state):
        # Where training stood matters to training alone (an evaluation has no order to resume).
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        if "train_sampler" in state and fitting:
            self.train_sampler.load_state_dict(state["train_sampler"])

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # Called once per batch that training actually takes, after any prefetching: the
        # count a resumed run skips.
        if self.trainer is not None and self.trainer.training:
            self.train_sampler.consumed += 1
        return batch

    def _locate(self, split: str, index: int, side: str) -> str:
        return self.source.locate(split, index, next(c for c, s in self.COLUMNS.items() if s == side))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _sampler(self, split: str, order: str, pool: int = 0) -> ShardedBatchSampler:
        ds = self.splits[split]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        lengths = np.maximum.reduce(list(ds.lengths.values()))
        shuffle = self.shuffle_batches and split == "train"
        return ShardedBatchSampler(
            lengths, self.max_tokens, self.batch_size, order, self.seed, world, rank, pool, shuffle
        )

    def _loader(self, split: str, sampler: ShardedBatchSampler) -> DataLoader:
        ds = self.splits[split]
        columns = [c for c in dict.fromkeys([*self.COLUMNS.values(), *self.KEEP]) if c in ds.column_names]
        # Its own generator: building a loader must not draw from the global random stream,
        # or a resumed run, which builds loaders at other moments, would draw other dropout masks.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            range(len(ds)),
            batch_sampler=sampler,
            collate_fn=lambda idx: collate(idx, ds.gather(idx, columns)),
            num_workers=self.num_workers,
            generator=generator,
        )

    def train_dataloader(self):
        # An epoch's number of batches depends on its order. Lightning counts them when it
        # builds the loader, so it must build one every epoch, after the epoch is known.
        if self.trainer is not None:
            if self.trainer.reload_dataloaders_every_n_epochs != 1:
                raise ConfigError(
                    f"{type(self).__name__} needs trainer.reload_dataloaders_every_n_epochs=1: the number of batches "
                    "changes "
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
        split = "predict" if self.predict_file else self.predict_split
        return self._loader(split, self._sampler(split, "sorted"))
