"""ZMQ transport: buckets as multipart messages with raw tensor frames, for engines in other processes
or on other hosts.

Each destination rank binds a ROUTER (loopback unless told otherwise); each source rank connects one
DEALER per destination it feeds, with identity `src<rank>`. One update from a source to a destination is
`WeightUpdateBegin`, its buckets as `WeightUpdateBucket` (one frame per block, sent zero copy straight
from the trainer's parameters when the block is contiguous and needs no cast, with the bucket's
checksum), the probe (bucket index -1) from the probe source, then `WeightUpdateCommit` with the bucket
count. The destination collects every expected source's messages, verifies, and answers each source
with `Ack` or `ErrorReply`; `publish` returns (or raises) on those answers, so the trainer never changes
a parameter that ZMQ might still be reading. Malformed messages are counted as problems, never crash
the receiver, and reject the update.

Every message carries its update's version, and every answer names it (`Ack.ref` / `ErrorReply.ref`
"weights:v<n>"). A destination that times out of an update (a source late, the engine starved) remembers
its version: that update's late messages are dropped and counted (`num_stale`), never read as part of the
next update, and each of its sources is told once that it was abandoned; a source skips an answer about
an update it gave up on. Sources that really announce different versions are refused, each named.

Main design choice: the rl_engine wire protocol (msgspec envelope + raw frames, no pickle) rather than a
bespoke framing, so the same validation guards weights and rollouts.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import TYPE_CHECKING

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from rl_engine.protocol import (
    Ack,
    ErrorReply,
    ProtocolError,
    Unauthenticated,
    WeightUpdateBegin,
    WeightUpdateBucket,
    WeightUpdateCommit,
    bind,
    recv_msg,
    send_msg,
)
from rl_engine.weight_sync.buckets import Probe, Update, WeightSyncError, segments_of
from rl_engine.weight_sync.checksum import checksum
from rl_engine.weight_sync.plan import Bucket

if TYPE_CHECKING:
    from rl_engine.auth import MessageSigner
    from rl_engine.weight_sync.endpoints import WeightPublisher, WeightReceiver

logger = logging.getLogger(__name__)

PROBE_BUCKET = -1
ABORTED = -1  # a commit's bucket count when the source gave up on the update (another destination refused it)
ERROR_REJECTED = "weights_rejected"
ERROR_ABANDONED = "weights_abandoned"  # the destination timed out of the update and drops its late messages
UPDATE_MESSAGES = (WeightUpdateBegin, WeightUpdateBucket, WeightUpdateCommit)


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.SNDHWM, 0)  # never drop or block on the message count: buckets are bounded by the plan
    s.setsockopt(zmq.LINGER, 0)
    return s


class ZmqReceiverTransport:
    """Destination end: binds a ROUTER; give `address` to the sources.

    With a `signer` (every actor run), each message must carry a valid tag from a holder of the run's
    secret: anything else is dropped before decoding and counted in `num_rejected`, and never affects
    the update under way. `max_message_bytes` bounds a frame (`plan_message_bytes`): a peer sending a
    larger one is disconnected. A peer's queue holds at most `RCV_QUEUE` messages (TCP pushes back)."""

    RCV_QUEUE = 64
    MAX_ABANDONED = 64  # abandoned versions remembered (versions increase: an old one never comes back)

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, context: zmq.Context | None = None,
                 timeout_s: float = 300.0, signer: MessageSigner | None = None,
                 max_message_bytes: int | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.socket = _socket(self.context, zmq.ROUTER)
        self.socket.setsockopt(zmq.RCVHWM, self.RCV_QUEUE)
        if max_message_bytes is not None:
            self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.address = bind(self.socket, host=host, port=port)
        self.timeout_s = timeout_s
        self.signer = signer
        self.num_rejected = 0
        self.num_stale = 0  # messages of abandoned updates, dropped
        self._abandoned: dict[int, None] = {}  # versions this destination timed out of (oldest first)
        self._told: dict[tuple[int, int], None] = {}  # (source, abandoned version) already answered
        self._routes: dict[int, bytes] = {}
        self._refused: set[int] = set()  # sources answered at their begin message (update refused)
        self._begun: dict[int, int] = {}  # source rank -> the version it began, in the update under way

    def close(self) -> None:
        self.socket.close(linger=0)

    def receive(self, receiver: "WeightReceiver") -> Update:
        from rl_engine.weight_sync.endpoints import probe_source_rank

        expected = {b.index: b for b in receiver.incoming}
        counts: dict[int, int] = {}
        for b in receiver.incoming:
            counts[b.src_rank] = counts.get(b.src_rank, 0) + 1
        sources = set(counts) | {probe_source_rank(receiver.plan)}
        update, problems, committed = Update(version=-1), [], set()
        begun: dict[int, int] = {}  # source rank -> the version its WeightUpdateBegin announced
        self._routes, self._refused, self._begun = {}, set(), begun
        deadline = time.monotonic() + self.timeout_s
        while committed | self._refused != sources:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000)):
                raise WeightSyncError(self._abandon(receiver, begun, committed, sources))
            try:
                route, msg = recv_msg(self.socket, num_route_frames=1, signer=self.signer)
            except Unauthenticated:  # a stranger's message: it never touches the update
                self.num_rejected += 1
                continue
            except ProtocolError as e:
                problems.append(f"malformed message: {e}")
                continue
            src = _source_rank(route[0])
            if src is None or src not in sources:
                problems.append(f"message from unexpected peer {route[0]!r}")
                continue
            if isinstance(msg, UPDATE_MESSAGES) and msg.version in self._abandoned:
                self._discard_stale(receiver, src, route[0], msg)
                continue
            self._routes[src] = route[0]
            problem = None
            if isinstance(msg, (WeightUpdateBucket, WeightUpdateCommit)) and begun.get(src) != msg.version:
                problem = (f"source rank {src} sent a {type(msg).__name__} of v{msg.version} "
                           + (f"within its update v{begun[src]}" if src in begun else "before beginning an update"))
                if isinstance(msg, WeightUpdateCommit):
                    committed.add(src)
            elif isinstance(msg, WeightUpdateBucket):
                if msg.bucket_index == PROBE_BUCKET:
                    problem = self._take_probe(update, msg)
                elif msg.bucket_index not in expected or expected[msg.bucket_index].src_rank != src:
                    problem = (f"source rank {src} sent bucket {msg.bucket_index}, which the plan does not route from "
                               f"it to destination rank {receiver.dst_rank}")
                else:
                    problem = self._take_bucket(receiver, update, expected[msg.bucket_index], msg)
            elif isinstance(msg, WeightUpdateCommit):
                committed.add(src)
                if msg.num_buckets == ABORTED:
                    problem = f"source rank {src} aborted the update (another destination refused it)"
                elif msg.num_buckets != counts.get(src, 0):
                    problem = (f"source rank {src} committed {msg.num_buckets} buckets, the plan routes "
                               f"{counts.get(src, 0)} from it")
            elif isinstance(msg, WeightUpdateBegin):
                if src in begun:
                    problem = f"source rank {src} began v{msg.version} within its update v{begun[src]}"
                begun[src] = msg.version
                refused = self._begin(receiver, src, msg)
                if refused is not None:
                    self._refused.add(src)  # already answered: it sends nothing more for this update
                problem = problem or refused
            else:
                problem = f"unexpected {type(msg).__name__} from source rank {src}"
            if problem is not None:
                problems.append(problem)
        if len(set(begun.values())) > 1:  # a real mismatch: no source's version belongs to an abandoned update
            problems.insert(0, "sources sent different versions: " + ", ".join(
                f"source rank {s} v{v}" for s, v in sorted(begun.items())))
        update.version = max(begun.values(), default=-1)
        update.problem = problems[0] if problems else None
        return update

    def _abandon(self, receiver: "WeightReceiver", begun: dict[int, int], committed: set[int],
                 sources: set[int]) -> str:
        """Give up on the update under way: its version joins `_abandoned` (its late messages are dropped,
        never read as part of the next update) and the sources that already committed hear it now (the
        others at their commit, in `_discard_stale`). Returns the error."""
        waiting = sorted(sources - committed - self._refused)
        what = f"update v{max(begun.values())}" if begun else "the update (no source had begun)"
        message = (f"destination rank {receiver.dst_rank} abandoned {what}: timed out after {self.timeout_s:g}s "
                   f"waiting for source rank(s) {waiting}; the engine keeps its weights")
        for version in set(begun.values()):
            self._abandoned[version] = None
        while len(self._abandoned) > self.MAX_ABANDONED:
            del self._abandoned[next(iter(self._abandoned))]
        for src in sorted(committed - self._refused):
            if src not in begun:
                continue
            send_msg(self.socket, ErrorReply(code=ERROR_ABANDONED, message=message, ref=f"weights:v{begun[src]}"),
                     route=[self._routes[src]], signer=self.signer)
        if begun:
            logger.warning("%s", message)
        return message

    def _discard_stale(self, receiver: "WeightReceiver", src: int, route: bytes, msg) -> None:
        """A message of an update this destination abandoned: counted and dropped. The source hears it once,
        at its begin (it may be waiting for that answer) or else at its commit."""
        self.num_stale += 1
        key = (src, msg.version)
        if isinstance(msg, WeightUpdateBegin) or (isinstance(msg, WeightUpdateCommit) and key not in self._told):
            self._told[key] = None
            while len(self._told) > self.MAX_ABANDONED:
                del self._told[next(iter(self._told))]
            message = (f"destination rank {receiver.dst_rank} abandoned update v{msg.version} earlier (it timed out "
                       f"waiting for its sources); its late messages are dropped: publish a newer version")
            logger.warning("source rank %d: %s (%d stale message(s) dropped so far)", src, message, self.num_stale)
            send_msg(self.socket, ErrorReply(code=ERROR_ABANDONED, message=message, ref=f"weights:v{msg.version}"),
                     route=[route], signer=self.signer)

    def _begin(self, receiver: "WeightReceiver", src: int, msg: WeightUpdateBegin) -> str | None:
        """A source announces an update; the bytes follow in its bucket messages."""
        return None

    def _take_bucket(self, receiver: "WeightReceiver", update: Update, bucket: Bucket,
                     msg: WeightUpdateBucket) -> str | None:
        segs = list(msg.tensors.values())
        update.segments[bucket.index] = segs
        update.checksums[bucket.index] = msg.checksum
        if self.signer is not None:  # recv_msg verified the tag over these very bytes
            update.tagged.add(bucket.index)
        elif receiver.verify and msg.checksum:  # on arrival: overlaps the rest of the transfer
            update.received[bucket.index] = checksum(segs)
        return None

    @staticmethod
    def _take_probe(update: Update, msg: WeightUpdateBucket) -> str | None:
        t = msg.tensors
        if set(t) != {"token_ids", "logprobs", "temperature"}:
            return f"malformed probe message with tensors {sorted(t)}"
        if msg.checksum and checksum(list(t.values())) != msg.checksum:
            return "checksum mismatch in the probe message"
        try:
            update.probe = Probe(token_ids=t["token_ids"].to(torch.int64), logprobs=t["logprobs"].float(),
                                 temperature=float(t["temperature"][0]))
        except (ValueError, IndexError) as e:
            return f"malformed probe: {e}"
        return None

    def verdict(self, receiver: "WeightReceiver", update: Update, problem: str | None) -> str | None:
        for src, route in self._routes.items():
            if src in self._refused:
                continue
            ref = f"weights:v{self._begun.get(src, update.version)}"  # each source's own update, even in a mismatch
            reply = (Ack(ref=ref) if problem is None else
                     ErrorReply(code=ERROR_REJECTED, message=f"destination rank {receiver.dst_rank}: {problem}", ref=ref))
            send_msg(self.socket, reply, route=[route], signer=self.signer)
        return problem


_REF_VERSION = re.compile(r"(?:weights|shm):v(-?[0-9]+)(?::|$)")


def _reply_version(reply) -> int | None:
    """The update version an answer is about (`Ack.ref` / `ErrorReply.ref`: "weights:v3", "shm:v3:..."), if it says."""
    m = _REF_VERSION.match(getattr(reply, "ref", ""))
    return int(m.group(1)) if m else None


def _source_rank(identity: bytes) -> int | None:
    """The rank in a source's identity `src<rank>-<random>`."""
    head = identity.split(b"-", 1)[0]
    if head.startswith(b"src") and head[3:].isdigit():
        return int(head[3:])
    return None


class ZmqSenderTransport:
    """Source end: `addresses[d]` is destination rank d's `ZmqReceiverTransport.address`."""

    def __init__(self, addresses: dict[int, str] | list[str], *, context: zmq.Context | None = None,
                 timeout_s: float = 300.0, signer: MessageSigner | None = None) -> None:
        self.addresses = dict(enumerate(addresses)) if isinstance(addresses, list) else dict(addresses)
        self.context = context or zmq.Context.instance()
        self.timeout_s = timeout_s
        self.signer = signer
        self.num_stale = 0  # late answers about earlier updates, skipped
        self._sockets: dict[int, zmq.Socket] = {}
        # Per destination, a monitor of its connection: a receiver whose process died is noticed when
        # its TCP connection drops or is refused, not after `timeout_s` (a worker killed mid-update).
        self._monitors: dict[int, zmq.Socket] = {}

    def close(self) -> None:
        for d, s in self._sockets.items():
            s.disable_monitor()
            self._monitors[d].close(linger=0)
            s.close(linger=0)
        self._sockets.clear()
        self._monitors.clear()

    def _socket_to(self, d: int, src_rank: int) -> zmq.Socket:
        if d not in self._sockets:
            if d not in self.addresses:
                raise ValueError(f"no address for destination rank {d}; known: {sorted(self.addresses)}")
            s = _socket(self.context, zmq.DEALER)
            # A random suffix: a ROUTER drops a second peer with an identity it already has, so a
            # guessable one would let anyone who connects first shut the real source out.
            s.setsockopt(zmq.IDENTITY, b"src%d-%s" % (src_rank, secrets.token_hex(8).encode()))
            self._monitors[d] = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
            s.connect(self.addresses[d])
            self._sockets[d] = s
        else:  # a disconnection noticed before this update (and reconnected since) is no news now
            while self._monitors[d].poll(0):
                recv_monitor_message(self._monitors[d])
        return self._sockets[d]

    def send(self, publisher: "WeightPublisher", version: int, probe: Probe | None) -> None:
        by_dst: dict[int, list] = {}
        for b in publisher.buckets:
            by_dst.setdefault(b.dst_rank, []).append(b)
        dsts = sorted(set(by_dst) | (set(range(publisher.plan.dst.world_size)) if publisher.is_probe_source else set()))
        socks = {d: self._socket_to(d, publisher.src_rank) for d in dsts}
        for d in dsts:
            self._send(socks[d], WeightUpdateBegin(version=version, num_buckets=len(by_dst.get(d, []))))
        self._after_begin(publisher, version, socks)
        for b in publisher.buckets:
            self._send(socks[b.dst_rank], self._bucket_message(publisher, version, b))
        if probe is not None:
            tensors = {"token_ids": probe.token_ids.to(torch.int64).contiguous(),
                       "logprobs": probe.logprobs.float().contiguous(),
                       "temperature": torch.tensor([probe.temperature], dtype=torch.float32)}
            for d in dsts:
                self._send(socks[d], WeightUpdateBucket(version=version, bucket_index=PROBE_BUCKET,
                                                      checksum=checksum(list(tensors.values())), tensors=tensors))
        for d in dsts:
            self._send(socks[d], WeightUpdateCommit(version=version, num_buckets=len(by_dst.get(d, []))))
        errors = []
        for d, reply in self._replies(socks, version).items():
            if isinstance(reply, ErrorReply):
                errors.append(reply.message)
            elif not (isinstance(reply, Ack) and reply.ref == f"weights:v{version}"):
                errors.append(f"destination rank {d} answered {reply!r}")
        if errors:
            raise WeightSyncError(f"weight update v{version} rejected: {errors[0]}")

    def _send(self, sock: zmq.Socket, msg) -> None:
        send_msg(sock, msg, signer=self.signer)

    def _after_begin(self, publisher: "WeightPublisher", version: int, socks: dict[int, zmq.Socket]) -> None:
        """Between the begin messages and the buckets (the ZMQ transport needs no answer)."""

    def _bucket_message(self, publisher: "WeightPublisher", version: int, b: Bucket) -> WeightUpdateBucket:
        segs = segments_of(b, publisher.tensors)  # zero-copy views when contiguous and same dtype
        keyed = self.signer is not None  # the message's tag is the bucket's (keyed) check
        return WeightUpdateBucket(version=version, bucket_index=b.index,
                                  checksum=checksum(segs) if publisher.verify and not keyed else "",
                                  tensors={str(i): s for i, s in enumerate(segs)})

    def _replies(self, socks: dict[int, zmq.Socket], version: int) -> dict:
        """One answer about update `version` from each destination (within the timeout). A late answer about
        an earlier update (one this source timed out of) is counted in `num_stale` and skipped."""
        out = {}
        deadline = time.monotonic() + self.timeout_s
        for d, sock in socks.items():
            monitor = self._monitors[d]
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while True:
                remaining = deadline - time.monotonic()
                ready = dict(poller.poll(int(remaining * 1000))) if remaining > 0 else {}
                if monitor in ready and sock not in ready:  # an answer already here counts, whatever followed
                    event = recv_monitor_message(monitor)["event"]
                    what = ("disconnected during the update" if event == zmq.EVENT_DISCONNECTED else
                            "refuses connections (nothing listens there)")
                    raise WeightSyncError(f"destination rank {d} ({self.addresses[d]}) {what}: its process is gone "
                                          "or closed its socket")
                if sock not in ready:
                    raise WeightSyncError(f"no answer about v{version} from destination rank {d} within "
                                          f"{self.timeout_s:g}s")
                try:
                    reply = recv_msg(sock, signer=self.signer)[1]
                except (Unauthenticated, ProtocolError) as e:
                    raise WeightSyncError(f"destination rank {d} ({self.addresses[d]}) answered with a bad message: "
                                          f"{e}")
                answered = _reply_version(reply)
                if answered is None or answered == version:
                    out[d] = reply
                    break
                self.num_stale += 1
                logger.warning("destination rank %d answered about v%d during v%d (a late answer to an update this "
                               "source gave up on): skipped", d, answered, version)
        return out
