"""A ZMQ (or shared-memory) weight update whose receiver goes away mid-update fails at once with
an error naming it, instead of waiting out `timeout_s`: the trainer of an RL run moves on from a
rollout worker that died while it was being sent weights."""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

from rl_engine.policy import from_pretrained
from rl_engine.weight_sync import EngineLayout, TrainLayout, WeightPublisher, WeightSyncError, ZmqSenderTransport, plan_sync
from wsync_helpers import UNTIED, WAIT_S, write_weights


def test_sender_notices_a_receiver_that_disconnects(tmp_path):
    model = from_pretrained(write_weights(str(tmp_path / "m"), UNTIED, seed=1), dtype=torch.float32)
    plan = plan_sync(model.config, src=TrainLayout(tp=1, dtype=torch.float32),
                     dst=EngineLayout(tp=1, dtype=torch.float32), bucket_bytes=1 << 16)
    ctx = zmq.Context.instance()
    doomed = ctx.socket(zmq.ROUTER)  # takes the update's first message, then vanishes without answering
    doomed.setsockopt(zmq.LINGER, 0)
    port = doomed.bind_to_random_port("tcp://127.0.0.1")

    def die_after_first_message() -> None:
        doomed.poll(WAIT_S * 1000)
        doomed.recv_multipart()
        doomed.close()

    killer = threading.Thread(target=die_after_first_message)
    killer.start()
    transport = ZmqSenderTransport({0: f"tcp://127.0.0.1:{port}"}, timeout_s=WAIT_S)
    publisher = WeightPublisher([model], plan, src_rank=0, transport=transport)
    with pytest.raises(WeightSyncError, match="disconnected during the update"):
        publisher.publish(1)
    killer.join()
    transport.close()


def test_sender_notices_a_receiver_that_is_already_gone(tmp_path):
    model = from_pretrained(write_weights(str(tmp_path / "m"), UNTIED, seed=1), dtype=torch.float32)
    plan = plan_sync(model.config, src=TrainLayout(tp=1, dtype=torch.float32),
                     dst=EngineLayout(tp=1, dtype=torch.float32), bucket_bytes=1 << 16)
    gone = zmq.Context.instance().socket(zmq.ROUTER)
    port = gone.bind_to_random_port("tcp://127.0.0.1")
    gone.close(linger=0)  # its address is known, nothing listens there any more
    transport = ZmqSenderTransport({0: f"tcp://127.0.0.1:{port}"}, timeout_s=WAIT_S)
    with pytest.raises(WeightSyncError, match="refuses connections|disconnected"):
        WeightPublisher([model], plan, src_rank=0, transport=transport).publish(1)
    transport.close()
