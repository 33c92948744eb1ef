"""Double-buffered staging for one engine rank: two regions, each a mirror of the engine's tensors.

The engine serves from one region; senders write the next update into the other one, the staging
region. `install` repoints the engine's parameters and buffers at the staging region (`tensor.data =
view`: no copy) and returns an undo that repoints them back; the region served before becomes the next
staging region. A rejected update never reaches `install`, so the engine keeps serving what it had.
Shared (`shared=True`, for senders in other processes): both regions are files in /dev/shm, each holding
every tensor of the rank's layout at 64-byte aligned offsets (`region_slots`, a pure function of the plan,
so the trainer side computes the same offsets). Private (a colocated engine): one new region, the other
is the engine's own tensors, so the extra memory is one copy of the engine's weights.

Files are named `rl_wsync_<pid>_<run>_<token>_d<rank>_<region>` (`<run>`: the run id the launcher hands
every process of a run in RL_ENGINE_RUN_ID, "local" outside one) and unlinked on `close()`, when the
staging is garbage collected, at interpreter exit, by the next staging created on this host if their
creator died (`sweep_stale`), and by the launcher once the run's processes have ended, however they
ended (`sweep_run`): the mappings (the engine's tensors) stay valid after the unlink.

Senders map a region named by the engine's answer only through `open_region`, which refuses anything
but a file of this run in the staging directory, owned by this user and of the planned size: the name
comes over a socket, and a process that can write to it must not make the sender overwrite other files.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import re
import secrets
import stat
import weakref
from typing import Callable

import torch

from rl_engine.weight_sync.buckets import WeightSyncError
from rl_engine.weight_sync.layout import LocalName, RankLayout
from rl_engine.weight_sync.plan import ALIGN

PREFIX = "rl_wsync_"
DEFAULT_DIR = "/dev/shm"
RUN_ID_ENV = "RL_ENGINE_RUN_ID"  # set by the launcher (rl_engine.actors.run) for every process of a run
DEFAULT_RUN_ID = "local"  # regions made outside a launched run
_RUN_ID = re.compile(r"[a-z][a-z0-9]{0,31}")
# rl_wsync_<pid>_<run>_<token>_d<rank>_<region>
_NAME = re.compile(rf"{PREFIX}(?P<pid>[0-9]+)_(?P<run>{_RUN_ID.pattern})_[0-9a-f]{{8}}_d(?P<rank>[0-9]+)_[01]")

Slots = dict[LocalName, tuple[int, tuple[int, ...], torch.dtype]]  # name -> (byte offset, shape, dtype)


def region_slots(layout: RankLayout) -> tuple[Slots, int]:
    """Where each tensor of a destination rank's layout lives in a region, and the region's size."""
    slots: Slots = {}
    size = 0
    for name, t in layout.tensors.items():
        start = -(-size // ALIGN) * ALIGN
        slots[name] = (start, tuple(t.shape), t.dtype)
        size = start + math.prod(t.shape) * t.dtype.itemsize
    return slots, max(size, ALIGN)


def new_run_id() -> str:
    """A fresh run id: names this run's regions, so that `sweep_run` removes them and nothing else."""
    return "r" + secrets.token_hex(6)


def resolve_run_id(run_id: str | None = None) -> str:
    """`run_id`, else the launcher's RL_ENGINE_RUN_ID, else "local"; checked (it becomes part of file names)."""
    rid = run_id if run_id is not None else os.environ.get(RUN_ID_ENV, DEFAULT_RUN_ID)
    if not _RUN_ID.fullmatch(rid):
        source = "run_id" if run_id is not None else RUN_ID_ENV
        raise ValueError(f"{source}={rid!r} must be 1-32 lowercase letters and digits starting with a letter "
                         f"(it names the shared-memory regions); e.g. {new_run_id()!r}")
    return rid


def create_region(path: str, nbytes: int) -> torch.Tensor:
    """A new file of `nbytes` at `path` (never an existing one), mapped as a flat uint8 tensor (MAP_SHARED:
    every process mapping it sees the writes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


def open_region(path: str, nbytes: int, *, run_id: str, dst_rank: int, directory: str = DEFAULT_DIR) -> torch.Tensor:
    """Sender side: map the staging region at `path` (named by the engine) as a flat uint8 tensor, after
    checking that it is one: a file directly in `directory` named like a region of run `run_id` for
    destination rank `dst_rank`, not a symbolic link (opened with O_NOFOLLOW, relative to the directory),
    a regular file with one link, owned by this user, writable by nobody else, of exactly `nbytes`.
    Anything else raises `WeightSyncError` naming the path and the reason; nothing is written."""

    def refuse(why: str) -> WeightSyncError:
        return WeightSyncError(f"refusing to write weights into {path!r}: {why}")

    parent, name = os.path.split(path)
    if parent != os.path.normpath(directory):
        raise refuse(f"it is not a file directly in the staging directory {directory}")
    match = _NAME.fullmatch(name)
    pattern = f"{PREFIX}<pid>_{run_id}_<token>_d{dst_rank}_<0|1>"
    if match is None or match["run"] != run_id or int(match["rank"]) != dst_rank:
        raise refuse(f"the name is not that of a staging region of this run for destination rank {dst_rank} "
                     f"({pattern})")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise refuse(f"the staging directory cannot be opened: {e}") from None
    try:
        # Relative to the directory's fd and never following a link: the file opened is the one checked below.
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise refuse("it does not exist: the shared-memory transport needs the engine on this host (use the ZMQ "
                     "transport across hosts), and the engine's receiver transport must still be open") from None
    except OSError as e:
        raise refuse("it is a symbolic link" if e.errno == errno.ELOOP else f"it cannot be opened: {e}") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse("it is not a regular file")
        if st.st_uid != os.geteuid():
            raise refuse(f"it is owned by uid {st.st_uid}, not by this process's user (uid {os.geteuid()})")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise refuse(f"its mode {stat.S_IMODE(st.st_mode):o} lets other users write to it")
        if st.st_nlink != 1:
            raise refuse(f"it has {st.st_nlink} hard links; a staging region has one")
        if st.st_size != nbytes:
            raise refuse(f"it has {st.st_size} bytes, the plan needs {nbytes}: the two sides planned different "
                         "layouts")
        buf = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=torch.uint8)  # holds the mapping; unmapped with the last view


def region_views(region: torch.Tensor, slots: Slots) -> dict[LocalName, torch.Tensor]:
    return {name: region[o:o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, (o, shape, dtype) in slots.items()}


def _unlink(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _remove_own(directory: str, name: str) -> bool:
    """Unlink directory/name if this user owns it (never another user's file, never through a link)."""
    path = os.path.join(directory, name)
    try:
        if os.lstat(path).st_uid != os.geteuid():
            return False
        os.unlink(path)
    except OSError:  # gone already, not ours to remove, a directory
        return False
    return True


def _names(directory: str) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if n.startswith(PREFIX)]
    except FileNotFoundError:
        return []


def sweep_stale(directory: str = DEFAULT_DIR) -> list[str]:
    """Unlink this user's regions whose creating process no longer exists (it was killed before cleaning
    up). Names of any run, and of the older `rl_wsync_<pid>_<token>_...` form: both start with the pid."""
    removed = []
    for name in _names(directory):
        pid = name[len(PREFIX):].split("_", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if _remove_own(directory, name):
                removed.append(name)
        except PermissionError:
            pass  # alive, another user's
    return removed


def sweep_run(run_id: str, directory: str = DEFAULT_DIR) -> list[str]:
    """Unlink every region of run `run_id` this user owns, its creators alive or not: for the launcher,
    once the run's processes have ended (a killed worker's regions, whatever way the run ended). Regions
    of other runs are never touched."""
    resolve_run_id(run_id)
    return [name for name in _names(directory)
            if (m := _NAME.fullmatch(name)) and m["run"] == run_id and _remove_own(directory, name)]


class Staging:
    """Receiver side: two regions mirroring `tensors` (the engine rank's tensors by layout name)."""

    def __init__(self, tensors: dict[LocalName, torch.Tensor], layout: RankLayout, *, dst_rank: int, shared: bool,
                 directory: str = DEFAULT_DIR, run_id: str | None = None) -> None:
        if shared and not os.path.isdir(directory):
            raise ValueError(f"shared-memory directory {directory!r} does not exist; pass directory= a tmpfs "
                             "mount (e.g. /dev/shm)")
        self.slots, self.nbytes = region_slots(layout)
        self.tensors = {name: tensors[name] for name in self.slots}
        self.paths: list[str] = []
        self.live: int | None = None  # the region the engine serves from (None: its own tensors)
        if shared:
            run = resolve_run_id(run_id)
            sweep_stale(directory)
            token = secrets.token_hex(4)
            self.paths = [os.path.join(directory, f"{PREFIX}{os.getpid()}_{run}_{token}_d{dst_rank}_{i}")
                          for i in range(2)]
            self._finalizer = weakref.finalize(self, _unlink, list(self.paths))
            self.regions = [create_region(p, self.nbytes) for p in self.paths]
            self.views = [region_views(r, self.slots) for r in self.regions]
        else:
            device = next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")
            self.regions = [torch.empty(self.nbytes, dtype=torch.uint8, device=device)]
            self.views = [region_views(self.regions[0], self.slots), {n: t.data for n, t in self.tensors.items()}]
            self.live = 1
        with torch.no_grad():  # bytes no update covers (padding rows) keep the engine's values
            for views in self.views:
                for name, v in views.items():
                    if v.data_ptr() != self.tensors[name].data_ptr():
                        v.copy_(self.tensors[name])
        # CUDA graphs hold the parameters' addresses: there the staged update is copied in, not swapped.
        self.swappable = all(t.device.type == "cpu" for t in self.tensors.values())

    @property
    def staging(self) -> int:
        """The region the next update is written into: never the one the engine serves from."""
        return 1 if self.live == 0 else 0

    def install(self, region: int) -> Callable[[], None]:
        """Repoint the engine's tensors at `region` (no copy). Returns the undo."""
        before = {name: t.data for name, t in self.tensors.items()}
        previous = self.live
        with torch.no_grad():
            for name, t in self.tensors.items():
                t.data = self.views[region][name]
        self.live = region

        def undo() -> None:
            with torch.no_grad():
                for name, t in self.tensors.items():
                    t.data = before[name]
            self.live = previous

        return undo

    def close(self) -> None:
        """Unlink the files; mappings still in use (the engine's tensors) stay valid until released."""
        if self.paths:
            self._finalizer()
