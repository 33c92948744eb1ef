"""The Ray launcher (`placement.launcher=ray`) on a simulated three-node cluster.

Every Ray test runs inside a network namespace of its own with only loopback (`unshare -n`): on
these machines Ray binds the machine's interface address even when told 127.0.0.1, and tests may send
traffic to loopback only. So one subprocess (tests/ray/ray_scenarios.py) starts the cluster there
(`ray.cluster_utils.Cluster`: three nodes of one CPU, custom resources n0, n1, n2), runs every
scenario against it and writes what it saw; the tests below check it. Select them with `-m ray`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "rl"))

from rl_actor_helpers import assert_same_run, rows  # noqa: E402

pytestmark = pytest.mark.ray


def _netns_ok() -> str | None:
    """Why a loopback-only network namespace cannot be made here, or None."""
    try:
        probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"unshare/ip unavailable: {e}"
    if probe.returncode != 0:
        return f"unshare -n failed (needs root or user namespaces): {probe.stderr.decode().strip()}"
    return None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if (why := _netns_ok()) is not None:
        pytest.skip(f"Ray tests run in a loopback-only network namespace; {why}")
    out = tmp_path_factory.mktemp("ray")
    rl_tests = os.path.join(HERE, "..", "rl")  # the test reward, imported by dotted path in every process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([rl_tests, os.environ.get("PYTHONPATH", "")])}
    script = os.path.join(HERE, "ray_scenarios.py")
    proc = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$1" "$2"', sys.executable,
                           script, str(out)], env=env, capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr.decode()[-5000:]
    found = json.loads((out / "results.json").read_text())
    found["out"] = str(out)
    return found


def _completed(results, name):
    r = results[name]
    assert "error" not in r, r["error"]
    c = r["summary"]["prompts"]
    assert c["taken"] == c["trained"] + c["dropped"] and c["in_flight"] == c["queued"] == 0, c
    return r


def _nothing_left(r):
    """No process of the run or host actor is left, and every socket that listened during the run (`ss
    -ltn` in the namespace every 0.5 s: the run's ZMQ sockets, torch.distributed's store, Ray's own)
    was on 127.0.0.1."""
    assert r["left_alive"] == [] and r["alive_hosts"] == [], r
    assert r["listen_addresses"] and all(a in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in r["listen_addresses"]), r


def test_disaggregated_trainer_and_worker_on_two_nodes_match_the_local_launcher(results):
    """Trainer on n0, the rollout worker on n1 (Ray's actor table says so); shared memory is not
    possible across nodes, so weights go over ZMQ. Same samples, losses and gradient norms as the
    local launcher's run. Not byte for byte: a disaggregated run is not byte-reproducible even under
    the local launcher (an engine's batches depend on when requests arrive, and with them the last
    bits of the behavior log-probs); the colocated runs below are, and are compared byte for byte.

    Throughout the run, rogue clients (tests/rl/test_attacks.py's Intruder) with no key and with
    another run's key try every attack on the coordinator, its heartbeat socket and the worker's
    weights socket: none gets an answer or a message accepted, both the coordinator and the worker
    count refusals, and the run is the local launcher's unattacked run."""
    r = _completed(results, "ray_disaggregated")
    _completed(results, "local_disaggregated")
    assert r["ray_nodes"] == {"coordinator": "n0", "trainer-0": "n0", "rollout-0": "n1"}
    out = results["out"]
    got = rows(os.path.join(out, "ray_disaggregated"))
    assert_same_run(got, rows(os.path.join(out, "local_disaggregated")))
    assert all(row["train/mismatch_k3"] <= 1e-6 and row["weight_sync/probe_error_max"] <= 1e-5 for row in got)
    s = r["summary"]
    assert r["intruder"]["rounds"] >= 2 and r["intruder"]["answers"] == 0, r["intruder"]
    assert s["rejected_messages"]["coordinator"] > 0 and s["rejected_messages"]["rollout-0"] > 0, s
    assert s["protocol_errors"] == 0 and s["worker_deaths"] == 0, s
    assert s["prompts"] == results["local_disaggregated"]["summary"]["prompts"]
    assert results["local_disaggregated"]["summary"]["rejected_messages"] == {"coordinator": 0, "rollout-0": 0}
    _nothing_left(r)


def test_colocated_tp2_ranks_on_two_nodes_byte_identical(results):
    r = _completed(results, "ray_colocated_tp2")
    _completed(results, "local_colocated_tp2")
    assert r["ray_nodes"]["trainer-0"] != r["ray_nodes"]["trainer-1"], r["ray_nodes"]
    out = results["out"]
    got = open(os.path.join(out, "ray_colocated_tp2", "metrics.jsonl"), "rb").read()
    assert got and got == open(os.path.join(out, "local_colocated_tp2", "metrics.jsonl"), "rb").read()
    _nothing_left(r)


def test_worker_on_each_node_one_dies_prompts_requeued(results):
    """Trainer on n0, a rollout worker on each of n1 and n2; rollout-1 dies (SIGKILL, injected) at
    step 2: Ray reports it to the coordinator at once (not after the heartbeat timeout), its prompts
    are requeued on rollout-0, the run trains on the same samples as the one-worker run, each prompt
    once. Without restarts it stays dead."""
    r = _completed(results, "ray_disaggregated_2w")
    nodes = r["ray_nodes"]
    assert nodes["trainer-0"] == "n0" and {nodes["rollout-0"], nodes["rollout-1"]} == {"n1", "n2"}, nodes
    s = r["summary"]
    assert s["worker_deaths"] == 1 and s["prompts"]["requeued"] >= 1 and s["prompts"]["trained"] == 12, s
    assert s["worker_rejoins"] == 0 and s["protocol_errors"] == 0, s
    fates = _fates(os.path.join(results["out"], "ray_disaggregated_2w"))  # uid by uid: each prompt once
    assert len(fates) == s["prompts"]["taken"] and set(fates.values()) == {1} and s["unfinished_prompts"] == {}
    log = open(os.path.join(results["out"], "ray_disaggregated_2w", "logs", "coordinator.log")).read()
    assert "rollout worker rollout-1 lost (its process ended: was killed by signal 9)" in log
    out = results["out"]
    got = rows(os.path.join(out, "ray_disaggregated_2w"))
    assert [row["workers/alive"] for row in got] == [2, 1, 1]
    assert_same_run(got, rows(os.path.join(out, "local_disaggregated")))
    _nothing_left(r)


def test_sigterm_of_the_driver_leaves_nothing_behind(results):
    r = results["ray_sigterm"]
    assert r["running_when_signalled"] and r["returncode"] == 128 + 15, r
    assert r["left_alive"] == [] and r["alive_hosts"] == [], r


def test_the_cluster_itself_is_gone_afterwards(results):
    assert results["ray_processes_left"] == []


def test_placement_failure_names_the_bundle_and_what_the_cluster_has(results):
    r = results["ray_placement_error"]
    assert "PlacementError" in r["error"] and "placement.startup_timeout_s=3" in r["error"], r
    assert "bundle 1 (trainer-0) asks {'CPU': 1.0, 'GPU': 1.0}" in r["error"] and "no node can hold it" in r["error"]
    nodes_part = r["error"].split("The cluster has")[1].split("; free now")[0]
    assert "3 node(s)" in nodes_part and "GPU" not in nodes_part, nodes_part


def test_sigkill_of_the_driver_then_resume_under_ray_matches_the_uninterrupted_run(results):
    """SIGKILL of `rl-engine train` after a committed checkpoint: Ray ends the dead driver's host
    actors and their processes die with them; `train.resume=auto` under Ray then writes the
    metrics.jsonl of an uninterrupted run, byte for byte."""
    r = results["ray_resumed"]
    # The coordinator holds after checkpoint 2 (fault injection): the run is always mid-way when killed.
    assert r["running_when_killed"] and r["killed_at_step"] == 2, r
    assert "error" not in r, r.get("error")
    assert r["summary"]["resumed_from"].endswith(f"step_{r['killed_at_step']:06d}")
    assert r["left_alive"] == [] and r["alive_hosts"] == [], r
    out = results["out"]
    got = open(os.path.join(out, "ray_resumed", "metrics.jsonl"), "rb").read()
    assert got and got == open(os.path.join(out, "local_uninterrupted", "metrics.jsonl"), "rb").read()


def test_private_instance_is_started_and_stopped(results):
    """`ray.address=null` with a cluster already running: the run starts a Ray instance of its own
    (not the running cluster), and once it ends no process of it is left (counted by its temp dir: another
    suite's Ray instance on the machine is not)."""
    r = results["ray_private"]
    assert "error" not in r, r["error"]
    assert r["summary"]["steps"] == 2
    assert len(r["ray_sessions"]) == 1, r  # the instance ran where the count looks
    assert r["ray_processes_left"] == [] and r["left_alive"] == [], r


def _fates(run_dir) -> dict:
    """uid -> how many times it was trained or dropped (prompts.jsonl), as tests/rl/test_async_resume.py."""
    fates: dict = {}
    with open(os.path.join(run_dir, "prompts.jsonl")) as f:
        for line in f:
            for key, uids in json.loads(line).items():
                if key == "trained" or key.startswith("dropped_"):
                    for uid in uids:
                        fates[uid] = fates.get(uid, 0) + 1
    return fates


def test_a_dead_worker_is_restarted_gets_the_weights_and_serves_again(results):
    """`ray.max_worker_restarts=2`, one rollout worker: its process is SIGKILLed after step 1; once its
    restart has served a step, its host actor is `ray.kill`ed. Each death reaches the coordinator from
    Ray (the heartbeat timeout is 20 s), its prompts are requeued and the run waits (no worker left);
    the worker is started again in its bundle, registers anew, receives the current weights in full
    (probe checked) and serves the later steps. Every prompt is trained exactly once; nothing is left
    behind (the killed processes included)."""
    r = _completed(results, "ray_restarts")
    out = os.path.join(results["out"], "ray_restarts")
    faults = r["faults"]
    assert [f["how"] for f in faults] == ["SIGKILL", "ray.kill"], faults
    s = r["summary"]
    assert s["worker_deaths"] == 2 and s["worker_rejoins"] == 2 and s["protocol_errors"] == 0, s
    got = rows(out)
    assert len(got) == 8 and s["prompts"]["trained"] == 8 * 4 and s["unfinished_prompts"] == {}, s
    fates = _fates(out)
    assert len(fates) == s["prompts"]["taken"] and set(fates.values()) == {1}, fates
    for fault in faults:  # the restarted process served a step that began after the death
        assert any(row["workers/served"].get("rollout-0", 0) > 0 for row in got[fault["steps_done"] + 1:]), fault
    assert got[-1]["workers/rejoins"] == 2 and got[-1]["workers/alive"] == 1
    # a step whose update found the worker dead (killed before it applied them) has no probe to report
    probes = [row["weight_sync/probe_error_max"] for row in got if "weight_sync/probe_error_max" in row]
    assert len(probes) >= len(got) - len(faults) and all(p <= 1e-5 for p in probes), (probes, got)
    log = open(os.path.join(out, "logs", "coordinator.log")).read()
    # each death is learnt first from the launcher (the process ended) or, when the host died as a weight
    # update began, from the trainer's failed send; either way it is retired once, and the later report of the
    # other is "already handled"
    losses = re.findall(r"rollout worker rollout-0 lost \((.*?)\)( \(restarting\))?: ", log)
    assert len(losses) == 2, losses
    for why, _ in losses:
        assert why == "its process ended: was killed by signal 9" or \
            re.fullmatch(r"the trainer could not send it weights v\d+", why), losses
    assert "no heartbeat" not in log and log.count("rollout worker rollout-0 rejoined with weights v") == 2
    assert open(os.path.join(out, "logs", "rollout-0.log")).read().count("restarted on 127.0.0.1") == 2
    placement = json.load(open(os.path.join(out, "actors", "placement.json")))["rollout-0"]
    assert placement["restarts"] == 2 and placement["previous_pids"] == [f["pid"] for f in faults], placement
    assert r["ray_nodes"]["rollout-0"] == "n1"
    _nothing_left(r)


def test_a_dead_trainer_rank_stops_the_run_and_resume_under_ray_completes_it(results):
    """Colocated tp2, its ranks on two nodes: trainer-1's process is SIGKILLed after the second
    checkpoint. The run stops with an error naming it and nothing left; `train.resume=auto` under Ray
    resumes from the last committed checkpoint and writes the uninterrupted run's metrics.jsonl, byte
    for byte (the local launcher's)."""
    died, resumed = results["ray_trainer_death"]["died"], results["ray_trainer_death"]["resumed"]
    assert "ActorsFailed" in died["error"] and "process 'trainer-1'" in died["error"], died["error"]
    assert died["killed_pid"] and 2 <= died["killed_at_step"] < 5, died
    assert died["ray_nodes"]["trainer-0"] != died["ray_nodes"]["trainer-1"], died["ray_nodes"]
    assert died["left_alive"] == [] and died["alive_hosts"] == [], died
    r = _completed(results["ray_trainer_death"], "resumed")
    assert r["summary"]["resumed_from"].endswith(f"step_{died['killed_at_step']:06d}")
    got = open(os.path.join(results["out"], "ray_trainer_death", "metrics.jsonl"), "rb").read()
    assert got == open(os.path.join(results["out"], "local_colocated_tp2", "metrics.jsonl"), "rb").read()
    _nothing_left(r)


def test_logs_are_written_on_each_node_and_collected_when_the_driver_does_not_share_them(results):
    """The SIGTERMed driver above saw another directory at `<output_dir>/logs` than the nodes (its own
    mount namespace): every process wrote its log on its node, and the driver copied each one back."""
    r = results["ray_sigterm"]["logs"]
    assert r["shared"] == {"coordinator": False, "trainer-0": False, "rollout-0": False}, r["shared"]
    names = ["coordinator.log", "rollout-0.log", "trainer-0.log"]
    assert list(r["node"]) == names and list(r["driver"]) == names, (list(r["node"]), list(r["driver"]))
    for name in names:
        assert r["driver"][name] == r["node"][name] and r["node"][name], name
    assert "all 2 actors registered" in r["driver"]["coordinator.log"]
    assert "collected the logs of coordinator, trainer-0, rollout-0" in r["driver_stdout"]


def test_ray_job_submit_runs_the_demo_against_a_local_head(results):
    """`ray start --head` with its job server, then `ray job submit --working-dir . -- rl-engine train
    run.yaml placement.launcher=ray ray.address=auto`: examples/disaggregated.yaml at reduced sizes runs
    to completion; the head stopped, no process of it or of the run is left."""
    r = results["ray_job"]
    assert "error" not in r, r["error"]
    assert r["returncode"] == 0, (r["output"], r["stderr"])
    assert "succeeded" in r["output"], r["output"]
    s = r["summary"]
    assert s["steps"] == 2 and s["policy_version"] == 2 and s["placement"] == "disaggregated", s
    assert s["prompts"]["trained"] == 2 * 4 and s["worker_deaths"] == 0, s
    assert len(r["ray_sessions"]) == 1, r  # the head ran where the count of what is left looks
    assert r["left_alive"] == [] and r["ray_processes_left"] == [], r
