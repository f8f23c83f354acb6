"""Freed host memory stays in the process, for the next step to reuse.

A training step on CPU allocates and frees the same large buffers step after step. With
glibc's defaults a buffer over the mmap threshold is unmapped when freed, and the heap's
free top is trimmed: each step then maps the memory again and pays a page fault and the
kernel's zeroing of every 4 KB page. Turning both off keeps the process at its peak
footprint, as GPU caching allocators do. It changes the allocator of the whole process;
`benchmarks/README.md` has what it saves.
"""

import ctypes
import platform

# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the kernel; False where the C library is
    not glibc (macOS, musl), which is then left as it is."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
