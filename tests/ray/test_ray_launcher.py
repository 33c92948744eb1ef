"""The Ray launcher (`placement.launcher=ray`) on a simulated three-node cluster.

Every Ray test runs inside a network namespace of its own with only loopback (`unshare -n`): on
these machines Ray binds the machine's interface address even when told 127.0.0.1, and tests may send
traffic to loopback only. So one subprocess (tests/ray/ray_scenarios.py) starts the cluster there
(`ray.cluster_utils.Cluster`: three nodes of one CPU, custom resources n0, n1, n2), runs every
scenario against it and writes what it saw; the tests below check it. Select them with `-m ray`."""

from __future__ import annotations

import json
import os
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
                           script, str(out)], env=env, capture_output=True, timeout=600)
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
    assert r["left_alive"] == [] and r["alive_hosts"] == [], r
    assert r["listen_addresses"] and all(a in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in r["listen_addresses"]), r


def test_disaggregated_trainer_and_worker_on_two_nodes_match_the_local_launcher(results):
    """Trainer on n0, the rollout worker on n1 (Ray's actor table says so); shared memory is not
    possible across nodes, so weights go over ZMQ. Same samples, losses and gradient norms as the
    local launcher's run. Not byte for byte: a disaggregated run is not byte-reproducible even under
    the local launcher (an engine's batches depend on when requests arrive, and with them the last
    bits of the behavior log-probs); the colocated runs below are, and are compared byte for byte."""
    r = _completed(results, "ray_disaggregated")
    _completed(results, "local_disaggregated")
    assert r["ray_nodes"] == {"coordinator": "n0", "trainer-0": "n0", "rollout-0": "n1"}
    out = results["out"]
    got = rows(os.path.join(out, "ray_disaggregated"))
    assert_same_run(got, rows(os.path.join(out, "local_disaggregated")))
    assert all(row["train/mismatch_k3"] <= 1e-6 and row["weight_sync/probe_error_max"] <= 1e-5 for row in got)
    _nothing_left(r)


def test_colocated_tp2_ranks_on_two_nodes_byte_identical(results):
    r = _completed(results, "ray_colocated_tp2")
    _completed(results, "local_colocated_tp2")
    assert r["ray_nodes"]["trainer-0"] != r["ray_nodes"]["trainer-1"], r["ray_nodes"]
    out = results["out"]
    got = open(os.path.join(out, "ray_colocated_tp2", "metrics.jsonl"), "rb").read()
    assert got and got == open(os.path.join(out, "local_colocated_tp2", "metrics.jsonl"), "rb").read()
    _nothing_left(r)


def test_worker_on_each_node_one_dies_prompts_requeued_and_rogue_client_counted(results):
    """Trainer on n0, a rollout worker on each of n1 and n2; rollout-1 dies (SIGKILL, injected) at
    step 2: its prompts are requeued on rollout-0, the run trains on the same samples as the
    one-worker run, each prompt once. A client without the run's key sent the coordinator a message
    mid-run: refused and counted."""
    r = _completed(results, "ray_disaggregated_2w")
    nodes = r["ray_nodes"]
    assert nodes["trainer-0"] == "n0" and {nodes["rollout-0"], nodes["rollout-1"]} == {"n1", "n2"}, nodes
    s = r["summary"]
    assert s["worker_deaths"] == 1 and s["prompts"]["requeued"] >= 1 and s["prompts"]["trained"] == 12, s
    assert s["rejected_messages"]["coordinator"] >= 1 and s["protocol_errors"] == 0, s
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
    assert r["running_when_killed"] and 2 <= r["killed_at_step"] < 8, r
    assert "error" not in r, r.get("error")
    assert r["summary"]["resumed_from"].endswith(f"step_{r['killed_at_step']:06d}")
    assert r["left_alive"] == [] and r["alive_hosts"] == [], r
    out = results["out"]
    got = open(os.path.join(out, "ray_resumed", "metrics.jsonl"), "rb").read()
    assert got and got == open(os.path.join(out, "local_uninterrupted", "metrics.jsonl"), "rb").read()


def test_private_instance_is_started_and_stopped(results):
    """`ray.address=null` with a cluster already running: the run starts a Ray instance of its own
    (not the running cluster), and once it ends no GCS server or raylet of it is left."""
    r = results["ray_private"]
    assert "error" not in r, r["error"]
    assert r["summary"]["steps"] == 2
    assert r["ray_servers_left"] == [] and r["left_alive"] == [], r
