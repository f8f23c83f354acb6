"""The transformer's parts: positions, attention, the dense FFN, and the pre-LayerNorm block."""

import math

import torch
from torch import Tensor, nn

from adamoe.errors import ConfigError
from adamoe.moe import ACTIVATIONS
from adamoe.ops import Dropout, attention


def sinusoidal_positions(start: int, length: int, d_model: int, device) -> Tensor:
    pos_S1 = torch.arange(start, start + length, device=device, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    pe_SD = torch.zeros(length, d_model, device=device)
    pe_SD[:, 0::2] = torch.sin(pos_S1 * inv_freq)
    pe_SD[:, 1::2] = torch.cos(pos_S1 * inv_freq[: d_model // 2])
    return pe_SD


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def keys_values(self, x_BSD: Tensor) -> tuple[Tensor, Tensor]:
        B, S, D = x_BSD.shape
        k_BHSd, v_BHSd = self.kv_proj(x_BSD).view(B, S, 2, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        return k_BHSd, v_BHSd

    def forward(self, x_BSD: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, mask=None, is_causal=False) -> Tensor:
        B, S, D = x_BSD.shape
        q_BHSd = self.q_proj(x_BSD).view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        o_BHSd = attention(q_BHSd, k_BHSd, v_BHSd, mask, p, is_causal)
        return self.out_proj(o_BHSd.transpose(1, 2).reshape(B, S, D))


class FeedForward(nn.Module):
    """Dense FFN with the MoE layer's call signature, so blocks treat both alike."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x_BSD: Tensor, padding_mask_BS: Tensor | None = None) -> tuple[Tensor, None]:
        return self.fc2(self.activation(self.fc1(x_BSD))), None


class Block(nn.Module):
    """Self-attention, optional cross-attention, FFN; each pre-normed with a residual."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float, cross: bool):
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, dropout)
        self.cross_norm = nn.LayerNorm(d_model) if cross else None
        self.cross_attn = Attention(d_model, n_heads, dropout) if cross else None
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = Dropout(dropout)

    def forward(self, x_BSD, padding_mask_BS, self_mask=None, causal=False, cache=None, memory=None, memory_mask=None):
        h = self.self_norm(x_BSD)
        k, v = self.self_attn.keys_values(h)
        # Decoding cache: per block, the keys and values of all positions so far; a step appends its own.
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # A cached step's query is the newest position alone, which may see every key; a
        # longer query (a prompt, or no cache) starts at position 0 and needs the mask.
        x_BSD = x_BSD + self.drop(self.self_attn(h, k, v, self_mask, is_causal=causal and h.shape[1] > 1))
        if self.cross_attn is not None:
            # The encoder memory does not change while decoding: its keys and values are made once.
            if cache is not None and "memory_k" in cache:
                mk, mv = cache["memory_k"], cache["memory_v"]
            else:
                mk, mv = self.cross_attn.keys_values(memory)
                if cache is not None:
                    cache["memory_k"], cache["memory_v"] = mk, mv
            x_BSD = x_BSD + self.drop(self.cross_attn(self.cross_norm(x_BSD), mk, mv, memory_mask))
        y_BSD, routing = self.ffn(self.ffn_norm(x_BSD), padding_mask_BS)
        return x_BSD + self.drop(y_BSD), routing
