"""Weight sync between real processes (gloo): four training ranks and one engine process, one spawn for
the whole module. Scenario A: dense tp2 x pp2 -> engine tp1 over torch.distributed and over ZMQ, with a
flipped byte on each wire and a probe; B: MoE tp2 x dp2 with ep2 -> engine tp1; C: bf16 parameters with
the distributed optimizer over dp2 -> bf16 engine over ZMQ; D: colocated tp2 engines on the trainer
ranks, zero copy. References are the sharded checkpoints the trainers save right before publishing."""

from __future__ import annotations

import pytest

from wsync_helpers import DENSE, MOE, spawn_for_facts, write_weights
from wsync_workers import run


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsync_procs")
    paths = {"dense": write_weights(str(out / "dense"), DENSE, seed=0),
             "moe": write_weights(str(out / "moe"), MOE, seed=1)}
    return spawn_for_facts(run, nprocs=5, out_dir=str(out), paths=paths)


def test_tp2_pp2_to_engine_tp1_over_torch_distributed(facts):
    e = facts[4]
    assert e["A/dist/differing_tensors"] == []
    assert e["A/dist/greedy_equal_fresh"] and e["A/dist/versions"] == [1]
    assert e["A/dist/tokens"] != e["A/initial_tokens"]  # the update changed what the engine says


def test_flipped_byte_over_torch_distributed_is_rejected_everywhere(facts):
    assert "checksum mismatch" in facts[4]["A/flip_dist_engine_error"]
    for r in range(4):  # every training rank learns the update was refused, and which bucket failed
        assert "rejected by the engines (bucket" in facts[r]["A/flip_dist_error"]
    assert facts[4]["A/after_flip_dist"] == {"version": 1, "same_tokens": True, "versions": [1]}


def test_probe_over_torch_distributed(facts):
    assert facts[4]["A/probe"]["version"] == 3 and facts[4]["A/probe"]["error"] < 1e-4


def test_tp2_pp2_to_engine_tp1_over_zmq(facts):
    e = facts[4]
    assert e["A/zmq/differing_tensors"] == [] and e["A/zmq/greedy_equal_fresh"] and e["A/zmq/versions"] == [4]


def test_flipped_byte_over_zmq_is_rejected(facts):
    assert "checksum mismatch" in facts[4]["A/flip_zmq_engine_error"]
    for r in range(4):
        assert "checksum mismatch" in facts[r]["A/flip_zmq_error"]
    assert facts[4]["A/after_flip_zmq"] == {"version": 4, "same_tokens": True, "versions": [4]}


def test_moe_ep2_to_engine_tp1(facts):
    assert facts[4]["B/differing_tensors"] == [] and facts[4]["B/greedy_equal_fresh"]


def test_version_going_backwards_is_refused_on_every_rank_before_sending(facts):
    for r in range(5):
        err = facts[r]["B/stale_engine_error" if r == 4 else "B/stale_error"]
        assert "must increase: an engine is at 1, the update is 1" in err
    assert facts[4]["B/after_stale"] == {"version": 1, "same_tokens": True}


def test_dp2_bf16_distributed_optimizer_to_bf16_engine_over_zmq(facts):
    assert facts[4]["C/differing_tensors"] == [] and facts[4]["C/greedy_equal_fresh"]
    assert facts[4]["C/weights_version"] == 1


def test_colocated_tp2_to_tp2_is_zero_copy(facts):
    for r in range(4):
        f = facts[r]
        assert f["D/zero_copy"] and f["D/same_storage"]
        assert f["D/greedy_equal_fresh"] and f["D/changed"] and f["D/versions"] == [1]
