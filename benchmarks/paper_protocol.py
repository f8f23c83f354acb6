"""Replication, third protocol: the paper's own construction (Li et al. 2023, section 4).

    python benchmarks/replicate.py --protocol paper --data ../shared/data/multi30k   # resumable, many hours
    python benchmarks/replicate.py --protocol paper --report-only

A dense model of `configs/preset/wide_experts.yaml`'s shape (d_model 128, FFN 1536, 3+3
layers, FFNs without biases) is trained once on Multi30k De->En for `SOURCE_STEPS` steps.
Every arm then starts from that one checkpoint, its FFNs turned into MoE layers of 16
experts as wide as the FFN (`convert_from`, random experts unless the arm says `copy`),
and trains `STEPS` steps as a new run. A seed sets both the new weights and the data
order. Every arm packs its batches by one rule (the order cut into pools of 2,048 samples,
each sorted by length), so that only the order differs between arms: `random`, the
paper's curriculum, or the curriculum with its batches shuffled.

Each finished run writes `benchmarks/replication/runs-paper/<name>-s<seed>.json` (as the
second protocol's, plus the conversion source and the data seed); the report
(`benchmarks/RESULTS-paper.md`) is built from those files alone.
"""

import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from replicate import ROOT, run, spread, steps_to, value_at

BASE = ["configs/multi30k.yaml", "configs/preset/replicate.yaml", "configs/preset/wide_experts.yaml"]
SOURCE_STEPS = 1200
STEPS = 600
# Targets: top-2's mean val/loss at these steps of the arms' runs, from the steep part to the end.
TARGET_STEPS = (150, 250, 350, 450, 550)
ADAPTIVE = ["configs/gate/adaptive.yaml"]
RANDOM = ["--data.init_args.curriculum", "random"]
PAPER = ["--data.init_args.curriculum", "paper"]
COPY = ["--model.init_args.convert_experts", "copy", "--model.init_args.convert_noise", "0.01"]


# The dynamic-k gates are set to spend what adaptive T=0.1 spent here: its mean experts per
# token over adaptive-no-curriculum's seeds 0 and 1 (`experts_per_token` in their run files).
MATCHED = 1.39


def threshold(t):
    return ["--model.init_args.net.gate.init_args.threshold", str(t)]


def gate_arg(name, value):
    return [f"--model.init_args.net.gate.init_args.{name}", str(value)]


def budget(target):
    return ["--trainer.callbacks+", "adamoe.callbacks.Budget", "--trainer.callbacks.init_args.target", str(target)]


# name -> (gate configs, arguments, seeds)
ARMS = {
    "top2": (["configs/gate/top2.yaml"], RANDOM, 3),
    "adaptive-no-curriculum": (ADAPTIVE, RANDOM, 3),
    "dense": (["configs/gate/dense.yaml"], RANDOM, 3),
    "top1": (["configs/gate/top1.yaml"], RANDOM, 3),
    "adaptive": (ADAPTIVE, PAPER, 3),
    "adaptive-shuffled": (ADAPTIVE, [*PAPER, "--data.init_args.shuffle_batches", "true"], 1),
    "adaptive-T0.05": (ADAPTIVE, [*RANDOM, *threshold(0.05)], 1),
    "adaptive-T0.2": (ADAPTIVE, [*RANDOM, *threshold(0.2)], 1),
    "adaptive-T0.3": (ADAPTIVE, [*RANDOM, *threshold(0.3)], 1),
    "adaptive-T0.4": (ADAPTIVE, [*RANDOM, *threshold(0.4)], 1),
    "top2-copy": (["configs/gate/top2.yaml"], [*RANDOM, *COPY], 1),
    "adaptive-copy": (ADAPTIVE, [*RANDOM, *COPY], 1),
    # The dynamic-k gates at adaptive's mean experts per token: the budget controller holds it
    # for adaptive and top-p; null experts give k=2 times the real share of 16 + 7 experts;
    # ReLU holds 1 - MATCHED/16 of its gates at zero. Top-p also at its paper's p.
    "adaptive-budget": (ADAPTIVE, [*RANDOM, *budget(MATCHED)], 1),
    "top_p-budget": (["configs/gate/top_p.yaml"], [*RANDOM, *budget(MATCHED)], 1),
    "null_experts": (["configs/gate/null_experts.yaml"], [*RANDOM, *gate_arg("num_null", 7)], 1),
    "relu": (["configs/gate/relu.yaml"], [*RANDOM, *gate_arg("target_sparsity", round(1 - MATCHED / 16, 4))], 1),
    "top_p": (["configs/gate/top_p.yaml"], RANDOM, 1),
}
GATES = ["adaptive-no-curriculum", "adaptive-budget", "top_p-budget", "null_experts", "relu", "top_p"]


def jobs(only: list[str] | None, seeds: list[int] | None) -> list[tuple[str, int]]:
    """Seed by seed over the arms with several seeds, then the single-seed arms."""
    names = only or list(ARMS)
    chosen = seeds if seeds is not None else range(max(ARMS[n][2] for n in names))
    todo = [(n, s) for s in chosen for n in names if seeds is not None or s < ARMS[n][2]]
    return sorted(todo, key=lambda job: (ARMS[job[0]][2] == 1, job[1]))


def source(args) -> Path:
    """The dense model every arm starts from: trained once, resumable, summarized."""
    folder = args.logs / "paper" / "dense-source"
    last = folder / "fit" / "checkpoints" / "last.ckpt"
    summary = args.store / "dense-source.json"
    if summary.exists():
        return last
    configs = sum((["--config", c] for c in [*BASE, "configs/gate/dense.yaml"]), [])
    fit = ["fit", *configs, "--data.source.init_args.root", str(args.data), "--seed_everything", "0"]
    fit += ["--trainer.max_steps", str(SOURCE_STEPS), "--trainer.logger.init_args.save_dir", str(args.logs)]
    fit += ["--trainer.logger.init_args.name", "paper/dense-source", "--trainer.logger.init_args.version", "fit"]
    fit += ["--trainer.enable_progress_bar", "false", *(["--ckpt_path", str(last)] if last.exists() else [])]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "fit.log", "a") as log:
        subprocess.run([sys.executable, "train.py", *fit], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    from curriculum import series

    curve = [{"step": s, "value": v} for s, v in series(folder / "fit")["val/loss"]]
    args.store.mkdir(parents=True, exist_ok=True)
    summary.write_text(
        json.dumps(
            {"steps": SOURCE_STEPS, "curve": curve, "checkpoint": str(last), "sha256": sha256(last), "command": fit},
            indent=1,
        )
    )
    return last


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(args):
    checkpoint = source(args)
    for name, seed in jobs(args.only, args.seeds):
        summary = args.store / f"{name}-s{seed}.json"
        if summary.exists():
            print(f"{summary.name}: done earlier, kept", flush=True)
            continue
        gates, extra, _ = ARMS[name]
        seeded = [*extra, "--data.init_args.seed", str(seed), "--model.init_args.convert_from", str(checkpoint)]
        r = run(name, seed, args, (gates, seeded), BASE)
        r |= {
            "source": {"checkpoint": str(checkpoint), "sha256": sha256(checkpoint)},
            "data_seed": seed,
            "protocol": "paper",
        }
        summary.write_text(json.dumps(r, indent=1) + "\n")
        print(f"{summary.name}: {r['steps']} steps, test BLEU {r['test_bleu']:.2f}", flush=True)


def load(store: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(store.glob("*-s*.json")):
        r = json.loads(path.read_text())
        if "name" in r:  # not the dense source's summary
            runs.setdefault(r["name"], []).append(r)
    return {n: runs[n] for n in ARMS if n in runs}


def report(runs: dict[str, list[dict]], store: Path) -> str:
    """Steps to each target relative to top-2, test BLEU and routing, per arm; mean [min-max] over seeds."""
    out = [
        "# Replication on Multi30k De→En, the paper's protocol (dense model converted into MoE)",
        "",
        "Built by `python benchmarks/replicate.py --protocol paper --report-only` from "
        f"`{os.path.relpath(store, ROOT)}`. "
        f"Every arm starts from one dense checkpoint trained {SOURCE_STEPS} steps and trains {STEPS} steps; "
        "a seed sets the new weights and the data order. Targets are top-2's mean val/loss at the steps in the header; "
        "cells give each arm's steps to reach it divided by top-2's mean steps.",
    ]
    top2 = runs.get("top2", [])
    targets = {}
    for step in TARGET_STEPS:
        values = [value_at(r["curve"], step) for r in top2]
        if top2 and None not in values and all(r["curve"][-1]["step"] >= step for r in top2):
            targets[step] = statistics.mean(values)
    if not targets:
        return "\n".join(out + ["", "No top-2 run has finished yet."]) + "\n"
    base = {s: [steps_to(r["curve"], t) for r in top2] for s, t in targets.items()}
    paired_file = store.parent / "paired_step.json"
    paired = json.loads(paired_file.read_text())["arms"] if paired_file.exists() else {}
    head = " | ".join(f"step {s} ({t:.3f})" for s, t in targets.items())
    out += [
        "",
        "Cells: steps to the target / top-2's mean steps; then, where the step time was measured, the normalized time "
        "(steps ratio x paired step-time ratio) with its interval (the steps ratios' min-max times the step ratio's "
        "90% interval).",
        "",
        f"| arm | seeds | paired step time vs top-2 | {head} | test BLEU | experts per token |",
        "|---" * (len(targets) + 5) + "|",
    ]
    normalized: dict[str, dict[int, tuple[float, float, float]]] = {}
    for name, rs in runs.items():
        st = paired.get(name)
        cells = []
        for s, t in targets.items():
            mean_base = statistics.mean(base[s]) if None not in base[s] else None
            reached = [steps_to(r["curve"], t) for r in rs]
            ratios = [x / mean_base for x in reached if x is not None] if mean_base else []
            missed = len(reached) - len(ratios) if mean_base else 0
            cell = spread(ratios) + (f", {missed} not reached" if missed else "")
            if st and ratios and not missed:
                lo, hi = st["interval"]
                n = (statistics.mean(ratios) * st["median"], min(ratios) * lo, max(ratios) * hi)
                normalized.setdefault(name, {})[s] = n
                cell += f"; **{n[0]:.2f}** [{n[1]:.2f}-{n[2]:.2f}]"
            cells.append(cell)
        step = f"{st['median']:.3f} [{st['interval'][0]:.3f}-{st['interval'][1]:.3f}]" if st else "not measured"
        used = spread([experts_per_token(r) for r in rs], ".3f")
        out.append(
            f"| {name} | {len(rs)} | {step} | {' | '.join(cells)} | {spread([r['test_bleu'] for r in rs])} | {used} |"
        )
    places = sorted({f"{v['machine']['cpu']}, {v['date']}" for v in paired.values() if "machine" in v})
    if places:
        out += ["", f"Paired step times (`benchmarks/paired_step.py`) taken on: {'; '.join(places)}."]
    out += ["", "## The paper's claims", ""] + claims(runs, normalized) + waits(store.parent / "curriculum_wait.json")
    out += distribution(runs)
    out += ["", "## Runs", "", "| run | machine | date | steps | test BLEU |", "|---|---|---|---|---|"]
    out += [
        f"| {n} s{r['seed']} | {r['machine']['cpu']} | {r['date'][:10]} | {r['steps']} | {r['test_bleu']:.2f} |"
        for n, rs in runs.items()
        for r in rs
    ]
    return "\n".join(out) + "\n"


def experts_per_token(r: dict) -> float | None:
    """The last training epoch's mean; runs recorded before the mean was kept have only
    the two-expert share, which for top-1, top-2 and adaptive says the same."""
    if r.get("experts_per_token") is not None:
        return r["experts_per_token"]
    return None if r.get("two_expert_share") is None else 1 + r["two_expert_share"]


def histogram(r: dict, layer: str) -> list[float]:
    if layer in r.get("layer_experts_histogram", {}):
        return r["layer_experts_histogram"][layer]
    share = r["layer_share"][layer]
    return [0.0, 1 - share, share]


def distribution(runs: dict[str, list[dict]]) -> list[str]:
    """The dynamic-k gates' experts per token, layer by layer, from each arm's first seed."""
    shown = [(n, runs[n][0]) for n in GATES if n in runs]
    if not shown:
        return []
    out = [
        "",
        "## Dynamic-k gates: experts per token, layer by layer",
        "",
        f"Each gate set to spend what adaptive T=0.1 spent ({MATCHED} experts per token, the mean of "
        "adaptive-no-curriculum's seeds), except top_p at its paper's p. The table above gives their "
        "steps to each target, test BLEU and mean experts per token; here, the share of tokens (%) that took "
        "0, 1, 2, 3 and more experts in each MoE layer, over the last training epoch. One seed each: a "
        "difference between two gates here is not yet a finding.",
        "",
        "| arm | layer | mean | 0 | 1 | 2 | 3 | 4+ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in shown:
        for layer in r.get("layer_experts_histogram") or r.get("layer_share", {}):
            h = histogram(r, layer)
            shares = [*h[:4], *([0.0] * (4 - len(h[:4]))), sum(h[4:])]
            mean = sum(k * v for k, v in enumerate(h))
            out.append(f"| {name} | {layer} | {mean:.2f} | " + " | ".join(f"{100 * v:.1f}" for v in shares) + " |")
    return out


def claims(runs: dict[str, list[dict]], normalized: dict[str, dict[int, tuple[float, float, float]]]) -> list[str]:
    """Each claim: confirmed where the whole interval is on its side at every target, refuted
    where it is on the other side at every target, else not decided."""

    def verdict(name: str, limit: float) -> str:
        n = normalized.get(name, {})
        if not n or len(runs.get(name, [])) < 3:
            return "not decided (fewer than 3 seeds measured)"
        if all(hi <= limit for _, _, hi in n.values()):
            return f"confirmed at every target (upper ends {max(hi for _, _, hi in n.values()):.2f})"
        if all(lo > limit for _, lo, _ in n.values()):
            return f"refuted at every target (lower ends from {min(lo for _, lo, _ in n.values()):.2f})"
        held = [s for s, (_, _, hi) in n.items() if hi <= limit]
        return f"not decided: holds at targets {held or 'none'} of {sorted(n)}"

    def bleu_inside(name: str) -> str:
        top2, other = [r["test_bleu"] for r in runs.get("top2", [])], [r["test_bleu"] for r in runs.get(name, [])]
        if len(top2) < 3 or len(other) < 3:
            return "not decided (fewer than 3 seeds)"
        inside = min(top2) <= statistics.mean(other) <= max(top2)
        where = "inside" if inside else "outside"
        return f"{where} top-2's [{min(top2):.2f}-{max(top2):.2f}] (mean {statistics.mean(other):.2f})"

    return [
        "- Adaptive T=0.1 without the curriculum at most 0.85x top-2's normalized time: "
        f"{verdict('adaptive-no-curriculum', 0.85)}.",
        f"- ... with test BLEU inside top-2's min-max: {bleu_inside('adaptive-no-curriculum')}.",
        f"- Adaptive with the paper's curriculum at most 0.85x top-2's: {verdict('adaptive', 0.85)}.",
    ]


def waits(path: Path) -> list[str]:
    """The curriculum's claim where it can show: the measured wait in the expert exchanges."""
    if not path.exists():
        return ["- The curriculum cuts the wait between ranks: not measured yet (`benchmarks/curriculum_wait.py`)."]
    w = json.loads(path.read_text())
    out = [
        "",
        f"Measured wait (`benchmarks/curriculum_wait.py`): {w['run']} s{w['seed']} from step {w['from_step']}, "
        f"{w['steps']} steps "
        f"per order, 2 processes with half the experts each, on {w['machine']['cpu']} ({w['date']}); medians over "
        "steps.",
        "",
        "| order | larger rank's wait in the exchanges (s) | step (s) | wait share of the step |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {o} | {v['wait_s_max']:.4f} | {v['step_s']:.3f} | {v['wait_share']:.1%} |" for o, v in w["orders"].items()
    ]
    o = w["orders"]
    others = f"random's {o['random']['wait_s_max']:.3f} s and length's {o['length']['wait_s_max']:.3f} s"
    cuts = o["paper"]["wait_s_max"] < min(o["random"]["wait_s_max"], o["length"]["wait_s_max"])
    verdict = "cuts it" if cuts else "does not cut it"
    out += [
        "",
        f"- The curriculum cuts the wait between ranks: measured, it {verdict}: the paper order's larger-rank wait "
        f"is {o['paper']['wait_s_max']:.3f} s a step against {others} (one run of {w['steps']} steps per order).",
    ]
    return out
