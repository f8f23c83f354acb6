"""The wait the paper's curriculum is meant to cut, measured: 2 processes, experts spread
over them, the same steps under each data order.

    python benchmarks/curriculum_wait.py --data ../shared/data/multi30k \
        --run benchmarks/replication/runs-paper/adaptive-s0.json

From the run's checkpoint (weights, optimizer and last epoch's routing table), each order
(`paper`, `random`, `length`) trains `--steps` steps under DDP on 2 CPU processes with
`expert_parallel`, each rank holding half of every layer's experts. `CollectiveWait` logs
each rank's seconds inside the all-to-all exchanges and the step time. Writes
`curriculum_wait.json` beside the run folder: per order, the median over steps of the
larger rank's wait and of the step time; the paper protocol's report reads it.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from curriculum import series
from paper_protocol import BASE
from throughput import cpu_model

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("paper", "random", "length")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    ap.add_argument("--run", type=Path, default=ROOT / "benchmarks" / "replication" / "runs-paper" / "adaptive-s0.json")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    run = json.loads(args.run.read_text())
    checkpoint = Path(run["checkpoint"])
    start = torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]
    result = {"run": run["name"], "seed": run["seed"], "from_step": start, "steps": args.steps, "orders": {}}
    for order in ORDERS:
        with tempfile.TemporaryDirectory() as logs:
            fit = ["fit", *sum((["--config", c] for c in [*BASE, "configs/gate/adaptive.yaml"]), [])]
            fit += [
                "--data.source.init_args.root",
                str(args.data),
                "--data.init_args.curriculum",
                "none" if order == "length" else order,
            ]
            fit += [
                "--model.init_args.expert_parallel",
                "true",
                "--trainer.callbacks+",
                "adamoe.callbacks.CollectiveWait",
            ]
            fit += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
            fit += ["--trainer.max_steps", str(start + args.steps), "--trainer.limit_val_batches", "0"]
            fit += [
                "--trainer.logger.init_args.save_dir",
                logs,
                "--trainer.enable_progress_bar",
                "false",
                "--ckpt_path",
                str(checkpoint),
            ]
            started = time.perf_counter()
            subprocess.run([sys.executable, "train.py", *fit], cwd=ROOT, check=True, capture_output=True)
            board = series(next(Path(logs).rglob("events.out.tfevents.*")).parent)
        waits = [v for _, v in board["parallel/wait_s_max"]]
        steps = [v for _, v in board["parallel/step_s"]]
        ranks = {
            t.rsplit("/", 1)[1]: statistics.median(v for _, v in board[t])
            for t in board
            if t.startswith("parallel/wait_s/rank")
        }
        wait, step = statistics.median(waits), statistics.median(steps)
        result["orders"][order] = {
            "wait_s_max": wait,
            "step_s": step,
            "wait_share": wait / step,
            "wait_s_by_rank": ranks,
            "wall_s": time.perf_counter() - started,
        }
        print(f"{order}: wait {wait:.3f} s of a {step:.3f} s step", flush=True)
    result["machine"] = {"cpu": cpu_model(), "node": platform.node()}
    result["date"] = time.strftime("%Y-%m-%d")
    (args.run.parent.parent / "curriculum_wait.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
