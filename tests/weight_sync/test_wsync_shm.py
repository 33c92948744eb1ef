"""The shared-memory transport between real processes: two training ranks and one engine process on
this host. Dense tp2 -> engine tp1 (row-parallel blocks land strided in the engine's tensors) through both
staging regions, a flipped byte in the staging memory, a probe, a version going backwards; MoE ep2 x dp2
-> engine tp1. References are the sharded checkpoints the trainers save right before publishing. Then
the pieces in one process: bad input, and no region left in /dev/shm."""

from __future__ import annotations

import os
import threading

import pytest
import torch.multiprocessing as mp

from rl_engine.policy.launch import free_port
from rl_engine.weight_sync import (
    EngineLayout,
    SharedMemoryReceiverTransport,
    SharedMemorySenderTransport,
    TrainLayout,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    plan_sync,
)
from rl_engine.weight_sync.staging import PREFIX, Staging, sweep_stale
from wsync_helpers import (DENSE, MOE, UNTIED, FakeEngine, assert_same_bytes, engine_model, spawn_for_facts,
                           write_weights)
from wsync_shm_workers import run


def regions_of(pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"{PREFIX}{pid}_"))


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsync_shm")
    paths = {"dense": write_weights(str(out / "dense"), DENSE, seed=0),
             "moe": write_weights(str(out / "moe"), MOE, seed=1)}
    ports = {"train": free_port(), "shm": free_port(), "shm_moe": free_port()}
    return spawn_for_facts(run, nprocs=3, out_dir=str(out), paths=paths, ports=ports)


def test_tp2_to_engine_tp1_is_byte_identical_and_served_from_shared_memory(facts):
    e = facts[2]
    assert facts[0]["v1"] is None and facts[1]["v1"] is None and e["v1"] is None
    assert e["S1/differing_tensors"] == [] and e["S1/greedy_equal_fresh"] and e["S1/versions"] == [1]
    assert e["S1/tokens"] != e["initial_tokens"]
    assert e["S1/serves_from_shm"]  # the engine's tensors are the staging region: no second copy


def test_flipped_byte_in_shared_memory_is_rejected_and_the_engine_keeps_serving(facts):
    assert "checksum mismatch in bucket" in facts[2]["flip"] and "keeps version 1" in facts[2]["flip"]
    for r in range(2):
        assert "checksum mismatch" in facts[r]["flip"]
    assert facts[2]["after_flip"] == {"version": 1, "same_tokens": True, "versions": [1], "live": facts[2]["S1/live"]}


def test_both_staging_regions_in_turn(facts):
    e = facts[2]
    assert e["v3"] is None and e["S2/differing_tensors"] == [] and e["S2/greedy_equal_fresh"]
    assert e["v4"] is None and e["S4/differing_tensors"] == [] and e["S4/greedy_equal_fresh"]
    assert {e["S1/live"], e["S2/live"]} == {0, 1} and e["S4/live"] == e["S1/live"]
    assert e["S4/probe_error"] < 1e-4 and e["S4/versions"] == [4]


def test_version_going_backwards_is_refused_before_any_bytes_move(facts):
    for r in range(2):
        assert "refused before any bytes moved" in facts[r]["stale"]
        assert "must increase: the engine is at 4, the update is 4" in facts[r]["stale"]
    assert "must increase: the engine is at 4, the update is 4" in facts[2]["stale"]
    assert facts[2]["after_stale"] == {"version": 4, "same_tokens": True}


def test_moe_ep2_to_engine_tp1(facts):
    assert facts[2]["moe"] is None and facts[2]["M/differing_tensors"] == [] and facts[2]["M/greedy_equal_fresh"]


def test_no_region_left_in_dev_shm(facts):
    e = facts[2]
    assert len(e["regions"]) == 2 and e["regions_after_close"] == []
    assert e["after_close_same_tokens"]
    assert regions_of(e["pid"]) == []


# ---- one process: the sender in a thread ---------------------------------------------------------------
def _pair(config, plan, *, engine_rank: int = 0):
    engine = FakeEngine(engine_model(config, EngineLayout(), engine_rank, None))
    rx = SharedMemoryReceiverTransport(timeout_s=10)
    return engine, rx, WeightReceiver(engine, plan, transport=rx)


def _publish_in_thread(pub: WeightPublisher, version: int) -> tuple[threading.Thread, list]:
    errors: list = []

    def go():
        try:
            pub.publish(version)
        except Exception as e:  # handed to the test
            errors.append(e)

    t = threading.Thread(target=go)
    t.start()
    return t, errors


def test_plans_that_differ_are_refused_with_the_fix(tmp_path):
    path = write_weights(str(tmp_path / "m"), UNTIED, seed=2)
    from rl_engine.policy import from_pretrained

    trainer = from_pretrained(path)
    engine_plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), bucket_bytes=4096)
    engine, rx, receiver = _pair(UNTIED, engine_plan)
    trainer_plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), bucket_bytes=8192)
    tx = SharedMemorySenderTransport({0: rx.address}, timeout_s=10)
    t, errors = _publish_in_thread(WeightPublisher(trainer, trainer_plan, src_rank=0, transport=tx), 1)
    with pytest.raises(WeightSyncError, match="keeps version 0"):
        receiver.sync()
    t.join()
    assert "plan fingerprint" in str(errors[0]) and "same model config, layouts and bucket_bytes" in str(errors[0])
    assert engine.weights_version == 0
    # The right plan then goes through, byte for byte.
    t, errors = _publish_in_thread(WeightPublisher(trainer, engine_plan, src_rank=0, transport=tx), 1)
    receiver.sync()
    t.join()
    assert not errors and engine.weights_version == 1
    assert_same_bytes(engine.model, trainer, what="after a shared-memory sync")
    paths = list(rx.staging.paths)
    rx.close()
    tx.close()
    assert not any(os.path.exists(p) for p in paths)


def test_one_transport_per_receiver_and_a_missing_directory_name_the_fix():
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout())
    engine, rx, first = _pair(UNTIED, plan)
    second = WeightReceiver(FakeEngine(engine_model(UNTIED, EngineLayout(), 0, None)), plan, transport=rx)
    with pytest.raises(ValueError, match="belongs to another WeightReceiver"):
        first.receive()
    rx.close()
    del second
    with pytest.raises(ValueError, match="directory '/no/such/dir' does not exist"):
        Staging({}, plan.dst_layouts[0], dst_rank=0, shared=True, directory="/no/such/dir")


def test_regions_of_a_dead_process_are_swept(tmp_path):
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    stale = tmp_path / f"{PREFIX}{dead.pid}_abcd1234_d0_0"
    stale.write_bytes(b"x" * 64)
    mine = tmp_path / f"{PREFIX}{os.getpid()}_abcd1234_d0_0"
    mine.write_bytes(b"x" * 64)
    assert sweep_stale(str(tmp_path)) == [stale.name]
    assert not stale.exists() and mine.exists()


def test_sender_on_another_host_gets_a_clear_error():
    from rl_engine.weight_sync.staging import map_region

    with pytest.raises(FileNotFoundError, match="needs the engine on this host"):
        map_region("/dev/shm/rl_wsync_0_nothing_d0_0", 64, create=False)
