"""Keep the host memory a training pass frees inside the process (glibc malloc), for the next pass to reuse.

glibc's malloc serves a request above its mmap threshold (128 KiB at start, raised to the largest such block
freed so far, up to 32 MiB) from a fresh mmap, and hands the top of its heap back to the OS whenever more than
the trim threshold (twice the mmap threshold) lies free there. A training pass allocates and frees its
activations and gradients, several MiB each, every micro-batch; the next micro-batch then gets them as fresh
pages, each a page fault the kernel answers with a zeroed 4 KiB page (~1-2 us a page measured here). On
grpo_step's tiny preset that was 3-10k faults per training pass, ~9 ms of ~100 ms (the SwiGLU backward's and
the qkv projection's fresh outputs the visible part of it). `keep_freed_memory` sets the mmap threshold to
glibc's ceiling and turns trimming off: the process no longer faults its heap back in, and keeps the heap's
peak extent, fragmentation included (a synthetic 4 x 6 MiB pattern retained 2-2.5x its live blocks; grpo_step's
tiny preset: peak RSS 539-542 MiB with and without, RSS after 5 steps within ~20 MiB, /tmp/tstep/rss.py). Blocks
above 32 MiB are still mmapped and unmapped each time.

mallopt's parameters are process-wide (every arena, every thread) and cannot be put back to glibc's dynamic
threshold once set, so the setting stays for the process's life; `release_freed_memory` gives the free pages
back (malloc_trim). Other C libraries (musl, macOS, Windows): nothing changes, and the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

logger = logging.getLogger(__name__)

MAX_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit hosts (HEAP_MAX_SIZE / 2); mallopt refuses more
_NO_TRIM = 2**31 - 1  # M_TRIM_THRESHOLD is a C int: 2 GiB free at the heap top before a trim, i.e. never here
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or None (logged once) when the process runs on another C library."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        version = None
    if not version:
        logger.info("keep_freed_memory: not a glibc process; malloc's thresholds are left as they are")
        return None
    libc = ctypes.CDLL(None)
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim")):
        logger.info("keep_freed_memory: %s has no mallopt/malloc_trim; malloc's thresholds are left as they are",
                    version)
        return None
    return libc


def keep_freed_memory() -> bool:
    """From now on glibc's malloc keeps freed blocks of up to `MAX_MMAP_THRESHOLD` bytes for reuse instead of
    unmapping them or trimming its heap (process-wide, for the process's life: the module docstring). Returns
    whether the setting took (False where malloc is not glibc's)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1
    if not ok:
        logger.warning("keep_freed_memory: glibc refused mallopt; malloc's thresholds are left as they are")
    return ok


def release_freed_memory() -> None:
    """Give the free pages of malloc's heaps back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
