"""Paired training-step time of the paper protocol's arms against top-2.

    python benchmarks/paired_step.py --data ../shared/data/multi30k [--runs benchmarks/replication/runs-paper]

For every arm and every checkpoint it saved (each seed's last and best): the arm's own next
training batches, from the checkpoint's sampler state (its order, its packing, its place in
the epoch), so that a curriculum's batches are timed as it trains them. In each repeat the
arm and top-2 (the checkpoint of the same seed) take full training steps on those same
batches, back to back, in alternating order; each starts the repeat from its checkpoint.
A repeat's ratio is the arm's summed step time over top-2's. Writes `paired_step.json` next
to the run folder: per arm, every ratio, their median, and a 90% bootstrap interval of the
median over (checkpoint, repeat), and the machine, commit and date it was timed on;
`--only` times some arms again and keeps the others. `replicate.py --protocol paper
--report-only` reads it.
"""

import argparse
import json
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from step_time import load, train_step
from throughput import cpu_model

from adamoe.data import ParallelText, TranslationData

ROOT = Path(__file__).resolve().parents[1]


def own_batches(data: Path, summary: dict, checkpoint: Path, n: int) -> list[dict]:
    """The next `n` training batches of the run at `checkpoint`, as its sampler would give them."""
    cfg = summary["data"]
    dm = TranslationData(
        ParallelText(str(data), "de", "en", test="test_2016_flickr"),
        **{**cfg, "cache_dir": str(ROOT / cfg["cache_dir"])},
    )
    dm.prepare_data()
    dm.setup("fit")
    dm.train_sampler.load_state_dict(torch.load(checkpoint, weights_only=True)["TranslationData"]["train_sampler"])
    return [batch for batch, _ in zip(dm.train_dataloader(), range(n))]


def paired_ratios(
    arm: Callable, top2: Callable, batches: list, repeats: int, step: Callable, clock=time.perf_counter
) -> list[float]:
    """`repeats` ratios of the arm's summed step time to top-2's on the same `batches`.
    `arm` and `top2` give a fresh (module, optimizer) each repeat."""
    ratios = []
    for r in range(repeats):
        states = {"arm": arm(), "top2": top2()}
        spent = dict.fromkeys(states, 0.0)
        for batch in batches:
            for name in ("arm", "top2") if r % 2 == 0 else ("top2", "arm"):
                start = clock()
                step(*states[name], batch)
                spent[name] += clock() - start
        ratios.append(spent["arm"] / spent["top2"])
    return ratios


def interval(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """90% bootstrap interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.05 * draws)], medians[int(0.95 * draws) - 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    ap.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "replication" / "runs-paper")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", help="time these arms; the others keep their ratios in paired_step.json")
    args = ap.parse_args()
    runs = [r for p in sorted(args.runs.glob("*-s*.json")) if "name" in (r := json.loads(p.read_text()))]
    out = args.runs.parent / "paired_step.json"
    kept = json.loads(out.read_text())["arms"] if args.only and out.exists() else {}
    top2 = {r["seed"]: Path(r["checkpoint"]) for r in runs if r["name"] == "top2" and Path(r["checkpoint"]).exists()}
    if not top2:
        ap.error(f"no top2 run with a checkpoint in {args.runs}")
    torch.manual_seed(0)
    arms: dict[str, list[float]] = {}
    for r in runs:
        if args.only and r["name"] not in args.only:
            continue
        folder = Path(r["checkpoint"]).parent
        partner = top2.get(r["seed"], next(iter(top2.values())))
        for ckpt in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
            batches = own_batches(args.data, r, ckpt, args.batches)
            ratios = paired_ratios(
                lambda c=ckpt: load(str(c)), lambda p=partner: load(str(p)), batches, args.repeats, train_step
            )
            arms.setdefault(r["name"], []).extend(ratios)
            print(f"{r['name']} s{r['seed']} {ckpt.name}: {', '.join(f'{x:.3f}' for x in ratios)}", flush=True)
    # Each arm keeps where and when it was timed: a call with --only times some arms again.
    where = {
        "machine": {"cpu": cpu_model(), "node": platform.node(), "threads": torch.get_num_threads()},
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "batches": args.batches,
        "repeats": args.repeats,
    }
    timed = {
        n: {"ratios": v, "median": statistics.median(v), "interval": interval(v), **where} for n, v in arms.items()
    }
    result = {"arms": kept | timed}
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
