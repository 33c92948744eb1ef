"""The lr per RL step in the loops: `optim.lr_scheduler` with `optim.warmup_steps` and the
KL-adaptive scale (`optim.kl_adaptive_target`) set the lr of every update of a step, `train/lr` logs
it, a resumed single-process run continues it exactly, and the trainer group (ZeRO-1 optimizer, dp2)
follows the single process step by step."""

import pytest
from rl_actor_helpers import actor_rows, assert_same_run, crash_before_commit, rows, single_process_rows

from rl_engine.config import ConfigError, load_config
from rl_engine.policy.lr_schedule import LRSchedule
from rl_engine.train_cli import run
from rl_engine.train_config import RLConfig

# has_vowel pays a random policy about a third of the time: every step has non-zero advantages.
TOY = ["warmup.steps=5", "warmup.batch_size=4", "data.num_eval=8", "rollout.prompts_per_step=4", "rollout.n=4",
       "rollout.max_new_tokens=8", "reward.name=rl_test_rewards:has_vowel", "reward.num_workers=0",
       "train.threads=1", "train.mini_batches_per_step=2"]
# Warmup then cosine; a KL target so small that every step's second update finds the policy beyond
# 2x it: the scale falls by 1.5 each step, and a resume that lost it would train at another lr.
SCHEDULE = ["optim.lr_scheduler=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1",
            "optim.kl_adaptive_target=1e-9"]


def test_schedule_and_kl_scale_set_the_lr_and_resume_exactly(tmp_path, monkeypatch):
    overrides = [*TOY, *SCHEDULE, "train.steps=5", "train.checkpoint_every=2"]
    run(load_config(RLConfig, None, [*overrides, f"train.output_dir={tmp_path / 'ref'}"]))
    schedule = LRSchedule(lr=2e-3, scheduler="cosine", warmup_steps=2, total_steps=5, min_lr_ratio=0.1)
    assert [r["train/lr"] for r in rows(tmp_path / "ref")] == pytest.approx([schedule(s) / 1.5 ** s for s in range(5)], rel=1e-12)

    out = tmp_path / "run"
    with crash_before_commit(monkeypatch, step=4):
        run(load_config(RLConfig, None, [*overrides, f"train.output_dir={out}"]))
    summary = run(load_config(RLConfig, None, [*overrides, f"train.output_dir={out}", "train.resume=auto"]))
    assert summary["resumed_from_step"] == 2
    # Byte for byte: the lr of steps 3-5 (schedule and KL scale) and everything it moves.
    assert (out / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()


def test_kl_adaptive_lr_needs_several_updates_per_step():
    with pytest.raises(ConfigError, match="optim.kl_adaptive_target.*train.mini_batches_per_step"):
        load_config(RLConfig, None, ["optim.kl_adaptive_target=0.02"])
    with pytest.raises(ConfigError, match="optim.lr_scheduler='cosin' must be one of constant, linear, cosine"):
        load_config(RLConfig, None, ["optim.lr_scheduler=cosin"])


def test_colocated_dp2_schedule_matches_single_process(tmp_path, monkeypatch):
    """The trainer group sets the same lr on its ZeRO-1 optimizer (dp2: each rank its shard), the KL
    it adapts to summed over the ranks: losses, gradient norms and lrs equal the single process's."""
    mini = ["train.mini_batches_per_step=2", "optim.lr_scheduler=linear", "optim.warmup_steps=1",
            "optim.kl_adaptive_target=1e-9"]
    reference = single_process_rows(tmp_path / "single", *mini)
    got = actor_rows(tmp_path / "actors", monkeypatch, *mini, "placement.mode=colocated", "train.dp=2")
    assert_same_run(got, reference)
    schedule = LRSchedule(lr=2e-3, scheduler="linear", warmup_steps=1, total_steps=3)
    assert [r["train/lr"] for r in got] == pytest.approx([schedule(s) / 1.5 ** s for s in range(3)], rel=1e-12)
    assert [r["train/lr"] for r in got] == pytest.approx([r["train/lr"] for r in reference], rel=1e-12)
