import pytest
import torch
import torch.nn.functional as F

from adamoe.dynamic_gates import NullExpertGate, ReLUGate, TopPGate
from adamoe.gates import AdaptiveGate, Top1Gate, Top2Gate
from adamoe.moe import MoELayer

GATES = [
    Top1Gate,
    Top2Gate,
    lambda d, e: AdaptiveGate(d, e, threshold=0.2),
    lambda d, e: TopPGate(d, e, p=0.6),
    lambda d, e: NullExpertGate(d, e, k=2, num_null=3),
    ReLUGate,
]


def naive_moe(layer, x_TD, pad_T, rule):
    """Per-token loop: the gate's scores (a softmax, or ReLU's), pick experts by `rule`, sum weighted expert FFNs."""
    w_g = layer.gate.router.weight
    w0, w1 = layer.experts.w0_EDF, layer.experts.w1_EFD
    out = []
    for t in range(x_TD.shape[0]):
        if pad_T[t]:
            out.append(torch.zeros_like(x_TD[t]))
            continue
        p = layer.gate.scores(x_TD[t] @ w_g.t())
        y = torch.zeros_like(x_TD[t])
        for e, w in rule(p):
            y = y + w * (layer.experts.activation(x_TD[t] @ w0[e]) @ w1[e])
        out.append(y)
    return torch.stack(out)


def rule_for(gate):
    def top2(p):
        v, i = p.topk(2)
        v = v / v.sum()
        return [(i[0], v[0]), (i[1], v[1])]

    def top_p(p):
        chosen, total = [], 0.0
        for e in p.argsort(descending=True):
            if total >= gate.p - 1e-6:
                break
            chosen.append((e, p[e]))
            total += float(p[e])
        return chosen

    def null_experts(p):
        v, i = p.topk(gate.k)
        return [(e, w / v.sum()) for e, w in zip(i, v) if e < gate.num_experts]

    if isinstance(gate, ReLUGate):
        return lambda p: [(e, p[e]) for e in range(len(p)) if p[e] > 0]
    if isinstance(gate, TopPGate):
        return top_p
    if isinstance(gate, NullExpertGate):
        return null_experts
    if isinstance(gate, Top1Gate):
        return lambda p: [(p.argmax(), p.max())]
    if isinstance(gate, Top2Gate):
        return top2
    return lambda p: top2(p) if (lambda v: (v[0] - v[1]) / v.sum())(p.topk(2).values) <= gate.threshold else top2(p)[:1]


@pytest.mark.parametrize(
    ("make_gate", "activation"),
    [*((g, "relu") for g in GATES), (Top2Gate, "gelu")],
    ids=["top1", "top2", "adaptive", "top-p", "null-experts", "relu", "top2-gelu"],
)
def test_matches_naive_loop_with_padding_and_empty_experts(make_gate, activation):
    torch.manual_seed(0)
    D, E, B, S = 6, 5, 3, 7
    layer = MoELayer(D, 10, E, make_gate(D, E), activation).double()
    x = torch.randn(B, S, D, dtype=torch.float64)
    x[..., 0] = 1.0
    x.requires_grad_()
    with torch.no_grad():  # feature 0 is constant: this makes expert 4 unreachable, an empty expert
        layer.gate.router.weight[4] = 0.0
        layer.gate.router.weight[4, 0] = -100.0
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 3:] = True
    y, routing = layer(x, pad)
    assert routing.expert_load_E[4] == 0
    params = [x, layer.gate.router.weight, layer.experts.w0_EDF, layer.experts.w1_EFD]
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum() + routing.aux_loss * 0, params)

    ref = naive_moe(layer, x.view(-1, D), pad.view(-1), rule_for(layer.gate)).view(B, S, D)
    ref_grads = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=1e-5, rtol=0)
    assert grads[2][4].abs().max() == 0  # the empty expert gets an exact zero gradient


@pytest.mark.parametrize("make_gate", GATES, ids=["top1", "top2", "adaptive", "top-p", "null-experts", "relu"])
def test_permuting_tokens_permutes_outputs(make_gate):
    torch.manual_seed(1)
    layer = MoELayer(8, 16, 4, make_gate(8, 4)).double()
    x = torch.randn(1, 20, 8, dtype=torch.float64)
    perm = torch.randperm(20)
    y, _ = layer(x)
    y_perm, _ = layer(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm])


def test_padding_content_changes_nothing_else():
    torch.manual_seed(2)
    layer = MoELayer(8, 16, 4, AdaptiveGate(8, 4, threshold=0.3)).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    y1, r1 = layer(x, pad)
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), 8, dtype=torch.float64) * 100
    y2, r2 = layer(x2, pad)
    torch.testing.assert_close(y1, y2)
    assert y1[pad].abs().max() == 0
    assert r1.aux_loss.item() == pytest.approx(r2.aux_loss.item())
    assert r1.expert_load_E.tolist() == r2.expert_load_E.tolist()


def test_one_expert_tokens_cost_one_expert():
    torch.manual_seed(3)
    layer = MoELayer(8, 16, 4, AdaptiveGate(8, 4, threshold=0.0))
    _, r = layer(torch.randn(2, 10, 8))
    assert r.token_index_N.numel() == 20 == r.expert_load_E.sum()


def test_capacity_keeps_first_choices_first_and_drops_the_rest():
    """Against a per-token loop: all first choices in token order, then all second choices,
    each expert taking the first ceil(0.5 * 64 / 4) = 8 assignments it is offered."""
    torch.manual_seed(4)
    D, E, T = 8, 4, 32
    layer = MoELayer(D, 16, E, Top2Gate(D, E), capacity_factor=0.5).double()
    x = torch.randn(1, T, D, dtype=torch.float64)
    y, r = layer(x)
    w0, w1 = layer.experts.w0_EDF, layer.experts.w1_EFD
    v, i = torch.softmax(x[0] @ layer.gate.router.weight.t(), -1).topk(2, -1)
    v = v / v.sum(-1, keepdim=True)
    taken, ref = [0] * E, torch.zeros(T, D, dtype=torch.float64)
    for choice in (0, 1):
        for t in range(T):
            e = int(i[t, choice])
            if taken[e] < 8:
                taken[e] += 1
                ref[t] += v[t, choice] * (F.relu(x[0, t] @ w0[e]) @ w1[e])
    assert r.expert_load_E.tolist() == taken and r.dropped == 2 * T - sum(taken) > 0
    torch.testing.assert_close(y[0], ref)


def test_rejects_mismatched_gate_and_bad_capacity():
    with pytest.raises(ValueError, match="experts"):
        MoELayer(8, 16, 4, Top2Gate(8, 3))
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(8, 16, 4, Top2Gate(8, 4), capacity_factor=0)


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    """Same routing (the router stays fp32), and outputs and gradients within 2% relative
    error in norm: bf16 keeps 8 bits of mantissa, about 0.4% per rounding."""
    torch.manual_seed(5)
    layer = MoELayer(32, 64, 4, Top2Gate(32, 4))
    x = torch.randn(2, 9, 32)
    x32 = x.clone().requires_grad_()
    y32, r32 = layer(x32)
    y32.sum().backward()
    g32 = [x32.grad, layer.experts.w0_EDF.grad.clone()]
    layer.zero_grad()
    x16 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, r16 = layer(x16)
    y16.float().sum().backward()
    assert torch.equal(r16.expert_index_N, r32.expert_index_N) and r16.weight_N.dtype == torch.float32
    assert not torch.equal(y16.float(), y32)  # the experts did compute in bf16
    assert layer.experts.w0_EDF.grad.dtype == torch.float32
    for a, b in zip([y16.float(), x16.grad, layer.experts.w0_EDF.grad], [y32, *g32]):
        assert ((a - b).norm() / b.norm()).item() < 0.02


def test_padded_expert_groups_change_nothing():
    """bf16 on CPU pads each expert's group to a multiple of `Experts.row_bucket` with
    weight-0 rows: outputs and every gradient must be those of the unpadded groups."""
    from adamoe.moe import _ExpertFFN, _pad_groups

    token = torch.tensor([4, 0, 2, 1, 3, 0, 2, 4])
    counts = [3, 0, 5]
    weight = torch.rand(8, dtype=torch.float64)
    token_P, weight_P, padded = _pad_groups(token, weight, counts, 4)
    assert padded == [4, 0, 8]
    assert token_P.tolist() == [4, 0, 2, 0, 1, 3, 0, 2, 4, 0, 0, 0]
    assert weight_P[[3, 9, 10, 11]].abs().sum() == 0 and torch.equal(weight_P[[0, 1, 2, 4, 5, 6, 7, 8]], weight)

    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(3, 6, 7, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    weight.requires_grad_()
    g = torch.randn(5, 6, dtype=torch.float64)
    outs = []
    for bucket in (1, 4):
        tok, wt, cnt = _pad_groups(token, weight, counts, bucket) if bucket > 1 else (token, weight, counts)
        y = _ExpertFFN.apply(x, tok, wt, w0, w1, cnt, F.relu)
        outs.append((y, *torch.autograd.grad((y * g).sum(), [x, weight, w0, w1])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
