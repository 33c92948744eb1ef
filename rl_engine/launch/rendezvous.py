"""torch.distributed start-up for the trainer ranks, with its store bound where the run says.

`dist.init_process_group(init_method="env://")` makes rank 0 a TCPStore server that listens on every
interface (`*:MASTER_PORT`), whatever MASTER_ADDR is. Here rank 0 binds the listening socket itself,
to MASTER_ADDR (loopback under the local launcher, the node's own address under a cluster launcher),
and hands it to the store (`master_listen_fd`); the other ranks connect to it as usual.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist


def init_process_group_from_env(backend: str, *, timeout: timedelta) -> None:
    """`init_process_group` from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (set by the launcher)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listen_fd = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(max(128, 2 * world_size))
        listen_fd = listener.detach()  # the store owns it from here
    # The classic (non-libuv) store server: with a listening socket handed over, the libuv server aborted
    # ("terminate called without an active exception") at the exit of 3 of some 30 tp2 runs here.
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout, master_listen_fd=listen_fd, use_libuv=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
