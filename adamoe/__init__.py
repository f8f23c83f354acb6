"""adamoe: Mixture-of-Experts transformers with adaptive gating, trained with Lightning.

Tensor names end in their shape, one letter a dimension, each letter with one meaning:

    B  sequences in a batch          T  tokens of a batch, flattened (B x S)
    S  positions in a sequence       R  real (non-padding) tokens, the router's inputs
    D  model width (d_model)         E  experts
    d  width of one attention head   K  choices kept by a top-k: a gate's experts, a search's beams
    H  attention heads               N  assignments: (token, expert) pairs
    F  FFN hidden width (d_ff)       P  assignments padded to whole row buckets
    V  vocabulary                    M  assignments a rank receives from all ranks
    L  MoE layers                    W  ranks (DDP processes)
    I  training steps                C  columns of a statistics row
"""

from adamoe.dynamic_gates import NullExpertGate, ReLUGate, TopPGate
from adamoe.gates import AdaptiveGate, Gate, Routing, Top1Gate, Top2Gate
from adamoe.moe import MoELayer
from adamoe.transformer import Transformer, TransformerConfig

LIGHTNING_MODULES = ("ClassificationModule", "LanguageModelModule", "MoEModule", "TranslationModule")

__all__ = [
    "AdaptiveGate",
    "Gate",
    "MoELayer",
    "NullExpertGate",
    "ReLUGate",
    "Routing",
    "Top1Gate",
    "Top2Gate",
    "TopPGate",
    "Transformer",
    "TransformerConfig",
    *LIGHTNING_MODULES,
]


def __getattr__(name):
    # The tasks load Lightning and torchmetrics: only on first use, so that the plain model
    # code (gates, MoE layer, transformer) imports without them.
    if name in LIGHTNING_MODULES:
        from adamoe import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'adamoe' has no attribute {name!r}")
