import math

import pytest
import torch

from adamoe.gates import AdaptiveGate, Top1Gate, Top2Gate


def gate_with_logits(cls, logits_TE, **kwargs):
    """A gate whose router maps the identity input x = I_T-rows onto the given logits."""
    T, E = logits_TE.shape
    gate = cls(T, E, **kwargs)
    with torch.no_grad():
        gate.router.weight.copy_(logits_TE.t())
    return gate, torch.eye(T)


# Softmax probabilities worked out by hand for three experts:
#   token 0: logits (ln 6, ln 3, 0)    -> p = (0.6, 0.3, 0.1); p1' = 2/3, p2' = 1/3, gap 1/3
#   token 1: logits (0, ln 4.5, ln 4.5) -> p = (0.1, 0.45, 0.45); gap 0 (a tie)
#   token 2: logits (ln 5, 0, ln 4)    -> p = (0.5, 0.1, 0.4); p1' = 5/9, p2' = 4/9, gap 1/9
LOGITS = torch.tensor(
    [[math.log(6), math.log(3), 0.0], [0.0, math.log(4.5), math.log(4.5)], [math.log(5), 0.0, math.log(4)]]
)


def assignments(r):
    return sorted(zip(r.token_index_N.tolist(), r.expert_index_N.tolist(), [round(w, 6) for w in r.weight_N.tolist()]))


def test_top1_picks_argmax_with_raw_probability():
    gate, x = gate_with_logits(Top1Gate, LOGITS, aux_loss_coef=0.0)
    r = gate(x)
    got = {t: (e, w) for t, e, w in assignments(r)}
    assert got[0] == (0, 0.6) and got[2] == (0, 0.5)
    assert got[1][0] in (1, 2) and got[1][1] == 0.45
    assert r.experts_per_token_T.tolist() == [1, 1, 1]


def test_top2_normalizes_the_two_weights():
    gate, x = gate_with_logits(Top2Gate, LOGITS, aux_loss_coef=0.0)
    r = gate(x)
    a = assignments(r)
    assert (0, 0, round(2 / 3, 6)) in a and (0, 1, round(1 / 3, 6)) in a
    assert (2, 0, round(5 / 9, 6)) in a and (2, 2, round(4 / 9, 6)) in a
    assert sorted(e for t, e, _ in a if t == 1) == [1, 2]
    assert r.experts_per_token_T.tolist() == [2, 2, 2]
    assert r.expert_load_E.tolist() == [2, 2, 2]


@pytest.mark.parametrize(
    "threshold,two",
    [(0.0, [False, True, False]), (0.1, [False, True, False]), (0.12, [False, True, True]), (1.0, [True, True, True])],
)
def test_adaptive_takes_two_experts_where_the_gap_is_small(threshold, two):
    gate, x = gate_with_logits(AdaptiveGate, LOGITS, threshold=threshold, aux_loss_coef=0.0)
    r = gate(x)
    assert r.experts_per_token_T.tolist() == [2 if t else 1 for t in two]
    a = assignments(r)
    # A one-expert token keeps its normalized weight p1' (the documented default).
    if not two[0]:
        assert [(e, w) for t, e, w in a if t == 0] == [(0, round(2 / 3, 6))]
    if two[2]:
        assert [(e, w) for t, e, w in a if t == 2] == [(0, round(5 / 9, 6)), (2, round(4 / 9, 6))]


def test_adaptive_single_weight_options():
    gate, x = gate_with_logits(AdaptiveGate, LOGITS, threshold=0.1, single_weight="one", aux_loss_coef=0.0)
    assert [w for t, e, w in assignments(gate(x)) if t == 0] == [1.0]
    gate, x = gate_with_logits(AdaptiveGate, LOGITS, threshold=0.1, single_weight="raw", aux_loss_coef=0.0)
    assert [w for t, e, w in assignments(gate(x)) if t == 0] == [0.6]


def test_adaptive_threshold_one_routes_like_top2():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    top2, adaptive = Top2Gate(16, 8), AdaptiveGate(16, 8, threshold=1.0)
    adaptive.load_state_dict(top2.state_dict())
    assert assignments(top2(x)) == assignments(adaptive(x))


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_adaptive_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveGate(4, 4, threshold=threshold)


def test_aux_loss_matches_eq4_by_hand():
    gate, x = gate_with_logits(Top2Gate, LOGITS, aux_loss_coef=0.5)
    # First choices: token 0 -> e0, token 1 -> e1 (topk tie order), token 2 -> e0.
    first = gate(x).token_index_N.new_tensor([0, 1, 0])
    f = torch.bincount(first, minlength=3).float() / 3
    p = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.45, 0.45], [0.5, 0.1, 0.4]]).mean(0)
    assert gate(x).aux_loss.item() == pytest.approx(0.5 * 3 * (f * p).sum().item(), rel=1e-5)
    # 2/3 * (0.4) + 1/3 * (0.2833) ... written out: 3 * (2/3*0.4 + 1/3*0.2833) * 0.5
    assert gate(x).aux_loss.item() == pytest.approx(0.5 * 3 * (2 / 3 * 0.4 + 1 / 3 * (0.85 / 3)), rel=1e-5)


def test_z_loss_adds_squared_logsumexp():
    gate, x = gate_with_logits(Top1Gate, LOGITS, aux_loss_coef=0.0, z_loss_coef=0.1)
    z = torch.logsumexp(LOGITS, -1).square().mean() * 0.1
    assert gate(x).aux_loss.item() == pytest.approx(z.item(), rel=1e-5)


def test_padding_is_excluded_from_routing_counts_and_loss():
    torch.manual_seed(0)
    gate = AdaptiveGate(8, 4, threshold=0.3, z_loss_coef=0.01)
    x = torch.randn(10, 8)
    pad = torch.zeros(10, dtype=torch.bool)
    pad[[2, 7, 9]] = True
    r = gate(x, pad)
    ref = gate(x[~pad])
    assert r.experts_per_token_T[pad].tolist() == [0, 0, 0]
    assert r.experts_per_token_T[~pad].tolist() == ref.experts_per_token_T.tolist()
    assert not set(r.token_index_N.tolist()) & {2, 7, 9}
    assert r.expert_load_E.tolist() == ref.expert_load_E.tolist()
    assert r.aux_loss.item() == pytest.approx(ref.aux_loss.item())
    assert r.num_tokens == 7


def test_softmax_runs_in_float32_under_autocast():
    gate = Top2Gate(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = gate(torch.randn(5, 8))
    assert r.weight_N.dtype == torch.float32


def test_capacity_drops_second_choices_first():
    gate, x = gate_with_logits(Top2Gate, LOGITS, aux_loss_coef=0.0)
    r = gate(x).with_capacity(1)
    # First choices: e0 (t0), e1 (t1), e0 (t2); e0 overflows with t2; seconds e1 (t0), e2 (t1), e2 (t2).
    assert r.dropped == 6 - r.expert_load_E.sum().item()
    assert r.expert_load_E.tolist() == [1, 1, 1]
    kept = assignments(r)
    assert (0, 0, round(2 / 3, 6)) in kept and (1, 1, 0.5) in kept


@pytest.mark.parametrize(
    ("p", "max_experts", "want"),
    [
        # token 0 reaches 0.5 at its first expert; token 2's first expert is exactly 0.5 (a
        # tie at p); token 1 needs both 0.45s.
        (0.5, None, {0: {0: 0.6}, 1: {1: 0.45, 2: 0.45}, 2: {0: 0.5}}),
        # Every token reaches 0.9 with two experts exactly: the third is not taken.
        (0.9, None, {0: {0: 0.6, 1: 0.3}, 1: {1: 0.45, 2: 0.45}, 2: {0: 0.5, 2: 0.4}}),
        (
            1.0,
            None,
            {
                t: {e: round(p, 6) for e, p in enumerate(row)}
                for t, row in enumerate([(0.6, 0.3, 0.1), (0.1, 0.45, 0.45), (0.5, 0.1, 0.4)])
            },
        ),
        (1.0, 1, {0: {0: 0.6}, 1: {1: 0.45}, 2: {0: 0.5}}),  # capped: top-1 with the raw probability
    ],
)
def test_top_p_takes_the_fewest_experts_that_reach_p(p, max_experts, want):
    from adamoe.dynamic_gates import TopPGate

    gate, x = gate_with_logits(TopPGate, LOGITS, p=p, max_experts=max_experts, aux_loss_coef=0.0)
    r = gate(x)
    got = {}
    for t, e, w in assignments(r):
        got.setdefault(t, {})[e] = w
    if max_experts == 1:  # token 1's two experts tie: either may be first
        assert got[1] in ({1: 0.45}, {2: 0.45})
        got[1] = want[1]
    assert got == want
    assert r.experts_per_token_T.tolist() == [len(want[t]) for t in range(3)]
    assert r.token_index_N[:3].tolist() == [0, 1, 2]  # every first choice before any second one


def test_top_p_dynamic_loss_is_the_mean_router_entropy():
    from adamoe.dynamic_gates import TopPGate

    gate, x = gate_with_logits(TopPGate, LOGITS, p=0.5, aux_loss_coef=0.0, dynamic_loss_coef=0.1)
    rows = [(0.6, 0.3, 0.1), (0.1, 0.45, 0.45), (0.5, 0.1, 0.4)]
    entropy = sum(-sum(q * math.log(q) for q in row) for row in rows) / 3
    assert gate(x).aux_loss.item() == pytest.approx(0.1 * entropy, rel=1e-5)


@pytest.mark.parametrize(("p", "max_experts"), [(0.0, None), (1.5, None), (0.5, 0), (0.5, 4)])
def test_top_p_rejects_bad_settings(p, max_experts):
    from adamoe.dynamic_gates import TopPGate
    from adamoe.errors import ConfigError

    with pytest.raises(ConfigError, match="TopPGate"):
        TopPGate(4, 3, p=p, max_experts=max_experts)


def test_null_experts_send_tokens_to_fewer_real_experts():
    from adamoe.dynamic_gates import NullExpertGate

    # Two real experts (0, 1) and two null ones (2, 3). Probabilities by hand:
    #   token 0: (0.5, 0.3, 0.1, 0.1): both picks real, weights 5/8, 3/8
    #   token 1: (0.4, 0.1, 0.4, 0.1): real 0 (weight 1/2) and a null: one real expert
    #   token 2: (0.1, 0.1, 0.5, 0.3): both picks null: no expert at all
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.4, 0.1], [0.1, 0.1, 0.5, 0.3]])
    gate = NullExpertGate(3, 2, k=2, num_null=2, aux_loss_coef=0.0)
    with torch.no_grad():
        gate.router.weight.copy_(probs.log().t())  # the identity input picks each token's logits
    r = gate(torch.eye(3))
    assert assignments(r) == [(0, 0, 0.625), (0, 1, 0.375), (1, 0, 0.5)]
    assert r.experts_per_token_T.tolist() == [2, 1, 0] and r.expert_load_E.tolist() == [2, 1]


def test_null_expert_balance_loss_pools_the_nulls():
    from adamoe.dynamic_gates import NullExpertGate

    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.4, 0.1], [0.1, 0.1, 0.5, 0.3]])
    gate = NullExpertGate(4, 2, k=2, num_null=2)
    # Picks: token 0 -> 0, 1; token 1 -> 0, 2 (its two 0.4s); token 2 -> 2, 3.
    # Loads over 6 picks: (2, 1, 2, 1) / 6, pooled nulls (1.5, 1.5) / 6; mean probabilities
    # (1/3, 1/6, 1/3, 1/6), pooled (1/4, 1/4).
    want = 4 * (2 / 6 * 1 / 3 + 1 / 6 * 1 / 6 + 2 * (1.5 / 6 * 1 / 4))
    assert gate.load_balancing_loss(probs).item() == pytest.approx(want)


def test_null_expert_gate_has_a_router_over_real_and_null_experts():
    from adamoe.dynamic_gates import NullExpertGate

    gate = NullExpertGate(8, 4, k=3, num_null=5)
    assert gate.num_experts == 4 and gate.router.out_features == 9


def test_relu_gate_sends_each_token_to_its_positive_experts():
    from adamoe.dynamic_gates import ReLUGate

    logits = torch.tensor([[0.5, -1.0, 0.25], [-0.5, -0.1, -2.0], [1.0, 2.0, 3.0]])
    gate, x = gate_with_logits(ReLUGate, logits)
    r = gate(x)
    # Token 1 has no positive value: no expert. Weights are the relu values themselves.
    assert assignments(r) == [(0, 0, 0.5), (0, 2, 0.25), (2, 0, 1.0), (2, 1, 2.0), (2, 2, 3.0)]
    assert r.experts_per_token_T.tolist() == [2, 0, 3] and r.token_index_N[:2].tolist() == [
        0,
        2,
    ]  # largest values first
    capped, x = gate_with_logits(ReLUGate, logits, max_experts=1)
    assert assignments(capped(x)) == [(0, 0, 0.5), (2, 2, 3.0)]


def test_relu_gate_l1_coefficient_moves_toward_the_target_sparsity():
    from adamoe.dynamic_gates import ReLUGate

    logits = torch.tensor([[0.5, -1.0, 0.25], [-0.5, -0.1, -2.0], [1.0, 2.0, 3.0]])  # 4 of 9 gates are zero
    values = logits.relu()
    for target, factor in ((0.5, 1.2), (0.4, 1 / 1.2)):
        gate, x = gate_with_logits(ReLUGate, logits, target_sparsity=target, l1_coef=0.01)
        loss = gate(x).aux_loss  # training mode: the coefficient moves first, then weighs the L1 term
        assert gate.l1_coef.item() == pytest.approx(0.01 * factor)
        assert loss.item() == pytest.approx(0.01 * factor * values.sum(-1).mean().item())
    gate.eval()
    gate(x)
    assert gate.l1_coef.item() == pytest.approx(0.01 / 1.2)  # evaluation leaves it alone
    assert "l1_coef" in gate.state_dict()  # checkpointed


def test_extra_expert_counts_generalize_the_two_expert_counts():
    from adamoe.dynamic_gates import TopPGate

    # Token experts per sequence of 3: (1, 2, 0) and (3, 2, 1): two-expert tokens 1 and 2, extra experts 1 and 3.
    gate, x = gate_with_logits(TopPGate, LOGITS, p=0.5)
    r = gate(x)
    r.experts_per_token_T = torch.tensor([1, 2, 0, 3, 2, 1])
    assert r.two_expert_counts(2).tolist() == [1, 2] and r.extra_expert_counts(2).tolist() == [1, 3]
