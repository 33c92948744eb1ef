"""Shared-memory transport: trainer ranks write each bucket straight into the engine's staging memory.

For engines in other processes on the same host. The engine rank owns two shared-memory regions that
mirror its tensors (`staging.Staging`): it serves from one, senders write the next update into the
other. The control channel is the ZMQ protocol of `transport_zmq` (same messages, same ROUTER/DEALER
sockets, same verdict), with one extra step: the destination answers each source's `WeightUpdateBegin`,
refusing a version that does not increase before any byte moves, or naming the staging region to write
(`Ack(ref="shm:v<version>:<plan fingerprint>:<path>")`). The source maps that path only if it is a region
of this run in the staging directory, owned by this user and of the planned size (`staging.open_region`),
and otherwise refuses the update before writing a byte. A source then copies each bucket's blocks from its
parameters into the region at their place in the engine's tensors (one copy per byte, checksummed from
the source chunk by chunk while the chunk is in cache) and sends a `WeightUpdateBucket` with the checksum
and no tensors; the destination checksums the staged blocks as each bucket arrives, while the source
writes the next one. On acceptance `apply` repoints the engine's tensors at the staging region (no
second copy); the region served until then becomes the next staging region. A rejected update never
touches the region the engine serves from.

Address: the engine side binds like `ZmqReceiverTransport` (loopback by default) and announces `address`;
the trainer side is `SharedMemorySenderTransport({dst_rank: address})`. Both ends must share a host, its
/dev/shm and the run id (`run_id`, by default the launcher's RL_ENGINE_RUN_ID, see `staging`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from rl_engine.protocol import Ack, ErrorReply, WeightUpdateBegin, WeightUpdateBucket, WeightUpdateCommit, send_msg
from rl_engine.weight_sync.buckets import Update, WeightSyncError, source_view
from rl_engine.weight_sync.checksum import checksum, copy_with_sums, digest
from rl_engine.weight_sync.plan import Bucket
from rl_engine.weight_sync.staging import (DEFAULT_DIR, Staging, open_region, region_slots, region_views,
                                           resolve_run_id)
from rl_engine.weight_sync.transport_zmq import ABORTED, ZmqReceiverTransport, ZmqSenderTransport

if TYPE_CHECKING:
    from rl_engine.weight_sync.endpoints import WeightPublisher, WeightReceiver

ERROR_REFUSED = "weights_refused"


class SharedMemoryReceiverTransport(ZmqReceiverTransport):
    """Engine end: binds a ROUTER for the control messages and owns the staging regions. One transport per
    `WeightReceiver` (it allocates the regions when the receiver is built); `close()` unlinks them. The
    regions are run `run_id`'s in `directory`; `options` go to `ZmqReceiverTransport`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, context: zmq.Context | None = None,
                 timeout_s: float = 300.0, directory: str = DEFAULT_DIR, run_id: str | None = None,
                 **options: Any) -> None:
        self.run_id = resolve_run_id(run_id)
        super().__init__(host=host, port=port, context=context, timeout_s=timeout_s, **options)
        self.directory = directory
        self.staging: Staging | None = None
        self._owner: "WeightReceiver | None" = None

    def register(self, receiver: "WeightReceiver") -> None:
        if self.staging is not None:
            self.staging.close()
        self.staging = Staging(receiver.tensors, receiver.plan.dst_layouts[receiver.dst_rank],
                               dst_rank=receiver.dst_rank, shared=True, directory=self.directory,
                               run_id=self.run_id)
        self._owner = receiver

    def close(self) -> None:
        super().close()
        if self.staging is not None:
            self.staging.close()

    def receive(self, receiver: "WeightReceiver") -> Update:
        if receiver is not self._owner or self.staging is None:
            raise ValueError("this SharedMemoryReceiverTransport belongs to another WeightReceiver (its staging "
                             "memory mirrors that receiver's engine); build one transport per receiver")
        region = self.staging.staging
        update = super().receive(receiver)
        if self.staging.swappable:
            staging = self.staging
            update.install = lambda: staging.install(region)
        return update

    def _begin(self, receiver: "WeightReceiver", src: int, msg: WeightUpdateBegin) -> str | None:
        current = receiver.engine.weights_version
        route = [self._routes[src]]
        if msg.version <= current:
            problem = f"weights version must increase: the engine is at {current}, the update is {msg.version}"
            send_msg(self.socket, ErrorReply(code=ERROR_REFUSED, message=f"destination rank {receiver.dst_rank}: "
                                             f"{problem}", ref=f"weights:v{msg.version}"), route=route,
                     signer=self.signer)
            return problem
        path = self.staging.paths[self.staging.staging]
        send_msg(self.socket, Ack(ref=f"shm:v{msg.version}:{receiver.plan.fingerprint:x}:{path}"), route=route,
                 signer=self.signer)
        return None

    def _take_bucket(self, receiver: "WeightReceiver", update: Update, bucket: Bucket,
                     msg: WeightUpdateBucket) -> str | None:
        if msg.tensors:
            return (f"bucket {bucket.index} came with {len(msg.tensors)} inline tensor(s); the shared-memory "
                    "transport expects its bytes in the staging region (is the sender a ZmqSenderTransport?)")
        views = self.staging.views[self.staging.staging]
        segs = [views[t.dst_local][t.dst_index()] for t in bucket.transfers]
        update.segments[bucket.index] = segs
        update.checksums[bucket.index] = msg.checksum
        if receiver.verify and msg.checksum:  # while the source writes the next bucket
            update.received[bucket.index] = checksum(segs)
        return None


class SharedMemorySenderTransport(ZmqSenderTransport):
    """Trainer end: `addresses[d]` is destination rank d's `SharedMemoryReceiverTransport.address`; the
    regions it writes must be run `run_id`'s in `directory` (the receivers' settings); `options` go to
    `ZmqSenderTransport`."""

    def __init__(self, addresses: dict[int, str] | list[str], *, context: zmq.Context | None = None,
                 timeout_s: float = 300.0, directory: str = DEFAULT_DIR, run_id: str | None = None,
                 **options: Any) -> None:
        self.run_id = resolve_run_id(run_id)
        self.directory = directory
        super().__init__(addresses, context=context, timeout_s=timeout_s, **options)
        self._mapped: dict[tuple[int, str], dict] = {}  # (dst rank, region path) -> views of its tensors
        self._target: dict[int, dict] = {}  # destination rank -> views of this update's staging region

    def close(self) -> None:
        super().close()
        self._mapped.clear()
        self._target.clear()

    def _after_begin(self, publisher: "WeightPublisher", version: int, socks: dict[int, zmq.Socket]) -> None:
        refusals, accepted = [], []
        for d, reply in self._replies(socks, version).items():
            if isinstance(reply, ErrorReply):
                refusals.append(reply.message)
                continue
            parts = reply.ref.split(":", 3) if isinstance(reply, Ack) else []
            if len(parts) != 4 or parts[0] != "shm" or parts[1] != f"v{version}":
                refusals.append(f"destination rank {d} answered {reply!r} to the begin of v{version} (is it a "
                                "SharedMemoryReceiverTransport?)")
                continue
            accepted.append(d)
            if parts[2] != f"{publisher.plan.fingerprint:x}":
                refusals.append(f"destination rank {d} planned another layout (plan fingerprint {parts[2]}, ours "
                                f"{publisher.plan.fingerprint:x}): build the plan with the same model config, "
                                "layouts and bucket_bytes on both sides")
                continue
            try:
                self._target[d] = self._open(parts[3], publisher, d)
            except WeightSyncError as e:  # not a region of this run: nothing is written
                refusals.append(f"destination rank {d}: {e}")
        if refusals:
            for d in accepted:  # they wait for buckets: end the update there too
                self._send(socks[d], WeightUpdateCommit(version=version, num_buckets=ABORTED))
            self._replies({d: socks[d] for d in accepted}, version)  # their rejections of the aborted update
            raise WeightSyncError(f"weight update v{version} refused before any bytes moved: {refusals[0]}")

    def _open(self, path: str, publisher: "WeightPublisher", d: int) -> dict:
        key = (d, path)  # checked for this destination rank (its number is in the name)
        if key not in self._mapped:
            slots, nbytes = region_slots(publisher.plan.dst_layouts[d])
            region = open_region(path, nbytes, run_id=self.run_id, dst_rank=d, directory=self.directory)
            self._mapped[key] = region_views(region, slots)
            if len(self._mapped) > 2 * max(1, len(self.addresses)):  # regions of receivers since replaced
                del self._mapped[next(iter(self._mapped))]
        return self._mapped[key]

    def _bucket_message(self, publisher: "WeightPublisher", version: int, b: Bucket) -> WeightUpdateBucket:
        views = self._target[b.dst_rank]
        sums = []
        for t in b.transfers:
            dst, src = views[t.dst_local][t.dst_index()], source_view(t, publisher.tensors)
            if publisher.verify:
                sums.append(copy_with_sums(dst, src))
            else:
                dst.copy_(src)
        return WeightUpdateBucket(version=version, bucket_index=b.index,
                                  checksum=digest(sums) if publisher.verify else "", tensors={})
