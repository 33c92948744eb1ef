"""The built-in agentic task `builtin:calc` (rl_engine/demo_calc.py): the calculator tool, the task
files, and a reduced `rl-engine train examples/agentic_calc.yaml` (the run works and its accounting
holds; the learning figure is the README's, measured by the full example)."""

from __future__ import annotations

import json
import os

import pytest

from rl_engine.config import load_config
from rl_engine.demo_calc import calculator, tool_call_text, write_calc_task
from rl_engine.inference.chat import parse_tool_calls, render_chat
from rl_engine.policy.presets import write_char_tokenizer
from rl_engine.policy.tokenizer import Tokenizer
from rl_engine.train_config import RLConfig

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "agentic_calc.yaml")


def test_calculator_evaluates_arithmetic_and_refuses_anything_else():
    assert calculator("37*48+12") == "1788" and calculator("(1+2)*-3") == "-9" and calculator("7/2") == "3.5"
    for bad in ("__import__('os')", "2**10", "a+1", "1+", ""):
        with pytest.raises(ValueError):
            calculator(bad)


def test_task_files_and_the_template_round_trip(tmp_path):
    paths = write_calc_task(str(tmp_path), num_train=50, num_eval=10, num_sft=40)
    train = [json.loads(line) for line in open(paths["train"])]
    evals = [json.loads(line) for line in open(paths["eval"])]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert all(r["answer"] == calculator(r["prompt"].split()[1]) and len(r["answer"]) == 4 for r in train + evals)
    sft = [json.loads(line) for line in open(paths["sft"])]
    calls = [r for r in sft if len(r["messages"]) == 1 and r["response"].startswith("<tool_call>")]
    answers = [r for r in sft if len(r["messages"]) == 3]
    assert len(answers) == 40 and 0 < len(calls) < 30  # the tool is demonstrated a minority of the time
    # A demonstrated tool call parses back to the call; the template writes it exactly as demonstrated.
    write_char_tokenizer(str(tmp_path / "tok"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "tok"))
    parsed = parse_tool_calls(calls[0]["response"]).message()
    expression = calls[0]["messages"][0]["content"].split()[1]
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"expression": expression}
    text = render_chat(tok, [*calls[0]["messages"], parsed], add_generation_prompt=False)
    assert text.endswith("<|assistant|>" + tool_call_text(expression) + "<|eos|>")


def test_calc_agent_calls_the_tool_and_answers_with_its_result(tmp_path):
    """calc_agent on a scripted policy that answers as the warm start's tool-using demonstrator: the
    tool runs, its result is the observation between the turns, the exact-match reward pays 1."""
    import asyncio

    from rl_engine.demo_calc import calc_agent
    from rl_engine.rollout.agentic import RolloutStats, Session, SessionLimits, TemplateDeltas, TurnOutput, run_session

    write_char_tokenizer(str(tmp_path))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    eos = tok.token_to_id("<|eos|>")

    class Demonstrator:
        max_model_len = 512

        def __init__(self):
            self.turns = 0

        async def generate(self, prompt_ids, params, *, key):
            text = tool_call_text("37*48+12") if self.turns == 0 else "1788"
            self.turns += 1
            ids = tok.encode(text, add_special_tokens=False) + [eos]
            return TurnOutput(token_ids=ids, logprobs=[-0.1] * len(ids), policy_versions=[0] * len(ids),
                              kv_versions=[0] * len(ids), finish_reason="stop")

    limits = SessionLimits(max_turns=3, max_total_tokens=256, max_new_tokens=96, tool_timeout_s=5.0, temperature=1.0)
    stats = RolloutStats()
    session = Session(deltas=TemplateDeltas(tok), backend=Demonstrator(), limits=limits, uid="0:0/0", stats=stats)
    record = asyncio.run(run_session(calc_agent, session, {"prompt": "calc 37*48+12", "answer": "1788"}))
    assert (record.num_turns, record.finish_reason, record.response) == (2, "stop", "1788")
    assert (stats.tool_calls, stats.tool_errors, stats.template_mismatch) == (1, 0, 0)
    text = tok.decode(record.token_ids, skip_special_tokens=False)
    assert text == ("<|user|>calc 37*48+12<|assistant|>" + tool_call_text("37*48+12") + "<|eos|><|user|>1788"
                    "<|assistant|>1788<|eos|>")
    from rl_engine.rollout.rewards import RewardComputer, RewardConfig

    outcomes, _ = RewardComputer(RewardConfig(name="exact_match", num_workers=0)).compute([record.response], ["1788"])
    assert outcomes[0].score == 1.0


def test_reduced_calc_run(tmp_path):
    from rl_engine.train_cli import check_inputs, run

    overrides = ["warmup.steps=20", "warmup.batch_size=16", "data.num_eval=8", "rollout.prompts_per_step=4",
                 "rollout.n=4", "train.steps=2", f"train.output_dir={tmp_path}"]
    config = load_config(RLConfig, EXAMPLE, overrides)
    check_inputs(config)
    summary = run(config)
    assert 0.0 <= summary["eval_accuracy_before"] <= 1.0 and 0.0 <= summary["eval_accuracy_after"] <= 1.0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert len(rows) == 2 and len(samples) == 2 * 4 * 4
    tok = Tokenizer.from_pretrained(str(tmp_path / "init_model"))
    for step, row in enumerate(rows, start=1):
        mine = [s for s in samples if s["step"] == step]
        finishes = {k.removeprefix("rollout/finish_"): v for k, v in row.items() if k.startswith("rollout/finish_")}
        assert sum(finishes.values()) == len(mine) == 16
        for reason, count in finishes.items():
            assert sum(s["finish_reason"] == reason for s in mine) == count, reason
        assert row["rollout/turns_mean"] == sum(s["num_turns"] for s in mine) / 16
        assert sum(s["num_turns"] - 1 for s in mine) <= row["rollout/tool_calls"] <= sum(s["num_turns"] for s in mine)
        assert row["rollout/fn_errors"] == 0 and row["rollout/empty_sessions"] == 0
        assert abs(row["reward/mean"] - sum(s["reward"] for s in mine) / 16) <= 1e-6
        for s in mine:  # every sampled run of tokens is one assistant turn; context between them
            assert len(s["token_ids"]) <= 256 and s["loss_mask"][0] == 0
            runs = sum(1 for a, b in zip([0] + s["loss_mask"], s["loss_mask"]) if b and not a)
            assert runs == s["num_turns"]
            assert tok.decode(s["token_ids"], skip_special_tokens=False).startswith("<|user|>calc ")
