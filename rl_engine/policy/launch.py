"""Spawn local worker processes on the gloo backend (tests and benchmarks on CPU).

`spawn(fn, world_size, *args)` starts `world_size` processes that each join a process group on a
free loopback port, run `fn(rank, world_size, *args)` with one intra-op thread (many ranks share a
few cores) and tear the group down. Failures in any rank propagate to the caller with its traceback.
Production launchers (torchrun, Ray) live above `rl_engine.policy`; this is only the small helper.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=int(os.environ.get("RL_ENGINE_DIST_TIMEOUT", "300"))))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; `fn` must be picklable
    (a module-level function)."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
