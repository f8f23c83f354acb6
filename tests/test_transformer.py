import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from adamoe.gates import AdaptiveGate, Top1Gate, Top2Gate
from adamoe.ops import linear_cross_entropy
from adamoe.transformer import Transformer, TransformerConfig

PAD, BOS, EOS = 0, 1, 2


def toy_batch(n=16, length=7, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (n, length), generator=g)
    src[: n // 2, -2:] = PAD  # some right padding
    tgt = torch.where(src == PAD, PAD, src.flip(1) % (vocab - 3) + 3)
    return src, tgt


def model(gate=lambda d, e: AdaptiveGate(d, e, threshold=0.2), vocab_size=20, **kw):
    args = dict(d_model=32, n_heads=4, d_ff=64, num_encoder_layers=2, num_decoder_layers=2, num_experts=4, dropout=0.0)
    args.update(kw)
    return Transformer(TransformerConfig(gate=gate, **args), vocab_size)


def test_moe_layers_and_routing_order():
    m = model(num_encoder_layers=4, num_decoder_layers=3)
    assert m.moe_layer_names == ["enc.1", "enc.3", "dec.1"]
    assert m.moe_layer_sides == ["source", "source", "target"]
    src, tgt = toy_batch()
    logits, routings = m(src, tgt)
    assert logits.shape == (*tgt.shape, 20) and len(routings) == 3
    # Encoder routings see only real source tokens, decoder ones only real target tokens.
    assert routings[0].num_tokens == int(src.ne(PAD).sum()) and routings[2].num_tokens == int(tgt.ne(PAD).sum())
    assert routings[0].two_expert_counts(src.shape[0]).shape == (src.shape[0],)
    assert model(moe_every=0).moe_layers() == []


@pytest.mark.parametrize(
    "gate", [Top1Gate, Top2Gate, lambda d, e: AdaptiveGate(d, e, threshold=0.1)], ids=["top1", "top2", "adaptive"]
)
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


class PrefixTable:
    """A decoder whose next-token logits are random per whole prefix: beam search's
    bookkeeping (reordered rows, finished beams) must carry each prefix to its own row."""

    def __init__(self, V: int, seed: int):
        self.V, self.g, self.table = V, torch.Generator().manual_seed(seed), {}

    def logp(self, prefix: tuple) -> torch.Tensor:
        if prefix not in self.table:
            self.table[prefix] = (3 * torch.randn(self.V, generator=self.g)).log_softmax(-1)
        return self.table[prefix]

    def decode(self, ys, memory=None, src_pad=None, **kwargs):
        logits = torch.zeros(*ys.shape, self.V)
        for i, row in enumerate(ys.tolist()):
            logits[i, -1] = self.logp(tuple(row))
        return logits, []


def exhaustive_best(table: PrefixTable, max_len: int, length_penalty: float) -> list[int]:
    """Every token sequence of up to max_len tokens (ending at the first eos, pad after it),
    scored by its summed log-probability over len ** length_penalty, len counting
    non-pad tokens as beam search does."""
    import itertools

    candidates = {
        seq[: seq.index(EOS) + 1] if EOS in seq else seq for seq in itertools.product(range(table.V), repeat=max_len)
    }
    best, best_score = None, float("-inf")
    for seq in candidates:
        logp = sum(table.logp((BOS, *seq[:t]))[tok].item() for t, tok in enumerate(seq))
        length = max(1, sum(t != PAD for t in seq))
        if logp / length**length_penalty > best_score:
            best, best_score = list(seq), logp / length**length_penalty
    return best + [PAD] * (max_len - len(best))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_wide_enough_equals_exhaustive_search(length_penalty, monkeypatch):
    """With a beam as wide as all V ** L sequences nothing is pruned, so beam search must
    return the exhaustive optimum: this checks the scores, the frozen finished beams and the
    length-normalized final pick."""
    V, L = 5, 3
    m = model(vocab_size=V).eval()
    early = 0
    for seed in range(4):
        table = PrefixTable(V, seed)
        monkeypatch.setattr(m, "decode", table.decode)
        expected = exhaustive_best(table, L, length_penalty)
        early += EOS in expected[:-1]
        with torch.no_grad():
            got = m.generate(
                torch.tensor([[3, 4, 2]]), BOS, EOS, L, beam_size=V**L, length_penalty=length_penalty, use_cache=False
            )[0].tolist()
        assert got + [PAD] * (L - len(got)) == expected, f"seed {seed}"
    if length_penalty == 0.0:
        assert early  # unnormalized scores favour short sequences: finished beams were picked


@pytest.mark.parametrize("temperature,top_k", [(0.7, 0), (1.5, 3)])
def test_sampled_continuation_follows_the_tempered_top_k_distribution(temperature, top_k):
    """4000 continuations of one prompt: the first new token's frequencies match
    softmax(logits / temperature) over the top_k likeliest tokens, computed by hand."""
    torch.manual_seed(0)
    m = model(num_encoder_layers=0, vocab_size=8).eval()
    prompt = torch.tensor([[BOS, 5, 6, 3]])
    n = 4000
    with torch.no_grad():
        logits = m.decode(prompt)[0][0, -1].double()
        got = m.continue_text(
            prompt.repeat(n, 1), EOS, 1, temperature, top_k, generator=torch.Generator().manual_seed(1)
        )[:, 0]
    allowed = logits.topk(top_k).indices if top_k else torch.arange(8)
    p = torch.zeros(8, dtype=torch.float64)
    p[allowed] = (logits[allowed] / temperature).softmax(-1)
    freq = torch.bincount(got, minlength=8).double() / n
    assert (freq[p == 0] == 0).all()  # nothing outside the top k
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-3).all(), (freq, p)


def test_greedy_continuation_takes_the_argmax_each_step():
    torch.manual_seed(1)
    m = model(num_encoder_layers=0, vocab_size=12).eval()
    prompt = torch.tensor([[BOS, 5, 7], [BOS, 9, 4]])
    with torch.no_grad():
        got = m.continue_text(prompt, EOS, 4)
        ys = prompt
        for _ in range(4):
            ys = torch.cat([ys, m.decode(ys)[0][:, -1].argmax(-1, keepdim=True)], 1)
    want = ys[:, 3:]
    for row, w in zip(got.tolist(), want.tolist()):
        cut = w.index(EOS) + 1 if EOS in w else len(w)
        assert row[:cut] == w[:cut] and all(t == PAD for t in row[cut:])


class HostReads(TorchDispatchMode):
    """Records the ops that, on a GPU, need a device value on the host and so wait for the
    device: reading a scalar, counting or selecting by a mask, and bincount (which reads
    its input's range). On the CPU they run the same Python, so the record is the GPU's."""

    OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::bincount", "aten::_unique2"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        by_mask = name == "aten::index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in self.OPS or by_mask:
            self.calls.append("boolean index" if by_mask else name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "gate, per_layer",
    [(Top1Gate, ["aten::nonzero"]), (Top2Gate, ["aten::nonzero"]), (AdaptiveGate, ["aten::nonzero", "boolean index"])],
    ids=["top1", "top2", "adaptive"],
)
def test_training_step_waits_for_the_device_only_where_a_count_depends_on_the_data(gate, per_layer):
    # Per MoE layer: the gate's selection of non-padding tokens and, for adaptive gating, of
    # the two-expert tokens. Dispatch's read of the expert counts is a `.tolist()`, not an op.
    m = model(gate=gate)
    src, tgt = toy_batch()
    tgt_in = F.pad(tgt, (1, 0), value=1)[:, :-1]
    mode = HostReads()
    with mode:
        h, routings = m(src, tgt_in, project=False)
        loss = linear_cross_entropy(h.flatten(0, 1), m.output.weight, tgt.flatten(), ignore_index=PAD)[0]
        (loss + sum(r.aux_loss for r in routings)).backward()
    assert mode.calls == per_layer * len(m.moe_layers())
