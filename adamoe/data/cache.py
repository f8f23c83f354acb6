"""The tokenized cache on disk: a lock per cache key, and a manifest that checks it.

A dataset folder holds one Arrow file per split and `manifest.json`: each file's size and
SHA-256, the tokenizer's included. Opening the cache compares sizes always, and hashes a
file when this machine has not hashed it since it last changed (or on request); whatever
fails is rebuilt, with a one-line notice.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

MANIFEST = "manifest.json"


@contextlib.contextmanager
def lock(folder: Path):
    """Held while one process builds or checks `folder`; another waits its turn."""
    with open(folder.with_name(f".{folder.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_orphans(folder: Path):
    """Staging folders (`.{name}.{pid}.tmp`) whose process is gone: a killed build's leftovers."""
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        pid = stale.name.removesuffix(".tmp").rsplit(".", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def write_manifest(folder: Path, tokenizer: Path):
    files = {p.name: _entry(p) for p in sorted(folder.glob("*.arrow"))}
    (folder / MANIFEST).write_text(
        json.dumps({"files": files, "tokenizer": {"name": tokenizer.name, **_entry(tokenizer)}}, indent=1)
    )
    _mark_checked(folder, [*(folder / n for n in files), tokenizer])


def _marker(folder: Path) -> Path:
    return folder / f".checked-{platform.node() or 'host'}.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _mark_checked(folder: Path, paths: list[Path]):
    _marker(folder).write_text(
        json.dumps({p.name: _stamp(p) for p in paths})
    )  # names: the folder is renamed into place


def verified(folder: Path, tokenizer: Path, full: bool = False) -> bool:
    """Whether the cache in `folder` and its `tokenizer` are whole. A damaged cache is removed
    (a damaged tokenizer too), with a one-line notice, so that it is built again."""
    if not folder.is_dir():
        return False
    problem = _problem(folder, tokenizer, full)
    if problem is None:
        return True
    rank_zero_info(f"Rebuilding the data cache: {problem}")
    aside = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    folder.rename(aside)  # out of the way at once; then removed
    shutil.rmtree(aside, ignore_errors=True)
    if "tokenizer" in problem:
        tokenizer.unlink(missing_ok=True)
    return False


def _problem(folder: Path, tokenizer: Path, full: bool) -> str | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected = {folder / name: e for name, e in manifest["files"].items()}
        expected[tokenizer] = manifest["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder / MANIFEST} is missing or unreadable"
    try:
        checked = json.loads(_marker(folder).read_text())
    except (OSError, ValueError):
        checked = {}
    for path, want in expected.items():
        what = "tokenizer " if path == tokenizer else ""
        if not path.is_file():
            return f"{what}{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{what}{path} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        if (full or checked.get(path.name) != _stamp(path)) and sha256(path) != want["sha256"]:
            return f"{what}{path} does not match its checksum"
    _mark_checked(folder, list(expected))
    return None
