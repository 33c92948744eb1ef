"""No shared-memory staging region of a run is left in /dev/shm once the run is over (issue 13), at toy
scale with real processes and the shared-memory weight transport: after a rollout worker is SIGKILLed
mid-run (the launcher sweeps what it left), after `rl-engine train` gets SIGTERM (the launcher forwards
it and the worker unlinks its regions on the way out), and after a run that fails (a required process
exits with an error: the others are stopped with SIGTERM).

Every region of a run carries its run id in its name (`rl_wsync_<pid>_<run>_...`); each test watches
/dev/shm for the run's names while it runs, so it also checks that the regions existed."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from rl_actor_helpers import HERE, child_pythonpath, rows, toy_config
from rl_engine.actors.run import ActorsFailed, run_actors
from rl_engine.config import to_dict
from rl_engine.launch import ProcessSpec
from rl_engine.weight_sync.staging import PREFIX, RUN_ID_ENV

SHM = "/dev/shm"
DISAGGREGATED_SHM = ["placement.mode=disaggregated", "placement.weight_transport=shm"]


def regions_of_run(run_id: str) -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(PREFIX) and f"_{run_id}_" in n}


class RegionWatch:
    """Records the names of a run's regions seen in /dev/shm while the run goes."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self, run_id: str) -> None:
        self.run_id = run_id
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.seen |= regions_of_run(self.run_id)

    def stop(self) -> set[str]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.seen


def run_watched(out, monkeypatch, *overrides, edit_specs=None) -> tuple[RegionWatch, dict | ActorsFailed]:
    """run_actors with the run's regions watched; returns the watch and the summary (or the failure)."""
    child_pythonpath(monkeypatch)
    watch = RegionWatch()

    def edit(specs: list[ProcessSpec]) -> list[ProcessSpec]:
        watch.start(specs[0].env[RUN_ID_ENV])  # the run id every process of the run gets
        return edit_specs(specs) if edit_specs else specs

    try:
        result = run_actors(toy_config(out, *DISAGGREGATED_SHM, *overrides), edit_specs=edit, echo_stream=io.BytesIO())
    except ActorsFailed as e:
        result = e
    finally:
        watch.stop()
    return watch, result


def pids(names: set[str]) -> set[int]:
    return {int(n[len(PREFIX):].split("_", 1)[0]) for n in names}


def test_a_worker_sigkilled_mid_run_leaves_no_region(tmp_path, monkeypatch, capsys):
    """rollout-1 SIGKILLs itself with requests in flight: it cannot unlink its regions; the run goes on
    with rollout-0 and, once every process has ended, the launcher removes the dead worker's regions.
    It dies on its 8th request, the last of step 1's 4 (after 4 eval prompts): both batches go out at
    once to idle workers and are split 4 and 4 in every run, while how many later requests it gets
    depends on the workers' relative speed (with 11, a slow rollout-1 could see the run end alive).
    Step 1's weight update waits for its answer until it is declared dead, so the death is always seen;
    its regions exist from its start (the receiver allocates them when it is built)."""
    def inject(specs):
        return [dataclasses.replace(s, args=[*s.args, "--die-after-requests", "8"]) if s.name == "rollout-1" else s
                for s in specs]

    watch, summary = run_watched(tmp_path, monkeypatch, "placement.num_rollout_workers=2",
                                 "placement.heartbeat_timeout_s=3", "rollout.mode=async", "rollout.max_new_tokens=12",
                                 "rollout.max_staleness=1", "train.steps=3", edit_specs=inject)
    assert isinstance(summary, dict), summary
    assert summary["worker_deaths"] == 1 and rows(tmp_path)[-1]["workers/alive"] == 1
    assert len(pids(watch.seen)) == 2, watch.seen  # both workers staged in /dev/shm
    assert regions_of_run(watch.run_id) == set()
    # rollout-0 unlinked its own on shutdown; the launcher swept the two the killed worker left, unless a
    # staging made meanwhile on this host (another test's) swept them first as a dead process's.
    killed = pids(watch.seen) - {json.loads((tmp_path / "actors.json").read_text())["actors"]["rollout-0"]["pid"]}
    swept = {name for line in capsys.readouterr().err.splitlines() if "left behind: " in line
             for name in line.split("left behind: ", 1)[1].split(", ")}
    assert len(killed) == 1 and pids(swept) <= killed and swept <= watch.seen, (killed, swept)


def test_a_failed_run_leaves_no_region(tmp_path, monkeypatch):
    """A required process fails mid-run: the launcher stops the rest with SIGTERM and raises."""
    def inject(specs):
        return [*specs, ProcessSpec(name="saboteur", module="shm_saboteur", args=[str(tmp_path)])]

    watch, failure = run_watched(tmp_path, monkeypatch, "train.steps=50", edit_specs=inject)
    assert isinstance(failure, ActorsFailed) and failure.result.failed.name == "saboteur", failure
    assert len(rows(tmp_path)) < 50  # it failed mid-run
    assert watch.seen and regions_of_run(watch.run_id) == set()


def test_sigterm_of_rl_engine_train_leaves_no_region(tmp_path):
    """`rl-engine train` (disaggregated, shared memory) gets SIGTERM mid-run: it forwards it to its
    processes and exits non-zero; the worker unlinks its regions itself on the way out."""
    config = tmp_path / "run.yaml"
    # A long grace period: the worker is never SIGKILLed before it has had time to clean up.
    config.write_text(yaml.safe_dump(to_dict(toy_config(tmp_path, *DISAGGREGATED_SHM, "train.steps=50",
                                                        "placement.grace_period_s=20"))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "rl_engine.cli", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    metrics, actors = tmp_path / "metrics.jsonl", tmp_path / "actors.json"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.stat().st_size > 0 and actors.exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run wrote no metrics"
            time.sleep(0.02)
        worker_pid = json.loads(actors.read_text())["actors"]["rollout-0"]["pid"]
        mine = [n for n in os.listdir(SHM) if n.startswith(f"{PREFIX}{worker_pid}_")]
        assert len(mine) == 2, mine  # the worker's two staging regions
        run_id = mine[0][len(PREFIX):].split("_")[1]
        proc.send_signal(signal.SIGTERM)  # the launcher only: it forwards the signal to the run's processes
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, err.decode()[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
    assert regions_of_run(run_id) == set()
    assert b"left behind" not in err  # the worker removed its own: nothing to sweep
