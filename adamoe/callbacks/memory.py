"""Freed host memory stays in the process, for the next step to reuse.

A training step on CPU allocates and frees the same large buffers step after step. With
glibc's defaults a buffer over the mmap threshold is unmapped when freed, and the heap's
free top is trimmed: each step then maps the memory again and pays a page fault and the
kernel's zeroing of every 4 KB page. Turning both off keeps the process at its peak
footprint, as GPU caching allocators do, and took 5-11% off a Multi30k training step in
fp32 and bf16 (AMD EPYC, 2 cores; `benchmarks/keep_memory.py`).
"""

import ctypes
import platform

from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the kernel; False where the C library is
    not glibc (macOS, musl), which is then left as it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class KeepFreedMemory(Callback):
    """Calls `keep_freed_memory` once the trainer is set up, in every process."""

    def setup(self, trainer, pl_module, stage):
        if not keep_freed_memory():
            rank_zero_info("KeepFreedMemory: the C library is not glibc; allocation is left as it is")
