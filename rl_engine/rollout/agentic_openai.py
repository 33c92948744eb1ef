"""`session.openai`: an OpenAI-compatible async client bound to one agentic session, in process.

Agent code written against the `openai` library (`await client.chat.completions.create(model=...,
messages=..., tools=...)`) runs unchanged on a rollout session: each call is one `session.chat` turn
(token-in/token-out, the session's limits), and the answer is the `openai` library's own
`ChatCompletion` object (choices[0].message with content and parsed `tool_calls`, finish_reason
"tool_calls" / "stop" / "length", usage, `system_fingerprint` = the weights version that sampled the
turn). Needs the `openai` package for its response types; no HTTP, no server.
"""

from __future__ import annotations

import time
from typing import Any

_SAMPLING = ("max_tokens", "max_completion_tokens", "top_p", "temperature")
_IGNORED = ("model", "tool_choice", "parallel_tool_calls", "user", "metadata", "store", "extra_headers", "timeout")


class _Completions:
    def __init__(self, session) -> None:
        self._session = session

    async def create(self, *, messages: list, tools: list | None = None, n: int | None = None,
                     stream: bool | None = None, extra_body: dict | None = None, **kwargs: Any):
        try:
            from openai.types.chat import ChatCompletion
        except ImportError:
            raise ImportError("session.openai returns the openai library's ChatCompletion objects: pip install openai") \
                from None
        if stream:
            raise ValueError("session.openai: stream=True is not supported in rollouts (a turn is sampled whole)")
        if n not in (None, 1):
            raise ValueError(f"session.openai: n={n}; a session is one sample (rollout.n sets the group size)")
        sampling = {k: kwargs.pop(k) for k in _SAMPLING if kwargs.get(k) is not None}
        for k in ("top_k", "stop_token_ids"):  # vLLM's extensions, in extra_body as the openai client sends them
            if extra_body and extra_body.get(k) is not None:
                sampling[k] = extra_body[k]
        unknown = sorted(k for k in kwargs if k not in _IGNORED)
        if unknown:
            raise ValueError(f"session.openai.chat.completions.create: unsupported arguments {unknown}")
        s = self._session
        before = len(s.token_ids)
        message = await s.chat(messages, tools=tools, **sampling)
        sampled = [i for i in range(before, len(s.token_ids)) if s.loss_mask[i]]
        versions = {s.policy_versions[i] for i in sampled}
        prompt_tokens = sampled[0] if sampled else len(s.token_ids)
        finish = "tool_calls" if message.get("tool_calls") else ("length" if s.last_turn_finish == "length" else "stop")
        return ChatCompletion.model_validate({
            "id": f"chatcmpl-{s.uid}-{s.num_turns}", "object": "chat.completion", "created": int(time.time()),
            "model": kwargs.get("model") or "policy",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": message.get("content"),
                                                   "tool_calls": message.get("tool_calls") or None},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(sampled),
                      "total_tokens": prompt_tokens + len(sampled)},
            "system_fingerprint": f"v{max(versions)}" if versions else None,
        })


class _Chat:
    def __init__(self, session) -> None:
        self.completions = _Completions(session)


class SessionClient:
    """`client.chat.completions.create(...)`, as `openai.AsyncOpenAI` has it."""

    def __init__(self, session) -> None:
        self.chat = _Chat(session)
