import math

import numpy as np
import pytest
import torch
from helpers import tiny_config, train

from adamoe.data.sampler import ShardedBatchSampler, curriculum_order, spearman


def cosine(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def reference_order(two, tokens):
    """The paper's rule written out plainly, with the documented zero-vector convention."""
    known = [i for i in range(len(two)) if sum(tokens[i]) > 0]
    C = {i: [t / n if n else 0.0 for t, n in zip(two[i], tokens[i])] for i in known}
    anchor = min(known, key=lambda i: (sum(two[i]), i))
    share = {i: sum(two[i]) / sum(tokens[i]) for i in known}
    return sorted(known, key=lambda i: (-cosine(C[i], C[anchor]), share[i], i))


def test_order_on_a_hand_built_table():
    #            two-expert tokens per layer, tokens per layer
    two = [[2, 0], [1, 1], [0, 1], [4, 0], [0, 0], [3, 3]]
    tokens = [[4, 4], [4, 4], [2, 2], [8, 8], [0, 0], [6, 6]]
    # Anchor: sample 2 (fewest two-expert tokens among those with statistics, 1).
    # C: s0 (.5, 0), s1 (.25, .25), s2 (0, .5), s3 (.5, 0), s5 (.5, .5); anchor C = (0, .5).
    # Cosine to the anchor: s2 1, s1 .707, s5 .707, s0 0, s3 0; ties by share: s1 .25 < s5 .5,
    # s0 .25 == s3 .25 -> by index. Sample 4 has no statistics: last.
    g = torch.Generator().manual_seed(0)
    order = curriculum_order(
        torch.tensor(two, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64), g
    ).tolist()
    assert order == [2, 1, 5, 0, 3, 4]
    assert order[:-1] == reference_order(two, tokens)
    rev = curriculum_order(
        torch.tensor(two, dtype=torch.int32), torch.tensor(tokens, dtype=torch.int32), g, reverse=True
    ).tolist()
    assert rev == [3, 0, 5, 1, 2, 4]


def test_order_with_a_zero_anchor_runs_from_simple_to_complex():
    torch.manual_seed(0)
    tokens = torch.randint(3, 12, (50, 3)).double()
    two = (torch.rand(50, 3) * tokens * 0.6).floor()
    two[[7, 19]] = 0
    order = curriculum_order(two, tokens, torch.Generator().manual_seed(0)).tolist()
    assert order == reference_order(two.tolist(), tokens.tolist())
    assert set(order[:2]) == {7, 19}


def test_spearman_with_ties():
    assert spearman(torch.arange(5.0), torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])) == pytest.approx(
        0.9746794
    )  # scipy's value
    assert spearman(torch.arange(4.0), torch.tensor([4.0, 3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def sampler(rank=0, order="paper", world=1, pool=0):
    lengths = [(i * 5) % 11 + 2 for i in range(60)]
    return ShardedBatchSampler(lengths, max_tokens=30, order=order, seed=4, num_replicas=world, rank=rank, pool=pool)


def feed_epoch(samplers, seed=0):
    """Record made-up routing for every batch of the epoch, then end it."""
    g = torch.Generator().manual_seed(seed)
    for s in samplers:
        for batch in s:
            idx = torch.tensor(batch)
            tokens = torch.tensor([[s.lengths[i]] * 2 for i in batch], dtype=torch.float64)
            s.record(idx, (tokens * torch.rand(tokens.shape, generator=g)).floor(), tokens)
    parts = [(s.epoch_two_NL.clone(), s.epoch_tokens_NL.clone()) for s in samplers]
    total = [sum(p[k] for p in parts) for k in (0, 1)]
    for s in samplers:
        it = iter(total)
        s.end_epoch(lambda t, it=it: next(it).clone())
    return total


def test_two_ranks_compute_the_same_order_and_see_every_sample_once():
    ranks = [sampler(r, world=2) for r in range(2)]
    feed_epoch(ranks)  # epoch 0: random order
    for s in ranks:
        s.set_epoch(1)
    assert ranks[0].global_batches() == ranks[1].global_batches()
    two, tokens = ranks[0].two_NL, ranks[0].tokens_NL
    flat = [i for b in ranks[0].global_batches() for i in b.tolist()]
    assert (
        flat == curriculum_order(two, tokens, torch.Generator()).tolist()
    )  # batches are consecutive runs of the order
    seen = sorted(i for s in ranks for b in s for i in b)
    assert seen == list(range(60))
    total = feed_epoch(ranks, seed=1)
    assert torch.equal(total[1][:, 0], torch.tensor([int(n) for n in ranks[0].lengths], dtype=torch.int32))  # once each


def test_pooled_order_sorts_each_pool_of_the_curriculum_by_length():
    plain, pooled = sampler(), sampler(pool=16)
    feed_epoch([plain, pooled])
    plain.set_epoch(1)
    pooled.set_epoch(1)
    order = plain.global_batches().order.tolist()
    flat = pooled.global_batches().order.tolist()
    for start in range(0, 60, 16):
        expected = order[start : start + 16]
        got = flat[start : start + 16]
        assert sorted(got) == sorted(expected)  # the same samples in each pool
        assert [pooled.lengths[i] for i in got] == sorted(pooled.lengths[i] for i in expected)
    assert len(pooled) < len(plain)  # sorting by length packs tighter


def test_resuming_mid_epoch_continues_the_same_order():
    full = sampler()
    feed_epoch([full])
    full.set_epoch(1)
    expected = list(full)
    run = sampler()
    feed_epoch([run])
    run.set_epoch(1)
    it = iter(run)
    for _ in range(3):
        next(it)
        run.consumed += 1
    state = run.state_dict()
    resumed = sampler()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # Lightning sets the same epoch again on resume
    assert list(resumed) == expected[3:]
    assert all(isinstance(v, (int, str, torch.Tensor)) for v in state.values())


def test_resume_mid_epoch_through_train_py_counts_every_sample_once_as_a_recount_does(tmp_path):
    """Stopped mid-epoch and resumed, the epoch's recorded two-expert and token counts per
    sample and MoE layer equal a recount by forward passes over the same batches (lr 1e-30,
    too small to change a weight, and no dropout keep the weights and routing of every step
    those of the checkpoint)."""
    cfg = tiny_config(tmp_path)
    common = [
        "--config",
        cfg,
        "--data.curriculum",
        "paper",
        "--trainer.max_epochs",
        1,
        "--trainer.max_steps",
        -1,
        "--model.optimizer.lr",
        1e-30,
        "--model.net.dropout",
        0.0,
    ]
    train("fit", *common, "--trainer.max_steps", 3, cwd=tmp_path)  # stops mid-epoch, after a checkpoint at step 3
    ckpt = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["TranslationData"]["train_sampler"]
    assert state["consumed"] == 3 and state["epoch"] == 0
    train(
        "fit", *common, "--ckpt_path", "last", "--trainer.val_check_interval", 1.0, cwd=tmp_path
    )  # last checkpoint at epoch end
    final = torch.load(ckpt, weights_only=True)
    table = final["TranslationData"]["train_sampler"]
    assert final["global_step"] > 3
    from adamoe.data import SyntheticTranslation, TranslationData
    from adamoe.data.batch import collate
    from adamoe.tasks import TranslationModule

    dm = TranslationData(
        SyntheticTranslation(200, 16, 12),
        vocab_size=300,
        max_tokens=400,
        cache_dir=str(tmp_path / "cache"),
        curriculum="paper",
    )
    dm.setup("fit")
    ds = dm.splits["train"]
    model = TranslationModule.load_from_checkpoint(ckpt).train()
    two, tokens = torch.zeros(200, 2, dtype=torch.float64), torch.zeros(200, 2, dtype=torch.float64)
    with torch.no_grad():
        for b in dm.train_sampler.global_batches():  # epoch 0's batches, as trained
            batch = collate(b, ds.gather(b, ["src", "tgt"]))
            _, (enc, dec) = model(batch)
            two[b] = torch.stack([enc.two_expert_counts(len(b)), dec.two_expert_counts(len(b))], 1).double()
            tokens[b] = torch.stack([(~batch["src_pad"]).sum(1), (~batch["tgt_pad"]).sum(1)], 1).double()
    two, tokens = two.int(), tokens.int()  # the sampler counts in int32
    # The last checkpoint may come before or after the epoch's counts become the table.
    ended = table["epoch_tokens_NL"].sum() == 0
    counted_two, counted_tokens = (
        (table["two_NL"], table["tokens_NL"]) if ended else (table["epoch_two_NL"], table["epoch_tokens_NL"])
    )
    assert torch.equal(counted_tokens, tokens) and torch.equal(counted_two, two)
    assert two.sum() > 0 and (two < tokens).any()  # some tokens took two experts, not all


def test_validation_follows_each_epoch_whatever_its_number_of_batches(tmp_path):
    from helpers import scalars

    from adamoe.data import SyntheticTranslation, TranslationData

    cfg = tiny_config(tmp_path)
    train(
        "fit",
        "--config",
        cfg,
        "--data.curriculum",
        "random",
        "--trainer.max_epochs",
        3,
        "--trainer.max_steps",
        -1,
        "--trainer.val_check_interval",
        1.0,
        cwd=tmp_path,
    )
    dm = TranslationData(
        SyntheticTranslation(200, 16, 12),
        vocab_size=300,
        max_tokens=400,
        cache_dir=str(tmp_path / "cache"),
        curriculum="random",
    )
    dm.setup("fit")
    ends, step = [], 0
    for epoch in range(3):
        dm.train_sampler.set_epoch(epoch)
        step += len(dm.train_sampler)
        ends.append(step)
    assert len(set(b - a for a, b in zip([0] + ends, ends))) > 1  # the epochs really differ in length
    # Lightning logs epoch-end validation at the last training batch's step, counted from 0.
    assert [s + 1 for s, _ in scalars(tmp_path / "logs" / "tiny" / "version_0")["val/loss"]] == ends


def test_shuffled_batches_are_the_same_batches_in_another_order():
    lengths = np.random.default_rng(0).integers(3, 40, 500)
    plain = ShardedBatchSampler(lengths, max_tokens=200, order="random", seed=1, pool=64)
    shuffled = ShardedBatchSampler(lengths, max_tokens=200, order="random", seed=1, pool=64, shuffle_batches=True)
    a, b = [tuple(x) for x in plain], [tuple(x) for x in shuffled]
    assert sorted(a) == sorted(b) and a != b
