"""Expert parallelism over 2 CPU processes (gloo) against one process with the same weights."""

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adamoe.gates import AdaptiveGate, Top1Gate, Top2Gate
from adamoe.moe import MoELayer
from adamoe.parallel import shard_experts
from adamoe.transformer import Transformer, TransformerConfig

GATES = {"top1": Top1Gate, "top2": Top2Gate, "adaptive": lambda d, e: AdaptiveGate(d, e, threshold=0.3)}


def spawn(fn, *args):
    # A file store: no port to find free and then lose to another process before use.
    store = tempfile.NamedTemporaryFile(prefix="adamoe-store-", delete=False).name
    os.unlink(store)
    mp.spawn(_init_and_run, args=(fn, store, *args), nprocs=2, join=True)


def _init_and_run(rank, fn, store_path, *args):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _check_grads(rank, full, sharded, local_experts):
    """Dense gradients summed over ranks equal the full run's; expert shards equal their slice."""
    ref = dict(full.named_parameters())
    for name, p in sharded.named_parameters():
        if name.endswith(("w0_EDF", "w1_EFD")):
            want = ref[name].grad[rank * local_experts : (rank + 1) * local_experts]
            torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=0)
        else:
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            torch.testing.assert_close(
                g, ref[name].grad if ref[name].grad is not None else torch.zeros_like(g), atol=1e-5, rtol=0
            )


def _layer_case(rank, gate_name):
    torch.manual_seed(0)
    D, E = 8, 4
    full = MoELayer(D, 16, E, GATES[gate_name](D, E)).double()
    x = torch.randn(4, 6, D, dtype=torch.float64)
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[1, 4:] = True
    g = torch.randn_like(x)
    x_full = x.clone().requires_grad_()
    y_full, _ = full(x_full, pad)
    (y_full * g).sum().backward()

    sharded = copy.deepcopy(full)
    sharded.zero_grad(set_to_none=True)
    shard_experts(sharded)
    part = slice(2 * rank, 2 * rank + 2)
    x_local = x[part].clone().requires_grad_()
    y_local, routing = sharded(x_local, pad[part])
    (y_local * g[part]).sum().backward()
    torch.testing.assert_close(y_local, y_full[part], atol=1e-5, rtol=0)
    torch.testing.assert_close(x_local.grad, x_full.grad[part], atol=1e-5, rtol=0)
    _check_grads(rank, full, sharded, E // 2)
    received = torch.tensor([sharded.dispatcher.received])
    dist.all_reduce(received)
    assert received.item() == routing.token_index_N.numel() + _other(routing.token_index_N.numel())


def _other(n: int) -> int:
    t = torch.tensor([n])
    dist.all_reduce(t)
    return t.item() - n


def _every_gate(rank, case):
    for gate_name in GATES:
        case(rank, gate_name)


# One pair of processes runs every gate: starting processes costs more than the cases.
def test_expert_parallel_layer_matches_one_process_for_every_gate():
    spawn(_every_gate, _layer_case)


def _model_case(rank, gate_name):
    torch.manual_seed(0)
    full = Transformer(TransformerConfig(16, 2, 32, 2, 2, 4, 2, GATES[gate_name], dropout=0.0), vocab_size=30).double()
    src, tgt = torch.randint(3, 30, (4, 7)), torch.randint(3, 30, (4, 5))
    src[0, 5:] = 0
    logits_full, _ = full(src, tgt)
    g = torch.randn_like(logits_full)
    (logits_full * g).sum().backward()

    sharded = copy.deepcopy(full)
    sharded.zero_grad(set_to_none=True)
    shard_experts(sharded)
    part = slice(2 * rank, 2 * rank + 2)
    logits, _ = sharded(src[part], tgt[part])
    (logits * g[part]).sum().backward()
    torch.testing.assert_close(logits, logits_full[part], atol=1e-5, rtol=0)
    _check_grads(rank, full, sharded, 2)
    # Generation keeps the ranks in step even when one finishes first.
    with torch.no_grad():
        out = sharded.generate(src[part], 1, 2, max_len=4 + 4 * rank)
        ref = full.generate(src[part], 1, 2, max_len=4 + 4 * rank)
    assert torch.equal(out, ref)


def _model_cases_then_bad_split(rank):
    _every_gate(rank, _model_case)
    with pytest.raises(ValueError, match="num_experts \\(3\\) divisible by the 2 ranks"):
        shard_experts(MoELayer(8, 16, 3, Top2Gate(8, 3)))


def test_expert_parallel_model_matches_one_process_for_every_gate_and_experts_must_divide_over_ranks():
    spawn(_model_cases_then_bad_split)
