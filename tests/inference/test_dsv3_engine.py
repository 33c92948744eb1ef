"""DeepSeek-V3 in the engine: a paged latent KV cache (kv_lora_rank + qk_rope_head_dim values per
token per layer), absorbed decode, expanded prefill. Greedy equals transformers' token for token
(default, forced preemption, shared prefixes), behavior log-probs equal the trainer's, and
speculative decoding equals plain decoding."""

from __future__ import annotations

import pytest
import torch

from hf_models import make_hf_model
from inference_helpers import NUM_NEW_TOKENS, hf_greedy, mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.policy import from_pretrained
from test_hf_parity import shared_prefix_prompts
from test_logprobs import trainer_logprobs

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
# YaRN and group-limited routing on, so every part of the family runs in the engine.
DSV3 = dict(n_group=4, topk_group=2, num_experts_per_tok=3,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                             "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8})
_refs: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    """(transformers model, checkpoint directory)."""
    hf = make_hf_model("deepseek_v3", seed=5, **DSV3)
    path = tmp_path_factory.mktemp("dsv3")
    hf.save_pretrained(path)
    return hf, str(path)


def reference(dsv3, kind: str):
    if kind not in _refs:
        hf, path = dsv3
        prompts = mixed_prompts(16) if kind == "mixed" else shared_prefix_prompts()[::2]
        _refs[kind] = (path, prompts, hf_greedy(hf, prompts, NUM_NEW_TOKENS))
    return _refs[kind]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_dsv3_greedy_matches_transformers_default_settings(dsv3):
    path, prompts, expected = reference(dsv3, "mixed")
    llm = LLM(path)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    llm.engine.block_manager.check_invariants()


def test_dsv3_greedy_matches_transformers_under_preemption(dsv3):
    path, prompts, expected = reference(dsv3, "mixed")
    llm = LLM(path, block_size=4, num_kv_blocks=40, max_num_batched_tokens=96)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.stats()["preemptions"] > 0
    assert token_ids(outputs) == expected
    llm.engine.block_manager.check_invariants()


def test_dsv3_greedy_matches_transformers_with_prefix_cache_hits(dsv3):
    path, prompts, expected = reference(dsv3, "shared")
    llm = LLM(path, block_size=8, enable_prefix_caching=True, max_num_batched_tokens=96)
    first = llm.generate(prompts[::4], GREEDY)
    rest = llm.generate(prompts, GREEDY)
    assert llm.engine.stats()["prefix_cache_hits"] >= 4 * 4 * 2
    assert token_ids(first) == expected[::4]
    assert token_ids(rest) == expected


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_dsv3_engine_logprobs_equal_trainer_recompute(dsv3, temperature):
    policy = from_pretrained(dsv3[1])
    llm = LLM(policy, block_size=8, max_num_batched_tokens=128)  # chunked prefill + decode mixed
    prompts = mixed_prompts(8, seed=3)
    outputs = llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=16, n=2, seed=7,
                                                   ignore_eos=True))
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        for completion in out.outputs:
            expected = trainer_logprobs(policy, prompt, completion.token_ids, temperature)
            worst = max(worst, (torch.tensor(completion.logprobs) - expected).abs().max().item())
    assert worst <= 1e-5


def test_dsv3_latent_cache_bytes_per_token(dsv3, checkpoints):
    """kv_lora_rank + qk_rope_head_dim values per token per layer, against K and V of a GQA model
    of equal width (hidden 64, 4 heads of 16, 2 KV heads) and of the same model's expanded heads."""
    policy = from_pretrained(dsv3[1])
    llm = LLM(policy, block_size=8)
    cfg = policy.config
    latent = cfg.num_layers * (cfg.kv_lora_rank + cfg.head_dim) * 4
    assert llm.engine.runner.kv_bytes_per_token == latent == 3 * (16 + 8) * 4
    assert llm.engine.runner.v_caches == [] and llm.engine.runner.k_caches[0].shape[2:] == (1, 24)
    gqa = LLM(checkpoints.get("llama")[1], block_size=8).engine.runner.kv_bytes_per_token
    per_layer_gqa = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16, fp32
    assert gqa == 2 * per_layer_gqa  # the llama checkpoint has 2 layers
    expanded = cfg.num_layers * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.head_dim + cfg.v_head_dim) * 4
    print(f"KV bytes per token per layer: latent {latent // cfg.num_layers}, GQA (2 KV heads) {per_layer_gqa}, "
          f"expanded MLA heads {expanded // cfg.num_layers}")
    assert latent // cfg.num_layers < per_layer_gqa < expanded // cfg.num_layers


@pytest.mark.parametrize("k", [1, 3])
def test_dsv3_ngram_speculation_equals_plain(dsv3, k):
    policy = from_pretrained(dsv3[1])
    prompts = [p + p for p in mixed_prompts(6, seed=12, max_len=20)]  # repeats give the n-gram drafts
    plain = LLM(policy, block_size=4, num_kv_blocks=48, max_num_batched_tokens=64).generate(prompts, GREEDY)
    llm = LLM(policy, block_size=4, num_kv_blocks=48, max_num_batched_tokens=64, speculative_config={
        "method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    spec = llm.generate(prompts, GREEDY)
    assert token_ids(spec) == token_ids(plain)
    worst = max(abs(a - b) for o, r in zip(spec, plain) for a, b in zip(o.outputs[0].logprobs, r.outputs[0].logprobs))
    assert worst <= 1e-5
    assert llm.engine.stats()["speculative"]["draft_tokens"] > 0
