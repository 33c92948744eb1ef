"""Greedy generation equals transformers' `generate`, token for token (fp32), for dense and MoE
families: with default settings, with a KV pool so small that requests are preempted and recomputed,
and with prefix caching serving shared prefixes."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from inference_helpers import NUM_NEW_TOKENS, PARITY_OVERRIDES, hf_greedy, mixed_prompts
from rl_engine import LLM, SamplingParams

MODEL_TYPES = ["qwen2", "llama", "qwen3_moe"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
_refs: dict[tuple[str, str], tuple[list, list]] = {}


def shared_prefix_prompts(seed: int = 1) -> list[list[int]]:
    """32 prompts: 4 prefixes of 20-40 tokens, each with 8 suffixes of 1-12 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(4):
        prefix = torch.randint(0, 97, (int(torch.randint(20, 41, (1,), generator=g)),), generator=g).tolist()
        for _ in range(8):
            n = int(torch.randint(1, 13, (1,), generator=g))
            prompts.append(prefix + torch.randint(0, 97, (n,), generator=g).tolist())
    return prompts


def reference(checkpoints, model_type: str, kind: str):
    """(path, prompts, transformers greedy outputs), computed once per model type and prompt set."""
    key = (model_type, kind)
    if key not in _refs:
        hf, path = checkpoints.get(model_type, **PARITY_OVERRIDES[model_type])
        prompts = mixed_prompts() if kind == "mixed" else shared_prefix_prompts()
        _refs[key] = (path, prompts, hf_greedy(hf, prompts, NUM_NEW_TOKENS))
    return _refs[key]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_matches_transformers_default_settings(checkpoints, model_type, test_device):
    path, prompts, expected = reference(checkpoints, model_type, "mixed")
    llm = LLM(path, device=test_device)
    outputs = llm.generate(prompts, GREEDY)
    assert token_ids(outputs) == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    llm.engine.block_manager.check_invariants()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_matches_transformers_under_preemption(checkpoints, model_type, test_device):
    path, prompts, expected = reference(checkpoints, model_type, "mixed")
    # 79 usable blocks of 4 tokens: the longest request (59 + 24 tokens) fits alone, a few fit together.
    llm = LLM(path, block_size=4, num_kv_blocks=80, max_num_batched_tokens=128, device=test_device)
    outputs = llm.generate(prompts, GREEDY)
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0
    assert token_ids(outputs) == expected
    # Preempted requests kept their log-probs: one per token, nothing duplicated.
    assert all(len(o.outputs[0].logprobs) == NUM_NEW_TOKENS for o in outputs)
    assert sum(o.outputs[0].num_preemptions for o in outputs) == stats["preemptions"]
    assert stats["free_kv_blocks"] == 79
    llm.engine.block_manager.check_invariants()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_matches_transformers_with_prefix_cache_hits(checkpoints, model_type, test_device):
    path, prompts, expected = reference(checkpoints, model_type, "shared")
    llm = LLM(path, block_size=8, enable_prefix_caching=True, max_num_batched_tokens=96, device=test_device)
    first = llm.generate(prompts[::8], GREEDY)  # one prompt per prefix warms the cache
    rest = llm.generate(prompts, GREEDY)
    stats = llm.engine.stats()
    assert stats["prefix_cache_hits"] >= 4 * 8 * 2  # every prompt reuses at least 2 prefix blocks
    assert token_ids(first) == expected[::8]
    assert token_ids(rest) == expected
    llm.engine.block_manager.check_invariants()


@pytest.mark.parametrize("shuffle_pool", [False, True])
def test_single_requests_match_transformers(checkpoints, shuffle_pool, test_device):
    """Batch 1 reads a lone sequence's consecutive blocks as a view; a shuffled pool forces a gather."""
    path, prompts, expected = reference(checkpoints, "llama", "mixed")
    llm = LLM(path, block_size=4, device=test_device)
    if shuffle_pool:
        free = list(llm.engine.block_manager.free_ids)
        random.Random(0).shuffle(free)
        llm.engine.block_manager.free_ids = deque(free)
    for i in range(0, 32, 6):
        assert token_ids(llm.generate([prompts[i]], GREEDY)) == [expected[i]]
