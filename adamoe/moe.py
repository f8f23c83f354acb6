"""Dropless MoE layer: gate, then sort-based dispatch, then grouped expert math."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamoe.gates import Gate, Routing


class _GroupedMM(torch.autograd.Function):
    """out[rows of expert e] = x[rows of expert e] @ w[e], rows grouped by expert.

    Written by hand because autograd through `w[e]` would build a full [E, ...] zero
    gradient for every expert and add them up (E times the weight memory traffic);
    here each expert writes its slice of one gradient tensor, and empty experts cost nothing.
    """

    @staticmethod
    def forward(ctx, x_NI, w_EIO, counts):
        ctx.save_for_backward(x_NI, w_EIO)
        ctx.counts = counts
        out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_NI[start : start + n], w_EIO[e], out=out_NO[start : start + n])
                start += n
        return out_NO

    @staticmethod
    def backward(ctx, grad_NO):
        x_NI, w_EIO = ctx.saved_tensors
        grad_x = torch.empty_like(x_NI) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_EIO) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                g = grad_NO[start : start + n]
                if grad_x is not None:
                    torch.mm(g, w_EIO[e].t(), out=grad_x[start : start + n])
                if grad_w is not None:
                    torch.mm(x_NI[start : start + n].t(), g, out=grad_w[e])
                start += n
        return grad_x, grad_w, None


def grouped_mm(x_NI: Tensor, w_EIO: Tensor, counts: list[int]) -> Tensor:
    """Multiply consecutive row blocks of `x_NI` (sizes `counts`) by their expert's matrix."""
    return _GroupedMM.apply(x_NI, w_EIO, counts)


class Experts(nn.Module):
    """E two-layer FFNs, FFN_e(x) = act(x W0_e) W1_e (eq. 1), stored as stacked weights."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, activation: Callable[[Tensor], Tensor] = F.relu):
        super().__init__()
        self.w0_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self):
        # Same scale as nn.Linear's default for a single dense FFN of these sizes.
        for w in (self.w0_EDF, self.w1_EFD):
            bound = 1 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_ND: Tensor, tokens_per_expert_E: list[int]) -> Tensor:
        device = x_ND.device.type
        # The grouped matmul writes into preallocated outputs, which autocast cannot see
        # through: cast once here instead.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_ND.dtype
        with torch.autocast(device, enabled=False):
            h_NF = self.activation(grouped_mm(x_ND.to(dtype), self.w0_EDF.to(dtype), tokens_per_expert_E))
            return grouped_mm(h_NF, self.w1_EFD.to(dtype), tokens_per_expert_E)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class MoELayer(nn.Module):
    """Replaces a transformer FFN: y = sum over the gate's experts of weight * FFN_e(x) (eq. 3).

    Dropless by default. With `capacity_factor`, each expert takes at most
    ceil(capacity_factor * assignments / E) assignments, first choices first; the rest are
    dropped and counted in the routing record.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        gate: Gate,
        activation: str = "relu",
        capacity_factor: float | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if gate.num_experts != num_experts:
            raise ValueError(f"gate routes to {gate.num_experts} experts, layer has {num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.gate = gate
        self.experts = Experts(d_model, d_ff, num_experts, ACTIVATIONS[activation])
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def forward(self, x_BSD: Tensor, padding_mask_BS: Tensor | None = None) -> tuple[Tensor, Routing]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.gate(x_TD, None if padding_mask_BS is None else padding_mask_BS.reshape(B * S))
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * routing.token_index_N.numel() / self.num_experts)
            routing = routing.with_capacity(capacity)
        return self.dispatch(x_TD, routing).view(B, S, D), routing

    def dispatch(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Sort assignments by expert, gather tokens once, run experts, scatter-add back."""
        order_N = torch.argsort(routing.expert_index_N, stable=True)
        token_N = routing.token_index_N[order_N]
        y_ND = self.experts(x_TD[token_N], routing.expert_load_E.tolist())
        y_ND = y_ND.to(x_TD.dtype) * routing.weight_N[order_N].unsqueeze(1).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)
