"""Curriculum on and off: same config, seed and epochs, one training run per order.

For each `data.curriculum` value it runs `train.py fit` and prints: mean epoch time
(slowest rank), the simulated expert-parallel cost (sum over epochs), the within-batch
std of the two-expert share against a random order's (last epoch), and the final
val/loss and val/bleu.

    python benchmarks/curriculum.py --config configs/task/translation.yaml --epochs 4
    python benchmarks/curriculum.py --config configs/multi30k.yaml --config configs/gate/adaptive.yaml \\
        --epochs 3 -- --data.source.init_args.root /path/to/multi30k
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run as (step, value), one value per step: a run resumed
    from a checkpoint logs the steps after it again, and the later value wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {tag: sorted({e.step: e.value for e in ea.Scalars(tag)}.items()) for tag in ea.Tags()["scalars"]}


def experts_histograms(run_dir: Path) -> dict[str, list[float]]:
    """Per MoE layer, the last epoch's share of tokens that took 0, 1, 2, ... experts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))  # keeps the newest histogram of each tag
    ea.Reload()
    out = {}
    for tag in ea.Tags()["histograms"]:
        if tag.endswith("/experts_per_token_hist_epoch"):
            counts = ea.Histograms(tag)[-1].histogram_value.bucket
            out[tag.split("/")[1]] = [c / max(sum(counts), 1.0) for c in counts]
    return out


def scalars(run_dir: Path) -> dict[str, list[float]]:
    return {tag: [v for _, v in points] for tag, points in series(run_dir).items()}


def run(configs, curriculum, epochs, extra, out: Path) -> dict:
    name = f"curriculum-{curriculum}"
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", *sum((["--config", c] for c in configs), [])]
    cmd += ["--data.curriculum", curriculum, "--trainer.max_epochs", str(epochs), "--trainer.max_time", "null"]
    cmd += [
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    run_dir = max((out / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    metrics, tb = json.loads((run_dir / "metrics.json").read_text()), scalars(run_dir)
    return {
        "epoch_s": sum(e["max_s"] for e in metrics["epochs"]) / len(metrics["epochs"]),
        "ep_cost": sum(tb.get("curriculum/ep_cost", [float("nan")])),
        "ep_assignments": sum(tb.get("curriculum/ep_assignments", [float("nan")])),
        "tokens": sum(e["tokens"] for e in metrics["epochs"]),
        "std": tb.get("curriculum/within_batch_std", [float("nan")])[-1],
        "std_random": tb.get("curriculum/within_batch_std_random", [float("nan")])[-1],
        "spearman": tb.get("curriculum/spearman", [float("nan")])[-1],
        "val_loss": metrics["final"]["val/loss"],
        "val_bleu": metrics["final"]["val/bleu"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--orders", nargs="+", default=["none", "random", "paper"])
    ap.add_argument("--out", default=None, help="log folder (default: a temporary one)")
    ap.add_argument("--ep-ranks", type=int, default=8, help="the Curriculum callback's ep_ranks (the modeled GPUs)")
    ap.add_argument(
        "--assignment-us", type=float, default=0.0, help="microseconds per expert assignment, to model time"
    )
    ap.add_argument("extra", nargs="*", help="more train.py arguments, after --")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="adamoe-curriculum-"))
    rows = {c: run(args.config, c, args.epochs, args.extra, out) for c in args.orders}
    print(f"\n{' '.join(args.config)}, {args.epochs} epochs, logs in {out}")
    # Per token, so that orders with different numbers of steps compare; with --assignment-us (a
    # top-2 MoE layer's time per assignment from benchmarks/moe_layer.py), in modeled seconds.
    print(
        f"{'curriculum':<11}{'epoch s':>9}{'EP cost':>11}{'per token':>10}{'imbalance':>10}{'model s':>9}"
        f"{'batch std':>11}{'random std':>11}"
        f"{'spearman':>10}{'val loss':>10}{'val bleu':>10}"
    )
    for c, r in rows.items():
        per_token = r["ep_cost"] / max(r["tokens"], 1)
        imbalance = args.ep_ranks * r["ep_cost"] / r["ep_assignments"]
        modeled = r["ep_cost"] * args.assignment_us * 1e-6
        print(
            f"{c:<11}{r['epoch_s']:>9.1f}{r['ep_cost']:>11.0f}{per_token:>10.4f}{imbalance:>10.3f}{modeled:>9.2f}{r['std']:>11.4f}"
            f"{r['std_random']:>11.4f}{r['spearman']:>10.3f}{r['val_loss']:>10.3f}{r['val_bleu']:>10.2f}"
        )


if __name__ == "__main__":
    main()
