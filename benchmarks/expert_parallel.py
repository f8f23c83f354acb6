"""Expert parallelism against plain DDP, with 2 CPU processes (gloo), per gate.

For top-2, adaptive and top-1 gating it trains the same model for a fixed number of steps
with `--model.expert_parallel true` and without, and prints the all-to-all bytes per step
(sent between ranks, both exchanges), the most assignments one rank's experts received
per step (the straggler), and the mean step time of each (the slowest rank's training
time over the steps).

    python benchmarks/expert_parallel.py [--steps 60] [--config configs/task/translation.yaml]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATES = {
    "top-2": ["--model.net.gate", "adamoe.Top2Gate"],
    "adaptive": ["--model.net.gate", "adamoe.AdaptiveGate", "--model.net.gate.init_args.threshold", "0.1"],
    "top-1": ["--model.net.gate", "adamoe.Top1Gate"],
}


def scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {tag: [e.value for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def run(config, gate, ep: bool, steps: int, out: Path) -> dict:
    name = f"{gate}-{'ep' if ep else 'ddp'}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        config,
        *GATES[gate],
        "--model.expert_parallel",
        str(ep).lower(),
    ]
    cmd += [
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        str(steps),
    ]
    cmd += [
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]
    cmd += ["--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", name]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    run_dir = max((out / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    tb = scalars(run_dir)
    received = [v for k, vs in tb.items() if k.endswith("ep_received_max") for v in vs]
    return {
        "step_s": sum(e["max_s"] for e in epochs) / steps,
        "bytes": sum(tb.get("experts/model/ep_bytes_per_step", [0]))
        / max(1, len(tb.get("experts/model/ep_bytes_per_step", []))),
        "received_max": sum(received) / max(1, len(received)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="adamoe-ep-"))
    print(f"{args.config}, {args.steps} steps, 2 CPU processes (gloo)")
    print(f"{'gate':<10}{'a2a MB/step':>13}{'max recv/layer':>16}{'EP s/step':>11}{'DDP s/step':>12}{'EP/DDP':>8}")
    for gate in GATES:
        ep, ddp = run(args.config, gate, True, args.steps, out), run(args.config, gate, False, args.steps, out)
        print(
            f"{gate:<10}{ep['bytes'] / 1e6:>13.3f}{ep['received_max']:>16.0f}"
            f"{ep['step_s']:>11.3f}{ddp['step_s']:>12.3f}"
            f"{ep['step_s'] / ddp['step_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
