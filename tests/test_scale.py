"""The data path at corpus scale: streaming readers against reading whole files, the
vectorized batch plan against the plain greedy loop, the BPE sample, and the memory-mapped
cache against the samples it was made from."""

import gzip

import numpy as np
import pytest
import torch

from adamoe.data import ParallelText, TextLines, text
from adamoe.data.sampler import Plan, pack
from adamoe.data.tokenizer import EOS_ID, sample
from adamoe.errors import DataError


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(text, "CHUNK_ROWS", 3)  # every file below spans several chunks


def write(path, lines: list[bytes], gz=False):
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if gz else data)


def test_parallel_text_streams_in_chunks_and_blames_the_right_line(tmp_path, small_chunks):
    de = [f"satz {i}".encode() for i in range(10)]
    en = [f"sentence {i}\r".encode() for i in range(10)]  # Windows line ends are dropped
    write(tmp_path / "train.de", de)
    write(tmp_path / "train.en.gz", en, gz=True)
    src = ParallelText(str(tmp_path), "de", "en", test=None)
    chunks = list(src.chunks("train"))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert src.load("train")["target"] == [f"sentence {i}" for i in range(10)]
    write(tmp_path / "train.de", de[:7] + [b"\xff"] + de[8:])
    with pytest.raises(DataError, match=r"train\.de:8: not valid UTF-8"):
        src.load("train")
    write(tmp_path / "train.de", de[:4] + [b"  "] + de[5:])
    with pytest.raises(DataError, match=r"train\.de:5: empty line"):
        src.load("train")
    write(tmp_path / "train.de", de + [b"extra"] * 4)
    with pytest.raises(DataError, match=r"train\.de has 14 lines, .*train\.en\.gz has 10"):
        src.load("train")


def test_text_lines_skip_blank_lines_across_chunks(tmp_path, small_chunks):
    lines = [b"a", b"", b"b c", b" ", b"d", b"e", b"", b"f"]
    write(tmp_path / "t.txt", lines)
    assert TextLines(str(tmp_path / "t.txt"), str(tmp_path / "t.txt")).load("train")["text"] == [
        "a",
        "b c",
        "d",
        "e",
        "f",
    ]


def greedy(order, lengths, max_tokens, batch_size, ways):
    """The plain loop the plan must equal: add samples while the batch fits."""
    batches, batch, longest = [], [], 0
    for i in order:
        longer = max(longest, lengths[i])
        per_rank = -(-(len(batch) + 1) // ways)
        if batch and ((max_tokens and longer * per_rank > max_tokens) or (batch_size and per_rank > batch_size)):
            batches.append(batch)
            batch, longer = [], lengths[i]
        batch.append(i)
        longest = longer
    if batch:
        if len(batch) < ways and batches:
            batches[-1] += batch
        else:
            batches.append(batch)
    return batches


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_plan_equals_the_greedy_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    lengths = rng.integers(1, 50, n)
    order = rng.permutation(n)
    ways = int(rng.integers(1, 4))
    max_tokens, batch_size = [(int(rng.integers(50, 300)), None), (None, int(rng.integers(1, 20))), (120, 6)][seed % 3]
    if n < ways:
        return
    plan = pack(order, lengths, max_tokens, batch_size, ways)
    assert [b.tolist() for b in plan] == greedy(order.tolist(), lengths.tolist(), max_tokens, batch_size, ways)


def test_plan_reorders_whole_batches():
    plan = Plan(np.array([5, 6, 7, 8, 9, 10]), np.array([0, 2, 3, 6]))
    moved = plan.reorder(np.array([2, 0, 1]))
    assert [b.tolist() for b in moved] == [[8, 9, 10], [5, 6], [7]]


def test_bpe_sample_is_uniform_over_the_stream():
    stream = [[f"t{i}" for i in range(start, start + 50)] for start in range(0, 1000, 50)]
    assert sample(stream, 2000) == [t for part in stream for t in part]  # all of a small corpus, in order
    counts = np.zeros(1000)
    for seed in range(400):
        kept = sample(stream, 100, seed)
        assert len(kept) == len(set(kept)) == 100
        counts[[int(t[1:]) for t in kept]] += 1
    # Each text is kept with probability 1/10: 40 times in 400 draws, binomial std 6.
    assert abs(counts[:100].mean() - 40) < 3 and abs(counts[-100:].mean() - 40) < 3
    assert abs(counts.std() - 6) < 1.5


def test_cache_holds_the_tokens_of_each_sample_with_eos(tmp_path):
    from adamoe.data import SyntheticTranslation, TranslationData

    source = SyntheticTranslation(300, 20, 20)
    dm = TranslationData(
        source,
        vocab_size=300,
        max_tokens=512,
        cache_dir=str(tmp_path / "cache"),
        max_source_len=12,
        too_long="truncate",
    )
    dm.prepare_data()
    dm.setup("fit")
    split, raw = dm.splits["train"], source.load("train")
    for i in (0, 17, 299):
        full = dm.tokenizer.encode(raw[i]["source"]).ids
        assert full[-1] == EOS_ID and split.lengths["src"][i] == min(len(full), 12)
        want = full if len(full) <= 12 else full[:11] + [EOS_ID]
        assert split.gather([i], ["src"])["src"] == [want]
    assert split[5]["target"] == raw[5]["target"]
    # Filtering renumbers the samples and keeps their rows.
    kept = split.lengths["tgt"] < 10
    rows = np.flatnonzero(kept)
    split.keep(kept)
    assert len(split) == kept.sum() and split.gather([0], ["target"])["target"] == [raw[int(rows[0])]["target"]]


def test_epoch_plan_covers_every_sample_once_at_scale():
    from adamoe.data.sampler import ShardedBatchSampler

    lengths = np.random.default_rng(0).integers(2, 60, 200_000)
    s = ShardedBatchSampler(lengths, max_tokens=2048, order="paper", seed=0, num_replicas=2)
    s.tokens_NL = torch.from_numpy(lengths).int()[:, None].repeat(1, 3)
    s.two_NL = (s.tokens_NL * torch.rand(s.tokens_NL.shape)).int()
    plan = s.global_batches()
    assert np.array_equal(np.sort(plan.order), np.arange(200_000))
    per_rank = -(-np.diff(plan.bounds) // 2)
    longest = np.maximum.reduceat(lengths[plan.order], plan.bounds[:-1])
    assert ((longest * per_rank <= 2048) | (np.diff(plan.bounds) <= 2)).all()


def test_word_by_word_ids_equal_the_tokenizers_own(tmp_path):
    """The fast path (distinct words encoded once) against the tokenizer on whole texts,
    with the texts it must leave to the tokenizer: spaces doubled or at an end, and
    characters NFKC changes."""
    import pyarrow as pa

    from adamoe.data.store import token_ids
    from adamoe.data.synthetic import generate
    from adamoe.data.tokenizer import train_bpe

    texts = generate(400, seed=3)[0] + generate(400, seed=4)[1]
    texts += [
        "  zwei  Leerzeichen",
        " vorne",
        "hinten ",
        "Straße Maß",
        "tab\there",
        "\ufb01 Ligatur",
        "\uff21\uff22",
        "Ä ö",
        "x  y",
        "ü",
    ]
    tok = train_bpe(texts[:300], vocab_size=120)  # small: most words split into pieces, some unknown
    got = token_ids(tok, pa.array(texts)).to_pylist()
    assert got == [e.ids for e in tok.encode_batch(texts)]
    assert all(ids[-1] == EOS_ID for ids in got)


def test_preparation_streams_through_a_redrawing_progress_bar(tmp_path, monkeypatch):
    """tqdm's `update` returns True whenever it redraws, which on a large corpus is every
    chunk: the tokenized chunks must still reach the cache."""
    from adamoe.data import SyntheticTranslation, TranslationData, prepare

    class Bar:
        def __init__(self, *args, **kwargs):
            self.n = 0

        def update(self, n):
            self.n += n
            return True

        def close(self):
            pass

    monkeypatch.setattr(prepare, "tqdm", Bar)
    monkeypatch.setattr(text, "CHUNK_ROWS", 50)
    dm = TranslationData(
        SyntheticTranslation(200, 20, 20), vocab_size=300, max_tokens=512, cache_dir=str(tmp_path / "cache")
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.splits["train"]) == 200 and len(dm.splits["test"]) == 20
