"""Weight updates with the run's signer (rl_engine.auth): a forged bucket is never applied.

A ZMQ (and a shared-memory) receiver with a signer is fed, between and during real updates, garbage,
msgpack nested 1,000 deep, frames over its size limit, and well-formed weight messages that are
unsigned or signed with another run's key, some claiming the real source's rank. None of it reaches
the update (each counted in `num_rejected`), the receiver stays alive, and the real, signed update
is applied byte for byte.
"""

from __future__ import annotations

import threading

import msgspec
import pytest
import torch
import zmq

from rl_engine import protocol as P
from rl_engine.auth import RunAuth
from rl_engine.policy import from_pretrained
from rl_engine.weight_sync import (EngineLayout, SharedMemoryReceiverTransport, SharedMemorySenderTransport,
                                   TrainLayout, WeightPublisher, WeightReceiver, ZmqReceiverTransport,
                                   ZmqSenderTransport, plan_message_bytes, plan_sync)
from wsync_helpers import UNTIED, FakeEngine, assert_same_bytes, engine_model, write_weights

DEEP = msgspec.msgpack.encode({"version": P.PROTOCOL_VERSION, "msg": msgspec.Raw(b"\x91" * 1000 + b"\x00")})


def _forgeries(address: str, version: int, forger, ctx: zmq.Context, limit: int) -> int:
    """Send every kind of forged message; returns how many messages were sent (the oversized one is
    dropped with its connection and never counted). The socket lingers so that they all go out."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.IDENTITY, b"src0-forged")  # the real source's rank, another random suffix
    sock.connect(address)
    bucket = P.WeightUpdateBucket(version=version, bucket_index=0, checksum="",
                                  tensors={"0": torch.full((64,), 1e30)})
    sent = [[b"\xc1garbage"], [DEEP], P.encode(P.WeightUpdateBegin(version=version, num_buckets=1))]
    for frames in sent:
        sock.send_multipart(frames)
    P.send_msg(sock, bucket)  # unsigned
    P.send_msg(sock, bucket, signer=forger)  # another run's key
    P.send_msg(sock, P.WeightUpdateCommit(version=version, num_buckets=-1), signer=forger)
    sock.send_multipart([b"\x00" * (limit + 1)])
    sock.close()
    return len(sent) + 3


@pytest.mark.parametrize("kind", ["zmq", "shm"])
def test_forged_weight_messages_are_dropped_counted_and_never_applied(kind, tmp_path):
    auth, other = RunAuth.generate(), RunAuth.generate()
    signer, forger = auth.signer("weights"), other.signer("weights")
    trainer = from_pretrained(write_weights(str(tmp_path / "m"), UNTIED, seed=3), dtype=torch.float32)
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), bucket_bytes=1 << 16)
    limit = plan_message_bytes(plan, dst_rank=0)
    engine = FakeEngine(engine_model(UNTIED, EngineLayout(), 0, None))
    rx_cls, tx_cls = ((ZmqReceiverTransport, ZmqSenderTransport) if kind == "zmq"
                      else (SharedMemoryReceiverTransport, SharedMemorySenderTransport))
    rx = rx_cls(timeout_s=30, signer=signer, max_message_bytes=limit)
    receiver = WeightReceiver(engine, plan, transport=rx)
    tx = tx_cls({0: rx.address}, timeout_s=30, signer=signer)
    publisher = WeightPublisher(trainer, plan, src_rank=0, transport=tx)
    ctx = zmq.Context()
    try:
        forged = _forgeries(rx.address, 1, forger, ctx, limit)  # queued before the update
        errors: list = []
        thread = threading.Thread(target=lambda: errors.extend(_publish(publisher, 1)))
        thread.start()
        forged += _forgeries(rx.address, 1, forger, ctx, limit)  # and during it
        receiver.sync()
        thread.join()
        assert errors == [] and engine.weights_version == 1
        assert_same_bytes(engine.model, trainer, what="after a signed update among forgeries")
        # The forgeries travel on connections of their own: those that had not arrived when update 1
        # completed are read (and refused) during the next ones.
        version = 1
        while rx.num_rejected == 0 and version < 5:
            version += 1
            thread = threading.Thread(target=lambda: errors.extend(_publish(publisher, version)))
            thread.start()
            receiver.sync()
            thread.join()
        assert errors == [] and engine.weights_version == version
        assert 0 < rx.num_rejected <= forged
        # An unsigned sender (a trainer of another run, or a stranger) gets nowhere: the update times out
        # on the receiver's side and the engine keeps version 1.
        stranger = WeightPublisher(trainer, plan, src_rank=0, transport=tx_cls({0: rx.address}, timeout_s=3))
        thread = threading.Thread(target=lambda: _publish(stranger, version + 1))
        thread.start()
        rx.timeout_s = 3
        with pytest.raises(Exception, match="timed out|keeps"):
            receiver.sync()
        thread.join()
        stranger.transport.close()
        assert engine.weights_version == version
    finally:
        tx.close()
        rx.close()
        ctx.destroy(linger=0)


def _publish(publisher: WeightPublisher, version: int) -> list:
    try:
        publisher.publish(version)
    except Exception as e:  # handed to the test
        return [e]
    return []
