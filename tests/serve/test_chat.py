"""rl_engine.inference.chat: chat-template rendering with tools against transformers, Hermes/Qwen
tool-call parsing (well-formed, malformed, several blocks) and its streaming form."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from chat_models import write_chat_tokenizer
from rl_engine.inference.chat import (ToolCallStreamParser, encode_chat, parse_tool_calls, render_chat,
                                      template_messages)
from rl_engine.policy.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "assistant", "content": "18C and sunny."},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat_tok"))
    write_chat_tokenizer(path)
    return path


def _reference_messages(messages):
    """What a transformers user passes: plain string content, arguments as dicts."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        if m.get("content") is None:
            m["content"] = ""
        if "tool_calls" in m:
            m["tool_calls"] = [{**tc, "function": {**tc["function"], "arguments": json.loads(tc["function"]["arguments"])}}
                               for tc in m["tool_calls"]]
        out.append(m)
    return out


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("upto", [2, 4, 6])
def test_render_matches_transformers(tok_dir, tools, upto):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_pretrained(tok_dir)
    ref = AutoTokenizer.from_pretrained(tok_dir)
    messages = CONVERSATION[:upto]
    text = render_chat(ours, messages, tools=tools)
    expected = ref.apply_chat_template(_reference_messages(messages), tools=tools, tokenize=False,
                                       add_generation_prompt=True)
    assert text == expected
    if tools:
        assert '"name": "get_weather"' in text and "<tools>" in text
    if upto >= 4:
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert encode_chat(ours, messages, tools=tools) == ref.encode(expected, add_special_tokens=False)


def test_continue_final_message(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    text = render_chat(tok, messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nHel")


def test_render_errors_name_the_field(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    with pytest.raises(ValueError, match=r"messages\[1\]\.role = 'robot'"):
        render_chat(tok, [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[0\] is a 'image_url' part"):
        render_chat(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"):
        render_chat(tok, [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}])
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        render_chat(tok, [{"role": "user", "content": "a"}], tools=[{"type": "function"}])
    with pytest.raises(ValueError, match="non-empty list"):
        render_chat(tok, [])
    assert template_messages(CONVERSATION)[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert CONVERSATION[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # input untouched


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def test_parse_single_and_multiple_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET", "precise": true}}\n</tool_call>')
    parsed = parse_tool_calls(text, make_id=_ids())
    assert parsed.content == "Let me check."
    assert parsed.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "get_time",
                                                          "arguments": '{"tz": "CET", "precise": true}'}}]
    assert json.loads(parsed.tool_calls[1]["function"]["arguments"]) == {"tz": "CET", "precise": True}
    only = parse_tool_calls('<tool_call>{"name": "f"}</tool_call>\n', make_id=_ids())
    assert only.content is None and only.tool_calls[0]["function"] == {"name": "f", "arguments": "{}"}
    assert only.message() == {"role": "assistant", "content": None, "tool_calls": only.tool_calls}
    alias = parse_tool_calls('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>')
    assert alias.tool_calls[0]["function"]["arguments"] == '{"x": 1}'
    assert alias.tool_calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("block", [
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>["f"]</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}}',  # never closed
])
def test_malformed_blocks_stay_content(block):
    text = f"before {block} after"
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == [] and parsed.content == text
    good = '<tool_call>{"name": "g", "arguments": {"a": 1}}</tool_call>'
    mixed = parse_tool_calls(f"x {block} {good} y", make_id=_ids())
    assert [c["function"]["name"] for c in mixed.tool_calls] == ["g"]
    assert mixed.content == f"x {block}  y"


def test_plain_text_untouched():
    for text in ["", "  hello  ", "a <tool_ call> b", "<tool_call"]:
        assert parse_tool_calls(text).content == text and parse_tool_calls(text).tool_calls == []


STREAM_TEXTS = [
    "no calls at all, just text \n",
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"k": "<"}}'
    '</tool_call> tail',
    'x <tool_call>{bad}</tool_call> y <tool_call>{"name": "c"}</tool_call>',
    'open <tool_call>{"name": "a", "arguments": {}',
    "a < b and <tool_c but no call",
    'open <tool_call>{"name": "a" <tool_call>{"name": "b", "arguments": {"q": 1}}</tool_call> end',
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_parser_equals_whole_parse(text):
    rng = random.Random(0)
    whole = parse_tool_calls(text, make_id=_ids())
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        parser = ToolCallStreamParser(make_id=_ids())
        content, calls = "", []
        for d in deltas:
            c, new = parser.feed(d)
            content += c
            calls += new
        content += parser.finish()
        assert calls == whole.tool_calls == parser.tool_calls
        expected = whole.content or ""
        assert content.lstrip() == expected.lstrip()
        if not whole.tool_calls:
            assert content == text
