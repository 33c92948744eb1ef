"""Prefill chunks that start their sequences, consecutive and of one length, attend in one batched
SDPA call (`attention.PrefillRun`): the same bits as one call per chunk, and the plan merges exactly
those runs. A CPU engine's steps take their tensors from the step arena, with the same bits."""

from __future__ import annotations


import pytest
import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.inference.attention import PagedAttention, PrefillChunk, PrefillRun, _plan_prefills
from rl_engine.kernels.cpu import host_memory
from rl_engine.policy import from_pretrained


def _chunks(lengths: list[int], *, cached: set[int] = frozenset(), prefix: int = 4) -> list[PrefillChunk]:
    """Back-to-back chunks of these lengths; those at an index in `cached` continue a sequence of
    `prefix` cached tokens in block 1."""
    out, start = [], 0
    for i, n in enumerate(lengths):
        blocks = torch.tensor([1, 2, 3]) if i in cached else None
        out.append(PrefillChunk(start=start, end=start + n, context_len=n + (prefix if i in cached else 0),
                                block_ids=blocks))
        start += n
    return out


def test_plan_merges_consecutive_fresh_chunks_of_one_length():
    plan = _plan_prefills(_chunks([5, 5, 5, 7, 3, 3, 4, 4], cached={4}))
    assert plan[0] == PrefillRun(start=0, end=15, count=3)
    assert isinstance(plan[1], PrefillChunk) and plan[1].end - plan[1].start == 7  # a lone length stays a chunk
    assert isinstance(plan[2], PrefillChunk) and plan[2].block_ids is not None  # a cached prefix: never merged
    assert isinstance(plan[3], PrefillChunk) and plan[3].end - plan[3].start == 3
    assert plan[4] == PrefillRun(start=28, end=36, count=2)
    assert len(plan) == 5


def test_batched_prefill_runs_equal_one_call_per_chunk():
    torch.manual_seed(0)
    Hq, Hkv, D, bs = 4, 2, 16, 8
    k_caches = [torch.randn(24, bs, Hkv, D)]
    v_caches = [torch.randn(24, bs, Hkv, D)]
    prefills = _chunks([13] * 6 + [5, 9, 9, 9], cached={6})
    T = prefills[-1].end
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    slots = torch.arange(T) + 4 * bs  # blocks 4.. (1-3 hold the cached prefix)
    attn = PagedAttention(k_caches, v_caches, first_layer=0)
    attn.prepare(slot_mapping=slots, num_single=0, block_tables=None, context_lens=None, max_context_len=0,
                 prefills=prefills)
    assert sum(isinstance(p, PrefillRun) for p in attn.prefill_plan) == 2
    batched = attn.attend(0, q, k, v, scale=0.25)
    attn.prefill_plan = list(prefills)  # one call per chunk
    per_chunk = attn.attend(0, q, k, v, scale=0.25)
    assert torch.equal(batched, per_chunk)
    # and the run's rows are causal attention over each sequence alone
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[13:26].transpose(0, 1), k[13:26].repeat_interleave(2, dim=1).transpose(0, 1),
        v[13:26].repeat_interleave(2, dim=1).transpose(0, 1), is_causal=True, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(batched[13:26], ref, rtol=1e-6, atol=1e-6)


def test_cpu_engine_steps_take_their_tensors_from_the_step_arena(qwen2):
    """A CPU engine's steps (prefill and decode) run inside `host_memory.step_arena`: the arena serves their
    tensors, and the tokens and log-probs are the bits of the same steps on torch's allocator (an engine with
    `cpu_step_arena=False`, which the arena does not serve)."""
    if not host_memory.step_arena_available():
        pytest.skip("the step arena's C++ extension is unavailable")
    arena = host_memory._step_arena()
    prompts = mixed_prompts(6, seed=5, max_len=40)
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, ignore_eos=True)
    outputs = {}
    for on in (True, False):
        llm = LLM(from_pretrained(qwen2[1], dtype=torch.float32), block_size=8, cpu_threads="fixed",
                  cpu_step_arena=on)
        served = arena.stats()[2]
        outputs[on] = llm.generate(prompts, params)
        assert (arena.stats()[2] > served) == on
    for a, b in zip(outputs[True], outputs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # bit for bit
