"""model.batch_invariant in a sync RL run (the demo's loop, reduced): the trainer's log-probs equal the
engine's behavior log-probs on every step, so the logged mismatch is exactly zero, in fp32 and bf16."""

from __future__ import annotations

import dataclasses

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


def _with_env(name: str, **env: str):
    """edit_specs: process `name` runs with `env` added (one process's forced fallback)."""
    def edit(specs):
        return [s if s.name != name else dataclasses.replace(s, env={**s.env, **env}) for s in specs]
    return edit


@pytest.mark.parametrize("placement, odd_one", [
    (["placement.mode=disaggregated"], "rollout-0"),  # a rollout worker against the trainer (coordinator)
    (["placement.mode=colocated", "train.tp=2"], "trainer-1"),  # a trainer rank (its colocated engine) against rank 0
])
def test_a_process_with_other_batch_invariant_kernels_is_refused(tmp_path, monkeypatch, placement, odd_one):
    """One process of the run falls back to the torch kernels (as it would without a compiler) while the
    others build the C++ ones: the run must stop before any step, naming both choices and the fix, instead
    of training on behavior log-probs that differ from the trainer's in the last bits."""
    import io

    from rl_actor_helpers import child_pythonpath, rows
    from rl_engine.actors.run import ActorsFailed, run_actors
    from rl_engine.kernels.invariant import kernel_choice

    if kernel_choice()[0].startswith("linear=MKL"):
        pytest.skip(f"the C++ invariant kernels do not build here ({kernel_choice()[1]}): every process falls back")
    child_pythonpath(monkeypatch)
    monkeypatch.delenv("RL_ENGINE_CPU_KERNELS", raising=False)
    with pytest.raises(ActorsFailed) as failed:
        run_actors(toy_config(tmp_path, *placement, "model.batch_invariant=true", "train.steps=1"),
                   edit_specs=_with_env(odd_one, RL_ENGINE_CPU_KERNELS="0"), echo_stream=io.BytesIO())
    report = failed.value.result.summary()
    assert "chose different batch-invariant kernels" in report, report
    assert "linear=MKL tiles" in report and "disabled by RL_ENGINE_CPU_KERNELS=0" in report
    assert "linear=C++ " in report and "install a C++ compiler" in report
    assert ("rollout-0: linear=MKL" in report) if odd_one == "rollout-0" else ("trainer rank 1: linear=MKL" in report)
    assert not (tmp_path / "metrics.jsonl").exists() or rows(tmp_path) == []


def test_kernel_mismatch_names_every_choice_and_the_fix():
    import torch

    from rl_engine.kernels.invariant import KernelMismatch, check_same_kernels, kernel_choice

    same = ("linear=C++ abc, attention=C++ def", "built")
    check_same_kernels({"trainer": same, "rollout-0": same, "rollout-1": same})
    with pytest.raises(KernelMismatch) as e:
        check_same_kernels({"trainer": same, "rollout-0": same,
                            "rollout-1": ("linear=MKL tiles (torch 2), attention=torch (torch 2)", "no C++ compiler")})
    message = str(e.value)
    assert "  trainer, rollout-0: linear=C++ abc, attention=C++ def (built)" in message
    assert "  rollout-1: linear=MKL tiles (torch 2), attention=torch (torch 2) (no C++ compiler)" in message
    assert "install a C++ compiler" in message and "RL_ENGINE_CPU_KERNELS=0 for every process" in message
    assert "ATEN_CPU_CAPABILITY" in message
    # torch's vectorised ops around the kernels follow its CPU capability: part of what must match
    assert kernel_choice()[0].endswith(f"torch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()}")
