"""Replication of Li et al. (2023), Tables 3, 5 and 6, on Multi30k De->En, in the paper's shape.

    python benchmarks/replicate.py --data ../shared/data/multi30k            # every run: many hours, resumable
    python benchmarks/replicate.py --data ../shared/data/multi30k --only top2 adaptive --seeds 0
    python benchmarks/replicate.py --report-only                             # rebuild RESULTS.md from the summaries
    python benchmarks/replicate.py --data ../shared/data/multi30k --only adaptive-long   # 90 minutes of training
    python benchmarks/replicate.py --data ../shared/data/multi30k --quick    # under 15 minutes

Arguments after `--` go to every `train.py fit` and `test`.

Every run trains `configs/multi30k.yaml` + `configs/preset/replicate.yaml` +
`configs/preset/paper_shape.yaml` (every FFN an MoE layer of 16 experts) + one gate
config, for the same number of steps (`--steps`), validating the loss every 50 steps, and
is then tested once on `test_2016_flickr` with beam 4. The protocol counts steps, not
seconds, so runs may share a busy machine:

- the target is top-2's mean val/loss over its seeds at step `--budget` (about 3 epochs);
- a run's steps to target are read off its val/loss curve, interpolated between
  validations; its wall-clock time is kept too, but times from different hours measure
  the machine as much as the model.

Each finished run writes `<out>/runs/<name>-s<seed>.json`: the resolved model config, seed,
curve, routing shares, expert-parallel load model, test BLEU, commands, machine and date.
A run with a summary is skipped; one with a `last.ckpt` resumes from it (saved at every
validation). After training, `benchmarks/step_time.py` times every scheme with a
checkpoint again, side by side. The report and its figures are built from the summaries
and those step times alone.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from curriculum import experts_histograms, series
from throughput import cpu_model

ROOT = Path(__file__).resolve().parents[1]
BASE = ["configs/multi30k.yaml", "configs/preset/replicate.yaml", "configs/preset/paper_shape.yaml"]
ADAPTIVE = ["configs/gate/adaptive.yaml"]
PAPER = ["--data.init_args.curriculum", "paper"]


def threshold(t):
    return ["--model.init_args.net.gate.init_args.threshold", str(t), *PAPER]


# name -> (gate configs, extra arguments, seeds in a full run)
RUNS = {
    "top2": (["configs/gate/top2.yaml"], [], 3),
    "adaptive": (ADAPTIVE, PAPER, 3),
    "adaptive-no-curriculum": (ADAPTIVE, ["--data.init_args.curriculum", "none"], 3),
    "top1": (["configs/gate/top1.yaml"], [], 3),
    "dense": (["configs/gate/dense.yaml"], [], 3),
    "adaptive-T0.05": (ADAPTIVE, threshold(0.05), 1),
    "adaptive-T0.2": (ADAPTIVE, threshold(0.2), 1),
    "adaptive-T0.3": (ADAPTIVE, threshold(0.3), 1),
    "adaptive-T0.4": (ADAPTIVE, threshold(0.4), 1),
}
QUICK_RUNS = ("top2", "adaptive", "top1")
# What the template reaches with more time: trained for LONG_MINUTES instead of a step count,
# validated less often, and reported apart from the tables (`--only adaptive-long`).
LONG = {"adaptive-long": (ADAPTIVE, [*PAPER, "--trainer.val_check_interval", "200"], 1)}
LONG_MINUTES = 90
PLANS = RUNS | LONG

# The paper's translation row (WMT19 De->En) and its ablations, for comparison.
HEAD = (
    "| scheme | steps to target | vs top-2 (steps) | step time vs top-2 | normalized time to target | MFLOPs/token | "
    "two-expert tokens "
    "| test BLEU | paper time | paper BLEU |\n" + "|---" * 10 + "|"
)
PAPER_TABLE3 = {
    "dense": ("0.87x", "40.9"),
    "top2": ("1x", "41.1"),
    "top1": ("1.04x", "39.5"),
    "adaptive": ("0.79x", "41.1"),
}


def step_time_file(store: Path) -> Path:
    """Where `step_time.py` keeps the step times of a store's runs: `runs` -> `step_time.json`,
    `runs-quick` -> `step_time-quick.json`."""
    return store.parent / f"step_time{store.name.removeprefix('runs')}.json"


def jobs(args) -> list[tuple[str, int]]:
    """Seed by seed over the schemes with several seeds, then the single-seed sweep: an
    interrupted plan has its main table, with intervals, soonest."""
    names = args.only or (QUICK_RUNS if args.quick else list(RUNS))
    chosen = args.seeds if args.seeds is not None else [0] if args.quick else None
    seeds = chosen if chosen is not None else range(max(PLANS[n][2] for n in names))
    todo = [(n, s) for s in seeds for n in names if chosen is not None or s < PLANS[n][2]]
    return sorted(todo, key=lambda job: (PLANS[job[0]][2] == 1, job[1]))


def run(name: str, seed: int, args, plan: tuple[list[str], list[str]] | None = None, base: list[str] = BASE) -> dict:
    """Train and test one run; `plan` (gate configs, arguments) defaults to this protocol's."""
    gate_configs, extra = plan or PLANS[name][:2]
    tag = f"{name}-s{seed}"
    run_dir = args.logs / args.mode / tag
    common = [
        *sum((["--config", c] for c in base + gate_configs), []),
        "--data.source.init_args.root",
        str(args.data),
        *extra,
    ]
    common += ["--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", str(args.logs)]
    common += [
        "--trainer.logger.init_args.name",
        f"{args.mode}/{tag}",
        "--trainer.enable_progress_bar",
        "false",
        *args.train_args,
    ]
    last = run_dir / "fit" / "checkpoints" / "last.ckpt"
    steps, minutes = ("-1", f"00:00:{LONG_MINUTES}:00") if name in LONG and plan is None else (str(args.steps), "null")
    fit = [
        "fit",
        *common,
        "--trainer.logger.init_args.version",
        "fit",
        "--trainer.max_steps",
        steps,
        "--trainer.max_time",
        minutes,
    ]
    if last.exists():
        fit += ["--ckpt_path", str(last)]
    test = ["test", *common, "--trainer.logger.init_args.version", "test", "--ckpt_path", str(last)]
    run_dir.mkdir(parents=True, exist_ok=True)
    commands = []
    for command in (fit, test):
        started = time.perf_counter()
        with open(run_dir / f"{command[0]}.log", "a") as log:
            subprocess.run(
                [sys.executable, "train.py", *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True
            )
        commands.append(
            {"command": " ".join(["python", "train.py", *command]), "wall_s": round(time.perf_counter() - started, 1)}
        )

    tb, test_tb = series(run_dir / "fit"), series(run_dir / "test")
    config = yaml.safe_load((run_dir / "fit" / "config.yaml").read_text())
    metrics = json.loads((run_dir / "fit" / "metrics.json").read_text())

    def final(tag, board=tb):
        return board[tag][-1][1] if tag in board else None

    layers = [
        t.split("/")[1]
        for t in tb
        if t.startswith("experts/") and t.endswith("/two_expert_share_epoch") and "/model/" not in t
    ]
    init = config["model"]["init_args"]
    return {
        "name": name,
        "seed": seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "node": platform.node(), "python": platform.python_version()},
        "model": {k: v for k, v in {**init, **init["net"]}.items() if not isinstance(v, dict)}
        | {"gate": init["net"]["gate"], "class": config["model"]["class_path"]},
        "data": {k: v for k, v in config["data"]["init_args"].items() if k != "source"},
        "trainer": {
            k: config["trainer"][k] for k in ("max_steps", "val_check_interval", "precision", "gradient_clip_val")
        },
        "commands": commands,
        "steps": metrics["global_step"],
        # A resumed fit times only its own part: noisy and partial, kept as a rough guide.
        "fit_wall_s": metrics["wall_time_s"],
        "curve": [{"step": s, "value": v} for s, v in tb["val/loss"]],
        "epochs": metrics.get("epochs", []),
        "flops_per_token": final("experts/model/active_flops_per_token_epoch"),
        "two_expert_share": final("experts/model/two_expert_share_epoch"),
        "layer_share": {layer: final(f"experts/{layer}/two_expert_share_epoch") for layer in layers},
        "experts_per_token": final("experts/model/experts_per_token_epoch"),
        "layer_experts_per_token": {layer: final(f"experts/{layer}/experts_per_token_epoch") for layer in layers},
        "layer_experts_histogram": experts_histograms(run_dir / "fit"),
        "ep_cost": [{"step": s, "value": v} for s, v in tb.get("curriculum/ep_cost", [])],
        "test_bleu": final("test/bleu", test_tb),
        "test_loss": final("test/loss", test_tb),
        "checkpoint": str(last),
    }


def steps_to(curve: list[dict], target: float) -> float | None:
    """The step at which a val/loss curve first reached `target`, linearly interpolated
    between the validation before and the one that reached it."""
    for prev, point in zip([None, *curve], curve):
        if point["value"] <= target:
            if prev is None:
                return point["step"]
            frac = (prev["value"] - target) / (prev["value"] - point["value"])
            return prev["step"] + frac * (point["step"] - prev["step"])
    return None


def value_at(curve: list[dict], step: int) -> float | None:
    """The last validation at or before `step`."""
    return next((p["value"] for p in reversed(curve) if p["step"] <= step), None)


def spread(values: list[float], spec: str = ".2f") -> str:
    """Mean and min-max of the values there are."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{spec}} (1 seed)"
    return f"{statistics.mean(values):{spec}} [{min(values):{spec}}-{max(values):{spec}}] ({len(values)} seeds)"


def report(runs: dict[str, list[dict]], args) -> str:
    top2 = [value_at(r["curve"], args.budget) for r in runs.get("top2", [])]
    top2 = [v for v in top2 if v is not None]
    target = statistics.mean(top2) if top2 else None
    reached = [steps_to(r["curve"], target) for r in runs["top2"]] if target is not None else []
    # A top-2 seed that missed its own mean target would make every ratio meaningless: none then.
    base = statistics.mean(reached) if reached and None not in reached else None
    step_file = step_time_file(args.store)
    step_record = json.loads(step_file.read_text()) if step_file.exists() else {}
    step_time = step_record.get("schemes", {})
    # The runs trained with their own commit; the step times are those of the code that measured them.
    measured_with = (
        f" Step times are those of the code at commit `{step_record['commit']}`." if step_record.get("commit") else ""
    )
    # How steep top-2's mean curve is at the target: the loss lost over the 100 steps around it.
    around = [[value_at(r["curve"], args.budget + d) for r in runs.get("top2", [])] for d in (-50, 50)]
    slope = (
        (statistics.mean(around[0]) - statistics.mean(around[1])) if all(None not in a and a for a in around) else None
    )
    steepness = "" if slope is None else f" There top-2's mean curve falls {slope:.3f} per 100 steps."
    store = args.store.resolve().relative_to(ROOT) if args.store.resolve().is_relative_to(ROOT) else args.store
    out = [
        f"# Replication on Multi30k De→En ({args.mode} run)",
        "",
        f"Built {datetime.date.today().isoformat()} from the run summaries in `{store}` by "
        f"`python benchmarks/replicate.py --report-only{' --quick' if args.quick else ''}`.",
        "",
        "Model: `configs/multi30k.yaml` + `configs/preset/replicate.yaml` + `configs/preset/paper_shape.yaml`: "
        "d_model 256, "
        "FFN 512, 3+3 layers, every FFN an MoE layer of 16 experts (dense: FFN 512 everywhere). "
        f"Every run trains {args.steps} steps. The target is top-2's mean val/loss at step {args.budget}: "
        f"**{'n/a' if target is None else f'{target:.3f}'}**.{steepness} "
        "Steps to target are interpolated between validations (every 50 steps). "
        "Values are the mean and [min-max] over seeds. Step time is measured side by side in one process by "
        "`benchmarks/step_time.py` (median over repeats, each scheme's own trained routing), and normalized time to "
        "target "
        "is (steps ratio) x (step-time ratio). Wall-clock times of the runs are listed below but not compared: the "
        "runs "
        f"shared a busy machine over many hours.{measured_with}",
        "",
        "## Table 3: schemes",
        "",
        HEAD,
    ]

    def row(name, label, paper=("", "")):
        rs = runs[name]
        steps = [steps_to(r["curve"], target) if target is not None else None for r in rs]
        reached = [s for s in steps if s is not None]
        ratios = [s / base for s in reached] if base else []
        missed = f", {len(steps) - len(reached)} not reached" if len(reached) < len(steps) else ""
        flops = spread([r["flops_per_token"] / 1e6 if r["flops_per_token"] else None for r in rs], ".1f")
        share = spread([100 * r["two_expert_share"] if r["two_expert_share"] is not None else None for r in rs], ".1f")
        st = step_time.get(name)
        step_ratio = f"{st['vs_top2']:.3f} (FLOPs {st['flops_vs_top2']:.3f})" if st else "not measured"
        normalized = spread([x * st["vs_top2"] for x in ratios]) if st and ratios else "n/a"
        return (
            f"| {label} | {spread(reached, '.0f')}{missed} | {spread(ratios)} | {step_ratio} | {normalized} | {flops} "
            f"| {share} | "
            f"{spread([r['test_bleu'] for r in rs])} | {paper[0]} | {paper[1]} |"
        )

    for name, label in (("dense", "dense"), ("top2", "top-2"), ("top1", "top-1"), ("adaptive", "adaptive T=0.1")):
        if name in runs:
            out.append(row(name, label, PAPER_TABLE3[name]))
    if step_time:
        shares = ", ".join(f"{n} {step_time[n]['expert_flop_share']:.1%}" for n in PLANS if n in step_time)
        out.append(f"\nShare of a training step's FLOPs (forward, backward, optimizer) spent in the experts: {shares}.")
    sweep = [
        (n, t)
        for n, t in (
            ("adaptive-T0.05", 0.05),
            ("adaptive", 0.1),
            ("adaptive-T0.2", 0.2),
            ("adaptive-T0.3", 0.3),
            ("adaptive-T0.4", 0.4),
        )
        if n in runs
    ]
    if len(sweep) > 1:
        out += ["", "## Table 5: threshold", "", HEAD]
        out += [row(n, f"T={t}") for n, t in sweep]
    if "adaptive-no-curriculum" in runs and "adaptive" in runs:
        out += ["", "## Table 6: curriculum", "", HEAD]
        out += [row("adaptive", "adaptive, paper order"), row("adaptive-no-curriculum", "adaptive, no curriculum")]

        def ep_per_token(r):
            # Paired by epoch, not by position: a resumed run's metrics.json lists only the
            # epochs since its resume, while its curves hold every epoch once (by step).
            cost = dict(enumerate(p["value"] for p in {p["step"]: p for p in r["ep_cost"]}.values()))
            tokens = {e["epoch"]: e["tokens"] for e in r["epochs"]}
            # The full epochs after the first: the first has no routing to order by yet, and
            # the step budget cuts the last one short.
            full = [e for e in sorted(cost.keys() & tokens.keys()) if 0 < e < max(cost)]
            return sum(cost[e] for e in full) / sum(tokens[e] for e in full) if full else None

        costs = {n: spread([ep_per_token(r) for r in runs[n]], ".4f") for n in ("adaptive", "adaptive-no-curriculum")}
        out.append(
            "\nModeled 8-GPU expert-parallel cost per token (per step and MoE layer, the largest load of 8 expert "
            "groups, "
            f"summed; full epochs after the first): paper order {costs['adaptive']}, no curriculum "
            f"{costs['adaptive-no-curriculum']}."
        )
    orders_file = args.out / "ep_orders.json"
    if orders_file.exists() and not args.quick:  # made from a full run's routing
        eo = json.loads(orders_file.read_text())
        none = eo["orders"]["none"]["max_load_per_token"]
        out += [
            "",
            f"The same wait for one routing, {eo['run']}'s at the end of training, batched by each order "
            "(`benchmarks/ep_orders.py`, "
            f"{eo['groups']} expert groups, mean over {len(eo['orders']['none']['epochs'])} epochs' orders):",
            "",
            "| order | largest group load per token | vs none | imbalance (1 = even) | modeled wait per epoch |",
            "|---|---|---|---|---|",
        ]
        for name, o in eo["orders"].items():
            modeled = f"{o['modeled_ms_per_epoch'] / 1e3:.1f} s" if o["modeled_ms_per_epoch"] else "n/a"
            out.append(
                f"| {name} | {o['max_load_per_token']:.4f} | {o['max_load_per_token'] / none:.3f} | "
                f"{o['imbalance']:.3f} | {modeled} |"
            )
    for r in runs.get("adaptive-long", []):
        every = max(1, len(r["curve"]) // 8)
        points = ", ".join(f"{p['step']}: {p['value']:.3f}" for p in r["curve"][every - 1 :: every])
        out += [
            "",
            f"## Long run: adaptive T=0.1, paper order, {LONG_MINUTES} minutes of training",
            "",
            f"{r['steps']} steps ({len(r['epochs'])} epochs) on {r['machine']['cpu']}: **test BLEU "
            f"{r['test_bleu']:.2f}** "
            f"(`test_2016_flickr`, beam 4), test loss {r['test_loss']:.3f}. Validation loss by step: {points}.",
        ]
    out += figures(runs, args, target)
    out += [
        "",
        "## Runs",
        "",
        "| run | machine | date | steps | test BLEU | fit wall (noisy) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        for r in rs:
            # A resumed fit's summary knows only the time since its resume.
            resumed = any(
                c["command"].startswith("python train.py fit") and "--ckpt_path" in c["command"] for c in r["commands"]
            )
            out.append(
                f"| {name} s{r['seed']} | {r['machine']['cpu']} | {r['date'][:10]} | {r['steps']} | "
                f"{r['test_bleu']:.2f} "
                f"| {r['fit_wall_s'] / 60:.1f} min{' since its last resume' if resumed else ''} |"
            )
    return "\n".join(out) + "\n"


def figures(runs: dict[str, list[dict]], args, target: float | None) -> list[str]:
    """Writes the report's figures next to the summaries; returns their Markdown."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    out = []

    def save(fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(args.out / name, dpi=100)
        plt.close(fig)
        return os.path.relpath(args.out / name, args.report.parent)

    curves = {n: runs[n] for n in ("dense", "top2", "top1", "adaptive", "adaptive-no-curriculum") if n in runs}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, zoom in zip(axes, (False, True)):
            for name, rs in curves.items():
                steps = [p["step"] for p in rs[0]["curve"]]
                at = [[value_at(r["curve"], s) for r in rs] for s in steps]
                ax.plot(steps, [statistics.mean(v) for v in at], label=f"{name} ({len(rs)} seeds)")
                ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], alpha=0.2)
            if target is not None:
                ax.axhline(target, color="k", lw=0.8, ls="--", label=f"target {target:.3f}")
                if zoom:
                    ax.set_ylim(target - 0.25, target + 0.6)
                    ax.set_xlim(args.budget - 200, args.steps)
            ax.set_xlabel("step")
            ax.set_ylabel("val/loss")
        axes[0].legend(fontsize=8)
        axes[0].set_title("validation loss, mean and min-max over seeds")
        axes[1].set_title("around the target")
        out += ["", "## Figure: validation loss", "", f"![validation loss]({save(fig, f'{args.mode}-curves.png')})"]
    adaptive = [n for n in PLANS if n.startswith("adaptive") and n in runs and runs[n][0]["layer_share"]]
    if adaptive:
        layers = list(runs[adaptive[0]][0]["layer_share"])
        share = {
            n: [100 * statistics.mean(r["layer_share"][layer] for r in runs[n]) for layer in layers] for n in adaptive
        }
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(adaptive)
        for i, (name, values) in enumerate(share.items()):
            ax.bar([j + i * width for j in range(len(layers))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
        ax.set_ylabel("tokens on two experts (%)")
        ax.legend(fontsize=8)
        out += ["", "## Figure 2: two-expert share per layer (last epoch, mean over seeds)", ""]
        out += [f"![two-expert share per layer]({save(fig, f'{args.mode}-two-expert-share.png')})", ""]
        out += [f"| run | {' | '.join(layers)} |", "|---" * (len(layers) + 1) + "|"]
        out += [f"| {name} | {' | '.join(f'{v:.1f}%' for v in values)} |" for name, values in share.items()]
    return out


def load_runs(store: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(store.glob("*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["name"], []).append(r)
    return {n: runs[n] for n in PLANS if n in runs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "multi30k",
        help="folder of {train,val,test_2016_flickr}.{de,en}.gz",
    )
    p.add_argument("--quick", action="store_true", help="top-2, adaptive and top-1, one seed, a few steps")
    p.add_argument("--steps", type=int, help="training steps of every run (default 900, quick 150)")
    p.add_argument(
        "--budget", type=int, help="the step at which top-2's mean val/loss sets the target (default 650, quick 100)"
    )
    p.add_argument("--only", nargs="+", help="a subset of the schemes (arms with --protocol paper)")
    p.add_argument(
        "--seeds", nargs="+", type=int, help="these seeds for every scheme (default: each scheme's own count)"
    )
    p.add_argument(
        "--logs", type=Path, default=ROOT / "logs" / "replicate", help="logs and checkpoints; resumes from here"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "replication")
    p.add_argument("--report", type=Path, help="default benchmarks/RESULTS.md, or RESULTS-quick.md with --quick")
    p.add_argument(
        "--report-only", action="store_true", help="rebuild the report from the run summaries, train nothing"
    )
    p.add_argument(
        "--protocol",
        choices=["second", "paper"],
        default="second",
        help="second: trained from scratch (this file's plan); paper: dense model made MoE (paper_protocol.py)",
    )
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.train_args = argv[split + 1 :]
    if args.protocol == "paper":
        return paper(args)
    if args.only and not set(args.only) <= set(PLANS):
        p.error(f"--only takes schemes of {sorted(PLANS)}")
    args.mode = "quick" if args.quick else "full"
    args.steps = args.steps or (150 if args.quick else 900)
    args.budget = args.budget or (100 if args.quick else 650)
    args.store = args.out / ("runs-quick" if args.quick else "runs")
    args.report = args.report or ROOT / "benchmarks" / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    if not args.report_only:
        if not (args.data / "train.de.gz").exists() and not (args.data / "train.de").exists():
            p.error(f"{args.data}: no train.de[.gz]; pass --data with the Multi30k folder")
        args.data, args.logs = args.data.resolve(), args.logs.resolve()
        trained = False
        for name, seed in jobs(args):
            summary = args.store / f"{name}-s{seed}.json"
            if summary.exists():
                print(f"{summary.name}: done earlier, kept", flush=True)
                continue
            started = time.perf_counter()
            r = run(name, seed, args)
            summary.parent.mkdir(parents=True, exist_ok=True)
            summary.write_text(json.dumps(r, indent=1) + "\n")
            print(
                f"{summary.name}: {r['steps']} steps, test BLEU {r['test_bleu']:.2f}, "
                f"{(time.perf_counter() - started) / 60:.1f} min",
                flush=True,
            )
            trained = True
        if trained and any(args.store.glob("top2-s*.json")):
            # Step times are compared within one process, so every scheme is timed again beside the new runs.
            measure = [sys.executable, "benchmarks/step_time.py", "--data", str(args.data), "--runs", str(args.store)]
            subprocess.run(measure + (["--batches", "4", "--repeats", "3"] if args.quick else []), cwd=ROOT, check=True)
    runs = load_runs(args.store)
    if runs:
        kept = args.report.read_text().partition("\n## Discussion")[2] if args.report.exists() else ""
        args.report.write_text(report(runs, args) + ("\n## Discussion" + kept if kept else ""))
        print(args.report.read_text())


def paper(args):
    import paper_protocol

    args.mode, args.steps = "paper", args.steps or paper_protocol.STEPS
    args.store, args.report = args.out / "runs-paper", args.report or ROOT / "benchmarks" / "RESULTS-paper.md"
    if args.only and not set(args.only) <= set(paper_protocol.ARMS):
        sys.exit(f"--only with --protocol paper takes arms of {sorted(paper_protocol.ARMS)}")
    if not args.report_only:
        args.data, args.logs = args.data.resolve(), args.logs.resolve()
        paper_protocol.train(args)
    runs = paper_protocol.load(args.store)
    args.report.write_text(paper_protocol.report(runs, args.store))
    print(args.report.read_text())


if __name__ == "__main__":
    main()
