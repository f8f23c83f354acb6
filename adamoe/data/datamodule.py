"""LightningDataModule for sentence-pair tasks: read, check, tokenize, cache, batch."""

from pathlib import Path
from typing import Literal

import datasets
import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from adamoe.data import tokenizer as bpe
from adamoe.data.batching import ShardedBatchSampler
from adamoe.data.sources import SPLITS, DataError, DataSource, Synthetic, digest

CACHE_VERSION = "1"


class TranslationData(LightningDataModule):
    """Sentence pairs from any `DataSource`, a joint BPE vocabulary, token-budget batches.

    Every batch is a dict: `src` [B, S] and `tgt_in`/`tgt_out` [B, T] token ids (right-padded,
    `tgt_in` starts with <s>, `tgt_out` ends with </s>), their padding masks `src_pad` and
    `tgt_pad` (True at padding), the dataset `index` of each sample, and the reference
    strings `target` for BLEU.

    Training batches follow `curriculum`: `none` is length-bucketed shuffled batches (least
    padding), `random` a plain seeded shuffle, `paper` the curriculum of Li et al. (2023)
    from the routing of the previous epoch (first epoch: `random`), `reverse` the same
    order backwards. See `adamoe.data.batching`; the `Curriculum` callback feeds it.

    Sequences longer than `max_source_len`/`max_target_len` tokens (</s> included) are
    reported per split, then handled by `too_long`: `error` stops with the count, `filter`
    leaves them out, `truncate` cuts them (and keeps </s>).
    """

    def __init__(
        self,
        source: DataSource = lazy_instance(Synthetic),
        vocab_size: int = 8000,
        max_tokens: int | None = 4096,
        batch_size: int | None = None,
        max_source_len: int = 256,
        max_target_len: int = 256,
        too_long: Literal["error", "filter", "truncate"] = "error",
        curriculum: Literal["none", "random", "paper", "reverse"] = "none",
        predict_split: Literal["train", "val", "test"] = "test",
        cache_dir: str = "data",
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if max_tokens is not None and max_tokens < max(max_source_len, max_target_len):
            raise ValueError(f"max_tokens={max_tokens} cannot hold one sequence of max length {max(max_source_len, max_target_len)}")
        self.source = source
        self.vocab_size = vocab_size
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.max_len = {"src_ids": max_source_len, "tgt_ids": max_target_len}
        self.too_long = too_long
        self.curriculum = curriculum
        self.predict_split = predict_split
        self.cache_dir = Path(cache_dir)
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = None
        self.splits: dict[str, datasets.Dataset] = {}
        self.train_sampler: ShardedBatchSampler | None = None

    # Ids fixed by the tokenizer's special tokens; the CLI links them into the model.
    pad_id, bos_id, eos_id = bpe.PAD_ID, bpe.BOS_ID, bpe.EOS_ID

    @property
    def tokenizer_path(self) -> Path:
        return self.cache_dir / "tokenizers" / f"bpe-{digest([self.source.fingerprint(), str(self.vocab_size), CACHE_VERSION])}.json"

    @property
    def dataset_dir(self) -> Path:
        return self.cache_dir / "datasets" / digest([self.tokenizer_path.name, self.source.fingerprint(), CACHE_VERSION])

    def prepare_data(self):
        """Rank 0 only: read and check the data, train the tokenizer, tokenize, cache."""
        done = self.dataset_dir / "complete"
        if done.exists() and self.tokenizer_path.exists():
            return
        raw = {s: self.source.load(s) for s in SPLITS}
        if raw["train"] is None or raw["val"] is None:
            raise DataError("the data source needs a train and a val split")
        tok, cached = bpe.load_or_train(self.tokenizer_path, (t for col in ("source", "target") for t in raw["train"][col]), self.vocab_size)
        rank_zero_info(f"{'Reusing' if cached else 'Trained'} BPE tokenizer {self.tokenizer_path} ({tok.get_vocab_size()} tokens)")

        def encode(rows):
            return {
                f"{side}_ids": [e.ids + [bpe.EOS_ID] for e in tok.encode_batch(rows[col])]
                for side, col in (("src", "source"), ("tgt", "target"))
            }

        for split, ds in raw.items():
            if ds is not None:
                ds.map(encode, batched=True, desc=f"Tokenizing {split}").save_to_disk(str(self.dataset_dir / split))
        done.touch()

    def setup(self, stage: str | None = None):
        """Every rank: load the cached splits and apply the length limits."""
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        if self.tokenizer.get_vocab_size() > self.vocab_size:
            raise DataError(f"{self.tokenizer_path}: {self.tokenizer.get_vocab_size()} tokens, more than vocab_size={self.vocab_size}")
        for split in SPLITS:
            if split not in self.splits and (self.dataset_dir / split).exists():
                self.splits[split] = self._limit_lengths(split, datasets.load_from_disk(str(self.dataset_dir / split)))
        if self.train_sampler is None:
            order = {"none": "length"}.get(self.curriculum, self.curriculum)
            self.train_sampler = self._sampler("train", order)

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
            what = f"{split}: {len(long)} of {len(ds)} samples ({len(long) / len(ds):.2%}) have {col} longer than {limit} tokens"
            if self.too_long == "error":
                raise DataError(f"{what} (first: sample {long[0]}). Raise the limit, or set too_long to 'filter' or 'truncate'")
            rank_zero_info(f"{what}: {'filtered out' if self.too_long == 'filter' else 'truncated'}")
            if self.too_long == "filter":
                drop = set(long)
                ds = ds.select([i for i in range(len(ds)) if i not in drop])
            else:
                ds = ds.map(lambda r: {col: r[col][: limit - 1] + [bpe.EOS_ID] if len(r[col]) > limit else r[col]})
        return ds

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _sampler(self, split: str, order: str) -> ShardedBatchSampler:
        ds = self.splits[split]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        lengths = [max(len(s), len(t)) for s, t in zip(ds["src_ids"], ds["tgt_ids"])]
        return ShardedBatchSampler(lengths, self.max_tokens, self.batch_size, order, self.seed, world, rank)

    def _loader(self, split: str, sampler: ShardedBatchSampler) -> DataLoader:
        ds = self.splits[split]
        src, tgt, ref = ds["src_ids"], ds["tgt_ids"], ds["target"]
        return DataLoader(
            range(len(ds)),
            batch_sampler=sampler,
            collate_fn=lambda idx: collate(idx, src, tgt, ref),
            num_workers=self.num_workers,
        )

    def train_dataloader(self):
        # An epoch's number of batches depends on its order. Lightning counts them when it
        # builds the loader, so it must build one every epoch, after the epoch is known.
        if self.trainer is not None:
            if self.trainer.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(
                    "TranslationData needs trainer.reload_dataloaders_every_n_epochs=1: the number of batches changes "
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


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), bpe.PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s)
    return out


def collate(indices: list[int], src, tgt, ref) -> dict:
    src_BS = _pad([src[i] for i in indices])
    tgt_out = _pad([tgt[i] for i in indices])
    tgt_in = torch.nn.functional.pad(tgt_out, (1, 0), value=bpe.BOS_ID)[:, :-1]
    tgt_in[tgt_in == bpe.EOS_ID] = bpe.PAD_ID
    return {
        "src": src_BS,
        "src_pad": src_BS.eq(bpe.PAD_ID),
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "tgt_pad": tgt_out.eq(bpe.PAD_ID),
        "index": torch.as_tensor(indices),
        "target": [ref[i] for i in indices],
    }
