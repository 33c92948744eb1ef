"""The colocated GRPO loop end to end, at toy scale: learning, log-prob agreement, the CLI."""

import json

import pytest
import torch

from rl_engine import kernels
from rl_engine.config import ConfigError, load_config
from rl_engine.inference.compiled_decode import cpp_compiler
from rl_engine.train_config import RLConfig
from rl_engine.trainer import GRPOTrainer


def small_config(tmp_path, *extra: str) -> RLConfig:
    # train.threads: the suite's thread count (RL_ENGINE_TEST_THREADS), which the trainer would reset to 1
    return load_config(RLConfig, None, [f"train.output_dir={tmp_path}", "data.num_eval=64",
                                        f"train.threads={torch.get_num_threads()}", *extra])


def test_train_threads_hold_while_the_trainer_lives_and_close_puts_the_callers_back(tmp_path):
    """torch's thread count is process-wide: a trainer used to leave `train.threads` to everything run in
    the process after it (a benchmark's peer, the warm start's driver)."""
    callers = torch.get_num_threads()
    threads = 2 if callers == 1 else 1
    trainer = GRPOTrainer(small_config(tmp_path, "warmup.steps=0", f"train.threads={threads}"))
    try:
        assert torch.get_num_threads() == threads
    finally:
        trainer.close()
    assert torch.get_num_threads() == callers


def test_a_trainer_that_fails_late_in_init_leaves_the_process_settings_as_they_were(tmp_path):
    """`rollout.fn` is imported after the model, engine and rewards are built: the failure must undo the
    thread count, deterministic algorithms and batch-invariant mode the trainer set first."""
    callers = torch.get_num_threads()
    threads = 2 if callers == 1 else 1
    was_invariant = kernels.set_batch_invariant(False)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        cfg = small_config(tmp_path, "warmup.steps=0", f"train.threads={threads}", "train.deterministic=true",
                           "model.batch_invariant=true", "rollout.fn=no_such_module_here:rollout")
        with pytest.raises(ConfigError, match="rollout.fn='no_such_module_here:rollout': cannot import"):
            GRPOTrainer(cfg)
        assert torch.get_num_threads() == callers
        assert not torch.are_deterministic_algorithms_enabled()
        assert kernels.default_registry().config.batch_invariant is False  # the mode it found
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        kernels.set_batch_invariant(was_invariant)
        torch.set_num_threads(callers)


def test_rl_raises_held_out_accuracy(tmp_path):
    """Reduced demo: a noisy warm start, then RL must raise greedy held-out accuracy."""
    cfg = small_config(tmp_path, "warmup.steps=350", "train.steps=30")
    trainer = GRPOTrainer(cfg)
    trainer.warm_start()
    before = trainer.evaluate()["eval/accuracy"]
    rewards = [trainer.step()["reward/mean"] for _ in range(cfg.train.steps)]
    after = trainer.evaluate()["eval/accuracy"]
    trainer.close()
    assert sum(rewards[-10:]) / 10 > sum(rewards[:5]) / 5 + 0.1, rewards
    assert after >= before + 0.30, (before, after)


_NEEDS_CXX = pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile on CPU needs a C++ compiler (g++ or CXX)")


@pytest.mark.parametrize("compile_decode, compile_train", [(False, False), pytest.param(True, False, marks=_NEEDS_CXX),
                                                           pytest.param(False, True, marks=_NEEDS_CXX)])
def test_behavior_and_training_logprobs_agree_in_the_loop(tmp_path, compile_decode, compile_train):
    """Same weights for rollout and training: importance weights are 1 and the mismatch is ~0, also with
    the rollout's decode steps compiled (rollout.compile_decode: one step for every bucket of 2+ rows as
    the EOS-varied batch shrinks) or the training forward's layers compiled (train.compile: the
    recomputation below and the training pass record autograd, so both run the compiled layers)."""
    cfg = small_config(tmp_path, "warmup.steps=0", "train.steps=1", "rollout.temperature=0.8",
                       "loss.importance_sampling.mode=truncate", f"rollout.compile_decode={str(compile_decode).lower()}",
                       f"train.compile={str(compile_train).lower()}")
    trainer = GRPOTrainer(cfg)
    samples, rollout_metrics = trainer.rollout()
    compiled = trainer.llm.engine.runner.compile_seconds()
    assert bool(compiled) is compile_decode and len(compiled) <= 2  # the dynamic step, and bucket 1's static one
    # the step's metrics carry the compile seconds (the first rollout paid every compile so far)
    assert rollout_metrics.get("rollout/decode_compile_s") == (sum(compiled.values()) if compile_decode else None)
    assert all((layer.compiled_forward is not None) is compile_train for layer in trainer.model.layers)
    # Recompute the training log-probs for every sample and compare token by token.
    worst = 0.0
    for s in samples:
        ids = torch.tensor(s.input_ids)
        h = trainer.model.hidden_states(ids, positions=torch.arange(len(ids)))
        lp, _ = trainer.model.token_logprobs(h, torch.tensor(s.targets), temperature=0.8)
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        worst = max(worst, (lp.detach()[mask] - torch.tensor(s.behavior_logprobs)[mask]).abs().max().item())
    assert worst <= 1e-5
    metrics = trainer.train_on(samples)
    trainer.close()
    assert abs(metrics["train/is_ratio_max"] - 1.0) <= 1e-5
    assert abs(metrics["train/mismatch_k3"]) <= 1e-6


def test_cli_print_config_and_unknown_key(tmp_path, capsys):
    from rl_engine.cli import main

    assert main(["train", "--print-config", "optim.lr=5e-4", "rollout.n=4"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0005" in out and "n: 4" in out
    assert main(["train", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="temperature"):
        load_config(RLConfig, None, ["rollout.temperature=hot"])


def test_cli_demo_runs_end_to_end(tmp_path, capsys):
    from rl_engine.cli import main

    rc = main(["train", f"train.output_dir={tmp_path}", "warmup.steps=20", "train.steps=2", "data.num_eval=16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out accuracy before RL" in out and "held-out accuracy after RL" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "final_model" / "config.json").exists()
    # a complete model directory (a teacher, a reference, `rl-engine serve`): the run's tokenizer with it
    from rl_engine.policy.tokenizer import Tokenizer

    final = Tokenizer.from_pretrained(str(tmp_path / "final_model"))
    init = Tokenizer.from_pretrained(str(tmp_path / "init_model"))
    assert final.encode("Hello") == init.encode("Hello") and final.chat_template == init.chat_template
