"""The tokenized cache: concurrent builders take turns, and damage is found and rebuilt."""

import logging
import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from adamoe.data import SyntheticTranslation, TranslationData, cache


def data(tmp, train_size=300, **kwargs) -> TranslationData:
    source = SyntheticTranslation(train_size=train_size, val_size=20, test_size=20)
    return TranslationData(source, vocab_size=200, max_tokens=400, cache_dir=str(tmp / "cache"), **kwargs)


@pytest.fixture
def built(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dm = data(tmp_path)
    dm.prepare_data()
    files = {p: p.read_bytes() for p in [*dm.dataset_dir.glob("*.arrow"), dm.tokenizer_path]}
    caplog.clear()
    return dm, files


def rebuilt_as_before(dm, files, caplog) -> bool:
    again = data(dm.cache_dir.parent, verify_cache=getattr(dm, "verify_cache", False))
    again.prepare_data()
    again.setup("fit")
    return "Rebuilding the data cache" in caplog.text and all(p.read_bytes() == b for p, b in files.items())


def test_a_whole_cache_is_reused(built, caplog):
    dm, files = built
    data(dm.cache_dir.parent).prepare_data()
    assert "Reusing cached dataset" in caplog.text and "Rebuilding" not in caplog.text


def test_a_truncated_split_is_rebuilt(built, caplog):
    dm, files = built
    train = dm.dataset_dir / "train.arrow"
    train.write_bytes(files[train][: len(files[train]) // 2])
    assert rebuilt_as_before(dm, files, caplog) and "bytes, the manifest says" in caplog.text


def test_a_deleted_split_is_rebuilt(built, caplog):
    dm, files = built
    (dm.dataset_dir / "val.arrow").unlink()
    assert rebuilt_as_before(dm, files, caplog) and "val.arrow is missing" in caplog.text


def test_bytes_overwritten_in_place_are_found(built, caplog):
    dm, files = built
    train = dm.dataset_dir / "train.arrow"
    damaged = bytearray(files[train])
    damaged[len(damaged) // 3 : len(damaged) // 3 + 4096] = os.urandom(4096)[: len(damaged[len(damaged) // 3 :][:4096])]
    train.write_bytes(bytes(damaged))  # same size, new mtime
    assert rebuilt_as_before(dm, files, caplog) and "does not match its checksum" in caplog.text


def test_a_corrupt_tokenizer_is_rebuilt(built, caplog):
    dm, files = built
    text = files[dm.tokenizer_path]
    dm.tokenizer_path.write_bytes(text[:100] + b"#" * (len(text) - 100))
    assert rebuilt_as_before(dm, files, caplog) and "tokenizer" in caplog.text


def test_damage_that_keeps_size_and_time_is_found_on_request(built, caplog):
    dm, files = built
    train = dm.dataset_dir / "train.arrow"
    st = train.stat()
    damaged = bytearray(files[train])
    damaged[-100] ^= 0xFF
    train.write_bytes(bytes(damaged))
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
    data(dm.cache_dir.parent).prepare_data()  # size and time agree: the cheap check passes
    assert "Rebuilding" not in caplog.text
    dm.verify_cache = True
    assert rebuilt_as_before(dm, files, caplog)


def test_only_dead_builders_staging_is_removed(tmp_path):
    folder = tmp_path / "datasets" / "key"
    folder.parent.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live, dead = folder.with_name(f".key.{os.getpid()}.tmp"), folder.with_name(f".key.{done.stdout.strip()}.tmp")
    live.mkdir()
    dead.mkdir()
    cache.remove_orphans(folder)
    assert live.is_dir() and not dead.exists()


PREPARE = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_cache import data
data(Path({tmp!r}), train_size=20000).prepare_data()
"""


def test_two_runs_preparing_one_cache_both_finish(tmp_path):
    script = PREPARE.format(tests=str(ROOT / "tests"), tmp=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lock = tmp_path / "cache" / "datasets"
    while first.poll() is None and not any(lock.glob(".*.lock")):
        time.sleep(0.05)
    second = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out_second, out_first = second.communicate(timeout=300)[0], first.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, out_first[-2000:] + out_second[-2000:]
    assert "Tokenized train" in out_first and "Reusing cached dataset" in out_second, (
        out_first[-2000:] + out_second[-2000:]
    )
    assert len([p for p in lock.iterdir() if p.is_dir()]) == 1  # one cache, no staging left
