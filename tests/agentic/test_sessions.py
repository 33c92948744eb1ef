"""Agentic sessions against a scripted backend (no model): Qwen-style template deltas, a template that
rewrites history, limits, tool errors and timeouts, the in-process OpenAI client with tools."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest

from agentic_helpers import QWEN_TEMPLATE, THINK_DROPPING_TEMPLATE, write_bpe_tokenizer
from rl_engine.inference.chat import render_chat
from rl_engine.policy.tokenizer import Tokenizer
from rl_engine.rollout.agentic import (RolloutResult, RolloutStats, Session, SessionLimits, TemplateDeltas,
                                       TurnOutput, run_session)

CALCULATOR = [{"type": "function", "function": {
    "name": "calculator", "description": "evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
TOOL_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34+5"}}\n</tool_call>'


class ScriptedBackend:
    """Answers turn k with `texts[k]` encoded (plus <|im_end|> unless the text is cut by max_tokens)
    and records every prompt it was given."""

    max_model_len = 4096

    def __init__(self, tok: Tokenizer, texts: list[str], *, close: bool = True) -> None:
        self.tok, self.texts, self.close = tok, list(texts), close
        self.prompts: list[list[int]] = []
        self.sampled: list[list[int]] = []

    async def generate(self, prompt_ids, params, *, key):
        self.prompts.append(list(prompt_ids))
        ids = self.tok.encode(self.texts[len(self.sampled)], add_special_tokens=False)
        ids += [self.tok.token_to_id("<|im_end|>")] if self.close else []
        finish = "stop"
        if len(ids) > params.max_tokens:
            ids, finish = ids[:params.max_tokens], "length"
        self.sampled.append(ids)
        await asyncio.sleep(0)
        return TurnOutput(token_ids=ids, logprobs=[-0.5] * len(ids), policy_versions=[3] * len(ids),
                          kv_versions=[3] * len(ids), finish_reason=finish)


def limits(**kw) -> SessionLimits:
    return SessionLimits(**{"max_turns": 8, "max_total_tokens": 4096, "max_new_tokens": 512, "tool_timeout_s": 5.0,
                            "temperature": 1.0, **kw})


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("qwen_tok"))
    write_bpe_tokenizer(path, chat_template=QWEN_TEMPLATE)
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def think_tok(tmp_path_factory) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("think_tok"))
    write_bpe_tokenizer(path, chat_template=THINK_DROPPING_TEMPLATE)
    return Tokenizer.from_pretrained(path)


def session(tok, backend, **kw) -> Session:
    return Session(deltas=TemplateDeltas(tok), backend=backend, limits=limits(**kw), uid="0:0/0", stats=RolloutStats())


def encode_render(tok, messages, *, tools=None, generation_prompt=True) -> list[int]:
    return tok.encode(render_chat(tok, messages, tools=tools, add_generation_prompt=generation_prompt),
                      add_special_tokens=False)


def test_qwen_template_accumulated_ids_equal_the_render_of_the_whole_conversation(qwen_tok):
    backend = ScriptedBackend(qwen_tok, [TOOL_CALL, "The answer is 413."])
    s = session(qwen_tok, backend)

    async def agent():
        messages = [{"role": "user", "content": "What is 12*34+5?"}]
        reply = await s.chat(messages, tools=CALCULATOR)
        assert reply["content"] is None and json.loads(reply["tool_calls"][0]["function"]["arguments"]) == \
            {"expression": "12*34+5"}
        messages.append(reply)
        results = await s.call_tools(reply, {"calculator": lambda expression: eval(expression)})
        assert results[0]["content"] == "413"
        messages += results
        final = await s.chat(messages, tools=CALCULATOR)
        messages.append(final)
        return messages

    conversation = asyncio.run(agent())
    # Every turn's prompt is the template's render of the conversation so far, token for token ...
    assert backend.prompts[0] == encode_render(qwen_tok, conversation[:1], tools=CALCULATOR)
    assert backend.prompts[1] == encode_render(qwen_tok, conversation[:3], tools=CALCULATOR)
    # ... and the separator after <|im_end|> is there: the whole conversation's render is the accumulated ids
    # plus the one separator the template writes after the last <|im_end|>.
    whole = encode_render(qwen_tok, conversation, tools=CALCULATOR, generation_prompt=False)
    newline = qwen_tok.encode("\n", add_special_tokens=False)
    assert s.token_ids + newline == whole
    assert s.stats.template_mismatch == 0
    # Append-only; the loss mask is 1 exactly on the sampled ids, which are where the engine put them.
    assert backend.prompts[1][:len(backend.prompts[0]) + len(backend.sampled[0])] == \
        backend.prompts[0] + backend.sampled[0]
    starts = [len(backend.prompts[0]), len(backend.prompts[1])]
    expected_mask = [0] * len(s.token_ids)
    for start, ids in zip(starts, backend.sampled):
        assert s.token_ids[start:start + len(ids)] == ids
        expected_mask[start:start + len(ids)] = [1] * len(ids)
    assert s.loss_mask == expected_mask
    assert [v for v, m in zip(s.policy_versions, s.loss_mask) if m] == [3] * sum(expected_mask)
    assert all(v == -1 and lp == 0.0 for v, lp, m in zip(s.policy_versions, s.logprobs, s.loss_mask) if not m)


def test_a_turn_cut_by_its_length_gets_the_whole_closing_as_context(qwen_tok):
    backend = ScriptedBackend(qwen_tok, ["a long answer that is cut", "ok"])
    s = session(qwen_tok, backend)

    async def agent():
        reply = await s.chat([{"role": "user", "content": "hi"}], max_tokens=3)
        assert s.last_turn_finish == "length"
        await s.chat([{"role": "user", "content": "hi"}, reply, {"role": "user", "content": "go on"}])

    asyncio.run(agent())
    cut = len(backend.prompts[0]) + 3
    closing = qwen_tok.encode("<|im_end|>\n", add_special_tokens=False)
    assert backend.prompts[1][cut:cut + len(closing)] == closing
    assert s.loss_mask[cut:cut + len(closing)] == [0] * len(closing)
    assert s.stats.template_mismatch == 0


def test_a_template_that_drops_earlier_think_blocks_is_counted_and_the_accumulated_ids_are_kept(think_tok, caplog):
    first = "<think>\nthe user wants a number\n</think>\nseven"
    backend = ScriptedBackend(think_tok, [first, "eight"])
    s = session(think_tok, backend)

    async def agent():
        messages = [{"role": "user", "content": "a number?"}]
        messages.append(await s.chat(messages))
        messages.append({"role": "user", "content": "another?"})
        messages.append(await s.chat(messages))
        return messages

    with caplog.at_level(logging.WARNING):
        conversation = asyncio.run(agent())
    assert s.stats.template_mismatch == 1
    assert sum("rollout/template_mismatch" in r.message for r in caplog.records) == 1
    # The second prompt continues the ids the model saw and sampled, think block included ...
    assert backend.prompts[1][:len(backend.prompts[0]) + len(backend.sampled[0])] == \
        backend.prompts[0] + backend.sampled[0]
    assert "</think>" in think_tok.decode(backend.prompts[1], skip_special_tokens=False)
    # ... where the template's own render of the conversation has dropped it.
    rerender = encode_render(think_tok, conversation[:3])
    assert "</think>" not in think_tok.decode(rerender, skip_special_tokens=False)
    assert backend.prompts[1] != rerender
    # The new user turn itself is rendered as the template writes it.
    tail = think_tok.decode(backend.prompts[1], skip_special_tokens=False)
    assert tail.endswith("<|im_end|>\n<|im_start|>user\nanother?<|im_end|>\n<|im_start|>assistant\n")


def test_limits_end_the_session_with_their_finish_reason(qwen_tok):
    async def loop_forever(session, item):
        messages = [{"role": "user", "content": item["prompt"]}]
        while True:
            messages.append(await session.chat(messages))
            messages.append({"role": "user", "content": "again"})

    s = session(qwen_tok, ScriptedBackend(qwen_tok, ["one"] * 10), max_turns=3)
    record = asyncio.run(run_session(loop_forever, s, {"prompt": "count"}))
    assert (record.num_turns, record.finish_reason) == (3, "max_turns")

    s = session(qwen_tok, ScriptedBackend(qwen_tok, ["the quick brown fox jumps over the lazy dog"] * 10),
                max_total_tokens=100)
    record = asyncio.run(run_session(loop_forever, s, {"prompt": "count"}))
    assert record.finish_reason == "max_total_tokens"
    assert len(record.token_ids) == 100 and record.num_turns >= 1 and s.stats.finish["max_total_tokens"] == 1


def test_a_tool_that_raises_or_hangs_becomes_a_tool_message(qwen_tok):
    """Two sessions, so that neither outcome depends on the machine's load: the raising tool has a
    generous timeout (a sync tool runs in a thread, which a loaded machine may start late), the
    hanging one blocks until its call has timed out (it then returns, so asyncio.run can join it)."""
    released = threading.Event()

    def raising(expression):
        raise ZeroDivisionError("division by zero")

    def hanging(expression):
        assert released.wait(60), "the hanging tool was never released"
        return "too late"

    async def agent(s, calculator):
        reply = await s.chat([{"role": "user", "content": "?"}], tools=CALCULATOR)
        try:
            return await s.call_tools(reply, {"calculator": calculator})
        finally:
            released.set()

    raised = session(qwen_tok, ScriptedBackend(qwen_tok, [TOOL_CALL]), tool_timeout_s=60.0)
    hung = session(qwen_tok, ScriptedBackend(qwen_tok, [TOOL_CALL]), tool_timeout_s=0.2)
    timed_out = asyncio.run(agent(hung, hanging))  # first, while `released` is clear
    out = asyncio.run(agent(raised, raising)) + timed_out
    assert out[0]["content"] == "error: ZeroDivisionError: division by zero"
    assert out[1]["content"] == "error: tool 'calculator' timed out after 0.2s"
    assert raised.stats.tool_errors == hung.stats.tool_errors == 1
    assert raised.messages[-1:] == out[:1] and hung.messages[-1:] == out[1:]


def test_a_failing_rollout_function_ends_its_session_with_error(qwen_tok):
    async def broken(session, item):
        await session.chat([{"role": "user", "content": "x"}])
        raise KeyError("oops")

    s = session(qwen_tok, ScriptedBackend(qwen_tok, ["y"]))
    record = asyncio.run(run_session(broken, s, {}))
    assert record.finish_reason == "error" and record.num_turns == 1 and s.stats.fn_errors == 1

    async def rewarded(session, item):
        await session.chat([{"role": "user", "content": "x"}])
        return RolloutResult(reward=0.25, metrics={"steps": 2})

    s = session(qwen_tok, ScriptedBackend(qwen_tok, ["y"]))
    record = asyncio.run(run_session(rewarded, s, {}))
    assert (record.reward, record.finish_reason, s.stats.fn_metrics) == (0.25, "stop", {"steps": [2.0]})


def test_openai_client_agent_with_tools(qwen_tok):
    openai = pytest.importorskip("openai")  # a dev dependency
    backend = ScriptedBackend(qwen_tok, [TOOL_CALL, "413"])
    s = session(qwen_tok, backend)

    async def openai_agent(client, question: str) -> str:
        """Written against openai.AsyncOpenAI: messages hold the library's own message objects."""
        messages = [{"role": "user", "content": question}]
        while True:
            response = await client.chat.completions.create(model="policy", messages=messages, tools=CALCULATOR,
                                                            max_tokens=64)
            choice = response.choices[0]
            messages.append(choice.message)
            if choice.finish_reason != "tool_calls":
                return choice.message.content
            for call in choice.message.tool_calls:
                args = json.loads(call.function.arguments)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": str(eval(args["expression"]))})

    answer = asyncio.run(openai_agent(s.openai, "What is 12*34+5?"))
    assert answer == "413" and s.num_turns == 2
    assert isinstance(s.openai.chat.completions, object)
    response_type = openai.types.chat.ChatCompletion
    assert s.messages[2]["role"] == "tool" and s.messages[2]["content"] == "413"
    # The conversation the agent built with openai objects renders to the ids the session accumulated.
    assert backend.prompts[1] == encode_render(qwen_tok, s.messages[:3], tools=CALCULATOR)
    assert s.stats.template_mismatch == 0 and response_type is not None
