import math

import pytest
import torch
import torch.nn.functional as F

from adamoe.data.batch import collate
from adamoe.gates import AdaptiveGate, Top1Gate
from adamoe.schedulers import WarmupInverseSqrt
from adamoe.tasks import TranslationModule
from adamoe.transformer import TransformerConfig


def tiny_module(**kw):
    net = dict(d_model=16, n_heads=2, d_ff=32, num_encoder_layers=2, num_decoder_layers=2, num_experts=4, dropout=0.0)
    net |= {k: kw.pop(k) for k in list(kw) if k in net or k == "gate"}
    return TranslationModule(net=TransformerConfig(**net), vocab_size=50, **kw)


def batch():
    g = torch.Generator().manual_seed(0)
    src = [torch.randint(4, 50, (n,), generator=g).tolist() + [2] for n in (5, 7, 3)]
    return collate([0, 1, 2], {"src": src, "tgt": src, "target": ["a", "b", "c"]})


def test_inference_gate_routes_with_the_trained_routers():
    torch.manual_seed(0)
    m = tiny_module(gate=lambda d, e: AdaptiveGate(d, e, threshold=1.0), inference_gate=Top1Gate)
    keys = set(m.state_dict())
    b = batch()
    _, train_routings = m(b)
    with m._inference():
        _, eval_routings = m(b)
    _, again = m(b)
    assert all(r.experts_per_token_T.max() == 2 for r in train_routings)
    assert all(r.experts_per_token_T.max() == 1 for r in eval_routings)
    assert all(r.experts_per_token_T.max() == 2 for r in again)  # the trained gates are back
    # Top-1 picks the trained router's first choice.
    for t, e in zip(train_routings, eval_routings):
        first = t.expert_index_N[: t.num_tokens]
        assert torch.equal(e.expert_index_N, first)
    assert set(m.state_dict()) == keys  # no second copy of any router


def test_loss_includes_aux_and_ignores_padding():
    m = tiny_module(label_smoothing=0.0)
    b = batch()
    smoothed, nll, routings = m._losses(b)
    ntokens = int((~b["tgt_pad"]).sum())
    assert smoothed.item() == pytest.approx(nll.item())
    aux = sum(r.aux_loss for r in routings)
    assert aux > 0 and m.training_step(b, 0).item() == pytest.approx((nll + aux).item())
    # Padding changes nothing: the batch's loss is the token-weighted mean of each
    # sequence's loss computed alone, without padding.
    total = 0.0
    for i in range(3):
        n = int((~b["tgt_pad"][i]).sum())
        alone = {
            k: v[i : i + 1, :n] if k in ("tgt_in", "tgt_out", "tgt_pad") else v[i : i + 1]
            for k, v in b.items()
            if torch.is_tensor(v)
        }
        m_src = int((~b["src_pad"][i]).sum())
        alone.update(src=alone["src"][:, :m_src], src_pad=alone["src_pad"][:, :m_src])
        total += m._losses(alone)[1].item() * n
    assert nll.item() == pytest.approx(total / ntokens, rel=1e-5)


def test_warmup_inverse_sqrt_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupInverseSqrt(opt, warmup_steps=4)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[15] == pytest.approx((4 / 16) ** 0.5)


def test_warmup_cosine_schedule():
    from adamoe.schedulers import WarmupCosine

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosine(opt, total_steps=12, warmup_steps=2, min_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2] == pytest.approx(1.0) and lrs[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lrs[12] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.1)


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_classification_pools_the_first_state_or_the_mean_of_real_ones(pooling):
    from adamoe.tasks import ClassificationModule

    torch.manual_seed(0)
    net = TransformerConfig(
        d_model=16, n_heads=2, d_ff=32, num_encoder_layers=2, num_decoder_layers=0, num_experts=4, dropout=0.0
    )
    m = ClassificationModule(net=net, vocab_size=50, pooling=pooling)
    b = batch()
    logits, _ = m(b)
    states, _ = m.net.encode(b["src"], b["src_pad"])
    for i in range(3):
        n = int((~b["src_pad"][i]).sum())
        pooled = states[i, 0] if pooling == "first" else states[i, :n].mean(0)
        torch.testing.assert_close(logits[i], m.head(pooled))


def test_translation_losses_are_those_of_the_projected_logits():
    """The step fuses the output projection into the loss: it must equal the
    cross-entropies of the logits the model returns, padding left out."""
    torch.manual_seed(0)
    m = tiny_module(label_smoothing=0.2)
    b = batch()
    assert b["tgt_pad"].any()  # the batch has padding to leave out
    smoothed, logged, _ = m.step(b)
    logits, _ = m(b)
    flat, target = logits.flatten(0, 1), b["tgt_out"].flatten()
    torch.testing.assert_close(
        smoothed, F.cross_entropy(flat, target, ignore_index=m.hparams.pad_id, label_smoothing=0.2)
    )
    torch.testing.assert_close(logged["nll"], F.cross_entropy(flat, target, ignore_index=m.hparams.pad_id))


def test_a_schedule_in_shares_of_the_run_follows_the_trainers_limits(tmp_path):
    import yaml
    from helpers import ROOT, scalars, tiny_config, train

    cosine = "{class_path: adamoe.schedulers.WarmupCosine, init_args: {warmup_steps: 0.25, min_ratio: 0.0}}"
    train(
        "fit",
        "--config",
        tiny_config(tmp_path),
        "--trainer.max_steps",
        8,
        "--model.init_args.lr_scheduler",
        cosine,
        cwd=tmp_path,
    )
    lrs = [v for _, v in scalars(tmp_path / "logs" / "tiny" / "version_0")["lr-AdamW"]]
    peak = yaml.safe_load((ROOT / "configs" / "optim" / "adamw.yaml").read_text())["init_args"]["lr"]
    # 8 steps: a warmup of 2, then a cosine toward 0 over the other 6.
    expected = [peak * r for r in (0.5, 1.0, *(0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)))]
    assert lrs == pytest.approx(expected, rel=1e-5)


def test_a_run_limited_by_time_is_as_long_as_its_first_steps_pace_allows():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from adamoe.schedulers import WarmupInverseSqrt, estimate_length

    class Clock(Timer):
        def time_elapsed(self, stage="train"):
            return 10.0

        def time_remaining(self, stage="train"):
            return 40.0

    timed = SimpleNamespace(estimated_stepping_batches=float("inf"), callbacks=[Clock(duration="00:00:00:50")])
    assert estimate_length(timed, 20) == 20 + 80  # 0.5 s a step, 40 s left
    assert (
        estimate_length(SimpleNamespace(estimated_stepping_batches=60, callbacks=timed.callbacks), 20) == 60
    )  # steps end it first
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupInverseSqrt(opt, warmup_steps=0.1)
    sched.total_steps = 100
    again = WarmupInverseSqrt(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup_steps=0.1)
    again.load_state_dict(sched.state_dict())  # a resumed run keeps the estimate
    assert again.total_steps == 100 and again.warmup() == 10
