"""Helpers shared by the inference tests (imported by name: test modules must not import
`conftest`, whose module name is ambiguous across test folders)."""

from __future__ import annotations

import torch

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
