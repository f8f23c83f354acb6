"""Gates that give each token a variable number of experts beyond adaptive gating: top-p,
null experts and ReLU routing. Each is one `assign` (and at most a score or a loss of its
own) over the `Gate` of `adamoe.gates`."""

import torch
from torch import nn

from adamoe.errors import ConfigError
from adamoe.gates import Gate, counts


class TopPGate(Gate):
    """Top-p routing (Huang et al., 2024): the fewest experts whose probabilities reach p.

    From "Harder Tasks Need More Experts": per token, the fewest experts, most probable
    first, whose probabilities sum to at least `p`; at most `max_experts` of them when set.
    A token whose first expert alone reaches `p` gets one.

    The weights are the router's own probabilities, not renormalized over the chosen
    experts, as in the paper: a token that needs many experts spreads its output over them,
    and a confident one keeps almost all of it on one. `dynamic_loss_coef` adds the paper's
    dynamic loss, the mean entropy of the router's distribution, which pushes the router
    to be sure and so to use fewer experts. Sums within 1e-6 of `p` count as reaching it,
    so that a set that reaches `p` exactly in real numbers does in floating point too.
    The number of assignments depends on the data: choosing them reads it on the host.

    Args:
        p: the probability mass a token's experts must reach
        max_experts: the most experts a token may get (null: no cap)
        dynamic_loss_coef: weight of the router-entropy loss
    """

    KNOB = "p"  # what `adamoe.callbacks.Budget` turns: higher, more experts

    def __init__(self, d_model: int, num_experts: int, *, p: float = 0.4, max_experts: int | None = None,
                 dynamic_loss_coef: float = 0.0, **kwargs):  # fmt: skip
        super().__init__(d_model, num_experts, **kwargs)
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"TopPGate p must be in (0, 1], got {p}")
        if max_experts is not None and not 1 <= max_experts <= num_experts:
            raise ConfigError(f"TopPGate max_experts must be in [1, {num_experts}], got {max_experts}")
        self.p, self.max_experts, self.dynamic_loss_coef = p, max_experts, dynamic_loss_coef

    def assign(self, probs_TE):
        sorted_TE, expert_TE = probs_TE.sort(-1, descending=True)
        before_TE = sorted_TE.cumsum(-1) - sorted_TE  # what the experts ranked above each one sum to
        keep_TE = before_TE < self.p - 1e-6
        if self.max_experts is not None:
            keep_TE[:, self.max_experts :] = False
        rank_N, token_N = keep_TE.t().nonzero(as_tuple=True)  # every first choice, then every second, ...
        return token_N, expert_TE[token_N, rank_N], sorted_TE[token_N, rank_N]

    def extra_loss(self, probs_TE):
        if not self.dynamic_loss_coef or probs_TE.shape[0] == 0:
            return probs_TE.new_zeros(())
        return self.dynamic_loss_coef * -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()

    def extra_repr(self):
        return f"p={self.p}, max_experts={self.max_experts}, dynamic_loss_coef={self.dynamic_loss_coef}"


class NullExpertGate(Gate):
    """Null experts (Zeng et al., 2024): top-k over real experts and ones that cost nothing.

    From "AdaMoE": the router scores the E real experts and `num_null` null experts,
    which compute nothing; each token takes its top `k` of all E + num_null, with the k
    probabilities renormalized to sum to 1, and is sent only to the real ones among them.
    A token that picks nulls goes to fewer real experts, and its output is that much
    smaller; a token whose k picks are all null gets no expert at all, and the MoE layer's
    output for it is zero: the block's residual path alone carries it.
    Null picks are never dispatched, so they cost no FLOPs and no all-to-all bytes.

    The load-balancing loss runs over all k picks of the E + num_null experts, with the null
    experts counted as one pool (their loads and probabilities averaged): which null a token
    picks does not matter, only how often it picks one, and the loss holds that near
    num_null / (E + num_null) of the picks.

    Args:
        k: picks per token, null experts included
        num_null: null experts, which compute nothing
    """

    def __init__(self, d_model: int, num_experts: int, *, k: int = 2, num_null: int = 4, **kwargs):
        super().__init__(d_model, num_experts, **kwargs)
        if num_null < 1 or not 1 <= k <= num_experts + num_null:
            raise ConfigError(
                f"NullExpertGate needs num_null >= 1 and k in [1, {num_experts + num_null}], got {num_null} and {k}"
            )
        self.k, self.num_null = k, num_null
        self.router = nn.Linear(d_model, num_experts + num_null, bias=False)

    def assign(self, probs_TE):
        p_TK, top_TK = probs_TE.topk(self.k, -1)
        weight_TK = p_TK / p_TK.sum(-1, keepdim=True)
        real_KT = (top_TK < self.num_experts).t()  # choices in rank order: first choices first
        rank_N, token_N = real_KT.nonzero(as_tuple=True)
        return token_N, top_TK[token_N, rank_N], weight_TK[token_N, rank_N]

    def load_balancing_loss(self, probs_TE):
        if probs_TE.shape[0] == 0:
            return probs_TE.sum()
        E, N = self.num_experts, self.num_null
        load_X = counts(probs_TE.topk(self.k, -1).indices.flatten(), E + N).to(probs_TE.dtype) / (
            probs_TE.shape[0] * self.k
        )
        mean_X = probs_TE.mean(0)
        pooled = lambda v: torch.cat([v[:E], v[E:].mean().expand(N)])  # noqa: E731
        return (E + N) * (pooled(load_X) * pooled(mean_X)).sum()

    def extra_repr(self):
        return f"k={self.k}, num_null={self.num_null}"


class ReLUGate(Gate):
    """ReLU routing (Wang et al., ICLR 2025): every expert with a positive relu(x W).

    From "ReMoE": the gate values are relu(x W), and a token goes to every expert whose
    value is positive (its `max_experts` largest, when set), weighted by that value; a
    token with no positive value gets no expert, and its block passes it on the residual
    path alone.

    Sparsity is held by an L1 penalty on the gate values whose coefficient adapts: after
    each training forward it is multiplied by `adapt` when fewer gates are zero than
    `target_sparsity` asks, and divided by it when more are, so the share of zero gates
    settles near the target (1 - k/E matches top-k's compute). The coefficient is a buffer:
    checkpointed with the model, and under DDP rank 0's value is the one every rank uses.

    Args:
        target_sparsity: the share of gate values held at zero
        l1_coef: the L1 penalty's starting weight
        adapt: the factor the weight changes by each step
        max_experts: the most experts a token may get (null: no cap)
    """

    def __init__(self, d_model: int, num_experts: int, *, target_sparsity: float = 0.875, l1_coef: float = 1e-8,
                 adapt: float = 1.2, max_experts: int | None = None, aux_loss_coef: float = 0.0, **kwargs):  # fmt: skip
        super().__init__(d_model, num_experts, aux_loss_coef=aux_loss_coef, **kwargs)
        if not 0.0 <= target_sparsity < 1.0 or adapt <= 1.0 or l1_coef <= 0.0:
            raise ConfigError(
                f"ReLUGate needs target_sparsity in [0, 1), adapt > 1, l1_coef > 0; got {target_sparsity}, {adapt}, "
                f"{l1_coef}"
            )
        if max_experts is not None and not 1 <= max_experts <= num_experts:
            raise ConfigError(f"ReLUGate max_experts must be in [1, {num_experts}], got {max_experts}")
        self.target_sparsity, self.adapt, self.max_experts = target_sparsity, adapt, max_experts
        self.register_buffer("l1_coef", torch.tensor(float(l1_coef)))

    def scores(self, logits_TE):
        return logits_TE.relu()

    def assign(self, probs_TE):
        keep_TE = probs_TE > 0
        if self.max_experts is not None and self.max_experts < probs_TE.shape[1]:
            keep_TE &= probs_TE >= probs_TE.topk(self.max_experts, -1).values[:, -1:]
        order_TE = probs_TE.argsort(-1, descending=True)  # list every token's largest value first
        ranked_TE = keep_TE.gather(1, order_TE)
        rank_N, token_N = ranked_TE.t().nonzero(as_tuple=True)
        expert_N = order_TE[token_N, rank_N]
        return token_N, expert_N, probs_TE[token_N, expert_N]

    def extra_loss(self, probs_TE):
        if probs_TE.shape[0] == 0:
            return probs_TE.sum()
        if self.training:
            with torch.no_grad():
                sparsity = (probs_TE == 0).float().mean()
                self.l1_coef *= self.adapt if sparsity < self.target_sparsity else 1 / self.adapt
        return self.l1_coef * probs_TE.sum(-1).mean()

    def extra_repr(self):
        return f"target_sparsity={self.target_sparsity}, adapt={self.adapt}, max_experts={self.max_experts}"
