"""model.batch_invariant in a sync RL run (the demo's loop, reduced): the trainer's log-probs equal the
engine's behavior log-probs on every step, so the logged mismatch is exactly zero, in fp32 and bf16."""

from __future__ import annotations

import pytest

from rl_actor_helpers import toy_config
from rl_engine import kernels
from rl_engine.trainer import GRPOTrainer


def run_steps(output_dir, *overrides: str) -> list[dict]:
    trainer = GRPOTrainer(toy_config(output_dir, *overrides))
    try:
        return [trainer.step() for _ in range(trainer.config.train.steps)]
    finally:
        trainer.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sync_run_logs_zero_mismatch_on_every_step(tmp_path, dtype):
    before = kernels.default_registry().config.batch_invariant
    rows = run_steps(tmp_path / "inv", f"model.dtype={dtype}", "model.batch_invariant=true", "train.steps=3")
    assert kernels.default_registry().config.batch_invariant == before  # close() restores the registry
    for step, row in enumerate(rows, start=1):
        assert row["train/mismatch_k3"] == 0.0, (step, row["train/mismatch_k3"])
        assert row["train/is_ratio_max"] == 1.0, (step, row["train/is_ratio_max"])
    if dtype == "bfloat16":  # the default path's bf16 rounding differs between engine and trainer
        default = run_steps(tmp_path / "default", "model.dtype=bfloat16", "train.steps=1")
        assert default[0]["train/mismatch_k3"] > 0.0 and default[0]["train/is_ratio_max"] > 1.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_colocated_tp2_run_logs_zero_mismatch(tmp_path, monkeypatch, dtype):
    """Two tensor-parallel trainer ranks, each generating with an engine on its own shards: the
    engine's logits are gathered over tp like the trainer's, and both take the same log-softmax."""
    import io

    from rl_actor_helpers import child_pythonpath, rows
    from rl_engine.actors.run import run_actors

    child_pythonpath(monkeypatch)
    run_actors(toy_config(tmp_path, "placement.mode=colocated", "train.tp=2", f"model.dtype={dtype}",
                          "model.batch_invariant=true", "train.steps=2"), echo_stream=io.BytesIO())
    got = rows(tmp_path)
    assert len(got) == 2
    for step, row in enumerate(got, start=1):
        assert row["train/mismatch_k3"] == 0.0 and row["train/is_ratio_max"] == 1.0, (step, row)


def test_disaggregated_tensor_parallel_run_is_refused(tmp_path):
    from rl_engine.config import ConfigError

    with pytest.raises(ConfigError, match="model.batch_invariant=true with placement.mode=disaggregated needs train.tp=1"):
        toy_config(tmp_path, "model.batch_invariant=true", "placement.mode=disaggregated", "train.tp=2")
    toy_config(tmp_path, "model.batch_invariant=true", "placement.mode=colocated", "train.tp=2")  # accepted
