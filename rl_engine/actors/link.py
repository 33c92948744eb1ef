"""The actor side of the coordinator connection: a DEALER socket whose identity is the actor's id,
registration with `Hello`, heartbeats from their own thread, and a receive that never raises on bad
input.

A message the actor cannot decode, or one it does not take, is answered with `ErrorReply` (to whoever
sent it) and logged; the actor keeps serving. An `ErrorReply` that arrives is only logged, never
answered, so two peers can never bounce errors at each other.
"""

from __future__ import annotations

import logging
import os

import zmq

from rl_engine import protocol as P
from rl_engine.auth import RunAuth
from rl_engine.config import load_config
from rl_engine.train_config import RLConfig
from rl_engine.launch.heartbeat import HeartbeatSender

logger = logging.getLogger(__name__)


class CoordinatorLink:
    def __init__(self, address: str, *, auth: RunAuth, actor_id: str, role: str, heartbeat_address: str,
                 heartbeat_interval_s: float, capabilities: dict[str, str | int | float | bool] | None = None,
                 context: zmq.Context | None = None, max_frame_bytes: int = 64 << 20) -> None:
        self.actor_id, self.role = actor_id, role
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, actor_id.encode())
        self.socket.setsockopt(zmq.LINGER, 2000)  # let the last answers out on close
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # `max_message_bytes(cfg)` in a run
        auth.connect_as(self.socket, actor_id)  # CURVE: only the coordinator's key is accepted as the server
        self.socket.connect(address)
        self.num_errors = 0  # malformed or unexpected messages answered with ErrorReply
        self.send(P.Hello(worker_id=actor_id, role=role,
                          capabilities={"pid": os.getpid(), **kernel_capabilities(), **(capabilities or {})}))
        self.heartbeat = HeartbeatSender(heartbeat_address, sender_id=actor_id, interval_s=heartbeat_interval_s,
                                         context=self.context, auth=auth).start()

    def send(self, msg: P.Message) -> None:
        P.send_msg(self.socket, msg)

    def receive(self, timeout_ms: int, *, expected: tuple[type[P.Message], ...]) -> P.Message | None:
        """The next message of one of the `expected` types, or None (nothing within the timeout, or a
        bad message that was answered with ErrorReply)."""
        if not self.socket.poll(timeout_ms):
            return None
        try:
            _, msg = P.recv_msg(self.socket)
        except P.ProtocolError as e:
            self._refuse(f"malformed message: {e}", P.error_reply(e))
            return None
        if isinstance(msg, P.ErrorReply):
            logger.warning("%s: the coordinator reported an error (%s): %s", self.actor_id, msg.code, msg.message)
            return None
        if not isinstance(msg, expected):
            names = ", ".join(t.__name__ for t in expected)
            self._refuse(f"unexpected {type(msg).__name__} message",
                         P.ErrorReply(code=P.ERROR_UNEXPECTED,
                                      message=f"{self.role} {self.actor_id} takes {names}, not {type(msg).__name__}"))
            return None
        return msg

    def _refuse(self, what: str, reply: P.ErrorReply) -> None:
        self.num_errors += 1
        logger.warning("%s: %s; answered with ErrorReply", self.actor_id, what)
        try:
            self.send(reply)
        except zmq.ZMQError as e:
            logger.warning("%s: could not send the error reply: %s", self.actor_id, e)

    def close(self) -> None:
        self.heartbeat.stop()
        self.socket.close()


KERNELS_KEY = "batch_invariant_kernels"  # Hello capability: `kernel_choice()`'s identity (and _reason: why)


def kernel_capabilities() -> dict[str, str]:
    """Under `model.batch_invariant` (the registry's mode, which `load_actor_config` sets): this process's
    batch-invariant kernel choice, for the coordinator to compare across the run's processes."""
    from rl_engine import kernels
    from rl_engine.kernels.invariant import kernel_choice

    if not kernels.default_registry().config.batch_invariant:
        return {}
    identity, reason = kernel_choice()
    return {KERNELS_KEY: identity, f"{KERNELS_KEY}_reason": reason}


def report_startup_failure(address: str, *, auth: RunAuth, actor_id: str, error: BaseException) -> None:
    """An actor that cannot start tells the coordinator (ErrorReply code "startup_failed"), which then
    ends the run with the reason instead of waiting for a registration that will never come."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, actor_id.encode())
    socket.setsockopt(zmq.LINGER, 2000)
    auth.connect_as(socket, actor_id)
    try:
        socket.connect(address)
        P.send_msg(socket, P.ErrorReply(code=ERROR_STARTUP, message=f"{type(error).__name__}: {error}"))
    finally:
        socket.close()


ERROR_STARTUP = "startup_failed"


def max_message_bytes(cfg: RLConfig) -> int:
    """The largest frame a legitimate peer sends on a control socket, with room to spare: a step's
    per-token tensors (a TrainBatch or a colocated round's results: 8 bytes a token, plus routed
    experts when recorded) for every sample of the prompts a step can hold, each as long as an engine
    step's token budget. Sockets refuse larger frames (the sender is disconnected)."""
    r = cfg.rollout
    tokens = 2 * r.async_prompts_in_flight * r.n * (r.max_num_batched_tokens + r.max_new_tokens)
    per_token = 8 + (512 if r.routing_replay else 0)
    return max(64 << 20, tokens * per_token)


def load_actor_config(path: str) -> RLConfig:
    """An actor process's run config, with its torch settings applied: intra-op threads
    (`placement.threads_per_process`), `train.keep_freed_memory` (malloc), `model.batch_invariant` (the
    kernel registry) and `train.deterministic`."""
    import torch

    from rl_engine import kernels
    from rl_engine.kernels.cpu import host_memory

    cfg = load_config(RLConfig, path)
    torch.set_num_threads(cfg.placement.threads_per_process)
    if cfg.train.keep_freed_memory:
        host_memory.keep_freed_memory()
    kernels.set_batch_invariant(cfg.model.batch_invariant)  # before any model is built
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    return cfg
