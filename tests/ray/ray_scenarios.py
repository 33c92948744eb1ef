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


def left_alive(pids: list[int], *, timeout_s: float = 60.0) -> list[int]:
    """Those of `pids` still alive after up to `timeout_s` (checked every 0.2 s, returning as soon as all
    are gone): the launcher's `ray.kill` of a host actor returns at once and Ray ends the process a moment
    later, a moment that a loaded machine stretches, so a check at one instant (or after a fixed 0.5 s)
    could see a process that is on its way out. A process left behind stays alive: it is still caught."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def host_actors_once_dead(*, timeout_s: float = 60.0) -> tuple[dict[str, dict], list[str]]:
    """Ray's table of the run's host actors (name -> node id, state; dead ones are still listed) and the
    names of those not DEAD, once all are DEAD or after up to `timeout_s` (needs `ray.init`): the GCS
    marks an actor dead a moment after `ray.kill` returns, as for its process in `left_alive`."""
    import ray._private.state

    deadline = time.monotonic() + timeout_s
    while True:
        actors = {a["Name"]: {"node_id": a["Address"]["NodeID"], "state": a["State"]}
                  for a in ray._private.state.actors().values() if a["ActorClassName"] == "ProcessHost"}
        not_dead = [name for name, a in actors.items() if a["state"] != "DEAD"]
        if not not_dead or time.monotonic() > deadline:
            return actors, not_dead
        time.sleep(0.2)


def listeners() -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return sorted({line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()})


def placement_of(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "actors", "placement.json")) as f:
        return json.load(f)


def metric_rows(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def run_pids(placement: dict) -> list[int]:
    """Every process the launcher started for the run (restarted ones included) and their hosts."""
    return [p for info in placement.values() for p in (info["pid"], info["host_pid"], *info.get("previous_pids", []))]


def run_scenario(name: str, out: str, overrides: list[str], *, ray_address: str, attack: bool = False,
                 edit_specs=None, fault=None) -> dict:
    """One run through `run_actors` (this process is the driver). `attack`: tests/rl/test_attacks.py's
    Intruder (clients with no key and with another run's key) attacks the coordinator, its heartbeat
    socket and rollout-0's weights socket throughout. `fault(run_dir, done, result)` runs in a thread."""
    from pathlib import Path

    from rl_actor_helpers import toy_config

    import ray
    from rl_engine.actors.run import run_actors
    from test_attacks import Intruder, gated

    run_dir = os.path.join(out, name)
    result: dict = {"name": name}
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(listeners())
            time.sleep(0.5)

    threads = [threading.Thread(target=watch, daemon=True)]
    if fault is not None:
        threads.append(threading.Thread(target=fault, args=(run_dir, done, result), daemon=True))
    for t in threads:
        t.start()
    intruder = None
    if attack:  # rollout-0 generates nothing before the intruder's first rounds: they reach a live run
        gate = os.path.join(out, f"{name}.intruder_started")
        intruder = Intruder(Path(run_dir), gate=gate)
        edit_specs = (lambda specs, inner=edit_specs, gate_specs=gated(gate):
                      gate_specs(inner(specs) if inner is not None else specs))
    t0 = time.monotonic()
    try:
        if intruder is not None:
            intruder.__enter__()
        result["summary"] = run_actors(toy_config(run_dir, *overrides), echo_stream=io.BytesIO(),
                                       edit_specs=edit_specs)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        done.set()
        if intruder is not None:
            intruder.__exit__(None, None, None)
            result["intruder"] = {"rounds": intruder.rounds, "answers": len(intruder.answers)}
        for t in threads:
            t.join(timeout=30)
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
            actors, result["alive_hosts"] = host_actors_once_dead()
        finally:
            ray.shutdown()
        result["ray_nodes"] = {proc: labels[actors[info["actor_name"]]["node_id"]] for proc, info in placement.items()}
        result["left_alive"] = left_alive(run_pids(placement))
    return result


# (name, overrides, on Ray, inject a worker death): the same toy runs under Ray and under the local launcher.
SYNC = ["train.deterministic=true", "rollout.mode=sync"]
DISAGG = [*SYNC, "placement.mode=disaggregated"]
# Checkpoints every step: the trainer-death scenario resumes from one and is compared with these runs.
COLOCATED_TP2 = [*SYNC, "placement.mode=colocated", "train.tp=2", "train.steps=5", "train.checkpoint_every=1"]
RAY = ["placement.launcher=ray", "ray.coordinator_resources={CPU: 0.5}"]
ON_N0 = "ray.trainer_resources={CPU: 0.5, n0: 1}"  # with the coordinator: node n0 is full
SCENARIOS = [
    # a rollout worker on each of n1 and n2; rollout-1 dies mid-run (its prompts requeued on rollout-0)
    ("ray_disaggregated_2w", [*DISAGG, *RAY, ON_N0, "ray.rollout_resources={CPU: 1}",
                              "placement.num_rollout_workers=2"], True, True),
    # attacked throughout by clients without the run's key and with another run's key
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


def _wait(done: threading.Event, condition, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done.is_set() and time.monotonic() < deadline:
        try:
            if condition():
                return True
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    return False


def served_since(run_dir: str, name: str, steps_done: int) -> bool:
    """Whether worker `name` answered requests of a step that began after `steps_done` steps were logged
    (the step in progress then, `steps_done + 1`, left out)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    return any(row["workers/served"].get(name, 0) > 0 for row in rows[steps_done + 1:])


def kill_the_worker_twice(run_dir: str, done: threading.Event, result: dict) -> None:
    """The run's one rollout worker: its process SIGKILLed once a step is logged; once its restart has
    served a later step, its host actor `ray.kill`ed (the process dies with it). With no worker left, the
    run waits for each restart, so each restarted process serves the steps after its death."""
    import ray

    faults = result.setdefault("faults", [])
    if not _wait(done, lambda: metric_rows(run_dir) >= 1):
        return
    pid = placement_of(run_dir)["rollout-0"]["pid"]
    os.kill(pid, signal.SIGKILL)
    faults.append({"how": "SIGKILL", "pid": pid, "steps_done": metric_rows(run_dir)})
    if not _wait(done, lambda: served_since(run_dir, "rollout-0", faults[0]["steps_done"])):
        return
    info = placement_of(run_dir)["rollout-0"]
    ray.kill(ray.get_actor(info["actor_name"], namespace="rl_engine"), no_restart=True)
    faults.append({"how": "ray.kill", "pid": info["pid"], "steps_done": metric_rows(run_dir)})


def kill_trainer_rank(run_dir: str, done: threading.Event, result: dict) -> None:
    """SIGKILL of trainer rank 1's process once the second checkpoint is committed."""
    latest = os.path.join(run_dir, "checkpoints", "latest.json")
    if _wait(done, lambda: json.load(open(latest))["step"] >= 2):
        pid = placement_of(run_dir)["trainer-1"]["pid"]
        os.kill(pid, signal.SIGKILL)
        result["killed_pid"] = pid


def trainer_death_then_resume(out: str, ray_address: str) -> dict:
    """Colocated tp2 with its ranks on two nodes: rank 1 dies after a committed checkpoint; the run stops
    (nothing left); `train.resume=auto` under Ray then completes it."""
    run_dir = os.path.join(out, "ray_trainer_death")
    overrides = [*COLOCATED_TP2, *RAY, "ray.trainer_resources={CPU: 1}", f"ray.address={ray_address}"]
    died = run_scenario("ray_trainer_death", out, overrides, ray_address=ray_address, fault=kill_trainer_rank)
    died["killed_at_step"] = json.load(open(os.path.join(run_dir, "checkpoints", "latest.json")))["step"]
    resumed = run_scenario("ray_trainer_death", out, [*overrides, "train.resume=auto"], ray_address=ray_address)
    return {"died": died, "resumed": resumed}


def inject_worker_death(specs):
    return [s if s.name != "rollout-1" else
            replace(s, args=[*s.args, "--die-after-requests", str(DIE_AFTER)]) for s in specs]


def sigterm_driver(out: str, ray_address: str) -> dict:
    """`rl-engine train` under Ray, SIGTERM to the driver mid-run: nothing of the run may be left.

    The driver runs in a mount namespace of its own where another directory is bind-mounted at
    `<output_dir>/logs`: it does not share the nodes' log directory (as a driver on a machine without
    the cluster's filesystem). Each process writes its log on its node; the driver collects them."""
    from rl_actor_helpers import toy_config
    import yaml

    from rl_engine.config import to_dict

    run_dir = os.path.join(out, "ray_sigterm")
    node_logs, driver_logs = os.path.join(run_dir, "logs"), os.path.join(out, "ray_sigterm_driver_logs")
    os.makedirs(node_logs)
    os.makedirs(driver_logs)
    config = os.path.join(run_dir, "run.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(to_dict(toy_config(run_dir, *DISAGG, *RAY, "train.steps=500", f"ray.address={ray_address}")), f)
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$1" && exec "$2" -m rl_engine.cli train "$3"',
                             driver_logs, node_logs, sys.executable, config],
                            stdout=open(os.path.join(out, "sigterm_driver.out"), "wb"),
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
    placement = placement_of(run_dir)
    result["left_alive"] = left_alive(run_pids(placement))

    def read(directory: str) -> dict[str, str]:
        return {n: open(os.path.join(directory, n), "rb").read().decode(errors="replace")
                for n in sorted(os.listdir(directory)) if not n.startswith(".")}

    result["logs"] = {"shared": {name: info["log_on_shared_dir"] for name, info in placement.items()},
                      "node": read(node_logs), "driver": read(driver_logs),
                      "driver_stdout": open(os.path.join(out, "sigterm_driver.out")).read()[-3000:]}
    import ray
    import ray._private.state

    ray.init(address=ray_address, log_to_driver=False)
    try:
        result["alive_hosts"] = host_actors_once_dead()[1]
    finally:
        ray.shutdown()
    return result


RESUME = [*SYNC, "placement.mode=colocated", "train.steps=8", "train.checkpoint_every=1"]
# One rollout worker (on n1) that may be restarted twice: SIGKILLed, later its host ray.kill'ed.
RESTARTS = [*DISAGG, *RAY, ON_N0, "ray.rollout_resources={CPU: 1, n1: 1}", "ray.max_worker_restarts=2",
            "train.steps=8"]


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
    # Fault injection: the coordinator stops for good once checkpoint 2 is committed (the run's processes
    # get it through Ray's runtime_env), so the kill finds exactly 2 committed, however long the kill and
    # Ray's ending of the dead driver's actors take (they used to commit more meanwhile, up to all 8).
    held = [*overrides, "ray.runtime_env={env_vars: {RL_ENGINE_TEST_HOLD_AFTER_CHECKPOINT: '2'}}"]
    with open(config, "w") as f:
        yaml.safe_dump(to_dict(toy_config(run_dir, *held)), f)
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
    result["left_alive"] = left_alive(run_pids(placement_of(run_dir)))
    # Read once every process is gone (Ray ends a dead driver's actors a moment later): still 2, as held.
    result["killed_at_step"] = json.load(open(latest))["step"]
    resumed = run_scenario("ray_resumed", out, [*overrides, "train.resume=auto"], ray_address=ray_address)
    result.update({k: v for k, v in resumed.items() if k in ("summary", "error", "alive_hosts")})
    result["left_alive"] += resumed.get("left_alive", [])
    return result


def ray_temp_dir() -> str:
    """A fresh temp dir for one Ray instance of ours (`RAY_TMPDIR`: its session, logs and sockets go under
    it); short, as the sockets' paths under it must fit a Unix socket's 107 bytes."""
    import tempfile

    return tempfile.mkdtemp(prefix="rlray", dir="/tmp")


def ray_pids_of(temp_dir: str) -> set[int]:
    """The processes of the Ray instance whose temp dir is `temp_dir`, and only those: the ones naming it on
    their command line (GCS, raylet, dashboard, `ray start`) or holding a file under it (every Ray process
    writes its logs there, the workers and agents too, whose command line Ray renames to ray::...). Another
    Ray instance on the machine (another suite's, run beside this one) is not counted; this process is not."""
    mark, me = os.path.realpath(temp_dir), os.getpid()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                ours = mark.encode() in f.read()
            fds = os.listdir(f"/proc/{entry}/fd") if not ours else []
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(mark + os.sep):
                    ours = True
                    break
            except OSError:
                continue
        if ours and alive(int(entry)):
            pids.add(int(entry))
    return pids


def instance_gone(temp_dir: str) -> dict:
    """Once a Ray instance of ours was stopped: which of its processes are left after up to 120 s
    ("ray_processes_left"), and the sessions that ran under its temp dir ("ray_sessions": one, or the
    instance was not where the count looks). The dir is removed when nothing is left (kept, with its logs,
    otherwise). Ray's daemons and workers exit within seconds on a quiet machine; under load it takes longer
    (a CI run beside two niced suites still had 16 exiting at 30 s): the point is that none is left, so wait
    generously."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and ray_pids_of(temp_dir):
        time.sleep(0.5)
    root = os.path.join(temp_dir, "ray")
    found = {"ray_processes_left": sorted(ray_pids_of(temp_dir)),
             "ray_sessions": sorted(d for d in os.listdir(root) if d.startswith("session_2"))
             if os.path.isdir(root) else []}
    if not found["ray_processes_left"]:
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    return found


def job_submit(out: str) -> dict:
    """As a user does: `ray start --head` (with the dashboard, whose job server takes jobs), then from a
    folder holding the config `ray job submit --working-dir . -- rl-engine train run.yaml
    placement.launcher=ray ray.address=auto`: examples/disaggregated.yaml (the demo task with a rollout
    worker process) at reduced sizes. Then the head is stopped and nothing of it may be left."""
    import re
    import shutil
    import urllib.error
    import urllib.request

    temp_dir = ray_temp_dir()
    bin_dir = os.path.dirname(sys.executable)
    # `ray start --head` turns Ray's token authentication on: the head, the job's driver (started by the head)
    # and `ray job submit` share this token (a user exports it on every node and where they submit from).
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex(), "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    workdir, run_dir = os.path.join(out, "job_workdir"), os.path.join(out, "ray_job")
    os.makedirs(workdir)
    shutil.copy(os.path.join(HERE, "..", "..", "examples", "disaggregated.yaml"), os.path.join(workdir, "run.yaml"))
    head_log = open(os.path.join(out, "ray_head.log"), "wb")
    # Port 0 for the GCS and the dashboard: each binds a free port itself (no port picked here and bound later,
    # which another process can take in between); the dashboard's is read back from what `ray start` prints.
    head = subprocess.Popen([os.path.join(bin_dir, "ray"), "start", "--head", "--port=0",
                             "--node-ip-address=127.0.0.1", "--num-cpus=3", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", "--dashboard-port=0", "--disable-usage-stats",
                             "--block"], env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {}
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 120
        dashboard = None  # http://127.0.0.1:PORT, once `ray start` has printed it
        while time.monotonic() < deadline and head.poll() is None:
            if dashboard is None:
                found = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'",
                                  open(os.path.join(out, "ray_head.log"), errors="replace").read())
                if found is None:
                    time.sleep(0.5)
                    continue
                dashboard = result["dashboard"] = found.group(1)
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=5).read()
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): up
                break
            except OSError:
                time.sleep(0.5)
        if dashboard is None:
            raise RuntimeError("`ray start --head` printed no dashboard address (RAY_API_SERVER_ADDRESS=...) "
                               f"within 120 s; see {head_log.name}")
        result["head_ready_seconds"] = time.monotonic() - t0
        submit = subprocess.run(
            [os.path.join(bin_dir, "ray"), "job", "submit", f"--address={dashboard}",
             "--working-dir", ".", "--", "rl-engine", "train", "run.yaml", "placement.launcher=ray",
             "ray.address=auto", f"train.output_dir={run_dir}", "warmup.steps=20", "train.steps=2", "train.dp=1",
             "placement.num_rollout_workers=1", "data.num_eval=8", "rollout.prompts_per_step=4", "rollout.n=4",
             "rollout.dynamic_sampling=false", "placement.grace_period_s=3"],
            cwd=workdir, env=env, capture_output=True, timeout=420)
        result.update(returncode=submit.returncode, output=submit.stdout.decode(errors="replace")[-4000:],
                      stderr=submit.stderr.decode(errors="replace")[-2000:], seconds=time.monotonic() - t0)
        try:
            with open(os.path.join(run_dir, "summary.json")) as f:
                result["summary"] = json.load(f)
            result["left_alive"] = left_alive(run_pids(placement_of(run_dir)))
        except FileNotFoundError as e:
            result["missing"] = str(e)
    finally:
        _killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _killpg(head.pid, signal.SIGKILL)
            head.wait()
        head_log.close()
    result.update(instance_gone(temp_dir))
    return result


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def private_instance(out: str) -> dict:
    """`ray.address=null`: the run starts a Ray instance of its own and stops it at the end."""
    from rl_actor_helpers import toy_config

    from rl_engine.actors.run import run_actors

    run_dir = os.path.join(out, "ray_private")
    result: dict = {}
    os.environ["RAY_TMPDIR"] = temp_dir = ray_temp_dir()  # where the run's ray.init puts its instance
    try:
        result["summary"] = run_actors(toy_config(run_dir, *SYNC, "placement.mode=colocated", "train.steps=2",
                                                  "placement.launcher=ray", "ray.address=null",
                                                  "ray.trainer_resources={CPU: 0.5}",
                                                  "ray.coordinator_resources={CPU: 0.5}"), echo_stream=io.BytesIO())
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        del os.environ["RAY_TMPDIR"]
    placement = placement_of(run_dir)
    result.update(instance_gone(temp_dir))
    result["left_alive"] = left_alive(run_pids(placement))
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
            results[name] = run_scenario(name, out, [*overrides, *address], ray_address=cluster.address,
                                         attack=name == "ray_disaggregated",
                                         edit_specs=inject_worker_death if kill else None)
        if not only or "ray_restarts" in only:
            results["ray_restarts"] = run_scenario("ray_restarts", out, [*RESTARTS, f"ray.address={cluster.address}"],
                                                   ray_address=cluster.address, fault=kill_the_worker_twice)
        if not only or "ray_trainer_death" in only:
            results["ray_trainer_death"] = trainer_death_then_resume(out, cluster.address)
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
    deadline = time.monotonic() + 120  # as job_submit's wait: none left, however loaded the machine
    while time.monotonic() < deadline and any(alive(p) for p in ray_pids):
        time.sleep(0.5)
    results["ray_processes_left"] = [p for p in ray_pids if alive(p)]
    if not only or "ray_job" in only:  # its own head, once the cluster is gone
        try:  # a failure here (e.g. the submit's timeout) fails its own test, not every scenario's
            results["ray_job"] = job_submit(out)
        except Exception:
            results["ray_job"] = {"error": traceback.format_exc()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
