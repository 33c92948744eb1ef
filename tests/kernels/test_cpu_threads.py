"""Thread count and OpenMP wait policy on a loaded machine (`rl_engine.kernels.cpu.threads`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rl_engine.kernels.cpu import threads


class FakeMachine:
    """/proc/stat busy ticks and this process's CPU seconds, advanced by hand (100 ticks a second)."""

    def __init__(self, monkeypatch, *, cpus: int) -> None:
        self.now, self.busy, self.own = 1000.0, 0, 0.0
        monkeypatch.setattr(threads, "_read_proc_stat", lambda: (self.busy, 0))
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(threads.os, "times", lambda: os.times_result((self.own, 0.0, 0.0, 0.0, 0.0)))
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
        monkeypatch.setattr(threads.os, "getpriority", lambda which, who: 0)

    def run(self, seconds: float, *, others: float, ours: float) -> None:
        """`others` and `ours`: cores kept busy by other processes and by this one."""
        self.now += seconds
        self.own += ours * seconds
        self.busy += round((others + ours) * seconds * 100)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_the_cores_other_processes_leave_free(monkeypatch, restore_threads):
    machine = FakeMachine(monkeypatch, cpus=2)
    torch.set_num_threads(2)
    governor = threads.FreeCoreThreads(interval=0.5)
    assert governor.enabled and governor.max_threads == 2
    machine.run(0.6, others=0.0, ours=2.0)  # quiet: we use both cores
    assert governor.poll() == 2 and torch.get_num_threads() == 2
    machine.run(0.6, others=1.0, ours=1.0)  # a busy process takes a core
    assert governor.poll() == 1 and torch.get_num_threads() == 1
    machine.run(0.1, others=0.0, ours=1.0)  # within the interval: no new measurement
    assert governor.poll() == 1
    machine.run(0.6, others=0.1, ours=1.0)  # it is gone again
    assert governor.poll() == 2 and torch.get_num_threads() == 2
    assert governor.changes == 2


def test_one_thread_is_the_floor_and_the_start_count_the_ceiling(monkeypatch, restore_threads):
    machine = FakeMachine(monkeypatch, cpus=4)
    torch.set_num_threads(2)
    governor = threads.FreeCoreThreads(interval=0.5)
    machine.run(0.6, others=4.0, ours=0.0)
    assert governor.poll() == 1
    machine.run(0.6, others=0.0, ours=1.0)  # 4 free cores, but never more than the 2 at start
    assert governor.poll() == 2
    torch.set_num_threads(1)
    assert not threads.FreeCoreThreads().enabled  # one thread: nothing to adapt


def _gomp_spin_count(env: dict[str, str]) -> str:
    """GOMP_SPINCOUNT as libgomp (torch's OpenMP runtime) reports it when torch loads."""
    env = {**env, "OMP_DISPLAY_ENV": "VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", "import torch; torch.ones(4).sum()"], env=env,
                          capture_output=True, text=True, timeout=600)
    for line in proc.stderr.splitlines():
        if "GOMP_SPINCOUNT" in line:
            return line.split("=")[1].strip().strip("'")
    pytest.skip("torch's OpenMP runtime does not report GOMP_SPINCOUNT (not GNU libgomp)")


def test_passive_wait_env_stops_the_spinning_of_torchs_openmp_runtime():
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert _gomp_spin_count(threads.passive_wait_env(base)) == "0"
    assert int(_gomp_spin_count(base)) > 0  # the default spins before sleeping


def test_a_small_models_small_step_runs_on_one_thread_and_the_count_comes_back(restore_threads):
    torch.set_num_threads(2)
    small = dict(model_bytes=threads.SMALL_MODEL_BYTES // 2)
    with threads.single_thread_below(threads.SMALL_STEP_FLOPS / 2, **small) as switched:
        assert switched and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):  # restored on an error too
        with threads.single_thread_below(1.0, **small):
            raise RuntimeError("step failed")
    assert torch.get_num_threads() == 2
    # a big step, or a model past the size bound (its batch-1 step is memory-bound), keeps its threads
    for flops, model_bytes in ((threads.SMALL_STEP_FLOPS, small["model_bytes"]), (1.0, threads.SMALL_MODEL_BYTES)):
        with threads.single_thread_below(flops, model_bytes=model_bytes) as switched:
            assert not switched and torch.get_num_threads() == 2
