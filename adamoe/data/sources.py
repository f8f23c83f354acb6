"""Where the text comes from. Each source gives, per split, Arrow tables with our column
names (`source`/`target` for translation, `text`/`label` for classification, `text` for
language modelling), a chunk at a time, and checks its input on the way: no corpus is
ever held whole in memory."""

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lightning.pytorch.utilities import rank_zero_info

from adamoe.data import synthetic, text
from adamoe.data.text import blank, file_stamp, first_blank, line_chunks
from adamoe.errors import DataError

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "val", "test")


def hf_datasets():
    """The `datasets` package, imported when data is first read: it is slow to import, and
    commands that read none (`--help`, `--print_config`) do without it."""
    import datasets

    return datasets


def _pairs(sources: list[str], targets: list[str]) -> "datasets.Dataset":
    return hf_datasets().Dataset.from_dict({"source": sources, "target": targets})


class DataSource:
    """Base class. A small source implements `load(split)`, the whole split as a
    `datasets.Dataset` (None when it has no such split); a large one implements `chunks`."""

    def load(self, split: str) -> "datasets.Dataset | None":
        chunks = self.chunks(split)
        return None if chunks is None else hf_datasets().Dataset(pa.concat_tables(list(chunks)))

    def chunks(self, split: str) -> Iterator[pa.Table] | None:
        """The split as Arrow tables of at most `text.CHUNK_ROWS` rows, read as they are needed."""
        ds = self.load(split)
        if ds is None:
            return None
        table = ds.with_format("arrow")[:]
        return (table.slice(i, text.CHUNK_ROWS) for i in range(0, len(table), text.CHUNK_ROWS))

    def locate(self, split: str, index: int, column: str) -> str:
        """Where sample `index` (from 0) of `split` is, for an error message: a file and line where known."""
        return f"{split} sample {index + 1}"

    def fingerprint(self) -> str:
        """Changes whenever the data would: used to key the tokenizer and dataset caches.
        The class is part of it: two sources with equal arguments can make different data."""
        return f"{type(self).__module__}.{type(self).__qualname__}{sorted(vars(self).items())!r}"


class Generated(DataSource):
    """The embedded tasks, generated (`adamoe.data.synthetic`): no files, no download."""

    def __init__(self, train_size: int = 20000, val_size: int = 500, test_size: int = 500, seed: int = 0):
        self.train_size, self.val_size, self.test_size, self.seed = train_size, val_size, test_size, seed

    def size(self, split: str) -> int:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}[split]

    def split_seed(self, split: str) -> int:
        return self.seed * 10 + SPLITS.index(split)  # distinct per split: the splits stay apart


class SyntheticTranslation(Generated):
    """The embedded translation task: sentences of a small grammar and their reordered,
    re-worded translations."""

    def load(self, split):
        return _pairs(*synthetic.generate(self.size(split), seed=self.split_seed(split)))


class SyntheticSentiment(Generated):
    """The embedded classification task (`synthetic.sentiment`): label 1 for a positive
    sentence, 0 for a negative one. Some sentences carry one decisive word; others need
    negation or a contrast clause read right."""

    def load(self, split):
        texts, labels = synthetic.sentiment(self.size(split), seed=self.split_seed(split))
        return hf_datasets().Dataset.from_dict({"text": texts, "label": labels})


class SyntheticText(Generated):
    """The embedded language-modelling task: sentences of the synthetic grammar."""

    def load(self, split):
        return hf_datasets().Dataset.from_dict({"text": synthetic.generate(self.size(split), seed=self.split_seed(split))[0]})


class ParallelText(DataSource):
    """One sentence per line, one file per language: `{root}/{split}.{lang}`, optionally `.gz`.

    Multi30k ships this way: `ParallelText(root=".../multi30k", src_lang="de", tgt_lang="en",
    test="test_2016_flickr")`.

    Args:
        root: the folder that holds the files
        src_lang: the source files' suffix (de in train.de)
        tgt_lang: the target files' suffix
        train: the training files' name before the suffix
        val: the validation files' name
        test: the test files' name (null: none)
    """

    def __init__(self, root: str, src_lang: str, tgt_lang: str, train: str = "train", val: str = "val", test: str | None = "test"):
        self.root, self.src_lang, self.tgt_lang = root, src_lang, tgt_lang
        self.prefixes = {"train": train, "val": val, "test": test}

    def _path(self, split: str, lang: str) -> Path:
        base = Path(self.root) / f"{self.prefixes[split]}.{lang}"
        gz = base.with_name(base.name + ".gz")
        return gz if gz.exists() and not base.exists() else base

    def fingerprint(self):
        stamps = [
            file_stamp(self._path(s, lang))
            for s in SPLITS
            if self.prefixes[s]
            for lang in (self.src_lang, self.tgt_lang)
            if self._path(s, lang).exists()
        ]
        return super().fingerprint() + "|".join(stamps)

    def chunks(self, split):
        if self.prefixes[split] is None:
            return None
        return self._chunks(self._path(split, self.src_lang), self._path(split, self.tgt_lang))

    def locate(self, split, index, column):
        return f"{self._path(split, self.src_lang if column == 'source' else self.tgt_lang)}:{index + 1}"

    def _chunks(self, src_path: Path, tgt_path: Path):
        src, tgt, done = line_chunks(src_path), line_chunks(tgt_path), 0
        while True:
            a, b = next(src, None), next(tgt, None)
            if a is None or b is None or len(a) != len(b):
                if a is None and b is None:
                    return
                n = {
                    path: done + sum(map(len, rest)) + (len(c) if c is not None else 0)
                    for path, c, rest in ((src_path, a, src), (tgt_path, b, tgt))
                }
                raise DataError(f"parallel files differ in length: {src_path} has {n[src_path]} lines, {tgt_path} has {n[tgt_path]}")
            for path, side in ((src_path, a), (tgt_path, b)):
                if (i := first_blank(side)) is not None:
                    raise DataError(f"{path}:{done + i + 1}: empty line (its pair is not empty, or both are)")
            done += len(a)
            yield pa.table({"source": a, "target": b})


class TextLines(DataSource):
    """Plain text, one document a line (optionally `.gz`), for language modelling. Blank
    lines separate paragraphs in many corpora: they are skipped, and counted in the log."""

    def __init__(self, train: str, val: str, test: str | None = None):
        self.files = {"train": train, "val": val, "test": test}

    def fingerprint(self):
        return super().fingerprint() + "|".join(file_stamp(Path(f)) for f in self.files.values() if f and Path(f).exists())

    def chunks(self, split):
        return None if self.files[split] is None else self._chunks(Path(self.files[split]))

    def _chunks(self, path: Path):
        lines = kept = 0
        for chunk in line_chunks(path):
            real = pc.invert(blank(chunk))
            lines, kept = lines + len(chunk), kept + pc.sum(real).as_py()
            yield pa.table({"text": chunk.filter(real)})
        if not kept:
            raise DataError(f"{path}: no text, only blank lines")
        if kept < lines:
            rank_zero_info(f"{path}: skipped {lines - kept} blank lines of {lines}")


def _select_columns(ds: "datasets.Dataset", columns: dict[str, str], where: str, first_line: int) -> Iterator[pa.Table]:
    """Our columns (`columns`' keys) from the file's (its values; dots reach nested
    fields), a chunk at a time. Text must be non-blank; a `label` may also be an integer."""
    table = ds.data.table
    if table.num_rows == 0:
        raise DataError(f"{where}: empty dataset")
    while any(pa.types.is_struct(field.type) for field in table.schema):
        table = table.flatten()  # `translation.de` becomes a column of its own
    for theirs in columns.values():
        if theirs not in table.column_names:
            raise DataError(f"{where}: no column {theirs!r}; columns are {ds.column_names}")
    for start in range(0, table.num_rows, text.CHUNK_ROWS):
        part = table.slice(start, text.CHUNK_ROWS)
        out = {}
        for ours, theirs in columns.items():
            values = part.column(theirs).combine_chunks()
            if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
                bad = pc.or_kleene(pc.is_null(values), blank(values))
            elif ours == "label" and pa.types.is_integer(values.type):
                bad = pc.is_null(values)
            else:
                bad = pa.array(np.ones(len(values), dtype=bool))
            where_bad = np.flatnonzero(bad.fill_null(True).to_numpy(zero_copy_only=False))
            if where_bad.size:
                i = int(where_bad[0])
                what = "a label" if ours == "label" else "text"
                raise DataError(f"{where}:{start + i + first_line}: column {theirs!r} is empty or not {what} ({values[i].as_py()!r})")
            out[ours] = values
        yield pa.table(out)


class TableFiles(DataSource):
    """TSV, CSV, JSON Lines or Parquet files.

    `columns` maps the task's columns to the file's: `{"source": "de", "target": "en"}` for
    translation (the default names `source`/`target`), `{"text": "sentence", "label":
    "label"}` for classification, `{"text": "text"}` for language modelling. Nested JSON
    fields are addressed with dots (`translation.de`). The format follows the file
    extension unless `format` is given. Error lines count from 1 and, for TSV/CSV, include
    the header line.
    """

    FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

    def __init__(self, train: str, val: str, test: str | None = None, columns: dict[str, str] | None = None, format: str | None = None):
        self.files = {"train": train, "val": val, "test": test}
        self.columns = columns or {"source": "source", "target": "target"}
        self.format = format

    def fingerprint(self):
        return super().fingerprint() + "|".join(file_stamp(Path(f)) for f in self.files.values() if f and Path(f).exists())

    def chunks(self, split):
        path = self.files[split]
        if path is None:
            return None
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
        fmt = self.format or self.FORMATS.get(Path(path.removesuffix(".gz")).suffix)
        if fmt is None:
            raise DataError(f"{path}: unknown format; set `format` to one of {sorted(set(self.FORMATS.values()))}")
        builder, kwargs = {"tsv": ("csv", {"delimiter": "\t"}), "csv": ("csv", {}), "json": ("json", {}), "parquet": ("parquet", {})}[fmt]
        try:
            ds = hf_datasets().load_dataset(builder, data_files=os.path.abspath(path), split="train", **kwargs)
        except Exception as e:  # the loaders raise many types; keep the file name in front
            raise DataError(f"{path}: cannot read as {fmt}: {e}") from e
        return _select_columns(ds, self.columns, path, first_line=self._first_line(path))

    def _first_line(self, path: str) -> int:
        return 2 if (self.format or self.FORMATS.get(Path(path.removesuffix(".gz")).suffix)) in ("tsv", "csv") else 1

    def locate(self, split, index, column):
        path = self.files[split]
        if not path or Path(path).suffix == ".parquet":
            return super().locate(split, index, column)
        return f"{path}:{index + self._first_line(path)}"


class HubDataset(DataSource):
    """A Hugging Face hub dataset, for machines with network access.

    `columns` maps the task's columns to the dataset's, as for `TableFiles`; they may be
    nested (`translation.de`, as in WMT datasets). `splits` maps our split names to the
    hub's, e.g. `{"val": "validation"}`.
    """

    def __init__(self, name: str, columns: dict[str, str], config: str | None = None, splits: dict[str, str] | None = None):
        self.name, self.config, self.columns = name, config, columns
        self.splits = {"train": "train", "val": "validation", "test": "test", **(splits or {})}

    def chunks(self, split):
        ds = hf_datasets().load_dataset(self.name, self.config, split=self.splits[split])
        return _select_columns(ds, self.columns, f"{self.name}[{self.splits[split]}]", first_line=1)


def digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
