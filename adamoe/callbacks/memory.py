"""The allocator setting of `adamoe.memory`, as a callback a config can add
(`configs/preset/keep_memory.yaml`)."""

from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from adamoe.memory import keep_freed_memory


class KeepFreedMemory(Callback):
    """Calls `adamoe.memory.keep_freed_memory` once the trainer is set up, in every process:
    freed host memory stays in the process for the next step, instead of going back to the
    kernel and being faulted in again. It changes the allocator of the whole process."""

    def setup(self, trainer, pl_module, stage):
        if not keep_freed_memory():
            rank_zero_info("KeepFreedMemory: the C library is not glibc; allocation is left as it is")
