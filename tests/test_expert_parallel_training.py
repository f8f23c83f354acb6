"""Expert-parallel training steps and checkpoints over 2 CPU processes (gloo), against one
process holding every expert and both ranks' batches. The optimizer has two parameter
groups (no weight decay on norms and biases), as forks often do, so that a position in the
optimizer's state is not a position in `parameters()`."""

import copy
import os
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adamoe.data.batch import collate
from adamoe.tasks import TranslationModule
from adamoe.transformer import TransformerConfig

ARGS = dict(
    vocab_size=40,
    net=TransformerConfig(
        d_model=16, n_heads=2, d_ff=24, num_encoder_layers=2, num_decoder_layers=2, num_experts=4, dropout=0.0
    ),
)
EXPERT = ("w0_EDF", "w1_EFD")


def batches(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    seqs = [torch.randint(4, 40, (int(n),), generator=g).tolist() + [2] for n in torch.randint(3, 9, (5,), generator=g)]
    return collate(list(range(5)), {"src": seqs, "tgt": [s[::-1][1:] + [2] for s in seqs]})


def loss_of(module, batch):
    loss, _, routings = module.step(batch)
    return loss + sum(r.aux_loss for r in routings)


def adamw(module):
    """Decay on matrices only. Listing the no-decay group first puts the expert weights at
    other positions of the optimizer state than in `module.parameters()`."""
    params = list(module.parameters())
    groups = [
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        {"params": [p for p in params if p.dim() >= 2]},
    ]
    return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)


def checkpoint(module, opt):
    """What Lightning does when it saves: the state, then the module's hook (here the only
    trainer service it uses is the list of optimizers)."""
    module._trainer = SimpleNamespace(optimizers=[opt])
    ckpt = {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()]}
    module.on_save_checkpoint(ckpt)
    return ckpt


def shard_of(t, rank):
    return t[rank * 2 : (rank + 1) * 2]


def assert_matches(module, opt, ref, ref_opt, rank):
    """Weights and AdamW moments: dense ones equal, expert ones equal this rank's slice."""
    ref_params = dict(ref.named_parameters())
    ref_state = {n: ref_opt.state[p] for n, p in ref_params.items() if p in ref_opt.state}
    for name, p in module.named_parameters():
        expert = name.endswith(EXPERT)
        want = shard_of(ref_params[name], rank) if expert else ref_params[name]
        torch.testing.assert_close(p, want, atol=1e-10, rtol=0, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            got, exp = opt.state[p][key], ref_state[name][key]
            torch.testing.assert_close(
                got, shard_of(exp, rank) if expert else exp, atol=1e-12, rtol=0, msg=f"{name} {key}"
            )


def _train_save_resume(rank):
    torch.manual_seed(0)
    module = TranslationModule(**ARGS, expert_parallel=True).double()
    ref = copy.deepcopy(module)
    module.configure_model()  # shards every MoE layer and divides expert gradients by W
    opt, ref_opt = adamw(module), adamw(ref)
    for step in range(2):
        loss_of(module, batches(step, rank)).backward()
        for name, p in module.named_parameters():  # what DDP does to every weight it does not ignore
            if not name.endswith(EXPERT) and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= 2
        opt.step()
        opt.zero_grad()
        ((loss_of(ref, batches(step, 0)) + loss_of(ref, batches(step, 1))) / 2).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert_matches(module, opt, ref, ref_opt, rank)

    # W=2 -> 1: the saved checkpoint holds every expert and its optimizer state.
    ckpt = checkpoint(module, opt)
    single = TranslationModule(**ARGS).double()
    single_opt = adamw(single)
    single.load_state_dict(ckpt["state_dict"])
    single_opt.load_state_dict(ckpt["optimizer_states"][0])
    for a, b in zip(single.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(single_opt.state[a][key], ref_opt.state[b][key], atol=1e-12, rtol=0)

    # W=1 -> 2: the one-process checkpoint is sliced back onto each rank, and a third
    # step on both sides still agrees.
    full = copy.deepcopy(checkpoint(ref, ref_opt))
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    resumed = TranslationModule(**ARGS, expert_parallel=True).double()
    resumed.configure_model()
    resumed.on_load_checkpoint(full)
    resumed.load_state_dict(full["state_dict"])
    resumed_opt = adamw(resumed)
    resumed_opt.load_state_dict(full["optimizer_states"][0])
    assert_matches(resumed, resumed_opt, ref, ref_opt, rank)
    loss_of(resumed, batches(2, rank)).backward()
    for name, p in resumed.named_parameters():
        if not name.endswith(EXPERT) and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= 2
    resumed_opt.step()
    ((loss_of(ref, batches(2, 0)) + loss_of(ref, batches(2, 1))) / 2).backward()
    ref_opt.step()
    assert_matches(resumed, resumed_opt, ref, ref_opt, rank)


def _run(rank, store):
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        _train_save_resume(rank)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_adamw_steps_and_checkpoints_match_one_process():
    """Two AdamW steps with the experts spread over 2 ranks equal one process's steps on
    both ranks' batches (this covers the g / W gradient hook); the checkpoint goes from W=2
    to W=1 and from W=1 back to W=2 with weights and optimizer moments element by element."""
    store = tempfile.NamedTemporaryFile(prefix="adamoe-store-", delete=False).name
    os.unlink(store)
    mp.spawn(_run, args=(store,), nprocs=2, join=True)
