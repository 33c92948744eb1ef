"""Heartbeats over ZMQ: senders announce they are alive; a monitor declares silent peers dead.

A `HeartbeatSender` thread sends `protocol.Heartbeat` from a DEALER socket every `interval_s`; a
`HeartbeatMonitor` thread receives them on a ROUTER socket and calls `on_dead(peer)` once a peer has
been silent for `timeout_s` (the coordinator requeues that rollout worker's prompts), and
`on_alive(peer)` when a peer is first heard from or comes back. Malformed or unexpected messages get
an `ErrorReply` and a log line; they never stop the monitor, and neither does a raising callback.

Design choice: the liveness rule lives in `PeerTracker`, a small clock-injected object with no
sockets or threads, so it is unit-tested without sleeping and a coordinator that receives
heartbeats on its own socket can use it directly. Liveness is judged on the monitor's monotonic
clock at receipt, never on the sender's `time` field (clocks of two machines disagree).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

import zmq

from rl_engine import protocol as P
from rl_engine.auth import RunAuth

logger = logging.getLogger(__name__)


class PeerTracker:
    """Last-heard times of peers; thread-safe. A peer is dead after `timeout_s` of silence."""

    def __init__(self, *, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._clock = clock
        self._last_seen: dict[str, float] = {}
        self._dead: set[str] = set()
        self._lock = threading.Lock()

    def watch(self, peer: str) -> None:
        """Expect heartbeats from `peer` from now on: it is declared dead if none arrives in time
        (a worker that crashes before its first heartbeat is caught too)."""
        with self._lock:
            self._last_seen[peer] = self._clock()
            self._dead.discard(peer)

    def beat(self, peer: str) -> bool:
        """Record a heartbeat; True when the peer is new or was declared dead (it is back)."""
        with self._lock:
            fresh = peer not in self._last_seen or peer in self._dead
            self._last_seen[peer] = self._clock()
            self._dead.discard(peer)
            return fresh

    def last_heard(self, peer: str) -> float | None:
        """The clock's time of `peer`'s last heartbeat (or of `watch`), None for a peer not tracked."""
        with self._lock:
            return self._last_seen.get(peer)

    def forget(self, peer: str) -> None:
        """Stop tracking `peer` (it left cleanly)."""
        with self._lock:
            self._last_seen.pop(peer, None)
            self._dead.discard(peer)

    def expire(self) -> list[str]:
        """Peers newly past the timeout (each is reported once per death), sorted."""
        now = self._clock()
        with self._lock:
            newly = sorted(p for p, t in self._last_seen.items()
                           if p not in self._dead and now - t > self.timeout_s)
            self._dead.update(newly)
            return newly

    def alive(self) -> list[str]:
        with self._lock:
            return sorted(set(self._last_seen) - self._dead)

    def dead(self) -> list[str]:
        with self._lock:
            return sorted(self._dead)


class HeartbeatSender:
    """Sends `Heartbeat(sender=sender_id)` to `address` every `interval_s` from its own thread."""

    def __init__(self, address: str, *, sender_id: str, interval_s: float = 1.0,
                 context: zmq.Context | None = None, auth: RunAuth | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.address, self.sender_id, self.interval_s = address, sender_id, interval_s
        self._auth = auth
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{sender_id}", daemon=True)
        self.num_sent = 0

    def start(self) -> HeartbeatSender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        # The socket lives entirely in this thread (ZMQ sockets are not thread-safe).
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.sender_id.encode())  # the monitor knows us by it
        if self._auth is not None:
            self._auth.connect_as(sock, self.sender_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing while the monitor is unreachable...
        sock.setsockopt(zmq.SNDTIMEO, 0)  # ...and never block: a late heartbeat is a useless one
        sock.connect(self.address)
        try:
            while not self._stop.is_set():
                try:
                    P.send_msg(sock, P.Heartbeat(sender=self.sender_id, time=time.time()))
                    self.num_sent += 1
                except zmq.Again:
                    pass
                while sock.poll(0):  # replies are only ever errors; log them
                    try:
                        _, msg = P.recv_msg(sock)
                        logger.warning("heartbeat %s: monitor replied %r", self.sender_id, msg)
                    except P.ProtocolError as e:
                        logger.warning("heartbeat %s: bad reply from monitor: %s", self.sender_id, e)
                self._stop.wait(self.interval_s)
        finally:
            sock.close()


class HeartbeatMonitor:
    """Binds a ROUTER socket (loopback unless `host` says otherwise) and watches heartbeats.

    Callbacks run on the monitor thread: keep them short and thread-safe (e.g. put the peer on
    the coordinator's queue). The socket is bound in the constructor so `address` is known at once,
    then used only by the monitor thread."""

    def __init__(self, *, timeout_s: float, on_dead: Callable[[str], None],
                 on_alive: Callable[[str], None] | None = None, host: str = "127.0.0.1",
                 port: int | None = None, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic, auth: RunAuth | None = None,
                 peers: Sequence[str] = (), listen_fd: int | None = None) -> None:
        self.tracker = PeerTracker(timeout_s=timeout_s, clock=clock)
        self._on_dead, self._on_alive = on_dead, on_alive
        self._auth = auth
        self.error: BaseException | None = None  # what stopped the monitor thread, if anything did
        self._socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 64 << 10)  # a heartbeat is a few dozen bytes
        self._socket.setsockopt(zmq.RCVHWM, 1000)
        if auth is not None:  # CURVE: only `peers` get in, and each is known by its key
            auth.serve(self._socket, peers=peers)
        self.address = P.bind(self._socket, host=host, port=port, listen_fd=listen_fd)
        # Bounded so that stop() (which waits for the current poll) returns promptly.
        self._check_interval_ms = max(10, min(250, int(timeout_s * 1000 / 4)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat-monitor", daemon=True)

    def watch(self, peer: str) -> None:
        self.tracker.watch(peer)

    def forget(self, peer: str) -> None:
        self.tracker.forget(peer)

    def alive(self) -> list[str]:
        return self.tracker.alive()

    def dead(self) -> list[str]:
        return self.tracker.dead()

    def start(self) -> HeartbeatMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._socket.close()

    def __enter__(self) -> HeartbeatMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        # Whatever stops this thread is kept in `error` for the owner to raise (the coordinator does
        # on its next pump): a monitor that died silently would never declare a dead worker.
        try:
            while not self._stop.is_set():
                if self._socket.poll(self._check_interval_ms):
                    self._receive()
                for peer in self.tracker.expire():
                    logger.warning("peer %s missed heartbeats for %.1f s: declared dead", peer, self.tracker.timeout_s)
                    self._call(self._on_dead, peer)
        except BaseException as e:
            logger.exception("heartbeat monitor stopped")
            self.error = e

    def _receive(self) -> None:
        route: list[bytes] = []
        try:
            route, msg = P.recv_msg(self._socket, num_route_frames=1, auth=self._auth)
        except P.Unauthenticated as e:
            logger.warning("heartbeat monitor: refused: %s", e)
            return
        except P.ProtocolError as e:
            logger.warning("heartbeat monitor: malformed message: %s", e)
            self._reply(e.route, P.error_reply(e))
            return
        if not isinstance(msg, P.Heartbeat):
            logger.warning("heartbeat monitor: unexpected %s message", type(msg).__name__)
            self._reply(route, P.ErrorReply(code=P.ERROR_UNEXPECTED,
                                            message=f"the heartbeat socket takes Heartbeat, got {type(msg).__name__}"))
            return
        peer = route[0].decode(errors="replace")  # the connection's identity, not a field of the message
        if msg.sender != peer:
            logger.warning("heartbeat monitor: %s sent a heartbeat in the name of %r", peer, msg.sender)
            self._reply(route, P.ErrorReply(code=P.ERROR_UNEXPECTED,
                                            message=f"heartbeat sender {msg.sender!r} is not your identity {peer!r}"))
            return
        if self.tracker.beat(peer) and self._on_alive is not None:
            self._call(self._on_alive, peer)

    def _reply(self, route: list[bytes], msg: P.Message) -> None:
        if route:
            try:
                P.send_msg(self._socket, msg, route=route)
            except zmq.ZMQError as e:
                logger.warning("heartbeat monitor: could not send error reply: %s", e)

    @staticmethod
    def _call(callback: Callable[[str], None], peer: str) -> None:
        try:
            callback(peer)
        except Exception:
            logger.exception("heartbeat callback %r failed for peer %s", callback, peer)
