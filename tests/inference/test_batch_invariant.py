"""model.batch_invariant end to end: the trainer's recomputed log-probs equal the engine's behavior
log-probs bit for bit (mixed-length prompts with a shared prefix, n > 1, chunked prefill under a
small token budget, forced preemption, prefix-cache hits), and a prompt gives the same tokens and
log-prob bits alone and inside a batch of 64."""

from __future__ import annotations

import pytest
import torch

from hf_models import packed
from rl_engine import kernels
from rl_engine.inference import LLM, SamplingParams
from rl_engine.policy import from_pretrained


@pytest.fixture
def invariant_registry():
    before = kernels.set_batch_invariant(True)
    yield
    kernels.set_batch_invariant(before)


def _prompts(num: int, *, seed: int, shared: int = 20, vocab: int = 97) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (shared,), generator=gen).tolist()
    lengths = torch.randint(1, 40, (num,), generator=gen).tolist()
    return [prefix + torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def trainer_logprobs(model, prompts, outputs, temperature):
    """Per sample, the trainer's log-probs of its sampled tokens: one packed forward of every
    prompt + response, the model's chunked log-prob path (as the RL step computes them)."""
    seqs, spans = [], []
    for prompt, out in zip(prompts, outputs):
        for c in out.outputs:
            full = prompt + c.token_ids
            seqs.append(full)
            spans.append((len(prompt) - 1, len(c.token_ids)))
    ids, positions, cu = packed([s[:-1] for s in seqs])
    targets = torch.tensor([t for s in seqs for t in s[1:]])
    with torch.no_grad():
        hidden = model.hidden_states(ids, positions=positions, cu_seqlens=cu)
        logprobs, _ = model.token_logprobs(hidden, targets, temperature=temperature, chunk_tokens=37)
    return [logprobs[int(cu[i]) + start: int(cu[i]) + start + n] for i, (start, n) in enumerate(spans)]


@pytest.mark.parametrize("family,dtype", [("qwen2", torch.float32), ("qwen2", torch.bfloat16),
                                          ("qwen3_moe", torch.float32), ("qwen2_moe", torch.bfloat16)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_equal_behavior_logprobs_bitwise(checkpoints, invariant_registry, family, dtype,
                                                          temperature):
    _, path = checkpoints.get(family)
    model = from_pretrained(path, dtype=dtype)
    assert model.batch_invariant
    # 40 blocks of 16 tokens for 8 prompts x 2 samples of up to 59 + 24 tokens: the scheduler preempts;
    # 48 tokens per step: prompts are prefilled in chunks, next to other sequences' decodes.
    llm = LLM(model, block_size=16, num_kv_blocks=40, max_num_batched_tokens=48, seed=0)
    prompts = _prompts(8, seed=1)
    params = [SamplingParams(temperature=temperature, max_tokens=24, n=2, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    outputs = llm.generate(prompts, params)
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    mismatched = total = 0
    for (out, want) in zip([c for o in outputs for c in o.outputs], trainer_logprobs(model, prompts, outputs,
                                                                                      temperature)):
        behavior = torch.tensor(out.logprobs, dtype=torch.float32)
        total += len(behavior)
        mismatched += int((behavior != want).sum())
    assert total == 16 * 24 and mismatched == 0, f"{mismatched} of {total} log-probs differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_alone_equals_prompt_in_a_batch_of_64(checkpoints, invariant_registry, dtype):
    _, path = checkpoints.get("qwen3_moe")
    model = from_pretrained(path, dtype=dtype)
    prompts = _prompts(64, seed=7)  # one shared 20-token prefix
    prompt = prompts[30]
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=20, seed=123, ignore_eos=True)
    alone = LLM(model, block_size=16, seed=0).generate([prompt], [params])[0].outputs[0]
    batch_params = [SamplingParams(temperature=0.8, max_tokens=20, seed=1000 + i, ignore_eos=True) for i in range(64)]
    batch_params[30] = params
    # a small token budget (prefills in chunks beside other decodes), a pool of 40 blocks of 16 for
    # 64 sequences of up to 79 tokens (preemption), and the shared prefix (prefix-cache hits)
    llm = LLM(model, block_size=16, num_kv_blocks=40, max_num_batched_tokens=64, seed=0)
    inside = llm.generate(prompts, batch_params)[30].outputs[0]
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert inside.token_ids == alone.token_ids
    assert torch.equal(torch.tensor(inside.logprobs), torch.tensor(alone.logprobs))
