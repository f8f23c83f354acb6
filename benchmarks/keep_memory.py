"""What `adamoe.callbacks.KeepFreedMemory` saves: our Multi30k training step (as
`throughput.py --precision bf16-mixed` times it, fp32 and bf16-mixed) in fresh processes,
alternately with glibc's defaults and with freed memory kept. The setting belongs to a
process, so one process cannot time both; each pair of processes runs back to back, and
the ratio is the median over pairs of kept / default.

    python benchmarks/keep_memory.py [--data ../shared/data/multi30k] [--pairs 3]
"""

import argparse
import json
import statistics
import subprocess
import sys

import torch
from throughput import cpu_model, multi30k_times

from adamoe.memory import keep_freed_memory


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="Multi30k's folder; batches of Multi30k's shapes without it")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "kept" and not keep_freed_memory():
            sys.exit("the C library is not glibc: nothing to compare")
        times = multi30k_times(args.data, args.batches, args.repeats)
        print(json.dumps({name: statistics.median(ts) for name, ts in times.items()}))
        return
    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Multi30k step from "
        f"{args.data or 'its shapes'}"
    )
    pairs = []
    for _ in range(args.pairs):
        medians = {}
        for mode in ("default", "kept"):
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--batches",
                str(args.batches),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(
                command + (["--data", args.data] if args.data else []), capture_output=True, text=True, check=True
            )
            medians[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        pairs.append(medians)
        print(" ".join(f"{mode} {name} {t:.3f} s" for mode, m in medians.items() for name, t in m.items()), flush=True)
    for name in pairs[0]["default"]:
        ratio = statistics.median(p["kept"][name] / p["default"][name] for p in pairs)
        print(f"{name}: kept / default = {ratio:.3f} (median of {args.pairs} pairs)")


if __name__ == "__main__":
    main()
