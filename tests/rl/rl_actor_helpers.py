"""Shared pieces of the actor tests: a toy run config, a tiny MoE checkpoint with the character
tokenizer, the single-process reference run, a run under the local launcher, metric rows, and a crash
between writing a checkpoint and committing it."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from rl_engine.config import load_config
from rl_engine.train_config import RLConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# 4 prompts x 4 samples of 8 tokens, reward `has_vowel` (varied groups without training), no warm start.
TOY = ["warmup.steps=0", "data.num_eval=8", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
       "reward.name=rl_test_rewards:has_vowel", "reward.num_workers=0", "train.steps=3",
       "placement.heartbeat_interval_s=0.3", "placement.heartbeat_timeout_s=20", "placement.grace_period_s=3"]


def toy_config(output_dir, *overrides: str) -> RLConfig:
    return load_config(RLConfig, None, [*TOY, f"train.output_dir={output_dir}", *overrides])


def child_pythonpath(monkeypatch) -> None:
    """The actor processes import the test reward by dotted path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))


def write_tiny_moe(directory: str) -> str:
    """tests/hf_models' qwen3_moe (4 experts, top-2) sized for the character tokenizer. No router aux
    loss: it is computed per micro-batch (as in Megatron), so its gradient depends on the data-parallel
    split, and AdamW's first steps amplify any difference; without it runs are comparable exactly."""
    from hf_models import write_hf_checkpoint

    from rl_engine.policy.presets import char_vocab, write_char_tokenizer

    vocab = char_vocab()
    write_hf_checkpoint(directory, "qwen3_moe", vocab_size=len(vocab), eos_token_id=vocab["<|eos|>"],
                        bos_token_id=vocab["<|bos|>"], pad_token_id=vocab["<|pad|>"], router_aux_loss_coef=0.0)
    write_char_tokenizer(directory)
    return directory


def rows(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def single_process_rows(output_dir, *overrides: str) -> list[dict]:
    """The reference: the same run with GRPOTrainer in this process."""
    from rl_engine.trainer import GRPOTrainer

    trainer = GRPOTrainer(toy_config(output_dir, *overrides))
    try:
        return [trainer.step() for _ in range(trainer.config.train.steps)]
    finally:
        trainer.close()


def actor_rows(output_dir, monkeypatch, *overrides: str) -> list[dict]:
    """The toy run under the local launcher (coordinator, trainer ranks, workers as processes)."""
    from rl_engine.actors.run import run_actors

    child_pythonpath(monkeypatch)
    run_actors(toy_config(output_dir, *overrides), echo_stream=io.BytesIO())
    return rows(output_dir)


class Crash(Exception):
    pass


@contextlib.contextmanager
def crash_before_commit(monkeypatch, step: int):
    """The run inside dies (raises `Crash`) right after writing checkpoint `step`, before committing it."""
    from rl_engine import run_checkpoint

    commit = run_checkpoint.commit

    def crash(output_dir, at, *, keep):
        if at == step:
            raise Crash
        return commit(output_dir, at, keep=keep)

    monkeypatch.setattr(run_checkpoint, "commit", crash)
    try:
        with pytest.raises(Crash):
            yield
    finally:
        monkeypatch.setattr(run_checkpoint, "commit", commit)


def assert_same_run(got: list[dict], reference: list[dict], *, loss_atol: float = 1e-6) -> None:
    """Same samples (rewards, token counts) and the same loss and gradient norm at every step."""
    assert len(got) == len(reference)
    for step, (a, b) in enumerate(zip(got, reference), start=1):
        assert (a["reward/mean"], a["tokens/total"]) == (b["reward/mean"], b["tokens/total"]), step
        assert abs(a["train/loss"] - b["train/loss"]) <= loss_atol, (step, a["train/loss"], b["train/loss"])
        assert abs(a["train/grad_norm"] - b["train/grad_norm"]) <= 1e-5 * b["train/grad_norm"], step
