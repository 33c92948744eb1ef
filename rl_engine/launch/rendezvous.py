"""torch.distributed start-up for the trainer ranks, with its store bound where the run says.

`dist.init_process_group(init_method="env://")` makes rank 0 a TCPStore server that listens on every
interface (`*:MASTER_PORT`), whatever MASTER_ADDR is. Here rank 0's store serves a listening socket bound
to MASTER_ADDR (loopback under the local launcher, the node's own address under a cluster launcher),
handed to it through `master_listen_fd`; the other ranks connect to it as usual. The launchers bind that
socket themselves before they publish MASTER_PORT and pass it to rank 0 (`RL_ENGINE_MASTER_LISTEN_FD`,
see `rl_engine.launch.ports`), so no other process can take the port in between; started by hand
(MASTER_PORT chosen by the user), rank 0 binds it here.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from rl_engine.launch.ports import MASTER_LISTEN_FD_ENV, adopt, listen


def init_process_group_from_env(backend: str, *, timeout: timedelta) -> None:
    """`init_process_group` from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (set by the launcher)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listen_fd = None
    if rank == 0 and (inherited := os.environ.get(MASTER_LISTEN_FD_ENV)):
        listen_fd = adopt(int(inherited), port=port, what=MASTER_LISTEN_FD_ENV)  # the store owns it from here
    elif rank == 0:
        listen_fd = listen(host, port, backlog=max(128, 2 * world_size)).detach()
    # The classic (non-libuv) store server: with a listening socket handed over, the libuv server aborted
    # ("terminate called without an active exception") at the exit of 3 of some 30 tp2 runs here.
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout, master_listen_fd=listen_fd, use_libuv=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
