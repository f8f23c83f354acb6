"""Where the text comes from. Each source yields, per split, a `datasets.Dataset` with our
column names (`source`/`target` for translation, `text`/`label` for classification,
`text` for language modelling), and checks its input on the way."""

import gzip
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
from lightning.pytorch.utilities import rank_zero_info

from adamoe.data import synthetic
from adamoe.errors import DataError

SPLITS = ("train", "val", "test")


def _pairs(sources: list[str], targets: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"source": sources, "target": targets})


class DataSource:
    """Base class. `load(split)` returns the split, or None when the source has no such split."""

    def load(self, split: str) -> datasets.Dataset | None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes whenever the data would: used to key the tokenizer and dataset caches.
        The class is part of it: two sources with equal arguments can make different data."""
        return f"{type(self).__module__}.{type(self).__qualname__}{sorted(vars(self).items())!r}"


class Generated(DataSource):
    """Base of the embedded tasks (see `adamoe.data.synthetic`): generated, no download."""

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
        return datasets.Dataset.from_dict({"text": texts, "label": labels})


class SyntheticText(Generated):
    """The embedded language-modelling task: sentences of the synthetic grammar."""

    def load(self, split):
        return datasets.Dataset.from_dict({"text": synthetic.generate(self.size(split), seed=self.split_seed(split))[0]})


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
        stamps = [
            _file_stamp(self._path(s, lang))
            for s in SPLITS
            if self.prefixes[s]
            for lang in (self.src_lang, self.tgt_lang)
            if self._path(s, lang).exists()
        ]
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


class TextLines(DataSource):
    """Plain text, one document a line (optionally `.gz`), for language modelling. Blank
    lines separate paragraphs in many corpora: they are skipped, and counted in the log."""

    def __init__(self, train: str, val: str, test: str | None = None):
        self.files = {"train": train, "val": val, "test": test}

    def fingerprint(self):
        return super().fingerprint() + "|".join(_file_stamp(Path(f)) for f in self.files.values() if f and Path(f).exists())

    def load(self, split):
        if self.files[split] is None:
            return None
        lines = _read_lines(Path(self.files[split]))
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise DataError(f"{self.files[split]}: no text, only blank lines")
        if len(texts) < len(lines):
            rank_zero_info(f"{self.files[split]}: skipped {len(lines) - len(texts)} blank lines of {len(lines)}")
        return datasets.Dataset.from_dict({"text": texts})


def _get(row: dict, column: str):
    """`column` may address a nested field, e.g. `translation.de`."""
    for key in column.split("."):
        row = row[key]
    return row


def _select_columns(ds: datasets.Dataset, columns: dict[str, str], where: str, first_line: int) -> datasets.Dataset:
    """Our columns (`columns`' keys) from the file's (its values). Text must be non-blank;
    a `label` may also be an integer."""
    if len(ds) == 0:
        raise DataError(f"{where}: empty dataset")
    row = ds[0]
    for col in columns.values():
        try:
            _get(row, col)
        except (KeyError, TypeError):
            raise DataError(f"{where}: no column {col!r}; columns are {ds.column_names}") from None
    out = {ours: [_get(r, theirs) for r in ds] for ours, theirs in columns.items()}
    for ours, values in out.items():
        for i, v in enumerate(values):
            if not ((isinstance(v, str) and v.strip()) or (ours == "label" and isinstance(v, int) and not isinstance(v, bool))):
                raise DataError(
                    f"{where}:{i + first_line}: column {columns[ours]!r} is empty or not {'a label' if ours == 'label' else 'text'} ({v!r})"
                )
    return datasets.Dataset.from_dict(out)


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
        return _select_columns(ds, self.columns, path, first_line=2 if fmt in ("tsv", "csv") else 1)


class HubDataset(DataSource):
    """A Hugging Face hub dataset, for machines with network access.

    `columns` maps the task's columns to the dataset's, as for `TableFiles`; they may be
    nested (`translation.de`, as in WMT datasets). `splits` maps our split names to the
    hub's, e.g. `{"val": "validation"}`.
    """

    def __init__(self, name: str, columns: dict[str, str], config: str | None = None, splits: dict[str, str] | None = None):
        self.name, self.config, self.columns = name, config, columns
        self.splits = {"train": "train", "val": "validation", "test": "test", **(splits or {})}

    def load(self, split):
        ds = datasets.load_dataset(self.name, self.config, split=self.splits[split])
        return _select_columns(ds, self.columns, f"{self.name}[{self.splits[split]}]", first_line=1)


def digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
