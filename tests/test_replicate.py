"""The replication's plan: which runs a full, a quick and a partial call trains, in which order."""

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replicate  # noqa: E402


def plan(quick=False, only=None, seeds=None):
    return replicate.jobs(argparse.Namespace(quick=quick, only=only, seeds=seeds))


def test_quick_is_one_seed_of_three_schemes():
    assert plan(quick=True) == [("top2", 0), ("adaptive", 0), ("top1", 0)]
    assert plan(quick=True, seeds=[1]) == [("top2", 1), ("adaptive", 1), ("top1", 1)]


def test_full_plan_runs_seed_by_seed_then_the_sweep():
    jobs = plan()
    main = ["top2", "adaptive", "adaptive-no-curriculum", "top1", "dense"]
    sweep = ["adaptive-T0.05", "adaptive-T0.2", "adaptive-T0.3", "adaptive-T0.4"]
    assert jobs == [(n, s) for s in range(3) for n in main] + [(n, 0) for n in sweep]


def test_only_and_seeds_pick_exactly_those_runs():
    assert plan(only=["adaptive-T0.4"], seeds=[0]) == [("adaptive-T0.4", 0)]
    assert plan(only=["dense", "top1"]) == [
        ("dense", 0),
        ("top1", 0),
        ("dense", 1),
        ("top1", 1),
        ("dense", 2),
        ("top1", 2),
    ]


def test_steps_to_interpolates_between_validations():
    curve = [{"step": 50, "value": 4.0}, {"step": 100, "value": 3.0}, {"step": 150, "value": 2.0}]
    assert replicate.steps_to(curve, 3.5) == 75.0
    assert replicate.steps_to(curve, 4.5) == 50  # reached at the first validation
    assert replicate.steps_to(curve, 1.0) is None


def summary(name, seed, values, share):
    return {
        "name": name,
        "seed": seed,
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu": "test CPU"},
        "steps": 150,
        "fit_wall_s": 60.0,
        "commands": [{"command": "python train.py fit", "wall_s": 60.0}],
        "curve": [{"step": 50 * (i + 1), "value": v} for i, v in enumerate(values)],
        "epochs": [],
        "ep_cost": [],
        "flops_per_token": 6e6,
        "two_expert_share": share,
        "layer_share": {"enc.0": share},
        "test_bleu": 30.0 + seed,
    }


def test_report_normalizes_steps_by_step_time(tmp_path):
    pytest.importorskip("matplotlib")
    # Target: top-2's mean loss at step 100, (3.0 + 3.2) / 2 = 3.1. Top-2 reaches it at steps
    # 95 and 105 (mean 100), adaptive at 120: 1.20x the steps, at 0.9x the step time.
    runs = {
        "top2": [summary("top2", 0, [4.0, 3.0, 2.0], 1.0), summary("top2", 1, [4.2, 3.2, 2.2], 1.0)],
        "adaptive": [summary("adaptive", 0, [4.5, 3.5, 2.5], 0.25)],
    }
    step_time = {"top2": (1.0, 1.0), "adaptive": (0.9, 0.85)}
    schemes = {n: {"vs_top2": v, "flops_vs_top2": f, "expert_flop_share": 0.3} for n, (v, f) in step_time.items()}
    (tmp_path / "step_time.json").write_text(json.dumps({"commit": "abc1234", "schemes": schemes}))
    args = argparse.Namespace(
        budget=100,
        steps=150,
        out=tmp_path,
        store=tmp_path / "runs",
        report=tmp_path / "RESULTS.md",
        mode="full",
        quick=False,
    )
    text = replicate.report(runs, args)
    assert "**3.100**" in text
    assert "| adaptive T=0.1 | 120 (1 seed) | 1.20 (1 seed) | 0.900 (FLOPs 0.850) | 1.08 (1 seed) |" in text
    assert (
        "| top-2 | 100 [95-105] (2 seeds) | 1.00 [0.95-1.05] (2 seeds) | 1.000 (FLOPs 1.000) | 1.00 [0.95-1.05] (2 "
        "seeds) |" in text
    )
    assert (tmp_path / "full-curves.png").stat().st_size > 0
    assert "| adaptive | 25.0% |" in text


def test_report_when_a_top2_seed_misses_the_mean_target(tmp_path):
    pytest.importorskip("matplotlib")
    # Target (3.0 + 3.4) / 2 = 3.2 at step 100, reached by seed 0 at step 90; seed 1 stays above
    # it: no ratios, no crash.
    runs = {
        "top2": [summary("top2", 0, [4.0, 3.0, 2.0], 1.0), summary("top2", 1, [4.2, 3.4, 3.3], 1.0)],
        "adaptive": [summary("adaptive", 0, [4.5, 3.5, 2.5], 0.25)],
    }
    args = argparse.Namespace(
        budget=100,
        steps=150,
        out=tmp_path,
        store=tmp_path / "runs",
        report=tmp_path / "RESULTS.md",
        mode="full",
        quick=False,
    )
    text = replicate.report(runs, args)
    assert "| top-2 | 90 (1 seed), 1 not reached | n/a |" in text


def test_curriculum_cost_pairs_epochs_of_a_resumed_run(tmp_path):
    pytest.importorskip("matplotlib")

    # Epochs 0-3 logged once each (epoch 1's end logged again after a resume at the same step);
    # metrics.json of the resumed run lists epochs 1-3 only. Full epochs after the first: 1 and 2.
    def with_cost(r, costs, epochs):
        r["ep_cost"] = [{"step": s, "value": v} for s, v in costs]
        r["epochs"] = [{"epoch": e, "tokens": t} for e, t in epochs]
        return r

    costs = [(10, 100.0), (20, 60.0), (20, 60.0), (30, 40.0), (35, 5.0)]
    runs = {
        "top2": [summary("top2", 0, [4.0, 3.0, 2.0], 1.0)],
        "adaptive": [with_cost(summary("adaptive", 0, [4.5, 3.5, 2.5], 0.25), costs, [(1, 10), (2, 10), (3, 5)])],
        "adaptive-no-curriculum": [
            with_cost(summary("adaptive-no-curriculum", 0, [4.5, 3.5, 2.5], 0.25), costs, [(1, 20), (2, 20), (3, 5)])
        ],
    }
    args = argparse.Namespace(
        budget=100,
        steps=150,
        out=tmp_path,
        store=tmp_path / "runs",
        report=tmp_path / "RESULTS.md",
        mode="full",
        quick=False,
    )
    text = replicate.report(runs, args)
    assert "paper order 5.0000 (1 seed), no curriculum 2.5000 (1 seed)" in text  # (60 + 40) / 20 and / 40


def test_paper_protocol_plan_and_report(tmp_path):
    import paper_protocol

    plan = paper_protocol.jobs(None, None)
    assert plan[:5] == [("top2", 0), ("adaptive-no-curriculum", 0), ("dense", 0), ("top1", 0), ("adaptive", 0)]
    assert len(plan) == 5 * 3 + 7 + 5 and plan[-1] == ("top_p", 0)  # the five dynamic-k gate arms last
    # Top-2 seeds at 3.0 and 3.2 at step 150 (target 3.1, reached at steps 145 and 155); the
    # adaptive arm reaches it at step 180: 1.20x. The curves end at step 250: no later targets.
    curve = lambda values: [{"step": 50 * (i + 1), "value": v} for i, v in enumerate(values)]  # noqa: E731
    top2 = [
        {
            "name": "top2",
            "seed": s,
            "curve": curve(v),
            "test_bleu": 30.0,
            "two_expert_share": 1.0,
            "steps": 600,
            "machine": {"cpu": "x"},
            "date": "2026-12-02",
        }
        for s, v in ((0, [5.0, 4.0, 3.0, 2.0, 1.9]), (1, [5.2, 4.2, 3.2, 2.2, 2.1]))
    ]
    adaptive = dict(
        top2[0],
        name="adaptive-no-curriculum",
        curve=curve([5.0, 4.5, 3.4, 2.9, 2.5]),
        two_expert_share=0.2,
        layer_share={"enc.0": 0.25},
    )
    # A dynamic-k gate's record has the mean and each layer's histogram of experts per token.
    relu = dict(top2[0], name="relu", experts_per_token=1.4, layer_experts_histogram={"enc.0": [0.1, 0.5, 0.3, 0.1]})
    store = tmp_path / "runs-paper"
    text = paper_protocol.report({"top2": top2, "adaptive-no-curriculum": [adaptive], "relu": [relu]}, store)
    assert "| step 150 (3.100) | step 250 (2.000) |" in text  # the mean of 1.9 and 2.1
    # Step 250's target: seed 1 of top-2 never reaches it, so no arm has a ratio there.
    assert (
        "| adaptive-no-curriculum | 1 | not measured | 1.20 (1 seed) | n/a | 30.00 (1 seed) | 1.200 (1 seed) |" in text
    )
    assert (
        "| top2 | 2 | not measured | 1.00 [0.97-1.03] (2 seeds) | n/a | 30.00 [30.00-30.00] (2 seeds) | 2.000" in text
    )
    # A run already below the target at its first validation (step 50) got there at step 50 or before.
    dense = dict(top2[0], name="dense", curve=curve([3.0, 2.9, 2.8, 2.7, 2.6]))
    assert "| dense | 1 | not measured | ≤ 0.33 (1 seed) | n/a |" in paper_protocol.report(
        {"top2": top2, "dense": [dense]}, store
    )
    # Per layer: 0 to 3 experts for 10/50/30/10% of ReLU's tokens; one or two for adaptive's.
    assert "| relu | enc.0 | 1.40 | 10.0 | 50.0 | 30.0 | 10.0 | 0.0 |" in text
    assert "| adaptive-no-curriculum | enc.0 | 1.25 | 0.0 | 75.0 | 25.0 | 0.0 | 0.0 |" in text
    # With a paired step-time ratio of 0.8 [0.75-0.9]: 1.20 x 0.8 = 0.96, interval 1.20 x 0.75 to 1.20 x 0.9.
    arms = {
        "adaptive-no-curriculum": {"median": 0.8, "interval": [0.75, 0.9]},
        "top2": {"median": 1.0, "interval": [0.98, 1.02]},
    }
    (tmp_path / "paired_step.json").write_text(json.dumps({"arms": arms}))
    text = paper_protocol.report({"top2": top2, "adaptive-no-curriculum": [adaptive]}, store)
    assert "| 0.800 [0.750-0.900] | 1.20 (1 seed); **0.96** [0.90-1.08] |" in text
    assert (
        "without the curriculum at most 0.85x top-2's normalized time (paper: 0.79x): not decided "
        "(adaptive-no-curriculum: fewer than 3 seeds, or no paired step time)" in text
    )


def test_paired_ratios_time_both_on_the_same_batches_from_fresh_states():
    import paired_step

    now, seen = [0.0], []
    cost = {"arm": 2.0, "top2": 4.0}

    def step(module, optimizer, batch):
        seen.append((module, batch))
        now[0] += cost[module] * (1 + batch)  # a longer batch costs both alike

    fresh = []
    ratios = paired_step.paired_ratios(
        lambda: fresh.append("arm") or ("arm", None), lambda: ("top2", None), [0, 1, 2], 3, step, lambda: now[0]
    )
    assert ratios == [0.5, 0.5, 0.5] and len(fresh) == 3
    assert [b for m, b in seen if m == "arm"] == [b for m, b in seen if m == "top2"] == [0, 1, 2] * 3
    assert [m for m, _ in seen[:2]] == ["arm", "top2"] and [m for m, _ in seen[6:8]] == [
        "top2",
        "arm",
    ]  # order alternates


def test_the_curriculum_wait_verdict_compares_the_paper_order_with_both_others(tmp_path):
    import paper_protocol

    def measured(paper, random, length):
        orders = {
            o: {"wait_s_max": v, "step_s": 1.0, "wait_share": v}
            for o, v in zip(("paper", "random", "length"), (paper, random, length))
        }
        w = {
            "run": "adaptive",
            "seed": 0,
            "from_step": 5,
            "steps": 60,
            "machine": {"cpu": "x"},
            "date": "d",
            "orders": orders,
        }
        (tmp_path / "w.json").write_text(json.dumps(w))
        return paper_protocol.waits(tmp_path / "w.json")[-1]

    assert "it cuts it" in measured(0.1, 0.2, 0.15)
    assert "it does not cut it" in measured(0.16, 0.2, 0.15)  # below random's, above length's
    assert "0.160 s a step against random's 0.200 s and length's 0.150 s" in measured(0.16, 0.2, 0.15)
    assert "not measured yet" in paper_protocol.waits(tmp_path / "none.json")[0]


def test_a_claim_is_decided_only_where_the_whole_interval_is_on_one_side():
    import paper_protocol

    assert paper_protocol.judge({150: True, 250: True}) == "confirmed at every target"
    assert paper_protocol.judge({150: False, 250: False}) == "refuted at every target"
    mixed = paper_protocol.judge({150: True, 250: None, 350: False})
    assert mixed == "not decided: holds at [150]; fails at [350]; interval crosses the line at [250]"

    seeds = lambda name, bleu, share=1.0: [  # noqa: E731
        {"name": name, "seed": s, "test_bleu": b, "two_expert_share": share, "layer_share": {}}
        for s, b in enumerate(bleu)
    ]
    runs = {
        "top2": seeds("top2", [33.0, 34.0, 35.0]),
        "dense": seeds("dense", [30.0, 31.0, 32.0]),
        "top1": seeds("top1", [30.0, 31.0, 33.5]),
        "adaptive": seeds("adaptive", [34.0] * 3, 0.3),
        "adaptive-no-curriculum": seeds("adaptive-no-curriculum", [34.0] * 3, 0.3),
    }
    normalized = {
        # dense: wholly below 1 at step 150, across it at 250
        "dense": {150: (0.8, 0.7, 0.9), 250: (0.95, 0.85, 1.05)},
        # top-1: wholly above 1 at both
        "top1": {150: (1.1, 1.02, 1.2), 250: (1.2, 1.1, 1.3)},
        # the curriculum arm wholly below the other at 150; at 250 the other has a seed that never got there
        "adaptive": {150: (0.8, 0.7, 0.85), 250: (0.9, 0.8, 0.95)},
        "adaptive-no-curriculum": {150: (0.95, 0.9, 1.0), 250: (math.inf, 0.96, math.inf)},
    }
    text = "\n".join(paper_protocol.claims(runs, normalized))
    assert "in less time than top-2 (paper: 0.87x): not decided: holds at [150]; interval crosses" in text
    assert "Top-1 takes longer than top-2 (paper: 1.04x): confirmed at every target" in text
    assert "9-22% longer without it): confirmed at every target" in text
    # a seed that never reached a target puts no upper end on it, and the lower end decides
    assert (
        "0.85x top-2's normalized time (paper: 0.79x): refuted at every target; "
        "150: 0.95 [0.90-1.00], 250: a seed never reached it (the others from 0.96)" in text
    )
    # top-1's best seed (33.5) is above top-2's worst (33.0), its mean below top-2's: ranges overlap
    assert "Top-1's test BLEU is below top-2's (paper: 39.5 against 41.1): not decided (the ranges overlap)" in text
    normalized["adaptive"] = {150: (1.1, 1.02, 1.2), 250: (1.0, 0.96, 1.05)}  # wholly above at 150 only
    assert "9-22% longer without it): not decided: fails at [150]; interval crosses the line at [250]" in "\n".join(
        paper_protocol.claims(runs, normalized)
    )


def test_routing_claims_read_each_seeds_layers():
    import paper_protocol

    def run(enc, dec, two=0.25):
        share = {f"enc.{i}": v for i, v in enumerate(enc)} | {f"dec.{i}": v for i, v in enumerate(dec)}
        return {"name": "adaptive-no-curriculum", "test_bleu": 30.0, "two_expert_share": two, "layer_share": share}

    falls_rises = run([0.5, 0.4, 0.3], [0.1, 0.2, 0.3])
    flat = run([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    text = "\n".join(paper_protocol.routing({"adaptive-no-curriculum": [falls_rises] * 3}))
    assert "(paper: 25.6% in translation): refuted at this shape: in percent, 25.0 [25.0-25.0] (3 seeds)" in text
    seeds = [run([0.5, 0.4, 0.3], [0.1, 0.2, 0.3], two) for two in (0.2, 0.25, 0.3)]
    assert "translation): confirmed: in percent, 25.0 [20.0-30.0]" in "\n".join(
        paper_protocol.routing({"adaptive-no-curriculum": seeds})
    )
    assert "Figure 2): confirmed: the encoder's falls in 3 of 3 seeds, the decoder's rises in 3" in text
    text = "\n".join(paper_protocol.routing({"adaptive-no-curriculum": [falls_rises, flat, flat]}))
    assert "Figure 2): not decided: the encoder's falls in 1 of 3 seeds, the decoder's rises in 3" in text
    text = "\n".join(paper_protocol.routing({"adaptive-no-curriculum": [flat] * 3}))
    assert "Figure 2): refuted: the encoder's falls in 0 of 3 seeds" in text


def test_upcycling_rows_pair_each_copy_arm_with_its_random_twin():
    import paper_protocol

    def run(name, first, last):
        return {"name": name, "curve": [{"step": 49, "value": first}, {"step": 599, "value": last}], "test_bleu": 30.0}

    runs = {"top2": [run("top2", 3.3, 2.2), run("top2", 3.5, 2.4)], "top2-copy": [run("top2-copy", 2.1, 2.0)]}
    runs["dense"] = [run("dense", 2.0, 1.9)]
    text = "\n".join(paper_protocol.upcycling(runs))
    assert text.index("| top2-copy |") < text.index("| top2 |") < text.index("| dense | 2.000 (1 seed) | 1.900")
    assert "| top2-copy | 2.100 (1 seed) | 2.000 (1 seed) | 30.00 (1 seed) |" in text
    assert "| top2 | 3.400 [3.300-3.500] (2 seeds) | 2.300 [2.200-2.400] (2 seeds) |" in text
    assert "adaptive" not in text and paper_protocol.upcycling({"top2": runs["top2"], "dense": runs["dense"]}) == []
