"""Ops the model uses in place of PyTorch's where PyTorch's are slow on CPU.

`benchmarks/throughput.py --profile` shows what each replaces: on CPU, torch's dropout
draws one Mersenne-Twister number per element, and its flash-attention backward in
bf16 runs slower than the three ops below (benchmarks/README.md, "Speed").
On CUDA these two fall back to PyTorch. The output projection and the two
cross-entropies over the vocabulary (label-smoothed and plain) are one op, so the
[T, V] logits and their gradient are never stored.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamoe.errors import ConfigError

# splitmix64's increment and multipliers, as signed int64.
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _random_int16(n: int, device) -> Tensor:
    """n uniform int16 values from a counter hash (splitmix64) at an offset drawn from
    torch's generator, so `seed_everything` and checkpointed generator states hold.
    Each 64-bit hash gives four values: a handful of vectorized integer ops in all."""
    offset = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    z = (torch.arange((n + 3) // 4, dtype=torch.int64, device=device) + offset) * _GOLDEN
    # `>>` on int64 keeps the sign; the masks make the shifts logical.
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return z.view(torch.int16)[:n]


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout; keeps each element with probability 1 - p (to 1/65536)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = _random_int16(x.numel(), x.device).view(x.shape) >= round(-32768 + 65536 * p)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(
    q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, mask=None, dropout_p: float = 0.0, is_causal: bool = False
) -> Tensor:
    """Scaled dot-product attention. `mask` is boolean, True where a query may attend."""
    slow_backward = q_BHSd.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
    if q_BHSd.device.type != "cpu" or (dropout_p == 0.0 and not slow_backward):
        return F.scaled_dot_product_attention(
            q_BHSd, k_BHSd, v_BHSd, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )
    return math_attention(q_BHSd, k_BHSd, v_BHSd, mask, dropout_p, is_causal)


def math_attention(q_BHSd, k_BHSd, v_BHSd, mask=None, dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """Attention as three ops; the softmax in fp32."""
    s_BHSS = (q_BHSd * (1.0 / math.sqrt(q_BHSd.shape[-1]))) @ k_BHSd.transpose(-1, -2)
    if is_causal:
        mask = torch.ones(
            s_BHSS.shape[-2:], dtype=torch.bool, device=s_BHSS.device
        ).tril()  # top-left, as SDPA aligns it
    if mask is not None:
        s_BHSS = s_BHSS.masked_fill(~mask, float("-inf"))
    probs_BHSS = dropout(s_BHSS.float().softmax(-1), dropout_p).to(v_BHSd.dtype)
    return probs_BHSS @ v_BHSd


class _LinearCrossEntropy(torch.autograd.Function):
    """Label-smoothed and plain token cross-entropy of `h_TD @ weight_VD.T`, without the
    [T, V] logits: a block of rows at a time, each block's logits are made, reduced to
    their log-sum-exp and, when training, turned into their softmax's share of both
    gradients at once, so the logits never leave cache and are never stored or remade.
    Backward adds what depends on the gradients of the two losses: the target rows and
    the uniform part of label smoothing, both cheap (a gather and a rank-one term)."""

    @staticmethod
    def rows(h_TD: Tensor, V: int) -> int:
        # On CPU, blocks of about 32 MB of fp32 logits: small enough for the last-level
        # cache, large enough that the weight-gradient matmul (rows deep) runs near full
        # speed; on a GPU, bounded memory in few kernels.
        return max(128, (2**23 if h_TD.device.type == "cpu" else 2**27) // V)

    @staticmethod
    def forward(ctx, h_TD, weight_VD, target_T, ignore_index, smoothing, train):
        (T, D), V = h_TD.shape, weight_VD.shape[0]
        acc = torch.promote_types(h_TD.dtype, torch.float32)  # fp32 for bf16 and fp16, else their own
        valid_T = target_T.ne(ignore_index)
        scale_T = valid_T.to(acc) / valid_T.sum().clamp_min(1)
        safe_T = target_T.masked_fill(~valid_T, 0)
        lse_T, at_target_T = h_TD.new_empty(T, dtype=acc), h_TD.new_empty(T, dtype=acc)
        # The softmax's part of the gradients, for a loss of weight 1.
        grad_h_TD = torch.empty_like(h_TD) if train else None
        grad_w_VD = h_TD.new_zeros(V, D, dtype=acc) if train else None
        size = _LinearCrossEntropy.rows(h_TD, V)
        # One block's logits in the matmul dtype, and in `acc` for the softmax: reused
        # block after block, so that casts and fresh pages do not cost a pass each.
        z_RV = h_TD.new_empty(min(size, T), V)
        f_RV = z_RV if z_RV.dtype == acc else torch.empty_like(z_RV, dtype=acc)
        block_rows = torch.arange(len(z_RV), device=h_TD.device)
        for r in range(0, T, size):
            rows, h_RD = slice(r, r + size), h_TD[r : r + size]
            z, f = torch.mm(h_RD, weight_VD.t(), out=z_RV[: len(h_RD)]), f_RV[: len(h_RD)]
            if f is not z:
                f.copy_(z)
            at_target_T[rows] = f[block_rows[: len(f)], safe_T[rows]]
            top = f.amax(1, keepdim=True)
            p = f.sub_(top).exp_()
            total = p.sum(1, keepdim=True)
            lse_T[rows] = (top + total.log()).squeeze(1)
            if train:
                p = p.mul_(scale_T[rows, None] / total)
                if p is not z:
                    p = z.copy_(p)
                torch.mm(p, weight_VD, out=grad_h_TD[rows])
                if p.dtype == grad_w_VD.dtype:  # out= rather than addmm_, which FLOP counters miss
                    torch.addmm(grad_w_VD, p.t(), h_RD, out=grad_w_VD)
                else:  # bf16 blocks, summed in fp32
                    grad_w_VD.add_(torch.mm(p.t(), h_RD))
        # The mean logit of a row, for the uniform part of label smoothing, is h . (sum of rows of W) / V.
        sum_w_D = weight_VD.to(acc).sum(0)
        nll_T = lse_T - at_target_T
        uniform_T = lse_T - h_TD.to(acc) @ sum_w_D / V
        nll = (nll_T * scale_T).sum()
        smoothed = ((1 - smoothing) * nll_T + smoothing * uniform_T).mul(scale_T).sum()
        ctx.save_for_backward(h_TD, weight_VD, safe_T, scale_T, sum_w_D, grad_h_TD, grad_w_VD)
        ctx.smoothing = smoothing
        return smoothed, nll

    @staticmethod
    def backward(ctx, g_smoothed, g_nll):
        h_TD, weight_VD, safe_T, scale_T, sum_w_D, grad_h_TD, grad_w_VD = ctx.saved_tensors
        s, V = ctx.smoothing, weight_VD.shape[0]
        # d(loss)/d(logit) = (g_s + g_n) softmax - ((1 - s) g_s + g_n) onehot(target) - s g_s / V.
        soft, uniform = g_smoothed + g_nll, s * g_smoothed / V
        at_target_T = scale_T * ((1 - s) * g_smoothed + g_nll)
        acc = grad_w_VD.dtype
        grad_h = (
            soft * grad_h_TD.to(acc)
            - at_target_T[:, None] * weight_VD[safe_T].to(acc)
            - uniform * torch.outer(scale_T, sum_w_D)
        )
        grad_w = (soft * grad_w_VD).index_add_(0, safe_T, at_target_T[:, None] * h_TD.to(acc), alpha=-1)
        grad_w -= uniform * (scale_T @ h_TD.to(acc))
        return grad_h.to(h_TD.dtype), grad_w.to(weight_VD.dtype), None, None, None, None


def linear_cross_entropy(
    h_TD: Tensor, weight_VD: Tensor, target_T: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(label-smoothed loss, plain loss) of the logits `h_TD @ weight_VD.T`, each the mean
    over targets != ignore_index, as `F.cross_entropy(F.linear(h, weight), ...)` computes
    them, in the autocast dtype when autocast is on."""
    device = h_TD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_TD.dtype
    # Inside a Function grad mode is off and needs_input_grad ignores it: ask out here
    # whether a backward can come, or evaluation would pay for gradients.
    train = torch.is_grad_enabled() and (h_TD.requires_grad or weight_VD.requires_grad)
    # The blocks write into preallocated outputs, which autocast cannot see through.
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(
            h_TD.to(dtype), weight_VD.to(dtype), target_T, ignore_index, label_smoothing, train
        )
