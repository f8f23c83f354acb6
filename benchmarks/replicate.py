"""Small-scale replication of Li et al. (2023), Tables 3, 5 and 6, on Multi30k De->En.

    python benchmarks/replicate.py --data ../shared/data/multi30k            # about 2.5 hours
    python benchmarks/replicate.py --data ../shared/data/multi30k --quick    # about 15 minutes

Arguments after `--` go to every `train.py fit` and `test`, e.g. `-- --data.init_args.max_tokens 4096`.

Every run trains `configs/multi30k.yaml` + `configs/preset/replicate.yaml` + one gate
config, with the same model size, seed and data. Top-2 goes first, for `--budget`
minutes; the target is the lowest val/loss it reached. Every other run stops when it
reaches that target, or at `--cap` times top-2's wall time.

Time-to-target is training time, validation and checkpoints excluded, at the point where
the val/loss curve (every 50 steps) first crosses the target, linearly interpolated
between the two validations around it. Each finished run is tested once on
`test_2016_flickr` with beam 4 (sacreBLEU), from its last checkpoint.

Results go to `<out>/<mode>.json` as each run ends (a rerun skips the runs found there;
`--fresh` starts over), and the report to `benchmarks/RESULTS.md` (`RESULTS-quick.md`
with `--quick`), with a figure of the per-layer two-expert shares. A `## Discussion`
section already in the report is kept.
"""

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from curriculum import scalars

from adamoe.callbacks.timing import time_to_target

ROOT = Path(__file__).resolve().parents[1]
BASE = ["configs/multi30k.yaml", "configs/preset/replicate.yaml"]
ADAPTIVE = ["configs/gate/adaptive.yaml"]


def threshold(t):
    return ["--model.init_args.gate.init_args.threshold", str(t)]


# name -> (gate configs, extra arguments). Listed in the order they run: the most telling first.
RUNS = {
    "top2": (["configs/gate/top2.yaml"], []),
    "adaptive": (ADAPTIVE, []),
    "adaptive-no-curriculum": (ADAPTIVE, ["--data.init_args.curriculum", "none"]),
    "top1": (["configs/gate/top1.yaml"], []),
    "dense": (["configs/gate/dense.yaml"], []),
    "adaptive-T0.2": (ADAPTIVE, threshold(0.2)),
    "adaptive-T0.05": (ADAPTIVE, threshold(0.05)),
    "adaptive-T0.3": (ADAPTIVE, threshold(0.3)),
    "adaptive-T0.4": (ADAPTIVE, threshold(0.4)),
}
QUICK_RUNS = ("top2", "adaptive", "top1")

# The paper's translation row (WMT19 De->En, FSMT) and its ablations, for comparison.
PAPER_TABLE3 = {"dense": ("0.87x", "40.9"), "top2": ("1x", "41.1"), "top1": ("1.04x", "39.5"), "adaptive": ("0.79x", "41.1")}
PAPER_TWO_EXPERT_SHARE = "25.6%"


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_and_test(name: str, args, max_time: float, target: float | None) -> dict:
    gate_configs, extra = RUNS[name]
    configs = sum((["--config", c] for c in BASE + gate_configs), [])
    common = [*configs, "--data.source.init_args.root", str(args.data), *extra, "--trainer.logger.init_args.save_dir", str(args.logs)]
    common += ["--trainer.logger.init_args.name", f"{args.mode}/{name}", "--trainer.enable_progress_bar", "false", *args.train_args]
    run_dir = args.logs / args.mode / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    fit = ["fit", *common, "--trainer.logger.init_args.version", "fit", "--trainer.max_time", hms(max_time)]
    if target is not None:
        fit += ["--timer.target", str(target), "--timer.stop_at_target", "true"]
    test = ["test", *common, "--trainer.logger.init_args.version", "test", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    commands = []
    for command in (fit, test):
        commands.append(" ".join(["python", "train.py", *command]))
        started = time.perf_counter()
        with open(run_dir.parent / f"{name}.{command[0]}.log", "w") as log:
            subprocess.run([sys.executable, "train.py", *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        commands[-1] = (commands[-1], time.perf_counter() - started)

    metrics = json.loads((run_dir / "fit" / "metrics.json").read_text())
    tb, test_tb = scalars(run_dir / "fit"), scalars(run_dir / "test")

    def last(tag, board=tb):
        return board[tag][-1] if tag in board else None

    layers = [t.split("/")[1] for t in tb if t.startswith("experts/") and t.endswith("/two_expert_share_epoch") and "/model/" not in t]
    return {
        "name": name,
        "commands": [{"command": c, "wall_s": round(s, 1)} for c, s in commands],
        "steps": metrics["global_step"],
        "fit_wall_s": metrics["wall_time_s"],
        "train_s": sum(e["max_s"] for e in metrics["epochs"]),
        "tokens_per_s": metrics["tokens_per_s"],
        "curve": metrics["curve"],
        "best_val_loss": min(p["value"] for p in metrics["curve"]),
        "flops_per_token": last("experts/model/active_flops_per_token_epoch"),
        "two_expert_share": last("experts/model/two_expert_share_epoch"),
        "layer_share": {layer: last(f"experts/{layer}/two_expert_share_epoch") for layer in layers},
        "test_bleu": last("test/bleu", test_tb),
        "test_loss": last("test/loss", test_tb),
        "routing_words": (run_dir / "fit" / "routing_words.tsv").read_text() if (run_dir / "fit" / "routing_words.tsv").exists() else "",
    }


def layer_order(names):
    """Encoder layers, then decoder layers, each by depth."""
    return sorted(names, key=lambda n: (n.split(".")[0] != "enc", int(n.split(".")[1])))


def fmt(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def report(results: dict, args, figure: Path) -> str:
    top2 = results.get("top2")
    target = top2["best_val_loss"] if top2 else None
    base = time_to_target(top2["curve"], target) if top2 else None

    def ratio(r):
        t = time_to_target(r["curve"], target)
        return f"{t / base:.2f}x" if t is not None else f"not reached in {r['train_s'] / base:.2f}x"

    def row(name, label, paper=("", "")):
        r = results[name]
        share = fmt(None if r["two_expert_share"] is None else 100 * r["two_expert_share"], ".1f") + ("%" if r["two_expert_share"] is not None else "")
        return f"| {label} | {ratio(r)} | {fmt(r['flops_per_token'] / 1e6 if r['flops_per_token'] else None, '.1f')} | {share} | {fmt(r['test_bleu'])} | {r['best_val_loss']:.3f} | {r['steps']} | {r['tokens_per_s']:.0f} | {paper[0]} | {paper[1]} |"

    head = "| scheme | time to target (vs top-2) | MFLOPs/token | two-expert tokens | test BLEU | best val loss | steps | train tokens/s | paper time | paper BLEU |\n|---|---|---|---|---|---|---|---|---|---|"
    out = [
        f"# Replication on Multi30k De→En ({'quick' if args.quick else 'full'} run)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.node()}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, no GPU. Produced by "
        f"`python benchmarks/replicate.py --data {args.data}{' --quick' if args.quick else ''}`.",
        "",
        "Model: `configs/multi30k.yaml` (d_model 256, FFN 1024, 8 experts, 3+3 layers, MoE in every second layer: "
        "enc.1 and dec.1) with `configs/preset/replicate.yaml`; seed 0 for every run. "
        f"Top-2 trained for {args.budget:g} minutes; the target is its lowest val/loss, **{fmt(target, '.3f')}**. The other runs stop "
        f"at the target or at {args.cap:g}x top-2's wall time. Time is training time to the target (validation excluded), "
        "interpolated between validations; FLOPs per token are forward FLOPs per source and target token, active experts "
        "only, over the last epoch; test BLEU is sacreBLEU on `test_2016_flickr`, beam 4, from the last checkpoint. "
        "The paper's numbers are its WMT19 De→En row at full scale, on 8 A100s.",
        "",
        "## Table 3: schemes",
        "",
        head,
    ]
    for name, label in (("dense", "dense"), ("top2", "top-2"), ("top1", "top-1"), ("adaptive", "adaptive T=0.1")):
        if name in results:
            out.append(row(name, label, PAPER_TABLE3[name]))
    out.append(f"\nThe paper sends {PAPER_TWO_EXPERT_SHARE} of tokens to two experts on translation with T=0.1.")
    sweep = [(n, t) for n, t in (("adaptive-T0.05", 0.05), ("adaptive", 0.1), ("adaptive-T0.2", 0.2), ("adaptive-T0.3", 0.3), ("adaptive-T0.4", 0.4)) if n in results]
    if len(sweep) > 1:
        out += ["", "## Table 5: threshold", "", head]
        out += [row(n, f"T={t}") for n, t in sweep]
        out.append("\nThe paper gives no numbers for this table beyond: T=0.05 behaves like top-1, T=0.4 does not always match top-2's quality, and 0.1-0.2 is best.")
    if "adaptive-no-curriculum" in results:
        out += ["", "## Table 6: curriculum", "", head, row("adaptive", "adaptive, curriculum"), row("adaptive-no-curriculum", "adaptive, no curriculum")]
        out.append("\nThe paper: without the curriculum, training time grows by 9-22% (13.7% on average) and quality drops by up to 0.21.")
    if figure.exists():
        out += ["", "## Figure 2: two-expert share per layer", "", f"![two-expert share per layer]({figure.relative_to(args.report.parent)})", ""]
        layers = layer_order(next(r["layer_share"] for r in results.values() if r["layer_share"]))
        out += ["| run | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
        for r in results.values():
            if r["layer_share"]:
                out.append(f"| {r['name']} | " + " | ".join(f"{100 * r['layer_share'][layer]:.1f}%" for layer in layers) + " |")
    if "adaptive" in results and results["adaptive"]["routing_words"]:
        out += ["", "## Table 4: words that take two experts (adaptive T=0.1, validation set)", "", "| layer | most often on two experts (share, count) | least often |", "|---|---|---|"]
        rows = [line.split("\t") for line in results["adaptive"]["routing_words"].strip().splitlines()[1:]]
        for layer in dict.fromkeys(r[0] for r in rows):
            cell = {kind: ", ".join(f"{r[3]} ({float(r[6]):.0%}, {r[4]})" for r in rows if r[0] == layer and r[1] == kind and int(r[2]) <= 5) for kind in ("most", "least")}
            out.append(f"| {layer} | {cell['most']} | {cell['least']} |")
    out += ["", "## Runs", "", "<details><summary>Each run's commands (from the repository root) and wall time</summary>", "", "| run | command | wall |", "|---|---|---|"]
    for r in results.values():
        for c in r["commands"]:
            out.append(f"| {r['name']} | `{c['command']}` | {c['wall_s'] / 60:.1f} min |")
    total = sum(c["wall_s"] for r in results.values() for c in r["commands"])
    out += ["", "</details>", "", f"Total wall time of the runs: {total / 60:.0f} min."]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results.values() if r["layer_share"] and r["name"] != "top2"]
    if not runs:
        return
    layers = layer_order(runs[0]["layer_share"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        ax.bar([j + i * width for j in range(len(layers))], [100 * r["layer_share"][layer] for layer in layers], width, label=r["name"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
    ax.set_ylabel("tokens on two experts (%)")
    ax.set_title("Multi30k De→En, last training epoch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k", help="folder of {train,val,test_2016_flickr}.{de,en}.gz")
    p.add_argument("--quick", action="store_true", help="top-2, adaptive and top-1 on a short budget")
    p.add_argument("--budget", type=float, help="top-2's training minutes (default 10, quick 2)")
    p.add_argument("--cap", type=float, default=1.25, help="other runs stop at this multiple of top-2's wall time")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), help="a subset of runs (top-2 always runs first)")
    p.add_argument("--logs", type=Path, default=ROOT / "logs" / "replicate")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "replication")
    p.add_argument("--fresh", action="store_true", help="ignore results of earlier runs")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the stored results, train nothing")
    p.add_argument("--report", type=Path, help="default benchmarks/RESULTS.md, or RESULTS-quick.md with --quick")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.train_args = argv[split + 1 :]
    if not (args.data / "train.de.gz").exists() and not (args.data / "train.de").exists():
        p.error(f"{args.data}: no train.de[.gz]; pass --data with the Multi30k folder")
    args.data, args.logs = args.data.resolve(), args.logs.resolve()
    args.mode = "quick" if args.quick else "full"
    args.budget = args.budget or (2.0 if args.quick else 10.0)
    args.report = args.report or ROOT / "benchmarks" / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    names = ["top2"] + [n for n in (args.runs or (QUICK_RUNS if args.quick else RUNS)) if n != "top2"]
    store = args.out / f"{args.mode}.json"
    results = {} if args.fresh or not store.exists() else json.loads(store.read_text())
    figure = args.out / f"{args.mode}-two-expert-share.png"

    for name in [] if args.report_only else names:
        if name in results:
            print(f"{name}: done earlier, kept", flush=True)
            continue
        top2 = results.get("top2")
        max_time = args.budget * 60 if name == "top2" else args.cap * top2["fit_wall_s"]
        target = None if name == "top2" else top2["best_val_loss"]
        started = time.perf_counter()
        results[name] = train_and_test(name, args, max_time, target)
        r = results[name]
        print(f"{name}: {r['steps']} steps, best val/loss {r['best_val_loss']:.3f}, test BLEU {fmt(r['test_bleu'])}, {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=1) + "\n")
        write_report(results, args, figure)
    if args.report_only:
        write_report(results, args, figure)
    print(args.report.read_text())


def write_report(results: dict, args, figure: Path):
    plot(results, figure)
    kept = args.report.read_text().partition("\n## Discussion")[2] if args.report.exists() else ""
    args.report.write_text(report(results, args, figure) + ("\n## Discussion" + kept if kept else ""))


if __name__ == "__main__":
    main()
