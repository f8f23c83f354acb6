"""How long `train.py`'s help takes beside importing Lightning, the least any command pays.

    python benchmarks/startup.py [--rounds 7]

Each round runs every command once, in turn, as a fresh process; the report gives each
command's median wall time and the median over rounds of its ratio to the import.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from throughput import cpu_model

ROOT = Path(__file__).resolve().parents[1]
BASELINE = [sys.executable, "-c", "import lightning.pytorch"]
COMMANDS = {
    "fit --help": [sys.executable, "train.py", "fit", "--help"],
    "fit --help all": [sys.executable, "train.py", "fit", "--help", "all"],
    "fit --print_config (quickstart)": [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/task/translation.yaml",
        "--print_config",
    ],
}


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    rounds = p.parse_args().rounds
    wall(BASELINE)  # warm the file cache
    times: dict[str, list[float]] = {"import lightning.pytorch": [], **{name: [] for name in COMMANDS}}
    for _ in range(rounds):
        times["import lightning.pytorch"].append(wall(BASELINE))
        for name, command in COMMANDS.items():
            times[name].append(wall(command))
    print(f"{cpu_model()}, {rounds} rounds, {time.strftime('%Y-%m-%d')}\n")
    print("| command | median wall (s) | over the import (s) | ratio to the import |\n|---|---|---|---|")
    base = times["import lightning.pytorch"]
    for name, ts in times.items():
        over = statistics.median(t - b for t, b in zip(ts, base))
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"| `{name}` | {statistics.median(ts):.2f} | {over:+.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
