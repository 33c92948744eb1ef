"""Double-buffered staging for one engine rank: two regions, each a mirror of the engine's tensors.

The engine serves from one region; senders write the next update into the other one, the staging
region. `install` repoints the engine's parameters and buffers at the staging region (`tensor.data =
view`: no copy) and returns an undo that repoints them back; the region served before becomes the next
staging region. A rejected update never reaches `install`, so the engine keeps serving what it had.
Shared (`shared=True`, for senders in other processes): both regions are files in /dev/shm, each holding
every tensor of the rank's layout at 64-byte aligned offsets (`region_slots`, a pure function of the plan,
so the trainer side computes the same offsets). Private (a colocated engine): one new region, the other
is the engine's own tensors, so the extra memory is one copy of the engine's weights.

Files are named `rl_wsync_<pid>_<token>_d<rank>_<region>` and unlinked on `close()`, when the staging is
garbage collected, at interpreter exit, and by the next staging created on this host if their creator
died: the mappings (the engine's tensors) stay valid after the unlink.
"""

from __future__ import annotations

import math
import os
import secrets
import weakref
from typing import Callable

import torch

from rl_engine.weight_sync.layout import LocalName, RankLayout
from rl_engine.weight_sync.plan import ALIGN

PREFIX = "rl_wsync_"
DEFAULT_DIR = "/dev/shm"

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


def map_region(path: str, nbytes: int, *, create: bool) -> torch.Tensor:
    """A flat uint8 tensor over the file at `path` (MAP_SHARED: every process mapping it sees the writes)."""
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
    else:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"shared-memory region {path} does not exist: the shared-memory transport needs the "
                                    "engine on this host (use the ZMQ transport across hosts), and the engine's "
                                    "receiver transport must still be open") from None
        if size != nbytes:
            raise ValueError(f"shared-memory region {path} has {size} bytes, the plan needs {nbytes}: the two sides "
                             "planned different layouts")
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))


def region_views(region: torch.Tensor, slots: Slots) -> dict[LocalName, torch.Tensor]:
    return {name: region[o:o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, (o, shape, dtype) in slots.items()}


def _unlink(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def sweep_stale(directory: str = DEFAULT_DIR) -> list[str]:
    """Unlink regions whose creating process no longer exists (it was killed before cleaning up)."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("_", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _unlink([os.path.join(directory, name)])
            removed.append(name)
        except PermissionError:
            pass  # alive, another user's
    return removed


class Staging:
    """Receiver side: two regions mirroring `tensors` (the engine rank's tensors by layout name)."""

    def __init__(self, tensors: dict[LocalName, torch.Tensor], layout: RankLayout, *, dst_rank: int, shared: bool,
                 directory: str = DEFAULT_DIR) -> None:
        if shared and not os.path.isdir(directory):
            raise ValueError(f"shared-memory directory {directory!r} does not exist; pass directory= a tmpfs "
                             "mount (e.g. /dev/shm)")
        self.slots, self.nbytes = region_slots(layout)
        self.tensors = {name: tensors[name] for name in self.slots}
        self.paths: list[str] = []
        self.live: int | None = None  # the region the engine serves from (None: its own tensors)
        if shared:
            sweep_stale(directory)
            token = secrets.token_hex(4)
            self.paths = [os.path.join(directory, f"{PREFIX}{os.getpid()}_{token}_d{dst_rank}_{i}") for i in range(2)]
            self._finalizer = weakref.finalize(self, _unlink, list(self.paths))
            self.regions = [map_region(p, self.nbytes, create=True) for p in self.paths]
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
