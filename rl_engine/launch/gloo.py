"""Spawn a small gloo process group on this machine (tests and benchmarks on CPU).

`spawn(fn, world_size, *args)` starts `world_size` processes that each join a process group, run
`fn(rank, world_size, *args)` and tear the group down. The group's TCP store is served by the caller on a
port the kernel picks at bind (port 0) and held for the whole run, so no other process on a shared machine
can take it between the pick and the ranks' start (as it could when a free port was picked, closed, then
bound by rank 0). Failures in any rank
propagate to the caller with its traceback. This is the helper the multi-process tests and
`benchmarks/parallel_step.py` share; runs of the engine go through `rl_engine.launch.launch`.

Each rank runs with the caller's intra-op thread count (`torch.get_num_threads()` at the call, or
`threads=`), so a test suite run with `RL_ENGINE_TEST_THREADS=2` also runs its ranks with two threads.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp



def _timeout() -> timedelta:
    return timedelta(seconds=int(os.environ.get("RL_ENGINE_DIST_TIMEOUT", "300")))


def serve_store(world_size: int) -> dist.TCPStore:
    """A TCP store served by this process on a loopback port the kernel picks (`.port`), for `world_size`
    ranks that join it with `join_store`; it serves until it is deleted. Processes that need a store (or a
    rendezvous of their own) take its port from here instead of a free port that rank 0 would bind later."""
    return dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=_timeout(), wait_for_workers=False)


def join_store(port: int, world_size: int) -> dist.TCPStore:
    """A client of the store `serve_store` serves on `port`."""
    return dist.TCPStore("127.0.0.1", port, world_size, False, timeout=_timeout())


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    store = join_store(port, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=_timeout())
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args, threads: int | None = None) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; `fn` must be picklable
    (a module-level function). `threads`: intra-op threads per rank (default: the caller's)."""
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    store = serve_store(world_size)
    try:
        mp.spawn(_worker, args=(world_size, store.port, threads, fn, args), nprocs=world_size, join=True)
    finally:
        del store  # stops serving
