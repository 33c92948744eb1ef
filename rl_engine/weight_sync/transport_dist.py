"""torch.distributed transport: trainer ranks and engine ranks in one sync group, bucket by bucket.

The sync group is its own process group (`sync_group`: a TCP store and a gloo group, or NCCL on CUDA),
so the trainer keeps its training world and the engines theirs. One update is three steps, all
collective over the sync group:
1. handshake (one all-reduce): every rank checks that the sources agree on the version, that everyone
   planned the same layouts (plan fingerprint) and that the version is above every engine's; else every
   rank raises the same error and nothing moves;
2. buckets: destinations post a receive per bucket into persistent staging buffers; each source packs a
   bucket into one flat buffer (a window of them in flight), appends its 16-byte checksum and the
   update's version (a bucket of another update is refused, naming both) and sends it point to point;
   the probe source also sends the probe;
3. verdict (one all-reduce): each destination checks its buckets; the update is accepted only if every
   destination accepted, and the sources learn which bucket failed.
A failed operation (a destination that timed out of a late source, a peer gone) breaks the whole gloo group:
gloo closes all its connections, so an abandoned update's late buckets never arrive, and every later
operation on that group fails. Each rank turns the failure into `WeightSyncError` and renews the group
(`SyncGroup`: the failed group is destroyed, and the next update runs on a fresh one on the same store, under
the next generation's prefix). A group is destroyed (its gloo worker threads joined) while the interpreter is
alive: at renewal, at `SyncGroup.close()`, or at exit.
Main design choice: point-to-point messages between the shard owners (no broadcast of gathered
tensors), sized by the plan's buckets, so memory stays one shard plus the window.
"""

from __future__ import annotations

import logging
import sys
import traceback
import weakref
from collections import deque
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from rl_engine.weight_sync.buckets import Probe, Update, WeightSyncError, pack_into, segment_views
from rl_engine.weight_sync.checksum import checksum

if TYPE_CHECKING:
    from rl_engine.weight_sync.endpoints import WeightPublisher, WeightReceiver

logger = logging.getLogger(__name__)

_MIN = -(1 << 62)
_DIGEST = 16
_TRAILER = _DIGEST + 8  # after a bucket's bytes: its checksum, then its update's version (int64)
_PROBE_TAG = 1 << 28
_OTHER_FAILURE = 1 << 40


def sync_group(address: "str | dist.Store", *, rank: int, world_size: int, backend: str = "gloo",
               timeout_s: float = 300.0) -> "SyncGroup":
    """A process group of its own for weight sync, independent of the default (training) group, renewed after
    a failed update (`SyncGroup`). `address` is "host:port" of the TCP store rank 0 serves, or a store every
    rank reaches already (one served by a process that bound its port before publishing it, e.g.
    `rl_engine.launch.gloo.serve_store`). NCCL (backend="nccl") is unverified on CPU."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    if isinstance(address, dist.Store):
        store = address
    else:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world_size, rank == 0, timeout=timeout)
    return SyncGroup(store, rank=rank, world_size=world_size, backend=backend, timeout=timeout)


class _GroupSlot:
    """The one reference to a sync group's process group, apart from the `SyncGroup` that uses it, so that
    `destroy` really destroys it (`SyncGroup` finalizes through it: it must not refer back to the SyncGroup)."""

    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None

    def destroy(self) -> None:
        """Drop the process group, which destroys it now if nothing else holds it. ProcessGroupGloo's destructor
        (it runs with the GIL released) waits for its queued collectives and joins its worker threads; so
        afterwards no gloo thread holds a collective's tensors. One that did at interpreter exit released them
        after Py_FinalizeEx had begun: a tensor with a Python object takes the GIL to release it, which a
        finalizing interpreter refuses by ending the thread, inside a noexcept destructor: SIGABRT ("terminate
        called without an active exception"). Its gloo context (the connections) closes with it once no work
        object holds it either, so that a peer blocked on this rank fails at once."""
        group, self.group = self.group, None
        if group is None:
            return
        others = sys.getrefcount(group) - 2  # less this frame's reference and getrefcount's argument
        if others:
            logger.warning("%d other reference(s) hold the sync group's process group being destroyed: its worker "
                           "threads and connections stay until they are dropped", others)
        del group


class SyncGroup:
    """The sync group's process group, renewable. gloo closes every connection of a group as soon as one of
    its operations times out (a receiver that gave up on a late source, a source whose destination is gone):
    the peers' operations then fail with "Connection closed by peer", the late buckets never arrive, and that
    group never works again. So after a failed update every rank `renew`s (the transport does it): the failed
    group is destroyed and the next update runs on a fresh group, generation g on the store's prefix "wsync/g".
    The first rank to renew moves the store's shared generation on; the others of the same failure find it moved
    and join it. `close()` destroys the group; one never closed is destroyed at interpreter exit, before
    finalization (`weakref.finalize` runs at `atexit`), so that no gloo worker thread outlives the interpreter
    (a collective still running then delays the exit until it ends: at most the group's timeout; the transport
    waits for each of its collectives, so none is left running)."""

    _KEY = "wsync/generation"

    def __init__(self, store: dist.Store, *, rank: int, world_size: int, backend: str, timeout: timedelta) -> None:
        self.store, self.rank, self.world_size, self.backend, self.timeout = store, rank, world_size, backend, timeout
        self.generation = int(store.compare_set(self._KEY, "", "0"))
        self._slot = _GroupSlot()
        self._finalizer = weakref.finalize(self, self._slot.destroy)
        self._connect()

    def _connect(self) -> None:
        if not self._finalizer.alive:
            raise ValueError("this SyncGroup was closed: build a new one with sync_group(...)")
        # Building the group is a rendezvous of all ranks on this generation's prefix (up to `timeout`).
        prefixed = dist.PrefixStore(f"wsync/{self.generation}", self.store)
        if self.backend == "gloo":
            self._slot.group = dist.ProcessGroupGloo(prefixed, self.rank, self.world_size, self.timeout)
        else:
            self._slot.group = dist.ProcessGroupNCCL(prefixed, self.rank, self.world_size)

    @property
    def group(self) -> dist.ProcessGroup:
        if self._slot.group is None:
            self._connect()
        return self._slot.group

    def renew(self, failure: BaseException | None = None) -> None:
        """Destroy the current group (after a failure, its rendezvous's included: a generation is never tried
        twice, whose keys may name a listener that is gone); the next operation builds the next generation's.
        `failure`: the error of the failed operation, whose traceback's frames hold that operation's work objects
        and tensors; their locals are cleared first (the traceback itself is kept, for the caller's report), so
        that destroying the group also closes its connections and a peer blocked on this rank fails at once and
        renews too."""
        if failure is not None:
            _release_frames(failure)
        self._slot.destroy()
        self.generation = int(self.store.compare_set(self._KEY, str(self.generation), str(self.generation + 1)))

    def close(self) -> None:
        """Destroy the group now (idempotent); the SyncGroup is unusable afterwards."""
        self._finalizer()

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int):
        return self.group.send(tensors, dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int):
        return self.group.recv(tensors, src, tag)

    def allreduce(self, tensors: list[torch.Tensor], opts: dist.AllreduceOptions):
        return self.group.allreduce(tensors, opts)


def _release_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames in `error`'s traceback and its causes' (`traceback.clear_frames`
    skips the frames still running): the work objects, buffers and groups they hold are released now, not when
    the caller drops the error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _all_reduce_max(group: dist.ProcessGroup, t: torch.Tensor) -> torch.Tensor:
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    group.allreduce([t], opts).wait()
    return t


class TorchDistTransport:
    """Both ends. Source rank s is `src_ranks[s]` in `group`, destination d is `dst_ranks[d]`
    (default: sources first, then destinations). `timeout_s` bounds a destination's wait for each bucket
    (default: the group's timeout); a destination that gives up abandons the update and, as after any failure
    of the group, the next update runs on a renewed group (`SyncGroup`)."""

    def __init__(self, group: "SyncGroup | dist.ProcessGroup", *, num_src: int, num_dst: int,
                 src_ranks: list[int] | None = None, dst_ranks: list[int] | None = None, window: int = 2,
                 timeout_s: float | None = None) -> None:
        self.group, self.timeout_s = group, timeout_s
        self.src_ranks = list(src_ranks) if src_ranks is not None else list(range(num_src))
        self.dst_ranks = list(dst_ranks) if dst_ranks is not None else list(range(num_src, num_src + num_dst))
        if len(self.src_ranks) != num_src or len(self.dst_ranks) != num_dst:
            raise ValueError(f"src_ranks / dst_ranks must list {num_src} and {num_dst} group ranks")
        self.window = max(1, window)
        self._send_bufs: list[torch.Tensor] = []
        self._staging: dict[int, torch.Tensor] = {}

    # ---- handshake and verdict ---------------------------------------------------------------------
    def _handshake(self, *, plan, version: int | None, engine_version: int | None, probe_len: int) -> tuple[int, int]:
        t = torch.tensor([_MIN, _MIN, plan.fingerprint, -plan.fingerprint, _MIN, probe_len], dtype=torch.int64)
        if version is not None:
            t[0], t[1] = version, -version
        if engine_version is not None:
            t[4] = engine_version
        _all_reduce_max(self.group, t)
        version, lowest, fp_max, fp_min, engine_max, probe_len = t.tolist()
        if fp_max != -fp_min:
            raise WeightSyncError("weight sync peers planned different layouts (plan fingerprints differ): build "
                                  "the plan with the same model config, layouts and bucket_bytes on every rank")
        if version != -lowest:
            raise WeightSyncError(f"training ranks publish different versions ({-lowest} .. {version})")
        if version <= engine_max:
            raise WeightSyncError(f"weights version must increase: an engine is at {engine_max}, the update is "
                                  f"{version}; nothing was sent, the engines keep their weights")
        return version, probe_len

    def _verdict_all(self, plan, failing: int) -> int:
        t = _all_reduce_max(self.group, torch.tensor([failing], dtype=torch.int64))
        return int(t)

    def _group_failed(self, what: str, error: RuntimeError) -> WeightSyncError:
        """An operation of the sync group failed (timed out, or its peer's connection closed): gloo has closed
        the group's connections, so the group is renewed for the next update (see `SyncGroup`)."""
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        renew = getattr(self.group, "renew", None)
        if renew is None:
            return WeightSyncError(f"{what}: the sync group failed ({cause}); a gloo group never works again after "
                                   "a failure: build it with sync_group(...), which renews itself")
        renew(error)
        return WeightSyncError(f"{what}: the sync group failed ({cause}); the next update runs on a new sync group")

    # ---- sender side --------------------------------------------------------------------------------
    def send(self, publisher: "WeightPublisher", version: int, probe: Probe | None) -> None:
        try:
            self._send(publisher, version, probe)
        except WeightSyncError:
            raise
        except RuntimeError as e:
            raise self._group_failed(f"weight update v{version} abandoned by source rank {publisher.src_rank}",
                                     e) from e

    def _send(self, publisher: "WeightPublisher", version: int, probe: Probe | None) -> None:
        plan = publisher.plan
        probe_len = probe.token_ids.numel() if probe is not None else 0
        version, probe_len = self._handshake(plan=plan, version=version, engine_version=None, probe_len=probe_len)
        need = max((b.nbytes for b in publisher.buckets), default=0) + _TRAILER
        if not self._send_bufs or self._send_bufs[0].numel() < need:
            self._send_bufs = [torch.empty(need, dtype=torch.uint8) for _ in range(self.window)]
        works: deque = deque()
        for i, b in enumerate(publisher.buckets):
            if len(works) == self.window:
                works.popleft().wait()
            buf = self._send_bufs[i % self.window]
            segs = pack_into(b, publisher.tensors, buf)
            digest = bytes.fromhex(checksum(segs)) if publisher.verify else bytes(_DIGEST)
            trailer = digest + version.to_bytes(8, "little", signed=True)
            buf[b.nbytes:b.nbytes + _TRAILER] = torch.frombuffer(bytearray(trailer), dtype=torch.uint8)
            works.append(self.group.send([buf[:b.nbytes + _TRAILER]], self.dst_ranks[b.dst_rank], b.index))
        if publisher.is_probe_source and probe_len:
            if probe is None:
                raise WeightSyncError("internal: probe length announced without a probe")
            ids = probe.token_ids.to(torch.int64).contiguous()
            meta = torch.cat([probe.logprobs.float(), torch.tensor([probe.temperature])]).contiguous()
            for d in range(len(self.dst_ranks)):
                works.append(self.group.send([ids], self.dst_ranks[d], _PROBE_TAG + 2 * d))
                works.append(self.group.send([meta], self.dst_ranks[d], _PROBE_TAG + 2 * d + 1))
        for w in works:
            w.wait()
        failing = self._verdict_all(plan, 0)
        if failing:
            raise WeightSyncError(f"weight update v{version} rejected by the engines ({_describe(plan, failing)}); "
                                  "they keep their previous weights")

    # ---- receiver side ------------------------------------------------------------------------------
    def receive(self, receiver: "WeightReceiver") -> Update:
        try:
            return self._receive(receiver)
        except WeightSyncError:
            raise
        except RuntimeError as e:
            raise self._group_failed(f"destination rank {receiver.dst_rank} abandoned the weight update "
                                     f"(engine at version {receiver.engine.weights_version})", e) from e

    def _receive(self, receiver: "WeightReceiver") -> Update:
        plan = receiver.plan
        version, probe_len = self._handshake(plan=plan, version=None,
                                             engine_version=receiver.engine.weights_version, probe_len=0)
        works = []
        for b in receiver.incoming:
            buf = self._staging.get(b.index)
            if buf is None or buf.numel() != b.nbytes + _TRAILER:
                buf = self._staging[b.index] = torch.empty(b.nbytes + _TRAILER, dtype=torch.uint8)
            works.append(self.group.recv([buf], self.src_ranks[b.src_rank], b.index))
        probe_bufs = None
        if probe_len:
            from rl_engine.weight_sync.endpoints import probe_source_rank

            src, d = self.src_ranks[probe_source_rank(plan)], receiver.dst_rank
            probe_bufs = (torch.empty(probe_len, dtype=torch.int64), torch.empty(probe_len, dtype=torch.float32))
            works.append(self.group.recv([probe_bufs[0]], src, _PROBE_TAG + 2 * d))
            works.append(self.group.recv([probe_bufs[1]], src, _PROBE_TAG + 2 * d + 1))
        update = Update(version=version)
        wait = (lambda w: w.wait()) if self.timeout_s is None else (lambda w: w.wait(timedelta(seconds=self.timeout_s)))
        for b, w in zip(receiver.incoming, works):
            wait(w)  # checksum each bucket as it lands, while the later ones are still on the wire
            buf = self._staging[b.index]
            update.segments[b.index] = segs = segment_views(b, buf)
            trailer = buf[b.nbytes:].numpy().tobytes()
            digest, sent_version = trailer[:_DIGEST], int.from_bytes(trailer[_DIGEST:], "little", signed=True)
            update.checksums[b.index] = "" if digest == bytes(_DIGEST) else digest.hex()
            if sent_version != version and update.problem is None:  # a late send of an update abandoned
                update.problem = (f"bucket {b.index} from source rank {b.src_rank} belongs to v{sent_version}, "
                                  f"the update under way is v{version}")
                update.problem_bucket = b.index
            if receiver.verify:
                update.received[b.index] = checksum(segs)
        for w in works[len(receiver.incoming):]:
            wait(w)
        if probe_bufs is not None:
            ids, meta = probe_bufs
            update.probe = Probe(token_ids=ids, logprobs=meta[:-1].clone(), temperature=float(meta[-1]))
        return update

    def verdict(self, receiver: "WeightReceiver", update: Update, problem: str | None) -> str | None:
        mine = 0
        if problem is not None:
            mine = _OTHER_FAILURE if receiver.failed_bucket is None else receiver.failed_bucket + 1
        try:
            failing = self._verdict_all(receiver.plan, mine)
        except RuntimeError as e:
            raise self._group_failed(f"destination rank {receiver.dst_rank} abandoned weight update "
                                     f"v{update.version}", e) from e
        if problem is None and failing:
            return f"another destination rank rejected the update ({_describe(receiver.plan, failing)})"
        return problem


def _describe(plan, failing: int) -> str:
    if failing >= _OTHER_FAILURE or failing > len(plan.buckets):
        return "a destination failed its checks"
    b = plan.buckets[failing - 1]
    return (f"bucket {b.index}, source rank {b.src_rank} -> destination rank {b.dst_rank}, "
            f"first tensor {b.transfers[0].key!r}")
