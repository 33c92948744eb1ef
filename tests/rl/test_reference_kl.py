"""The reference policy in the single-process loop: by default the initial policy (after the warm
start), a frozen copy kept in checkpoints; `ref.path` another model with the policy's tokenizer.
`train/kl_ref` is KL(policy || ref) per response token; `loss.kl_coef` adds it to the loss."""

import json
import shutil

import pytest

from rl_engine.config import ConfigError, load_config
from rl_engine.train_config import RLConfig
from rl_engine.trainer import GRPOTrainer

# The warm-started demo of default_step_metrics_reference.json (rewards vary, the policy moves).
DEMO = ["warmup.steps=200", "train.micro_batch_tokens=512", "data.num_eval=16", "rollout.prompts_per_step=8"]


def _config(tmp_path, *overrides: str) -> RLConfig:
    return load_config(RLConfig, None, [f"train.output_dir={tmp_path}", *DEMO, *overrides])


def test_kl_to_the_initial_policy_starts_at_zero_and_grows(tmp_path):
    trainer = GRPOTrainer(_config(tmp_path, "loss.kl_coef=0.05", "loss.kl_estimator=k3", "train.steps=4"))
    try:
        trainer.warm_start()
        rows = [trainer.step() for _ in range(4)]
    finally:
        trainer.close()
    kl = [row["train/kl_ref"] for row in rows]
    assert abs(kl[0]) <= 1e-7, kl
    assert all(k > 1e-3 for k in kl[1:]), kl  # it moves away from 0 (not monotonically at lr 2e-3)
    for row in rows:  # token-mean, no entropy bonus: loss = policy-gradient loss + kl_coef * KL
        assert row["train/loss"] == pytest.approx(row["train/pg_loss"] + 0.05 * row["train/kl_ref"], abs=1e-7)


def test_ref_path_without_kl_coef_logs_kl_only(tmp_path):
    """A reference given by path is scored and logged even when it does not enter the loss; here the
    untrained preset the warm start began from, so the KL is large from step 1."""
    trainer = GRPOTrainer(_config(tmp_path / "a", "train.steps=1"))
    init_model = str(tmp_path / "a" / "init_model")
    trainer.close()
    trainer = GRPOTrainer(_config(tmp_path / "b", f"ref.path={init_model}", "train.steps=1"))
    try:
        trainer.warm_start()
        row = trainer.step()
    finally:
        trainer.close()
    assert row["train/kl_ref"] > 0.1 and row["train/loss"] == row["train/pg_loss"]


def test_a_reference_with_another_tokenizer_is_refused(tmp_path):
    trainer = GRPOTrainer(_config(tmp_path / "a", "warmup.steps=0", "train.steps=1"))
    trainer.close()
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "a" / "init_model", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swapped: same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="ref.path=.* has a different tokenizer"):
        GRPOTrainer(_config(tmp_path / "b", "warmup.steps=0", f"ref.path={other}", "train.steps=1"))


def test_kl_estimator_is_validated():
    with pytest.raises(ValueError, match="kl_estimator='k5' is not valid"):
        load_config(RLConfig, None, ["loss.kl_estimator=k5"])


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_resume_keeps_the_initial_policy_as_reference(tmp_path, monkeypatch, offload):
    """The default reference (the warm-started initial policy) lives in no file but the checkpoint;
    a run stopped after step 2 and resumed repeats the uninterrupted run's metrics byte for byte. With
    `ref.offload=cpu` (the stopped and resumed run; the uninterrupted one resident) too: the reference
    written after the warm start, saved, loaded and scoring from host memory is the same model."""
    import os

    from rl_engine.train_cli import run

    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))  # the test reward
    toy = ["warmup.steps=5", "warmup.batch_size=4", "data.num_eval=8", "rollout.prompts_per_step=4", "rollout.n=4",
           "rollout.max_new_tokens=8", "reward.name=rl_test_rewards:has_vowel", "reward.num_workers=0",
           "loss.kl_coef=0.1", "optim.lr=1e-2"]

    def toy_run(out, *overrides):
        return run(load_config(RLConfig, None, [*toy, f"train.output_dir={out}", *overrides]))

    toy_run(tmp_path / "whole", "train.steps=4")
    toy_run(tmp_path / "part", "train.steps=2", f"ref.offload={offload}")
    assert (tmp_path / "part" / "checkpoints" / "step_000002" / "ref_model.pt").exists()
    summary = toy_run(tmp_path / "part", "train.steps=4", "train.resume=auto", f"ref.offload={offload}")
    assert summary["resumed_from_step"] == 2
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    part = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["train/kl_ref"] > 0 for r in whole] == [False, True, True, True]

    def strip(rows):  # timings differ between runs
        return [{k: v for k, v in json.loads(r).items() if not k.startswith("perf/")} for r in rows]

    assert strip(part) == strip(whole)


def test_kl_in_reward_penalises_rewards_not_the_loss(tmp_path):
    """loss.kl_in_reward: each sample's reward loses kl_coef * its summed KL(proximal || ref) before the
    group advantages; the loss has no KL term (loss = pg_loss) while train/kl_ref is still logged."""
    trainer = GRPOTrainer(_config(tmp_path, "loss.kl_coef=0.1", "loss.kl_in_reward=true", "optim.lr=1e-2",
                                  "train.steps=3"))
    try:
        trainer.warm_start()
        rows = [trainer.step() for _ in range(3)]
    finally:
        trainer.close()
    assert rows[0]["train/kl_reward_penalty"] == 0 and abs(rows[0]["train/kl_ref"]) <= 1e-7
    assert all(row["train/kl_reward_penalty"] > 0 and row["train/kl_ref"] > 0 for row in rows[1:]), rows
    assert all(row["train/loss"] == row["train/pg_loss"] for row in rows)
    with pytest.raises(ConfigError, match="loss.kl_in_reward=true needs loss.kl_coef > 0"):
        _config(tmp_path, "loss.kl_in_reward=true")


def test_sequence_kl_and_new_advantages_follow_each_sample():
    import torch

    from rl_engine.losses import kl_penalty
    from rl_engine.rl_step import (attach_logprobs, build_micro_batches, make_sample, sequence_kl, set_advantages,
                                   split_mini_batches)

    gen = torch.Generator().manual_seed(0)
    samples = [make_sample(prompt_ids=[1, 2, 3], response_ids=[4] * (i + 2), reward=0.0, group=i // 2,
                           logprobs=(-torch.rand(i + 2, generator=gen)).tolist(), policy_versions=[0] * (i + 2))
               for i in range(6)]
    mini = split_mini_batches(samples, torch.zeros(6), count=2)
    plans = [build_micro_batches(s, a, micro_batch_tokens=12, temperature=1.0) for s, a in mini]
    refs = {}
    for micro_batches in plans:
        for key in ("ref", "proximal"):
            attach_logprobs(micro_batches, [-torch.rand(mb.num_tokens, generator=gen) for mb in micro_batches], key=key)
    kl = sequence_kl(plans, [0, 3], 6, estimator="k3")
    for k, micro_batches in enumerate(plans):
        for mb in micro_batches:
            li = mb.loss_inputs
            for sample in li["sample"].unique().tolist():
                at = (li["sample"] == sample) & li["loss_mask"]
                kl_at = kl_penalty(li["proximal"][at], li["ref"][at], estimator="k3")
                refs[3 * k + sample] = float(kl_at.double().sum())
    assert sorted(refs) == list(range(6)) and all(refs[i] > 0 for i in refs)
    torch.testing.assert_close(kl, torch.tensor([refs[i] for i in range(6)], dtype=torch.float64))
    set_advantages(plans, [0, 3], torch.arange(6.0))
    for k, micro_batches in enumerate(plans):
        for mb in micro_batches:
            assert torch.equal(mb.loss_inputs["advantages"], (mb.loss_inputs["sample"] + 3 * k).float())
