"""RL controls: abort, interrupt and resume (partial rollouts), weights versions, prefix-cache reset,
and the n samples of a prompt sharing its blocks."""

from __future__ import annotations

import pytest
import torch

from inference_helpers import mixed_prompts, tiny_gqa_model
from rl_engine import LLM, SamplingParams
from rl_engine.policy import from_pretrained
from test_logprobs import trainer_logprobs

PARAMS = SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=11, ignore_eos=True)


@pytest.fixture
def policy(qwen2):
    return from_pretrained(qwen2[1], dtype=torch.float32)


def run_steps(llm: LLM, prompts, params, steps: int) -> None:
    for i, p in enumerate(prompts):
        llm.engine.add_request(f"r{i}", p, params)
    for _ in range(steps):
        llm.engine.step()


def test_interrupt_then_resume_with_same_weights_equals_uninterrupted(policy):
    prompts = mixed_prompts(6, seed=12)
    reference = LLM(policy).generate(prompts, PARAMS)
    llm = LLM(policy, block_size=4)
    run_steps(llm, prompts, PARAMS, steps=6)
    partial = llm.interrupt()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_usable_blocks
    assert [p.request_id for p in partial] == [f"r{i}" for i in range(6)]
    lengths = [len(c.token_ids) for p in partial for c in p.outputs]
    assert all(c.finish_reason == "abort" for p in partial for c in p.outputs)
    assert 0 < min(lengths) and max(lengths) < 16
    resumed = llm.generate(partial)
    for ref, out, part in zip(reference, resumed, partial):
        assert out.prompt_token_ids == ref.prompt_token_ids
        for r, c, pc in zip(ref.outputs, out.outputs, part.outputs):
            assert c.token_ids == r.token_ids and c.finish_reason == "length"
            assert c.logprobs[:len(pc.logprobs)] == pc.logprobs  # earlier log-probs kept as they were
            assert max(abs(a - b) for a, b in zip(c.logprobs, r.logprobs)) <= 1e-5


def test_resume_after_weight_update_stamps_versions_and_recomputes_kv(policy):
    prompts = mixed_prompts(4, seed=13)
    llm = LLM(policy)
    run_steps(llm, prompts, PARAMS, steps=5)
    partial = llm.interrupt()
    with torch.no_grad():
        new_weight = policy.norm.weight * 1.5
    version = llm.update_weights(lambda m: m.norm.weight.copy_(new_weight))
    assert version == 1 == llm.weights_version
    resumed = llm.generate(partial)
    for prompt, part, out in zip(prompts, partial, resumed):
        for pc, c in zip(part.outputs, out.outputs):
            k = len(pc.token_ids)
            assert c.token_ids[:k] == pc.token_ids and len(c.token_ids) == 16
            assert c.policy_versions == [0] * k + [1] * (16 - k)
            assert c.kv_versions == [0] * k + [1] * (16 - k)  # resumed KV was recomputed with v1
            expected = trainer_logprobs(policy, prompt, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs[k:], expected[k:].tolist())) <= 1e-5


@pytest.mark.parametrize("recompute_kv", [False, True])
def test_update_between_steps_without_interrupt(policy, recompute_kv):
    prompts = mixed_prompts(3, seed=14)
    llm = LLM(policy)
    run_steps(llm, prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), steps=4)
    llm.update_weights(version=7, recompute_kv=recompute_kv)
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += llm.engine.step()
    for out in outs:
        c = out.outputs[0]
        assert c.policy_versions == [0] * 4 + [7] * 6
        # Without recompute the old KV stays: the tokens sampled after the update attended to v0 KV.
        assert c.kv_versions == [0] * 4 + ([7] if recompute_kv else [0]) * 6
    with pytest.raises(ValueError, match="must increase: current 7, got 3"):
        llm.update_weights(version=3)
    with pytest.raises(RuntimeError, match="boom"):
        llm.update_weights(lambda m: (_ for _ in ()).throw(RuntimeError("boom")))
    assert llm.weights_version == 7


def test_abort_one_request_others_finish(policy):
    llm = LLM(policy)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    run_steps(llm, mixed_prompts(3, seed=15), params, steps=3)
    aborted = llm.engine.abort("r1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert 0 < len(aborted.outputs[0].token_ids) < 12
    assert llm.engine.abort("r1") is None
    done = []
    while llm.engine.has_unfinished_requests():
        done += llm.engine.step()
    assert sorted(o.request_id for o in done) == ["r0", "r2"]
    assert all(len(o.outputs[0].token_ids) == 12 for o in done)
    llm.engine.block_manager.check_invariants()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_usable_blocks


def test_n_samples_share_the_prompt_blocks(qwen2):
    llm = LLM(qwen2[1], block_size=8, enable_prefix_caching=False)
    engine = llm.engine
    prompt = mixed_prompts(1, seed=16, max_len=60)[0] * 2  # long enough for several blocks
    prompt = prompt[:41]
    engine.add_request("g", prompt, SamplingParams(n=4, max_tokens=6, seed=1, ignore_eos=True))
    engine.step()  # the leader prefills and samples; its siblings fork
    engine.step()
    seqs = engine.requests["g"].seqs
    shared = (41 - 1) // 8
    tables = [s.block_table for s in seqs]
    assert all(t[:shared] == tables[0][:shared] for t in tables)
    assert [engine.block_manager.ref_counts[b] for b in tables[0][:shared]] == [4] * shared
    assert len({t[shared] for t in tables}) == 4  # the block with the last prompt token is private
    out = []
    while engine.has_unfinished_requests():
        out += engine.step()
    assert len(out[0].outputs) == 4 and all(len(c.token_ids) == 6 for c in out[0].outputs)
    engine.block_manager.check_invariants()


def test_reset_prefix_cache(qwen2):
    llm = LLM(qwen2[1], block_size=4)
    prompt = list(range(30))
    params = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([prompt], params)
    hits = llm.engine.stats()["prefix_cache_hits"]
    llm.generate([prompt], params)
    assert llm.engine.stats()["prefix_cache_hits"] == hits + 7
    llm.reset_prefix_cache()
    llm.generate([prompt], params)
    assert llm.engine.stats()["prefix_cache_hits"] == hits + 7


def test_resubmitting_finished_completions_returns_them_unchanged(qwen2):
    llm = LLM(qwen2[1])
    params = SamplingParams(temperature=0.0, max_tokens=5, n=2, ignore_eos=True)
    done = llm.generate([[1, 2, 3]], params)[0]
    again = llm.generate([done])[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in done.outputs]
    assert [c.finish_reason for c in again.outputs] == ["length", "length"]
    assert not llm.engine.has_unfinished_requests()


def record_schedules(engine) -> list:
    """Every SchedulerOutput the engine's steps run from now on, in order."""
    outputs, schedule = [], engine.scheduler.schedule
    engine.scheduler.schedule = lambda: outputs.append(schedule()) or outputs[-1]
    return outputs


@pytest.mark.parametrize("keep", [None, "sink", "switch"])
def test_forked_samples_copy_the_leaders_partial_block(policy, keep):
    """A prompt of 37 tokens in blocks of 8: 4 full blocks shared, and the leader's 5th block holds prompt tokens
    32..35 (its last token, 36, each sample computes itself for its own logits). Each other sample, when admitted,
    gets a copy of that block, so its first step is a decode row (one token), where it prefilled tokens 32..36; a
    hidden-state sink (which must see every computed token) or fork_copy_partial_block=False keeps the prefill.
    Either way: the trainer's log-probs within the contract (fp32, 1e-5), the blocks private past the shared ones,
    the pool's invariants."""
    llm = LLM(policy, block_size=8, enable_prefix_caching=False, fork_copy_partial_block=keep != "switch")
    engine = llm.engine
    if keep == "sink":
        engine.runner.hidden_sink = lambda layout, hidden: None
    prompt = (mixed_prompts(1, seed=16, max_len=60)[0] * 2)[:37]
    engine.add_request("g", prompt, SamplingParams(n=4, max_tokens=6, seed=1, ignore_eos=True))
    engine.step()  # the leader prefills and samples; its siblings fork, waiting with the 4 shared blocks only
    children = engine.requests["g"].seqs[1:]
    assert [(c.num_computed_tokens, len(c.block_table)) for c in children] == [(32, 4)] * 3
    schedules = record_schedules(engine)
    tokens_before = engine.num_generated_tokens
    engine.step()  # every sample computes one token (copied block) or the children prefill 5 tokens
    assert engine.num_generated_tokens - tokens_before == 4
    tables = [s.block_table for s in engine.requests["g"].seqs]
    assert schedules[0].num_new_tokens == ([1] * 4 if keep is None else [1, 5, 5, 5])
    assert schedules[0].block_copies == ([(tables[0][4], t[4]) for t in tables[1:]] if keep is None else [])
    assert all(t[:4] == tables[0][:4] for t in tables)
    assert len({t[4] for t in tables}) == 4  # the block with the last prompt token is private
    out = []
    while engine.has_unfinished_requests():
        out += engine.step()
    engine.block_manager.check_invariants()
    for c in out[0].outputs:
        assert len(c.token_ids) == 6
        expected = trainer_logprobs(policy, prompt, c.token_ids, 1.0)
        assert (torch.tensor(c.logprobs) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("num_kv_blocks,max_num_seqs,max_num_batched_tokens,prefix_caching",
                         [(20, 6, 2048, True), (24, 6, 2048, True), (32, 6, 2048, True), (12, 2, 7, False)])
def test_forked_samples_copy_in_a_tight_pool_with_preemption(num_kv_blocks, max_num_seqs, max_num_batched_tokens,
                                                             prefix_caching):
    """tests/kernels/test_paged_decode_engine_state's engine state, with the forked samples' copy on (its default):
    a pool of 11 to 31 usable blocks of 4 tokens for requests needing ~50, six prompts sharing a 10-token prefix,
    two samples each. The copy's block is taken when the scheduler admits a sample, so a waiting sample holds only
    the full blocks it shares; copying at the fork instead (session 15's dda1c80) left every sequence waiting at 24
    blocks ("requests are unfinished but none could be scheduled"). At 20 the shared blocks alone did (a sample
    waiting after its leader finished), and at 12 blocks with 7-token chunks a sequence preempting itself was
    readmitted for its first chunk only to preempt itself again: waiting samples now release their blocks
    (`Scheduler._release_waiting_blocks`, counted) when nothing runs or before the newest running sequence would
    preempt itself. Every sample finishes (a hang fails: steps are capped), some preempted; at 32 blocks some
    samples are admitted with a copy; the log-probs are the trainer's within the contract (fp32, 1e-5)."""
    model = tiny_gqa_model()
    llm = LLM(model, block_size=4, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=prefix_caching)
    engine = llm.engine
    schedules = record_schedules(engine)
    releases, release = [], engine.scheduler._release_waiting_blocks
    engine.scheduler._release_waiting_blocks = lambda: releases.append(release()) or releases[-1]
    step = engine.step

    def capped_step():
        assert len(schedules) < 2000, "no end in 2000 steps"
        return step()

    engine.step = capped_step
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 64, (10,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 64, (int(k),), generator=g).tolist() for k in (1, 3, 5, 6, 2, 4)]
    outs = llm.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=24, ignore_eos=True, seed=5))
    stats = engine.stats()
    assert stats["preemptions"] > 0 and (stats["prefix_cache_hits"] > 0) == prefix_caching, stats
    if num_kv_blocks in (12, 20):
        assert any(releases)
    if num_kv_blocks == 32:
        assert sum(len(s.block_copies) for s in schedules) > 0
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            assert len(c.token_ids) == 24
            expected = trainer_logprobs(model, prompt, c.token_ids, 1.0)
            assert (torch.tensor(c.logprobs) - expected).abs().max().item() <= 1e-5
