"""Run the actors of one training run as processes on this machine, and never leave one behind.

`launch(specs, log_dir=...)` starts the coordinator, trainer ranks and rollout workers, waits, and
stops them all when one fails (unless it is marked `required=False`), when the run ends, or on
Ctrl-C / SIGTERM (the signal is forwarded, then SIGKILL after a grace period); it returns a
`LaunchResult` naming the failed process, its exit code and the last lines of its log.

Design choice: every child is a fresh interpreter started with `subprocess.Popen([python, -m,
rl_engine.launch.child, MODULE, ...])`, not `multiprocessing` spawn. That gives one plain exit code
per process, a log file that also catches C-level output (NCCL, gloo, segfault dumps) because it is
the child's fd 1 and 2, no pickling of entry points, each child in its own session (so a killpg
also reaches whatever it started, and a terminal's Ctrl-C reaches only the launcher, which decides),
and the same command a user can run by hand. `rl_engine.launch.child` arms PR_SET_PDEATHSIG so
children die even if the launcher is SIGKILLed. Linux delivers that signal when the *thread* that
started the child exits: call `start()`/`launch()` from a thread that outlives the run (the main one).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Mapping, Sequence

from rl_engine.launch.ports import MASTER_LISTEN_FD_ENV, listen, port_of

# Read by rl_engine.launch.child (which must not be imported here: it runs as `-m` __main__).
LAUNCHER_PID_ENV = "RL_ENGINE_LAUNCHER_PID"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", MASTER_LISTEN_FD_ENV)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (another process may still take it before it is bound: for a port a
    process of ours serves, bind first with `rl_engine.launch.ports.listen` and pass the socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True, kw_only=True)
class ProcessSpec:
    """One process: `python -m module *args` with its log in `<log_dir>/<name>.log`."""

    name: str
    module: str
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # applied last: wins over everything
    dist_rank: int | None = None  # torch.distributed rank: sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    ends_run: bool = False  # its exit with code 0 ends the run: the other processes are stopped
    # False: its failure does not stop the run (noted on stderr), e.g. a rollout worker whose prompts
    # the coordinator requeues on the others.
    required: bool = True
    echo: bool = False  # also copy its output to the launcher's stdout (progress display)
    # Listening sockets (fds of the launching process) the child inherits under the same numbers and serves
    # (see rl_engine.launch.ports); the launcher closes its copies once the child is started.
    pass_fds: Sequence[int] = ()
    # Rank 0 only: serve the ranks' store from the socket the launcher bound to MASTER_PORT (inherited, its
    # fd in RL_ENGINE_MASTER_LISTEN_FD; rl_engine.launch.rendezvous adopts it). False: the launcher lets
    # the port go just before the start and rank 0 binds it itself (a child on init_method="env://").
    master_socket: bool = False


@dataclass(kw_only=True)
class ProcessResult:
    name: str
    pid: int
    returncode: int | None  # negative: killed by that signal
    log_path: Path
    stopped_by_launcher: bool  # still running when the launcher began stopping the run

    def describe(self) -> str:
        rc = self.returncode
        if rc is None:
            return "still running"
        how = f"exited with code {rc}" if rc >= 0 else f"killed by {_signal_name(-rc)}"
        return f"{how} (stopped by the launcher)" if self.stopped_by_launcher else how


@dataclass(kw_only=True)
class LaunchResult:
    status: Literal["completed", "failed", "interrupted"]
    processes: list[ProcessResult]
    failed: ProcessResult | None = None  # the first process that exited non-zero on its own
    failed_log_tail: list[str] = field(default_factory=list)
    signal: int | None = None  # the signal that interrupted the run

    @property
    def exit_code(self) -> int:
        """Shell-style: 0, the failed process's code (128 + signal if it was killed), or 128 + the
        interrupting signal."""
        if self.status == "completed":
            return 0
        if self.status == "interrupted":
            return 128 + (self.signal or signal.SIGINT)
        rc = self.failed.returncode if self.failed and self.failed.returncode is not None else 1
        return rc if rc > 0 else 128 - rc

    def summary(self) -> str:
        if self.status == "completed":
            head = f"run completed: {len(self.processes)} processes finished"
        elif self.status == "interrupted":
            head = f"run interrupted by {_signal_name(self.signal or signal.SIGINT)}: all processes stopped"
        else:
            assert self.failed is not None
            head = f"run failed: process '{self.failed.name}' (pid {self.failed.pid}) {self.failed.describe()}"
        lines = [head]
        lines += [f"  {p.name} (pid {p.pid}): {p.describe()}; log {p.log_path}" for p in self.processes]
        if self.failed is not None:
            lines.append(f"--- last {len(self.failed_log_tail)} lines of {self.failed.log_path} ---")
            lines += self.failed_log_tail
        return "\n".join(lines)


def tail_lines(path: Path, num_lines: int, *, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `num_lines` lines of a log file (reading at most its last `max_bytes`)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-num_lines:]


class _Child:
    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen, log_path: Path, tee: threading.Thread | None):
        self.spec, self.popen, self.log_path, self.tee = spec, popen, log_path, tee
        self.stopped_by_launcher = False

    @property
    def running(self) -> bool:
        return self.popen.returncode is None


class LocalLauncher:
    """Starts `specs` as process-group leaders; `run()` waits with signal forwarding and stops all
    of them on the way out. Use as a context manager (or `run()`) so that an exception in the
    caller also stops the children."""

    def __init__(self, specs: Sequence[ProcessSpec], *, log_dir: str | Path, grace_period_s: float = 10.0,
                 env: Mapping[str, str] | None = None, master_port: int | None = None,
                 python: str = sys.executable, num_tail_lines: int = 20, poll_interval_s: float = 0.05,
                 echo_stream: IO[bytes] | None = None) -> None:
        names = [s.name for s in specs]
        for name in names:
            if not _NAME.match(name):
                raise ValueError(f"process name {name!r} must match {_NAME.pattern} (it names the log file)")
        if len(set(names)) != len(names):
            raise ValueError(f"process names must be unique, got {names}")
        ranks = sorted(s.dist_rank for s in specs if s.dist_rank is not None)
        if ranks != list(range(len(ranks))):
            raise ValueError(f"dist_rank values must be 0..{len(ranks) - 1} once each, got {ranks}")
        if bad := [s.name for s in specs if s.master_socket and s.dist_rank != 0]:
            raise ValueError(f"master_socket=True is for the process with dist_rank 0, not {bad}")
        if grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {grace_period_s}")
        self.specs = list(specs)
        self.log_dir = Path(log_dir)
        self.grace_period_s = grace_period_s
        self.world_size = len(ranks)
        # Bound here, before the port is published to the ranks, and handed to rank 0 (rendezvous.py).
        self._master_listener = listen("127.0.0.1", master_port or 0) if ranks else None
        self.master_port = port_of(self._master_listener) if self._master_listener is not None else None
        self._hand_master = any(s.master_socket for s in specs)
        self._env = dict(env or {})
        self._python = python
        self._num_tail_lines = num_tail_lines
        self._poll_interval_s = poll_interval_s
        self._echo_stream = echo_stream
        self._children: list[_Child] = []
        self._signal: int | None = None  # set by the signal handler
        self._signal_count = 0
        self._stop_deadline: float | None = None
        self._status: Literal["completed", "failed", "interrupted"] | None = None
        self._failed: _Child | None = None

    # -- starting --------------------------------------------------------------------------------
    def child_env(self, spec: ProcessSpec) -> dict[str, str]:
        env = {**os.environ, **self._env, "PYTHONUNBUFFERED": "1", LAUNCHER_PID_ENV: str(os.getpid()),
               "RL_ENGINE_PROCESS_NAME": spec.name}
        for key in _DIST_ENV:  # only ranks see them: a stale RANK (launcher run under torchrun) misleads
            env.pop(key, None)
        if spec.dist_rank is not None:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.master_port), RANK=str(spec.dist_rank),
                       LOCAL_RANK=str(spec.dist_rank), WORLD_SIZE=str(self.world_size),
                       LOCAL_WORLD_SIZE=str(self.world_size))
            if spec.master_socket and self._master_listener is not None:
                env[MASTER_LISTEN_FD_ENV] = str(self._master_listener.fileno())
        env.update(spec.env)
        return env

    def start(self) -> None:
        if self._children:
            raise RuntimeError("LocalLauncher.start() was already called")
        if not self._hand_master and self._master_listener is not None:
            # Rank 0 binds the port itself: the pick-then-bind window the socket hand-off closes stays open.
            self._master_listener.close()
            self._master_listener = None
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for spec in self.specs:
                self._children.append(self._start_one(spec))
        except BaseException:
            self._kill_all(signal.SIGKILL)
            self._wait_all()
            raise
        finally:  # the children hold the listening sockets now (or the run did not start)
            self._close_listeners()

    def _close_listeners(self) -> None:
        if self._master_listener is not None:
            self._master_listener.close()
            self._master_listener = None
        for spec in self.specs:
            for fd in spec.pass_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _start_one(self, spec: ProcessSpec) -> _Child:
        log_path = self.log_dir / f"{spec.name}.log"
        cmd = [self._python, "-m", "rl_engine.launch.child", spec.module, *spec.args]
        pass_fds = [*spec.pass_fds]
        if spec.master_socket and self._master_listener is not None:
            pass_fds.append(self._master_listener.fileno())
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if spec.echo else log,
                                     stderr=subprocess.STDOUT, env=self.child_env(spec), start_new_session=True,
                                     pass_fds=pass_fds)
        tee = None
        if spec.echo:
            tee = threading.Thread(target=self._tee, args=(popen.stdout, log_path), daemon=True,
                                   name=f"tee-{spec.name}")
            tee.start()
        return _Child(spec, popen, log_path, tee)

    def _tee(self, pipe: IO[bytes], log_path: Path) -> None:
        out = self._echo_stream or sys.stdout.buffer
        with open(log_path, "ab") as log, pipe:
            while chunk := os.read(pipe.fileno(), 65536):
                log.write(chunk)
                log.flush()
                try:
                    out.write(chunk)
                    out.flush()
                except (OSError, ValueError):  # the console went away; keep the log going
                    pass

    # -- watching ---------------------------------------------------------------------------------
    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the wait loop to stop the run (safe from a signal handler); a second request kills."""
        self._signal = sig
        self._signal_count += 1

    def _handle_signal(self, signum: int, frame: object) -> None:
        self.request_stop(signum)

    def poll(self) -> LaunchResult | None:
        """One step of the wait loop: reap children, begin or escalate a stop; the result once all
        children have exited."""
        for child in self._children:
            if child.running:
                self._reap(child)
        if self._status is None:
            if self._signal is not None:
                self._begin_stop("interrupted", self._signal)
            elif failed := next((c for c in self._children if c.spec.required and c.popen.returncode not in (None, 0)),
                                None):
                self._failed = failed
                self._begin_stop("failed", signal.SIGTERM)
            elif any(c.spec.ends_run and c.popen.returncode == 0 for c in self._children):
                self._begin_stop("completed", signal.SIGTERM)
            elif all(not c.running for c in self._children):
                self._status = "completed"
        elif any(c.running for c in self._children):
            assert self._stop_deadline is not None
            if self._signal_count > 1 or time.monotonic() >= self._stop_deadline:
                self._kill_all(signal.SIGKILL)
        if any(c.running for c in self._children) or self._status is None:
            return None
        for child in self._children:
            if child.tee is not None:
                child.tee.join(timeout=5)
        return self._result()

    def _reap(self, child: _Child) -> None:
        self._reap_one(child)
        rc = child.popen.returncode
        if rc not in (None, 0) and not child.spec.required and self._status is None:
            how = f"exited with code {rc}" if rc > 0 else f"was killed by {_signal_name(-rc)}"
            print(f"process '{child.spec.name}' (pid {child.popen.pid}) {how}; it is not required, the run goes on "
                  f"(log {child.log_path})", file=sys.stderr, flush=True)

    def _reap_one(self, child: _Child) -> None:
        pid = child.popen.pid
        if hasattr(os, "waitid"):
            # Detect the exit without reaping: while the leader is a zombie its pid (= the group id)
            # cannot be reused, so the group sweep below cannot hit an unrelated process group.
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    return
            except ChildProcessError:  # already reaped elsewhere: too late for a safe sweep
                child.popen.poll()
                return
            _killpg(pid, signal.SIGKILL)  # whatever the exited child left behind in its group
            child.popen.poll()
        elif child.popen.poll() is not None:
            _killpg(pid, signal.SIGKILL)

    def _begin_stop(self, status: Literal["completed", "failed", "interrupted"], sig: int) -> None:
        self._status = status
        self._stop_deadline = time.monotonic() + self.grace_period_s
        for child in self._children:
            if child.running:
                child.stopped_by_launcher = True
        self._kill_all(sig)

    def _kill_all(self, sig: int) -> None:
        for child in self._children:
            if child.running:
                _killpg(child.popen.pid, sig)

    def _wait_all(self) -> None:
        for child in self._children:
            child.popen.wait()

    def _result(self) -> LaunchResult:
        assert self._status is not None
        processes = [ProcessResult(name=c.spec.name, pid=c.popen.pid, returncode=c.popen.returncode,
                                   log_path=c.log_path, stopped_by_launcher=c.stopped_by_launcher)
                     for c in self._children]
        failed = next((p for p, c in zip(processes, self._children) if c is self._failed), None)
        return LaunchResult(status=self._status, processes=processes, failed=failed,
                            failed_log_tail=tail_lines(failed.log_path, self._num_tail_lines) if failed else [],
                            signal=self._signal if self._status == "interrupted" else None)

    def wait(self) -> LaunchResult:
        while (result := self.poll()) is None:
            time.sleep(self._poll_interval_s)
        return result

    def stop(self) -> None:
        """Stop every child now (SIGTERM, SIGKILL after the grace period) and reap them."""
        if self._status is None:
            self._signal = signal.SIGTERM
            self._begin_stop("interrupted", signal.SIGTERM)
        self.wait()

    def run(self, *, handle_signals: bool = True) -> LaunchResult:
        """start(), then wait() with SIGINT/SIGTERM forwarded to the children (main thread only)."""
        install = handle_signals and threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)} if install else {}
        try:
            self.start()
            return self.wait()
        finally:
            if any(c.running for c in self._children):
                self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def __enter__(self) -> LocalLauncher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if any(c.running for c in self._children):
            self.stop()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def launch(specs: Sequence[ProcessSpec], *, log_dir: str | Path, **kwargs: object) -> LaunchResult:
    """Start `specs`, wait for the run to end, stop everything; see `LocalLauncher` for kwargs."""
    return LocalLauncher(specs, log_dir=log_dir, **kwargs).run()  # type: ignore[arg-type]
