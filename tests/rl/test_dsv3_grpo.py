"""The GRPO loop on the builtin `tiny_dsv3` model (DeepSeek-V3 shape) with routing replay: the
engine's recorded experts are replayed by the trainer, so behavior and training log-probs agree
(importance ratios 1) while the weights are the same, and replaying other experts shows in the
mismatch; full steps run. Learning on
the demo task is shown by `rl-engine train model.path=builtin:tiny_dsv3 ...` (README), which takes
minutes, not by this test."""

import torch

from rl_engine.config import load_config
from rl_engine.train_config import RLConfig
from rl_engine.trainer import GRPOTrainer


def test_tiny_dsv3_grpo_steps_with_routing_replay(tmp_path):
    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path}", "model.path=builtin:tiny_dsv3",
                                       "warmup.steps=0", "train.steps=2", "rollout.routing_replay=true",
                                       "rollout.prompts_per_step=4", "rollout.temperature=1.0", "data.num_eval=8",
                                       "optim.lr=5e-4"])
    trainer = GRPOTrainer(cfg)
    assert trainer.model.config.model_type == "deepseek_v3" and trainer.model.config.is_mla
    samples, _ = trainer.rollout()
    assert all(s.routed_experts is not None and s.routed_experts.shape[1:] == (1, 2) for s in samples)
    metrics = trainer.train_on(samples)
    assert abs(metrics["train/is_ratio_max"] - 1.0) <= 1e-5
    assert abs(metrics["train/mismatch_k3"]) <= 1e-6
    for s in samples:  # the other expert group: the trainer replays what the samples say
        s.routed_experts = (s.routed_experts + 4) % 8
    assert trainer.train_on(samples)["train/mismatch_k3"] > 1e-4
    metrics = trainer.step()
    trainer.close()
    assert metrics["policy_version"] >= 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))
