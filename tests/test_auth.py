"""Authenticated control sockets (rl_engine.auth, CURVE + ZAP) and receivers that survive any bytes.

Each receiver is exercised in this process over real loopback sockets: the coordinator's ROUTER
(`CoordinatorBase`), the heartbeat monitor, and an actor's `CoordinatorLink`. Clients without the
run's keys, with a wrong key, or lying about their identity never reach a handler and are counted;
authenticated peers sending random bytes, msgpack nested 1,000 deep or frames over the size limit
get an error reply (or are disconnected) and the receiver keeps serving.
"""

from __future__ import annotations

import os
import random
import time

import msgspec
import pytest
import zmq

from rl_engine import protocol as P
from rl_engine.auth import SECRET_ENV, AuthError, MessageSigner, RunAuth

DEEP = msgspec.msgpack.encode({"version": P.PROTOCOL_VERSION, "msg": msgspec.Raw(b"\x91" * 1000 + b"\x00")})
DEEP_ENVELOPE = b"\x91" * 5000 + b"\x00"


def fuzz_frames(seed: int, count: int) -> list[list[bytes]]:
    """Random bytes, truncated and bit-flipped valid messages, deep nesting, many frames."""
    rng = random.Random(seed)
    valid = P.encode(P.TrainResult(step=1, policy_version=1, metrics={"a": 1.0}))
    out = [[DEEP], [DEEP_ENVELOPE], [b""], [b"\xc1"], [bytes(valid[0]), b"extra frame"]]
    while len(out) < count:
        kind = rng.randrange(3)
        if kind == 0:
            out.append([rng.randbytes(rng.randrange(1, 200))])
        elif kind == 1:
            body = bytearray(valid[0])
            body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
            out.append([bytes(body)])
        else:
            out.append([bytes(valid[0])[: rng.randrange(len(valid[0]))]])
    return out


def _client(ctx: zmq.Context, address: str, *, identity: bytes, auth: RunAuth | None = None,
            keys: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket:
    """A DEALER: the run's keys for `identity` (auth), explicit CURVE keys (public, secret, server), or none."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    if auth is not None:
        auth.connect_as(sock, identity.decode())
    elif keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    sock.connect(address)
    return sock


def _server(ctx: zmq.Context, auth: RunAuth, peers: list[str]) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    auth.serve(sock, peers=peers)
    return sock, P.bind(sock)


def _wait_rejected(auth: RunAuth, at_least: int, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while auth.rejected < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return auth.rejected


def test_secret_travels_in_the_environment_only_and_is_removed(monkeypatch):
    auth = RunAuth.generate()
    env = auth.child_env()
    assert list(env) == [SECRET_ENV] and len(bytes.fromhex(env[SECRET_ENV])) == 32
    monkeypatch.setenv(SECRET_ENV, env[SECRET_ENV])
    child = RunAuth.from_env()
    assert SECRET_ENV not in os.environ  # processes the actor starts do not inherit it
    assert child.keypair("rollout-0") == auth.keypair("rollout-0")  # same secret, same keys
    assert RunAuth.generate().keypair("rollout-0") != auth.keypair("rollout-0")
    with pytest.raises(AuthError, match="RL_ENGINE_RUN_SECRET is not set"):
        RunAuth.from_env()
    monkeypatch.setenv(SECRET_ENV, "zz")
    with pytest.raises(AuthError, match="hex digits"):
        RunAuth.from_env()


def test_curve_server_admits_expected_peers_by_key_and_refuses_the_rest():
    ctx = zmq.Context()
    auth, other = RunAuth.generate(), RunAuth.generate()
    server, address = _server(ctx, auth, ["rollout-0"])
    good = _client(ctx, address, identity=b"rollout-0", auth=auth)
    P.send_msg(good, P.Heartbeat(sender="rollout-0", time=1.0))
    assert server.poll(20_000)
    parts = server.recv_multipart(copy=False)
    assert auth.peer_name(parts[0]) == "rollout-0" and bytes(parts[0].buffer) == b"rollout-0"

    public, secret = zmq.curve_keypair()
    strangers = [
        _client(ctx, address, identity=b"rollout-0"),  # no CURVE at all
        _client(ctx, address, identity=b"rollout-0", auth=other),  # another run's keys (wrong server key)
        # the right server key (as if it leaked) but a client key of no expected name: ZAP says no
        _client(ctx, address, identity=b"rollout-0", keys=(public, secret, auth.keypair("coordinator")[0])),
        # a name this server does not expect, with the run's keys
        _client(ctx, address, identity=b"rollout-1", auth=auth),
    ]
    for sock in strangers:
        P.send_msg(sock, P.ErrorReply(code="startup_failed", message="forged"))
    assert _wait_rejected(auth, 4) >= 4
    assert not server.poll(500)  # nothing any of them sent got through
    for sock in [good, *strangers]:
        sock.close()
    server.close()
    auth.close()
    ctx.destroy(linger=0)


def test_routing_id_that_lies_about_the_peer_is_refused_before_decoding():
    ctx = zmq.Context()
    auth = RunAuth.generate()
    server, address = _server(ctx, auth, ["rollout-0", "rollout-1"])
    liar = ctx.socket(zmq.DEALER)  # rollout-1's keys, rollout-0's routing id
    liar.setsockopt(zmq.LINGER, 0)
    liar.setsockopt(zmq.IDENTITY, b"rollout-0")
    auth.connect_as(liar, "rollout-1")
    liar.connect(address)
    P.send_msg(liar, P.Heartbeat(sender="rollout-0", time=1.0))
    assert server.poll(20_000)
    before = auth.rejected
    with pytest.raises(P.Unauthenticated, match="not the authenticated peer"):
        P.recv_msg(server, num_route_frames=1, auth=auth)
    assert auth.rejected == before + 1
    liar.close()
    server.close()
    auth.close()
    ctx.destroy(linger=0)


def test_message_signer_binds_frames_identity_and_key():
    key = os.urandom(32)
    signer, forger = MessageSigner(key), MessageSigner(os.urandom(32))
    frames = [b"header", memoryview(bytearray(b"x" * 1000))]
    tag = signer.sign(frames, peer=b"src0")
    assert signer.verify([*frames, tag], peer=b"src0") == frames
    assert signer.verify([*frames, tag], peer=b"src1") is None  # another identity
    assert signer.verify([b"header", b"y" * 1000, tag], peer=b"src0") is None  # other bytes
    assert signer.verify([b"header", tag], peer=b"src0") is None  # a frame dropped
    assert signer.verify([*frames, forger.sign(frames, peer=b"src0")], peer=b"src0") is None  # wrong key
    assert signer.verify(frames, peer=b"src0") is None  # no tag at all
    assert signer.sign(frames, peer=b"src0") != tag  # a fresh nonce each time


def test_decode_turns_any_failure_into_a_protocol_error():
    for frames in fuzz_frames(seed=0, count=400):
        try:
            P.decode(frames)
        except P.ProtocolError:
            pass


def test_coordinator_router_survives_fuzz_from_authenticated_peers_and_refuses_strangers(tmp_path):
    from rl_engine.actors.coordinator_io import CoordinatorBase
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig

    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path}", "placement.mode=disaggregated",
                                       "placement.num_rollout_workers=1"])
    auth = RunAuth.generate()
    coordinator = CoordinatorBase(cfg, auth=auth, port=None, heartbeat_port=None)
    ctx = zmq.Context()
    try:
        trainer = _client(ctx, coordinator.address, identity=b"trainer", auth=auth)
        trainer.setsockopt(zmq.RCVTIMEO, 20_000)
        stranger = _client(ctx, coordinator.address, identity=b"trainer")
        P.send_msg(stranger, P.ErrorReply(code="startup_failed", message="the run should end"))
        frames = fuzz_frames(seed=1, count=60)
        for parts in frames:
            trainer.send_multipart(parts)
        for _ in frames:  # every one answered with an error, none raised out of the pump
            while not trainer.poll(0):
                coordinator.pump(0.05)
            reply = P.decode(trainer.recv_multipart())
            assert isinstance(reply, P.ErrorReply) and reply.code in (P.ERROR_PROTOCOL, P.ERROR_UNEXPECTED)
        assert coordinator.num_protocol_errors == len(frames)
        P.send_msg(trainer, P.Hello(worker_id="trainer", role="trainer"))
        coordinator.wait_until(lambda: "trainer" in coordinator.actors, "registration", timeout_s=20)
        assert _wait_rejected(auth, 1) >= 1  # the stranger's handshake, counted
        coordinator.pump(0.1)  # its forged startup_failed never arrived: the run goes on
        trainer.close()
        stranger.close()
    finally:
        coordinator.close()
        ctx.destroy(linger=0)


def test_oversized_frame_disconnects_its_sender_only(tmp_path):
    from rl_engine.actors.coordinator_io import CoordinatorBase
    from rl_engine.actors.link import max_message_bytes
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig

    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path}"])
    auth = RunAuth.generate()
    coordinator = CoordinatorBase(cfg, auth=auth, port=None, heartbeat_port=None)
    ctx = zmq.Context()
    try:
        big = _client(ctx, coordinator.address, identity=b"trainer", auth=auth)
        big.send_multipart([b"\x00" * (max_message_bytes(cfg) + 1)])  # never delivered: the connection drops
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            coordinator.pump(0.05)
        assert coordinator.num_protocol_errors == 0 and coordinator.actors == {}
        P.send_msg(big, P.Hello(worker_id="trainer", role="trainer"))  # the peer reconnects and is served
        coordinator.wait_until(lambda: "trainer" in coordinator.actors, "registration", timeout_s=20)
        assert coordinator.num_protocol_errors == 0
        big.close()
    finally:
        coordinator.close()
        ctx.destroy(linger=0)


def test_heartbeat_monitor_survives_fuzz_and_trusts_the_connection_not_the_sender_field():
    import queue

    from rl_engine.launch.heartbeat import HeartbeatMonitor

    auth = RunAuth.generate()
    alive: queue.Queue = queue.Queue()
    ctx = zmq.Context()
    monitor = HeartbeatMonitor(timeout_s=60, on_dead=lambda p: None, on_alive=alive.put, auth=auth,
                               peers=["rollout-0", "rollout-1"], context=ctx).start()
    try:
        peer = _client(ctx, monitor.address, identity=b"rollout-1", auth=auth)
        stranger = _client(ctx, monitor.address, identity=b"rollout-0")
        P.send_msg(stranger, P.Heartbeat(sender="rollout-0", time=1.0))  # no keys: never heard
        P.send_msg(peer, P.Heartbeat(sender="rollout-0", time=1.0))  # in another's name: refused
        for parts in fuzz_frames(seed=2, count=60):
            peer.send_multipart(parts)
        peer.send_multipart([b"\x00" * (1 << 17)])  # over the limit: drops this connection
        P.send_msg(peer, P.Heartbeat(sender="rollout-1", time=2.0))  # sent once the peer has reconnected
        assert alive.get(timeout=20) == "rollout-1"
        assert monitor.alive() == ["rollout-1"] and monitor.error is None
        assert _wait_rejected(auth, 1) >= 1
        peer.close()
        stranger.close()
    finally:
        monitor.stop()
        auth.close()
        ctx.destroy(linger=0)


def test_a_failed_monitor_thread_stops_the_coordinator(tmp_path):
    from rl_engine.actors.coordinator_io import CoordinatorBase
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig

    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path}"])
    coordinator = CoordinatorBase(cfg, auth=RunAuth.generate(), port=None, heartbeat_port=None)
    try:
        coordinator.monitor.tracker.expire = None  # a bug inside the monitor loop: TypeError on its thread
        deadline = time.monotonic() + 10
        while coordinator.monitor.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="heartbeat monitor failed"):
            coordinator.pump(0.01)
    finally:
        del coordinator.monitor.tracker.expire
        coordinator.close()


def test_actor_link_survives_fuzz_from_the_coordinator():
    from rl_engine.actors.link import CoordinatorLink
    from rl_engine.launch.heartbeat import HeartbeatMonitor

    auth = RunAuth.generate()
    ctx = zmq.Context()
    server, address = _server(ctx, auth, ["rollout-0"])
    monitor = HeartbeatMonitor(timeout_s=60, on_dead=lambda p: None, auth=auth, peers=["rollout-0"],
                               context=ctx).start()
    link = CoordinatorLink(address, auth=auth, actor_id="rollout-0", role="rollout",
                           heartbeat_address=monitor.address, heartbeat_interval_s=0.5, context=ctx)
    try:
        assert server.poll(20_000)
        route, hello = P.recv_msg(server, num_route_frames=1, auth=auth)
        assert isinstance(hello, P.Hello) and route == [b"rollout-0"]
        frames = fuzz_frames(seed=3, count=60)
        for parts in frames:
            server.send_multipart([b"rollout-0", *parts])
        P.send_msg(server, P.Shutdown(reason="done"), route=route)
        got = None
        deadline = time.monotonic() + 30
        while got is None and time.monotonic() < deadline:
            got = link.receive(100, expected=(P.Shutdown,))
        assert isinstance(got, P.Shutdown) and link.num_errors == len(frames)
    finally:
        link.close()
        monitor.stop()
        server.close()
        auth.close()
        ctx.destroy(linger=0)
