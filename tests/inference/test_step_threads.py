"""StepThreads (kernels/cpu/threads.py): a small model's decode steps run on one thread or on all of torch's, whichever
measured faster for steps of their size, and the choice changes no bit of what a step produces, so a run's tokens and
log-probs do not depend on it (under cpu_threads="fixed" a run stays repeatable)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.inference.compiled_decode import cpp_compiler
from rl_engine.kernels.cpu import threads
from rl_engine.kernels.cpu.threads import StepThreads
from rl_engine.policy import from_pretrained

SMALL = dict(flops=threads.SMALL_STEP_FLOPS / 2, model_bytes=threads.SMALL_MODEL_BYTES // 2)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_each_rows_bucket_keeps_the_count_its_steps_measured_faster(monkeypatch, two_threads):
    """A fake clock: a step of 100 rows costs 1.0 s at one thread and 0.5 at two, one of 10 rows 0.2 and 0.3; the
    first step at each count (a compiled step compiles then) costs 100 s and is not counted."""
    clock = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    cost = {100: {1: 1.0, 2: 0.5}, 10: {1: 0.2, 2: 0.3}}
    step_threads = StepThreads()
    seen = {100: [], 10: []}
    for _ in range(2 * (StepThreads.SAMPLES + 1) + 3):
        for rows in (100, 10):
            with step_threads.run(SMALL["flops"], model_bytes=SMALL["model_bytes"], rows=rows) as used:
                assert torch.get_num_threads() == used
                clock[0] += 100.0 if used not in seen[rows] else cost[rows][used]
                seen[rows].append(used)
            assert torch.get_num_threads() == 2  # restored after each step
    assert step_threads.choice == {(128, 2): 2, (16, 2): 1}
    for rows, kept in ((100, 2), (10, 1)):
        exploring = seen[rows][:2 * (StepThreads.SAMPLES + 1)]
        assert sorted(exploring) == [1] * (StepThreads.SAMPLES + 1) + [2] * (StepThreads.SAMPLES + 1)
        assert seen[rows][len(exploring):] == [kept] * 3


def test_steps_the_timing_does_not_cover_keep_the_rules(monkeypatch, two_threads):
    step_threads = StepThreads()
    with step_threads.run(SMALL["flops"], model_bytes=SMALL["model_bytes"], rows=None) as used:  # a prefill step
        assert used == 1 == torch.get_num_threads()  # single_thread_below's rule
    for flops, model_bytes in ((threads.SMALL_STEP_FLOPS, SMALL["model_bytes"]),
                               (SMALL["flops"], threads.SMALL_MODEL_BYTES)):
        with step_threads.run(flops, model_bytes=model_bytes, rows=64) as used:  # past the bounds: every thread
            assert used == 2 == torch.get_num_threads()
    with pytest.raises(RuntimeError):  # a step that fails: its thread count restored, its time not counted
        with step_threads.run(SMALL["flops"], model_bytes=SMALL["model_bytes"], rows=64):
            raise RuntimeError("step failed")
    assert torch.get_num_threads() == 2 and step_threads._times == {(64, 2): ([], [])}
    torch.set_num_threads(1)
    with step_threads.run(SMALL["flops"], model_bytes=SMALL["model_bytes"], rows=64) as used:
        assert used == 1
    assert step_threads.choice == {} and step_threads._times == {(64, 2): ([], [])}


@pytest.mark.parametrize("compile_decode", [False, pytest.param(True, marks=pytest.mark.skipif(
    cpp_compiler() is None, reason="torch.compile's CPU backend needs a C++ compiler (g++ or CXX)"))])
def test_a_steps_thread_count_changes_none_of_its_bits(qwen2, compile_decode, two_threads):
    """The same sampled requests with every step at one thread, then at two: the same tokens and log-probs, bit for
    bit (the parallel loops split rows, heads and output columns, never a sum)."""
    policy = from_pretrained(qwen2[1], dtype=torch.float32)
    llm = LLM(policy, compile_decode=compile_decode, graph_batch_sizes=[2, 4, 8, 16], block_size=8,
              cpu_threads="fixed")
    engine = llm.engine
    prompts = mixed_prompts(12, seed=5, max_len=30)
    params = [SamplingParams(temperature=1.0, max_tokens=20, seed=i, logprobs=0) for i in range(len(prompts))]

    def at(count):
        @contextlib.contextmanager
        def fixed(sched):  # (prefill steps at one thread, as StepThreads runs them)
            torch.set_num_threads(count if sched.num_single == len(sched.seqs) else 1)
            try:
                yield
            finally:
                torch.set_num_threads(2)
        return fixed

    runs = []
    for count in (1, 2):
        engine._step_threads = at(count)
        engine.reset_prefix_cache()  # (else the second run's prompts come from the first's cached blocks)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)])
    assert sum(len(tokens) for tokens, _ in runs[0]) > 100
    for a, b in zip(*runs):
        assert a == b, next(i for i, (x, y) in enumerate(zip(a[1], b[1])) if x != y)
