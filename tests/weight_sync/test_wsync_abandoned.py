"""A receiver that times out of one update (starved under load, a source late) and then takes the next:
the late messages of the abandoned update are dropped and counted, never read as part of the next one
("sources sent different versions [1, 2]"), and each source hears once that its update was abandoned.
Two source processes (tp2) -> one engine rank in this process, over ZMQ and over shared memory. Then a
real mismatch (the sources publish different versions) is refused with both versions named. Over gloo
(`TorchDistTransport`): a receiver that times out of an update while its source still sends it (gloo then
closes the group's connections) takes the next update on a renewed group; and every bucket carries its
update's version: a bucket of another update is refused naming both, and the next update goes through. Every
gloo rank must exit with code 0 within its group's timeout: a gloo worker thread still holding a collective's
tensors when the interpreter finalizes aborts the process (SIGABRT), which a renewal made likely."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from rl_engine.launch.gloo import join_store, serve_store

from rl_engine.policy import load_hf_weights
from rl_engine.weight_sync import (
    EngineLayout,
    SharedMemoryReceiverTransport,
    SharedMemorySenderTransport,
    TrainLayout,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    ZmqReceiverTransport,
    ZmqSenderTransport,
    TorchDistTransport,
    plan_sync,
    sync_group,
)
from wsync_helpers import UNTIED, WAIT_S, FakeEngine, assert_same_bytes, engine_model, source_chunks, write_weights

SRC = TrainLayout(tp=2, dtype=torch.float32)
DST = EngineLayout(tp=1, dtype=torch.float32)
TRANSPORTS = {"zmq": (ZmqSenderTransport, ZmqReceiverTransport),
              "shm": (SharedMemorySenderTransport, SharedMemoryReceiverTransport)}


def _plan():
    return plan_sync(UNTIED, src=SRC, dst=DST, bucket_bytes=4 << 10)  # several buckets per source


def _publish(publisher: WeightPublisher, version: int) -> str | None:
    try:
        publisher.publish(version)
    except WeightSyncError as e:
        return str(e)
    return None


def source(rank: int, kind: str, address: str, paths: dict, abandoned, results) -> None:
    """Source rank `rank`: v1 from checkpoint "a" (rank 1 only once the receiver abandoned it), v2 from
    "b", then rank r publishes v3 + r (a real mismatch)."""
    torch.set_num_threads(1)
    chunks = source_chunks(UNTIED, SRC, rank, paths["a"])
    transport = TRANSPORTS[kind][0]({0: address}, timeout_s=WAIT_S)
    publisher = WeightPublisher(chunks, _plan(), src_rank=rank, transport=transport)
    out = {}
    if rank == 1:
        assert abandoned.wait(WAIT_S), "the receiver never gave up on v1"
    out["v1"] = _publish(publisher, 1)
    for chunk in chunks:
        load_hf_weights(chunk, paths["b"])
    out["v2"] = _publish(publisher, 2)
    out["mismatch"] = _publish(publisher, 3 + rank)
    out["stale_replies"] = transport.num_stale
    transport.close()
    results.put((rank, out))


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
def test_receiver_that_abandoned_an_update_takes_the_next(tmp_path, kind):
    paths = {"a": write_weights(str(tmp_path / "a"), UNTIED, seed=1),
             "b": write_weights(str(tmp_path / "b"), UNTIED, seed=2)}
    engine = FakeEngine(engine_model(UNTIED, DST, 0, None))
    rx = TRANSPORTS[kind][1](timeout_s=WAIT_S)
    receiver = WeightReceiver(engine, _plan(), dst_rank=0, transport=rx)
    ctx = multiprocessing.get_context("spawn")
    abandoned, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=source, args=(r, kind, rx.address, paths, abandoned, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        # Update 1: source 0 has begun it; source 1 holds back until the receiver has given up.
        assert rx.socket.poll(WAIT_S * 1000), "source 0 never began v1"
        rx.timeout_s = 1.0  # source 1 sends nothing before `abandoned`: this receive must time out
        with pytest.raises(WeightSyncError, match=r"abandoned update v1: timed out .* source rank\(s\) \[.*1\]"):
            receiver.receive()
        abandoned.set()
        rx.timeout_s = WAIT_S
        # Update 2 arrives behind source 1's late v1 (and maybe the end of source 0's): those are dropped.
        assert receiver.sync() == 2
        assert_same_bytes(engine.model, engine_model(UNTIED, DST, 0, paths["b"]), what="after v2")
        # Source 1's late v1: over ZMQ its begin, buckets and commit; over shared memory its begin only
        # (refused at once, it writes nothing into the staging region the engine reads v2 from).
        assert rx.num_stale >= (1 if kind == "shm" else 3)
        # A real mismatch: source 0 publishes v3 while source 1 publishes v4.
        with pytest.raises(WeightSyncError, match="sources sent different versions: source rank 0 v3, source rank 1 v4"):
            receiver.receive()
        assert engine.weights_version == 2
        out = dict(results.get(timeout=WAIT_S) for _ in procs)
        for p in procs:
            p.join(WAIT_S)
    finally:
        for p in procs:
            if p.is_alive():  # the test failed above: its sources may wait for answers that never come
                p.terminate()
                p.join()
        rx.close()
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):  # each source hears once, under its own update: no answer is read as another's
        assert "abandoned update v1" in out[r]["v1"], out[r]["v1"]
        assert out[r]["v2"] is None
        assert "source rank 0 v3, source rank 1 v4" in out[r]["mismatch"], out[r]["mismatch"]
        assert out[r]["stale_replies"] == 0


class LateBucket:
    """A sync group whose send of bucket 0 carries version `version - 1` in its trailer: a late message of
    the update before, as a source that timed out of it would leave behind."""

    def __init__(self, group) -> None:
        self.group, self.armed = group, True

    def send(self, tensors, dst, tag):
        if tag == 0 and self.armed:
            t = tensors[0].clone()
            version = int.from_bytes(t[-8:].numpy().tobytes(), "little", signed=True)
            t[-8:] = torch.frombuffer(bytearray((version - 1).to_bytes(8, "little", signed=True)), dtype=torch.uint8)
            tensors, self.armed = [t], False
        return self.group.send(tensors, dst, tag)

    def __getattr__(self, name):
        return getattr(self.group, name)


def _gloo_pair(rank: int, port: int, tp: int = 1, timeout_s: float = WAIT_S):
    """Ranks 0..tp-1 (the sources) and rank tp (the engine) of a gloo sync group on the store the test serves
    on `port` (bound before the ranks start, `serve_store`), and their plan."""
    torch.set_num_threads(1)
    group = sync_group(join_store(port, tp + 1), rank=rank, world_size=tp + 1, timeout_s=timeout_s)
    return group, plan_sync(UNTIED, src=TrainLayout(tp=tp, dtype=torch.float32), dst=DST, bucket_bytes=4 << 10)


def _gloo_publisher(group, plan, path: str, rank: int = 0, tp: int = 1) -> WeightPublisher:
    chunks = source_chunks(UNTIED, TrainLayout(tp=tp, dtype=torch.float32), rank, path)
    return WeightPublisher(chunks, plan, src_rank=rank, transport=TorchDistTransport(group, num_src=tp, num_dst=1))


def _gloo_rank(rank: int, port: int, path: str, results) -> None:
    group, plan = _gloo_pair(rank, port)
    out = {}
    if rank == 0:
        publisher = _gloo_publisher(LateBucket(group), plan, path)
        out["v2"], out["v3"] = _publish(publisher, 2), _publish(publisher, 3)
    else:
        engine = FakeEngine(engine_model(UNTIED, DST, 0, None))
        receiver = WeightReceiver(engine, plan, dst_rank=0, transport=TorchDistTransport(group, num_src=1, num_dst=1))
        try:
            receiver.sync()
        except WeightSyncError as e:
            out["v2"] = str(e)
        out["v3"] = receiver.sync()
        assert_same_bytes(engine.model, engine_model(UNTIED, DST, 0, path), what="after v3")
    results.put((rank, out))


def test_gloo_bucket_of_another_update_is_refused_naming_both(tmp_path):
    path = write_weights(str(tmp_path / "a"), UNTIED, seed=1)
    results = mp.get_context("spawn").SimpleQueue()
    store = serve_store(2)
    mp.spawn(_gloo_rank, args=(store.port, path, results), nprocs=2, join=True)
    out = dict(results.get() for _ in range(2))
    assert "bucket 0 from source rank 0 belongs to v1, the update under way is v2" in out[1]["v2"], out[1]["v2"]
    assert "rejected by the engines (bucket 0" in out[0]["v2"], out[0]["v2"]
    assert out[0]["v3"] is None and out[1]["v3"] == 3


class SlowSource:
    """A sync group whose first bucket send waits until the receiver has given up: a trainer late with its
    buckets. The buckets then really go out, after the receiver's timeout."""

    def __init__(self, group, gave_up) -> None:
        self.group, self.gave_up, self.waited = group, gave_up, False

    def send(self, tensors, dst, tag):
        if not self.waited:
            assert self.gave_up.wait(WAIT_S), "the receiver never gave up on v1"
            self.waited = True
        return self.group.send(tensors, dst, tag)

    def __getattr__(self, name):
        return getattr(self.group, name)


# The gloo tests' group timeout, and the bound on each such test's ranks (`_spawn_within`): a rank that waits out
# an operation's full timeout (a source that missed the failure, an exit that waits for a failed group's
# collective) is still running at that bound, and a healthy run waits out no timeout at all (9-21 s a case
# at load 8 on 2 cores, up to 45 s at load 14 beside two busy loops at nice 0). Below WAIT_S, so that such a
# regression fails soon.
LATE_GROUP_TIMEOUT_S = 300


def _spawn_within(fn, args: tuple, nprocs: int, within_s: float) -> list[int]:
    """Run `nprocs` ranks of `fn` (torch.multiprocessing.spawn) and wait for them up to `within_s` seconds from
    the start; return their exit codes. A rank that raised fails the test with its traceback, one that died of a
    signal with its name; ranks still running at the bound are killed and fail the test."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + within_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            pass
    finally:
        late = [r for r, p in enumerate(context.processes) if p.is_alive()]
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join()
    assert not late, f"rank(s) {late} still running {within_s:.0f} s after the start (the group's timeout)"
    return [p.exitcode for p in context.processes]


def _gloo_late_rank(rank: int, tp: int, port: int, path: str, gave_up, results) -> None:
    group, plan = _gloo_pair(rank, port, tp, timeout_s=LATE_GROUP_TIMEOUT_S)
    out, kept = {}, []
    if rank < tp:  # the last source is the late one; with tp 2, source 0's buckets arrive in time
        publisher = _gloo_publisher(SlowSource(group, gave_up) if rank == tp - 1 else group, plan, path, rank, tp)
        out["v1"] = None
        try:
            publisher.publish(1)
        except WeightSyncError as e:
            # Kept, as a caller that logs or reports it may: its traceback holds the failed group's work objects.
            kept.append(e)
            out["v1"] = str(e)
        out["v2"] = _publish(publisher, 2)
    else:
        engine = FakeEngine(engine_model(UNTIED, DST, 0, None))
        transport = TorchDistTransport(group, num_src=tp, num_dst=1, timeout_s=1.0)
        receiver = WeightReceiver(engine, plan, dst_rank=0, transport=transport)
        try:
            receiver.sync()
        except WeightSyncError as e:
            out["v1"] = str(e)
        gave_up.set()
        transport.timeout_s = None
        out["v2"] = receiver.sync()
        assert_same_bytes(engine.model, engine_model(UNTIED, DST, 0, path), what="after v2")
    out["generation"] = group.generation
    results.put((rank, out))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gloo_receiver_that_timed_out_takes_the_next_update_on_a_renewed_group(tmp_path, tp):
    """The last source has begun v1 (handshake) but sends its buckets only after the receiver timed out of
    them; every rank's v1 fails (gloo closed the group), and v2 goes through on the renewed group. tp 4 (5
    ranks): sources 0 and 1 wait in the verdict's all-reduce on sources 2 and 3, not on the receiver; they
    learn of the failure only when those close their connections, which they do by destroying the failed
    group with every work object of the failed operation released (`SyncGroup.renew`), the errors kept alive
    here notwithstanding: else they would wait out the group's timeout and fail "Timed out" (and the next update
    with them, when it came before that timeout). Every rank exits with code 0 before that timeout."""
    path = write_weights(str(tmp_path / "a"), UNTIED, seed=1)
    ctx = mp.get_context("spawn")
    gave_up, results = ctx.Event(), ctx.SimpleQueue()
    store = serve_store(tp + 1)
    exit_codes = _spawn_within(_gloo_late_rank, (tp, store.port, path, gave_up, results), tp + 1,
                               LATE_GROUP_TIMEOUT_S)
    assert exit_codes == [0] * (tp + 1), exit_codes
    out = dict(results.get() for _ in range(tp + 1))
    assert "destination rank 0 abandoned the weight update (engine at version 0): the sync group failed " \
           "(" in out[tp]["v1"] and "Timed out" in out[tp]["v1"], out[tp]["v1"]
    for r in range(tp):
        assert f"weight update v1 abandoned by source rank {r}: the sync group failed" in out[r]["v1"], out[r]["v1"]
        assert "Timed out" not in out[r]["v1"], out[r]["v1"]  # a source never waits out the group's timeout
        assert out[r]["v2"] is None
    assert out[tp]["v2"] == 2
    assert [out[r]["generation"] for r in range(tp + 1)] == [1] * (tp + 1)


def test_gloo_ranks_exit_cleanly_while_gloo_still_holds_a_collective():
    """Two ranks (`wsync_exit_rank.py`, processes of their own) leave while gloo's worker thread still holds a
    collective of their sync group, its release of the tensors delayed into the interpreter's finalization (as a
    starved worker thread delays it, for a moment after any collective): both exit with code 0, their groups
    destroyed at exit before finalization. Before that, rank 0 aborted there (SIGABRT) in every run."""
    store = serve_store(2)
    script = os.path.join(os.path.dirname(__file__), "wsync_exit_rank.py")
    procs = [subprocess.Popen([sys.executable, script, str(r), str(store.port), str(LATE_GROUP_TIMEOUT_S)],
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    deadline, errors = time.monotonic() + LATE_GROUP_TIMEOUT_S, []
    try:
        for p in procs:
            errors.append(p.communicate(timeout=max(0.0, deadline - time.monotonic()))[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
