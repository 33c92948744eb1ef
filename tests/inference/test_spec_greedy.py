"""Greedy outputs with speculative decoding equal those without, token for token (fp32), for the n-gram
and the draft-model methods at k in {1, 3, 5}: with prefix caching serving shared prefixes, with a
KV pool small enough to preempt, and in a randomized schedule (arrivals, interrupts, aborts, n > 1,
a tiny token budget). Stop conditions inside a run of accepted drafts cut exactly where plain
decoding stops. Log-probs equal plain decoding's (<= 1e-5) and the block pool balances."""

from __future__ import annotations

import random

import pytest
import torch

from inference_helpers import PARITY_OVERRIDES, mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.policy import from_pretrained
from spec_helpers import truncated_draft

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
SETTINGS = {
    # shared prefixes, admission spread over steps by a small budget: later prompts hit cached blocks
    "prefix_cache": dict(block_size=8, max_num_batched_tokens=64, enable_prefix_caching=True),
    # 39 usable blocks of 4 tokens: requests are preempted and recomputed (prefix caching stays on)
    "preemption": dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=96),
}
_refs: dict[str, list] = {}


@pytest.fixture(scope="module")
def target(checkpoints):
    return from_pretrained(checkpoints.get("qwen2", **PARITY_OVERRIDES["qwen2"])[1], dtype=torch.float32)


@pytest.fixture(scope="module")
def draft(target):
    return truncated_draft(target, 1)


def prompts_for(setting: str) -> list[list[int]]:
    if setting == "prefix_cache":
        g = torch.Generator().manual_seed(11)
        prefixes = [torch.randint(0, 97, (20,), generator=g).tolist() for _ in range(2)]
        return [prefixes[i % 2] + torch.randint(0, 97, (1 + i,), generator=g).tolist() for i in range(8)]
    return mixed_prompts(10, seed=12, max_len=40)


def reference(target, setting: str):
    if setting not in _refs:
        _refs[setting] = LLM(target, **SETTINGS[setting]).generate(prompts_for(setting), GREEDY)
    return _refs[setting]


def spec_config(method: str, k: int, draft) -> dict:
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": k}


def assert_same(outputs, expected) -> None:
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    worst = max(abs(a - b) for o, r in zip(outputs, expected)
                for a, b in zip(o.outputs[0].logprobs, r.outputs[0].logprobs))
    assert worst <= 1e-5


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_plain(target, draft, setting, method, k):
    expected = reference(target, setting)
    llm = LLM(target, speculative_config=spec_config(method, k, draft), **SETTINGS[setting])
    outputs = llm.generate(prompts_for(setting), GREEDY)
    assert_same(outputs, expected)
    stats = llm.engine.stats()
    spec = stats["speculative"]
    assert spec["draft_tokens"] > 0 and 0 < spec["accepted_tokens"] < spec["draft_tokens"]
    if setting == "preemption":
        assert stats["preemptions"] > 0
    else:
        assert stats["prefix_cache_hits"] > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.check_invariants()
    if method == "draft_model":  # the draft's own pool balances too
        draft_bm = llm.engine.speculator.proposer.block_manager
        assert draft_bm.num_free_blocks == draft_bm.num_usable_blocks
        draft_bm.check_invariants()


def test_verify_chunks_share_batches_with_plain_decodes_and_prefills(target):
    """Continuous batching: one step holds prefill chunks, plain decodes and verify chunks; a target
    that drafts for itself accepts everything and crosses block boundaries on every step."""
    prompts = mixed_prompts(10, seed=13, max_len=40)
    seen = []
    llm = LLM(target, block_size=4, max_num_batched_tokens=48, speculative_config={
        "method": "draft_model", "model": target, "num_speculative_tokens": 5})
    runner = llm.engine.runner
    execute = runner.execute

    def recording_execute(sched, **kw):
        seen.append([(s.num_draft_tokens, n, s.num_computed_tokens == 0) for s, n in zip(sched.seqs,
                                                                                       sched.num_new_tokens)])
        return execute(sched, **kw)

    runner.execute = recording_execute
    params = [SamplingParams(temperature=0.0, max_tokens=3 + i, ignore_eos=True) for i in range(10)]
    outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in
                                                           LLM(target).generate(prompts, params)]
    mixed = [step for step in seen if any(d for d, _, _ in step) and any(n == 1 for _, n, _ in step)
             and any(not d and n > 1 for d, n, _ in step)]
    assert mixed, "no step mixed verify chunks, one-token decodes and prefill chunks"
    assert llm.engine.stats()["speculative"]["acceptance_rate"] == 1.0


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_stops_inside_accepted_drafts_match_plain(target, method):
    prompts = mixed_prompts(6, seed=14, max_len=30)
    free_run = LLM(target).generate(prompts, GREEDY)
    params = []
    for i, out in enumerate(free_run):  # stop on a token plain decoding emits mid-way, or a min/max length
        tokens = out.outputs[0].token_ids
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[tokens[6]]))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[tokens[2]], min_tokens=5))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    config = spec_config(method, 5, target)  # the target drafting for itself accepts every draft
    spec = LLM(target, speculative_config=config).generate(prompts, params)
    plain = LLM(target).generate(prompts, params)
    for s, p in zip(spec, plain):
        assert s.outputs[0].token_ids == p.outputs[0].token_ids
        assert (s.outputs[0].finish_reason, s.outputs[0].stop_reason) == (p.outputs[0].finish_reason,
                                                                          p.outputs[0].stop_reason)
        assert len(s.outputs[0].logprobs) == len(s.outputs[0].token_ids) == len(s.outputs[0].policy_versions)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_random_schedule_with_speculation_matches_plain(target, draft, method):
    """Arrivals at random steps, interrupts and resubmissions, aborts, n > 1, shared prefixes, a
    7-token budget that cuts verify chunks, a 31-block pool that preempts; the pool balances after
    every step."""
    rng = random.Random(1)
    base = mixed_prompts(6, seed=50, max_len=30)
    prompts = base + [base[i][:12] + p[:5] for i, p in enumerate(mixed_prompts(6, seed=51, max_len=30))]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 14), n=rng.choice([1, 2]), ignore_eos=True)
              for _ in prompts]
    expected = LLM(target).generate(prompts, params)
    llm = LLM(target, block_size=2, num_kv_blocks=32, max_num_batched_tokens=7, max_num_seqs=5,
              speculative_config=spec_config(method, 3, draft))
    engine, bm = llm.engine, llm.engine.block_manager
    pending = list(range(len(prompts)))
    rng.shuffle(pending)
    results, aborted = {}, set()
    steps = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):
            if pending:
                i = pending.pop()
                engine.add_request(str(i), prompts[i], params[i])
        if steps % 9 == 8:
            for partial in engine.interrupt():
                engine.add_request(partial.request_id, partial)
        if steps % 13 == 12 and engine.requests:
            victim = rng.choice(sorted(engine.requests))
            engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            results[out.request_id] = out
        bm.check_invariants()
        assert all(s.num_draft_tokens == 0 for r in engine.requests.values() for s in r.seqs)
        steps += 1
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["speculative"]["accepted_tokens"] > 0
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert aborted and set(results) == {str(i) for i in range(len(prompts))} - aborted
    for rid, out in results.items():
        ref = expected[int(rid)]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs], rid
        for c, r in zip(out.outputs, ref.outputs):
            assert max(abs(a - b) for a, b in zip(c.logprobs, r.logprobs)) <= 1e-5


def test_disable_by_batch_size_drafts_only_below_the_limit(target):
    prompts = mixed_prompts(3, seed=15, max_len=30)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 5, 18)]
    expected = LLM(target).generate(prompts, params)
    proposed = {}
    for limit in (1, 2, None):
        config = {**spec_config("ngram", 3, None), "disable_by_batch_size": limit}
        llm = LLM(target, speculative_config=config)
        assert_same(llm.generate(prompts, params), expected)
        proposed[limit] = llm.engine.stats()["speculative"]["proposed_tokens"]
    assert proposed[1] == 0 < proposed[2] < proposed[None]  # limit 2: only once a single request is left
