"""The share of a training step's FLOPs spent in the experts, for a config's shape.

    python benchmarks/expert_share.py --data ../shared/data/multi30k [--preset wide_experts] [--gate top2]

Counts one full training step (forward, backward, AdamW) on the first Multi30k training
batch with torch's FlopCounterMode, as `step_time.py` does for trained runs; the routing of
a freshly built model sends every token to k experts, so the share is that of the gate's k.
"""

import argparse
import sys
from pathlib import Path

from step_time import expert_flop_share

from adamoe.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    p.add_argument("--preset", default="wide_experts", help="a shape preset in configs/preset/")
    p.add_argument("--gate", default="top2", help="a gate config in configs/gate/")
    args = p.parse_args()
    configs = [
        "configs/multi30k.yaml",
        "configs/preset/replicate.yaml",
        f"configs/preset/{args.preset}.yaml",
        f"configs/gate/{args.gate}.yaml",
    ]
    sys.argv = ["train.py"]
    run = cli(
        [
            *sum((["--config", str(ROOT / c)] for c in configs), []),
            "--data.source.init_args.root",
            str(args.data),
            "--data.init_args.curriculum",
            "none",
            "--data.init_args.cache_dir",
            str(ROOT / "data"),
        ],
        run=False,
    )
    dm, module = run.datamodule, run.model
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    total, share = expert_flop_share(module.train(), module.optimizer(module.parameters()), batch)
    print(f"{args.preset} + {args.gate}: {total / 1e9:.1f} GFLOP per step, {share:.1%} in the experts")


if __name__ == "__main__":
    main()
