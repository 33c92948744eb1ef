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

`step_arena` is the engine's answer to the same faults without a process-wide setting: its CPU steps make their
tensors inside it, from a caching allocator that serves only the thread inside and keeps the blocks it frees for
the next step (csrc/step_arena.cpp). The whole step, not the prefill's forward alone: with the prefill's large
blocks kept from glibc, its dynamic mmap threshold stayed at 128 KiB and the ~50M model's decode steps mmapped and
unmapped their outputs instead (~125k faults a 32-token batch-64 generate against ~75).

`huge_page_buffer` serves the inference engine's packed weights (one arena an engine: packed_linear.py,
`EngineConfig.cpu_huge_pages`) and its KV pool (model_runner._huge_page_kv_pool) from a fresh anonymous mapping
advised madvise(MADV_HUGEPAGE) before it is first touched, starting on a 2 MiB boundary: where transparent huge
pages are `madvise` or `always` (/sys/kernel/mm/transparent_hugepage/enabled) its pages then fault in as 2 MiB pages
(when the kernel has them free; else 4 KiB ones, which khugepaged may collapse later). Off Linux, where THP is
`never`, or where madvise fails: None, and the reason is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import os
from pathlib import Path

import torch

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


HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64 and (4 KiB base pages) arm64
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def _no_huge_pages() -> str | None:
    """Why madvise(MADV_HUGEPAGE) cannot give this process huge pages (logged once), or None where it can."""
    reason = None
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        reason = "this OS has no madvise(MADV_HUGEPAGE) (not Linux)"
    else:
        try:
            with open(_THP_MODE) as f:
                mode = f.read()
        except OSError as e:
            reason = f"transparent huge pages are unavailable ({_THP_MODE}: {e.strerror or type(e).__name__})"
        else:
            if "[never]" in mode:
                reason = f"transparent huge pages are off ({_THP_MODE}: {mode.strip()})"
    if reason is not None:
        logger.info("host buffers stay on the allocator's pages: %s", reason)
    return reason


_madvise_failed = False  # its reason logged once


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """`nbytes` of fresh zeroed host memory as a 1-D uint8 tensor, in an anonymous mapping of its own (unmapped
    when the last view of the tensor goes) starting on a `HUGE_PAGE` boundary and advised MADV_HUGEPAGE before any
    page of it is touched; None where huge pages cannot be had (the reason logged once: `_no_huge_pages`, or
    madvise failed)."""
    global _madvise_failed
    if nbytes < 1:
        raise ValueError(f"huge_page_buffer needs a positive byte count, got {nbytes}")
    if _no_huge_pages() is not None or _madvise_failed:
        return None
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # private (a shared anonymous mapping is shmem, whose huge pages follow another setting); room to start on a
    # 2 MiB boundary
    try:  # (a private mapping is charged in full here where overcommit is off or `ulimit -v` binds)
        region = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        logger.info("host buffers stay on the allocator's pages: mmap of %d bytes failed (%s)", length + HUGE_PAGE, e)
        return None
    start = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, length)
    except OSError as e:
        _madvise_failed = True
        logger.info("host buffers stay on the allocator's pages: madvise(MADV_HUGEPAGE) failed (%s)", e)
        region.close()
        return None
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=start)


# Bytes of blocks the engine's step arena may hold (the process's, all engines together): it held 22 MB over the
# ~3.5M model's batch-64 generate, 61-81 MB over the ~50M model's.
STEP_ARENA_BUDGET = 256 << 20
_ARENA_SOURCE = Path(__file__).parent / "csrc" / "step_arena.cpp"


@functools.cache
def _step_arena():
    from rl_engine.kernels import cpu

    module, reason = cpu.load_source(_ARENA_SOURCE)
    if module is None:
        logger.info("the engine's steps allocate through torch's CPU allocator: step arena unavailable (%s)", reason)
    return module


def step_arena_available() -> bool:
    """Whether `step_arena` serves from its arena (its C++ extension built and loaded here: the first call builds it)
    rather than passing through to torch's allocator."""
    return _step_arena() is not None


def _loaded_step_arena():
    """The step arena's extension where this process has loaded it already (never builds it), else None."""
    return _step_arena() if _step_arena.cache_info().currsize else None


def release_step_arena() -> int:
    """The step arena's idle blocks back to malloc (the blocks tensors still use stay the arena's until freed);
    returns the bytes freed. Nothing to do where the arena was never loaded."""
    arena = _loaded_step_arena()
    return 0 if arena is None else arena.release()


@contextlib.contextmanager
def step_arena(budget: int = STEP_ARENA_BUDGET):
    """The CPU tensors this thread makes inside come from a caching arena (csrc/step_arena.cpp): a freed block goes
    back to a free list of its size class (at most 25% over the request) for the next step to take, instead of to
    malloc, which unmaps blocks above its mmap threshold and trims its heap's top, so that the next step faults
    fresh zeroed pages back in (4-9k page faults a ~3.5M batch-64 generate, mostly its prefill steps; 0-5 inside
    the arena). Other threads' tensors, and requests once `budget` bytes are held, go to the allocator it was
    installed over; the arena keeps its blocks (up to `budget`) for the process's life (`release_step_arena()`
    frees the idle ones). Tensors a step makes that outlive it are made in `outside_step_arena`. Without the C++
    extension: torch's allocator, unchanged."""
    arena = _step_arena()
    if arena is None:
        yield
        return
    arena.enter(budget)
    try:
        yield
    finally:
        arena.leave()


@contextlib.contextmanager
def outside_step_arena():
    """What this thread makes inside comes from the allocator underneath even within `step_arena`: tensors a step
    makes that outlive it (packed weights, made at their first read after a weight update; the rotary table), which
    would otherwise hold arena blocks (rounded up to their size class) against its budget for their lives. Builds
    nothing: where the arena was never loaded there is nothing to step out of."""
    arena = _loaded_step_arena()
    if arena is None:
        yield
        return
    depth = arena.suspend()
    try:
        yield
    finally:
        arena.resume(depth)
