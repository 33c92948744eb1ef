"""Rollout functions for the agentic tests, found by dotted path (`agentic_fns:two_turns`) from the
actor processes too (tests put this directory on PYTHONPATH)."""

from __future__ import annotations


def lookup(word: str) -> str:
    if word == "boom":
        raise RuntimeError("the tool broke")
    return word[::-1]


async def two_turns(session, item: dict) -> None:
    """A tool-using agent on any prompt: a first turn, a tool call's result (one tool raises every
    other time) and a user nudge as observations, then a second turn (a third on some prompts)."""
    index = int(item["uid"].split(":")[1])
    messages = [{"role": "user", "content": item["prompt"]}]
    reply = await session.chat(messages)
    messages.append(reply)
    call = {"id": "call_0", "type": "function",
            "function": {"name": "lookup", "arguments": '{"word": "%s"}' % ("boom" if index % 2 else "abc")}}
    messages += await session.call_tools({"role": "assistant", "content": None, "tool_calls": [call]},
                                         {"lookup": lookup})
    messages.append({"role": "user", "content": "and?"})
    messages.append(await session.chat(messages))
    if index % 3 == 0:
        messages.append({"role": "user", "content": "more"})
        await session.chat(messages, max_tokens=3)
