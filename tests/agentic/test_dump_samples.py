"""train.dump_samples for the built-in single-turn rollout: one row per trained sample with per-token
lists aligned with token_ids, equal to the samples the step trained on; a resumed run cuts the file
back to its checkpoint, so the resumed file equals the uninterrupted run's byte for byte."""

from __future__ import annotations

import json

from rl_engine.config import load_config
from rl_engine.train_config import RLConfig

TOY = ["warmup.steps=0", "data.num_eval=4", "rollout.prompts_per_step=3", "rollout.n=2", "rollout.max_new_tokens=6",
       "reward.num_workers=0", "train.steps=2", "train.checkpoint_every=1", "train.dump_samples=true"]


def test_single_turn_samples_are_dumped_and_a_resume_keeps_the_file_exact(tmp_path):
    from rl_engine.train_cli import run

    out = tmp_path / "run"
    run(load_config(RLConfig, None, [*TOY, f"train.output_dir={out}"]))
    first = (out / "samples.jsonl").read_bytes()
    rows = [json.loads(line) for line in first.splitlines()]
    assert [r["step"] for r in rows] == [1] * 6 + [2] * 6
    for r in rows:
        n = len(r["token_ids"])
        assert len(r["loss_mask"]) == len(r["behavior_logprobs"]) == len(r["policy_versions"]) == n
        prompt = r["loss_mask"].index(1)
        assert r["loss_mask"] == [0] * prompt + [1] * (n - prompt)  # single turn: the whole completion
        assert all(v == r["step"] - 1 for v in r["policy_versions"][prompt:])
        assert all(lp <= 0 for lp in r["behavior_logprobs"][prompt:])
        assert r["num_turns"] == 1 and r["finish_reason"] in ("stop", "length") and r["reward"] in (0.0, 1.0)
    # Resume from step 1: the file is cut back to step 1, step 2 is trained (and written) again.
    run(load_config(RLConfig, None, [*TOY, f"train.output_dir={out}",
                                     f"train.resume={out}/checkpoints/step_000001"]))
    assert (out / "samples.jsonl").read_bytes() == first
