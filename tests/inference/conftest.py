"""Shared fixtures of the inference tests: tiny random checkpoints written once per session, mixed
prompts, and transformers' greedy continuations as the reference."""

from __future__ import annotations

import pytest
import torch

from hf_models import make_hf_model

NUM_NEW_TOKENS = 24
# Qwen2 with tied embeddings and random weights repeats one token forever; untied it varies, which
# makes token-for-token equality a stronger check.
PARITY_OVERRIDES = {"qwen2": dict(tie_word_embeddings=False), "llama": {}, "qwen3_moe": {}}


def mixed_prompts(num: int = 32, *, vocab: int = 97, seed: int = 0, max_len: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (num,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf_model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuations, EOS ignored: one left-padded batch with an attention mask."""
    hf_model.generation_config.eos_token_id = None
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=0)
    return out[:, width:].tolist()


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
