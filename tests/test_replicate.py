"""The replication's plan: which runs a full, a quick and a partial call trains, in which order."""

import argparse
import sys
from pathlib import Path

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
    assert plan(only=["dense", "top1"]) == [("dense", 0), ("top1", 0), ("dense", 1), ("top1", 1), ("dense", 2), ("top1", 2)]
