"""In-process transport: the trainer rank and its colocated engine share one process.

Same layout and shared storage (the engine was built on the trainer's own `CausalLM`): zero copy. Nothing
moves; each sync checks that every engine tensor still *is* the trainer's storage (`data_ptr`, shape,
stride: a rebound `.data` would silently serve stale weights) and bumps the version. The first sync
checks it block by block against the plan; later ones tensor by tensor, so a sync costs microseconds
whatever the model size.

Any other layout (another dtype, an engine copy that must stay fixed while training goes on, all source
ranks in one process), double-buffered (`staging=True`, the default): `publish` copies each block once,
straight into the engine's staging copy (`staging.Staging`: a second copy of the engine's weights, the
other being the engine's own), summing the source chunk by chunk while it is in cache; the receiver
checksums the staged blocks, and `apply` repoints the engine's tensors at them (no second copy). The
engine gets the weights as they were at `publish`, so the trainer may step right after it returns.
`staging=False` keeps no second copy: the publisher hands over views of its tensors with their
checksums, the receiver checks them again and copies them in at apply (a trainer step in between is
caught as a checksum mismatch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rl_engine.weight_sync.buckets import Probe, Update, WeightSyncError, segments_of, source_view
from rl_engine.weight_sync.checksum import checksum, copy_with_sums, digest
from rl_engine.weight_sync.staging import Staging

if TYPE_CHECKING:
    from rl_engine.weight_sync.endpoints import WeightPublisher, WeightReceiver


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class InProcessTransport:
    """One object per process, shared by its publisher(s) and receiver(s)."""

    def __init__(self, *, zero_copy: bool | None = None, staging: bool = True) -> None:
        """zero_copy: None picks it when the engine's tensors are the trainer's; True requires it.
        staging: copies go through a second copy of the engine's weights (one copy per byte, then a swap)."""
        self.zero_copy, self.use_staging = zero_copy, staging
        self.receivers: dict[int, WeightReceiver] = {}
        self._mailbox: dict[int, Update] = {}
        self._shared: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._staging: dict[int, Staging] = {}

    def register(self, receiver: "WeightReceiver") -> None:
        self.receivers[receiver.dst_rank] = receiver
        self._staging.pop(receiver.dst_rank, None)

    # ---- sender side ------------------------------------------------------------------------------
    def send(self, publisher: "WeightPublisher", version: int, probe: Probe | None) -> None:
        by_dst: dict[int, list] = {}
        for b in publisher.buckets:
            by_dst.setdefault(b.dst_rank, []).append(b)
        for d in by_dst:
            if d not in self.receivers:
                raise WeightSyncError(f"destination rank {d} has no receiver in this process: the in-process "
                                      "transport only reaches colocated engines; use the torch.distributed or ZMQ "
                                      "transport for the others")
        dsts = sorted(set(by_dst) | (set(self.receivers) if publisher.is_probe_source else set()))
        for d in dsts:
            update = self._mailbox.setdefault(d, Update(version=version))
            if update.version != version:
                raise WeightSyncError(f"destination rank {d} has an unconsumed update v{update.version}; "
                                      f"call receive() before publishing v{version}")
            if publisher.is_probe_source:
                update.probe = probe
            pairs = self._zero_copy_pairs(publisher, d, by_dst.get(d, []))
            if pairs is not None:
                update.zero_copy = True
                continue
            if self.use_staging:
                self._stage(publisher, update, d, by_dst.get(d, []))
                continue
            for b in by_dst.get(d, []):
                segs = segments_of(b, publisher.tensors)  # views of the trainer's tensors where possible
                update.segments[b.index] = segs
                update.checksums[b.index] = checksum(segs) if publisher.verify else ""

    def _stage(self, publisher: "WeightPublisher", update: Update, d: int, buckets: list) -> None:
        """Copy this source rank's blocks for destination d into d's staging region (one copy per byte)."""
        receiver = self.receivers[d]
        staging = self._staging.get(d)
        if staging is None:
            staging = self._staging[d] = Staging(receiver.tensors, receiver.plan.dst_layouts[d], dst_rank=d,
                                                 shared=False)
        region = staging.staging
        views = staging.views[region]
        with torch.no_grad():
            for b in buckets:
                segs = [views[t.dst_local][t.dst_index()] for t in b.transfers]
                if publisher.verify:
                    sums = [copy_with_sums(seg, source_view(t, publisher.tensors)) for t, seg in zip(b.transfers, segs)]
                    update.checksums[b.index] = digest(sums)
                else:
                    for t, seg in zip(b.transfers, segs):
                        seg.copy_(source_view(t, publisher.tensors))
                    update.checksums[b.index] = ""
                update.segments[b.index] = segs
        if staging.swappable:
            update.install = lambda: staging.install(region)

    def _zero_copy_pairs(self, publisher: "WeightPublisher", d: int, buckets: list):
        key = (publisher.src_rank, d)
        if key not in self._shared:
            self._shared[key] = self._bind(publisher, d, buckets)
        pairs = self._shared[key]
        if pairs is None:
            return None
        for src, dst in pairs:
            if not _same_storage(src, dst):
                raise WeightSyncError(f"zero-copy sync from source rank {publisher.src_rank} to destination rank {d}: "
                                      "an engine tensor is no longer the trainer's storage (was a parameter's .data "
                                      "rebound?); rebuild the receiver or use copies (zero_copy=False)")
        return pairs

    def _bind(self, publisher: "WeightPublisher", d: int, buckets: list):
        """Tensor pairs if every block destination rank d needs is the same memory on this source rank."""
        if self.zero_copy is False:
            return None
        receiver = self.receivers[d]
        transfers = [t for b in buckets for t in b.transfers]
        expected = [t for b in receiver.incoming for t in b.transfers]
        why = None
        if len(transfers) != len(expected):
            why = "part of the engine's weights comes from other source ranks"
        else:
            for t in transfers:
                if t.src_dtype != t.dst_dtype or not _same_storage(source_view(t, publisher.tensors),
                                                                   receiver.tensors[t.dst_local][t.dst_index()]):
                    why = f"{t.key!r} is not the same memory on both sides"
                    break
        if why is not None:
            if self.zero_copy:
                raise WeightSyncError(f"zero_copy=True but destination rank {d} cannot read source rank "
                                      f"{publisher.src_rank}'s tensors in place: {why}; build the engine on the "
                                      "trainer's own model (LLM(model=chunk)) with the same layout and dtype")
            return None
        names = sorted({(t.src_local, t.dst_local) for t in transfers})
        return [(publisher.tensors[s], receiver.tensors[d]) for s, d in names]

    # ---- receiver side ----------------------------------------------------------------------------
    def receive(self, receiver: "WeightReceiver") -> Update:
        update = self._mailbox.pop(receiver.dst_rank, None)
        if update is None:
            raise WeightSyncError(f"no update was published for destination rank {receiver.dst_rank}")
        return update

    def verdict(self, receiver: "WeightReceiver", update: Update, problem: str | None) -> str | None:
        return problem
