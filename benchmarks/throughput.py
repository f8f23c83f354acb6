"""Training-step throughput of our model against Hugging Face transformers' MoE models.

Same sizes for all: vocab 8000, d_model 256, FFN 1024, 8 experts, 4 encoder + 4 decoder
layers, MoE every 2nd layer, 2048 source + 2048 target tokens per step, no dropout,
capacity large enough to drop nothing. A step is forward, backward and AdamW (fused, on
both sides).
- ours top-2 against NLLB-MoE (GShard-style top-2);
- ours top-1 against Switch Transformers (top-1).
Models run alternately in one process, a round of every model at a time; the ratios are
medians of the ratios within a round. MFU is the FLOPs of our
top-2 step (counted by torch's FlopCounterMode) per second, over the rate of a 2048^2
matmul of the same precision, measured in the same run.

`--precision bf16-mixed` runs the comparison under bf16 autocast, and also times our
training step at the Multi30k size (`configs/multi30k.yaml` with adaptive gating, batches
of 4,096 tokens, dropout 0.2) in fp32 and in bf16-mixed, interleaved, on the recorded
batches of `--data` (Multi30k's folder) or on batches of Multi30k's shapes without it.
`--profile` prints where our top-2 step spends its time, and the ceiling on vs Switch: its
profiled step over our top-1 step's matmul and attention kernels alone. `--keep-freed-memory` runs every
model with freed memory kept in the process (the default of `train.py`, see
`adamoe.callbacks.KeepFreedMemory`); without it the allocator keeps glibc's defaults.
`--device cuda` runs it all on a GPU.

    pip install -e ".[bench]"
    python benchmarks/throughput.py [--precision bf16-mixed] [--profile] [--keep-freed-memory] [--device cuda]
"""

import argparse
import functools
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from adamoe.gates import AdaptiveGate, Top1Gate, Top2Gate
from adamoe.memory import keep_freed_memory
from adamoe.ops import linear_cross_entropy
from adamoe.transformer import Transformer, TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
V, D, FF, E, LAYERS = 8000, 256, 1024, 8, 4
DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
# Where a step's self time goes, by the name of the ATen op.
GROUPS = {
    "matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention kernels": ("flash_attention",),
    "loss over the vocabulary": ("log_softmax", "_LinearCrossEntropy", "aten::exp", "amax"),
    "optimizer": ("adam",),
    "dropout": ("bernoulli", "aten::random_", "aten::arange"),
    "zero fills": ("aten::fill_", "aten::zero_"),
    "copies and casts": ("aten::copy_", "aten::_to_copy"),
    "gather, scatter, sort": ("index", "scatter", "gather", "sort"),
}


def ours(gate):
    model = Transformer(TransformerConfig(D, 4, FF, LAYERS, LAYERS, E, 2, gate, dropout=0.0), V)

    def step(src, tgt):
        tgt_in = F.pad(tgt, (1, 0), value=1)[:, :-1]
        h_BSD, routings = model(src, tgt_in, project=False)
        return linear_cross_entropy(h_BSD.flatten(0, 1), model.output.weight, tgt.flatten())[0] + sum(
            r.aux_loss for r in routings
        )

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
            vocab_size=V,
            d_model=D,
            encoder_layers=LAYERS,
            decoder_layers=LAYERS,
            encoder_ffn_dim=FF,
            decoder_ffn_dim=FF,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            num_experts=E,
            expert_capacity=tokens,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            second_expert_policy="all",
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            moe_token_dropout=0.0,
            router_aux_loss_coef=0.01,
            max_position_embeddings=1024,
            output_router_logits=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    )
    switch = SwitchTransformersForConditionalGeneration(
        SwitchTransformersConfig(
            vocab_size=V,
            d_model=D,
            d_kv=D // 4,
            d_ff=FF,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_sparse_encoder_layers=LAYERS // 2,
            num_sparse_decoder_layers=LAYERS // 2,
            num_heads=4,
            num_experts=E,
            expert_capacity=tokens,
            dropout_rate=0.0,
            router_jitter_noise=0.0,
            router_aux_loss_coef=0.01,
            output_router_logits=True,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    )

    def hf_step(model):
        def step(src, tgt):
            return model(input_ids=src, attention_mask=torch.ones_like(src), labels=tgt).loss

        return step

    return (nllb, hf_step(nllb)), (switch, hf_step(switch))


def timed(fn, *args) -> float:
    """Seconds of `fn(*args)`, waiting for the GPU's queue on both sides."""
    cuda = torch.get_default_device().type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def matmul_rate(dtype, n=2048, repeats=5) -> float:
    a, b, c = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype), torch.empty(n, n, dtype=dtype)
    timed(torch.mm, a, b)
    return 2 * n**3 / statistics.median(timed(lambda: torch.mm(a, b, out=c)) for _ in range(repeats))


def training_step(step, optimizer, dtype):
    """Forward under autocast as Lightning's bf16-mixed runs it; backward and AdamW outside."""

    def run(*batch):
        with torch.autocast(torch.get_default_device().type, torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = step(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def self_times(run, batch, steps=3) -> dict[str, tuple[float, int]]:
    """Per step, the self CPU seconds and the calls of each ATen op (and of our autograd Functions) in `run`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.get_default_device().type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run(*batch)
    return {
        e.key: (e.self_cpu_time_total / 1e6 / steps, e.count // steps)
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    }


def group_of(op: str) -> str:
    return next((g for g, keys in GROUPS.items() if any(k in op for k in keys)), "the rest")


def print_profile(run, batch, steps=3):
    times = self_times(run, batch, steps)
    total = sum(t for t, _ in times.values())
    shares = dict.fromkeys([*GROUPS, "the rest"], 0.0)
    for op, (t, _) in times.items():
        shares[group_of(op)] += t / total
    print(f"\nwhere ours top-2 spends a training step ({steps} steps, self CPU time {total:.3f} s per step)")
    for group, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"{share:>6.1%}  {group}")
    print("top ops:")
    for op, (t, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"{t / total:>6.1%}  {op[:60]:<60} {calls:>5} calls/step")


def compare_with_hf(args, dtype):
    torch.manual_seed(0)
    src = torch.randint(3, V, (args.batch, args.seq))
    tgt = torch.randint(3, V, (args.batch, args.seq))
    tokens = src.numel()
    (nllb, nllb_step), (switch, switch_step) = hf_models(tokens)
    nllb.to(src.device), switch.to(src.device)  # built by transformers on the CPU
    models = {
        "ours top-2": ours(Top2Gate),
        "nllb-moe top-2": (nllb, nllb_step),
        "ours top-1": ours(Top1Gate),
        "switch top-1": (switch, switch_step),
    }
    runs = {
        name: training_step(step, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), dtype)
        for name, (m, step) in models.items()
    }
    flops = {}
    for name, run in runs.items():
        with FlopCounterMode(display=False) as counter:
            run(src, tgt)
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in runs}
    rates = []
    for _ in range(args.warmup + args.repeats):
        rates.append(matmul_rate(dtype))
        for name, run in runs.items():
            times[name].append(timed(run, src, tgt))
    med = {name: statistics.median(ts[args.warmup :]) for name, ts in times.items()}
    peak = statistics.median(rates)

    print(f"\ntraining step, {args.batch}x{args.seq} source + target tokens, {args.precision}, {args.repeats} repeats")
    print(f"{'model':<16}{'params':>10}{'GFLOP/step':>12}{'median s':>10}{'tokens/s':>10}")
    for name, (model, _) in models.items():
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<16}{n / 1e6:>9.2f}M{flops[name] / 1e9:>12.1f}{med[name]:>10.3f}{2 * tokens / med[name]:>10.0f}")
    print(f"dense matmul rate ({dtype}) {peak / 1e9:.1f} GFLOP/s")
    if args.profile:
        print_profile(runs["ours top-2"], (src, tgt))
        # How far removing all of our non-matmul work could go: Switch's step is mostly the same
        # matmuls. Both sides are read from the profiler, whose per-op cost a timed step lacks.
        top1_ops, switch_ops = (self_times(runs[name], (src, tgt)) for name in ("ours top-1", "switch top-1"))
        kernels = sum(
            t for op, (t, _) in top1_ops.items() if group_of(op) in ("matrix multiplies", "attention kernels")
        )
        step, switch_step = (sum(t for t, _ in ops.values()) for ops in (top1_ops, switch_ops))
        print(f"ours top-1 spends {kernels:.3f} s of its {step:.3f} s profiled step in matmul and attention kernels;")
        print(
            f"with all the rest free, vs_switch_top1 would be {switch_step / kernels:.2f} (Switch's profiled step: "
            f"{switch_step:.3f} s)"
        )
    mfu = flops["ours top-2"] / med["ours top-2"] / peak
    # Each round runs every model once, so a ratio within a round cancels the machine's drift.
    vs_nllb, vs_switch = (
        statistics.median(a / b for a, b in zip(times[peer][args.warmup :], times[mine][args.warmup :]))
        for peer, mine in (("nllb-moe top-2", "ours top-2"), ("switch top-1", "ours top-1"))
    )
    return f"vs_nllb_top2={vs_nllb:.2f} vs_switch_top1={vs_switch:.2f} mfu={mfu:.2f}"


def multi30k_batches(data: str | None, n: int) -> list[dict]:
    if data:
        from adamoe.data import ParallelText, TranslationData

        source = ParallelText(data, "de", "en", test="test_2016_flickr")
        dm = TranslationData(source, vocab_size=V, max_tokens=4096, cache_dir=str(ROOT / "data"))
        dm.prepare_data()
        dm.setup("fit")
        device = torch.get_default_device()
        return [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for batch, _ in zip(dm.train_dataloader(), range(n))
        ]
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    shapes = [(256, 16), (204, 20), (146, 28), (240, 17), (114, 35), (170, 24), (227, 18), (157, 26)]
    out = []
    for B, S in (shapes * n)[:n]:
        src, tgt = torch.randint(3, V, (B, S), generator=g), torch.randint(3, V, (B, S + 1), generator=g)
        out.append(
            {
                "src": src,
                "src_pad": src.eq(0),
                "tgt_in": tgt[:, :-1],
                "tgt_out": tgt[:, 1:],
                "tgt_pad": tgt[:, :-1].eq(0),
            }
        )
    return out


def multi30k_times(data: str | None, n_batches: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of our Multi30k training steps, per batch and pass, fp32 and bf16-mixed interleaved."""
    from adamoe.tasks import TranslationModule

    batches = multi30k_batches(data, n_batches)
    runs = {}
    for name, dtype in DTYPES.items():
        torch.manual_seed(0)
        net = TransformerConfig(
            num_experts=8, moe_every=2, dropout=0.2, gate=functools.partial(AdaptiveGate, threshold=0.1)
        )
        module = TranslationModule(net=net, vocab_size=V).train()
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01, fused=True)

        def loss_with_aux(batch, module=module):
            loss, _, routings = module.step(batch)
            return loss + sum(r.aux_loss for r in routings)

        runs[name] = training_step(loss_with_aux, optimizer, dtype)
    times = {name: [] for name in runs}
    for rep in range(2 + repeats):
        for batch in batches:
            for name, run in runs.items():
                t = timed(run, batch)
                if rep >= 2:  # the first passes meet each batch shape for the first time
                    times[name].append(t)
    return times


def multi30k_step(args) -> float:
    """Median per-batch time ratio fp32 / bf16-mixed of our Multi30k training step."""
    times = multi30k_times(args.data, args.batches, args.repeats)
    ratio = statistics.median([a / b for a, b in zip(times["32-true"], times["bf16-mixed"])])
    source = args.data or "batches of Multi30k's shapes"
    print(
        f"\nMulti30k training step ({args.batches} batches from {source}, {args.repeats} passes after 2 warm-up passes)"
    )
    for name, ts in times.items():
        print(f"{name:<12} median {statistics.median(ts):.3f} s")
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=list(DTYPES), default="32-true")
    ap.add_argument("--profile", action="store_true", help="print where our top-2 step spends its time")
    ap.add_argument("--data", help="Multi30k's folder, for the bf16-mixed Multi30k step")
    ap.add_argument("--batches", type=int, default=8, help="Multi30k batches per pass")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--keep-freed-memory", action="store_true", help="as the KeepFreedMemory callback does, for every model"
    )
    args = ap.parse_args()
    torch.set_default_device(args.device)
    kept = args.keep_freed_memory and keep_freed_memory()
    cpu = cpu_model()
    flags = open("/proc/cpuinfo").read()
    # AMX, or AVX-512 BF16's dot products (2.4x the fp32 matmul rate on an AMD EPYC).
    fast_bf16 = "amx_bf16" in flags or "avx512_bf16" in flags or args.device.startswith("cuda")
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    bf16 = ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "none"
    memory = "kept" if kept else "returned (glibc default)"
    print(
        f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}, bf16 instructions: {bf16}, freed "
        f"memory {memory}"
    )
    dtype = DTYPES[args.precision]
    summary = compare_with_hf(args, dtype)
    if dtype == torch.bfloat16:
        ratio = multi30k_step(args)
        note = "" if fast_bf16 else " (this machine has no fast bf16: no AMX, no AVX-512 BF16 and no GPU)"
        print(f"bf16_speedup={ratio:.2f}{note}")
    print(summary)


if __name__ == "__main__":
    main()
