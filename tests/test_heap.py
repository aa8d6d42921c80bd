"""Stage processes keep freed memory for the next image (textseg.pipeline.heap): measured as the page
faults of a full-size block allocated again after it was freed, in fresh processes with and without it
(`benchmarks/bench_heap.py` measures what that is worth per image)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

# A 16 MB block (a 1600x1200 float64 map, or two float32 ones) allocated, written and freed twice, through
# the C library itself: by default glibc maps the first block and unmaps it on free, and the second
# comes from new heap pages; with freed memory kept, the second reuses the first's pages.
LOOP = """
import ctypes, ctypes.util, resource, sys
from textseg.pipeline.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 16 * 2**20
def block():
    address = libc.malloc(size)
    ctypes.memset(address, 1, size)
    libc.free(address)
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def test_freed_memory_is_reused_without_new_page_faults() -> None:
    default, kept = _page_faults("default"), _page_faults("keep")
    pages = 16 * 2**20 // 4096
    assert default > pages // 2  # the second block faulted in new pages
    assert kept < pages // 16  # the second block reused the first one's
