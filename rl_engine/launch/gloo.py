"""Spawn a small gloo process group on this machine (tests and benchmarks on CPU).

`spawn(fn, world_size, *args)` starts `world_size` processes that each join a process group on a
free loopback port, run `fn(rank, world_size, *args)` and tear the group down. Failures in any rank
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

from rl_engine.launch.local import free_port


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=int(os.environ.get("RL_ENGINE_DIST_TIMEOUT", "300"))))
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
    mp.spawn(_worker, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)
