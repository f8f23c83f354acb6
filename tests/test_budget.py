"""The compute-budget controller: a target mean of experts per token, held by turning a gate's knob."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adamoe.callbacks import Budget
from adamoe.callbacks.budget import step_knob
from adamoe.dynamic_gates import TopPGate
from adamoe.gates import AdaptiveGate, Top1Gate


@pytest.mark.parametrize(
    "make_gate", [lambda: AdaptiveGate(16, 8, threshold=0.9), lambda: TopPGate(16, 8, p=0.9)], ids=["adaptive", "top-p"]
)
def test_the_knob_settles_the_mean_within_0_03_of_the_target_in_150_steps(make_gate):
    """Fixed router and tokens: the mean experts per token is a function of the knob alone."""
    torch.manual_seed(0)
    gate, x = make_gate(), torch.randn(4000, 16)
    with torch.no_grad():
        gate.router.weight.mul_(3.0)  # a router with opinions: one expert dominates many tokens
    knob, means = type(gate).KNOB, []
    for _ in range(150):
        r = gate(x)
        means.append(r.token_index_N.numel() / r.num_tokens)
        setattr(gate, knob, step_knob(getattr(gate, knob), means[-1], 1.25, 0.05, 1e-6, 1.0))
    assert means[0] > 1.5  # it starts far off the target
    assert all(abs(m - 1.25) <= 0.03 for m in means[-30:]), means[-30:]


def layers(*gates):
    return SimpleNamespace(
        net=SimpleNamespace(
            moe_layer_names=[f"enc.{i}" for i in range(len(gates))],
            moe_layers=lambda: [SimpleNamespace(gate=g) for g in gates],
        )
    )


def test_a_resumed_run_continues_from_the_saved_knobs():
    budget = Budget(target=1.25)
    budget.load_state_dict({"knobs": {"enc.0": 0.37, "enc.1": 0.61}})
    a, b = AdaptiveGate(8, 4, threshold=0.1), TopPGate(8, 4, p=0.5)
    budget.on_train_start(None, layers(a, b))
    assert a.threshold == 0.37 and b.p == 0.61 and budget.state_dict() == {"knobs": {"enc.0": 0.37, "enc.1": 0.61}}


def test_a_gate_without_a_knob_is_refused():
    from adamoe.errors import ConfigError

    with pytest.raises(ConfigError, match="Top1Gate in enc.0 has none"):
        Budget().on_train_start(None, layers(Top1Gate(8, 4)))


def _two_ranks_turn_one_knob(rank, store_path, out_path):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # one router on both ranks, whatever the process ran before
        gate = AdaptiveGate(16, 8, threshold=0.5)
        budget = Budget(target=1.25, rate=0.05)
        pl_module = layers(gate)
        budget.on_train_start(None, pl_module)
        torch.manual_seed(rank)  # each rank routes different tokens, and as many as it likes
        # rank 1's larger inputs give a confident router, so its own share differs from rank 0's
        routing = gate((1 + 9 * rank) * torch.randn(100 + 300 * rank, 16))
        pl_module.train_routings, pl_module.device = [routing], torch.device("cpu")
        pl_module.log_dict = lambda *args, **kwargs: None

        def reduce(t, reduce_op):
            dist.all_reduce(t)
            return t

        budget.on_train_batch_end(SimpleNamespace(strategy=SimpleNamespace(reduce=reduce)), pl_module, None, None, 0)
        seen = {"assignments": routing.token_index_N.numel(), "tokens": routing.num_tokens}
        torch.save({"threshold": gate.threshold, **seen}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_set_the_same_knob_from_the_mean_over_all_ranks(tmp_path):
    """Each rank sees its own tokens; the knob follows the mean over both, the same on each."""
    store = tmp_path / "store"
    mp.spawn(_two_ranks_turn_one_knob, args=(str(store), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{rank}") for rank in (0, 1))
    mean = (r0["assignments"] + r1["assignments"]) / (r0["tokens"] + r1["tokens"])
    assert r0["assignments"] / r0["tokens"] != pytest.approx(mean, abs=1e-3)  # a rank's own mean would differ
    assert r0["threshold"] == r1["threshold"] == pytest.approx(step_knob(0.5, mean, 1.25, 0.05, 1e-6, 1.0))
