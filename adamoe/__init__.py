"""adamoe: Mixture-of-Experts transformers with adaptive gating, trained with Lightning."""

from adamoe.gates import AdaptiveGate, Gate, Routing, Top1Gate, Top2Gate
from adamoe.moe import MoELayer
from adamoe.transformer import Transformer

__all__ = ["AdaptiveGate", "Gate", "MoELayer", "Routing", "Top1Gate", "Top2Gate", "Transformer"]
