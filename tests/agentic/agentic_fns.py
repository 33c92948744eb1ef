"""Rollout functions for the agentic tests, found by dotted path (`agentic_fns:two_turns`) from the
actor processes too (tests put this directory on PYTHONPATH)."""

from __future__ import annotations


def lookup(word: str) -> str:
    if word == "boom":
        raise RuntimeError("the tool broke")
    return word[::-1]


async def two_turns(session, item: dict, first_chat=None) -> None:
    """A tool-using agent on any prompt: a first turn, a tool call's result (one tool raises every
    other time) and a user nudge as observations, then a second turn (a third on some prompts)."""
    index = int(item["uid"].split(":")[1])
    messages = [{"role": "user", "content": item["prompt"]}]
    reply = await (first_chat or session.chat)(messages)
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


_started: dict[int, list[str]] = {}  # id(turn backend) -> the training prompts in the order they started


async def two_turns_across_an_update(session, item: dict) -> None:
    """`two_turns`, except that the sessions of the second and third training prompts a run starts wait after
    their first turn until the coordinator's policy version has moved on, so their later turns are
    sampled by newer weights whatever the relative speed of the engines and the trainer (an async
    run's other prompts finish the first step meanwhile: prompts_in_flight must exceed
    prompts_per_step + 2)."""
    import asyncio
    import time

    coordinator = getattr(session.backend, "coordinator", None)
    if coordinator is None or session.uid.startswith("eval:"):  # no update comes while these run
        return await two_turns(session, item)
    started = _started.setdefault(id(session.backend), [])
    if item["uid"] not in started:
        started.append(item["uid"])
    if started.index(item["uid"]) not in (1, 2):
        return await two_turns(session, item)
    version = coordinator.version

    async def after_first_turn(messages):
        reply = await session.chat(messages)
        deadline = time.monotonic() + 60  # far beyond a toy step: only a hang ends here
        while time.monotonic() < deadline:
            if coordinator.version > version:
                return reply
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no weight update reached {session.uid} in 60 s (coordinator at v{version})")

    await two_turns(session, item, first_chat=after_first_turn)

