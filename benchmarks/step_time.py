"""Training-step time of the replication's schemes, side by side in one process.

    python benchmarks/step_time.py --data ../shared/data/multi30k [--runs benchmarks/replication/runs]

Each run summary names its checkpoint: the weights the run trained, so each scheme routes
as it really did at the end of its run. Every scheme then takes full training steps
(forward, backward, AdamW) on the same recorded Multi30k batches, the schemes interleaved
batch by batch, so that the machine's drift hits them all alike. Steps change the weights,
so each scheme restarts from its checkpoint before every repeat. Writes
`<runs>/../step_time.json` (`step_time-quick.json` for `runs-quick`): per scheme, the
median over repeats of the summed step time, the ratio to top-2, and the share of a step's
FLOPs spent in the experts (counted by torch's FlopCounterMode), which
`replicate.py --report-only` reads.
"""

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from replicate import RUNS, step_time_file
from throughput import cpu_model
from torch.utils.flop_counter import FlopCounterMode

from adamoe.callbacks import Budget
from adamoe.data import ParallelText, TranslationData
from adamoe.tasks import TranslationModule
from adamoe.transformer import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]


def data_module(data: Path, summary: dict) -> TranslationData:
    """Multi30k as the run read it (its vocabulary, batch budget, length limits and cache),
    set up for fitting; without the curriculum, so its batches are length-bucketed."""
    cfg = summary["data"]
    dm = TranslationData(
        ParallelText(str(data), "de", "en", test="test_2016_flickr"),
        vocab_size=cfg["vocab_size"],
        max_tokens=cfg["max_tokens"],
        max_source_len=cfg["max_source_len"],
        max_target_len=cfg["max_target_len"],
        cache_dir=str(ROOT / cfg["cache_dir"]),
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def recorded_batches(data: Path, summary: dict, n: int) -> list[dict]:
    """The first `n` training batches in length-bucketed order, as every run batches them."""
    return [batch for batch, _ in zip(data_module(data, summary).train_dataloader(), range(n))]


def load(checkpoint: str):
    """A run's module and optimizer. The replication's runs were made before the shape moved
    into `net`: their flat shape arguments become `net`, their weights move from `model.`,
    and the schedule's module is `adamoe.schedulers`."""
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    hparams = state["hyper_parameters"]
    if "net" not in hparams:
        hparams["net"] = {
            k: hparams.pop(k) for k in [f.name for f in dataclasses.fields(TransformerConfig)] if k in hparams
        }
        state["state_dict"] = {
            k.replace("model.", "net.", 1) if k.startswith("model.") else k: v for k, v in state["state_dict"].items()
        }
        scheduler = hparams["lr_scheduler"]
        scheduler["class_path"] = scheduler["class_path"].replace("adamoe.module.", "adamoe.schedulers.")
    with tempfile.NamedTemporaryFile(suffix=".ckpt") as f:
        torch.save(state, f.name)
        module = TranslationModule.load_from_checkpoint(f.name, map_location="cpu").train()
    optimizer = module.optimizer(module.parameters())  # as configured for the run
    optimizer.load_state_dict(state["optimizer_states"][0])
    # A run under a compute budget routes by the knobs its Budget callback last set: the
    # callback restores them as it does when a run resumes.
    for key, saved in state.get("callbacks", {}).items():
        if key.startswith("Budget"):
            budget = Budget()
            budget.load_state_dict(saved)
            budget.on_train_start(None, module)
    return module, optimizer


def train_step(module, optimizer, batch):
    loss, _, routings = module.step(batch)
    (loss + sum(r.aux_loss for r in routings)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def expert_flop_share(module, optimizer, batch) -> tuple[float, float]:
    """Total FLOPs of one training step, and the share of them inside the MoE experts."""
    with FlopCounterMode(display=False) as counter:
        train_step(module, optimizer, batch)
    per_module = counter.get_flop_counts()
    experts = sum(sum(c.values()) for name, c in per_module.items() if name.endswith(".experts"))
    total = counter.get_total_flops()
    return float(total), experts / max(total, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    ap.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "replication" / "runs")
    ap.add_argument(
        "--seed", type=int, help="which seed's checkpoint stands for each scheme (default: its lowest on this machine)"
    )
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    summaries = {}
    for path in sorted(args.runs.glob("*.json"), key=lambda p: json.loads(p.read_text())["seed"]):
        s = json.loads(path.read_text())
        if (
            s["name"] in RUNS
            and s["name"] not in summaries
            and Path(s["checkpoint"]).exists()
            and args.seed in (None, s["seed"])
        ):
            summaries[s["name"]] = s
    if "top2" not in summaries:
        ap.error(
            f"no top2 run with a checkpoint in {args.runs}" + ("" if args.seed is None else f" (seed {args.seed})")
        )
    torch.manual_seed(0)
    batches = recorded_batches(args.data, summaries["top2"], args.batches)
    flops = {}
    for name, s in summaries.items():
        flops[name] = expert_flop_share(*load(s["checkpoint"]), batches[0])
    times = {name: [] for name in summaries}
    for _ in range(args.repeats):
        states = {name: load(s["checkpoint"]) for name, s in summaries.items()}
        spent = dict.fromkeys(summaries, 0.0)
        for batch in batches:
            for name, (module, optimizer) in states.items():
                start = time.perf_counter()
                train_step(module, optimizer, batch)
                spent[name] += time.perf_counter() - start
        for name in summaries:
            times[name].append(spent[name] / len(batches))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "machine": {"cpu": cpu_model(), "node": platform.node(), "threads": torch.get_num_threads()},
        # The runs trained with their own commit; these step times are this commit's code.
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "batches": args.batches,
        "repeats": args.repeats,
        "schemes": {
            name: {
                "seed": summaries[name]["seed"],
                "step_s": median[name],
                "step_s_all": times[name],
                "vs_top2": median[name] / median["top2"],
                "flops_per_step": flops[name][0],
                "flops_vs_top2": flops[name][0] / flops["top2"][0],
                "expert_flop_share": flops[name][1],
            }
            for name in summaries
        },
    }
    out = step_time_file(args.runs)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'scheme':<26}{'median s/step':>14}{'vs top-2':>10}{'FLOPs vs top-2':>16}{'expert FLOP share':>19}")
    for name, r in result["schemes"].items():
        print(
            f"{name:<26}{r['step_s']:>14.3f}{r['vs_top2']:>10.3f}{r['flops_vs_top2']:>16.3f}{r['expert_flop_share']:>19.1%}"
        )


if __name__ == "__main__":
    main()
