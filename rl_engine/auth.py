"""Authenticated actor sockets: one secret per run, CURVE on the control sockets, AES-GMAC on weights.

The launcher makes a 32-byte secret (`RunAuth.generate()`) and hands it to its children in their
environment (`RL_ENGINE_RUN_SECRET`; /proc/<pid>/environ is readable by the same user only), never in
a command line or a file; each actor takes it with `RunAuth.from_env()`, which also removes it from
the environment so processes the actor starts (reward pools, compilers) do not inherit it.

Every key is derived from the secret, by name (`HMAC-SHA256(secret, label)`):
- Control sockets (the coordinator's ROUTER and its heartbeat ROUTER, every actor's DEALER) use ZMQ
  CURVE. The server key is the coordinator's; each actor has a keypair of its own name, and the
  server's ZAP handler accepts exactly the keys of the names it was told to expect. The handler's
  User-Id is the z85 public key, so `peer_name(frame)` gives the authenticated name of the peer that
  sent a frame: identity comes from the connection, never from a field of the message or from the
  routing id a client chose (`check_peer` refuses a routing id that differs from it).
- Weight sockets carry gigabytes, and CURVE's encryption measured 4-5x slower than plain TCP on this
  machine (0.2-0.3 against 1.1-1.3 GB/s for 64 MB messages), so they stay unencrypted and every message
  carries an AES-GMAC tag over all its frames and the sender's identity (`MessageSigner`; OpenSSL
  through `cryptography`, 12-20 GB/s here). A message whose tag does not verify is dropped before it is
  decoded, so a forged bucket is never applied. The weights are readable on the wire (not secret),
  but not forgeable.

Refusals are counted (`RunAuth.rejected`): failed handshakes, read from the server sockets' monitors
(no key, the wrong server key, or a key of no expected name that ZAP denied; a refused client retries
every 100 ms, and each try counts), routing ids that lie about the peer, and messages with a bad tag.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Union

import zmq
import zmq.auth.thread
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

SECRET_ENV = "RL_ENGINE_RUN_SECRET"
SECRET_BYTES = 32
NONCE_BYTES, TAG_BYTES = 12, 16
ZAP_DOMAIN = "rl_engine"
COORDINATOR = "coordinator"  # the name whose keypair the control servers use
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

Buffer = Union[bytes, bytearray, memoryview, "zmq.Frame"]


class AuthError(RuntimeError):
    """The run's secret is missing or malformed."""


class RunAuth:
    """The run's secret and everything derived from it; one per process."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise AuthError(f"a run secret has {SECRET_BYTES} bytes, got {len(secret)}")
        self._secret = secret
        self._names: dict[bytes, str] = {}  # z85 public key -> actor name, of the names this process serves
        self._lock = threading.Lock()
        self._authenticators: dict[int, zmq.auth.thread.ThreadAuthenticator] = {}
        self._monitors: list[zmq.Socket] = []
        self._rejected = 0

    # ---- the secret -------------------------------------------------------------------------------
    @classmethod
    def generate(cls) -> RunAuth:
        return cls(os.urandom(SECRET_BYTES))

    @classmethod
    def from_env(cls, *, keep: bool = False) -> RunAuth:
        """The secret the launcher put in this process's environment (removed from it unless `keep`)."""
        value = os.environ.get(SECRET_ENV) if keep else os.environ.pop(SECRET_ENV, None)
        if not value:
            raise AuthError(f"{SECRET_ENV} is not set: actors are started by `rl-engine train` (or a launcher "
                            "that hands them the run's secret); they refuse to run unauthenticated")
        try:
            return cls(bytes.fromhex(value))
        except ValueError:
            raise AuthError(f"{SECRET_ENV} must be {2 * SECRET_BYTES} hex digits") from None

    def child_env(self) -> dict[str, str]:
        """The environment entry that hands the secret to a child process."""
        return {SECRET_ENV: self._secret.hex()}

    def derive(self, label: str) -> bytes:
        return hmac.new(self._secret, label.encode(), hashlib.sha256).digest()

    # ---- CURVE --------------------------------------------------------------------------------------
    def keypair(self, name: str) -> tuple[bytes, bytes]:
        """(public, secret) CURVE keys of `name`, z85-encoded."""
        secret = z85.encode(self.derive(f"curve:{name}"))
        return zmq.curve_public(secret), secret

    def serve(self, socket: zmq.Socket, *, peers: Iterable[str]) -> None:
        """Make `socket` (before it binds) a CURVE server that accepts the keys of `peers` alone."""
        with self._lock:
            for name in peers:
                self._names[self.keypair(name)[0]] = name
            key = id(socket.context)
            if key not in self._authenticators:
                authenticator = zmq.auth.thread.ThreadAuthenticator(socket.context)
                authenticator.start()
                authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)
                self._authenticators[key] = authenticator
        public, secret = self.keypair(COORDINATOR)
        socket.curve_secretkey, socket.curve_publickey = secret, public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN.encode()
        if socket.type == zmq.ROUTER:
            # An actor that reconnects (its old connection not yet torn down here) takes its identity
            # over instead of being ignored; only the holder of that name's key can (check_peer).
            socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._monitors.append(socket.get_monitor_socket(_HANDSHAKE_FAILED))

    def connect_as(self, socket: zmq.Socket, name: str) -> None:
        """Make `socket` (before it connects) a CURVE client with `name`'s keys."""
        public, secret = self.keypair(name)
        socket.curve_secretkey, socket.curve_publickey = secret, public
        socket.curve_serverkey = self.keypair(COORDINATOR)[0]

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP (runs on the authenticator's thread): is this the key of an expected peer?"""
        with self._lock:  # a refusal is counted once, from the server socket's monitor (HANDSHAKE_FAILED_AUTH)
            return client_key in self._names

    def peer_name(self, frame: zmq.Frame) -> str | None:
        """The authenticated name of the peer a received frame came from (None: not a CURVE peer)."""
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        with self._lock:
            return self._names.get(user_id.encode() if isinstance(user_id, str) else user_id)

    def check_peer(self, frame: zmq.Frame, identity: bytes) -> str | None:
        """The peer's name if `identity` (the ROUTER's routing id) is the authenticated peer's own name;
        else None, counted as a refusal."""
        name = self.peer_name(frame)
        if name is not None and name.encode() == identity:
            return name
        self.count_rejected()
        return None

    # ---- counting -----------------------------------------------------------------------------------
    def count_rejected(self, n: int = 1) -> None:
        with self._lock:
            self._rejected += n

    @property
    def rejected(self) -> int:
        """Refusals so far (handshake failures are read from the server sockets' monitors here)."""
        for monitor in self._monitors:
            while monitor.poll(0):
                recv_monitor_message(monitor)
                self.count_rejected()
        with self._lock:
            return self._rejected

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._monitors.clear()
        for authenticator in self._authenticators.values():
            authenticator.stop()
        self._authenticators.clear()

    # ---- message tags (weights) -------------------------------------------------------------------
    def signer(self, purpose: str) -> MessageSigner:
        return MessageSigner(self.derive(f"gmac:{purpose}"), on_reject=self.count_rejected)


class MessageSigner:
    """AES-GMAC tags for multipart messages: `sign(frames, peer=...)` returns the frame to append,
    `verify(frames, peer=...)` checks and strips it. `peer` binds the tag to the sender's identity (as
    the ROUTER sees it) and direction, so a message cannot be replayed under another identity."""

    def __init__(self, key: bytes, *, on_reject=None) -> None:
        if len(key) != 32:
            raise ValueError(f"an AES-256 key has 32 bytes, got {len(key)}")
        self._key = key
        self._on_reject = on_reject

    def _tag(self, frames: Sequence[Buffer], peer: bytes, nonce: bytes, tag: bytes | None = None) -> bytes:
        mode = modes.GCM(nonce) if tag is None else modes.GCM(nonce, tag)
        cipher = Cipher(algorithms.AES(self._key), mode)
        ctx = cipher.encryptor() if tag is None else cipher.decryptor()
        ctx.authenticate_additional_data(len(peer).to_bytes(8, "little") + peer + len(frames).to_bytes(8, "little"))
        for frame in frames:
            view = memoryview(frame.buffer if isinstance(frame, zmq.Frame) else frame).cast("B")
            ctx.authenticate_additional_data(view.nbytes.to_bytes(8, "little"))
            if view.nbytes:
                ctx.authenticate_additional_data(view)
        ctx.finalize()
        return nonce + ctx.tag if tag is None else b""

    def sign(self, frames: Sequence[Buffer], *, peer: bytes) -> bytes:
        return self._tag(frames, peer, os.urandom(NONCE_BYTES))

    def verify(self, frames: Sequence[Buffer], *, peer: bytes) -> list[Buffer] | None:
        """The frames without their tag frame, or None (counted) when the tag is missing or wrong."""
        if frames:
            last = frames[-1]
            tag_frame = bytes(last.buffer if isinstance(last, zmq.Frame) else last)
            if len(tag_frame) == NONCE_BYTES + TAG_BYTES:
                try:
                    self._tag(frames[:-1], peer, tag_frame[:NONCE_BYTES], tag_frame[NONCE_BYTES:])
                    return list(frames[:-1])
                except InvalidTag:
                    pass
        if self._on_reject is not None:
            self._on_reject()
        return None
