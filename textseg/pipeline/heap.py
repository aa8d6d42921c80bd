"""Keep freed memory in a stage process for its next image, instead of handing it back to the OS.

Labeling one 1600x1200 photo allocates ~60 MB of short-lived full-size tensors (upsampled scores, the
winner's score and index, the masks of the threshold step). glibc serves blocks that large by mapping
fresh pages, and returns freed memory at the top of its heap once more than ~2x the last such block is
free, so each image faults in thousands of new pages again (how many depends on the heap's layout in
that process). `benchmarks/bench_heap.py`, 1600x1200, K = 2, one thread: `label_image` 39.1 ms an image
by default, 29.2 ms with freed memory kept; a CPU actor's whole call 60.9 against 54.5 ms.

Only the processes that do nothing but a stage call this (the CPU plan's actors), never a user's own
process (the in-process runner): the price is that such a process keeps up to `KEEP_FREED_BYTES` of
freed heap resident. Where the C library is not glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Freed heap a stage process keeps: a few photos' temporaries, or one large image's.
KEEP_FREED_BYTES = 512 * 2**20
# Blocks up to this size come from the heap (glibc's ceiling for this setting on 64-bit systems); larger
# ones are still mapped and unmapped each time.
HEAP_BLOCK_BYTES = 32 * 2**20


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks up to HEAP_BLOCK_BYTES from its heap and to keep up to
    KEEP_FREED_BYTES of freed heap; True when both settings took."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    )
