"""The persistent decode batch (`ModelRunner._continue_decode`, `_Batch.without_stopped`, `Scheduler.decoded`): a decode
step that continues the last one builds its inputs and its sampling batch from last step's rows, compacted by the rows
that stopped, and is scheduled without reading the sequences' tokens; every other step reads the sequences
(`_run_decode`, `_Batch`, `schedule`'s checks). Checked against an engine that always reads the sequences,
step by step, on a run with finishes, admissions, preemptions, prefix-cache hits, forked samples' partial-block copies,
an abort and weight updates."""

from __future__ import annotations

import numpy as np
import pytest

from inference_helpers import mixed_prompts, tiny_gqa_model
from rl_engine import LLM, SamplingParams
from rl_engine.inference import scheduler as scheduler_module
from rl_engine.inference.engine import _Batch
from rl_engine.inference.graph_cache import DecodeRunner
from rl_engine.inference.sequence import Request, Sequence

BLOCK = 4
_RUN = DecodeRunner.run


@pytest.fixture(params=["cpu", "torch"])
def inputs_backend(request):
    """A continued step's inputs by the registry's `continue_decode_inputs`: its C++ pass (`kernels/cpu/ops.py`), and
    its numpy reference (`model_runner.continue_decode_inputs`, where the extension is absent)."""
    from rl_engine.kernels import registry
    from rl_engine.kernels.cpu import extension_status

    if request.param == "cpu" and not extension_status()[0]:
        pytest.skip(f"no C++ CPU kernels: {extension_status()[1]}")
    previous = registry.default_registry().config
    registry.set_backend_overrides({**previous.overrides, "continue_decode_inputs": request.param})
    yield {"cpu": "rl_engine.kernels.cpu.ops", "torch": "rl_engine.inference.model_runner"}[request.param]
    registry.configure(previous)


def _record(monkeypatch, llm, *, persistent: bool) -> tuple[list, list]:
    """Record every decode step's inputs of `llm`'s engine; with `persistent` False no step continues the last one.
    Returns (the steps' inputs, the continued steps' indices)."""
    runner = llm.engine.runner
    steps, fast = [], []

    def recording_run(self, *, max_context_len, **kw):
        ctx = self.np_context_lens.copy()
        tables = [row[:-(-c // BLOCK)].tolist() for row, c in zip(self.np_block_tables, ctx)]
        steps.append((self.np_input_ids.tolist(), self.np_positions.tolist(), ctx.tolist(),
                      self.np_slot_mapping.tolist(), tables, max_context_len))
        return _RUN(self, max_context_len=max_context_len, **kw)

    monkeypatch.setattr(DecodeRunner, "run", recording_run)
    if persistent:
        cont = runner._continue_decode

        def counting(r, seqs, *a):
            out = cont(r, seqs, *a)
            if out is not None:
                fast.append(len(steps) - 1)  # (this step's index: its forward ran, and was recorded)
            return out

        runner._continue_decode = counting
    else:  # every step reads the sequences, and builds its sampling batch from them
        runner.decoded = lambda tokens, stopped: None
        llm.engine.scheduler.decoded = lambda: None
        monkeypatch.setattr(_Batch, "without_stopped", lambda self, seqs: None)
    return steps, fast


def _run(monkeypatch, *, persistent: bool):
    """Drive one engine through the scenario (a pool of 20 blocks of 4 tokens: preemptions); returns (each decode step's
    inputs, outputs, stats with the partial-block copies and the schedules that took the engine's report
    (`Scheduler.decoded`), how many decode steps continued the last one)."""
    continued = []
    check = scheduler_module.is_remainder

    def counted(*a):
        continued.append(check(*a))
        return continued[-1]

    monkeypatch.setattr(scheduler_module, "is_remainder", counted)
    llm = LLM(tiny_gqa_model(), block_size=BLOCK, num_kv_blocks=20, max_num_batched_tokens=48, seed=0,
              cpu_threads="fixed", graph_batch_sizes=[4, 8, 16, 32])
    engine, runner = llm.engine, llm.engine.runner
    copies = [0]
    copy = runner.copy_kv_blocks

    def counted_copy(pairs):
        copies[0] += len(pairs)
        copy(pairs)

    runner.copy_kv_blocks = counted_copy
    steps, fast = _record(monkeypatch, llm, persistent=persistent)
    prompts = mixed_prompts(10, vocab=64, seed=3, max_len=14)
    outputs = {}

    def add(i):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=6 + 3 * (i % 5), n=1 + i % 3,
                                stop_token_ids=[5, 9], logprobs=0)
        engine.add_request(str(i), prompts[i % 4] + prompts[i], params)  # shared heads: prefix-cache hits

    for i in range(6):
        add(i)
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        if step == 6:
            add(6)  # an admission (a prefill) among decodes
        if step == 9:
            engine.update_weights(lambda m: next(m.parameters()).mul_(1.01))  # the KV stays
        if step == 11:
            out = engine.abort(next(iter(engine.requests)))
            outputs[out.request_id] = out
        if step == 14:
            for i in (7, 8, 9):
                add(i)
        if step == 20:
            engine.update_weights(lambda m: next(m.parameters()).mul_(0.99), recompute_kv=True)
        for out in engine.step():
            outputs[out.request_id] = out
    result = {rid: [(c.token_ids, c.logprobs, c.finish_reason) for c in o.outputs] for rid, o in outputs.items()}
    stats = {**engine.stats(), "block_copies": copies[0], "continued_schedules": sum(continued),
             "inputs": getattr(runner._continue_inputs, "__module__", None)}
    return steps, result, stats, len(fast)


def test_continued_decode_steps_have_the_inputs_of_a_full_read(monkeypatch, inputs_backend):
    ref_steps, ref_out, ref_stats, _ = _run(monkeypatch, persistent=False)
    monkeypatch.undo()
    steps, out, stats, fast = _run(monkeypatch, persistent=True)
    assert out == ref_out
    assert len(steps) == len(ref_steps)
    for i, (got, want) in enumerate(zip(steps, ref_steps)):
        assert got == want, f"decode step {i}"
    # the scenario exercised what the check must catch, and the fast path ran (most decode steps)
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0 and stats["block_copies"] > 0
    assert stats["preemptions"] == ref_stats["preemptions"] and stats["steps"] == ref_stats["steps"]
    assert sum(1 for o in out.values() for _, _, r in o if r == "stop") > 3
    assert len(steps) // 2 < fast < len(steps)
    assert ref_stats["continued_schedules"] == 0 and len(steps) // 2 < stats["continued_schedules"] < len(steps)
    assert stats["inputs"] == inputs_backend


def test_a_continued_step_writes_a_new_block_and_drops_stopped_rows(monkeypatch, inputs_backend):
    """Every step of a batch with rows crossing block boundaries and rows stopping at different steps continues the
    last one; the rows' inputs match a full read's."""
    llm = LLM(tiny_gqa_model(), block_size=BLOCK, seed=0, cpu_threads="fixed", graph_batch_sizes=[8])
    runner = llm.engine.runner
    seen = []
    cont, full = runner._continue_decode, runner._run_decode

    def checked(r, seqs, last, decoded):
        out = cont(r, seqs, last, decoded)
        if out is not None:
            n = len(seqs)
            got = [a[:n].copy() for a in (r.np_input_ids, r.np_positions, r.np_slot_mapping, r.np_context_lens)]
            got_tables = [r.np_block_tables[i, :-(-c // BLOCK)].tolist() for i, c in enumerate(got[3])]
            # the full read, on the same rows (it rewrites them; the forward already ran on the fast inputs)
            rows = out[3]
            want = [np.array([s.token_ids[s.num_computed_tokens] for s in rows]),
                    np.array([s.num_computed_tokens for s in rows])]
            want.append(np.array([s.block_table[p // BLOCK] * BLOCK + p % BLOCK for s, p in zip(rows, want[1])]))
            want.append(want[1] + 1)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
            assert got_tables == [s.block_table[:-(-(p + 1) // BLOCK)] for s, p in zip(rows, want[1])]
            assert sorted(rows, key=lambda s: s.num_computed_tokens) == rows
            seen.append(n)
        return out

    runner._continue_decode = checked
    prompts = mixed_prompts(6, vocab=64, seed=5, max_len=10)
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True) for i in range(6)]
    llm.generate(prompts, params)
    assert len(seen) > 5 and seen[0] == 6 and seen[-1] == 3  # rows dropped as they stopped
    assert runner._continue_inputs.__module__ == inputs_backend


def test_a_batch_of_the_same_size_with_another_sequence_is_not_continued(monkeypatch):
    """Between two decode steps one request is aborted and one admitted whose prompt is cached but its last token (a
    decode row): the step has as many rows as the last one minus its stopped rows, but not its sequences."""
    prompts = mixed_prompts(4, vocab=64, seed=7, max_len=6)
    prompts = [[3, 4, 6, 8, 10, 12, 13, 14] + p for p in prompts]  # two full blocks in common
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = []
    for persistent in (False, True):
        monkeypatch.undo()
        llm = LLM(tiny_gqa_model(), block_size=BLOCK, seed=0, cpu_threads="fixed", graph_batch_sizes=[4, 8])
        engine = llm.engine
        steps, fast = _record(monkeypatch, llm, persistent=persistent)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        outputs, step = {}, 0
        while engine.has_unfinished_requests():
            step += 1
            if step == 4:
                engine.abort("1")
                engine.add_request("cached", prompts[0][:8] + [21], params)  # computes 1 token: a decode row
            for out in engine.step():
                outputs[out.request_id] = [c.token_ids for c in out.outputs]
        runs.append((steps, outputs, fast))
    (ref_steps, ref_out, _), (steps, out, fast) = runs
    assert out == ref_out and steps == ref_steps
    # decode step 2 (after the swap) has 4 rows, the admitted one at position 8; it is not continued, the others are
    assert steps[2][1][:4] == [8, 11, 12, 12] and steps[1][1][:4] == [10, 11, 11, 12]
    assert fast[:3] == [1, 3, 4]


def test_a_batch_without_its_stopped_rows_is_the_batch_of_the_rest():
    """`_Batch.without_stopped` (the engine's sampling batch of a decode step after one in which samples stopped)
    equals the batch built from the remaining sequences, over rows that differ in every field it reads."""
    settings = [dict(temperature=0.7, logprobs=0, seed=3), dict(temperature=0.7, logprobs=None, seed=None),
                dict(temperature=1.0, logprobs=2, seed=5), dict(temperature=0.7, logprobs=0, seed=3)]
    seqs = []
    for i, kw in enumerate(settings):
        params = SamplingParams(n=2, **kw)
        request = Request(str(i), prompt=None, prompt_token_ids=[1, 2], params=params, stream=i == 2)
        seqs += [Sequence(request, j, [1, 2], num_prompt_tokens=2, rng_seed=params.seed) for j in range(2)]
    seeded = [s for s in seqs if s.rng_seed is not None]  # (a batch with seeded uniforms: rows 0, 1, 4, 5, 6, 7)
    fields = ("params", "uniform", "logprobs", "top_rows", "streams")
    cases = [(seqs, rows) for rows in ([0], [2, 3], [4, 5], [1, 2, 3, 4, 5], [0, 7], [0, 1, 4, 5, 6, 7])]
    cases += [(seeded, rows) for rows in ([0], [2, 3], [0, 5], [1, 2, 3])]
    for rows_of, stopped in cases:
        batch = _Batch(rows_of)
        batch.stopped = stopped
        rest = [s for i, s in enumerate(rows_of) if i not in stopped]
        got, want = batch.without_stopped(rest), _Batch(rest)
        assert [getattr(got, f) for f in fields] == [getattr(want, f) for f in fields], stopped
        assert (got.seed_base is None) == (want.seed_base is None), stopped
        if want.seed_base is not None:
            np.testing.assert_array_equal(got.seed_base, want.seed_base)
        assert got.seqs is rest and got.stopped == []
        assert batch.without_stopped(rest[::-1]) is None and batch.without_stopped(rows_of[:len(rest)]) is None
