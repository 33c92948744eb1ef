"""kernels/cpu/host_memory.py: with keep_freed_memory, a loop that allocates and frees a training pass's worth of
blocks stops page-faulting them back in (glibc); elsewhere nothing changes. huge_page_buffer: zeroed memory on a
2 MiB boundary in a mapping advised for huge pages (Linux), None where they cannot be had."""

import os
import subprocess
import sys

import pytest
import torch

from inference_helpers import vm_flags
from rl_engine.kernels.cpu import host_memory

# Each round allocates four 6 MiB tensors, touches them and frees them (a micro-batch's activations). Under
# glibc's defaults the freed 24 MiB heap top can exceed the trim threshold (2 x the largest block freed, 12 MiB)
# and go back to the OS, each round then faulting ~6k pages in again (whether it does depends on the heap's
# layout: some runs settle to no faults, so the default's count is printed, not asserted).
_ROUNDS = """
import resource, sys, torch
from rl_engine.kernels.cpu import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "small":  # the negative control: every 6 MiB block mmapped and unmapped, so every round faults
    host_memory._glibc().mallopt(-3, 128 << 10)
    host_memory._glibc().mallopt(-1, 128 << 10)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_round():
    blocks = [torch.empty(6 << 18) for _ in range(4)]  # 6 MiB of fp32 each
    for b in blocks:
        b.fill_(1.0)
    del blocks
for _ in range(8):  # the heap settles into a layout that fits the rounds in 3-4 rounds
    one_round()
before = faults()
for _ in range(8):
    one_round()
print(applied, faults() - before)
"""

_glibc = pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"),
                            reason="malloc is not glibc's")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    applied, faults = out.stdout.split()
    return applied, int(faults)


@_glibc
def test_keep_freed_memory_stops_refaulting():
    pages = 8 * 4 * (6 << 20) // 4096  # what the 8 counted rounds touch: ~49k pages
    applied, faults = _faults("keep")
    assert applied == "True"
    assert faults < pages // 20, f"{faults} page faults in 8 rounds touching {pages} pages"
    _, small_faults = _faults("small")  # the measurement sees the faults it claims removed
    assert small_faults >= pages // 2, f"only {small_faults} faults with 128 KiB thresholds ({pages} pages touched)"
    _, default_faults = _faults("default")  # (glibc's own thresholds: some runs fault every round, some settle)
    print(f"faults over 8 rounds: kept {faults}, 128 KiB thresholds {small_faults}, glibc's defaults {default_faults} "
          f"({pages} pages touched)")


def test_not_glibc_changes_nothing(monkeypatch, caplog):
    def no_glibc(name):
        raise ValueError(name)

    monkeypatch.setattr(host_memory.os, "confstr", no_glibc)
    host_memory._glibc.cache_clear()
    try:
        with caplog.at_level("INFO", logger=host_memory.__name__):
            assert host_memory.keep_freed_memory() is False
            host_memory.release_freed_memory()  # a no-op, not an error
        assert "not a glibc process" in caplog.text
    finally:
        host_memory._glibc.cache_clear()


_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")


@_linux
def test_huge_page_buffer_is_zeroed_aligned_and_advised():
    if host_memory._no_huge_pages() is not None:  # THP `never` on this host: nothing to advise
        assert host_memory.huge_page_buffer(5 << 20) is None
        return
    buf = host_memory.huge_page_buffer((5 << 20) + 3)
    assert buf.dtype == torch.uint8 and buf.shape == ((5 << 20) + 3,)
    assert buf.data_ptr() % host_memory.HUGE_PAGE == 0
    assert not buf.any()
    buf.fill_(7)  # writable; each end of it in the advised mapping
    assert "hg" in vm_flags(buf.data_ptr()) and "hg" in vm_flags(buf.data_ptr() + buf.numel() - 1)
    tail = buf[-5:]
    del buf  # a view keeps the mapping
    assert tail.tolist() == [7] * 5 and "hg" in vm_flags(tail.data_ptr())


def test_huge_page_buffer_is_none_without_huge_pages(monkeypatch):
    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    with monkeypatch.context() as m:  # overcommit off or `ulimit -v`: the whole mapping charged at mmap, refused
        m.setattr(host_memory, "_no_huge_pages", lambda: None)
        m.setattr(host_memory.mmap, "mmap", refused)
        assert host_memory.huge_page_buffer(1 << 20) is None
    monkeypatch.setattr(host_memory, "_no_huge_pages", lambda: "transparent huge pages are off")
    assert host_memory.huge_page_buffer(1 << 20) is None
    with pytest.raises(ValueError, match="positive byte count, got 0"):
        host_memory.huge_page_buffer(0)


def _arena():
    arena = host_memory._step_arena()
    if arena is None:
        pytest.skip("the step arena's C++ extension is unavailable")
    return arena


def test_step_arena_serves_this_thread_and_reuses_freed_blocks():
    """Inside `step_arena` this thread's tensors are the arena's blocks, and a freed block is the next request of
    its size class; outside, and on another thread inside the same window, torch's allocator serves."""
    import threading

    arena = _arena()
    assert not arena.owns(torch.empty(1000))
    with host_memory.step_arena():
        x = torch.empty(300_000)  # 1.2 MB: above glibc's initial mmap threshold
        assert arena.owns(x)
        address = x.data_ptr()
        del x
        y = torch.empty(290_000)  # a smaller request of the same size class: the same block
        assert arena.owns(y) and y.data_ptr() == address
        other = []
        thread = threading.Thread(target=lambda: other.append(torch.empty(300_000)))
        thread.start()
        thread.join()
        assert not arena.owns(other[0])
        z = torch.ones(300_000)  # a second block: y is still alive
        assert arena.owns(z) and z.data_ptr() != address and torch.all(z == 1.0)
    after = torch.empty(300_000)
    assert not arena.owns(after)
    idle = arena.stats()[1]
    del y  # made inside, freed outside: back to the arena's free list
    assert arena.stats()[1] == idle + 1
    assert arena.stats()[4] == 0  # no thread inside


def test_step_arena_passes_requests_beyond_its_budget_on():
    arena = _arena()
    with host_memory.step_arena(budget=0):
        held, _, _, passed, _ = arena.stats()
        x = torch.empty(10_000_000)  # 40 MB: no idle block of its class, and none may be made
        assert not arena.owns(x) and arena.stats()[0] == held and arena.stats()[3] == passed + 1
    arena.release()
    with pytest.raises(RuntimeError, match="budget must be >= 0 bytes, got -1"):
        arena.enter(-1)
    with pytest.raises(RuntimeError, match=r"leave\(\) without enter\(\) on this thread"):
        arena.leave()


@pytest.mark.parametrize("n", [1, 63, 64, 4096, 4097, 5121, 8192, 8193, 1 << 20, (12 << 20) + 1])
def test_step_arena_size_classes_cover_a_request_within_a_quarter(n):
    size = _arena().size_class(n)
    assert n <= size <= max(4096, n * 1.25 + 64) and size % 64 == 0


def test_what_a_step_makes_outside_step_arena_is_not_the_arenas():
    """Inside `outside_step_arena` (a packed weight or rotary table first made in a prefill step) this thread's
    tensors come from torch's allocator, and the arena serves it again after."""
    arena = _arena()
    with host_memory.step_arena():
        with host_memory.outside_step_arena():
            kept = torch.empty(300_000)
        after = torch.empty(300_000)
        assert not arena.owns(kept) and arena.owns(after)
    with pytest.raises(RuntimeError, match=r"resume\(1\) without suspend\(\) on this thread"):
        with host_memory.step_arena():
            arena.resume(1)


def test_release_step_arena_frees_the_idle_blocks_only():
    """`release_step_arena` gives the idle blocks back to malloc (their bytes leave the arena's count) and keeps
    the blocks a live tensor still uses, which return to the arena when that tensor is freed."""
    arena = _arena()
    host_memory.release_step_arena()
    with host_memory.step_arena():
        idle, live = torch.empty(500_000), torch.empty(700_000)
    held = arena.stats()[0]
    del idle
    assert arena.stats()[1] >= 1  # (the freed block is idle)
    freed = host_memory.release_step_arena()
    assert freed >= 500_000 * 4 and arena.stats()[0] == held - freed and arena.stats()[1] == 0
    assert arena.owns(live)
    del live
    assert arena.stats()[1] == 1 and host_memory.release_step_arena() >= 700_000 * 4
