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
import math
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
# Section 4.4: the share of tokens adaptive gating sent to two experts in translation.
PAPER_TWO_EXPERT_SHARE = 0.256


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
        "90% interval). ≤: a seed was below the target at its first validation, so it got there earlier still.",
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
            # Below the target already at the first validation: the true step is earlier still.
            cell = ("≤ " if any(r["curve"][0]["value"] <= t for r in rs) else "") + cell
            if st and mean_base:
                # A seed that never reached the target took longer than any that did: no upper end.
                lo, hi = st["interval"]
                low = min(ratios) * lo if ratios else math.inf
                n = (
                    (math.inf, low, math.inf)
                    if missed
                    else (statistics.mean(ratios) * st["median"], low, max(ratios) * hi)
                )
                normalized.setdefault(name, {})[s] = n
                cell += "" if missed else f"; **{n[0]:.2f}** [{n[1]:.2f}-{n[2]:.2f}]"
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
    out += upcycling(runs) + distribution(runs)
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


def upcycling(runs: dict[str, list[dict]]) -> list[str]:
    """What filling the experts with copies of the dense FFN changes: the loss the run starts
    from and where it ends, against the same gate with random experts and the dense model
    trained on."""
    pairs = [(c, r) for c, r in (("top2-copy", "top2"), ("adaptive-copy", "adaptive-no-curriculum")) if c in runs]
    if not pairs:
        return []
    out = [
        "",
        "## Upcycling: experts copied from the dense FFN",
        "",
        "The same gate with random and with copied experts (`copy`, noise 0.01), and the dense model they "
        "were converted from, trained on. One seed of `copy`: a difference here is not yet a finding.",
        "",
        "| arm | val/loss at the first validation | at the last | test BLEU |",
        "|---|---|---|---|",
    ]
    for name in [n for pair in pairs for n in pair if n in runs] + (["dense"] if "dense" in runs else []):
        rs = runs[name]
        first = spread([r["curve"][0]["value"] for r in rs], ".3f")
        last = spread([r["curve"][-1]["value"] for r in rs], ".3f")
        out.append(f"| {name} | {first} | {last} | {spread([r['test_bleu'] for r in rs])} |")
    return out


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


Bounds = dict[int, tuple[float, float, float]]  # target step -> (mean, low, high) normalized time


def judge(states: dict[int, bool | None]) -> str:
    """A claim over the targets: True where the whole interval is on its side, False where it
    is on the other side, None where the interval crosses the line."""
    if all(states.values()):
        return "confirmed at every target"
    if all(v is False for v in states.values()):
        return "refuted at every target"
    parts = [("holds at", True), ("fails at", False), ("interval crosses the line at", None)]
    return "not decided: " + "; ".join(
        f"{words} {[s for s, v in states.items() if v is want]}"
        for words, want in parts
        if any(v is want for v in states.values())
    )


def claims(runs: dict[str, list[dict]], normalized: dict[str, Bounds]) -> list[str]:
    """Each claim of the paper's translation results, judged on this protocol's intervals."""

    def measured(*names: str) -> str | None:
        short = [n for n in names if len(runs.get(n, [])) < 3 or n not in normalized]
        return f"not decided ({', '.join(short)}: fewer than 3 seeds, or no paired step time)" if short else None

    def against(name: str, limit: float, below: bool) -> str:
        """Normalized time at most (below) or at least `limit` at every target."""
        n = normalized[name]
        side = {
            s: (hi <= limit if below else lo >= limit) or (None if lo <= limit <= hi else False)
            for s, (_, lo, hi) in n.items()
        }
        return judge(side) + "; " + ", ".join(f"{s}: {shown(*b)}" for s, b in n.items())

    def shown(mean: float, lo: float, hi: float) -> str:
        if math.isinf(mean):
            return "a seed never reached it" + ("" if math.isinf(lo) else f" (the others from {lo:.2f})")
        return f"{mean:.2f} [{lo:.2f}-{hi:.2f}]"

    def faster(a: str, b: str) -> str:
        """`a`'s interval wholly below `b`'s at a target: faster there; wholly above: not."""
        na, nb = normalized[a], normalized[b]
        side = {s: na[s][2] < nb[s][1] or (False if na[s][1] >= nb[s][2] else None) for s in na.keys() & nb.keys()}
        return judge(dict(sorted(side.items())))

    def bleu(name: str) -> list[float]:
        return [r["test_bleu"] for r in runs.get(name, [])]

    def bleu_inside(name: str) -> str:
        top2, other = bleu("top2"), bleu(name)
        if len(top2) < 3 or len(other) < 3:
            return "not decided (fewer than 3 seeds)"
        inside = min(top2) <= statistics.mean(other) <= max(top2)
        verdict = "confirmed: inside" if inside else "refuted: outside"
        return f"{verdict} top-2's [{min(top2):.2f}-{max(top2):.2f}] (mean {statistics.mean(other):.2f})"

    def bleu_below(name: str) -> str:
        top2, other = bleu("top2"), bleu(name)
        if len(top2) < 3 or len(other) < 3:
            return "not decided (fewer than 3 seeds)"
        verdict = (
            "confirmed"
            if max(other) < min(top2)
            else "refuted"
            if statistics.mean(other) >= statistics.mean(top2)
            else "not decided (the ranges overlap)"
        )
        return f"{verdict}: {spread(other)} against top-2's {spread(top2)}"

    out = [
        "- Adaptive T=0.1 without the curriculum at most 0.85x top-2's normalized time (paper: 0.79x): "
        f"{measured('adaptive-no-curriculum') or against('adaptive-no-curriculum', 0.85, below=True)}.",
        f"- ... with test BLEU inside top-2's min-max (paper: equal): {bleu_inside('adaptive-no-curriculum')}.",
        "- Adaptive with the paper's curriculum at most 0.85x top-2's: "
        f"{measured('adaptive') or against('adaptive', 0.85, below=True)}.",
        "- The curriculum shortens adaptive's time to the target (paper: 9-22% longer without it): "
        f"{measured('adaptive', 'adaptive-no-curriculum') or faster('adaptive', 'adaptive-no-curriculum')}.",
        "- Dense reaches top-2's loss in less time than top-2 (paper: 0.87x): "
        f"{measured('dense') or against('dense', 1.0, below=True)}.",
        f"- Top-1 takes longer than top-2 (paper: 1.04x): {measured('top1') or against('top1', 1.0, below=False)}.",
        f"- Dense's test BLEU is below top-2's (paper: 40.9 against 41.1): {bleu_below('dense')}.",
        f"- Top-1's test BLEU is below top-2's (paper: 39.5 against 41.1): {bleu_below('top1')}.",
    ]
    return out + routing(runs)


def routing(runs: dict[str, list[dict]]) -> list[str]:
    """The paper's observations about where adaptive gating sends two experts."""
    rs = runs.get("adaptive-no-curriculum", [])
    if len(rs) < 3:
        return ["- Routing observations: not decided (fewer than 3 seeds of adaptive-no-curriculum)."]
    shares = [experts_per_token(r) - 1 for r in rs]
    inside = min(shares) <= PAPER_TWO_EXPERT_SHARE <= max(shares)
    out = [
        f"- Share of tokens on two experts (paper: {PAPER_TWO_EXPERT_SHARE:.1%} in translation): "
        f"{'confirmed' if inside else 'refuted at this shape'}: in percent, {spread([100 * x for x in shares], '.1f')}."
    ]

    def monotone(r: dict, stack: str, rising: bool) -> bool:
        values = [v for k, v in r["layer_share"].items() if k.startswith(stack)]
        return all(b > a if rising else b < a for a, b in zip(values, values[1:]))

    enc = sum(monotone(r, "enc", rising=False) for r in rs)
    dec = sum(monotone(r, "dec", rising=True) for r in rs)
    verdict = "confirmed" if enc == dec == len(rs) else "refuted" if 0 in (enc, dec) else "not decided"
    out.append(
        "- The two-expert share falls through the encoder and rises through the decoder (paper, Figure 2): "
        f"{verdict}: the encoder's falls in {enc} of {len(rs)} seeds, the decoder's rises in {dec}."
    )
    sweep = {t: f"adaptive-T{t}" for t in (0.05, 0.2, 0.3, 0.4)} | {0.1: "adaptive-no-curriculum"}
    sweep = [("top-1", "top1"), *((f"T={t}", sweep[t]) for t in sorted(sweep)), ("top-2", "top2")]
    seen = [(label, runs[n]) for label, n in sweep if n in runs]
    out.append(
        "- Threshold (paper, Table 5: T=0.05 behaves like top-1, T=0.4 does not always match top-2's quality, "
        "0.1-0.2 is best): not decided (one seed per threshold); experts per token and test BLEU: "
        + "; ".join(
            f"{label} {statistics.mean(experts_per_token(r) for r in rs):.2f}, "
            f"{statistics.mean(r['test_bleu'] for r in rs):.2f}"
            for label, rs in seen
        )
        + "."
    )
    return out


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
