"""Run the actors of one training run on a Ray cluster: `launch_on_ray(cfg, ...)`, the `ray` launcher.

Ray does placement, lifecycle and failure detection; ZMQ and torch.distributed do the talking, exactly
as under the local launcher. The processes are the ones `rl_engine.actors.run.build_specs` lists
(coordinator, trainer ranks, rollout workers), each `python -m rl_engine.launch.child MODULE ARGS`,
so after start-up a run under Ray and a run under the local launcher are one code path. No actor
imports Ray: this module is the only one that does.

Design: one placement group per run, one bundle per process (`ray.<role>_resources`, the group's
strategy `ray.strategy`). Each process is hosted by a small Ray actor (`ProcessHost`) scheduled into its
bundle: it reports its node's IP (as Ray sees it) and free ports there, starts the child on its node
with the bundle's devices (Ray sets CUDA_VISIBLE_DEVICES in the host's environment, which the child
inherits), writes the child's output to `<log_dir>/<name>.log`, reports its exit, forwards signals to
its process group, and removes the run's shared-memory regions on its node at the end. The child's
death signal is tied to its host's process, so a host that dies (`ray.kill`, a node lost, the driver
gone: Ray kills the actors of a dead owner) takes its child with it.

Rendezvous through the driver: the coordinator listens on its node's IP at two ports, the trainer ranks'
MASTER_ADDR is rank 0's node IP and MASTER_PORT a port there; each is bound (port 0) by the host of the
process that serves it before the driver publishes it, and passed to that process as an inherited socket
(`rl_engine.launch.ports`), so no other process on the node can take it in between. Every process gets a
config of its own only where it differs from the run's (`placement.host`: its node's IP, never a
wildcard; `placement.weight_transport=auto` becomes `zmq` for a worker on a node without trainer ranks).
The run's secret travels as an argument of `ProcessHost.start` (Ray's object transfer, never a command
line, a file, or the actor's runtime_env, which Ray's state API shows) into the child's environment.

Failures: the driver polls every host every 0.5 s. A rollout worker whose process ended
with an error, or whose host actor died (`ray.kill`, its node lost), is reported at once to the
coordinator (`WorkerExited`, sent from a CURVE client named `launcher` that holds the run's key), which
requeues its prompts without waiting for the heartbeats. With `ray.max_worker_restarts` > 0 it is then
started again in its bundle (by its host, or by a new host when the old one is gone), registers anew,
and the coordinator has it sent the current weights before it serves. A worker that exits 0 (the
coordinator retired it) is reported too, and never restarted. Any other process that fails ends the run
(a trainer rank: resume from the last committed checkpoint).

Logs: each child writes `<output_dir>/logs/<name>.log` on its own node (a restart appends). The driver
leaves a marker file in its log directory; a host that does not see it runs on a node that does not
share the output directory, and at the end the driver copies that log back through Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Literal

import ray
import yaml
import zmq
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl_engine import protocol as P
from rl_engine.auth import RunAuth
from rl_engine.launch.local import LAUNCHER_PID_ENV, LaunchResult, ProcessResult, ProcessSpec, tail_lines
from rl_engine.launch.ports import MASTER_LISTEN_FD_ENV, listen, port_of

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", MASTER_LISTEN_FD_ENV)
_ECHO_CHUNK = 1 << 20
_LOG_CHUNK = 16 << 20
LAUNCHER_NAME = "launcher"  # the coordinator's peer name for the driver (rl_engine.actors.coordinator_io)


class PlacementError(RuntimeError):
    """The cluster cannot hold the run's placement group within `placement.startup_timeout_s`."""


class ProcessHost:
    """Hosts one process of the run on the node of its bundle (a Ray actor; see the module docstring)."""

    def __init__(self) -> None:
        self._popen: subprocess.Popen | None = None
        self._log_path: str | None = None
        self._echo_offset = 0
        self._listeners: dict[int, Any] = {}  # fd -> listening socket, held until the child inherits it

    def where(self) -> dict[str, Any]:
        return {"node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "host_pid": os.getpid()}

    def listen(self, host: str) -> tuple[int, int]:
        """Bind and listen on a port of `host` the kernel picks, held here until `start` hands it to the
        child (rl_engine.launch.ports): (port, fd in this process)."""
        listener = listen(host)
        self._listeners[listener.fileno()] = listener
        return port_of(listener), listener.fileno()

    def sees(self, path: str, content: str) -> bool:
        """Whether this node sees the driver's file `path` holding `content` (a shared output dir)."""
        try:
            with open(path) as f:
                return f.read() == content
        except OSError:
            return False

    def read_log(self, offset: int) -> bytes:
        """Up to 16 MiB of this host's log from `offset` (the driver collects a node-local log)."""
        if self._log_path is None:
            return b""
        with open(self._log_path, "rb") as f:
            f.seek(offset)
            return f.read(_LOG_CHUNK)

    def start(self, cmd: list[str], env: dict[str, str], secret_env: dict[str, str], log_path: str, *,
              niceness: int, append: bool = False, pass_fds: tuple[int, ...] = ()) -> tuple[int, int]:
        """Start the child; `secret_env` (the run's secret) goes into its environment only. Returns the
        child's pid and its niceness: Ray runs its workers at niceness 15 (`RAY_worker_niceness`), which
        a child would inherit and lose every contended core to; this thread (the child's parent) takes
        the driver's `niceness` first when it may (root, CAP_SYS_NICE or RLIMIT_NICE). `pass_fds`:
        sockets from `listen` the child serves; this process closes its copies once the child has them,
        and lets the others go before the start (a child that binds its port itself)."""
        child_env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        child_env.update(env)
        child_env.update(secret_env)
        child_env[LAUNCHER_PID_ENV] = str(os.getpid())  # the child dies with this host process
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log_path = log_path
        if not append:
            self._echo_offset = 0
        try:  # PRIO_PROCESS 0 on Linux: the calling thread, which forks the child
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
        except OSError:
            pass
        for fd in [fd for fd in self._listeners if fd not in pass_fds]:
            self._listeners.pop(fd).close()
        with open(log_path, "ab" if append else "wb") as log:
            if append:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} restarted on {ray.util.get_node_ip_address()} "
                          "---\n".encode())
            try:
                self._popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               env=child_env, start_new_session=True, pass_fds=pass_fds)
            finally:
                for fd in pass_fds:
                    if (listener := self._listeners.pop(fd, None)) is not None:
                        listener.close()
        return self._popen.pid, os.getpriority(os.PRIO_PROCESS, 0)

    def poll(self, *, echo: bool = False) -> tuple[int | None, bytes]:
        """(the child's exit code, None while it runs; its output since the last call when `echo`)."""
        assert self._popen is not None
        rc = self._reap()
        out = b""
        if echo and self._log_path is not None:
            with open(self._log_path, "rb") as f:
                f.seek(self._echo_offset)
                out = f.read(_ECHO_CHUNK)
            self._echo_offset += len(out)
        return rc, out

    def _reap(self) -> int | None:
        popen = self._popen
        if popen is None or popen.returncode is not None:
            return None if popen is None else popen.returncode
        # As the local launcher: see the exit without reaping, so the group id cannot be reused before
        # whatever the child left in its group is killed.
        if os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return None
        _killpg(popen.pid, signal.SIGKILL)
        return popen.poll()

    def send_signal(self, sig: int) -> None:
        if self._popen is not None and self._reap() is None:
            _killpg(self._popen.pid, sig)

    def sweep(self, run_id: str) -> list[str]:
        """Remove the run's shared-memory regions left on this node (its processes have ended)."""
        from rl_engine.weight_sync.staging import sweep_run

        return sweep_run(run_id)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _role_resources(cfg, spec: ProcessSpec) -> dict[str, float]:
    r = cfg.ray
    if spec.dist_rank is not None:
        return dict(r.trainer_resources)
    return dict(r.coordinator_resources if spec.ends_run else r.rollout_resources)


def _actor_options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray actor options that take the whole bundle."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    options: dict[str, Any] = {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0)}
    if "memory" in resources:
        options["memory"] = resources["memory"]
    if custom:
        options["resources"] = custom
    return options


def placement_error(bundles: list[dict[str, float]], names: list[str], timeout_s: float) -> PlacementError:
    """Which bundles no node can hold, what they asked for and what the cluster has."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    unfit = [i for i, b in enumerate(bundles)
             if not any(all(node.get(k, 0) >= v for k, v in b.items()) for node in nodes)]
    asked = "; ".join(f"bundle {i} ({names[i]}) asks {bundles[i]}" for i in (unfit or range(len(bundles))))
    have = "; ".join(f"node {i}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(node.items())
                                                if not k.startswith(("node:", "object_store_memory", "memory")))
                     for i, node in enumerate(nodes))
    why = "no node can hold it" if unfit else "the cluster cannot hold all bundles at once"
    return PlacementError(f"ray placement group not ready within placement.startup_timeout_s={timeout_s:g}: {why}: "
                          f"{asked}. The cluster has {len(nodes)} node(s): {have}; free now: "
                          f"{ray.available_resources()}")


def _actor_config(config_path: str, name: str, changes: dict[str, Any]) -> str:
    """The run's config with this process's placement changes: the same path when there are none."""
    with open(config_path) as f:
        data = yaml.safe_load(f)
    if all(data["placement"].get(k) == v for k, v in changes.items()):
        return config_path
    data["placement"].update(changes)
    path = os.path.join(os.path.dirname(config_path), f"config.{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def _with_config(spec: ProcessSpec, path: str) -> ProcessSpec:
    args = list(spec.args)
    args[args.index("--config") + 1] = path
    return replace(spec, args=args)


class RayLauncher:
    """Places the run's processes (see the module docstring); `run()` returns a `LaunchResult`."""

    def __init__(self, cfg, config_path: str, *, run_id: str, log_dir: str, auth: RunAuth,
                 edit_specs: Callable[[list[ProcessSpec]], list[ProcessSpec]] | None = None,
                 echo_stream: IO[bytes] | None = None, poll_interval_s: float = 0.5) -> None:
        self.cfg, self.config_path, self.run_id = cfg, config_path, run_id
        self.log_dir = Path(log_dir)
        self._auth = auth
        self._secret_env = auth.child_env()
        self._marker = self.log_dir / f".driver-{run_id}"  # a host that sees it shares the output dir
        self._link: zmq.Socket | None = None  # to the coordinator, as `launcher`
        self._edit_specs = edit_specs
        self._echo_stream = echo_stream
        self._poll_interval_s = poll_interval_s
        self._signal: int | None = None
        self._signal_count = 0
        self._connected_here = False
        self._stopping = False
        self._pg = None
        self.hosts: list[Any] = []
        self.specs: list[ProcessSpec] = []
        self.where: list[dict[str, Any]] = []
        self.pids: list[int] = []
        self.returncodes: list[int | None] = []
        self.stopped: list[bool] = []
        self.commands: list[tuple[list[str], dict[str, str]]] = []  # each process's command and environment
        self.restarts: list[int] = []
        self.previous_pids: list[list[int]] = []
        self.actor_names: list[str] = []
        self.shared_logs: list[bool] = []
        self._niceness = 0

    # -- start-up -----------------------------------------------------------------------------------
    def _connect(self) -> None:
        r = self.cfg.ray
        if ray.is_initialized():
            return
        # "local": a new instance even when RAY_ADDRESS or a running cluster would be found (what None does).
        ray.init(address=r.address or "local", namespace=r.namespace, runtime_env=r.runtime_env or None,
                 log_to_driver=False, include_dashboard=False if r.address is None else None)
        self._connected_here = True

    def _specs(self, **kwargs: Any) -> list[ProcessSpec]:
        from rl_engine.actors.run import build_specs

        specs = build_specs(self.cfg, self.config_path, run_id=self.run_id, **kwargs)
        return self._edit_specs(specs) if self._edit_specs is not None else specs

    def start(self) -> None:
        p = self.cfg.placement
        self._connect()
        # First the process list (its roles size the bundles), then the addresses from where Ray put them.
        specs = self._specs(coordinator_host=p.host, coordinator_ports=(0, 0))
        bundles = [_role_resources(self.cfg, s) for s in specs]
        names = [s.name for s in specs]
        self._pg = placement_group(bundles, strategy=self.cfg.ray.strategy, name=f"rl_engine-{self.run_id}")
        if not self._pg.wait(timeout_seconds=p.startup_timeout_s):
            raise placement_error(bundles, names, p.startup_timeout_s)
        self._bundles = bundles
        self.hosts = [self._new_host(i, spec.name) for i, spec in enumerate(specs)]
        self.where = ray.get([h.where.remote() for h in self.hosts], timeout=p.startup_timeout_s)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._marker.write_text(self.run_id)
        self.shared_logs = ray.get([h.sees.remote(str(self._marker), self.run_id) for h in self.hosts],
                                   timeout=p.startup_timeout_s)
        coordinator = next(i for i, s in enumerate(specs) if s.ends_run)
        rank0 = next((i for i, s in enumerate(specs) if s.dist_rank == 0), None)
        coordinator_ip = self.where[coordinator]["node_ip"]
        # Ports are bound where they are served before anyone learns them; each host hands its sockets down.
        (port, fd), (heartbeat_port, heartbeat_fd) = ray.get(
            [self.hosts[coordinator].listen.remote(coordinator_ip) for _ in range(2)])
        ports = (port, heartbeat_port)
        self.specs = self._specs(coordinator_host=coordinator_ip, coordinator_ports=ports,
                                 coordinator_listen_fds=(fd, heartbeat_fd))
        assert [s.name for s in self.specs] == names
        trainer_nodes = {self.where[i]["node_id"] for i, s in enumerate(self.specs) if s.dist_rank is not None}
        master_ip = self.where[rank0]["node_ip"] if rank0 is not None else None
        master_port, master_fd = ray.get(self.hosts[rank0].listen.remote(master_ip)) if rank0 is not None \
            else (None, None)
        world_size = sum(s.dist_rank is not None for s in self.specs)
        niceness = self._niceness = os.getpriority(os.PRIO_PROCESS, 0)
        starts = []
        for spec, host, where in zip(self.specs, self.hosts, self.where):
            changes: dict[str, Any] = {"host": where["node_ip"]}
            if p.weight_transport == "auto" and spec.dist_rank is None and not spec.ends_run \
                    and where["node_id"] not in trainer_nodes:
                changes["weight_transport"] = "zmq"  # shared memory only between processes of one node
            spec = _with_config(spec, _actor_config(self.config_path, spec.name, changes))
            env = {"PYTHONUNBUFFERED": "1", "RL_ENGINE_PROCESS_NAME": spec.name}
            if spec.dist_rank is not None:
                # Each rank has its own bundle (and sees only its bundle's GPUs): local rank 0 of 1.
                env.update(MASTER_ADDR=master_ip, MASTER_PORT=str(master_port), RANK=str(spec.dist_rank),
                           LOCAL_RANK="0", WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE="1")
                if spec.master_socket:
                    env[MASTER_LISTEN_FD_ENV] = str(master_fd)
            env.update(spec.env)
            pass_fds = (*spec.pass_fds, *([master_fd] if spec.master_socket else []))
            cmd = [sys.executable, "-m", "rl_engine.launch.child", spec.module, *spec.args]
            self.commands.append((cmd, env))
            starts.append(host.start.remote(cmd, env, self._secret_env, str(self.log_dir / f"{spec.name}.log"),
                                            niceness=niceness, pass_fds=pass_fds))
        # The coordinator hears from the driver when Ray sees a rollout worker die (see the module docstring).
        self._link = zmq.Context.instance().socket(zmq.DEALER)
        self._link.setsockopt(zmq.IDENTITY, LAUNCHER_NAME.encode())
        self._link.setsockopt(zmq.LINGER, 0)
        self._link.setsockopt(zmq.SNDTIMEO, 1000)
        self._auth.connect_as(self._link, LAUNCHER_NAME)
        self._link.connect(f"tcp://{coordinator_ip}:{ports[0]}")
        started = ray.get(starts, timeout=p.startup_timeout_s)
        self.pids = [pid for pid, _ in started]
        self.restarts = [0] * len(self.specs)
        self.previous_pids = [[] for _ in self.specs]
        if lower := sorted({name for (_, nice), name in zip(started, names) if nice > niceness}):
            print(f"warning: {', '.join(lower)} run at Ray's worker niceness ({max(n for _, n in started)}, not "
                  f"{niceness}): they lose contended cores to other processes; start the Ray nodes with "
                  "RAY_worker_niceness=0 in their environment", file=sys.stderr, flush=True)
        self.returncodes = [None] * len(self.specs)
        self.stopped = [False] * len(self.specs)
        self._write_placement()

    def _new_host(self, i: int, name: str) -> Any:
        """A host actor for process `i` in its bundle (named after the process, and its restart if any)."""
        strategy = PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=i)
        suffix = f"-r{self.restarts[i]}" if self.restarts and self.restarts[i] else ""
        actor_name = f"rl_engine-{self.run_id}-{name}{suffix}"
        if i < len(self.actor_names):
            self.actor_names[i] = actor_name
        else:
            self.actor_names.append(actor_name)
        return ray.remote(max_restarts=0)(ProcessHost).options(
            name=actor_name, scheduling_strategy=strategy, **_actor_options(self._bundles[i])).remote()

    def _write_placement(self, *, announce: bool = True) -> None:
        import json

        placement = {s.name: {**w, "pid": pid, "bundle_index": i, "actor_name": self.actor_names[i],
                              "restarts": self.restarts[i], "previous_pids": self.previous_pids[i],
                              "log_on_shared_dir": self.shared_logs[i]}
                     for i, (s, w, pid) in enumerate(zip(self.specs, self.where, self.pids))}
        path = os.path.join(self.cfg.train.output_dir, "actors", "placement.json")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(placement, f, indent=1)
        os.replace(tmp, path)
        if not announce:
            return
        nodes = {w["node_id"]: w["node_ip"] for w in self.where}
        print(f"launched {len(self.specs)} processes on Ray ({self.cfg.placement.mode}, {len(nodes)} node(s) at "
              f"{', '.join(sorted(set(nodes.values())))}); logs in {self.log_dir}; placement in {path}", flush=True)

    # -- watching -----------------------------------------------------------------------------------
    def _poll(self) -> None:
        restarts: list[tuple[int, int, str]] = []  # after every death is reported: a restart may wait for a host
        live = [i for i, rc in enumerate(self.returncodes) if rc is None]
        refs = [self.hosts[i].poll.remote(echo=self.specs[i].echo) for i in live]
        for i, ref in zip(live, refs):
            try:
                rc, out = ray.get(ref)
            except ray.exceptions.RayActorError:  # the host (and with it the child) is gone
                rc, out = -signal.SIGKILL, b""
            if out:
                stream = self._echo_stream or sys.stdout.buffer
                try:
                    stream.write(out)
                    stream.flush()
                except (OSError, ValueError):
                    pass
            if rc is None:
                continue
            worker = not self.specs[i].required and not self._stopping and self._signal is None
            if worker and rc == 0:  # the coordinator told it to stop (retired); it is not restarted
                self._tell_coordinator(P.WorkerExited(worker=self.specs[i].name, pid=self.pids[i],
                                                      reason="exited with code 0"), quiet=True)
            elif worker:
                how = f"exited with code {rc}" if rc > 0 else f"was killed by signal {-rc}"
                restart = self.restarts[i] < self.cfg.ray.max_worker_restarts
                self._tell_coordinator(P.WorkerExited(worker=self.specs[i].name, pid=self.pids[i], reason=how,
                                                      restarting=restart))
                if restart:
                    print(f"process '{self.specs[i].name}' on {self.where[i]['node_ip']} {how}; restarting it "
                          f"({self.restarts[i] + 1} of ray.max_worker_restarts={self.cfg.ray.max_worker_restarts})",
                          file=sys.stderr, flush=True)
                    restarts.append((i, rc, how))
                    continue
                print(f"process '{self.specs[i].name}' on {self.where[i]['node_ip']} {how}; it is not required, "
                      f"the run goes on", file=sys.stderr, flush=True)
            self.returncodes[i] = rc
        for i, rc, how in restarts:
            try:
                self._restart(i)
            except (ray.exceptions.RayError, TimeoutError) as e:  # e.g. its node is gone and its bundle with it
                print(f"could not restart '{self.specs[i].name}': {type(e).__name__}: {e}; the run goes on without it",
                      file=sys.stderr, flush=True)
                self._tell_coordinator(P.WorkerExited(worker=self.specs[i].name, pid=self.pids[i],
                                                      reason=f"{how}; its restart failed", restarting=False))
                self.returncodes[i] = rc

    def _tell_coordinator(self, msg: P.Message, *, quiet: bool = False) -> None:
        """Send `msg` to the coordinator (waiting at most 1 s while it is unreachable, e.g. as the run ends)."""
        if self._link is None:
            return
        try:
            P.send_msg(self._link, msg)
        except zmq.ZMQError as e:  # the coordinator still learns a death from the heartbeats
            if not quiet:
                print(f"could not tell the coordinator {msg}: {e}", file=sys.stderr, flush=True)

    def _restart(self, i: int) -> None:
        """Start process `i` again in its bundle: by its host, or by a new one if Ray says it is gone."""
        spec, p = self.specs[i], self.cfg.placement
        self.previous_pids[i].append(self.pids[i])
        self.restarts[i] += 1
        try:
            ray.get(self.hosts[i].where.remote(), timeout=p.startup_timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            try:
                ray.kill(self.hosts[i], no_restart=True)
            except Exception:  # already gone
                pass
            self.hosts[i] = self._new_host(i, spec.name)
            self.where[i] = ray.get(self.hosts[i].where.remote(), timeout=p.startup_timeout_s)
            self.shared_logs[i] = ray.get(self.hosts[i].sees.remote(str(self._marker), self.run_id))
        cmd, env = self.commands[i]
        pid, _ = ray.get(self.hosts[i].start.remote(cmd, env, self._secret_env, str(self.log_dir / f"{spec.name}.log"),
                                                    niceness=self._niceness, append=True),
                         timeout=p.startup_timeout_s)
        self.pids[i] = pid
        self._write_placement(announce=False)

    def _signal_all(self, sig: int) -> None:
        for i, host in enumerate(self.hosts):
            if self.returncodes and self.returncodes[i] is None:
                host.send_signal.remote(sig)

    def wait(self) -> LaunchResult:
        status: Literal["completed", "failed", "interrupted"] | None = None
        failed: int | None = None
        deadline: float | None = None
        while True:
            self._poll()
            running = [rc is None for rc in self.returncodes]
            if status is None:
                failed = next((i for i, (s, rc) in enumerate(zip(self.specs, self.returncodes))
                               if s.required and rc not in (None, 0)), None)
                if self._signal is not None:
                    status = "interrupted"
                elif failed is not None:
                    status = "failed"
                elif any(s.ends_run and rc == 0 for s, rc in zip(self.specs, self.returncodes)) or not any(running):
                    status = "completed"
                if status is not None:
                    self._stopping = True
                    self.stopped = list(running)
                    deadline = time.monotonic() + self.cfg.placement.grace_period_s
                    self._signal_all(self._signal or signal.SIGTERM)
            elif any(running) and (self._signal_count > 1 or time.monotonic() >= deadline):
                self._signal_all(signal.SIGKILL)
            if status is not None and not any(running):
                return self._result(status, failed)
            time.sleep(self._poll_interval_s)

    def _result(self, status: Literal["completed", "failed", "interrupted"], failed: int | None) -> LaunchResult:
        processes = [ProcessResult(name=s.name, pid=pid, returncode=rc, log_path=self.log_dir / f"{s.name}.log",
                                   stopped_by_launcher=stopped)
                     for s, pid, rc, stopped in zip(self.specs, self.pids, self.returncodes, self.stopped)]
        failed_result = processes[failed] if failed is not None else None
        return LaunchResult(status=status, processes=processes, failed=failed_result,
                            failed_log_tail=tail_lines(failed_result.log_path, 20) if failed_result else [],
                            signal=self._signal if status == "interrupted" else None)

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        self._signal = sig
        self._signal_count += 1

    # -- the end ------------------------------------------------------------------------------------
    def collect_logs(self) -> list[str]:
        """Copy the logs of processes on nodes that do not share the output dir into the driver's log dir."""
        collected = []
        for i, (spec, host) in enumerate(zip(self.specs, self.hosts)):
            if i >= len(self.shared_logs) or self.shared_logs[i]:
                continue
            path, offset = self.log_dir / f"{spec.name}.log", 0
            try:
                with open(path, "wb") as f:
                    while chunk := ray.get(host.read_log.remote(offset), timeout=60):
                        f.write(chunk)
                        offset += len(chunk)
                collected.append(spec.name)
            except (ray.exceptions.RayError, OSError) as e:
                print(f"could not collect the log of {spec.name} from {self.where[i]['node_ip']}: {e}",
                      file=sys.stderr, flush=True)
        if collected:
            print(f"collected the logs of {', '.join(collected)} (their nodes do not share {self.log_dir}) into "
                  f"{self.log_dir}", flush=True)
        return collected

    def close(self) -> None:
        """Stop whatever still runs, remove the run's regions on every node, the actors and the group."""
        try:
            if self._link is not None:
                self._link.close()
                self._link = None
            if self.hosts and any(rc is None for rc in self.returncodes):
                self._signal_all(signal.SIGKILL)
                deadline = time.monotonic() + 10  # their logs are complete once they have ended
                while time.monotonic() < deadline and any(rc is None for rc in self.returncodes):
                    self._poll()
                    time.sleep(0.1)
            self.collect_logs()
            swept = {}
            for host, where in zip(self.hosts, self.where):
                swept.setdefault(where["node_id"], host)
            refs = [host.sweep.remote(self.run_id) for host in swept.values()]
            for ref in refs:
                try:
                    if removed := ray.get(ref, timeout=30):
                        print(f"removed {len(removed)} shared-memory region(s) the run's processes left behind: "
                              f"{', '.join(removed)}", file=sys.stderr, flush=True)
                except (ray.exceptions.RayError, TimeoutError):
                    pass
            for host in self.hosts:
                ray.kill(host, no_restart=True)  # its child, if any still ran, dies with it
            if self._pg is not None:
                remove_placement_group(self._pg)
            self._marker.unlink(missing_ok=True)
        finally:
            if self._connected_here:
                ray.shutdown()  # a private instance (ray.address=null) stops with it

    def run(self) -> LaunchResult:
        """start(), then wait() with SIGINT/SIGTERM turned into a stop of the run (main thread only)."""
        install = threading.current_thread() is threading.main_thread()
        previous = {}
        try:
            self._connect()  # first: ray.init installs signal handlers of its own, which ours replace
            if install:
                previous = {s: signal.signal(s, lambda signum, frame: self.request_stop(signum))
                            for s in (signal.SIGINT, signal.SIGTERM)}
            self.start()
            return self.wait()
        finally:
            try:
                self.close()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)


def launch_on_ray(cfg, config_path: str, *, run_id: str, log_dir: str, auth: RunAuth,
                  edit_specs: Callable[[list[ProcessSpec]], list[ProcessSpec]] | None = None,
                  echo_stream: IO[bytes] | None = None) -> LaunchResult:
    """Place and start the run's processes on Ray, wait for the run to end, leave nothing behind."""
    return RayLauncher(cfg, config_path, run_id=run_id, log_dir=log_dir, auth=auth, edit_specs=edit_specs,
                       echo_stream=echo_stream).run()
