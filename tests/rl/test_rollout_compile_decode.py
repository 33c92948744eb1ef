"""`rollout.compile_decode` in a training run with a rollout worker (disaggregated actors): the worker's
engine is built from the run's config with its decode step compiled by torch.compile (its log says so,
with the compile's seconds), the run completes, and its behaviour log-probs keep the log-prob contract
against the trainer's (sync: identical weights, so importance ratios ~1, the bounds of the actor tests).

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
def test_disaggregated_run_with_compiled_decode(tmp_path, monkeypatch):
    out = tmp_path / "run"
    got = actor_rows(out, monkeypatch, "placement.mode=disaggregated", "rollout.compile_decode=true", "train.steps=2")
    assert [row["step"] for row in got] == [1, 2]
    for row in got:
        assert row["tokens/total"] > 0
        assert row["train/mismatch_k3"] <= 1e-6 and abs(row["train/is_ratio_max"] - 1) <= 1e-5, row
    compiles = COMPILED.findall((out / "logs" / "rollout-0.log").read_text())
    assert compiles and all(float(seconds) > 0 for _, _, _, seconds in compiles), compiles
    # the shared step of 2+ rows compiled once per torch thread count for the whole run (fc350d3: a step per
    # count): the weight update did not recompile it
    shared = [threads for _, kind, threads, _ in compiles if kind == "every bucket of 2+ rows"]
    assert shared and len(shared) == len(set(shared)), compiles
