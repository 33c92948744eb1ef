"""`rollout.compile_decode` in a training run with a rollout worker (disaggregated actors) or colocated
engines: the engine is built from the run's config with its decode step compiled by torch.compile (its log
says so, with the compile's seconds, and so do the step rows' `rollout/decode_compile_s`), the run
completes, and its behaviour log-probs keep the log-prob contract against the trainer's (sync: identical
weights, so importance ratios ~1, the bounds of the actor tests).

The compiled step is within the contract, not bit for bit, so the run is checked on the contract rather
than sample for sample against an eager run. One dynamic-batch compile serves every bucket of 2+ rows
(14-37 s for builtin:tiny on the shared 2 cores, niced; the whole test 26-71 s), and later steps reuse
it after each weight update; a bucket of one row compiles a static step of its own (~4 s) if EOS leaves
one row running."""

from __future__ import annotations

import re

import pytest

from rl_actor_helpers import actor_rows
from rl_engine.inference.compiled_decode import cpp_compiler

COMPILED = re.compile(r"compiled the decode step of bucket (\d+) \((.*?), (\d+) threads\) in ([0-9.]+) s")


@pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile's CPU backend needs a C++ compiler (g++ or CXX)")
@pytest.mark.parametrize("placement, engine_log", [("disaggregated", "rollout-0.log"), ("colocated", "trainer-0.log")])
def test_run_with_compiled_decode(tmp_path, monkeypatch, placement, engine_log):
    out = tmp_path / "run"
    got = actor_rows(out, monkeypatch, f"placement.mode={placement}", "rollout.compile_decode=true", "train.steps=2")
    assert [row["step"] for row in got] == [1, 2]
    for row in got:
        assert row["tokens/total"] > 0
        assert row["train/mismatch_k3"] <= 1e-6 and abs(row["train/is_ratio_max"] - 1) <= 1e-5, row
    compiles = COMPILED.findall((out / "logs" / engine_log).read_text())
    assert compiles and all(float(seconds) > 0 for _, _, _, seconds in compiles), compiles
    # The engine's compile seconds reach metrics.jsonl: the first compile (the evaluation before RL or step
    # 1's rollout) in step 1's row; the rows add up to at most what the log lists (the final evaluation's
    # compiles, if any, come after the last row). The log rounds each to 0.1 s.
    reported = [row["rollout/decode_compile_s"] for row in got]
    assert all(s >= 0 for s in reported) and reported[0] >= float(compiles[0][3]) - 0.05, (reported, compiles)
    assert sum(reported) <= sum(float(s) for _, _, _, s in compiles) + 0.05 * len(compiles), (reported, compiles)
    # the shared step of 2+ rows compiled once per torch thread count for the whole run (fc350d3: a step per
    # count): the weight update did not recompile it
    shared = [threads for _, kind, threads, _ in compiles if kind == "every bucket of 2+ rows"]
    assert shared and len(shared) == len(set(shared)), compiles
