"""`rl-engine train CONFIG`: the example configs, errors caught before anything starts, and a
multi-process run (warm start first, then the actors, progress on stdout) stopped by Ctrl-C with
every process gone (no orphans)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rl_actor_helpers import HERE, TOY
from rl_engine.cli import main

ROOT = os.path.dirname(os.path.dirname(HERE))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("name", "mode"), [("colocated_tp2", "colocated"), ("disaggregated", "disaggregated"),
                                            ("gsm8k", "colocated")])
def test_example_configs_print(name, mode, capsys):
    assert main(["train", os.path.join(ROOT, "examples", f"{name}.yaml"), "--print-config"]) == 0
    assert f"mode: {mode}" in capsys.readouterr().out


def test_layout_errors_stop_before_any_process_starts(tmp_path, capsys):
    rc = main(["train", f"train.output_dir={tmp_path}", "placement.mode=colocated", "train.tp=3", *TOY])
    assert rc == 2
    assert "num_attention_heads (4) must be divisible by tp (3)" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes through /proc")
def test_ctrl_c_stops_every_actor(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "rl_engine.cli", "train", *TOY, "train.steps=100000", f"train.output_dir={tmp_path}",
           "placement.mode=colocated", "train.tp=2", "warmup.steps=3", "warmup.batch_size=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        seen = []
        for line in proc.stdout:  # progress from the coordinator, echoed by the launcher
            seen.append(line)
            if line.startswith("step 2/100000"):
                break
        assert seen and seen[-1].startswith("step 2/"), "".join(seen[-20:])
        # the warm start ran first, in the launching process; the actors load its weights
        assert any(line.startswith("warm start done") for line in seen)
        assert f"path: {tmp_path / 'warm_start_model'}" in (tmp_path / "actors" / "config.yaml").read_text()
        actors = json.loads((tmp_path / "actors.json").read_text())
        ranks = [int(p) for p in actors["actors"]["trainer"]["rank_pids"].split(",")]
        pids = [actors["coordinator_pid"], *ranks]
        assert len(pids) == 3 and ranks[0] == actors["actors"]["trainer"]["pid"] and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 128 + signal.SIGINT, rest
        assert "run interrupted by SIGINT" in rest
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
