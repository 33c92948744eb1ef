"""The shared-memory transport between real processes: two training ranks and one engine process on
this host. Dense tp2 -> engine tp1 (row-parallel blocks land strided in the engine's tensors) through both
staging regions, a flipped byte in the staging memory, a probe, a version going backwards; MoE ep2 x dp2
-> engine tp1. References are the sharded checkpoints the trainers save right before publishing. Then
the pieces in one process: bad input, no region left in /dev/shm, the sweeps of dead processes' and of a
run's regions, and the sender's refusal of any path an engine names that is not a region of its run."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import torch.multiprocessing as mp

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
from rl_engine.weight_sync.staging import PREFIX, Staging, open_region, region_slots, sweep_run, sweep_stale
from wsync_helpers import (DENSE, MOE, UNTIED, WAIT_S, FakeEngine, assert_same_bytes, engine_model, spawn_for_facts,
                           write_weights)
from wsync_shm_workers import run


def regions_of(pid: int) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"{PREFIX}{pid}_"))


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsync_shm")
    paths = {"dense": write_weights(str(out / "dense"), DENSE, seed=0),
             "moe": write_weights(str(out / "moe"), MOE, seed=1)}
    return spawn_for_facts(run, nprocs=3, out_dir=str(out), paths=paths)


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
    rx = SharedMemoryReceiverTransport(timeout_s=WAIT_S)
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
    tx = SharedMemorySenderTransport({0: rx.address}, timeout_s=WAIT_S)
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


def _dead_pid() -> int:
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    return dead.pid


def test_regions_of_a_dead_process_are_swept(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f"{PREFIX}{dead}_abcd1234_d0_0",  # the names before run ids
             tmp_path / f"{PREFIX}{dead}_rother_abcd1234_d0_1"]
    others = tmp_path / f"{PREFIX}{dead}_rother_abcd1234_d0_0"  # dead too, but another user's
    mine = tmp_path / f"{PREFIX}{os.getpid()}_rother_abcd1234_d0_0"
    for f in [*stale, others, mine]:
        f.write_bytes(b"x" * 64)
    os.chown(others, 12345, 12345)
    assert sorted(sweep_stale(str(tmp_path))) == sorted(f.name for f in stale)
    assert not any(f.exists() for f in stale) and others.exists() and mine.exists()


def test_sweep_run_removes_the_runs_regions_and_nothing_else(tmp_path):
    pid = os.getpid()  # alive: the launcher sweeps after its children ended, whatever their pids
    ours = [tmp_path / f"{PREFIX}{pid}_rab12_0123abcd_d0_0", tmp_path / f"{PREFIX}{_dead_pid()}_rab12_0123abcd_d1_1"]
    kept = [tmp_path / f"{PREFIX}{pid}_rab123_0123abcd_d0_0",  # another run, same prefix
            tmp_path / f"{PREFIX}{pid}_0123abcd_d0_0",  # no run id
            tmp_path / f"{PREFIX}{pid}_rab12_0123abcd_d0_0.bak",  # not a region's name
            tmp_path / "rab12"]
    others = tmp_path / f"{PREFIX}{pid}_rab12_4567abcd_d0_0"  # this run's name, another user's file
    for f in [*ours, *kept, others]:
        f.write_bytes(b"x" * 64)
    os.chown(others, 12345, 12345)
    assert sorted(sweep_run("rab12", str(tmp_path))) == sorted(f.name for f in ours)
    assert not any(f.exists() for f in ours) and all(f.exists() for f in kept) and others.exists()
    with pytest.raises(ValueError, match="run_id='../x' must be"):
        sweep_run("../x", str(tmp_path))


def test_sender_on_another_host_gets_a_clear_error():
    with pytest.raises(WeightSyncError, match="does not exist: the shared-memory transport needs the engine on "
                                              "this host"):
        open_region("/dev/shm/rl_wsync_0_local_00000000_d0_0", 64, run_id="local", dst_rank=0)


# ---- the sender writes only into regions of its own run ------------------------------------------------
RUN = "rtest"
VICTIM = 0xAB  # the bytes of every file an impersonating engine names: they must stay as they were


def _victim(path, nbytes: int) -> str:
    path.write_bytes(bytes([VICTIM]) * nbytes)
    return str(path)


def _region(shm, d: int = 0, run: str = RUN) -> "os.PathLike":
    return shm / f"{PREFIX}{os.getpid()}_{run}_0123abcd_d{d}_0"


# name -> (what the engine announces, built from (staging dir, another dir, region size); the refusal)
REFUSED = {
    "outside the directory": (lambda shm, out, n: _victim(out / _region(shm).name, n),
                              "not a file directly in the staging directory"),
    "dot-dot": (lambda shm, out, n: f"{shm}/../{out.name}/{os.path.basename(_victim(out / _region(shm).name, n))}",
                "not a file directly in the staging directory"),
    "another name": (lambda shm, out, n: _victim(shm / "model.bin", n), "not that of a staging region of this run"),
    "another run": (lambda shm, out, n: _victim(_region(shm, run="rother"), n),
                    "not that of a staging region of this run"),
    "another rank": (lambda shm, out, n: _victim(_region(shm, d=1), n), "not that of a staging region of this run"),
    "a symlink": (lambda shm, out, n: os.symlink(_victim(out / "victim", n), _region(shm)) or str(_region(shm)),
                  "it is a symbolic link"),
    "a hard link": (lambda shm, out, n: os.link(_victim(out / "victim", n), _region(shm)) or str(_region(shm)),
                    "it has 2 hard links"),
    "another owner": (lambda shm, out, n: os.chown(_victim(_region(shm), n), 12345, 12345) or str(_region(shm)),
                      "it is owned by uid 12345, not by this process's user"),
    "group-writable": (lambda shm, out, n: os.chmod(_victim(_region(shm), n), 0o620) or str(_region(shm)),
                       "its mode 620 lets other users write to it"),
    "wrong size": (lambda shm, out, n: _victim(_region(shm), n + 64), "the plan needs"),
    "a fifo": (lambda shm, out, n: os.mkfifo(_region(shm), 0o600) or str(_region(shm)), "not a regular file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_sender_refuses_a_path_that_is_not_a_region_of_its_run(case, tmp_path):
    """An engine (or whoever answers on its port) names a path in its Ack: the trainer refuses it before
    mapping anything, with an error naming the path and the reason, and writes nothing anywhere."""
    shm, out = tmp_path / "shm", tmp_path / "elsewhere"
    shm.mkdir()
    out.mkdir()
    path = write_weights(str(tmp_path / "m"), UNTIED, seed=2)
    from rl_engine.policy import from_pretrained

    trainer = from_pretrained(path)
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), bucket_bytes=4096)
    _, nbytes = region_slots(plan.dst_layouts[0])
    announced, why = REFUSED[case]
    bad = announced(shm, out, nbytes)
    victims = [f for d in (shm, out) for f in d.iterdir() if not f.is_symlink() and f.is_file()]
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in victims}
    engine = FakeEngine(engine_model(UNTIED, EngineLayout(), 0, None))
    rx = SharedMemoryReceiverTransport(timeout_s=WAIT_S, directory=str(shm), run_id=RUN)
    receiver = WeightReceiver(engine, plan, transport=rx)
    real = list(rx.staging.paths)
    rx.staging.paths = [bad, bad]  # the impersonator's answer, through the receiver's own (signed) reply
    tx = SharedMemorySenderTransport({0: rx.address}, timeout_s=WAIT_S, directory=str(shm), run_id=RUN)
    t, errors = _publish_in_thread(WeightPublisher(trainer, plan, src_rank=0, transport=tx), 1)
    with pytest.raises(WeightSyncError, match="keeps version 0"):
        receiver.sync()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], WeightSyncError), errors
    message = str(errors[0])
    assert "refused before any bytes moved" in message and f"refusing to write weights into {bad!r}" in message
    assert why in message, message
    for f, (data, mtime) in before.items():
        assert f.read_bytes() == data and f.stat().st_mtime_ns == mtime, f"{f} was written"
    assert engine.weights_version == 0 and not tx._mapped
    rx.close()
    tx.close()
    assert not any(os.path.exists(p) for p in real)


def test_sender_maps_a_region_of_its_run(tmp_path):
    """The checks let the real thing through: a region `Staging` made for this run and rank (mode 0600)."""
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout())
    rx = SharedMemoryReceiverTransport(timeout_s=WAIT_S, directory=str(tmp_path), run_id=RUN)
    WeightReceiver(FakeEngine(engine_model(UNTIED, EngineLayout(), 0, None)), plan, transport=rx)
    staging = rx.staging
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in staging.paths)
    region = open_region(staging.paths[1], staging.nbytes, run_id=RUN, dst_rank=0, directory=str(tmp_path))
    region[:8] = 7
    assert staging.regions[1][:8].tolist() == [7] * 8  # the same memory
    with pytest.raises(WeightSyncError, match="not that of a staging region of this run"):
        open_region(staging.paths[1], staging.nbytes, run_id="rother", dst_rank=0, directory=str(tmp_path))
    rx.close()
    assert not list(tmp_path.iterdir())
