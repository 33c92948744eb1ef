"""Single-process checkpoints and resume (`rl-engine train` with placement.mode=single_process):
same-seed runs write byte-identical metrics, a run SIGKILLed at a random point and resumed with
train.resume=auto reproduces the uninterrupted run bit for bit, a checkpoint written but never
committed is ignored, and resume targets that cannot be continued are refused by name."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from rl_actor_helpers import crash_before_commit
from safetensors.torch import load_file

from rl_engine import run_checkpoint
from rl_engine.cli import main
from rl_engine.config import load_config
from rl_engine.train_cli import run
from rl_engine.train_config import RLConfig
from rl_engine.trainer import ResumeError, check_resume_config

HERE = os.path.dirname(os.path.abspath(__file__))
# has_vowel pays a random policy about a third of the time: advantages and losses are non-zero.
TOY = ["warmup.steps=5", "warmup.batch_size=4", "data.num_eval=8", "rollout.prompts_per_step=4", "rollout.n=4",
       "rollout.max_new_tokens=8", "reward.name=rl_test_rewards:has_vowel", "reward.num_workers=0",
       "train.threads=1"]


def toy_run(output_dir, *overrides: str) -> dict:
    return run(load_config(RLConfig, None, [*TOY, f"train.output_dir={output_dir}", *overrides]))


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "final_model", "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_same_seed_runs_write_identical_metrics(tmp_path):
    toy_run(tmp_path / "a", "train.steps=4", "train.eval_every=2")
    toy_run(tmp_path / "b", "train.steps=4", "train.eval_every=2", "train.deterministic=true")
    toy_run(tmp_path / "c", "train.steps=4", "train.eval_every=2", "train.seed=1")
    a, b, c = ((tmp_path / d / "metrics.jsonl").read_bytes() for d in "abc")
    rows = [json.loads(line) for line in a.splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval/accuracy" in rows[1]
    assert any(r["train/loss"] != 0 for r in rows)
    # On CPU with a fixed thread count the run is already bitwise repeatable; the flag changes nothing.
    assert a == b
    assert a != c
    assert not torch.are_deterministic_algorithms_enabled()  # the trainer restores the global flag


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and fsync semantics")
def test_sigkill_at_random_point_then_resume_reproduces_the_run(tmp_path):
    steps = 12
    config = ["train.checkpoint_every=1", "train.eval_every=3", "train.keep_checkpoints=2", "rollout.max_new_tokens=12"]
    reference = toy_run(tmp_path / "ref", f"train.steps={steps}", *config)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rl_engine.cli", "train", *TOY, f"train.steps={steps}", *config,
           f"train.output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(8)
    # After the commit of a random step, a random delay of up to about one step (0.1-0.2 s here): the
    # kill lands in a rollout, a training step, after a metrics row or inside a checkpoint's writes.
    kill_after, delay = rng.randint(1, steps - 6), rng.uniform(0.0, 0.2)
    pointer = out / "checkpoints" / "latest.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(pointer.read_text())["step"] >= kill_after:
                    break
            except (FileNotFoundError, ValueError):  # not yet written (the rename makes it whole)
                pass
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{log}"
    committed = json.loads(pointer.read_text())["step"]
    assert kill_after <= committed < steps

    resumed = subprocess.run([*cmd, "train.resume=auto"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {run_checkpoint.step_dir(str(out), committed)} (step {committed} of {steps})" \
        in resumed.stdout
    assert "warm start" not in resumed.stdout  # the weights came from the checkpoint
    summary = json.loads(resumed.stdout[resumed.stdout.index("\n{") + 1:])
    assert summary["resumed_from_step"] == committed
    assert summary["eval_accuracy_before"] == reference["eval_accuracy_before"]
    assert (out / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()
    assert_same_weights(final_weights(out), final_weights(tmp_path / "ref"))
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["latest.json", f"step_{steps - 1:06d}", f"step_{steps:06d}"]  # keep_checkpoints=2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the fp32 master weights are checkpointed
def test_checkpoint_written_but_not_committed_is_ignored(tmp_path, monkeypatch, dtype):
    overrides = ["train.steps=5", "train.checkpoint_every=2", f"model.dtype={dtype}"]
    toy_run(tmp_path / "ref", *overrides)
    out = tmp_path / "run"
    with crash_before_commit(monkeypatch, step=4):
        toy_run(out, *overrides)
    stale = out / "checkpoints" / "step_000004"
    assert sorted(os.listdir(stale)) == ["model.pt", "optimizer.pt", "rng.pt", "trainer_state.json"]
    assert run_checkpoint.latest(str(out)) == run_checkpoint.step_dir(str(out), 2)
    (stale / "leftover.tmp123").write_bytes(b"half a file")

    summary = toy_run(out, *overrides, "train.resume=auto")
    assert summary["resumed_from_step"] == 2
    assert (out / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()
    assert_same_weights(final_weights(out), final_weights(tmp_path / "ref"))
    assert not (stale / "leftover.tmp123").exists()  # the uncommitted dir was removed, then written afresh
    assert sorted(os.listdir(out / "checkpoints")) == ["latest.json", "step_000004", "step_000005"]


def test_resume_from_missing_dir_is_a_config_error(tmp_path, capsys):
    rc = main(["train", *TOY, f"train.output_dir={tmp_path}", "train.resume=/no/such/dir"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config error: train.resume='/no/such/dir' is not a directory" in err
    assert not (tmp_path / "init_model").exists()  # refused before anything was built


def test_resume_with_another_model_or_dataset_is_refused(tmp_path, capsys):
    rows = [{"prompt": f"word {i}", "answer": str(i)} for i in range(20)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jsonl = ["warmup.path=null", f"data.path={data}", "train.steps=2"]
    out = tmp_path / "run"
    toy_run(out, *jsonl)
    checkpoint = run_checkpoint.latest(str(out))
    capsys.readouterr()

    assert main(["train", *TOY, *jsonl, f"train.output_dir={out}", "train.resume=auto", "model.path=builtin:small"]) == 2
    assert "model.path: checkpoint 'builtin:tiny', this run 'builtin:small'" in capsys.readouterr().err

    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))  # same path and config, fewer rows
    assert main(["train", *TOY, *jsonl, f"train.output_dir={out}", f"train.resume={checkpoint}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {checkpoint}" in err and "saved num_rows=20 but this run has num_rows=12" in err

    shorter = load_config(RLConfig, None, [*TOY, *jsonl, f"train.output_dir={out}", "train.steps=1"])
    with pytest.raises(ResumeError, match="at step 2, past train.steps=1"):
        check_resume_config(checkpoint, shorter)
