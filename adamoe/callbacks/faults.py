"""Surviving faults: non-finite steps kept out of the weights."""

from typing import Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from adamoe.errors import TrainingError


class NonFiniteGuard(Callback):
    """Checks every training step's loss and gradients before the optimizer sees them:
    `stop` ends fit naming the step, the first non-finite layer and the last good
    checkpoint; `skip` drops the step and stops after `max_consecutive` in a row. All
    ranks decide together. See the README's "Resuming and faults"."""

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_consecutive: int = 10):
        self.action, self.max_consecutive = action, max_consecutive
        self.skipped, self.in_a_row = 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch
        self.bad_loss = None

    def on_before_backward(self, trainer, pl_module, loss):
        self.bad_loss = ~torch.isfinite(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        flags = [] if self.bad_loss is None else [self.bad_loss]
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            flags.append(~torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        bad = torch.stack(flags).any().float() if flags else torch.zeros((), device=trainer.strategy.root_device)
        bad_ranks = int(trainer.strategy.reduce(bad, reduce_op="sum"))  # the one host sync this guard costs
        if not bad_ranks:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.action == "skip" and self.in_a_row <= self.max_consecutive:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left alone by the optimizer
            pl_module.log("train/skipped_steps", float(self.skipped), reduce_fx="max", batch_size=1)
            rank_zero_warn(
                f"step {trainer.global_step}: non-finite loss or gradient on {bad_ranks} rank(s), step skipped "
                f"({self.skipped} so far)"
            )
            return
        raise TrainingError(self._message(trainer, pl_module))

    def _message(self, trainer, pl_module) -> str:
        what = diagnose(pl_module, self.batch)
        if trainer.world_size > 1:
            # Under DDP every rank's gradients are non-finite after the all-reduce; the rank
            # whose forward pass went non-finite is the one to name.
            found = [None] * trainer.world_size
            torch.distributed.all_gather_object(found, (what, self.bad_loss is not None and bool(self.bad_loss)))
            culprits = [r for r, (w, loss_bad) in enumerate(found) if loss_bad or w.startswith("first")] or [
                trainer.global_rank
            ]
            what = f"on rank {culprits[0]}: {found[culprits[0]][0]}"
        ckpt = trainer.checkpoint_callback
        last = (ckpt.last_model_path or ckpt.best_model_path) if ckpt is not None else ""
        row = f" ({self.in_a_row} in a row)" if self.action == "skip" else ""
        return (
            f"step {trainer.global_step}: non-finite training step{row}, {what}. The weights were not updated. "
            f"Last good checkpoint: {last or 'none saved yet'}. "
            "Lower the learning rate or clip gradients, or set --nonfinite.action skip to skip such steps."
        )

    def state_dict(self):
        return {"skipped": self.skipped}

    def load_state_dict(self, state):
        self.skipped = state["skipped"]


def diagnose(pl_module, batch) -> str:
    """What went non-finite: the first module, in the order the forward pass runs them,
    whose output is not finite (found by running the batch again with hooks), else the
    aux or task loss, else a gradient."""
    first = []

    def hook(module, args, output):
        tensors = [
            t
            for t in (output if isinstance(output, tuple) else (output,))
            if torch.is_tensor(t) and t.is_floating_point()
        ]
        if not first and any(not torch.isfinite(t).all() for t in tensors):
            first.append(module)

    names = {m: n for n, m in pl_module.named_modules()}
    handles = [m.register_forward_hook(hook) for m in names if m is not pl_module]
    try:
        with torch.no_grad():
            loss, _, routings = pl_module.step(batch)
    finally:
        for h in handles:
            h.remove()
    if first:
        return f"first non-finite output from layer {names[first[0]]} ({type(first[0]).__name__})"
    layer_names = getattr(pl_module.net, "moe_layer_names", [])
    for name, r in zip(layer_names, routings):
        if not torch.isfinite(r.aux_loss).all():
            return f"the aux loss of MoE layer {name} is not finite"
    if not torch.isfinite(loss):
        return "the task loss is not finite"
    grads = [n for n, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return f"the gradient of {grads[0]} is not finite" if grads else "the forward pass is finite when rerun (dropout?)"
