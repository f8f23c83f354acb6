"""Ops the model uses in place of PyTorch's where PyTorch's are slow on CPU.

`benchmarks/throughput.py --profile` shows what each replaces: on CPU, torch's dropout
draws one Mersenne-Twister number per element (about a sixth of a Multi30k training
step), its flash-attention backward in bf16 runs slower than the three ops below, and
two cross-entropies over the vocabulary (label-smoothed and plain) cost four passes
over the logits forward and more backward. On CUDA the first two fall back to PyTorch.
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


def attention(q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, mask=None, dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """Scaled dot-product attention. `mask` is boolean, True where a query may attend."""
    slow_backward = q_BHSd.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
    if q_BHSd.device.type != "cpu" or (dropout_p == 0.0 and not slow_backward):
        return F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    return math_attention(q_BHSd, k_BHSd, v_BHSd, mask, dropout_p, is_causal)


def math_attention(q_BHSd, k_BHSd, v_BHSd, mask=None, dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """Attention as three ops; the softmax in fp32."""
    s_BHSS = (q_BHSd * (1.0 / math.sqrt(q_BHSd.shape[-1]))) @ k_BHSd.transpose(-1, -2)
    if is_causal:
        mask = torch.ones(s_BHSS.shape[-2:], dtype=torch.bool, device=s_BHSS.device).tril()  # top-left, as SDPA aligns it
    if mask is not None:
        s_BHSS = s_BHSS.masked_fill(~mask, float("-inf"))
    probs_BHSS = dropout(s_BHSS.float().softmax(-1), dropout_p).to(v_BHSd.dtype)
    return probs_BHSS @ v_BHSd


class _CrossEntropy(torch.autograd.Function):
    """Label-smoothed and plain token cross-entropy in one pass over the logits forward
    and one backward, a block of rows at a time so that the fp32 temporaries stay in
    cache. Saves the log-sum-exp per row, not an fp32 copy of the log-probabilities.
    Backward is softmax minus the smoothed target distribution."""

    @staticmethod
    def rows(logits_TV: Tensor) -> int:
        # On CPU a block's fp32 temporaries fit in cache (64 x an 8,000-word vocabulary =
        # 2 MB); a GPU wants fewer, larger kernels, with memory still bounded.
        return 64 if logits_TV.device.type == "cpu" else 1024

    @staticmethod
    def forward(ctx, logits_TV, target_T, ignore_index, smoothing):
        T, V = logits_TV.shape
        valid_T = target_T.ne(ignore_index)
        count = valid_T.sum().clamp_min(1)
        safe_T = target_T.masked_fill(~valid_T, 0)
        lse_T, total_T = logits_TV.new_empty(T, dtype=torch.float32), logits_TV.new_empty(T, dtype=torch.float32)
        size = _CrossEntropy.rows(logits_TV)
        for r in range(0, T, size):
            block = logits_TV[r : r + size].float()
            torch.logsumexp(block, -1, out=lse_T[r : r + size])
            torch.sum(block, -1, out=total_T[r : r + size])
        nll_T = lse_T - logits_TV.gather(1, safe_T[:, None]).squeeze(1).float()
        uniform_T = lse_T - total_T / V
        nll = (nll_T * valid_T).sum() / count
        smoothed = ((1 - smoothing) * nll_T + smoothing * uniform_T).mul(valid_T).sum() / count
        ctx.save_for_backward(logits_TV, safe_T, valid_T, count, lse_T)
        ctx.smoothing = smoothing
        return smoothed, nll

    @staticmethod
    def backward(ctx, g_smoothed, g_nll):
        logits_TV, safe_T, valid_T, count, lse_T = ctx.saved_tensors
        s, (T, V) = ctx.smoothing, logits_TV.shape
        scale_T = valid_T / count
        at_target_T = ((1 - s) * g_smoothed + g_nll) * scale_T
        grad_TV = torch.empty_like(logits_TV)
        size = _CrossEntropy.rows(logits_TV)
        block_rows = torch.arange(size, device=logits_TV.device)
        for r in range(0, T, size):
            rows = slice(r, r + size)
            p = (logits_TV[rows].float() - lse_T[rows, None]).exp_()
            p.mul_(g_smoothed + g_nll).sub_(s / V * g_smoothed).mul_(scale_T[rows, None])
            p[block_rows[: len(p)], safe_T[rows]] -= at_target_T[rows]
            grad_TV[rows] = p
        return grad_TV, None, None, None


def cross_entropy(logits_TV: Tensor, target_T: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """(label-smoothed loss, plain loss), each the mean over targets != ignore_index, as
    `F.cross_entropy` computes them."""
    return _CrossEntropy.apply(logits_TV, target_T, ignore_index, label_smoothing)
