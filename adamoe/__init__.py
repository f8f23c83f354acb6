"""adamoe: Mixture-of-Experts transformers with adaptive gating, trained with Lightning."""

from adamoe.gates import AdaptiveGate, Gate, Routing, Top1Gate, Top2Gate
from adamoe.module import ClassificationModule, LanguageModelModule, MoEModule, TranslationModule
from adamoe.moe import MoELayer
from adamoe.transformer import Transformer

__all__ = [
    "AdaptiveGate", "ClassificationModule", "Gate", "LanguageModelModule", "MoELayer", "MoEModule", "Routing", "Top1Gate",
    "Top2Gate", "Transformer", "TranslationModule",
]  # fmt: skip
