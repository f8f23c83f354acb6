"""Where the text comes from. Each source gives, per split, Arrow tables with our column
names (`source`/`target` for translation, `text`/`label` for classification, `text` for
language modelling), a chunk at a time, and checks its input on the way: no corpus is
ever held whole in memory."""

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
        return hf_datasets().Dataset.from_dict(
            {"text": synthetic.generate(self.size(split), seed=self.split_seed(split))[0]}
        )


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

    def __init__(
        self, root: str, src_lang: str, tgt_lang: str, train: str = "train", val: str = "val", test: str | None = "test"
    ):
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
                raise DataError(
                    f"parallel files differ in length: {src_path} has {n[src_path]} lines, {tgt_path} has {n[tgt_path]}"
                )
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
        return super().fingerprint() + "|".join(
            file_stamp(Path(f)) for f in self.files.values() if f and Path(f).exists()
        )

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


def digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
