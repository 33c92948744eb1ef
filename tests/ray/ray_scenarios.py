"""The Ray part of tests/ray/test_ray_launcher.py, run inside a network namespace of its own that has
only loopback (`unshare -n`), where a simulated three-node Ray cluster comes up on 127.0.0.1.

`python ray_scenarios.py OUT_DIR`: starts `ray.cluster_utils.Cluster` (three nodes with one CPU and a
custom resource `n<i>` each), runs each scenario against it through `run_actors` (what `rl-engine
train` does), and writes `OUT_DIR/results.json`: per scenario the summary, where Ray says each actor
ran, the listening sockets seen during the run, and the run's processes still alive afterwards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "rl"))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def listeners() -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return sorted({line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()})


def poke_coordinator(run_dir: str, done: threading.Event) -> None:
    """A rogue client with no key sends the coordinator a message mid-run (refused and counted)."""
    import zmq

    from rl_engine import protocol as P

    path = os.path.join(run_dir, "actors.json")
    while not os.path.exists(path) and not done.is_set():
        time.sleep(0.05)
    if done.is_set():
        return
    time.sleep(0.2)
    address = json.load(open(path))["coordinator"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"rollout-0")
    sock.connect(address)
    P.send_msg(sock, P.TrainResult(step=1, policy_version=1, metrics={}))
    time.sleep(1.0)
    sock.close()


def run_scenario(name: str, out: str, overrides: list[str], *, ray_address: str, poke: bool = False,
                 edit_specs=None) -> dict:
    from rl_actor_helpers import toy_config

    import ray
    from rl_engine.actors.run import run_actors

    run_dir = os.path.join(out, name)
    result: dict = {"name": name}
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(listeners())
            time.sleep(0.5)

    threads = [threading.Thread(target=watch, daemon=True)]
    if poke:
        threads.append(threading.Thread(target=poke_coordinator, args=(run_dir, done), daemon=True))
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        result["summary"] = run_actors(toy_config(run_dir, *overrides), echo_stream=io.BytesIO(),
                                       edit_specs=edit_specs)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        done.set()
        for t in threads:
            t.join(timeout=10)
    result["seconds"] = time.monotonic() - t0
    result["listen_addresses"] = sorted(seen)
    placement_path = os.path.join(run_dir, "actors", "placement.json")
    if os.path.exists(placement_path):
        with open(placement_path) as f:
            placement = json.load(f)
        # Ray's own view: the node of each host actor (dead by now, still listed) and that node's label.
        # ray.util.state needs the dashboard (ray[default]); the GCS's actor table says the same.
        import ray
        import ray._private.state

        ray.init(address=ray_address, log_to_driver=False)
        try:
            labels = {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("n") and k[1:].isdigit())
                      for n in ray.nodes()}
            actors = {a["Name"]: {"node_id": a["Address"]["NodeID"], "state": a["State"]}
                      for a in ray._private.state.actors().values() if a["ActorClassName"] == "ProcessHost"}
        finally:
            ray.shutdown()
        result["ray_nodes"] = {proc: labels[actors[info["actor_name"]]["node_id"]] for proc, info in placement.items()}
        result["alive_hosts"] = [name for name, a in actors.items() if a["state"] == "ALIVE"]
        time.sleep(0.5)
        result["left_alive"] = [p for info in placement.values() for p in (info["pid"], info["host_pid"]) if alive(p)]
    return result


# (name, overrides, on Ray, inject a worker death): the same toy runs under Ray and under the local launcher.
SYNC = ["train.deterministic=true", "rollout.mode=sync"]
DISAGG = [*SYNC, "placement.mode=disaggregated"]
COLOCATED_TP2 = [*SYNC, "placement.mode=colocated", "train.tp=2"]
RAY = ["placement.launcher=ray", "ray.coordinator_resources={CPU: 0.5}"]
ON_N0 = "ray.trainer_resources={CPU: 0.5, n0: 1}"  # with the coordinator: node n0 is full
SCENARIOS = [
    # a rollout worker on each of n1 and n2; rollout-1 dies mid-run (its prompts requeued on rollout-0)
    ("ray_disaggregated_2w", [*DISAGG, *RAY, ON_N0, "ray.rollout_resources={CPU: 1}",
                              "placement.num_rollout_workers=2", "placement.heartbeat_timeout_s=3"], True, True),
    ("ray_disaggregated", [*DISAGG, *RAY, ON_N0, "ray.rollout_resources={CPU: 1, n1: 1}"], True, False),
    ("local_disaggregated", DISAGG, False, False),
    ("ray_colocated_tp2", [*COLOCATED_TP2, *RAY, "ray.trainer_resources={CPU: 1}"], True, False),
    ("local_colocated_tp2", COLOCATED_TP2, False, False),
    # no node has a GPU: an error naming the bundle, within placement.startup_timeout_s
    ("ray_placement_error", [*COLOCATED_TP2, *RAY, "ray.trainer_resources={CPU: 1, GPU: 1}",
                             "placement.startup_timeout_s=3"], True, False),
]
# rollout-1 answers half of the 8 eval prompts, then 2 of step 1's 4: it dies on its first of step 2.
DIE_AFTER = 8 // 2 + 4 // 2 + 1


def inject_worker_death(specs):
    return [s if s.name != "rollout-1" else
            replace(s, args=[*s.args, "--die-after-requests", str(DIE_AFTER)]) for s in specs]


def sigterm_driver(out: str, ray_address: str) -> dict:
    """`rl-engine train` under Ray, SIGTERM to the driver mid-run: nothing of the run may be left."""
    from rl_actor_helpers import toy_config
    import yaml

    from rl_engine.config import to_dict

    run_dir = os.path.join(out, "ray_sigterm")
    os.makedirs(run_dir)
    config = os.path.join(run_dir, "run.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(to_dict(toy_config(run_dir, *DISAGG, *RAY, "train.steps=500", f"ray.address={ray_address}")), f)
    proc = subprocess.Popen([sys.executable, "-m", "rl_engine.cli", "train", config], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(out, "sigterm_driver.err"), "wb"))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.1)
    running_when_signalled = proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = None
    result = {"running_when_signalled": running_when_signalled, "returncode": rc,
              "stop_seconds": time.monotonic() - t0}
    with open(os.path.join(run_dir, "actors", "placement.json")) as f:
        placement = json.load(f)
    time.sleep(0.5)
    result["left_alive"] = [p for info in placement.values() for p in (info["pid"], info["host_pid"]) if alive(p)]
    import ray
    import ray._private.state

    ray.init(address=ray_address, log_to_driver=False)
    try:
        result["alive_hosts"] = [a["Name"] for a in ray._private.state.actors().values()
                                 if a["ActorClassName"] == "ProcessHost" and a["State"] != "DEAD"]
    finally:
        ray.shutdown()
    return result


RESUME = [*SYNC, "placement.mode=colocated", "train.steps=8", "train.checkpoint_every=1"]


def sigkill_driver_then_resume(out: str, ray_address: str) -> dict:
    """`rl-engine train` under Ray, SIGKILL of the driver after a committed checkpoint: Ray ends the
    dead driver's actors and their children die with them; then `train.resume=auto` under Ray."""
    from rl_actor_helpers import toy_config
    import yaml

    from rl_engine.config import to_dict

    run_dir = os.path.join(out, "ray_resumed")
    os.makedirs(run_dir)
    config = os.path.join(run_dir, "run.yaml")
    overrides = [*RESUME, *RAY, "ray.trainer_resources={CPU: 1}", f"ray.address={ray_address}"]
    with open(config, "w") as f:
        yaml.safe_dump(to_dict(toy_config(run_dir, *overrides)), f)
    proc = subprocess.Popen([sys.executable, "-m", "rl_engine.cli", "train", config], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(out, "sigkill_driver.err"), "wb"))
    latest = os.path.join(run_dir, "checkpoints", "latest.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.load(open(latest))["step"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    result: dict = {"running_when_killed": proc.poll() is None}
    proc.kill()
    proc.wait()
    result["killed_at_step"] = json.load(open(latest))["step"]
    with open(os.path.join(run_dir, "actors", "placement.json")) as f:
        placement = json.load(f)
    pids = [p for info in placement.values() for p in (info["pid"], info["host_pid"])]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    result["left_alive"] = [p for p in pids if alive(p)]
    resumed = run_scenario("ray_resumed", out, [*overrides, "train.resume=auto"], ray_address=ray_address)
    result.update({k: v for k, v in resumed.items() if k in ("summary", "error", "alive_hosts")})
    result["left_alive"] += resumed.get("left_alive", [])
    return result


def ray_server_pids() -> list[int]:
    """Processes of any Ray instance on this machine (its GCS server and raylets)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv0 = f.read().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith((b"gcs_server", b"raylet")) and alive(int(entry)):
                pids.append(int(entry))
    return sorted(pids)


def private_instance(out: str) -> dict:
    """`ray.address=null`: the run starts a Ray instance of its own and stops it at the end."""
    from rl_actor_helpers import toy_config

    from rl_engine.actors.run import run_actors

    before = ray_server_pids()
    run_dir = os.path.join(out, "ray_private")
    result: dict = {}
    try:
        result["summary"] = run_actors(toy_config(run_dir, *SYNC, "placement.mode=colocated", "train.steps=2",
                                                  "placement.launcher=ray", "ray.address=null",
                                                  "ray.trainer_resources={CPU: 0.5}",
                                                  "ray.coordinator_resources={CPU: 0.5}"), echo_stream=io.BytesIO())
    except Exception:
        result["error"] = traceback.format_exc()
    with open(os.path.join(run_dir, "actors", "placement.json")) as f:
        placement = json.load(f)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ray_server_pids() != before:
        time.sleep(0.2)
    result["ray_servers_left"] = sorted(set(ray_server_pids()) - set(before))
    result["left_alive"] = [p for info in placement.values() for p in (info["pid"], info["host_pid"]) if alive(p)]
    return result


def main() -> None:
    out = sys.argv[1]
    from ray.cluster_utils import Cluster

    results: dict = {}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"n0": 1}})
    for i in (1, 2):
        cluster.add_node(num_cpus=1, resources={f"n{i}": 1})
    cluster.wait_for_nodes()
    ray_pids = [p.process.pid for node in cluster.list_all_nodes() for procs in node.all_processes.values()
                for p in procs]
    results["cluster_start_seconds"] = time.monotonic() - t0
    only = set(sys.argv[2:])
    try:
        for name, overrides, on_ray, kill in SCENARIOS:
            if only and name not in only:
                continue
            address = [f"ray.address={cluster.address}"] if on_ray else []
            results[name] = run_scenario(name, out, [*overrides, *address], ray_address=cluster.address, poke=on_ray,
                                         edit_specs=inject_worker_death if kill else None)
        if not only or "ray_sigterm" in only:
            results["ray_sigterm"] = sigterm_driver(out, cluster.address)
        if not only or "ray_resumed" in only:
            results["ray_resumed"] = sigkill_driver_then_resume(out, cluster.address)
            results["local_uninterrupted"] = run_scenario("local_uninterrupted", out, RESUME,
                                                          ray_address=cluster.address)
        if not only or "ray_private" in only:  # last: a private ray.init leaves settings in this process's environment
            results["ray_private"] = private_instance(out)
    finally:
        cluster.shutdown()
    time.sleep(1.0)
    results["ray_processes_left"] = [p for p in ray_pids if alive(p)]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
