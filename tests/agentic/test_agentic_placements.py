"""`rollout.fn` through the RL loop in every placement: the single-process trainer (turns on its
AsyncEngine), colocated and disaggregated actors (turns as GenerateRequests to the engines). Same
seeds give the same sessions whichever engine serves the turns, so the actors' runs must reproduce the
single process's samples (`train.dump_samples`: token ids, loss masks, behavior log-probs, versions,
turns, finish reasons) and its losses; and every trained sample's behavior log-probs equal the
trainer's recomputation (IS ratio 1, k3 mismatch ~0), loss mask on sampled tokens only."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest

from rl_engine.actors.run import run_actors
from rl_engine.config import load_config
from rl_engine.train_config import RLConfig

HERE = os.path.dirname(os.path.abspath(__file__))
RL_TESTS = os.path.join(os.path.dirname(HERE), "rl")
TOY = ["warmup.steps=0", "data.num_eval=4", "rollout.prompts_per_step=3", "rollout.n=2", "rollout.max_new_tokens=6",
       "rollout.fn=agentic_fns:two_turns", "rollout.max_total_tokens=128", "reward.name=rl_test_rewards:has_vowel",
       "reward.num_workers=0", "train.steps=2", "train.dump_samples=true", "placement.heartbeat_interval_s=0.3",
       "placement.heartbeat_timeout_s=20", "placement.grace_period_s=3"]


def config(output_dir, *overrides) -> RLConfig:
    return load_config(RLConfig, None, [*TOY, f"train.output_dir={output_dir}", *overrides])


def dumped(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def pythonpath(monkeypatch):
    import sys

    monkeypatch.syspath_prepend(RL_TESTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, RL_TESTS, os.environ.get("PYTHONPATH", "")]))
    assert HERE in sys.path or True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    import sys

    sys.path[:0] = [HERE, RL_TESTS]
    from rl_engine.trainer import GRPOTrainer

    out = tmp_path_factory.mktemp("single")
    trainer = GRPOTrainer(config(out))
    try:
        rows = [trainer.step() for _ in range(trainer.config.train.steps)]
    finally:
        trainer.close()
    return rows, dumped(out)


def check_samples(samples: list[dict]) -> None:
    for s in samples:
        n = len(s["token_ids"])
        assert len(s["loss_mask"]) == len(s["behavior_logprobs"]) == len(s["policy_versions"]) == n
        for m, lp, v in zip(s["loss_mask"], s["behavior_logprobs"], s["policy_versions"]):
            assert (v >= 0 and lp <= 0) if m else (v == -1 and lp == 0.0)
        assert s["num_turns"] in (2, 3) and s["finish_reason"] in ("stop", "length", "max_total_tokens")


def test_single_process_sessions(reference):
    rows, samples = reference
    assert len(samples) == 2 * 3 * 2 and {s["step"] for s in samples} == {1, 2}
    check_samples(samples)
    assert any(s["num_turns"] == 3 for s in samples)
    for row in rows:
        assert row["rollout/tool_calls"] == 6 and row["rollout/tool_errors"] >= 2
        assert row["rollout/fn_errors"] == 0  # (template_mismatch: a random policy samples <|pad|> mid-turn)
        assert row["train/mismatch_k3"] <= 1e-6 and abs(row["train/is_ratio_max"] - 1) <= 1e-5


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_actor_placements_reproduce_the_single_process_sessions(reference, placement, tmp_path):
    ref_rows, ref_samples = reference
    summary = run_actors(config(tmp_path, f"placement.mode={placement}"), echo_stream=io.BytesIO())
    c = summary["prompts"]
    assert c["taken"] == c["trained"] + c["dropped"] and c["in_flight"] == c["queued"] == 0, c
    samples = dumped(tmp_path)
    check_samples(samples)
    key = ("step", "uid", "token_ids", "loss_mask", "policy_versions", "num_turns", "finish_reason", "reward")
    assert [[s[k] for k in key] for s in samples] == [[s[k] for k in key] for s in ref_samples]
    for a, b in zip(samples, ref_samples):
        assert max(abs(x - y) for x, y in zip(a["behavior_logprobs"], b["behavior_logprobs"])) <= 1e-5
    for row, ref in zip(metrics(tmp_path), ref_rows):
        for k in ("rollout/tool_calls", "rollout/tool_errors", "rollout/template_mismatch", "rollout/turns_mean"):
            assert row[k] == ref[k], k
        assert abs(row["train/loss"] - ref["train/loss"]) <= 1e-6
        assert row["train/mismatch_k3"] <= 1e-6 and abs(row["train/is_ratio_max"] - 1) <= 1e-5


def hold_a_turn(specs):
    """edit_specs: each rollout worker holds one sampled turn per weights version until the next
    update (fault injection), so every update interrupts a turn in flight; otherwise whether one is
    in flight depends on how fast the worker generates compared with how fast the trainer trains."""
    return [dataclasses.replace(s, args=[*s.args, "--hold-a-request-until-update"]) if s.name.startswith("rollout-")
            else s for s in specs]


def sampled_turns(sample: dict) -> list[list[int]]:
    """The policy versions of each turn's sampled tokens (turns are the runs of loss-masked tokens:
    observations sit between them)."""
    turns, run = [], []
    for v, m in zip(sample["policy_versions"], sample["loss_mask"]):
        if m:
            run.append(v)
        elif run:
            turns.append(run)
            run = []
    return turns + ([run] if run else [])


@pytest.mark.parametrize("placement", ["disaggregated", "colocated"])
def test_async_sessions_continue_across_weight_updates(placement, tmp_path):
    """rollout.mode=async: sessions run across steps; a weight update reaches them between turns (and,
    disaggregated, inside a turn: the turn is interrupted and continued with the new weights). Their
    samples then hold tokens of two versions, each sampled token with its own version and log-prob.
    The sessions of two prompts wait after their first turn for an update (`two_turns_across_an_update`)
    and, disaggregated, the worker holds a turn per version until the update (`hold_a_turn`), so both
    happen whatever the speed of the engines relative to the trainer. (2 waiting prompts + 1 held turn
    leave 3 of the 6 prompts in flight free to finish step 1.)"""
    summary = run_actors(config(tmp_path, f"placement.mode={placement}", "rollout.mode=async", "train.steps=4",
                                "rollout.prompts_in_flight=6", "rollout.max_staleness=3",
                                "rollout.max_new_tokens=12", "rollout.fn=agentic_fns:two_turns_across_an_update"),
                         edit_specs=hold_a_turn if placement == "disaggregated" else None, echo_stream=io.BytesIO())
    c = summary["prompts"]
    assert c["trained"] == 4 * 3 and c["taken"] == c["trained"] + c["dropped"] + c["in_flight"] + c["queued"] + \
        c["generated"], c
    samples = dumped(tmp_path)
    check_samples(samples)
    assert len(samples) == 4 * 3 * 2
    versions = [{v for v, m in zip(s["policy_versions"], s["loss_mask"]) if m} for s in samples]
    assert all(max(vs) <= s["step"] - 1 and s["step"] - 1 - min(vs) <= 3 for vs, s in zip(versions, samples))
    mixed = [s for s, vs in zip(samples, versions) if len(vs) > 1]
    assert len(mixed) >= 4, versions  # at least the two waiting prompts' 2 x 2 sessions
    for s in mixed:  # a later turn never samples with older weights than an earlier one
        turns = sampled_turns(s)
        assert all(max(a) <= min(b) for a, b in zip(turns, turns[1:])), s["policy_versions"]
    rows = metrics(tmp_path)
    assert sum(row["rollout/mixed_version_samples"] for row in rows) == len(mixed)
    split_turns = sum(len(set(t)) > 1 for s in samples for t in sampled_turns(s))  # each an interrupted one
    interrupted = sum(row["async/interrupted_turns"] for row in rows)
    assert interrupted >= split_turns
    if placement == "disaggregated":  # every update interrupts the held turn (3 updates reach the worker)
        assert interrupted >= 3
    else:  # the trainer group finishes a batch of turns before it trains
        assert split_turns == 0 and interrupted == 0


def test_async_stale_sessions_are_regenerated(tmp_path):
    """max_staleness=0 with stale_policy=regenerate: every trained sample was sampled by the weights of
    its step only; finished groups that an update made stale run their sessions again (same uids).
    The turn the worker holds over each update (`hold_a_turn`) makes its group stale in every run."""
    summary = run_actors(config(tmp_path, "placement.mode=disaggregated", "rollout.mode=async", "train.steps=3",
                                "rollout.prompts_in_flight=6", "rollout.max_staleness=0",
                                "rollout.stale_policy=regenerate"), edit_specs=hold_a_turn, echo_stream=io.BytesIO())
    assert summary["prompts"]["trained"] == 3 * 3
    samples = dumped(tmp_path)
    check_samples(samples)
    for s in samples:
        assert {v for v, m in zip(s["policy_versions"], s["loss_mask"]) if m} == {s["step"] - 1}
    assert sum(row["async/regenerated"] for row in metrics(tmp_path)) > 0


def test_an_interrupted_turn_is_sent_again_with_its_partial_output():
    """A weight update that finds a turn in flight (disaggregated async): the worker answers with the
    partial output (finish_reason "abort", interrupted); the turn goes out again with it as `resume`
    and the new version, the session keeps waiting, a late answer to the first attempt is dropped, and
    the continuation's answer (earlier tokens with their version) resolves the turn."""
    import asyncio
    from types import SimpleNamespace

    import torch

    from rl_engine import protocol as P
    from rl_engine.actors.agentic_turns import CoordinatorTurns
    from rl_engine.inference.sampling_params import SamplingParams

    sent = []
    coordinator = SimpleNamespace(version=0, disaggregated=True, pump=lambda timeout: None,
                                  live_workers=lambda: [SimpleNamespace(id="rollout-0")],
                                  send=lambda name, msg: sent.append((name, msg)))
    turns = CoordinatorTurns(coordinator, max_model_len=64)

    def answer(request, tokens, versions, finish, interrupted=False):  # as the coordinator's pump delivers it
        sample = P.SampleResult(sample_id=request.sample_ids[0], token_ids=torch.tensor(tokens),
                                behavior_logprobs=-torch.ones(len(tokens)), policy_versions=torch.tensor(versions),
                                kv_versions=torch.tensor(versions), finish_reason=finish)
        key = turns.round.ledger.complete(request.request_id, "rollout-0")
        if key is not None:
            turns.round.results[key] = P.GenerateResult(request_id=request.request_id, samples=[sample],
                                                        interrupted=interrupted)

    loop = asyncio.new_event_loop()
    try:
        turn = loop.create_task(turns.generate([1, 2, 3], SamplingParams(max_tokens=4, seed=0), key="s/t0"))
        loop.run_until_complete(asyncio.sleep(0))
        turns.poll()
        [(worker, first)] = sent
        assert worker == "rollout-0" and first.prompt_token_ids == [1, 2, 3] and first.policy_version == 0
        assert first.resume is None
        answer(first, [7, 8], [0, 0], "abort", interrupted=True)
        coordinator.version = 1
        turns.poll()  # takes the answer and queues the turn again
        turns.poll()  # sends it
        loop.run_until_complete(asyncio.sleep(0))
        assert turns.num_interrupted == 1 and not turn.done() and len(sent) == 2
        again = sent[1][1]
        assert again.request_id != first.request_id and again.policy_version == 1
        assert again.resume[0].token_ids.tolist() == [7, 8] and again.resume[0].policy_versions.tolist() == [0, 0]
        answer(first, [7, 8, 9, 10], [0, 0, 0, 0], "length")  # the retired attempt: dropped
        assert not turns.round.results
        answer(again, [7, 8, 9, 10], [0, 0, 1, 1], "length")
        turns.poll()
        out = loop.run_until_complete(turn)
        assert out.token_ids == [7, 8, 9, 10] and out.policy_versions == [0, 0, 1, 1] and out.finish_reason == "length"
        assert turns.num_interrupted == 1 and len(sent) == 2
    finally:
        loop.close()
