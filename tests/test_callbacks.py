import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_config, train

from adamoe.callbacks.analysis import count_words, words_of
from adamoe.callbacks.stats import (
    FIELDS,
    TOKENS,
    TWO_EXPERT,
    ExpertStats,
    experts_per_token,
    loads,
    routing_counts,
    summarize,
)
from adamoe.callbacks.timing import EpochTimer, time_to_target
from adamoe.gates import Routing


def routing(experts_per_token, load, entropy, aux, dropped=0):
    ept = torch.tensor(experts_per_token)
    n = int(ept.sum())
    return Routing(
        token_index_N=torch.zeros(n, dtype=torch.long),
        expert_index_N=torch.zeros(n, dtype=torch.long),
        weight_N=torch.ones(n),
        experts_per_token_T=ept,
        expert_load_E=torch.tensor(load),
        aux_loss=torch.tensor(aux),
        router_entropy=torch.tensor(entropy),
        num_tokens=int((ept > 0).sum()),
        dropped=dropped,
    )


def test_stats_are_exact_on_hand_built_routing():
    # Layer a, step 1: 4 real tokens (one pad), 2 on two experts -> 6 assignments, loads [3, 1, 2].
    # Layer a, step 2: 2 tokens, 1 on two experts -> 3 assignments, loads [0, 2, 1].
    # Layer b, both steps: 3 tokens each on one expert, loads [1, 1, 1], 2 dropped in step 2.
    step1 = [routing([2, 1, 0, 2, 1], [3, 1, 2], entropy=2.0, aux=0.5), routing([1, 1, 1], [1, 1, 1], 1.5, 0.25)]
    step2 = [routing([1, 2], [0, 2, 1], entropy=1.0, aux=0.3), routing([1, 1, 1], [1, 1, 1], 0.0, 0.75, dropped=2)]
    counts = routing_counts(step1) + routing_counts(step2)
    s = summarize(counts, ["enc.1", "dec.1"])
    assert s["experts/enc.1/two_expert_share"] == pytest.approx(3 / 6)
    assert s["experts/enc.1/experts_per_token"] == pytest.approx(9 / 6)
    assert s["experts/enc.1/load_imbalance"] == pytest.approx(3 / 3)  # loads [3, 3, 3]
    assert s["experts/enc.1/router_entropy"] == pytest.approx(3.0 / 6)
    assert s["experts/enc.1/aux_loss"] == pytest.approx(0.4)
    assert s["experts/dec.1/two_expert_share"] == 0 and s["experts/dec.1/experts_per_token"] == 1
    assert s["experts/dec.1/load_imbalance"] == pytest.approx(1.0)
    assert s["experts/dec.1/dropped"] == 2 and s["experts/dec.1/aux_loss"] == pytest.approx(0.5)
    assert s["experts/model/experts_per_token"] == pytest.approx((9 + 6) / (6 + 6))
    assert loads(counts)[0].tolist() == [3, 3, 3]
    # Tokens on 0, 1, 2, 3 experts; the padding token of step 1 is not one of them.
    assert experts_per_token(counts).tolist() == [[0, 3, 3, 0], [0, 6, 0, 0]]
    unbalanced = summarize(routing_counts(step1), ["enc.1", "dec.1"])
    assert unbalanced["experts/enc.1/load_imbalance"] == pytest.approx(3 / 2)  # loads [3, 1, 2]


def test_experts_per_token_histogram_has_a_bucket_per_count_of_experts():
    written = {}
    experiment = SimpleNamespace(
        add_histogram=lambda *args: None,
        add_histogram_raw=lambda tag, lo, hi, num, total, squares, limits, buckets, step: written.setdefault(
            tag, (lo, hi, num, total, squares, limits, buckets)
        ),
    )
    step = [routing([2, 1, 0, 2, 1], [3, 1, 2], entropy=2.0, aux=0.5)]
    ExpertStats._histograms(experiment, ["enc.1"], routing_counts(step), "_epoch", 7)
    # 4 real tokens: two on 1 expert, two on 2; the padding token is left out.
    lo, hi, num, total, squares, limits, buckets = written["experts/enc.1/experts_per_token_hist_epoch"]
    assert (lo, hi, num, total, squares) == (1, 2, 4, 6, 10)
    assert limits == [0.5, 1.5, 2.5, 3.5] and buckets == [0, 2, 2, 0]


def test_load_heatmap_has_one_labelled_tick_per_expert():
    from types import SimpleNamespace

    figures = {}
    experiment = SimpleNamespace(add_figure=lambda tag, fig, step: figures.setdefault(tag, fig))
    counts = torch.zeros(2, FIELDS + 6 + 7, dtype=torch.float64)
    counts[:, TOKENS], counts[:, TWO_EXPERT] = 10, 3
    counts[:, FIELDS : FIELDS + 6] = torch.arange(12, dtype=torch.float64).view(2, 6)
    ExpertStats()._figures(
        SimpleNamespace(logger=SimpleNamespace(experiment=experiment), global_step=0), ["enc.1", "dec.1"], counts
    )
    ax = figures["experts/load_heatmap"].axes[0]
    assert list(ax.get_xticks()) == list(range(6))
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(e) for e in range(6)]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["enc.1", "dec.1"]
    image = ax.get_images()[0].get_array()
    assert image[1, 5] == pytest.approx(11 / sum(range(6, 12)))  # each row is a layer's share of its assignments


def test_bpe_pieces_merge_into_words():
    pieces = ["<s>", "\u2581the", "\u2581ca", "t", "s", "\u2581sat", "</s>", "<pad>"]
    assert words_of(pieces) == [-1, 0, 1, 1, 1, 2, -1, -1]
    vocab = {i: p for i, p in enumerate(pieces)}
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 5, 2, 3, 6, 7, 7]])
    two = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    seen, twice = count_words(tokens, two, vocab.get)
    assert seen == {"the": 2, "cats": 1, "sat": 2, "cat": 1}
    assert twice == {"cats": 1, "the": 1, "sat": 0, "cat": 0}


def test_forward_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from adamoe.gates import AdaptiveGate
    from adamoe.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    m = Transformer(
        TransformerConfig(16, 2, 32, 2, 2, 4, 2, lambda d, e: AdaptiveGate(d, e, threshold=0.3), dropout=0.0),
        vocab_size=40,
    )
    src, tgt = torch.randint(3, 40, (3, 7)), torch.randint(3, 40, (3, 5))
    with FlopCounterMode(display=False) as counter:
        _, routings = m(src, tgt)
    counted = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counted.items() if "mm" in str(op))
    assignments = sum(r.token_index_N.numel() for r in routings)
    assert m.forward_flops(src.numel(), tgt.numel(), assignments) == matmuls


def test_time_to_target_interpolates_between_validations():
    curve = [
        {"train_s": 10.0, "wall_s": 12.0, "value": 5.0},
        {"train_s": 20.0, "wall_s": 25.0, "value": 3.0},
        {"train_s": 30.0, "wall_s": 40.0, "value": 2.0},
    ]
    assert time_to_target(curve, 4.0) == pytest.approx(15.0)  # halfway from 5 down to 3
    assert time_to_target(curve, 2.5) == pytest.approx(25.0)
    assert time_to_target(curve, 2.5, time="wall_s") == pytest.approx(32.5)
    assert time_to_target(curve, 6.0) == 10.0  # the first validation already had it
    assert time_to_target(curve, 1.0) is None
    assert time_to_target(
        [{"train_s": 1.0, "value": 0.2}, {"train_s": 3.0, "value": 0.6}], 0.5, mode="max"
    ) == pytest.approx(2.5)


def test_timer_stops_fit_at_the_target_and_keeps_the_curve(tmp_path):
    with pytest.raises(ValueError, match="needs a target"):
        EpochTimer(stop_at_target=True)
    train(
        "fit",
        "--config",
        tiny_config(tmp_path),
        "--timer.target",
        100.0,
        "--timer.stop_at_target",
        "true",
        cwd=tmp_path,
    )
    metrics = json.loads((tmp_path / "logs" / "tiny" / "version_0" / "metrics.json").read_text())
    assert metrics["global_step"] == 3  # max_steps is 6, but the first validation (step 3) is below 100
    [point] = metrics["curve"]
    assert point["step"] == 3 and 0 < point["train_s"] < point["wall_s"]
    assert metrics["time_to_target"]["train_s"] == point["train_s"]


# Run in a fresh process: the allocator's settings are the process's, and the test needs glibc's defaults first.
KEEP_FREED = """
import ctypes, torch
from adamoe.memory import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc.mallinfo2.restype = Info
def mapped_and_kept():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(2**24)  # 64 MB
    mapped = libc.mallinfo2().hblkhd - before
    del x
    return mapped >> 20, libc.mallinfo2().fordblks >> 20
print(*mapped_and_kept(), keep_freed_memory(), *mapped_and_kept())
"""


def test_keep_freed_memory_keeps_a_freed_buffer_for_reuse():
    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc" or tuple(map(int, version.split("."))) < (2, 33):
        pytest.skip("needs glibc's mallinfo2")
    out = subprocess.run([sys.executable, "-c", KEEP_FREED], capture_output=True, text=True, check=True).stdout.split()
    mapped_before, kept_before, applied, mapped_after, kept_after = out
    # glibc's default maps a 64 MB buffer and unmaps it when freed; after the call it comes
    # from the heap and stays there.
    assert (int(mapped_before), int(kept_before) < 64) == (64, True)
    assert (applied, int(mapped_after), int(kept_after) >= 64) == ("True", 0, True)


def test_tensorboard_opens_on_charts_that_have_data_and_the_heatmap_follows_its_interval(tmp_path):
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adamoe.callbacks.summary import LAYOUT

    every = "--trainer.callbacks.init_args.heatmap_every_n_steps"
    train(
        "fit",
        "--config",
        tiny_config(tmp_path),
        "--trainer.callbacks+",
        "adamoe.callbacks.ExpertStats",
        every,
        2,
        cwd=tmp_path,
    )
    run = tmp_path / "logs" / "tiny" / "version_0"
    ea = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    assert "custom_scalars__config__" in ea.Tags()["tensors"]
    tags = ea.Tags()["scalars"]
    for group in LAYOUT.values():
        for chart, (_, patterns) in group.items():
            assert any(re.search(p, t) for p in patterns for t in tags), chart  # no empty chart
    # The base config's ExpertStats draws at epoch end; the added one every 2 steps of 6.
    steps = [e.step for e in ea.Images("experts/load_heatmap")]
    assert {2, 4, 6} <= set(steps), steps
