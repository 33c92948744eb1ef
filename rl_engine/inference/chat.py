"""Chat surface shared by the OpenAI server and agentic rollouts: OpenAI messages rendered with the
model's chat template (tools handed to the template), and Hermes/Qwen tool calls parsed back out.

Rendering follows vLLM's conventions for what templates expect: a message's `content` given as a list
of text parts is joined into one string; an assistant message's `tool_calls[].function.arguments`,
a JSON string on the OpenAI wire, reaches the template as the parsed object (Qwen2.5/Qwen3 templates
write `arguments | tojson`); `tools` is the OpenAI list `[{"type": "function", "function": {...}}]`.

Parsing follows the Hermes format Qwen2.5/Qwen3 templates teach the model:
`<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`, any number of blocks. A block whose body
is not a JSON object with a string `name` (and an object `arguments`, or none) is malformed and stays in
the content as written; the text outside well-formed blocks is the content (None when only blocks and
whitespace remain). `ToolCallStreamParser` does the same over a stream of text deltas, holding back only
text that may still become a block.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# a block's body holds no other start tag: in "<tool_call>{unclosed <tool_call>{...}</tool_call>" the first is text
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"((?:(?!" + re.escape(TOOL_CALL_START) + r").)*?)"
                    + re.escape(TOOL_CALL_END), re.DOTALL)
ROLES = ("system", "developer", "user", "assistant", "tool")


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---- rendering ------------------------------------------------------------------------------------
def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> what chat templates expect (a deep copy; the input is not changed).
    Raises ValueError naming `messages[i].field` for a malformed message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role = {role!r} is invalid; allowed: {', '.join(ROLES)}")
        m = copy.deepcopy(message)
        m["content"] = _content_text(m.get("content"), f"messages[{i}].content")
        tool_calls = m.get("tool_calls")
        if tool_calls is not None:
            if role != "assistant" or not isinstance(tool_calls, list):
                raise ValueError(f"messages[{i}].tool_calls must be a list, on an assistant message")
            m["tool_calls"] = [_template_tool_call(tc, f"messages[{i}].tool_calls[{j}]")
                               for j, tc in enumerate(tool_calls)]
        elif "tool_calls" in m:
            del m["tool_calls"]  # explicit null: templates test `message.tool_calls` for presence
        out.append(m)
    return out


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where}[{k}] is a {kind!r} part; only text parts "
                                 "({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def _template_tool_call(tool_call: Any, where: str) -> dict[str, Any]:
    function = tool_call.get("function") if isinstance(tool_call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON ({e})") from None
    out = dict(tool_call)
    out["function"] = {**function, "arguments": arguments}
    return out


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """The OpenAI `tools` list, validated: each {'type': 'function', 'function': {'name': str, ...}}."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': NAME, 'parameters': "
                             "{...}}}} with a non-empty name")
    return tools


def render_chat(tokenizer, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text of a conversation under the model's chat template. `continue_final_message`
    leaves the last (assistant) message open for the model to continue (as in transformers: the
    render is cut after that message's content). ValueError for a malformed message or a template
    that refuses the conversation."""
    from jinja2.exceptions import TemplateError

    msgs = template_messages(messages)
    tools = check_tools(tools)
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
    kwargs = dict(template_kwargs or {})
    if tools is not None:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateError as e:
        raise ValueError(f"the chat template refused these messages: {e}") from None
    if continue_final_message:
        final = msgs[-1]["content"]
        cut = text.rfind(final) if final else -1
        if not final or cut < 0:
            raise ValueError("continue_final_message: the last message's content must be non-empty and "
                             "appear in the rendered prompt")
        text = text[:cut + len(final)]
    return text


def encode_chat(tokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """`render_chat` tokenized as the template wrote it (no special tokens added again)."""
    return tokenizer.encode(render_chat(tokenizer, messages, **kwargs), add_special_tokens=False)


# ---- tool-call parsing ----------------------------------------------------------------------------
@dataclass
class ParsedOutput:
    """An assistant turn split into its content and its OpenAI `tool_calls`."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        """The OpenAI assistant message ({'role': 'assistant', 'content': ..., 'tool_calls': [...]})."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def parse_tool_call(body: str, *, make_id: Callable[[], str] = new_tool_call_id) -> dict[str, Any] | None:
    """The OpenAI tool call of one block's body (the text between the tags), or None if malformed."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return {"id": make_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_tool_calls(text: str, *, make_id: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
    """Split model output into content and tool calls (module docstring). Content keeps the text
    outside well-formed blocks and the malformed blocks as written, stripped of surrounding
    whitespace; None when nothing but well-formed blocks was there."""
    calls: list[dict[str, Any]] = []
    pieces: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = parse_tool_call(m.group(1), make_id=make_id)
        if call is None:
            continue  # malformed: stays in the content
        pieces.append(text[pos:m.start()])
        calls.append(call)
        pos = m.end()
    pieces.append(text[pos:])
    content = "".join(pieces)
    if calls:
        content = content.strip()
        return ParsedOutput(content=content or None, tool_calls=calls)
    return ParsedOutput(content=content)


class ToolCallStreamParser:
    """Incremental `parse_tool_calls` over text deltas. `feed(delta)` returns (content delta, tool
    calls completed by it); `finish()` flushes what was held back (an unclosed block is content).
    Held back: text that may still become a block, and trailing whitespace (sent once more content
    follows; dropped at the end when there were tool calls). The concatenated content deltas equal
    `parse_tool_calls(whole).content` (or "" for None) up to leading whitespace, which a stream has
    already sent before it knows whether a tool call follows."""

    def __init__(self, *, make_id: Callable[[], str] = new_tool_call_id) -> None:
        self._make_id = make_id
        self._buffer = ""  # not yet parsed: a possible block start, or an open block
        self._whitespace = ""  # parsed content that is whitespace so far, not yet sent
        self.tool_calls: list[dict[str, Any]] = []

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += delta
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            start = self._buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = _partial_suffix(self._buffer, TOOL_CALL_START)
                content.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            end = self._buffer.find(TOOL_CALL_END, start)
            if end < 0:
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                break
            start = self._buffer.rfind(TOOL_CALL_START, start, end)  # an earlier unclosed start is text
            call = parse_tool_call(self._buffer[start + len(TOOL_CALL_START):end], make_id=self._make_id)
            stop = end + len(TOOL_CALL_END)
            if call is None:  # malformed: content as written
                content.append(self._buffer[:stop])
            else:
                content.append(self._buffer[:start])
                calls.append(call)
            self._buffer = self._buffer[stop:]
        self.tool_calls.extend(calls)
        return self._emit("".join(content)), calls

    def finish(self) -> str:
        """The content still held back, once the output is complete."""
        text = self._emit(self._buffer)
        self._buffer = ""
        if not self.tool_calls:
            text, self._whitespace = text + self._whitespace, ""
        return text

    def _emit(self, text: str) -> str:
        text = self._whitespace + text
        body = text.rstrip()
        self._whitespace = text[len(body):]
        return body


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
