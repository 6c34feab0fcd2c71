"""The C allocator's settings for a process that trains or runs models on the CPU.

torch allocates CPU tensors with the C library's malloc, and keeps no cache of its own. glibc's malloc serves
a block of more than its mmap threshold (128 KiB at first, raised as such blocks are freed, at most 32 MiB)
with a fresh mmap and returns it to the system when freed; it also gives back a heap's free top once that is
larger than its trim threshold. A training step allocates and frees the same large activations and gradients
again and again (PointNet's 32 x 1024 x 192 features are 25 MB, DGCNN's edge features more), so each comes
back as new pages: page faults, and the kernel zeroing every page, on every step. How often depends on what
the process allocated before, and on the thread it trains in (a Ray Tune trial trains in a thread of its own,
with an arena of its own): measured here, the same PointNet epoch took 0.65 s or 1.1 s by that alone.

`keep_freed_blocks` raises both thresholds, so that freed blocks stay in the process to be reused. What is
computed does not change: only where the memory comes from. The process keeps up to its peak use of memory
rather than giving some back between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEPT_BLOCK_BYTES = 512 << 20  # blocks up to 512 MiB come from the heap (trim at twice that: still an int)
_FALLBACK_BLOCK_BYTES = 32 << 20  # glibc before 2.26 refuses more than half its 64 MiB heap size


def keep_freed_blocks(block_bytes: int = KEPT_BLOCK_BYTES) -> int:
    """Have glibc's malloc serve blocks up to `block_bytes` from its heaps and keep what is freed for reuse
    (mmap threshold `block_bytes`, trim threshold twice that), for this whole process. Returns the threshold
    set: `block_bytes`, or 32 MiB where the C library refuses more, or 0 where the C library is not glibc
    (macOS, musl), which is left as it is. Idempotent."""
    library = platform.libc_ver()[0]
    name = ctypes.util.find_library("c")
    if library != "glibc" or name is None:
        return 0
    mallopt = ctypes.CDLL(name).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for threshold in dict.fromkeys((block_bytes, min(block_bytes, _FALLBACK_BLOCK_BYTES))):
        # mmap first: setting it fixes the threshold (no more dynamic raising); trim at twice, as glibc does.
        if mallopt(M_MMAP_THRESHOLD, threshold) == 1:
            mallopt(M_TRIM_THRESHOLD, 2 * threshold)
            return threshold
    return 0


__all__ = ["keep_freed_blocks"]
