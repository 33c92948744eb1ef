"""Wire protocol: round trips of every message, zero copy, each malformed input, a live ZMQ pair."""

import threading

import msgspec
import numpy as np
import pytest
import torch
import zmq

from rl_engine import protocol as P


def _sample(n: int, sid: str = "s0") -> P.SampleResult:
    return P.SampleResult(
        sample_id=sid,
        token_ids=torch.arange(n, dtype=torch.int32),
        behavior_logprobs=-torch.rand(n),
        policy_versions=torch.full((n,), 3, dtype=torch.int32),
        kv_versions=torch.full((n,), 2, dtype=torch.int32),
        finish_reason="stop",
    )


def _all_messages() -> list[P.Message]:
    torch.manual_seed(0)
    return [
        P.Heartbeat(sender="worker-0", time=1234.5),
        P.Hello(worker_id="w1", role="rollout", capabilities={"tp": 2, "fp8": False, "name": "x", "mem": 1.5}),
        P.GenerateRequest(
            request_id="r1",
            sample_ids=["r1/0", "r1/1"],
            prompt_token_ids=[1, 2, 3],
            sampling=P.WireSamplingParams(temperature=0.7, top_k=5, stop_token_ids=[2], seed=7),
            policy_version=4,
        ),
        P.GenerateResult(request_id="r1", samples=[_sample(5, "r1/0"), _sample(0, "r1/1")]),
        P.GenerateRequest(request_id="r1#2", sample_ids=["r1#2/0"], prompt_token_ids=[1, 2],
                          sampling=P.WireSamplingParams(seed=3), policy_version=5, resume=[_sample(3, "r1#2/0")]),
        P.GenerateResult(request_id="r3", samples=[_sample(2, "r3/0")], interrupted=True, decode_compile_s=12.5),
        P.GenerateBatch(requests=[P.GenerateRequest(request_id="r2", sample_ids=["r2/0"], prompt_token_ids=[4],
                                                    sampling=P.WireSamplingParams(ignore_eos=True), policy_version=0)],
                        min_finished=1),
        P.TrainBatch(step=3, policy_version=4, prompt_lens=torch.tensor([2, 1]), response_lens=torch.tensor([1, 2]),
                     token_ids=torch.arange(6), behavior_logprobs=-torch.rand(3),
                     policy_versions=torch.full((3,), 3), kv_versions=torch.full((3,), 3),
                     advantages=torch.tensor([0.5, -0.5]), routed_experts=torch.zeros(4, 2, 2, dtype=torch.int16),
                     weight_targets={"rollout-0": "tcp://127.0.0.1:5555"}, rewards=torch.tensor([1.0, 0.0]),
                     groups=torch.tensor([0, 0])),
        P.TrainResult(step=3, policy_version=4, metrics={"train/loss": 0.25}),
        P.UpdateWeights(version=4),
        P.UpdateWeights(version=5, interrupt=True),
        P.LoadCheckpoint(path="/tmp/ckpt/trainer", policy_version=3, weight_targets={"rollout-0": "tcp://127.0.0.1:1"}),
        P.PublishWeights(version=4, weight_targets={"rollout-1": "shm+tcp://127.0.0.1:7"}),
        P.WorkerExited(worker="rollout-1", pid=4242, reason="was killed by signal 9", restarting=True),
        P.WeightsApplied(worker_id="rollout-0", version=4, ok=True, seconds=0.1, probe_error=1e-7),
        P.WeightsPublished(version=4, failed=["rollout-1"], seconds=0.2),
        P.SaveCheckpoint(path="/tmp/ckpt", step=3),
        P.WeightUpdateBegin(version=5, num_buckets=2),
        P.WeightUpdateBucket(
            version=5,
            bucket_index=1,
            checksum="abc123",
            tensors={
                "w": torch.randn(3, 4, dtype=torch.bfloat16),
                "b": torch.randn(4),
                "h": torch.randn(2, dtype=torch.float16),
                "q": torch.randn(4).to(torch.float8_e4m3fn),
                "m": torch.tensor([True, False]),
                "s": torch.tensor(2.5, dtype=torch.float64),
                "e": torch.empty(0, 3),
            },
        ),
        P.WeightUpdateCommit(version=5, num_buckets=2),
        P.Ack(ref="weights:v5"),
        P.ErrorReply(code=P.ERROR_PROTOCOL, message="bad"),
        P.Shutdown(reason="done"),
    ]


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.dtype != torch.bool else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 and b.dtype != torch.bool else b)
    elif isinstance(a, msgspec.Struct):
        assert type(a) is type(b)
        for f in a.__struct_fields__:
            _assert_same(getattr(a, f), getattr(b, f))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in _all_messages()} == set(P.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", _all_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: P.Message) -> None:
    frames = P.encode(msg)
    # As received from a socket: independent byte strings.
    decoded = P.decode([bytes(f) for f in frames])
    _assert_same(msg, decoded)


def test_tensor_frames_are_zero_copy_both_ways() -> None:
    w = torch.randn(4, 4, dtype=torch.bfloat16)
    frames = P.encode(P.WeightUpdateBucket(version=1, bucket_index=0, checksum="", tensors={"w": w}))
    assert len(frames) == 2
    assert np.frombuffer(frames[1], dtype=np.uint8).ctypes.data == w.data_ptr()
    received = [bytes(frames[0]), bytearray(frames[1])]
    out = P.decode(received)
    assert out.tensors["w"].data_ptr() == np.frombuffer(received[1], dtype=np.uint8).ctypes.data
    assert torch.equal(out.tensors["w"], w)


def test_non_contiguous_tensor_is_sent_by_value() -> None:
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    out = P.decode(P.encode(P.WeightUpdateBucket(version=1, bucket_index=0, checksum="", tensors={"t": t})))
    assert torch.equal(out.tensors["t"], t)


def _envelope(body: object, *, version: int = P.PROTOCOL_VERSION) -> bytes:
    return msgspec.msgpack.encode({"version": version, "msg": msgspec.Raw(msgspec.msgpack.encode(body))})


def _bucket_body(header: list) -> dict:
    return {"type": "WeightUpdateBucket", "version": 1, "bucket_index": 0, "checksum": "", "tensors": {"w": header}}


GOOD_F32x2 = np.zeros(2, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("frames", "needle"),
    [
        ([], "empty multipart"),
        ([b"\xc1garbage"], "not a valid message envelope"),
        ([_envelope({"type": "Shutdown", "reason": ""}, version=P.PROTOCOL_VERSION + 1)], "protocol version"),
        ([_envelope({"type": "Teleport", "where": "mars"})], "unknown message type 'Teleport'"),
        ([_envelope({"type": "Ack"})], "missing required field `ref`"),
        ([_envelope({"type": "Heartbeat", "sender": "a", "time": "noon"})], "Expected `float`"),
        ([_envelope({"type": "GenerateResult", "request_id": "r", "samples": [], "decode_compile_s": -1.0})],
         "decode_compile_s must be a finite number >= 0, got -1.0"),
        ([_envelope(_bucket_body([1, "float32", [2]]))], "frames 1..0"),  # missing frame
        ([_envelope(_bucket_body([1, "float32", [2]])), GOOD_F32x2, GOOD_F32x2], "frames [2] are not referenced"),
        ([_envelope(_bucket_body([1, "float32", [3]])), GOOD_F32x2], "has 8 bytes but dtype float32 x shape [3] needs 12"),
        ([_envelope(_bucket_body([1, "complex32", [2]])), GOOD_F32x2], "unknown dtype 'complex32'"),
        ([_envelope(_bucket_body([1, "float32", [-2]])), GOOD_F32x2], "negative dimension"),
        ([_envelope(_bucket_body("not-a-header")), GOOD_F32x2], "expected a tensor header"),
        ([_envelope(_bucket_body([0, "float32", [2]])), GOOD_F32x2], "points at frame 0"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_malformed_messages_raise_protocol_error(frames: list[bytes], needle: str) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frames)
    assert needle in str(info.value)


def test_generate_result_without_compile_seconds_decodes() -> None:
    """A GenerateResult frame from before `decode_compile_s` (a checkpoint's rollout buffer) decodes, as 0."""
    msg = P.decode([_envelope({"type": "GenerateResult", "request_id": "r", "samples": []})])
    assert msg == P.GenerateResult(request_id="r", samples=[]) and msg.decode_compile_s == 0.0


def test_duplicate_frame_reference() -> None:
    body = {"type": "WeightUpdateBucket", "version": 1, "bucket_index": 0, "checksum": "",
            "tensors": {"a": [1, "float32", [2]], "b": [1, "float32", [2]]}}
    with pytest.raises(P.ProtocolError, match="referenced by more than one"):
        P.decode([_envelope(body), GOOD_F32x2])


def test_per_token_length_mismatch_is_rejected_on_decode() -> None:
    frames = P.encode(P.GenerateResult(request_id="r", samples=[_sample(3)]))
    # Tamper with the wire: claim behavior_logprobs has 2 entries and send 2.
    body = msgspec.msgpack.decode(frames[0])["msg"]
    header = body["samples"][0]["behavior_logprobs"]
    header[2] = [2]
    frames[header[0]] = np.zeros(2, dtype=np.float32).tobytes()
    with pytest.raises(P.ProtocolError, match="behavior_logprobs has 2 entries but token_ids has 3"):
        P.decode([_envelope(body), *frames[1:]])


def test_train_batch_rewards_need_one_entry_per_sample() -> None:
    batch = dict(step=1, policy_version=1, prompt_lens=torch.tensor([2, 1]), response_lens=torch.tensor([1, 2]),
                 token_ids=torch.arange(6), behavior_logprobs=-torch.rand(3), policy_versions=torch.zeros(3),
                 kv_versions=torch.zeros(3), advantages=torch.zeros(2))
    with pytest.raises(ValueError, match=r"rewards has shape \(3,\); one entry per sample is \(2,\)"):
        P.TrainBatch(**batch, rewards=torch.zeros(3))
    with pytest.raises(ValueError, match=r"groups has shape \(2, 1\)"):
        P.TrainBatch(**batch, groups=torch.zeros(2, 1, dtype=torch.int64))


def test_unsendable_dtype_names_the_fix() -> None:
    with pytest.raises(TypeError, match="complex64 is not sendable"):
        P.encode(P.WeightUpdateBucket(version=1, bucket_index=0, checksum="", tensors={"c": torch.zeros(2, dtype=torch.complex64)}))


def _serve(url_holder: list[str], ready: threading.Event, ctx: zmq.Context) -> None:
    """A ROUTER that answers Heartbeat with Ack, bad input with ErrorReply, stops on Shutdown."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    url_holder.append(P.bind(sock))  # loopback by default
    ready.set()
    try:
        while sock.poll(10_000):
            try:
                route, msg = P.recv_msg(sock, num_route_frames=1)
            except P.ProtocolError as e:
                P.send_msg(sock, P.error_reply(e), route=e.route)
                continue
            if isinstance(msg, P.Heartbeat):
                P.send_msg(sock, P.Ack(ref=f"hb:{msg.sender}"), route=route)
            elif isinstance(msg, P.Shutdown):
                P.send_msg(sock, P.Ack(ref="shutdown"), route=route)
                return
            else:
                P.send_msg(sock, P.ErrorReply(code=P.ERROR_UNEXPECTED, message=type(msg).__name__), route=route)
    finally:
        sock.close()


def test_zmq_receiver_survives_malformed_messages() -> None:
    ctx = zmq.Context()
    url: list[str] = []
    ready = threading.Event()
    server = threading.Thread(target=_serve, args=(url, ready, ctx), daemon=True)
    server.start()
    assert ready.wait(10)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.RCVTIMEO, 10_000)
    client.setsockopt(zmq.LINGER, 0)
    assert url[0].startswith("tcp://127.0.0.1:")
    client.connect(url[0])
    try:
        client.send_multipart([b"not msgpack at all"])
        _, reply = P.recv_msg(client)
        assert isinstance(reply, P.ErrorReply) and reply.code == P.ERROR_PROTOCOL
        assert "envelope" in reply.message

        client.send_multipart([_envelope({"type": "Teleport"})])
        _, reply = P.recv_msg(client)
        assert isinstance(reply, P.ErrorReply) and "Teleport" in reply.message

        good = P.encode(P.Heartbeat(sender="w0", time=1.0))
        client.send_multipart([*good, b"extra frame"])
        _, reply = P.recv_msg(client)
        assert isinstance(reply, P.ErrorReply) and "not referenced" in reply.message

        # Still serving: a valid message gets its normal answer, tensors travel intact.
        P.send_msg(client, P.Heartbeat(sender="w0", time=2.0))
        _, reply = P.recv_msg(client)
        assert reply == P.Ack(ref="hb:w0")
        P.send_msg(client, P.GenerateResult(request_id="r", samples=[_sample(4)]))
        _, reply = P.recv_msg(client)
        assert reply == P.ErrorReply(code=P.ERROR_UNEXPECTED, message="GenerateResult")

        P.send_msg(client, P.Shutdown())
        _, reply = P.recv_msg(client)
        assert reply == P.Ack(ref="shutdown")
        server.join(10)
        assert not server.is_alive()
    finally:
        client.close()
        ctx.term()
