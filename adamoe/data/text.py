"""Plain text files, checked as they are read: UTF-8, line endings, blank lines."""

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adamoe.errors import DataError

CHUNK_ROWS = 100_000  # rows a source hands over at a time: a few tens of MB of text

# Characters that show nothing: a line of only these is blank.
ZERO_WIDTH = "[\u200b\u200c\u200d\u2060\ufeff]"


def file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def decode_lines(path: Path, lines: list[bytes], first: int) -> pa.Array:
    """Lines (without their newline) as an Arrow string array, checked to be UTF-8."""
    try:
        text = pa.array(lines, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:  # find the line to blame
        for i, line in enumerate(lines):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{first + i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        raise
    return pc.utf8_rtrim(text, characters="\r")


def line_chunks(path: Path) -> Iterator[pa.Array]:
    """A text file (optionally gzipped), CHUNK_ROWS lines at a time."""
    rows = CHUNK_ROWS
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        lines, tail, first = [], b"", 1
        while block := f.read(1 << 24):
            if first == 1 and not lines and not tail:
                block = block.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not text
                if b"\r" in block and b"\n" not in block:
                    raise DataError(
                        f"{path}: lines end in a carriage return alone (old Mac line endings); convert them to \\n"
                    )
            *done, tail = (tail + block).split(b"\n")
            lines += done
            while len(lines) >= rows:
                yield decode_lines(path, lines[:rows], first)
                lines, first = lines[rows:], first + rows
        lines += [tail] if tail else []
        if lines:
            yield decode_lines(path, lines, first)
        elif first == 1:
            raise DataError(f"{path}: empty file")


def blank(text: pa.Array) -> pa.Array:
    """True where a text is empty once whitespace and zero-width characters are removed."""
    visible = pc.replace_substring_regex(text, ZERO_WIDTH, "")
    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(visible)), 0)


def first_blank(text: pa.Array) -> int | None:
    blank_ = blank(text).to_numpy(zero_copy_only=False)
    where = np.flatnonzero(blank_)
    return int(where[0]) if where.size else None
