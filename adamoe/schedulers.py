"""Learning-rate schedules, stepped every optimizer step."""

import math

from torch.optim.lr_scheduler import LambdaLR


class WarmupInverseSqrt(LambdaLR):
    """Linear warmup to the optimizer's lr, then decay by 1/sqrt(step) (Vaswani et al.)."""

    def __init__(self, optimizer, warmup_steps: int = 1000):
        w = max(1, warmup_steps)
        super().__init__(optimizer, lambda step: min((step + 1) / w, math.sqrt(w / (step + 1))))


class WarmupCosine(LambdaLR):
    """Linear warmup, then cosine decay to `min_ratio` of the lr at `total_steps`."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 1000, min_ratio: float = 0.0):
        w = max(1, warmup_steps)

        def ratio(step):
            if step < w:
                return (step + 1) / w
            progress = min(1.0, (step - w) / max(1, total_steps - w))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, ratio)
