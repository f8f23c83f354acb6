"""Where sentence pairs come from. Each source yields, per split, a `datasets.Dataset`
with string columns `source` and `target`, and checks its input on the way."""

import gzip
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import datasets

from adamoe.data import synthetic

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data; the message names the file and, where one is to blame, the line."""


def _pairs(sources: list[str], targets: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"source": sources, "target": targets})


class DataSource:
    """Base class. `load(split)` returns the split, or None when the source has no such split."""

    def load(self, split: str) -> datasets.Dataset | None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes whenever the data would: used to key the tokenizer and dataset caches."""
        return repr(sorted(vars(self).items()))


class Synthetic(DataSource):
    """The embedded task (see `adamoe.data.synthetic`): generated, no download."""

    def __init__(self, train_size: int = 20000, val_size: int = 500, test_size: int = 500, seed: int = 0):
        self.train_size, self.val_size, self.test_size, self.seed = train_size, val_size, test_size, seed

    def load(self, split):
        size = {"train": self.train_size, "val": self.val_size, "test": self.test_size}[split]
        # Distinct seeds per split keep the splits apart; the lexicon is shared.
        return _pairs(*synthetic.generate(size, seed=self.seed * 10 + SPLITS.index(split)))


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for i, b in enumerate(raw, 1):
        try:
            lines.append(b.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not lines:
        raise DataError(f"{path}: empty file")
    return lines


class ParallelText(DataSource):
    """One sentence per line, one file per language: `{root}/{split}.{lang}`, optionally `.gz`.

    Multi30k ships this way: `ParallelText(root=".../multi30k", src_lang="de", tgt_lang="en",
    test="test_2016_flickr")`.
    """

    def __init__(self, root: str, src_lang: str, tgt_lang: str, train: str = "train", val: str = "val", test: str | None = "test"):
        self.root, self.src_lang, self.tgt_lang = root, src_lang, tgt_lang
        self.prefixes = {"train": train, "val": val, "test": test}

    def _path(self, split: str, lang: str) -> Path:
        base = Path(self.root) / f"{self.prefixes[split]}.{lang}"
        gz = base.with_name(base.name + ".gz")
        return gz if gz.exists() and not base.exists() else base

    def fingerprint(self):
        stamps = [_file_stamp(self._path(s, lang)) for s in SPLITS if self.prefixes[s] for lang in (self.src_lang, self.tgt_lang) if self._path(s, lang).exists()]
        return super().fingerprint() + "|".join(stamps)

    def load(self, split):
        if self.prefixes[split] is None:
            return None
        src_path, tgt_path = self._path(split, self.src_lang), self._path(split, self.tgt_lang)
        src, tgt = _read_lines(src_path), _read_lines(tgt_path)
        if len(src) != len(tgt):
            raise DataError(f"parallel files differ in length: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}")
        for path, lines in ((src_path, src), (tgt_path, tgt)):
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    raise DataError(f"{path}:{i}: empty line (its pair is not empty, or both are)")
        return _pairs(src, tgt)


def _get(row: dict, column: str):
    """`column` may address a nested field, e.g. `translation.de`."""
    for key in column.split("."):
        row = row[key]
    return row


def _select_columns(ds: datasets.Dataset, src_column: str, tgt_column: str, where: str, first_line: int) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"{where}: empty dataset")
    row = ds[0]
    for col in (src_column, tgt_column):
        try:
            _get(row, col)
        except (KeyError, TypeError):
            raise DataError(f"{where}: no column {col!r}; columns are {ds.column_names}") from None
    src = [_get(r, src_column) for r in ds]
    tgt = [_get(r, tgt_column) for r in ds]
    for i, (s, t) in enumerate(zip(src, tgt)):
        for col, v in ((src_column, s), (tgt_column, t)):
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}:{i + first_line}: column {col!r} is empty or not text ({v!r})")
    return _pairs(src, tgt)


class TableFiles(DataSource):
    """TSV, CSV, JSON Lines or Parquet files with a source and a target column.

    The format follows the file extension unless `format` is given. Nested JSON fields are
    addressed with dots (`translation.de`). Error lines count from 1 and, for TSV/CSV,
    include the header line.
    """

    FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

    def __init__(self, train: str, val: str, test: str | None = None, src_column: str = "source", tgt_column: str = "target", format: str | None = None):
        self.files = {"train": train, "val": val, "test": test}
        self.src_column, self.tgt_column, self.format = src_column, tgt_column, format

    def fingerprint(self):
        return super().fingerprint() + "|".join(_file_stamp(Path(f)) for f in self.files.values() if f and Path(f).exists())

    def load(self, split):
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
            ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", **kwargs)
        except Exception as e:  # the loaders raise many types; keep the file name in front
            raise DataError(f"{path}: cannot read as {fmt}: {e}") from e
        return _select_columns(ds, self.src_column, self.tgt_column, path, first_line=2 if fmt in ("tsv", "csv") else 1)


class HubDataset(DataSource):
    """A Hugging Face hub dataset, for machines with network access.

    `splits` maps our split names to the hub's, e.g. `{"val": "validation"}`; columns may
    be nested (`translation.de`, as in WMT datasets).
    """

    def __init__(self, name: str, src_column: str, tgt_column: str, config: str | None = None, splits: dict[str, str] | None = None):
        self.name, self.config, self.src_column, self.tgt_column = name, config, src_column, tgt_column
        self.splits = {"train": "train", "val": "validation", "test": "test", **(splits or {})}

    def load(self, split):
        ds = datasets.load_dataset(self.name, self.config, split=self.splits[split])
        return _select_columns(ds, self.src_column, self.tgt_column, f"{self.name}[{self.splits[split]}]", first_line=1)


def digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
