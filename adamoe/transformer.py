"""Pre-LayerNorm encoder-decoder transformer whose FFNs are dense or MoE layers."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from adamoe.blocks import Block, FeedForward, sinusoidal_positions
from adamoe.errors import ConfigError
from adamoe.gates import Gate, Routing, Top2Gate
from adamoe.moe import MoELayer
from adamoe.ops import Dropout

GateFactory = Callable[[int, int], Gate]


@dataclass
class TransformerConfig:
    """The transformer's shape. FFN i (0-based) of each stack is an MoE layer when
    (i + 1) % moe_every == 0; moe_every=0 is fully dense. A stack of 0 layers is left out:
    encoder-only and decoder-only models are the same class.

    Args:
        d_model: width of the residual stream
        n_heads: attention heads
        d_ff: width of each FFN and of each expert
        num_encoder_layers: encoder blocks (0: decoder-only)
        num_decoder_layers: decoder blocks (0: encoder-only)
        num_experts: experts in each MoE layer
        moe_every: every moe_every-th FFN is an MoE layer (0: none)
        gate: how tokens pick experts (adamoe.Top2Gate, adamoe.AdaptiveGate, ...)
        activation: the FFN's nonlinearity: relu, gelu or silu
        capacity_factor: tokens an expert takes, over an even share (null: dropless)
        dropout: dropout of attention weights and of each block's outputs
        tie_embeddings: the output layer shares the embedding's weights
        ffn_bias: dense FFNs have biases (false for a model to be converted into MoE)
    """

    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    num_experts: int = 8
    moe_every: int = 2
    gate: GateFactory = Top2Gate
    activation: str = "relu"
    capacity_factor: float | None = None
    dropout: float = 0.1
    tie_embeddings: bool = True
    # Experts have no biases; a dense model meant to be converted into MoE (`MoEModule`'s
    # `convert_from`) is trained without FFN biases, so that copied experts equal its FFNs.
    ffn_bias: bool = True


class Network(Protocol):
    """A ready network a task can take in place of a `TransformerConfig`: an `nn.Module` with
    `Transformer`'s interface, of which the task calls what it needs (`forward`, `encode`,
    `decode`, `generate`, `continue_text`, `output`). A protocol rather than `nn.Module`, so
    that `--help` does not list every module class there is."""

    def moe_layers(self) -> list[MoELayer]: ...


class LocalSteps:
    """How many decoding steps to take, and whether all sequences are done: this process's
    own answer. `adamoe.parallel.shard_experts` swaps in one that every rank agrees on,
    since each step of a model with sharded experts needs every rank."""

    def limit(self, steps: int) -> int:
        return steps

    def all_done(self, done: Tensor) -> bool:
        return bool(done.all())


# The least each size may be.
SIZES = {
    "d_model": 1,
    "n_heads": 1,
    "d_ff": 1,
    "num_experts": 1,
    "moe_every": 0,
    "num_encoder_layers": 0,
    "num_decoder_layers": 0,
}


class Transformer(nn.Module):
    """Encoder-decoder transformer (Vaswani et al.) with pre-LayerNorm and MoE FFNs.

    `forward` returns the logits and one `Routing` per MoE layer, in the order of
    `moe_layer_names`: encoder layers bottom to top, then decoder layers. Sequences are
    right-padded: the decoder relies on causal masking alone to keep real positions from
    seeing target padding. `vocab_size` and `pad_id` are the tokenizer's, not the shape's.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        c = config
        layers = (c.num_encoder_layers, c.num_decoder_layers)
        too_small = [f"{n} must be at least {m}, got {getattr(c, n)}" for n, m in SIZES.items() if getattr(c, n) < m]
        if too_small or not any(layers):
            raise ConfigError(
                too_small[0] if too_small else "num_encoder_layers and num_decoder_layers cannot both be 0"
            )
        self.config = config
        self.decode_steps = LocalSteps()
        self.pad_id = pad_id
        self.d_model = c.d_model
        self.embed = nn.Embedding(vocab_size, c.d_model, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, std=c.d_model**-0.5)
        self.moe_layer_names: list[str] = []
        # Which tokens each MoE layer routes, in the order of moe_layer_names: callbacks
        # that count tokens per layer read this instead of parsing names.
        self.moe_layer_sides: list[Literal["source", "target"]] = []

        def ffn(stack: str, i: int) -> nn.Module:
            if c.moe_every and (i + 1) % c.moe_every == 0:
                self.moe_layer_names.append(f"{stack}.{i}")
                self.moe_layer_sides.append("source" if stack == "enc" else "target")
                return MoELayer(
                    c.d_model, c.d_ff, c.num_experts, c.gate(c.d_model, c.num_experts), c.activation, c.capacity_factor
                )
            return FeedForward(c.d_model, c.d_ff, c.activation, c.ffn_bias)

        self.encoder = nn.ModuleList(
            Block(c.d_model, c.n_heads, ffn("enc", i), c.dropout, cross=False) for i in range(c.num_encoder_layers)
        )
        cross = c.num_encoder_layers > 0  # decoder-only models have nothing to attend across to
        self.decoder = nn.ModuleList(
            Block(c.d_model, c.n_heads, ffn("dec", i), c.dropout, cross=cross) for i in range(c.num_decoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(c.d_model)
        self.decoder_norm = nn.LayerNorm(c.d_model)
        self.drop = Dropout(c.dropout)
        self.output = nn.Linear(c.d_model, vocab_size, bias=False)
        if c.tie_embeddings:
            self.output.weight = self.embed.weight

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in (*self.encoder, *self.decoder) if isinstance(b.ffn, MoELayer)]

    def forward_flops(self, src_tokens: int, tgt_tokens: int, expert_assignments: int) -> int:
        """Forward FLOPs (2 per multiply-add) of the weight matmuls for a batch with these
        non-padding token counts: every dense weight a token passes through, the routers and
        one expert FFN per assignment; not attention scores, which depend on sequence length."""

        def macs(module):
            return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

        cross_kv = sum(macs(b.cross_attn.kv_proj) for b in self.decoder if b.cross_attn is not None)  # on source tokens
        per_src = sum(macs(b) for b in self.encoder) + cross_kv
        per_tgt = sum(macs(b) for b in self.decoder) - cross_kv + macs(self.output)
        experts = self.moe_layers()
        per_assignment = experts[0].experts.w0_EDF[0].numel() * 2 if experts else 0
        return 2 * (src_tokens * per_src + tgt_tokens * per_tgt + expert_assignments * per_assignment)

    def _embed(self, tokens_BS: Tensor, start: int = 0) -> Tensor:
        pos_SD = sinusoidal_positions(start, tokens_BS.shape[1], self.d_model, tokens_BS.device)
        return self.drop(self.embed(tokens_BS) * math.sqrt(self.d_model) + pos_SD)

    def encode(self, src_BS: Tensor, src_pad_BS: Tensor) -> tuple[Tensor, list[Routing]]:
        mask = ~src_pad_BS[:, None, None, :]
        x, routings = self._embed(src_BS), []
        for block in self.encoder:
            x, r = block(x, src_pad_BS, self_mask=mask)
            routings += [r] if r is not None else []
        return self.encoder_norm(x), routings

    def decode(
        self,
        tgt_BS,
        memory_BSD=None,
        src_pad_BS=None,
        tgt_pad_BS=None,
        cache=None,
        start: int = 0,
        project: bool = True,
    ):
        """Decoder logits, or with `project=False` the states `output` projects (for a loss that
        fuses it, `ops.linear_cross_entropy`). Decoder-only models pass no `memory_BSD`."""
        memory_mask = None if memory_BSD is None else ~src_pad_BS[:, None, None, :]
        x, routings = self._embed(tgt_BS, start), []
        for i, block in enumerate(self.decoder):
            x, r = block(
                x,
                tgt_pad_BS,
                causal=True,
                cache=None if cache is None else cache[i],
                memory=memory_BSD,
                memory_mask=memory_mask,
            )
            routings += [r] if r is not None else []
        x = self.decoder_norm(x)
        return self.output(x) if project else x, routings

    def forward(
        self, src_BS, tgt_in_BS, src_pad_BS=None, tgt_pad_BS=None, project: bool = True
    ) -> tuple[Tensor, list[Routing]]:
        src_pad_BS = src_BS.eq(self.pad_id) if src_pad_BS is None else src_pad_BS
        tgt_pad_BS = tgt_in_BS.eq(self.pad_id) if tgt_pad_BS is None else tgt_pad_BS
        memory, enc_routings = self.encode(src_BS, src_pad_BS)
        out, dec_routings = self.decode(tgt_in_BS, memory, src_pad_BS, tgt_pad_BS, project=project)
        return out, enc_routings + dec_routings

    @torch.no_grad()
    def generate(
        self,
        src_BS: Tensor,
        bos_id: int,
        eos_id: int,
        max_len: int,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> Tensor:
        """Greedy (beam_size=1) or beam search: [B, <=max_len] tokens, pad after eos. Finished
        beams stay in the beam with a frozen score; the final pick divides each score by
        length ** length_penalty."""
        B, K = src_BS.shape[0], beam_size
        src_pad = src_BS.eq(self.pad_id)
        memory, _ = self.encode(src_BS, src_pad)
        memory, src_pad = memory.repeat_interleave(K, 0), src_pad.repeat_interleave(K, 0)
        ys = torch.full((B * K, 1), bos_id, dtype=torch.long, device=src_BS.device)
        scores = torch.zeros(B, K, device=src_BS.device)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive
        done = torch.zeros(B * K, dtype=torch.bool, device=src_BS.device)
        cache = [{} for _ in self.decoder] if use_cache else None
        for t in range(self.decode_steps.limit(max_len)):
            if t >= max_len:  # only keeping other ranks company: freeze every beam
                done = torch.ones_like(done)
            if use_cache:
                logits, _ = self.decode(ys[:, -1:], memory, src_pad, cache=cache, start=t)
            else:
                logits, _ = self.decode(ys, memory, src_pad)
            logp = logits[:, -1].float().log_softmax(-1)
            # A finished beam may only extend itself with padding, at no cost: its score is
            # frozen and it competes with the live beams as it is.
            logp[done] = float("-inf")
            logp[done, self.pad_id] = 0.0
            V = logp.shape[-1]
            # The K best (beam, token) pairs of each sentence, over all K x V extensions.
            scores, flat = (scores.view(-1, 1) + logp).view(B, K * V).topk(K, -1)
            beam_BK, token = flat // V, (flat % V).view(-1)
            # Row of the parent beam in the flat [B * K] layout: each new beam copies its
            # parent's tokens, finished flag and cache.
            rows = (beam_BK + torch.arange(B, device=flat.device).unsqueeze(1) * K).view(-1)
            ys = torch.cat([ys[rows], token.unsqueeze(1)], 1)
            done = done[rows] | token.eq(eos_id)
            if cache is not None:
                for c in cache:
                    c["k"], c["v"] = c["k"][rows], c["v"][rows]
            if self.decode_steps.all_done(done):
                break
        out = ys[:, 1 : max_len + 1]
        lengths = out.ne(self.pad_id).sum(1).clamp_min(1).view(B, K).float()
        best = (scores / lengths**length_penalty).argmax(-1)
        return out.view(B, K, -1)[torch.arange(B, device=out.device), best]

    @torch.no_grad()
    def continue_text(
        self,
        prefix_BS: Tensor,
        eos_id: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        generator=None,
    ) -> Tensor:
        """Decoder-only continuation of equal-length prompts: greedy at temperature 0, else
        sampled (from the `top_k` most likely tokens when top_k > 0). Returns the new
        tokens [B, <=max_new_tokens], pad after eos."""
        cache = [{} for _ in self.decoder]
        logits, _ = self.decode(prefix_BS, cache=cache)
        done = torch.zeros(prefix_BS.shape[0], dtype=torch.bool, device=prefix_BS.device)
        out = []
        for t in range(self.decode_steps.limit(max_new_tokens)):
            if t >= max_new_tokens:
                done = torch.ones_like(done)
            last = logits[:, -1].float()
            if temperature > 0:
                if top_k > 0:
                    kth = last.topk(min(top_k, last.shape[-1]), -1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                token = torch.multinomial((last / temperature).softmax(-1), 1, generator=generator).squeeze(1)
            else:
                token = last.argmax(-1)
            token = token.masked_fill(done, self.pad_id)
            out.append(token)
            done = done | token.eq(eos_id)
            if self.decode_steps.all_done(done):
                break
            logits, _ = self.decode(token.unsqueeze(1), cache=cache, start=prefix_BS.shape[1] + t)
        return torch.stack(out, 1)[:, :max_new_tokens]
