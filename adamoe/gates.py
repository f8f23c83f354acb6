"""Gates: decide which experts each token goes to, and with what weight.

Every gate returns the same `Routing` record, a flat list of (token, expert, weight)
assignments. A gate may give each token any number of experts, so top-k, top-p or
expert-choice gates fit without touching the MoE layer.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamoe.errors import ConfigError


@dataclass
class Routing:
    """What one MoE layer did with one batch. N assignments, T tokens, E experts."""

    token_index_N: Tensor  # int64, into the flattened tokens of the batch
    expert_index_N: Tensor  # int64
    weight_N: Tensor  # float32, carries the gradient to the router
    experts_per_token_T: Tensor  # int64; 0 for padding (and for fully dropped tokens)
    expert_load_E: Tensor  # int64, assignments each expert processed
    aux_loss: Tensor  # scalar, coefficients applied
    router_entropy: Tensor  # scalar, summed over non-padding tokens (detached)
    num_tokens: int  # non-padding tokens
    dropped: int = 0  # assignments removed by a capacity limit

    def two_expert_counts(self, batch_size: int) -> Tensor:
        """Per-sequence count of tokens on two or more experts, shape [B] (eq. 5 numerator)."""
        return (self.experts_per_token_T >= 2).view(batch_size, -1).sum(1)

    def extra_expert_counts(self, batch_size: int) -> Tensor:
        """Per-sequence sum over tokens of the experts beyond the first, shape [B]: the
        curriculum's complexity for any number of experts per token. Where a token takes at
        most two it is `two_expert_counts`."""
        return (self.experts_per_token_T - 1).clamp_min(0).view(batch_size, -1).sum(1)

    def with_capacity(self, capacity: int) -> "Routing":
        """Drop the assignments that overflow `capacity` per expert.

        Assignments earlier in the flat list win: gates list all first choices before
        second choices, so a second choice never pushes out a first choice (as in GShard).
        """
        E = self.expert_load_E.numel()
        order_N = torch.argsort(self.expert_index_N, stable=True)
        starts_E = torch.cumsum(self.expert_load_E, 0) - self.expert_load_E
        rank_sorted = torch.arange(order_N.numel(), device=order_N.device) - starts_E[self.expert_index_N[order_N]]
        keep_N = torch.empty_like(order_N, dtype=torch.bool)
        keep_N[order_N] = rank_sorted < capacity
        dropped = int((~keep_N).sum())
        if dropped == 0:
            return self
        token_N, expert_N = self.token_index_N[keep_N], self.expert_index_N[keep_N]
        return replace(
            self,
            token_index_N=token_N,
            expert_index_N=expert_N,
            weight_N=self.weight_N[keep_N],
            experts_per_token_T=counts(token_N, self.experts_per_token_T.numel()),
            expert_load_E=counts(expert_N, E),
            dropped=self.dropped + dropped,
        )


class Gate(nn.Module):
    """Router plus an assignment rule. Subclasses implement `assign` and nothing else.

    The softmax always runs in float32: under bf16/fp16 autocast the small differences
    between router probabilities decide the routing, and half precision blurs them.

    Args:
        aux_loss_coef: weight of the load-balancing loss, which keeps the experts evenly used
        z_loss_coef: weight of the router z-loss, which keeps the router's logits small
    """

    def __init__(self, d_model: int, num_experts: int, *, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0):
        super().__init__()
        if num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.router = nn.Linear(d_model, num_experts, bias=False)

    def assign(self, probs_TE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return flat (token_index_N, expert_index_N, weight_N) for the given probabilities.

        List first choices before later ones: that is the priority order when a capacity
        limit drops assignments.
        """
        raise NotImplementedError

    def forward(self, x_TD: Tensor, padding_mask_T: Tensor | None = None) -> Routing:
        T = x_TD.shape[0]
        if padding_mask_T is None:
            real_T = None
            x_RD = x_TD
        else:
            real_T = (~padding_mask_T).nonzero().squeeze(1)
            x_RD = x_TD[real_T]
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_RE = F.linear(x_RD.float(), self.router.weight.float())
        probs_RE = self.scores(logits_RE)
        token_N, expert_N, weight_N = self.assign(probs_RE)
        if real_T is not None:
            token_N = real_T[token_N]
        E, R = self.num_experts, x_RD.shape[0]

        aux_loss = (
            self.aux_loss_coef * self.load_balancing_loss(probs_RE) if self.aux_loss_coef else probs_RE.new_zeros(())
        )
        if self.z_loss_coef:
            aux_loss = aux_loss + self.z_loss_coef * torch.logsumexp(logits_RE, -1).square().mean()
        aux_loss = aux_loss + self.extra_loss(probs_RE)
        with torch.no_grad():
            entropy = -(probs_RE * probs_RE.clamp_min(1e-20).log()).sum()
        return Routing(
            token_index_N=token_N,
            expert_index_N=expert_N,
            weight_N=weight_N,
            experts_per_token_T=counts(token_N, T),
            expert_load_E=counts(expert_N, E),
            aux_loss=aux_loss,
            router_entropy=entropy,
            num_tokens=R,
        )

    def scores(self, logits_TE: Tensor) -> Tensor:
        """The router's scores that `assign` chooses by: a softmax, unless a gate says otherwise."""
        return logits_TE.softmax(-1)

    def extra_loss(self, probs_TE: Tensor) -> Tensor:
        """A gate's own auxiliary loss, coefficient applied; added to `aux_loss`."""
        return probs_TE.new_zeros(())

    def load_balancing_loss(self, probs_TE: Tensor) -> Tensor:
        """Eq. 4: E * sum_e f_e * p_e, with f_e the share of first choices on expert e.

        Only first choices are balanced, whatever the gate does with later ones.
        """
        if probs_TE.shape[0] == 0:
            return probs_TE.sum()
        E = probs_TE.shape[1]
        first_choice_fraction_E = counts(probs_TE.argmax(-1), E).to(probs_TE.dtype) / probs_TE.shape[0]
        return E * (first_choice_fraction_E * probs_TE.mean(0)).sum()


def counts(index_N: Tensor, size: int) -> Tensor:
    """How often each of 0..size-1 occurs in `index_N`. Not `torch.bincount`, which on a GPU
    reads the index's smallest and largest values back to the host: a synchronization."""
    return torch.zeros(size, dtype=torch.long, device=index_N.device).index_add_(0, index_N, torch.ones_like(index_N))


def _flatten_top2(top_TK: Tensor, weight_TK: Tensor, second_T: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Flat list of every first choice, then the second choices where `second_T` is set
    (every token's when it is None: a boolean selection would cost a synchronization)."""
    T = top_TK.shape[0]
    tokens_T = torch.arange(T, device=top_TK.device)
    second = slice(None) if second_T is None else tokens_T[second_T]  # a slice takes views, no gathers
    return (
        torch.cat([tokens_T, tokens_T[second]]),
        torch.cat([top_TK[:, 0], top_TK[second, 1]]),
        torch.cat([weight_TK[:, 0], weight_TK[second, 1]]),
    )


class Top1Gate(Gate):
    """Switch Transformer: the argmax expert, weighted by its raw probability."""

    def assign(self, probs_TE):
        weight_T, expert_T = probs_TE.max(-1)
        return torch.arange(probs_TE.shape[0], device=probs_TE.device), expert_T, weight_T


class Top2Gate(Gate):
    """GShard: the two most probable experts, weights renormalized to sum to 1.

    The second expert is the deterministic runner-up, not sampled.
    """

    def assign(self, probs_TE):
        p_TK, top_TK = probs_TE.topk(2, -1)
        return _flatten_top2(top_TK, p_TK / p_TK.sum(-1, keepdim=True), None)


class AdaptiveGate(Gate):
    """Adaptive gating (Li et al., 2023): two experts only where the router hesitates.

    With p1', p2' the top-two probabilities normalized to each other, a token goes to both
    experts when p1' - p2' <= threshold, else to the first alone. threshold=0 is top-1
    routing (up to exact ties), threshold=1 is top-2 routing.

    The weights are p1' and p2' for two-expert tokens. A one-expert token gets weight p1'
    by default (`single_weight="normalized"`), which keeps its output on the same scale as
    the p1' share it would have had next to p2'; `single_weight="one"` uses 1 and
    `"raw"` the unnormalized softmax probability p1, as Top1Gate does.

    Args:
        threshold: a token whose normalized top-1/top-2 gap is at most this gets two experts
        single_weight: a one-expert token's weight: normalized, one or raw
    """

    SINGLE_WEIGHTS = ("normalized", "one", "raw")
    KNOB = "threshold"  # what `adamoe.callbacks.Budget` turns: higher, more two-expert tokens

    def __init__(
        self, d_model: int, num_experts: int, *, threshold: float = 0.1, single_weight: str = "normalized", **kwargs
    ):
        super().__init__(d_model, num_experts, **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"AdaptiveGate threshold must be in [0, 1], got {threshold}")
        if single_weight not in self.SINGLE_WEIGHTS:
            raise ConfigError(f"AdaptiveGate single_weight must be one of {self.SINGLE_WEIGHTS}, got {single_weight!r}")
        if num_experts < 2:
            raise ConfigError("AdaptiveGate needs at least 2 experts")
        self.threshold = threshold
        self.single_weight = single_weight

    def assign(self, probs_TE):
        p_TK, top_TK = probs_TE.topk(2, -1)
        norm_TK = p_TK / p_TK.sum(-1, keepdim=True)
        two_T = (norm_TK[:, 0] - norm_TK[:, 1]) <= self.threshold
        if self.single_weight == "one":
            first_T = torch.where(two_T, norm_TK[:, 0], torch.ones_like(norm_TK[:, 0]))
        elif self.single_weight == "raw":
            first_T = torch.where(two_T, norm_TK[:, 0], p_TK[:, 0])
        else:
            first_T = norm_TK[:, 0]
        return _flatten_top2(top_TK, torch.stack([first_T, norm_TK[:, 1]], -1), two_T)

    def extra_repr(self):
        return f"threshold={self.threshold}, single_weight={self.single_weight!r}"
