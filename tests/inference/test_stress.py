"""A randomized run of the whole engine with a tiny pool: arrivals at random steps, interrupts and
resubmissions, aborts, n > 1, shared prefixes, chunked prefill, preemption. Greedy outputs must equal
a roomy single-batch run's, and the block pool must balance after every step."""

from __future__ import annotations

import random

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams


def test_random_schedule_keeps_outputs_and_blocks_consistent(qwen2):
    rng = random.Random(0)
    base = mixed_prompts(8, seed=50, max_len=30)
    prompts = base + [base[i][:12] + p[:5] for i, p in enumerate(mixed_prompts(8, seed=51, max_len=30))]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 14), n=rng.choice([1, 2]), ignore_eos=True)
              for _ in prompts]
    expected = LLM(qwen2[1]).generate(prompts, params)

    llm = LLM(qwen2[1], block_size=2, num_kv_blocks=32, max_num_batched_tokens=7, max_num_seqs=5)
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
        if steps % 9 == 8:  # partial rollouts: stop everything, resubmit
            for partial in engine.interrupt():
                engine.add_request(partial.request_id, partial)
        if steps % 13 == 12 and engine.requests:
            victim = rng.choice(sorted(engine.requests))
            engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            results[out.request_id] = out
        bm.check_invariants()
        steps += 1
    assert engine.stats()["preemptions"] > 0 and bm.num_hits > 0
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert aborted and set(results) == {str(i) for i in range(len(prompts))} - aborted
    for rid, out in results.items():
        ref = expected[int(rid)]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs], rid
        for c, r in zip(out.outputs, ref.outputs):
            assert max(abs(a - b) for a, b in zip(c.logprobs, r.logprobs)) <= 1e-5
