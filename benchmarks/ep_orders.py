"""The curriculum where it is meant to pay: the modeled 8-GPU expert-parallel wait of the
MoE layers per epoch, for the none, random and paper orders of the same routing.

    python benchmarks/ep_orders.py --data ../shared/data/multi30k [--run adaptive-s1] [--epochs 3]

A trained run's checkpoint routes every training sample once (eval mode, so no dropout),
which gives per sample and MoE layer the assignments of each expert and the two-expert
share the paper's order sorts by. Each order then batches the same samples as training
does (`max_tokens`, and for random and paper the length sort within pools of
`curriculum_pool`), for several epochs' seeds. With the E experts in 8 groups of E/8, a
step's MoE layer waits for its busiest group: the modeled time is, per step and layer, the
largest load of any group, summed, times the cost of one assignment (`--cost-ms`, from
`benchmarks/moe_layer.py` at the run's sizes: its top-2 time over 2 x tokens). Per token
so that orders compare; the imbalance factor is 8 x sum of largest loads / all loads (1 =
even). One routing for every order takes training noise out of the comparison; the
curriculum's effect on training itself is in the replication's Table 6.
"""

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from step_time import ROOT, data_module, load

from adamoe.data.batch import token_counts
from adamoe.data.sampler import ShardedBatchSampler

ORDERS = {"none": "length", "random": "random", "paper": "paper"}


def routed_loads(module, dm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per MoE layer and training sample: assignments per expert [L, N, E]; two-expert
    tokens and all tokens [N, L]. With the run's trained gates."""
    n, sides = len(dm.train_sampler.lengths), module.net.moe_layer_sides
    L, E = len(sides), module.net.moe_layers()[0].num_experts
    loads_LNE = torch.zeros(L, n, E, dtype=torch.int64)
    two_NL, tokens_NL = torch.zeros(n, L, dtype=torch.int64), torch.zeros(n, L, dtype=torch.int64)
    module.eval()
    with torch.no_grad():
        for batch in dm.train_dataloader():
            _, routings = module(batch, project=False)
            index_B, B = batch["index"], batch["index"].shape[0]
            src_B, tgt_B = token_counts(batch)
            for layer, (r, side) in enumerate(zip(routings, sides)):
                S = batch["src" if side == "source" else "tgt_in"].shape[1]
                sample_N = index_B[r.token_index_N // S]
                loads_LNE[layer].view(-1).index_add_(0, sample_N * E + r.expert_index_N, torch.ones_like(sample_N))
                two_NL[index_B, layer] = r.two_expert_counts(B)
                tokens_NL[index_B, layer] = src_B if side == "source" else tgt_B
    return loads_LNE, two_NL, tokens_NL


def wait(loads_LNE: np.ndarray, plan, groups: int) -> tuple[float, float]:
    """Sum over steps and layers of the busiest group's load, and of all loads."""
    per_step = np.add.reduceat(loads_LNE[:, plan.order], plan.bounds[:-1], axis=1)  # [L, steps, E]
    per_group = per_step.reshape(*per_step.shape[:2], groups, -1).sum(-1)
    return float(per_group.max(-1).sum()), float(per_step.sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    ap.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "replication" / "runs")
    ap.add_argument("--run", default="adaptive-s1", help="the run summary whose checkpoint routes")
    ap.add_argument("--epochs", type=int, default=3, help="epochs (seeds of the orders) to average over")
    ap.add_argument("--groups", type=int, default=8, help="expert-parallel ranks")
    ap.add_argument("--cost-ms", type=float, help="ms per assignment on one rank (moe_layer.py at the run's sizes)")
    args = ap.parse_args()
    summary = json.loads((args.runs / f"{args.run}.json").read_text())
    module, _ = load(summary["checkpoint"])
    cfg = summary["data"]
    dm = data_module(args.data, summary)
    torch.manual_seed(0)
    loads_LNE, two_NL, tokens_NL = routed_loads(module, dm)
    sides = module.net.moe_layer_sides
    tokens = int(sum(tokens_NL[:, sides.index(side)].sum() for side in set(sides)))  # source and target tokens
    lengths, pool = dm.train_sampler.lengths, cfg["curriculum_pool"]
    results = {}
    for name, order in ORDERS.items():
        waits = []
        for epoch in range(1, args.epochs + 1):  # epoch 0 of a run has no routing to order by
            sampler = ShardedBatchSampler(lengths, cfg["max_tokens"], None, order, seed=0, pool=pool)
            sampler.two_NL, sampler.tokens_NL = two_NL, tokens_NL
            sampler.set_epoch(epoch)
            waits.append(wait(loads_LNE.numpy(), sampler.global_batches(), args.groups))
        biggest, total = statistics.mean(w[0] for w in waits), statistics.mean(w[1] for w in waits)
        results[name] = {
            "max_load_per_token": biggest / tokens,
            "imbalance": args.groups * biggest / total,
            "modeled_ms_per_epoch": biggest * args.cost_ms if args.cost_ms else None,
            "epochs": [{"max_load": b, "assignments": t} for b, t in waits],
        }
    out = {
        "run": args.run,
        "checkpoint": summary["checkpoint"],
        "groups": args.groups,
        "tokens_per_epoch": tokens,
        "cost_ms": args.cost_ms,
    }
    out["orders"] = results
    (args.runs.parent / "ep_orders.json").write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"routing of {args.run}, {args.groups} expert groups, {tokens:,} tokens an epoch, mean over {args.epochs} "
        "epochs' orders"
    )
    print(f"{'order':<8}{'largest group load / token':>28}{'imbalance':>11}{'vs none':>9}{'modeled s/epoch':>17}")
    for name, r in results.items():
        modeled = f"{r['modeled_ms_per_epoch'] / 1e3:.1f}" if args.cost_ms else "n/a"
        vs = r["max_load_per_token"] / results["none"]["max_load_per_token"]
        print(f"{name:<8}{r['max_load_per_token']:>28.4f}{r['imbalance']:>11.3f}{vs:>9.3f}{modeled:>17}")


if __name__ == "__main__":
    main()
