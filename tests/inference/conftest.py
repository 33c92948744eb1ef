"""Shared fixtures of the inference tests: tiny random checkpoints written once per session, mixed
prompts, and transformers' greedy continuations as the reference."""

from __future__ import annotations

import pytest
import torch

from hf_models import make_hf_model
from inference_helpers import NUM_NEW_TOKENS, PARITY_OVERRIDES, hf_greedy, mixed_prompts  # noqa: F401

class Checkpoints:
    def __init__(self, root) -> None:
        self.root = root
        self._cache: dict[tuple, tuple] = {}

    def get(self, model_type: str, *, seed: int = 0, **overrides):
        """(transformers model, checkpoint directory), built once per session."""
        key = (model_type, seed, tuple(sorted(overrides.items())))
        if key not in self._cache:
            hf = make_hf_model(model_type, seed=seed, **overrides)
            path = self.root / f"{model_type}-{seed}-{len(self._cache)}"
            hf.save_pretrained(path)
            self._cache[key] = (hf, str(path))
        return self._cache[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("inference_ckpts"))


@pytest.fixture(scope="session")
def qwen2(checkpoints):
    """A tiny tied-embedding Qwen2 checkpoint: (transformers model, path)."""
    return checkpoints.get("qwen2")


@pytest.fixture(scope="session")
def char_model(tmp_path_factory) -> str:
    """The built-in 'tiny' preset with its character tokenizer and chat template."""
    from rl_engine.policy.presets import write_preset_checkpoint

    return write_preset_checkpoint("tiny", str(tmp_path_factory.mktemp("char_model")), seed=0,
                                   max_position_embeddings=128)
