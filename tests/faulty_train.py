"""`train.py` with one fault injected, for the fault tests. Arguments are train.py's.

FAULT=<where>:<n> kills this process with SIGKILL at the n-th <where> of the process:
- `prepare`: right after the first tokenized split is saved to the cache;
- `step`: inside a training step, before its backward;
- `checkpoint`: halfway through writing a checkpoint file;
- `validation`: inside a validation batch (sanity checks not counted).
POISON=<module name>:<step>[,<step>...] makes that module's output NaN in the training
steps with those global step numbers. FAULT_RANK=<r> limits both to DDP rank r.
"""

import io
import os
import signal
import sys
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adamoe import module  # noqa: E402
from adamoe.cli import entry  # noqa: E402

RANK = os.environ.get("LOCAL_RANK", "0")
ARMED = os.environ.get("FAULT_RANK", RANK) == RANK
WHERE, _, N = os.environ.get("FAULT", "").partition(":")
calls = {"prepare": 0, "step": 0, "checkpoint": 0, "validation": 0}


def hit(where: str) -> bool:
    if not ARMED or where != WHERE:
        return False
    calls[where] += 1
    return calls[where] == int(N)


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


save_to_disk = datasets.Dataset.save_to_disk


def save_split(self, *args, **kwargs):
    save_to_disk(self, *args, **kwargs)
    if hit("prepare"):
        die()


datasets.Dataset.save_to_disk = save_split

torch_save = torch.save


def save(obj, f, *args, **kwargs):
    if not hit("checkpoint") or not hasattr(f, "write"):
        return torch_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    torch_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    die()


torch.save = save

poison_name, _, poison_steps = os.environ.get("POISON", "").partition(":")
POISON_STEPS = {int(s) for s in poison_steps.split(",") if s}
training_step = module.MoEModule.training_step


def nan_output(module, args, out):
    return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")


hooks = []


def faulty_training_step(self, batch, batch_idx):
    if hit("step"):
        die()
    while hooks:
        hooks.pop().remove()
    # Kept until the next step, so that the guard's diagnosis sees the same fault.
    if ARMED and self.global_step in POISON_STEPS:
        hooks.append(dict(self.named_modules())[poison_name].register_forward_hook(nan_output))
    return training_step(self, batch, batch_idx)


module.MoEModule.training_step = faulty_training_step

validation_step = module.TranslationModule.validation_step


def faulty_validation_step(self, batch, batch_idx):
    if not self.trainer.sanity_checking and hit("validation"):
        die()
    return validation_step(self, batch, batch_idx)


module.TranslationModule.validation_step = faulty_validation_step

if __name__ == "__main__":
    sys.exit(entry())
