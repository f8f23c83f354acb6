"""The paper's Table 1 for our MoE layer: does time follow computation?

Forward + backward of one MoELayer (d_model 512, d_ff 2048, 16 experts, 4096 tokens,
fp32) under top-2, top-1, adaptive gating with 80/50/20% of tokens on one expert and
the dynamic-k gates (top-p, null experts, ReLU), beside the same FLOPs as top-2 run
dense: a plain autograd FFN, and its six GEMMs alone (the limit). Rows run
interleaved; each ratio is the median over repeats of the row's time over top-2's time
in the same repeat, so that drift of the machine's speed during the run cancels. The
gap's interval comes from resampling the repeats (bootstrap): how far a rerun on the
same machine, in the same state, could move it.

    python benchmarks/moe_layer.py [--repeats 15] [--tokens 4096] [--keep-freed-memory] [--device cuda]
"""

import argparse
import random
import statistics

import torch
import torch.nn.functional as F
from throughput import timed

from adamoe.dynamic_gates import NullExpertGate, ReLUGate, TopPGate
from adamoe.gates import AdaptiveGate, Top1Gate, Top2Gate
from adamoe.memory import keep_freed_memory
from adamoe.moe import MoELayer


def adaptive_with_single_share(layer_top2: MoELayer, x_TD: torch.Tensor, single_share: float) -> MoELayer:
    """An adaptive layer with the same weights whose threshold puts `single_share` of tokens on one expert."""
    with torch.no_grad():
        p_TK = layer_top2.gate.router(x_TD).softmax(-1).topk(2, -1).values
        gap_T = (p_TK[:, 0] - p_TK[:, 1]) / p_TK.sum(-1)
        threshold = torch.quantile(gap_T, 1 - single_share).item()
    D, E = x_TD.shape[1], layer_top2.num_experts
    layer = MoELayer(D, layer_top2.experts.w0_EDF.shape[2], E, AdaptiveGate(D, E, threshold=threshold))
    layer.load_state_dict(layer_top2.state_dict())
    return layer


def top_p_for(layer_top2: MoELayer, x_TD: torch.Tensor, experts_per_token: float) -> float:
    """The p at which top-p routing over this router gives `experts_per_token` on average."""
    with torch.no_grad():
        cum_TE = layer_top2.gate.router(x_TD).softmax(-1).sort(-1, descending=True).values.cumsum(-1)
    low, high = 0.0, 1.0
    for _ in range(40):  # the mean count rises with p: bisect
        p = (low + high) / 2
        low, high = (p, high) if ((cum_TE < p).sum(-1) + 1).float().mean() < experts_per_token else (low, p)
    return (low + high) / 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--keep-freed-memory", action="store_true", help="as the KeepFreedMemory callback does")
    args = ap.parse_args()
    kept = args.keep_freed_memory and keep_freed_memory()
    device = torch.device(args.device)
    torch.set_default_device(device)
    torch.manual_seed(0)
    T, D, Fd, E = args.tokens, args.d_model, args.d_ff, args.experts
    x_BSD = torch.randn(1, T, D)
    top2 = MoELayer(D, Fd, E, Top2Gate(D, E))
    top1 = MoELayer(D, Fd, E, Top1Gate(D, E))
    top1.load_state_dict(top2.state_dict())
    rows = {"top-2": top2, "top-1": top1}
    for share in (0.8, 0.5, 0.2):
        rows[f"adaptive {share:.0%} top-1"] = adaptive_with_single_share(top2, x_BSD[0], share)
    # The dynamic-k gates, with top-2's experts (and router, where it has the shape): first
    # where they spend less than top-2, as adaptive does (the test of their dispatch), then
    # where they send most tokens to more than two experts.
    for name, gate in (
        ("top-p, 1.5 per token", TopPGate(D, E, p=top_p_for(top2, x_BSD[0], 1.5))),
        ("null experts k=2", NullExpertGate(D, E, k=2, num_null=4)),
        ("relu, at most 1", ReLUGate(D, E, max_experts=1)),
        ("top-p 0.5", TopPGate(D, E, p=0.5)),
        ("relu, at most 3", ReLUGate(D, E, max_experts=3)),
    ):
        rows[name] = MoELayer(D, Fd, E, gate)
        rows[name].experts.load_state_dict(top2.experts.state_dict())
        if gate.router.weight.shape == top2.gate.router.weight.shape:
            rows[name].gate.router.load_state_dict(top2.gate.router.state_dict())
    w0, w1 = torch.randn(D, Fd) / D**0.5, torch.randn(Fd, D) / Fd**0.5
    w0.requires_grad_()
    w1.requires_grad_()
    x_dense = torch.randn(2 * T, D, requires_grad=True)  # top-2's assignments, as one dense FFN
    # Real, dense output gradients: `.sum()`'s broadcast gradient would send the GEMMs down slow paths.
    grad_y, grad_dense = torch.randn_like(x_BSD), torch.randn_like(x_dense)

    def run_moe(layer):
        layer.zero_grad(set_to_none=True)
        x = x_BSD.detach().requires_grad_()
        y, routing = layer(x)
        torch.autograd.backward([y, routing.aux_loss], [grad_y, None])
        return routing.token_index_N.numel()

    def run_dense():
        w0.grad = w1.grad = x_dense.grad = None
        F.relu(x_dense @ w0).matmul(w1).backward(grad_dense)

    # The strict limit: only the six GEMMs of a dense FFN's forward and backward, into
    # preallocated outputs, with no activation, allocation or autograd cost.
    X, W0, W1, G = x_dense.detach(), w0.detach(), w1.detach(), grad_dense
    A, Y = X.new_empty(2 * T, Fd), torch.empty_like(X)
    gW0, gW1, gA, gX = torch.empty_like(W0), torch.empty_like(W1), torch.empty_like(A), torch.empty_like(X)

    def run_gemms():
        torch.mm(X, W0, out=A)
        torch.mm(A, W1, out=Y)
        torch.mm(A.t(), G, out=gW1)
        torch.mm(G, W1.t(), out=gA)
        torch.mm(X.t(), gA, out=gW0)
        torch.mm(gA, W0.t(), out=gX)

    def run_naive():
        """The trap this layer avoids: plain autograd through `w[e]` on stacked weights,
        which makes every expert's backward write a full-size [E, ...] gradient."""
        layer = top2
        layer.zero_grad(set_to_none=True)
        x_TD = x_BSD[0].detach().requires_grad_()
        r = layer.gate(x_TD)
        order = torch.argsort(r.expert_index_N, stable=True)
        tok, w = r.token_index_N[order], r.weight_N[order]
        y, start = torch.zeros_like(x_TD), 0
        for e, n in enumerate(r.expert_load_E.tolist()):
            t = tok[start : start + n]
            h = F.relu(x_TD[t] @ layer.experts.w0_EDF[e]) @ layer.experts.w1_EFD[e]
            y = y.index_add(0, t, h * w[start : start + n, None])
            start += n
        y.backward(grad_y[0])

    assignments = {name: run_moe(layer) for name, layer in rows.items()}
    times = {name: [] for name in [*rows, "naive autograd top-2", "dense FFN", "dense GEMMs"]}

    for _ in range(args.warmup + args.repeats):
        for name, layer in rows.items():
            times[name].append(timed(run_moe, layer))
        for name, fn in (("naive autograd top-2", run_naive), ("dense FFN", run_dense), ("dense GEMMs", run_gemms)):
            times[name].append(timed(fn))
    times = {name: ts[args.warmup :] for name, ts in times.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    per_repeat = {name: [a / b for a, b in zip(ts, times["top-2"])] for name, ts in times.items()}
    ratio = {name: statistics.median(rs) for name, rs in per_repeat.items()}
    computation = {name: assignments[name] / assignments["top-2"] for name in rows}

    table1 = [name for name in rows if name == "top-1" or name.startswith("adaptive")]  # the paper's rows

    def max_gap(repeats: list[int]) -> float:
        return max(abs(statistics.median([per_repeat[n][i] for i in repeats]) - computation[n]) for n in table1)

    draw = random.Random(0)
    resampled = sorted(max_gap(draw.choices(range(args.repeats), k=args.repeats)) for _ in range(1000))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    memory = "kept" if kept else "returned"
    print(
        f"MoE layer fwd+bwd, {T} tokens, d_model {D}, d_ff {Fd}, {E} experts, fp32, {where}, {args.repeats} repeats, "
        f"memory {memory}"
    )
    print(f"{'gate':<22}{'computation':>12}{'time':>8}{'gap':>8}{'median ms':>11}")
    for name in rows:
        gap = ratio[name] - computation[name]
        print(f"{name:<22}{computation[name]:>12.3f}{ratio[name]:>8.3f}{gap:>+8.3f}{med[name] * 1e3:>11.1f}")
    for name in ("naive autograd top-2", "dense FFN", "dense GEMMs"):
        label = name if name.startswith("naive") else name + " (top-2 FLOPs)"
        print(f"{label:<26}{1.0:>8.3f}{ratio[name]:>8.3f}{'':>8}{med[name] * 1e3:>11.1f}")
    print(f"gemm_efficiency={ratio['dense GEMMs']:.3f}  (the stricter limit: GEMMs alone)")
    interval = f"90% bootstrap interval {resampled[50]:.3f}-{resampled[949]:.3f}"
    print(f"table1_max_gap={max_gap(list(range(args.repeats))):.3f} ({interval}) efficiency={ratio['dense FFN']:.3f}")


if __name__ == "__main__":
    main()
