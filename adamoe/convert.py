"""Dense to MoE: start an MoE transformer from a trained dense one (Li et al. 2023, section 4;
sparse upcycling, Komatsuzaki et al. 2022).

Every weight the two models share (embeddings, attention, norms, output, dense FFNs that
stay dense) is copied. Every FFN that became an MoE layer gets a fresh router and experts:
- `random`: freshly initialized experts, the paper's way;
- `copy`: each expert a copy of the FFN it replaces, plus Gaussian noise of `noise` times
  that weight's standard deviation, so that experts can drift apart.

Experts have no biases. A dense FFN trained with biases (`ffn_bias: true`) loses them in
`copy`, with a notice, and its experts then compute something else than the FFN did; train
the dense model with `net.ffn_bias: false` for an exact copy.
"""

from typing import Literal

import torch
from torch import Tensor, nn

from adamoe.errors import CheckpointError
from adamoe.moe import MoELayer

ExpertInit = Literal["random", "copy"]


def convert(
    net: nn.Module,
    dense: dict[str, Tensor],
    experts: ExpertInit = "random",
    noise: float = 0.0,
    source: str = "checkpoint",
) -> list[str]:
    """Load `dense` (the dense model's state dict, keys as in `net`) into `net`, whose MoE
    layers replace some of its FFNs. Returns notices for the user; raises CheckpointError
    for a dense state that does not fit."""
    if experts not in ("random", "copy"):
        raise CheckpointError(f"experts must be 'random' or 'copy', got {experts!r}")
    if any(".experts." in k or ".gate.router." in k for k in dense):
        raise CheckpointError(f"{source} is already an MoE model: convert a dense one (net.moe_every: 0)")
    # A dense target is a new run from the same weights: every weight is copied.
    moe = [name for name, m in net.named_modules() if isinstance(m, MoELayer)]
    ours = net.state_dict()
    in_moe = {k for k in ours if any(k.startswith(f"{m}.") for m in moe)}
    wanted = {k: tuple(v.shape) for k, v in ours.items() if k not in in_moe}
    wanted |= {
        f"{m}.fc1.weight": (ours[f"{m}.experts.w0_EDF"].shape[2], ours[f"{m}.experts.w0_EDF"].shape[1]) for m in moe
    }
    wanted |= {
        f"{m}.fc2.weight": (ours[f"{m}.experts.w1_EFD"].shape[2], ours[f"{m}.experts.w1_EFD"].shape[1]) for m in moe
    }
    problems = [
        f"{k}: checkpoint {tuple(dense[k].shape)}, model {s}"
        for k, s in wanted.items()
        if k in dense and tuple(dense[k].shape) != s
    ]
    problems += [f"missing {k}" for k in wanted if k not in dense]
    extra = [
        k for k in dense if k not in wanted and not any(k.startswith(f"{m}.fc") and k.endswith(".bias") for m in moe)
    ]
    problems += [f"unexpected {k}" for k in extra]
    if problems:
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(problems[:6])}{more}")
    with torch.no_grad():
        for k, v in ours.items():
            if k not in in_moe:
                v.copy_(dense[k])
        notices = []
        for m in moe:
            layer = net.get_submodule(m)
            if experts == "copy":
                for w, fc in ((layer.experts.w0_EDF, "fc1"), (layer.experts.w1_EFD, "fc2")):
                    source_w = dense[f"{m}.{fc}.weight"].t()
                    w.copy_(source_w.expand_as(w))
                    if noise:
                        w.add_(torch.randn_like(w) * noise * source_w.std())
            biases = [
                f"{m}.{fc}.bias" for fc in ("fc1", "fc2") if f"{m}.{fc}.bias" in dense and dense[f"{m}.{fc}.bias"].any()
            ]
            if biases and experts == "copy":
                notices.append(f"{m}: the dense FFN's biases are dropped (experts have none)")
    return notices
