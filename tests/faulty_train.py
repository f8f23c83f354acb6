"""`train.py` with one fault injected, for the fault tests. Arguments are train.py's.

FAULT=<where>:<n> kills this process with SIGKILL at the n-th <where> of the process:
- `prepare`: right after the first tokenized split is saved to the cache;
- `step`: inside a training step, before its backward;
- `checkpoint`: halfway through writing a checkpoint file;
- `validation`: inside a validation batch (sanity checks not counted);
- `sigint`, `sigterm`: sends itself that signal inside a training step, instead of dying.
POISON=<module name>:<step>[,<step>...] makes that module's output NaN in the training
steps with those global step numbers. FAULT_RANK=<r> limits both to DDP rank r.
"""

import io
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adamoe import tasks  # noqa: E402
from adamoe.cli import entry  # noqa: E402
from adamoe.data import store  # noqa: E402

RANK = os.environ.get("LOCAL_RANK", "0")
ARMED = os.environ.get("FAULT_RANK", RANK) == RANK
WHERE, _, N = os.environ.get("FAULT", "").partition(":")
calls = {"prepare": 0, "step": 0, "checkpoint": 0, "validation": 0, "sigint": 0, "sigterm": 0}


def hit(where: str) -> bool:
    if not ARMED or where != WHERE:
        return False
    calls[where] += 1
    return calls[where] == int(N)


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


write_split = store.write


def save_split(*args, **kwargs):
    rows = write_split(*args, **kwargs)
    if hit("prepare"):
        die()
    return rows


torch_save = torch.save


def save(obj, f, *args, **kwargs):
    if not hit("checkpoint") or not hasattr(f, "write"):
        return torch_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    torch_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    die()


def nan_output(module, args, out):
    return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")


def poisoned(training_step, layer: str, steps: set[int], armed: bool = True):
    """`training_step` with `layer`'s output made NaN at those global steps. The hook stays
    until the next step, so that the guard's diagnosis sees the same fault."""
    hooks = []

    def step(self, batch, batch_idx):
        if hit("step"):
            die()
        for name in ("sigint", "sigterm"):
            if hit(name):
                os.kill(os.getpid(), getattr(signal, name.upper()))
        while hooks:
            hooks.pop().remove()
        if armed and self.global_step in steps:
            hooks.append(dict(self.named_modules())[layer].register_forward_hook(nan_output))
        return training_step(self, batch, batch_idx)

    return step


validation_step = tasks.TranslationModule.validation_step


def faulty_validation_step(self, batch, batch_idx):
    if not self.trainer.sanity_checking and hit("validation"):
        die()
    return validation_step(self, batch, batch_idx)


def install():
    """Put the faults of FAULT and POISON in place; importing this file changes nothing."""
    store.write = save_split
    torch.save = save
    layer, _, steps = os.environ.get("POISON", "").partition(":")
    tasks.MoEModule.training_step = poisoned(
        tasks.MoEModule.training_step, layer, {int(s) for s in steps.split(",") if s}, ARMED
    )
    tasks.TranslationModule.validation_step = faulty_validation_step


if __name__ == "__main__":
    install()
    sys.exit(entry())
