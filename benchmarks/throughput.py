"""Training-step throughput of our model against Hugging Face transformers' MoE models.

Same sizes for all: vocab 8000, d_model 256, FFN 1024, 8 experts, 4 encoder + 4 decoder
layers, MoE every 2nd layer, 2048 source + 2048 target tokens per step, fp32, no dropout,
capacity large enough to drop nothing. A step is forward, backward and AdamW.
- ours top-2 against NLLB-MoE (GShard-style top-2);
- ours top-1 against Switch Transformers (top-1).
Models run alternately in one process; medians are reported. MFU is the active FLOPs of
our top-2 step (counted by torch's FlopCounterMode) per second, over the dense matmul
rate of this machine measured in the same run.

    pip install -e ".[bench]"; python benchmarks/throughput.py [--repeats 7]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from adamoe.gates import Top1Gate, Top2Gate
from adamoe.transformer import Transformer

V, D, FF, E, LAYERS = 8000, 256, 1024, 8, 4


def ours(gate):
    model = Transformer(V, 0, D, 4, FF, LAYERS, LAYERS, E, 2, gate, dropout=0.0)

    def step(src, tgt):
        tgt_in = F.pad(tgt, (1, 0), value=1)[:, :-1]
        logits, routings = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1)) + sum(r.aux_loss for r in routings)
        return loss

    return model, step


def hf_models(tokens: int):
    from transformers import (
        NllbMoeConfig,
        NllbMoeForConditionalGeneration,
        SwitchTransformersConfig,
        SwitchTransformersForConditionalGeneration,
    )

    nllb = NllbMoeForConditionalGeneration(
        NllbMoeConfig(
            vocab_size=V, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
            encoder_attention_heads=4, decoder_attention_heads=4, num_experts=E, expert_capacity=tokens,
            encoder_sparse_step=2, decoder_sparse_step=2, second_expert_policy="all", dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, moe_token_dropout=0.0, router_aux_loss_coef=0.01, max_position_embeddings=1024,
            output_router_logits=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )
    )  # fmt: skip
    switch = SwitchTransformersForConditionalGeneration(
        SwitchTransformersConfig(
            vocab_size=V, d_model=D, d_kv=D // 4, d_ff=FF, num_layers=LAYERS, num_decoder_layers=LAYERS,
            num_sparse_encoder_layers=LAYERS // 2, num_sparse_decoder_layers=LAYERS // 2, num_heads=4, num_experts=E,
            expert_capacity=tokens, dropout_rate=0.0, router_jitter_noise=0.0, router_aux_loss_coef=0.01,
            output_router_logits=True, pad_token_id=0, eos_token_id=2, decoder_start_token_id=1,
        )
    )  # fmt: skip

    def hf_step(model):
        def step(src, tgt):
            return model(input_ids=src, attention_mask=torch.ones_like(src), labels=tgt).loss

        return step

    return (nllb, hf_step(nllb)), (switch, hf_step(switch))


def matmul_rate(n=2048, repeats=5) -> float:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    src = torch.randint(3, V, (args.batch, args.seq))
    tgt = torch.randint(3, V, (args.batch, args.seq))
    tokens = src.numel()
    (nllb, nllb_step), (switch, switch_step) = hf_models(tokens)
    runs = {"ours top-2": ours(Top2Gate), "nllb-moe top-2": (nllb, nllb_step), "ours top-1": ours(Top1Gate), "switch top-1": (switch, switch_step)}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in runs.items()}

    def train_step(name):
        model, step = runs[name]
        optims[name].zero_grad(set_to_none=True)
        step(src, tgt).backward()
        optims[name].step()

    flops = {}
    for name in runs:
        with FlopCounterMode(display=False) as counter:
            train_step(name)
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in runs}
    rates = []
    for i in range(args.warmup + args.repeats):
        rates.append(matmul_rate())
        for name in runs:
            t = time.perf_counter()
            train_step(name)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts[args.warmup :]) for name, ts in times.items()}
    peak = statistics.median(rates)

    print(f"training step, {args.batch}x{args.seq} source + target tokens, fp32, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'model':<16}{'params':>10}{'GFLOP/step':>12}{'median s':>10}{'tokens/s':>10}")
    for name, (model, _) in runs.items():
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<16}{n / 1e6:>9.2f}M{flops[name] / 1e9:>12.1f}{med[name]:>10.3f}{2 * tokens / med[name]:>10.0f}")
    mfu = flops["ours top-2"] / med["ours top-2"] / peak
    print(f"dense matmul rate {peak / 1e9:.1f} GFLOP/s")
    print(f"vs_nllb_top2={med['nllb-moe top-2'] / med['ours top-2']:.2f} vs_switch_top1={med['switch top-1'] / med['ours top-1']:.2f} mfu={mfu:.2f}")


if __name__ == "__main__":
    main()
