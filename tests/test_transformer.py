import pytest
import torch
import torch.nn.functional as F

from adamoe.gates import AdaptiveGate, Top1Gate, Top2Gate
from adamoe.transformer import Transformer

PAD, BOS, EOS = 0, 1, 2


def toy_batch(n=16, length=7, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (n, length), generator=g)
    src[: n // 2, -2:] = PAD  # some right padding
    tgt = torch.where(src == PAD, PAD, src.flip(1) % (vocab - 3) + 3)
    return src, tgt


def model(gate=lambda d, e: AdaptiveGate(d, e, threshold=0.2), **kw):
    args = dict(vocab_size=20, d_model=32, n_heads=4, d_ff=64, num_encoder_layers=2, num_decoder_layers=2, num_experts=4, dropout=0.0)
    args.update(kw)
    return Transformer(gate=gate, **args)


def test_moe_layers_and_routing_order():
    m = model(num_encoder_layers=4, num_decoder_layers=3)
    assert m.moe_layer_names == ["enc.1", "enc.3", "dec.1"]
    src, tgt = toy_batch()
    logits, routings = m(src, tgt)
    assert logits.shape == (*tgt.shape, 20) and len(routings) == 3
    # Encoder routings see only real source tokens, decoder ones only real target tokens.
    assert routings[0].num_tokens == int(src.ne(PAD).sum()) and routings[2].num_tokens == int(tgt.ne(PAD).sum())
    assert routings[0].two_expert_counts(src.shape[0]).shape == (src.shape[0],)
    assert model(moe_every=0).moe_layers() == []


@pytest.mark.parametrize("gate", [Top1Gate, Top2Gate, lambda d, e: AdaptiveGate(d, e, threshold=0.1)], ids=["top1", "top2", "adaptive"])
def test_trains_a_few_steps(gate):
    torch.manual_seed(0)
    m = model(gate)
    src, tgt = toy_batch()
    tgt_in = F.pad(tgt, (1, 0), value=BOS)[:, :-1]
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits, routings = m(src, tgt_in)
        loss = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=PAD) + sum(r.aux_loss for r in routings)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("beam", [1, 3])
def test_cached_and_uncached_generation_agree(beam):
    torch.manual_seed(0)
    m = model().eval()
    src, _ = toy_batch(n=5)
    cached = m.generate(src, BOS, EOS, max_len=9, beam_size=beam, use_cache=True)
    uncached = m.generate(src, BOS, EOS, max_len=9, beam_size=beam, use_cache=False)
    assert cached.shape[0] == 5
    assert torch.equal(cached, uncached)


def test_beam_of_one_is_greedy_and_pads_after_eos():
    torch.manual_seed(0)
    m = model().eval()
    src, _ = toy_batch(n=4)
    with torch.no_grad():  # make EOS likely so that some sequences finish early
        m.output.weight[EOS] += 0.5 * m.output.weight.abs().mean()
    out = m.generate(src, BOS, EOS, max_len=12)
    # Greedy by hand, without the generator's beam machinery.
    ys = torch.full((4, 1), BOS)
    for _ in range(out.shape[1]):
        logits, _ = m(src, ys)
        ys = torch.cat([ys, logits[:, -1].argmax(-1, keepdim=True)], 1)
    for b in range(4):
        hyp, ref = out[b].tolist(), ys[b, 1:].tolist()
        n = ref.index(EOS) + 1 if EOS in ref else len(ref)
        assert hyp[:n] == ref[:n] and all(t == PAD for t in hyp[n:])
