"""Four mini-batches per step in colocated async mode at the sync demo's learning rate (2e-3): with
a constant lr the run collapses; with the KL-adaptive lr (`optim.kl_adaptive_target`) and PPO's KL
early stop (`train.target_kl`) it learns and holds. The README's 100-step figures, reduced.

Margins, from the runs of this reduced configuration on the 2-core machine: without the two settings
held-out accuracy 40.6% -> 0.0% and every step's mean reward <= 0.01 from step 5 on (the collapse);
with them 40.6% -> 100.0%, the mean reward of steps 21-30 0.94. Rewards still dip for a few steps at
a time (0.38 at step 15 here; in the 100-step runs no 10-step window after step 20 averaged under
0.77), so the test asserts a 10-step mean of 0.5 and a gain of 20 points: far from the collapse on
one side, and from the dips that another machine's rounding could move onto the last steps on the
other."""

import io

from rl_actor_helpers import rows

from rl_engine.actors.run import run_actors
from rl_engine.config import load_config
from rl_engine.train_config import RLConfig

REDUCED = ["placement.mode=colocated", "rollout.mode=async", "train.mini_batches_per_step=4", "data.num_eval=64",
           "warmup.steps=350", "train.steps=30", "placement.grace_period_s=3"]


def test_async_four_mini_batches_at_the_sync_lr_learn_with_the_kl_adaptive_lr(tmp_path):
    summary = run_actors(load_config(RLConfig, None, [
        f"train.output_dir={tmp_path}", *REDUCED, "optim.kl_adaptive_target=0.01", "train.target_kl=0.02"]),
        echo_stream=io.BytesIO())
    got = rows(tmp_path)
    assert got[0]["train/lr"] == 2e-3  # the configured lr is the ceiling, reached at the start
    assert min(r["train/lr"] for r in got) <= 2e-3 / 1.5 ** 2  # the KL of the first steps pulled it down
    late = [r["reward/mean"] for r in got[20:]]
    assert sum(late) / len(late) >= 0.5, late
    assert summary["eval_accuracy_after"] >= summary["eval_accuracy_before"] + 0.20, summary
