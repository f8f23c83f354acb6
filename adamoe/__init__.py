"""adamoe: Mixture-of-Experts transformers with adaptive gating, trained with Lightning."""

from adamoe.gates import AdaptiveGate, Gate, Routing, Top1Gate, Top2Gate
from adamoe.moe import MoELayer
from adamoe.transformer import Transformer

LIGHTNING_MODULES = ("ClassificationModule", "LanguageModelModule", "MoEModule", "TranslationModule")

__all__ = ["AdaptiveGate", "Gate", "MoELayer", "Routing", "Top1Gate", "Top2Gate", "Transformer", *LIGHTNING_MODULES]


def __getattr__(name):
    # The task modules load Lightning and torchmetrics: only on first use, so that the plain
    # model code (gates, MoE layer, transformer) imports without them.
    if name in LIGHTNING_MODULES:
        from adamoe import module

        return getattr(module, name)
    raise AttributeError(f"module 'adamoe' has no attribute {name!r}")
