"""Dropless MoE layer: gate, then sort-based dispatch, then grouped expert math. Where the
experts live is the dispatcher's business: `LocalDispatch` here, all-to-all in
`adamoe.parallel`, swapped in from outside the model."""

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamoe.errors import ConfigError
from adamoe.gates import Gate, Routing


class _ExpertFFN(torch.autograd.Function):
    """y[t] = sum over assignments n of token t: weight[n] * act(x[t] @ W0[e_n]) @ W1[e_n].

    Assignments arrive sorted by expert; each expert gathers its tokens, computes, and
    scatter-adds its weighted output, one expert at a time. Written by hand because:
    - autograd through `W[e]` would build a full [E, ...] zero gradient for every expert
      and add them up, E times the weight traffic;
    - going expert by expert through forward and backward keeps each expert's tokens and
      hidden activations in cache, where whole-batch gathers, elementwise ops and
      scatters would stream them through memory. The pre-activation and the unweighted
      outputs are saved; the activation is recomputed per expert. ReLU is applied in place
      and its output saved instead: its gradient needs only the sign, and each expert in
      backward then saves a pass over its hidden and a call into autograd.
    """

    @staticmethod
    def forward(ctx, x_TD, token_N, weight_N, w0_EDF, w1_EFD, counts, activation):
        a_NF = x_TD.new_empty(token_N.shape[0], w0_EDF.shape[2], dtype=w0_EDF.dtype)
        y_ND = x_TD.new_empty(token_N.shape[0], w1_EFD.shape[2], dtype=w1_EFD.dtype)
        y_TD = torch.zeros_like(x_TD)
        relu = activation is F.relu
        for e, s in _expert_slices(counts):
            x = x_TD.index_select(0, token_N[s]).to(w0_EDF.dtype)
            torch.mm(x, w0_EDF[e], out=a_NF[s])
            torch.mm(a_NF[s].relu_() if relu else activation(a_NF[s]), w1_EFD[e], out=y_ND[s])
            y_TD.index_add_(0, token_N[s], (y_ND[s] * weight_N[s, None]).to(y_TD.dtype))
        ctx.save_for_backward(x_TD, token_N, weight_N, w0_EDF, w1_EFD, a_NF, y_ND)
        ctx.counts, ctx.activation = counts, activation
        return y_TD

    @staticmethod
    def backward(ctx, grad_TD):
        x_TD, token_N, weight_N, w0_EDF, w1_EFD, a_NF, y_ND = ctx.saved_tensors
        grad_x = torch.zeros_like(x_TD)
        grad_weight = torch.empty_like(weight_N)
        # Experts without tokens get zero gradients; the others overwrite their slot.
        grad_w0, grad_w1 = torch.empty_like(w0_EDF), torch.empty_like(w1_EFD)
        for e, n in enumerate(ctx.counts):
            if n == 0:
                grad_w0[e].zero_()
                grad_w1[e].zero_()
        for e, s in _expert_slices(ctx.counts):
            tokens = token_N[s]
            g = grad_TD.index_select(0, tokens).to(y_ND.dtype)
            grad_weight[s] = (g * y_ND[s]).sum(1).to(grad_weight.dtype)
            # Scale the narrow [n, D] gradient by the weights, not the wide [n, F] hidden.
            g_w = g * weight_N[s, None].to(g.dtype)
            if ctx.activation is F.relu:
                h = a_NF[s]  # saved after the in-place ReLU
                grad_a = torch.ops.aten.threshold_backward(g_w @ w1_EFD[e].t(), h, 0)
            else:
                with torch.enable_grad():
                    a = a_NF[s].detach().requires_grad_()
                    h = ctx.activation(a)
                (grad_a,) = torch.autograd.grad(h, a, g_w @ w1_EFD[e].t())
            torch.mm(h.detach().t(), g_w, out=grad_w1[e])
            torch.mm(x_TD.index_select(0, tokens).to(w0_EDF.dtype).t(), grad_a, out=grad_w0[e])
            grad_x.index_add_(0, tokens, (grad_a @ w0_EDF[e].t()).to(grad_x.dtype))
        return grad_x, None, grad_weight, grad_w0, grad_w1, None, None


def _expert_slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


class Experts(nn.Module):
    """E two-layer FFNs, FFN_e(x) = act(x W0_e) W1_e (eq. 1), stored as stacked weights."""

    # Rows each expert's group is padded to a multiple of, in bf16 and fp16 on CPU (see
    # `_pad_groups`); benchmarks/README.md has what it saves and what it costs.
    row_bucket = 64

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

    def shard(self, start: int, count: int):
        """Keep experts [start, start + count) only."""
        self.w0_EDF = nn.Parameter(self.w0_EDF.detach()[start : start + count].clone())
        self.w1_EFD = nn.Parameter(self.w1_EFD.detach()[start : start + count].clone())

    def forward(self, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, tokens_per_expert_E: list[int]) -> Tensor:
        """Weighted sum of expert outputs per token; assignments sorted by expert."""
        device = x_TD.device.type
        # The kernel writes into preallocated outputs, which autocast cannot see
        # through: cast once here instead.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
        with torch.autocast(device, enabled=False):
            w0, w1 = self.w0_EDF.to(dtype), self.w1_EFD.to(dtype)
            if device == "cpu" and dtype in (torch.bfloat16, torch.float16) and self.row_bucket > 1:
                token_N, weight_N, tokens_per_expert_E = _pad_groups(
                    token_N, weight_N, tokens_per_expert_E, self.row_bucket
                )
            return _ExpertFFN.apply(x_TD, token_N, weight_N, w0, w1, tokens_per_expert_E, self.activation)


def _pad_groups(token_N: Tensor, weight_N: Tensor, counts: list[int], bucket: int) -> tuple[Tensor, Tensor, list[int]]:
    """Pad each expert's group of assignments to a multiple of `bucket` rows with weight-0
    assignments of token 0, which add nothing forward or backward. oneDNN compiles a bf16
    matmul kernel for every new shape, which costs more than the matmul: with padded
    groups the shapes repeat and the compiled kernels are reused."""
    padded = [-(-n // bucket) * bucket for n in counts]
    shift = [
        0,
        *itertools.accumulate(p - n for p, n in zip(padded[:-1], counts[:-1])),
    ]  # padding rows before each group
    device = token_N.device
    shift_N = torch.tensor(shift, device=device).repeat_interleave(torch.tensor(counts, device=device))
    pos_N = torch.arange(len(token_N), device=device) + shift_N
    token_P = token_N.new_zeros(sum(padded)).index_copy(0, pos_N, token_N)
    weight_P = weight_N.new_zeros(sum(padded)).index_copy(0, pos_N, weight_N)
    return token_P, weight_P, padded


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class LocalDispatch:
    """Every expert is on this process: the assignments, sorted by expert, go straight to
    them. `received` is the number of assignments of the last call; `sent_bytes` is 0."""

    received, sent_bytes = 0, 0

    def __call__(self, experts: Experts, x_TD: Tensor, token_N: Tensor, weight_N: Tensor, load_E: Tensor) -> Tensor:
        self.received = token_N.numel()
        # The host-device synchronization dispatch needs: the expert loop slices each
        # expert's rows on the host, so it must know the counts. The gate adds one only
        # where a count depends on the data: the non-padding tokens, when it is given a
        # padding mask (the transformer always gives one), and the tokens an adaptive
        # gate sends to two experts.
        return experts(x_TD, token_N, weight_N, load_E.tolist())


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
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if gate.num_experts != num_experts:
            raise ConfigError(f"gate routes to {gate.num_experts} experts, layer has {num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ConfigError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.gate = gate
        self.experts = Experts(d_model, d_ff, num_experts, ACTIVATIONS[activation])
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.dispatcher = LocalDispatch()  # `adamoe.parallel.shard_experts` swaps in all-to-all

    def forward(self, x_BSD: Tensor, padding_mask_BS: Tensor | None = None) -> tuple[Tensor, Routing]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.gate(x_TD, None if padding_mask_BS is None else padding_mask_BS.reshape(B * S))
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * routing.token_index_N.numel() / self.num_experts)
            routing = routing.with_capacity(capacity)
        # Sorted by expert, the experts gather, compute and scatter-add back.
        order_N = torch.argsort(routing.expert_index_N, stable=True)
        token_N, weight_N = routing.token_index_N[order_N], routing.weight_N[order_N]
        y_TD = self.dispatcher(self.experts, x_TD, token_N, weight_N, routing.expert_load_E)
        return y_TD.view(B, S, D), routing
