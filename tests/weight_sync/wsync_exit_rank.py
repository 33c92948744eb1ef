"""One rank of test_wsync_abandoned's exit test, a process of its own: `python wsync_exit_rank.py RANK PORT`.

Rank 0 starts an all-reduce of its sync group and leaves; rank 1 joins that all-reduce 1.5 s later, while
rank 0 runs its exit, then leaves too. Each rank's last atexit callback holds the GIL for 4 s in one C call
(registered first, so it runs last, straight from C: no Python bytecode after it hands the GIL over): it stands
in for a gloo worker thread descheduled between torch's `Py_IsInitialized()` check and its GIL acquisition when
it releases a collective's tensors, so that the worker takes the GIL only once `Py_FinalizeEx` has begun. A
group not destroyed before then aborts the process there (SIGABRT, "terminate called without an active
exception"); `SyncGroup` destroys it at exit, before this callback."""

import atexit
import ctypes
import sys
import time

atexit.register(ctypes.PyDLL(None).usleep, 4_000_000)  # PyDLL: the call keeps the GIL

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rl_engine.launch.gloo import join_store  # noqa: E402
from rl_engine.weight_sync import sync_group  # noqa: E402

rank, port = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
group = sync_group(join_store(port, 2), rank=rank, world_size=2, timeout_s=float(sys.argv[3]))
if rank == 0:
    group.allreduce([torch.ones(4)], dist.AllreduceOptions())  # a Python tensor, held by gloo's worker thread
    group.store.set("leaving", "1")
else:
    group.store.wait(["leaving"])
    time.sleep(1.5)  # rank 0 is in its atexit callbacks by now
    group.allreduce([torch.ones(4)], dist.AllreduceOptions()).wait()
