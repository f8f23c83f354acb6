"""Sources that read tables: TSV, CSV, JSON Lines and Parquet files, and Hugging Face hub
datasets, with the task's columns picked out of theirs."""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adamoe.data import text
from adamoe.data.sources import DataSource, hf_datasets
from adamoe.data.text import blank, file_stamp
from adamoe.errors import DataError

if TYPE_CHECKING:
    import datasets


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
                raise DataError(
                    f"{where}:{start + i + first_line}: column {theirs!r} is empty or not {what} "
                    f"({values[i].as_py()!r})"
                )
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

    def __init__(
        self,
        train: str,
        val: str,
        test: str | None = None,
        columns: dict[str, str] | None = None,
        format: str | None = None,
    ):
        self.files = {"train": train, "val": val, "test": test}
        self.columns = columns or {"source": "source", "target": "target"}
        self.format = format

    def fingerprint(self):
        return super().fingerprint() + "|".join(
            file_stamp(Path(f)) for f in self.files.values() if f and Path(f).exists()
        )

    def chunks(self, split):
        path = self.files[split]
        if path is None:
            return None
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
        fmt = self.format or self.FORMATS.get(Path(path.removesuffix(".gz")).suffix)
        if fmt is None:
            raise DataError(f"{path}: unknown format; set `format` to one of {sorted(set(self.FORMATS.values()))}")
        builder, kwargs = {
            "tsv": ("csv", {"delimiter": "\t"}),
            "csv": ("csv", {}),
            "json": ("json", {}),
            "parquet": ("parquet", {}),
        }[fmt]
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

    def __init__(
        self, name: str, columns: dict[str, str], config: str | None = None, splits: dict[str, str] | None = None
    ):
        self.name, self.config, self.columns = name, config, columns
        self.splits = {"train": "train", "val": "validation", "test": "test", **(splits or {})}

    def chunks(self, split):
        ds = hf_datasets().load_dataset(self.name, self.config, split=self.splits[split])
        return _select_columns(ds, self.columns, f"{self.name}[{self.splits[split]}]", first_line=1)
