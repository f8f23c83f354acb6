"""Corpus scale: preparing and loading generated WMT-sized parallel corpora.

    python benchmarks/data_scale.py                    # 1M, 4M and 10M pairs (about an hour)
    python benchmarks/data_scale.py --pairs 2000000    # other sizes
    python benchmarks/data_scale.py --quick            # 20k pairs, a minute
    python benchmarks/data_scale.py --pairs 1000000 --bpe-samples 20000 200000   # BPE from samples

Each training line joins two Multi30k sentences (about 25 words; 1M pairs is 270 MB of
text), written to a temporary folder beside Multi30k's own val and test files. For each
size, three runs of `train.py fit --config configs/multi30k.yaml --trainer.max_steps 2`,
each a subprocess whose wall time and peak RSS (from wait4) are kept:

- `first`: read, check, BPE, tokenize, cache, then 2 steps;
- `tokenizer cached`: the same with the tokenizer kept and the dataset cache removed;
- `cached`: both cached.

Preparation time is a run's wall time less the cached run's (start-up and the 2 steps).
Then the cache's size on disk, and one epoch's plan for the `length` and `paper` orders
over the cached lengths, timed in this process. The last line projects to WMT19's 40M.
"""

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from throughput import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adamoe.data.sampler import ShardedBatchSampler  # noqa: E402
from adamoe.data.store import Split  # noqa: E402


def generate(multi30k: Path, pairs: int, out: Path, seed: int = 0):
    """`pairs` lines per language, each two random Multi30k training sentences joined."""
    out.mkdir(parents=True, exist_ok=True)
    lines = {
        lang: np.array(gzip.open(multi30k / f"train.{lang}.gz", "rt").read().splitlines(), dtype=object)
        for lang in ("de", "en")
    }
    rng = np.random.default_rng(seed)
    files = {lang: open(out / f"train.{lang}", "w") for lang in lines}
    for start in range(0, pairs, 500_000):
        n = min(500_000, pairs - start)
        a, b = rng.integers(0, len(lines["de"]), (2, n))
        for lang, f in files.items():
            f.write("\n".join(lines[lang][a] + " " + lines[lang][b]) + "\n")
    for f in files.values():
        f.close()
    for split in ("val", "test_2016_flickr"):
        for lang in lines:
            shutil.copy(multi30k / f"{split}.{lang}.gz", out / f"{split}.{lang}.gz")


def fit(corpus: Path, cache: Path, logs: Path, version: str) -> tuple[float, float]:
    """One `train.py fit` of 2 steps: its wall time (s) and peak RSS (GB)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "multi30k.yaml")]
    cmd += ["--data.source.init_args.root", str(corpus), "--data.cache_dir", str(cache), "--trainer.max_steps", "2"]
    cmd += ["--trainer.logger.init_args.save_dir", str(logs), "--trainer.logger.init_args.version", version]
    cmd += ["--trainer.enable_progress_bar", "false"]
    started = time.perf_counter()
    with open(logs / f"{version}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: see {logs / f'{version}.log'}")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20  # ru_maxrss is in KB on Linux


def ordering_seconds(cache: Path, max_tokens: int = 4096, layers: int = 2) -> dict[str, float]:
    """One epoch's plan over the cached training lengths, for `length` and for `paper`
    from a made-up routing table (the order costs the same whatever the counts are)."""
    (train,) = cache.glob("datasets/*/train.arrow")
    split = Split.open(train, ["src", "tgt"])
    lengths = np.maximum(split.lengths["src"], split.lengths["tgt"])
    out = {}
    for order in ("length", "paper"):
        sampler = ShardedBatchSampler(lengths, max_tokens=max_tokens, order=order, seed=0)
        if order == "paper":
            g = torch.Generator().manual_seed(0)
            sampler.tokens_NL = torch.from_numpy(lengths).int()[:, None].repeat(1, layers)
            sampler.two_NL = (sampler.tokens_NL * torch.rand(sampler.tokens_NL.shape, generator=g)).int()
        started = time.perf_counter()
        sampler.global_batches()
        out[order] = time.perf_counter() - started
    return out


def bpe_sample_effect(multi30k: Path, pairs: int, samples: list[int], work: Path):
    """BPE learnt from samples of a generated corpus against BPE learnt from all of it:
    the share of the vocabulary they share, and tokens per sentence on Multi30k's val set
    (more tokens: words cut into more pieces)."""
    from adamoe.data.sources import ParallelText
    from adamoe.data.tokenizer import sample, train_bpe

    corpus = work / "bpe-corpus"
    generate(multi30k, pairs, corpus)
    source = ParallelText(str(corpus), "de", "en", test=None)

    def texts():
        return (
            [t for col in ("source", "target") for t in chunk.column(col).to_pylist()]
            for chunk in source.chunks("train")
        )

    val = [t for col in ("source", "target") for t in source.load("val")[col]]
    started = time.perf_counter()
    full = train_bpe((t for part in texts() for t in part), 8000)
    full_seconds, full_vocab = time.perf_counter() - started, set(full.get_vocab())
    print(f"| BPE from | vocabulary shared with BPE from all {2 * pairs:,} texts | val tokens per sentence | seconds |")
    print("|---|---|---|---|")
    for size in [*samples, None]:
        started = time.perf_counter()
        tok = full if size is None else train_bpe(sample(texts(), size), 8000)
        took = full_seconds if size is None else time.perf_counter() - started
        tokens = sum(len(e.ids) for e in tok.encode_batch(val)) / len(val)
        shared = len(set(tok.get_vocab()) & full_vocab) / len(full_vocab)
        print(f"| {'all' if size is None else f'{size:,}'} | {shared:.3f} | {tokens:.2f} | {took:.0f} |")
    shutil.rmtree(corpus)


def size_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "multi30k",
        help="Multi30k: {train,val,test_2016_flickr}.{de,en}.gz",
    )
    p.add_argument("--pairs", type=int, nargs="+", default=[1_000_000, 4_000_000, 10_000_000])
    p.add_argument("--quick", action="store_true", help="one corpus of 20k pairs")
    p.add_argument("--work", type=Path, help="where corpora and caches go (default: a temporary folder, removed after)")
    p.add_argument(
        "--bpe-samples", type=int, nargs="*", help="instead: BPE from samples of these sizes against all, on --pairs[0]"
    )
    args = p.parse_args()
    sizes = [20_000] if args.quick else args.pairs
    work = Path(args.work or tempfile.mkdtemp(prefix="adamoe-scale-"))
    if args.bpe_samples:
        return bpe_sample_effect(args.data, sizes[0], args.bpe_samples, work)
    print(f"# data_scale on {cpu_model()}, {os.cpu_count()} cores; times in s, memory in GB (peak RSS)")
    columns = [
        "pairs",
        "first run",
        "prep pairs/s",
        "RSS",
        "tokenizer cached",
        "prep pairs/s",
        "RSS",
        "cached run",
        "RSS",
        "cache GB",
    ]
    print("| " + " | ".join([*columns, "order length", "order paper"]) + " |")
    print("|---" * 12 + "|")
    rows = []
    try:
        for pairs in sizes:
            corpus, cache, logs = work / f"corpus-{pairs}", work / f"cache-{pairs}", work / f"logs-{pairs}"
            logs.mkdir(parents=True, exist_ok=True)
            generate(args.data, pairs, corpus)
            first = fit(corpus, cache, logs, "first")
            for dataset in cache.glob("datasets/*"):
                shutil.rmtree(dataset)
            tok_cached = fit(corpus, cache, logs, "tokenizer-cached")
            cached = fit(corpus, cache, logs, "cached")
            orders = ordering_seconds(cache)
            prep, prep_tok = first[0] - cached[0], tok_cached[0] - cached[0]
            row = dict(
                pairs=pairs,
                prep=prep,
                rss_first=first[1],
                rss_cached=cached[1],
                cache=size_gb(cache / "datasets"),
                **orders,
            )
            rows.append(row)
            print(
                f"| {pairs:,} | {first[0]:.0f} | {pairs / prep:,.0f} | {first[1]:.2f} | {tok_cached[0]:.0f} | "
                f"{pairs / prep_tok:,.0f} "
                f"| {tok_cached[1]:.2f} | {cached[0]:.0f} | {cached[1]:.2f} | {row['cache']:.2f} "
                f"| {orders['length']:.2f} | {orders['paper']:.2f} |",
                flush=True,
            )
            shutil.rmtree(corpus)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) > 1:
        small, large = rows[0], rows[-1]

        def at_40m(key):  # the line through the smallest and the largest size
            slope = (large[key] - small[key]) / (large["pairs"] - small["pairs"])
            return large[key] + slope * (40_000_000 - large["pairs"])

        print(
            f"prep_growth={large['prep'] / small['prep']:.2f}x for {large['pairs'] / small['pairs']:.0f}x the pairs; "
            f"cached_rss_growth={large['rss_cached'] / small['rss_cached']:.2f}x; projected to 40M pairs: "
            f"prep {at_40m('prep') / 60:.0f} min, cache {at_40m('cache'):.1f} GB, "
            f"first-run RSS {at_40m('rss_first'):.2f} GB, cached RSS {at_40m('rss_cached'):.2f} GB"
        )


if __name__ == "__main__":
    main()
