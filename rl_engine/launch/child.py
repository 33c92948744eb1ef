"""Entry point of every process the local launcher starts: `python -m rl_engine.launch.child MODULE ARGS`.

It ties the process's life to the launcher's and then runs MODULE as `__main__` (as `python -m`
would). The main design choice: the death signal is armed here, in the child's own interpreter,
instead of in a `Popen(preexec_fn=...)` hook, because preexec_fn is unsafe once the launcher has
threads (log tees, heartbeats). On Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)` makes the kernel kill
the child when the launcher dies, even by SIGKILL; elsewhere a watchdog thread polls the parent pid
and kills the child's process group. The race where the launcher dies before the signal is armed
is closed by comparing `getppid()` with the launcher pid passed in the environment.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time

from rl_engine.launch.local import LAUNCHER_PID_ENV

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent (thread) exits. False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die() -> None:
    # Take down our process group too (processes this child started) when we lead it, which the
    # launcher arranges with start_new_session; never kill a group we merely belong to (a shell's).
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os._exit(1)


def start_parent_watchdog(parent_pid: int, *, interval_s: float = 0.5) -> threading.Thread:
    """A daemon thread that kills this process (and its group) once `parent_pid` is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        _die()

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def die_with_parent(parent_pid: int | None = None, *, use_prctl: bool = True) -> str:
    """Make this process die when `parent_pid` (default: the current parent) dies.
    Returns the mechanism used: "prctl" or "watchdog". Processes a launched child starts itself
    (reward pools, ...) can call this in their initializer to get the same guarantee."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    armed = use_prctl and set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        _die()
    if armed:
        return "prctl"
    start_parent_watchdog(parent_pid)
    return "watchdog"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m rl_engine.launch.child MODULE [ARGS...]")
    parent = os.environ.get(LAUNCHER_PID_ENV)
    die_with_parent(int(parent) if parent else None)
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
