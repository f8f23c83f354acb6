import gzip
import json

import pytest
import torch

from adamoe.data import ParallelText, SyntheticTranslation, TableFiles, TranslationData
from adamoe.data import tokenizer as bpe
from adamoe.data.sampler import ShardedBatchSampler
from adamoe.errors import DataError


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def parallel(tmp_path, de="a b\nc d\n", en="x y\nz w\n", split="train"):
    write(tmp_path / f"{split}.de", de)
    write(tmp_path / f"{split}.en", en)
    return ParallelText(str(tmp_path), "de", "en")


def test_parallel_text_reads_plain_and_gz(tmp_path):
    parallel(tmp_path)
    with gzip.open(tmp_path / "val.de.gz", "wt") as f:
        f.write("ä b\n")
    with gzip.open(tmp_path / "val.en.gz", "wt") as f:
        f.write("x\n")
    src = ParallelText(str(tmp_path), "de", "en")
    assert src.load("train")["target"] == ["x y", "z w"]
    assert src.load("val")["source"] == ["ä b"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"train\.de: file not found"):
        ParallelText(str(tmp_path), "de", "en").load("train")


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    src = parallel(tmp_path, de="a\nb\nc\n", en="x\ny\n")
    with pytest.raises(DataError, match=r"train\.de has 3 lines, .*train\.en has 2"):
        src.load("train")


def test_non_utf8_names_file_and_line(tmp_path):
    src = parallel(tmp_path, de=b"ok\nbad \xff byte\n", en="x\ny\n")
    with pytest.raises(DataError, match=r"train\.de:2: not valid UTF-8"):
        src.load("train")


def test_empty_line_on_one_side_names_file_and_line(tmp_path):
    src = parallel(tmp_path, de="a\nb\nc\n", en="x\n  \nz\n")
    with pytest.raises(DataError, match=r"train\.en:2: empty line"):
        src.load("train")


def test_empty_file(tmp_path):
    src = parallel(tmp_path, de="", en="")
    with pytest.raises(DataError, match=r"train\.de: empty file"):
        src.load("train")


def test_table_files_tsv_jsonl_and_errors(tmp_path):
    tsv = write(tmp_path / "t.tsv", "de\ten\nhallo\thello\nwelt\tworld\n")
    assert TableFiles(str(tsv), str(tsv), columns={"source": "de", "target": "en"}).load("train")["target"] == [
        "hello",
        "world",
    ]
    jl = write(
        tmp_path / "t.jsonl",
        "".join(json.dumps({"translation": {"de": d, "en": e}}) + "\n" for d, e in [("a", "b"), ("c", "d")]),
    )
    assert TableFiles(str(jl), str(jl), columns={"source": "translation.de", "target": "translation.en"}).load("val")[
        "source"
    ] == [
        "a",
        "c",
    ]
    with pytest.raises(DataError, match=r"t\.tsv: no column 'fr'; columns are \['de', 'en'\]"):
        TableFiles(str(tsv), str(tsv), columns={"source": "fr", "target": "en"}).load("train")
    holes = write(tmp_path / "h.tsv", "de\ten\nhallo\thello\nwelt\t\n")
    with pytest.raises(DataError, match=r"h\.tsv:3: column 'en' is empty"):
        TableFiles(str(holes), str(holes), columns={"source": "de", "target": "en"}).load("train")
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        TableFiles(str(tmp_path / "nope.csv"), str(tsv)).load("train")


def test_table_files_parquet(tmp_path):
    import datasets

    path = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"s": ["a"], "t": ["b"]}).to_parquet(str(path))
    assert TableFiles(str(path), str(path), columns={"source": "s", "target": "t"}).load("train")["target"] == ["b"]


def small_data(tmp_path, **kw):
    args = dict(
        source=SyntheticTranslation(train_size=300, val_size=20, test_size=20),
        vocab_size=300,
        max_tokens=512,
        cache_dir=str(tmp_path / "cache"),
    )
    args.update(kw)
    return TranslationData(**args)


def test_batches_carry_indices_masks_and_shifted_targets(tmp_path):
    dm = small_data(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    seen = []
    for batch in dm.train_dataloader():
        B, T = batch["tgt_out"].shape
        assert B * max(batch["src"].shape[1], T) <= 512
        assert torch.equal(batch["src_pad"], batch["src"].eq(bpe.PAD_ID))
        assert torch.all(batch["tgt_in"][:, 0] == bpe.BOS_ID)
        real = ~batch["tgt_pad"]
        assert torch.equal(batch["tgt_in"][:, 1:][real[:, 1:]], batch["tgt_out"][:, :-1][real[:, 1:]])
        for row, i in zip(batch["tgt_out"], batch["index"].tolist()):
            assert dm.decode(row.tolist()) == dm.splits["train"][i]["target"]
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(300))  # every sample exactly once


def test_second_run_reuses_the_cached_tokenizer(tmp_path, monkeypatch):
    dm = small_data(tmp_path)
    dm.prepare_data()
    first = dm.tokenizer_path.read_text()
    # A second run with the tokenizer cached must not train a new one.
    monkeypatch.setattr(bpe, "train_bpe", lambda *a, **k: pytest.fail("retrained the tokenizer"))
    import shutil

    shutil.rmtree(dm.dataset_dir)
    dm2 = small_data(tmp_path)
    dm2.prepare_data()
    dm2.setup("fit")
    assert dm2.tokenizer_path == dm.tokenizer_path and dm2.tokenizer_path.read_text() == first
    # Another vocabulary size is another tokenizer.
    assert small_data(tmp_path, vocab_size=280).tokenizer_path != dm.tokenizer_path


def test_too_long_is_reported_filtered_or_truncated(tmp_path):
    dm = small_data(tmp_path, max_source_len=8)
    dm.prepare_data()
    with pytest.raises(DataError, match=r"train: \d+ of 300 samples \(\d+\.\d+%\) have a source longer than 8"):
        dm.setup("fit")
    dm = small_data(tmp_path, max_source_len=8, too_long="filter")
    dm.setup("fit")
    assert 0 < len(dm.splits["train"]) < 300 and max(map(len, dm.splits["train"]["src"])) <= 8
    dm = small_data(tmp_path, max_source_len=8, too_long="truncate")
    dm.setup("fit")
    ids = dm.splits["train"]["src"]
    assert len(ids) == 300 and max(map(len, ids)) == 8 and all(s[-1] == bpe.EOS_ID for s in ids)


@pytest.mark.parametrize("order", ["length", "random", "sorted"])
def test_sharded_batches_cover_every_sample_once_with_equal_steps(order):
    lengths = [(i * 7) % 23 + 1 for i in range(101)]
    ranks = [ShardedBatchSampler(lengths, max_tokens=60, order=order, seed=3, num_replicas=3, rank=r) for r in range(3)]
    epochs = []
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
        flat = sorted(i for b in per_rank for batch in b for i in batch)
        assert flat == list(range(101))
        for b in per_rank:
            assert all(batch and max(lengths[i] for i in batch) * len(batch) <= 60 for batch in b)
        epochs.append(per_rank)
    assert (epochs[0] == epochs[1]) == (order == "sorted")


def test_none_is_a_seeded_shuffle_that_changes_every_epoch():
    lengths = [5] * 40
    a, b = (
        ShardedBatchSampler(lengths, batch_size=8, order="random", seed=1),
        ShardedBatchSampler(lengths, batch_size=8, order="random", seed=1),
    )
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(i for x in a for i in x) == list(range(40))
    assert list(ShardedBatchSampler(lengths, batch_size=8, order="random", seed=2)) != first
    # `none` in the data module is the length-bucketed shuffle, also new every epoch.
    c = ShardedBatchSampler([(i % 7) + 1 for i in range(40)], max_tokens=16, order="length", seed=1)
    e0 = list(c)
    c.set_epoch(1)
    assert list(c) != e0


def test_cache_is_rebuilt_when_anything_it_depends_on_changes(tmp_path, monkeypatch, caplog):
    """One line of a data file, vocab_size, the source's class or the task: each is another
    cache; nothing changed reuses it and says so."""
    import logging

    from adamoe.data import ClassificationData, SyntheticSentiment

    root = tmp_path / "corpus"
    root.mkdir()
    for split in ("val", "test"):
        write(root / f"{split}.de", "e f\n")
        write(root / f"{split}.en", "u v\n")
    source = parallel(root)
    base = TranslationData(source, vocab_size=40, cache_dir=str(tmp_path / "cache"))
    base.prepare_data()
    built = base.dataset_dir
    assert built.is_dir() and not list(built.parent.glob(".*.tmp"))  # staged and renamed

    monkeypatch.setattr("lightning.pytorch.utilities.rank_zero.rank_zero_only.rank", 0)
    with caplog.at_level(logging.INFO):
        again = TranslationData(ParallelText(str(root), "de", "en"), vocab_size=40, cache_dir=str(tmp_path / "cache"))
        monkeypatch.setattr(ParallelText, "load", lambda self, split: pytest.fail("read the data again"))
        again.prepare_data()
    assert again.dataset_dir == built and f"Reusing cached dataset {built}" in caplog.text
    monkeypatch.undo()

    assert (
        TranslationData(
            ParallelText(str(root), "de", "en"), vocab_size=41, cache_dir=str(tmp_path / "cache")
        ).dataset_dir
        != built
    )
    synthetic = dict(train_size=10, val_size=2, test_size=2)
    embedded = TranslationData(SyntheticTranslation(**synthetic), cache_dir=str(tmp_path / "cache"))
    assert (
        embedded.dataset_dir
        != TranslationData(SyntheticSentiment(**synthetic), cache_dir=str(tmp_path / "cache")).dataset_dir
    )
    assert (
        embedded.dataset_dir
        != ClassificationData(SyntheticTranslation(**synthetic), cache_dir=str(tmp_path / "cache")).dataset_dir
    )
    import os
    import time

    time.sleep(0.01)
    write(root / "train.en", "x y\nz q\n")  # one line changed
    os.utime(root / "train.en")
    changed = TranslationData(ParallelText(str(root), "de", "en"), vocab_size=40, cache_dir=str(tmp_path / "cache"))
    assert changed.dataset_dir != built
    changed.prepare_data()
    changed.setup("fit")
    assert changed.decode(changed.splits["train"]["tgt"][1]) == "z q"


def test_a_byte_order_mark_is_not_text(tmp_path):
    src = parallel(tmp_path, de=b"\xef\xbb\xbfein Hund\nzwei\n", en="a dog\ntwo\n")
    assert src.load("train")["source"] == ["ein Hund", "zwei"]


def test_word_labels_land_on_the_first_piece_of_each_word():
    texts = ["der hund sieht die katze", "ein unbekanntesxwort und mehr", "a"]
    tok = bpe.train_bpe(texts * 3, vocab_size=60)
    for text in texts:
        words = text.split()
        ids = tok.encode(text).ids
        labels = list(range(10, 10 + len(words)))
        aligned = bpe.align_labels(tok, ids, labels)
        # Reference: each word encoded alone gives its number of pieces; </s> comes last.
        pieces = [len(tok.encode(w, add_special_tokens=False).ids) for w in words]
        expected = [x for label, n in zip(labels, pieces) for x in [label] + [-100] * (n - 1)] + [-100]
        assert aligned == expected, (text, tok.encode(text).tokens)
    assert (
        max(len(tok.encode(w, add_special_tokens=False).ids) for w in texts[1].split()) > 1
    )  # a word of several pieces
    with pytest.raises(ValueError, match="2 labels for a text of 5 words"):
        bpe.align_labels(tok, tok.encode(texts[0]).ids, [0, 1])


def test_lists_of_labels_are_padded_with_the_ignored_value():
    from adamoe.data.batch import IGNORE_ID, collate

    batch = collate([0, 1], {"src": [[5, 6, 2], [7, 2]], "tags": [[1, -100, 2], [0, -100]]})
    assert batch["tags"].tolist() == [[1, -100, 2], [0, -100, IGNORE_ID]]
    assert batch["tags"].shape == batch["src"].shape
