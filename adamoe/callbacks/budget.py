"""A compute budget that the gates keep: a target mean number of experts per token."""

import torch
from lightning.pytorch import Callback

from adamoe.errors import ConfigError


def step_knob(value: float, mean: float, target: float, rate: float, low: float, high: float) -> float:
    """One controller step: move the knob by `rate` times the distance to the target,
    within [low, high]. Every gate's knob raises the experts per token as it rises."""
    return min(high, max(low, value + rate * (target - mean)))


class Budget(Callback):
    """Holds the mean number of experts per token near `target` (e.g. 1.25) by turning each
    MoE layer's knob after every training step: `AdaptiveGate`'s threshold, `TopPGate`'s p
    (a gate names its knob in `KNOB`). Each layer is steered by its own mean, counted over
    the step's non-padding tokens and summed over the DDP ranks first, so that every rank
    sets the same value. The knobs are in the callback's state, and so in checkpoints; a
    resumed run continues from them. Logs `budget/<layer>/<knob>`, `budget/<layer>/experts_per_token`
    and `budget/experts_per_token` for the model."""

    def __init__(self, target: float = 1.25, rate: float = 0.05):
        if target <= 0 or rate <= 0:
            raise ConfigError(f"Budget needs a positive target and rate, got {target} and {rate}")
        self.target, self.rate = target, rate
        self.knobs: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module):
        self.layers = dict(zip(pl_module.net.moe_layer_names, pl_module.net.moe_layers()))
        for name, layer in self.layers.items():
            knob = getattr(type(layer.gate), "KNOB", None)
            if knob is None:
                raise ConfigError(f"Budget turns a gate's KNOB; {type(layer.gate).__name__} in {name} has none")
            if name in self.knobs:  # restored from a checkpoint
                setattr(layer.gate, knob, self.knobs[name])
            self.knobs[name] = float(getattr(layer.gate, knob))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        routings = pl_module.train_routings
        if not routings:
            return
        counts = torch.tensor([[r.token_index_N.numel(), r.num_tokens] for r in routings], dtype=torch.float64)
        counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        logs = {}
        for (name, layer), (assignments, tokens) in zip(self.layers.items(), counts.tolist()):
            mean = assignments / max(tokens, 1.0)
            knob = type(layer.gate).KNOB
            self.knobs[name] = step_knob(self.knobs[name], mean, self.target, self.rate, 1e-6, 1.0)
            setattr(layer.gate, knob, self.knobs[name])
            logs |= {f"budget/{name}/{knob}": self.knobs[name], f"budget/{name}/experts_per_token": mean}
        logs["budget/experts_per_token"] = float(counts[:, 0].sum() / counts[:, 1].sum().clamp_min(1))
        pl_module.log_dict(logs, on_step=True, on_epoch=False, rank_zero_only=True)

    def state_dict(self):
        return {"knobs": dict(self.knobs)}

    def load_state_dict(self, state):
        self.knobs = dict(state["knobs"])
