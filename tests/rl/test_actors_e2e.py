"""End-to-end runs of the actors at toy scale: processes over ZMQ started by `run_actors` (what
`rl-engine train CONFIG` does), colocated and disaggregated, dense and MoE, tp2 and pp2 training.

The reference is the single-process `GRPOTrainer` on the same config: same seeds give the same
samples whichever engine serves them, so a distributed run must reproduce its rewards, losses and
gradient norms step by step. That also proves the weight sync: step k's samples come from weights
v(k-1) only if every engine received the trainer's update exactly (and the behavior/training log-prob
mismatch stays ~0 in fp32)."""

import io
import json
import threading
import time

import msgspec
import pytest
import zmq

from rl_actor_helpers import assert_same_run, child_pythonpath, rows, single_process_rows, toy_config, write_tiny_moe
from rl_engine import protocol as P
from rl_engine.actors.run import run_actors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_rows(tmp_path_factory.mktemp("single_dense"))


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return write_tiny_moe(str(tmp_path_factory.mktemp("moe") / "model"))


def run(tmp_path, monkeypatch, *overrides, edit_specs=None):
    child_pythonpath(monkeypatch)
    summary = run_actors(toy_config(tmp_path, *overrides), edit_specs=edit_specs, echo_stream=io.BytesIO())
    c = summary["prompts"]
    assert c["taken"] == c["trained"] + c["dropped"] and c["in_flight"] == c["queued"] == 0, c
    final = tmp_path / "checkpoints" / f"step_{summary['steps']:06d}"
    assert (final / "coordinator_state.json").exists() and (final / "trainer" / "metadata.json").exists()
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == summary["steps"]
    return summary, rows(tmp_path)


def assert_same_weights_served(got):
    for row in got:
        assert row["train/mismatch_k3"] <= 1e-6 and abs(row["train/is_ratio_max"] - 1) <= 1e-5, row


def test_colocated_matches_single_process(reference, tmp_path, monkeypatch):
    summary, got = run(tmp_path, monkeypatch, "placement.mode=colocated")
    assert_same_run(got, reference)
    assert_same_weights_served(got)
    assert summary["policy_version"] == 3 and summary["prompts"]["trained"] == 12


def test_colocated_tp2_matches_single_process(reference, tmp_path, monkeypatch):
    """Two tp ranks, each engine on its own shards in lockstep (checked by a digest every round)."""
    _, got = run(tmp_path, monkeypatch, "placement.mode=colocated", "train.tp=2")
    assert_same_run(got, reference)
    assert_same_weights_served(got)


def _poke_coordinator(run_dir, replies: list) -> None:
    """Send the coordinator three bad messages mid-run, without the run's keys, and collect any answer."""
    deadline = time.monotonic() + 120
    while not (run_dir / "actors.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    address = json.loads((run_dir / "actors.json").read_text())["coordinator"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"intruder")
    sock.connect(address)
    unknown = msgspec.msgpack.encode({"version": P.PROTOCOL_VERSION,
                                      "msg": msgspec.Raw(msgspec.msgpack.encode({"type": "Teleport"}))})
    sock.send_multipart([b"\xc1garbage"])
    sock.send_multipart([unknown])
    P.send_msg(sock, P.TrainResult(step=1, policy_version=1, metrics={}))  # valid, from an unregistered peer
    if sock.poll(5_000):
        replies.append(sock.recv_multipart())
    sock.close()


def test_disaggregated_pp2_matches_single_process_and_survives_bad_messages(reference, tmp_path, monkeypatch):
    """pp2 trainer -> one tp1 rollout worker through weight_sync over ZMQ (resharded, checksummed,
    probed); meanwhile a client without the run's keys sends the coordinator garbage: it never gets
    in (CURVE), is never answered, and is counted. (Garbage from authenticated peers:
    test_actors_malformed; every attack: test_attacks.)"""
    replies: list = []
    poke = threading.Thread(target=_poke_coordinator, args=(tmp_path, replies), daemon=True)
    poke.start()
    summary, got = run(tmp_path, monkeypatch, "placement.mode=disaggregated", "train.pp=2")
    poke.join(timeout=60)
    assert_same_run(got, reference)
    assert_same_weights_served(got)
    assert all(row["weight_sync/probe_error_max"] <= 1e-5 and row["workers/alive"] == 1 for row in got)
    assert replies == []
    assert summary["protocol_errors"] == 0 and summary["rejected_messages"]["coordinator"] >= 1


def test_colocated_dp2_moe_routing_replay_and_dynamic_sampling(moe_model, tmp_path, monkeypatch):
    """MoE on two data-parallel engines; the trainer replays the experts the engines chose; groups
    with all-equal rewards are dropped and refilled with new prompts, and counted; all as in the
    single-process run."""
    overrides = [f"model.path={moe_model}", "rollout.routing_replay=true", "rollout.dynamic_sampling=true",
                 "rollout.max_refill_rounds=6"]
    reference = single_process_rows(tmp_path / "single", *overrides)
    summary, got = run(tmp_path / "run", monkeypatch, "placement.mode=colocated", "train.dp=2", *overrides)
    assert_same_run(got, reference)
    assert_same_weights_served(got)
    for key in ("rollout/dropped_groups", "rollout/refill_rounds", "rollout/kept_groups"):
        assert [row[key] for row in got] == [row[key] for row in reference], key
    dropped = sum(row["rollout/dropped_groups"] for row in got)
    assert dropped > 0 and all(row["rollout/kept_groups"] == 4 for row in got)
    c = summary["prompts"]
    assert (c["trained"], c["dropped_uniform_rewards"], c["taken"]) == (12, dropped, 12 + dropped)


def test_rollout_worker_death_requeues_its_prompts(moe_model, tmp_path, monkeypatch):
    """Disaggregated MoE with routing replay on 2 workers; rollout-1 dies (SIGKILL) with requests in
    flight at step 2: they are requeued on rollout-0, the run completes and trains on exactly the
    samples an undisturbed run would (same seeds), each prompt once."""
    reference = single_process_rows(tmp_path / "single", f"model.path={moe_model}", "rollout.routing_replay=true")
    # rollout-1 gets half of the 8 eval prompts, then 2 of step 1's 4: it dies on its first of step 2.
    die_after = 8 // 2 + 4 // 2 + 1

    def inject(specs):
        return [s if s.name != "rollout-1" else
                type(s)(**{**s.__dict__, "args": [*s.args, "--die-after-requests", str(die_after)]}) for s in specs]

    summary, got = run(tmp_path / "run", monkeypatch, "placement.mode=disaggregated", "placement.num_rollout_workers=2",
                       "placement.heartbeat_timeout_s=3", f"model.path={moe_model}", "rollout.routing_replay=true",
                       edit_specs=inject)
    assert_same_run(got, reference)
    assert_same_weights_served(got)
    assert [row["workers/alive"] for row in got] == [2, 1, 1]
    assert summary["worker_deaths"] == 1 and summary["prompts"]["requeued"] >= 1
    assert summary["prompts"]["trained"] == 12
