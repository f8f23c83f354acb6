"""The tokenized cache: one Arrow file per split, memory-mapped, read a batch at a time.

A split holds, per batch side (`src`, `tgt`), the token ids of every sample (lists of
int32, </s> included), and the columns the task keeps as they are. Lengths come from the
Arrow offsets, so loading a cached split reads no token; a batch gathers its rows alone.
"""

import mmap
import os
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer

from adamoe.data import text
from adamoe.data.tokenizer import EOS_ID
from adamoe.errors import DataError


def encode(tokenizer: Tokenizer, chunk: pa.Table, columns: dict[str, str], keep: Iterable[str]) -> pa.Table:
    """Token ids of a chunk's text `columns` (column -> side), beside its `keep` columns."""
    out = {side: token_ids(tokenizer, chunk.column(column).combine_chunks()) for column, side in columns.items()}
    return pa.table({**out, **{c: chunk.column(c) for c in keep}})


def token_ids(tokenizer: Tokenizer, texts: pa.Array) -> pa.ListArray:
    """Each text's token ids, </s> last, as Arrow lists of int32.

    BPE encodes one word at a time, so a text of words between single spaces, which NFKC
    leaves as it is (the tokenizer's normalizer changes nothing and its pre-tokenizer
    splits at each space), is
    encoded here word by word, each distinct word of the chunk once, and the ids are
    stitched together with array operations; a test checks the result against the
    tokenizer's own. Other texts go through the tokenizer whole.
    """
    spaced = pc.or_(pc.match_substring(texts, "  "), pc.match_substring_regex(texts, "^ | $")).to_numpy(
        zero_copy_only=False
    )
    normal = np.fromiter((unicodedata.is_normalized("NFKC", t) for t in texts.to_pylist()), bool, len(texts))
    plain = normal & ~spaced
    if not plain.all():
        other = np.flatnonzero(~plain)
        slow = pa.array(
            [e.ids for e in tokenizer.encode_batch_fast(texts.take(pa.array(other)).to_pylist())], pa.list_(pa.int32())
        )
        fast = token_ids(tokenizer, texts.filter(pa.array(plain))) if plain.any() else slow[:0]
        back = np.argsort(np.concatenate([np.flatnonzero(plain), other]), kind="stable")
        return pa.concat_arrays([fast, slow]).take(pa.array(back))
    words = pc.split_pattern(texts, " ")
    coded = pc.dictionary_encode(words.flatten())
    pieces = [e.ids for e in tokenizer.encode_batch_fast(coded.dictionary.to_pylist(), add_special_tokens=False)]
    sizes = np.fromiter(map(len, pieces), np.int64, len(pieces))
    flat = np.fromiter((t for p in pieces for t in p), np.int32, int(sizes.sum()))
    occurrence, word_offsets = coded.indices.to_numpy(), words.offsets.to_numpy()
    per_word = sizes[occurrence]  # tokens of each word of each text
    per_text = np.add.reduceat(per_word, word_offsets[:-1])  # every text has a word: none is empty
    offsets = np.concatenate([[0], np.cumsum(per_text + 1)])  # + 1: the </s>
    values = np.full(offsets[-1], EOS_ID, np.int32)
    text_of_word = np.repeat(np.arange(len(texts)), np.diff(word_offsets))
    before = np.cumsum(per_word) - per_word  # word tokens before each word, over the chunk
    start = before + text_of_word  # each earlier text adds its </s>
    first = np.concatenate([[0], np.cumsum(sizes)])[:-1][occurrence]
    step = np.arange(int(per_word.sum())) - np.repeat(before, per_word)
    values[np.repeat(start, per_word) + step] = flat[np.repeat(first, per_word) + step]
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def limit_lengths(ds: "Split", split: str, max_len: dict[str, int], too_long: str, locate) -> "Split":
    """Apply each side's length limit as `too_long` says ("error", "filter", "truncate");
    `locate(split, index, side)` names a sample's file and line for the error."""
    for side, limit in max_len.items():
        long = np.flatnonzero(ds.lengths[side] > limit)
        if not long.size:
            continue
        kind = "source" if side == "src" else "target"
        share = f"{long.size} of {len(ds)} samples ({long.size / len(ds):.2%})"
        what = f"{split}: {share} have a {kind} longer than {limit} tokens"
        if too_long == "error":
            first = int(long[0] if ds.rows is None else ds.rows[long[0]])
            raise DataError(
                f"{locate(split, first, side)}: {what} (this is the first). Raise the limit, or set too_long to "
                "'filter' or 'truncate'"
            )
        rank_zero_info(f"{what}: {'filtered out' if too_long == 'filter' else 'truncated'}")
        if too_long == "filter":
            ds.keep(ds.lengths[side] <= limit)
        else:
            ds.cut(side, limit)
    return ds


def read_inputs(path: Path, tokenizer: Tokenizer, column: str, side: str, limit: int, truncate: bool) -> "Split":
    """A text file of new inputs, one a line, as a split of `side` token ids. Every line is
    an input, blank ones included (each gets its line of output); a line of more than
    `limit` tokens is cut there, or refused with its line number."""
    lines = pa.concat_arrays(list(text.line_chunks(path)))
    split = Split(encode(tokenizer, pa.table({column: lines}), {column: side}, ()), [side])
    long = np.flatnonzero(split.lengths[side] > limit)
    if long.size and not truncate:
        raise DataError(
            f"{path}:{long[0] + 1}: {long.size} of {len(split)} lines are longer than {limit} tokens (this is the "
            "first); "
            "raise the limit or set too_long to 'truncate' (a prediction is made for every line)"
        )
    if long.size:
        split.cut(side, limit)
    return split


def write(path: Path, tables: Iterable[pa.Table], progress: Callable[[int], object] | None = None) -> int:
    """Stream `tables` into one Arrow file, telling `progress` the rows of each; returns the rows written."""
    writer, rows = None, 0
    try:
        for table in tables:
            writer = writer or pa.ipc.new_file(str(path), table.schema)
            writer.write_table(table)
            rows += table.num_rows
            if progress is not None:
                progress(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return rows


def token_share(path: Path, sides, token_id: int) -> float:
    """The share of the tokens of `sides` in a written split that are `token_id`."""
    table = Split.open(path, sides).table
    ids = pa.concat_arrays([c.flatten() for side in sides for c in table.column(side).chunks])
    return pc.mean(pc.equal(ids, token_id)).as_py() or 0.0


def _lengths(column: pa.ChunkedArray) -> np.ndarray:
    parts = [np.diff(chunk.offsets.to_numpy()).astype(np.int32, copy=False) for chunk in column.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


class Split:
    """One split: a memory-mapped table, the rows of it in use (all, unless filtered), each
    side's lengths, and the lengths sequences are cut to when gathered (`truncate`)."""

    def __init__(self, table: pa.Table, sides: Iterable[str]):
        self.table, self.rows, self.truncate = table, None, {}
        self.lengths = {side: _lengths(table.column(side)) for side in sides}
        # Rows are read one by one from the record batch that holds them, token ids through
        # numpy views of its buffers: an Arrow `take` would first join the chunks (a copy of
        # the split), and reading only the rows a batch needs keeps the rest on disk.
        self.batches = table.to_batches()
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])
        self._views: dict = {}

    @classmethod
    def open(cls, path: Path, sides: Iterable[str]) -> "Split":
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            # Batches read scattered rows. Pages of a just-written file sit in the page cache
            # in large blocks, and a row read would map hundreds of kilobytes around it into
            # this process: start from disk, a page per row, so that memory stays flat.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        mapped.madvise(mmap.MADV_RANDOM)
        return cls(pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped))).read_all(), sides)

    def __len__(self) -> int:
        return self.table.num_rows if self.rows is None else len(self.rows)

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def keep(self, mask: np.ndarray):
        """Use only the samples where `mask` is True (numbered again from 0)."""
        self.rows = np.flatnonzero(mask) if self.rows is None else self.rows[mask]
        self.lengths = {side: n[mask] for side, n in self.lengths.items()}

    def cut(self, side: str, limit: int):
        """Gather `side` cut to `limit` tokens, the last one </s>."""
        self.truncate[side] = limit
        self.lengths[side] = np.minimum(self.lengths[side], limit)

    def gather(self, indices, columns: Iterable[str]) -> dict[str, list]:
        """The values of `columns` for samples `indices`, as Python lists in that order."""
        rows = np.asarray(indices, dtype=np.int64)
        rows = rows if self.rows is None else self.rows[rows]
        which = np.searchsorted(self.starts, rows, side="right") - 1
        local = (rows - self.starts[which]).tolist()
        out = {c: [self._row(int(b), c, i) for b, i in zip(which, local)] for c in columns}
        for side in self.truncate.keys() & out.keys():
            limit = self.truncate[side]
            out[side] = [ids if len(ids) <= limit else ids[: limit - 1] + [EOS_ID] for ids in out[side]]
        return out

    def _row(self, batch: int, column: str, i: int):
        view = self._views.get((batch, column))
        if view is None:
            array = self.batches[batch].column(column)
            if pa.types.is_list(array.type) and array.values.type == pa.int32() and array.offset == 0:
                offsets = np.frombuffer(array.buffers()[1], np.int32, len(array) + 1)
                view = self._views[(batch, column)] = (offsets, np.frombuffer(array.values.buffers()[1], np.int32))
            else:
                view = self._views[(batch, column)] = array
        if isinstance(view, tuple):
            offsets, values = view
            return values[offsets[i] : offsets[i + 1]].tolist()
        return view[i].as_py()

    def numbers(self, column: str) -> np.ndarray:
        """A numeric column of the samples in use, as one array."""
        values = self.table.column(column).to_numpy()
        return values if self.rows is None else values[self.rows]

    def __getitem__(self, key):
        """A whole column by name (small splits: it is read into memory), or one sample."""
        if isinstance(key, str):
            return self.gather(range(len(self)), [key])[key]
        return {c: v[0] for c, v in self.gather([key], self.column_names).items()}


def packed(split: Split, side: str, size: int) -> Split:
    """`side`'s sequences joined end to end and cut into blocks of `size` tokens (the last
    shorter): nothing is dropped. The joined ids are read into memory."""
    if split.rows is None and not split.truncate:
        values = pa.concat_arrays([chunk.flatten() for chunk in split.table.column(side).chunks])
    else:
        values = pa.array([t for ids in split[side] for t in ids], pa.int32())
    offsets = np.append(np.arange(0, len(values), size), len(values)).astype(np.int32)
    return Split(pa.table({side: pa.ListArray.from_arrays(pa.array(offsets), values)}), [side])
