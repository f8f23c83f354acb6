"""Every gate on the embedded translation task, the same steps each: quality and the compute it spent.

    python benchmarks/gates.py [--steps 600] [--only top2 adaptive ...]   # resumable
    python benchmarks/gates.py --report-only

Each gate config (`configs/gate/*.yaml`) is put after `configs/task/translation.yaml` and trained
`--steps` steps from seed 0, on the same data in the same order. A finished run writes
`benchmarks/gates/<gate>.json`; the report (`benchmarks/GATES.md`) is built from those
files alone. Steps, not minutes, bound the runs, so they may share the machine; the wall
times are listed, not compared.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from curriculum import series
from throughput import cpu_model

ROOT = Path(__file__).resolve().parents[1]
GATES = ["dense", "top1", "top2", "adaptive", "top_p", "null_experts", "relu", "budget"]
SCALARS = ("experts/model/experts_per_token_epoch", "experts/model/active_flops_per_token_epoch")


def last_scalars(run: Path) -> dict[str, float]:
    logged = series(run)
    return {tag: logged[tag][-1][1] for tag in SCALARS if tag in logged}


def train(gate: str, args) -> dict:
    name = f"gates/{gate}"
    command = [sys.executable, "train.py", "fit", "--config", "configs/task/translation.yaml"]
    command += ["--config", f"configs/gate/{gate}.yaml", "--trainer.max_time", "null", "--trainer.max_epochs", "-1"]
    command += ["--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.logger.init_args.save_dir", str(args.logs), "--trainer.logger.init_args.name", name]
    command += ["--trainer.logger.init_args.version", "fit"]
    run = args.logs / name / "fit"
    last = run / "checkpoints" / "last.ckpt"
    if last.exists():
        command += ["--ckpt_path", str(last)]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "gate": gate,
        "steps": args.steps,
        "val": metrics["final"],
        **last_scalars(run),
        "wall_s": time.perf_counter() - started,
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(command[1:]),
    }


def report(store: Path) -> str:
    rows = [json.loads((store / f"{g}.json").read_text()) for g in GATES if (store / f"{g}.json").exists()]
    out = [
        "# Every gate on the embedded translation task",
        "",
        "Built by `python benchmarks/gates.py --report-only` from `benchmarks/gates/*.json`. Each gate config after",
        "`configs/task/translation.yaml` (named `configs/quickstart.yaml` when these runs were made, with the same",
        "values), the same steps from seed 0, the same data and order. Experts per token and",
        "FLOPs per token are the last training epoch's (`ExpertStats`). One seed, one task: a gate's rank here",
        "says how it does on this small embedded task at this length, not in general. The embedded task is easy",
        "enough that every gate may reach a BLEU near the ceiling, which hides differences in quality; the",
        "validation loss separates them better.",
        "",
        "Validation runs at each epoch's end: val/loss and val/bleu are the last one's, at the step shown. The",
        "runs shared the machine with others: their wall times are listed, not compared.",
        "",
        "| gate | steps | val at step | val/loss | val/bleu | experts per token | active MFLOPs per token | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ept = r.get(SCALARS[0])
        flops = r.get(SCALARS[1])
        out.append(
            f"| {r['gate']} | {r['steps']} | {r['val']['step']} | "
            f"{r['val']['val/loss']:.3f} | {r['val']['val/bleu']:.2f} | "
            f"{'-' if ept is None else f'{ept:.3f}'} | {'-' if flops is None else f'{flops / 1e6:.3f}'} | "
            f"{r['wall_s']:.0f} |"
        )
    missing = [g for g in GATES if g not in {r["gate"] for r in rows}]
    if missing:
        out += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--only", nargs="*", choices=GATES)
    p.add_argument("--logs", type=Path, default=ROOT / "logs")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    store = ROOT / "benchmarks" / "gates"
    store.mkdir(exist_ok=True)
    for gate in [] if args.report_only else args.only or GATES:
        if not (store / f"{gate}.json").exists():
            (store / f"{gate}.json").write_text(json.dumps(train(gate, args), indent=1) + "\n")
    (ROOT / "benchmarks" / "GATES.md").write_text(report(store))
    print((ROOT / "benchmarks" / "GATES.md").read_text())


if __name__ == "__main__":
    main()
