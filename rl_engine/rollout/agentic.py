"""Agentic multi-turn rollouts: custom rollout functions, tools, exact token-in/token-out.

A rollout function (`rollout.fn: "package.module:function"`) is `async def fn(session, item) ->
RolloutResult | None`, one call per sample. `session.chat(messages, tools=None, **sampling)` runs one
assistant turn on the policy and returns the assistant message (content, parsed Hermes `tool_calls`,
`rl_engine.inference.chat`); `session.openai` is an OpenAI-style async client bound to the session;
`session.add_observation(messages)` appends tool / user / environment messages; `session.call_tools`
runs tool calls with a timeout, turning an exception into a tool message with its text.

Main design choice: token-in, token-out by construction. The session keeps one append-only list of
token ids per sample (`token_ids`), and beside it the loss mask (1 exactly on sampled tokens), the
behavior log-prob, the policy version and the KV version of every token. Each turn's prompt is that
list plus the rendered observation delta; the sampled ids are appended as the engine returned them, so
earlier model output is never decoded and re-encoded. The delta is the chat template's text of the
conversation with the new messages minus its text without them, preceded by whatever the template
writes after an assistant message that the model did not sample (its turn separator, or the whole
closing sequence when a turn stopped on its length), found generically from the template's render of
a placeholder turn: no token id is hard-coded per model. When the template's render of the history
differs from the text of the accumulated ids (a template that rewrites history, e.g. drops earlier
`<think>` blocks, or re-serialises a tool call differently than sampled), the accumulated ids are kept,
the event is counted (`rollout/template_mismatch`) and one example is logged.

Engines are reached through a `TurnBackend` (`generate(prompt_ids, params) -> TurnOutput`): the
single-process trainer's `AsyncEngine` (`EngineTurns`: every session's turns share the engine's
continuous batch), or the coordinator's engines (`rl_engine.actors.agentic_turns`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rl_engine.inference.chat import parse_tool_calls, render_chat
from rl_engine.inference.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_PLACEHOLDER = "\u2063rl-engine-placeholder\u2063"  # never produced by a model; marks where content goes
FINISH_REASONS = ("stop", "length", "max_turns", "max_total_tokens", "error")


class SessionFinished(Exception):
    """Raised by `Session.chat` once the session hit a limit; the runner ends the session with
    `finish_reason` = the limit (a rollout function need not catch it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the session ended: {reason}")
        self.reason = reason


@dataclass(kw_only=True)
class RolloutResult:
    """What a rollout function may return (None: everything from the session). `reward` overrides
    `session.reward` and the reward function; `metrics` are averaged into `rollout/fn/<key>`."""

    reward: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class SessionLimits:
    max_turns: int
    max_total_tokens: int  # prompt + every turn's observation and sampled tokens
    max_new_tokens: int  # per turn, unless the rollout function asks for fewer
    tool_timeout_s: float
    temperature: float  # the run's: behavior log-probs must be taken at the trainer's temperature
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # the sample's seed; each turn mixes in its index


@dataclass
class TurnOutput:
    """One turn's sampled tokens, as the engine returned them."""

    token_ids: list[int]
    logprobs: list[float]
    policy_versions: list[int]
    kv_versions: list[int]
    finish_reason: str  # "stop" | "length"


class TurnBackend(Protocol):
    max_model_len: int

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, key: str) -> TurnOutput: ...


class EngineTurns:
    """Turns served by an in-process `AsyncEngine` (single-process placement)."""

    def __init__(self, async_engine) -> None:
        self.engine = async_engine
        self.max_model_len = async_engine.engine.max_model_len

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, key: str) -> TurnOutput:
        final = None
        async for out in self.engine.generate(list(prompt_ids), params, request_id=key):
            final = out
        if final is None or final.error:
            raise ValueError(f"turn {key} refused by the engine: {final.error if final else 'no output'}")
        c = final.outputs[0]
        return TurnOutput(token_ids=list(c.token_ids), logprobs=list(c.logprobs), policy_versions=list(c.policy_versions),
                          kv_versions=list(c.kv_versions), finish_reason=c.finish_reason or "length")


# ---- the chat template as deltas -----------------------------------------------------------------
class TemplateDeltas:
    """Token-in/token-out rendering of a conversation with a tokenizer's chat template."""

    def __init__(self, tokenizer, *, template_kwargs: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self._closing: dict[str, list[int]] = {}

    def render(self, messages: list[dict], *, tools: list | None, generation_prompt: bool) -> str:
        return render_chat(self.tokenizer, messages, tools=tools, add_generation_prompt=generation_prompt,
                           template_kwargs=self.template_kwargs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def prompt_ids(self, messages: list[dict], *, tools: list | None) -> list[int]:
        return self.encode(self.render(messages, tools=tools, generation_prompt=True))

    def closing_ids(self, tools: list | None) -> list[int]:
        """What the template writes after an assistant message's content (e.g. `<|im_end|>\\n`): the
        render of a placeholder turn, after the placeholder."""
        key = json.dumps(tools, sort_keys=True)
        if key not in self._closing:
            text = self.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": _PLACEHOLDER}],
                               tools=tools, generation_prompt=False)
            cut = text.rfind(_PLACEHOLDER)
            self._closing[key] = self.encode(text[cut + len(_PLACEHOLDER):]) if cut >= 0 else []
        return self._closing[key]

    def unsampled_closing(self, sampled: Sequence[int], *, tools: list | None) -> list[int]:
        """The closing tokens the model did not sample: all of them after a turn cut by its length,
        the separator after the end-of-turn token the model did sample."""
        closing = self.closing_ids(tools)
        for k in range(min(len(closing), len(sampled)), 0, -1):
            if list(sampled[len(sampled) - k:]) == closing[:k]:
                return closing[k:]
        return list(closing)

    def observation_delta(self, history: list[dict], new: list[dict], *, tools: list | None) -> tuple[str, bool]:
        """The text the template writes for `new` (then the generation prompt) after `history`, which
        ends with an assistant message; False when the template rewrites `history` once `new` follows
        (the delta then comes from a neutral one-turn history, the same for any model)."""
        before = self.render(history, tools=tools, generation_prompt=False)
        after = self.render(history + new, tools=tools, generation_prompt=True)
        if after.startswith(before):
            return after[len(before):], True
        base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "?"}]
        before = self.render(base, tools=tools, generation_prompt=False)
        after = self.render(base + new, tools=tools, generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template renders a conversation differently once messages follow it, even a "
                             "one-turn one; multi-turn token-in/token-out cannot line up with it")
        return after[len(before):], False


# ---- a session -----------------------------------------------------------------------------------
def _message_dict(message: Any) -> dict[str, Any]:
    """An OpenAI message (dict or the `openai` library's pydantic object) as a plain dict without
    null fields."""
    if hasattr(message, "model_dump"):
        message = message.model_dump(exclude_none=True)
    if not isinstance(message, Mapping):
        raise ValueError(f"a message must be a dict with 'role' and 'content', got {type(message).__name__}")
    out = {k: v for k, v in message.items() if v is not None}
    if "tool_calls" in out:
        out["tool_calls"] = [{k: v for k, v in dict(tc).items() if v is not None} for tc in out["tool_calls"]]
    if out.get("role") == "assistant" and "content" not in out:
        out["content"] = None
    return out


def _same_message(a: dict, b: dict) -> bool:
    def key(m: dict) -> tuple:
        calls = [(tc.get("function", {}).get("name"), tc.get("function", {}).get("arguments"))
                 for tc in m.get("tool_calls") or []]
        return m.get("role"), m.get("content") or "", calls

    return key(a) == key(b)


class Session:
    """One sample's conversation with the policy (module docstring). Per-token lists are aligned
    with `token_ids`; `prompt_len` tokens are the initial prompt."""

    def __init__(self, *, deltas: TemplateDeltas, backend: TurnBackend, limits: SessionLimits, uid: str,
                 stats: "RolloutStats | None" = None) -> None:
        self.deltas, self.backend, self.limits, self.uid = deltas, backend, limits, uid
        self.stats = stats if stats is not None else RolloutStats()
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.policy_versions: list[int] = []
        self.kv_versions: list[int] = []
        self.prompt_len = 0
        self.messages: list[dict[str, Any]] = []
        self.tools: list | None = None
        self.num_turns = 0
        self.finish_reason: str | None = None  # set when a limit ended the session
        self.last_turn_finish: str | None = None
        self.reward: float | None = None
        self.error: str | None = None
        self._rendered = 0  # messages whose tokens are in token_ids
        self._last_sampled: list[int] = []
        self._openai = None

    # ---- the rollout function's surface ---------------------------------------------------------
    async def chat(self, messages: Sequence[Any] | None = None, tools: list | None = None,
                   **sampling: Any) -> dict[str, Any]:
        """One assistant turn. `messages`: the whole conversation so far (the session's own history
        plus new tool / user messages, as an OpenAI agent passes it), or None to continue with the
        messages added by `add_observation`. Sampling keywords: max_tokens (max_completion_tokens),
        top_p, top_k, stop_token_ids, temperature (must be the run's: the trainer recomputes the
        log-probs at it). Raises `SessionFinished` once a limit ended the session."""
        if self.finish_reason is not None:
            raise SessionFinished(self.finish_reason)
        if messages is not None:
            self._merge(messages)
        if tools is not None:
            if self.num_turns and tools != self.tools:
                raise ValueError("tools changed in the middle of a session; the prompt that listed them is already "
                                 "sampled from (pass the same tools every turn)")
            self.tools = list(tools)
        if not self.messages:
            raise ValueError("session.chat needs at least one message")
        if self.num_turns >= self.limits.max_turns:
            return self._end("max_turns")
        params = self._params(sampling)
        self._extend_prompt()
        room = min(self.limits.max_total_tokens, self.backend.max_model_len - 1) - len(self.token_ids)
        if room <= 0:
            return self._end("max_total_tokens")
        wanted = params.max_tokens
        params = params.clone(max_tokens=min(wanted, room),
                              seed=None if params.seed is None else (params.seed + 7919 * self.num_turns) & (2**62 - 1))
        out = await self.backend.generate(self.token_ids, params, key=f"{self.uid}/t{self.num_turns}")
        n = len(out.token_ids)
        self.token_ids += out.token_ids
        self.loss_mask += [1] * n
        self.logprobs += [float(x) for x in out.logprobs]
        self.policy_versions += [int(v) for v in out.policy_versions]
        self.kv_versions += [int(v) for v in out.kv_versions]
        self._last_sampled = list(out.token_ids)
        self.num_turns += 1
        self.stats.turns += 1
        text = self.deltas.tokenizer.decode(list(out.token_ids), skip_special_tokens=True)
        message = parse_tool_calls(text).message()
        self.messages.append(message)
        self._rendered = len(self.messages)
        self.last_turn_finish = out.finish_reason
        if out.finish_reason == "length" and wanted > room and n >= room:
            self.finish_reason = "max_total_tokens"
        return dict(message)

    def add_observation(self, messages: Any) -> None:
        """Append tool / user / environment messages (one message or a list); their tokens are
        rendered at the next `chat`."""
        if self.finish_reason is not None:
            return
        if isinstance(messages, Mapping) or hasattr(messages, "model_dump"):
            messages = [messages]
        for m in messages:
            d = _message_dict(m)
            if d.get("role") == "assistant":
                raise ValueError("add_observation takes tool / user / system messages; assistant turns come from "
                                 "session.chat (the policy samples them)")
            self.messages.append(d)

    async def call_tools(self, message: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]) -> list[dict]:
        """Run the tool calls of an assistant `message` (`functions`: tool name -> a sync or async
        callable taking the call's arguments as keywords), each within `rollout.tool_timeout_s`.
        A tool that raises, times out or is unknown answers with a tool message naming the error.
        The tool messages are added as observations and returned. (A sync tool that times out keeps
        running in its thread; the session does not wait for it.)"""
        out = []
        for tc in _message_dict(message).get("tool_calls") or []:
            fn = tc.get("function", {})
            name = fn.get("name")
            self.stats.tool_calls += 1
            try:
                args = fn.get("arguments") or "{}"
                args = json.loads(args) if isinstance(args, str) else dict(args)
                tool = functions.get(name)
                if tool is None:
                    raise LookupError(f"unknown tool {name!r}; available: {', '.join(sorted(functions))}")
                call = tool(**args) if inspect.iscoroutinefunction(tool) else asyncio.to_thread(tool, **args)
                content = str(await asyncio.wait_for(call, self.limits.tool_timeout_s))
            except asyncio.TimeoutError:
                self.stats.tool_errors += 1
                content = f"error: tool {name!r} timed out after {self.limits.tool_timeout_s:g}s"
            except Exception as e:  # of any kind: the tool's failure is the model's observation
                self.stats.tool_errors += 1
                content = f"error: {type(e).__name__}: {e}"
            out.append({"role": "tool", "tool_call_id": tc.get("id", ""), "name": name, "content": content})
        self.add_observation(out)
        return out

    @property
    def openai(self):
        """An OpenAI-compatible async client bound to this session (no HTTP):
        `await session.openai.chat.completions.create(messages=..., tools=...)`."""
        if self._openai is None:
            from rl_engine.rollout.agentic_openai import SessionClient

            self._openai = SessionClient(self)
        return self._openai

    @property
    def response(self) -> str:
        """The content of the last assistant message ("" if none): what a reward function scores."""
        for m in reversed(self.messages):
            if m.get("role") == "assistant":
                return m.get("content") or ""
        return ""

    # ---- internals ------------------------------------------------------------------------------
    def _end(self, reason: str):
        self.finish_reason = reason
        raise SessionFinished(reason)

    def _merge(self, messages: Sequence[Any]) -> None:
        given = [_message_dict(m) for m in messages]
        if len(given) < len(self.messages) or not all(
                _same_message(a, b) for a, b in zip(given, self.messages[:len(given)])):
            raise ValueError(f"session {self.uid}: the messages passed to chat() rewrite the conversation so far "
                             f"({len(self.messages)} messages); pass the session's history unchanged plus new messages")
        self.add_observation(given[len(self.messages):])

    def _params(self, sampling: dict[str, Any]) -> SamplingParams:
        lim = self.limits
        sampling = dict(sampling)
        temperature = sampling.pop("temperature", None)
        if temperature is not None and float(temperature) != lim.temperature:
            raise ValueError(f"temperature={temperature}: rollouts sample at rollout.temperature={lim.temperature} "
                             "(the trainer recomputes the behavior log-probs at it); leave temperature unset")
        max_tokens = sampling.pop("max_tokens", None) or sampling.pop("max_completion_tokens", None)
        max_tokens = lim.max_new_tokens if max_tokens is None else min(int(max_tokens), lim.max_new_tokens)
        top_p = sampling.pop("top_p", None)
        top_k = sampling.pop("top_k", None)
        stop_ids = list(sampling.pop("stop_token_ids", None) or [])
        if sampling:
            raise ValueError(f"session.chat: unsupported sampling arguments {sorted(sampling)}; supported: "
                             "max_tokens, max_completion_tokens, top_p, top_k, stop_token_ids, temperature")
        return SamplingParams(temperature=lim.temperature, top_p=lim.top_p if top_p is None else float(top_p),
                              top_k=lim.top_k if top_k is None else int(top_k), max_tokens=max_tokens,
                              stop_token_ids=lim.stop_token_ids + stop_ids, seed=lim.seed, detokenize=False,
                              logprobs=0)  # the turn's behaviour log-probs (the loss needs them)

    def _extend_prompt(self) -> None:
        """Append the tokens of the messages added since the last turn (the first turn: the prompt)."""
        d, tools = self.deltas, self.tools
        if not self.token_ids:
            self._append_context(d.prompt_ids(self.messages, tools=tools))
            self.prompt_len = len(self.token_ids)
            self._rendered = len(self.messages)
            return
        history, new = self.messages[:self._rendered], self.messages[self._rendered:]
        closing = d.unsampled_closing(self._last_sampled, tools=tools)
        expected = d.render(history, tools=tools, generation_prompt=False)
        seen = d.decode(self.token_ids + closing)
        text, consistent = d.observation_delta(history, new, tools=tools) if new else ("", True)
        if seen != expected or not consistent:
            self.stats.template_mismatch += 1
            if not self.stats.mismatch_logged:
                self.stats.mismatch_logged = True
                at = next((i for i, (a, b) in enumerate(zip(seen, expected)) if a != b), min(len(seen), len(expected)))
                logger.warning("rollout/template_mismatch: the chat template's render of session %s's history differs "
                               "from the tokens the model saw and sampled (first at character %d: sampled %r, template "
                               "%r); the accumulated ids are kept (token-in/token-out). Logged once.", self.uid, at,
                               seen[max(0, at - 40):at + 40], expected[max(0, at - 40):at + 40])
        self._append_context(closing + (d.encode(text) if text else []))
        self._rendered = len(self.messages)

    def _append_context(self, ids: list[int]) -> None:
        n = len(ids)
        self.token_ids += ids
        self.loss_mask += [0] * n
        self.logprobs += [0.0] * n
        self.policy_versions += [-1] * n
        self.kv_versions += [-1] * n


# ---- running rollout functions -------------------------------------------------------------------
@dataclass
class RolloutStats:
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    template_mismatch: int = 0
    fn_errors: int = 0
    mismatch_logged: bool = False
    fn_error_logged: bool = False
    finish: Counter = field(default_factory=Counter)
    fn_metrics: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self, num_sessions: int) -> dict[str, float]:
        out = {"rollout/template_mismatch": self.template_mismatch, "rollout/tool_calls": self.tool_calls,
               "rollout/tool_errors": self.tool_errors, "rollout/fn_errors": self.fn_errors,
               "rollout/turns_mean": self.turns / max(1, num_sessions)}
        out.update({f"rollout/finish_{reason}": self.finish[reason] for reason in FINISH_REASONS})
        out.update({f"rollout/fn/{k}": sum(v) / len(v) for k, v in sorted(self.fn_metrics.items()) if v})
        return out


@dataclass
class SessionRecord:
    """A finished session, ready to become a training sample (`rl_step.make_sample`)."""

    uid: str
    token_ids: list[int]
    prompt_len: int
    loss_mask: list[int]
    logprobs: list[float]
    policy_versions: list[int]
    kv_versions: list[int]
    num_turns: int
    finish_reason: str
    reward: float | None  # None: the reward function scores `response`
    response: str
    messages: list[dict[str, Any]]

    @property
    def num_sampled(self) -> int:
        return sum(self.loss_mask)


RolloutFn = Callable[[Session, dict], Awaitable[RolloutResult | None]]


def load_rollout_fn(path: str) -> RolloutFn:
    """`package.module:function` -> the async rollout function. ValueError naming what is wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"rollout.fn={path!r} must be 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"rollout.fn={path!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"rollout.fn={path!r}: module {module_name!r} has no attribute {attr!r}")
    if not inspect.iscoroutinefunction(fn):
        raise ValueError(f"rollout.fn={path!r} must be an async function: async def fn(session, item)")
    return fn


async def run_session(fn: RolloutFn, session: Session, item: dict) -> SessionRecord:
    """Run `fn` on one session; a limit (`SessionFinished`) ends it, any other exception from the
    rollout function ends it with finish_reason "error" (logged once, counted)."""
    stats = session.stats
    result = None
    try:
        result = await fn(session, dict(item))
    except SessionFinished:
        pass
    except Exception as e:  # a bug in user code must not take the run down; it is counted and logged once
        session.error = f"{type(e).__name__}: {e}"
        session.finish_reason = "error"
        stats.fn_errors += 1
        if not stats.fn_error_logged:
            stats.fn_error_logged = True
            logger.exception("rollout function failed on session %s (logged once; rollout/fn_errors counts)",
                             session.uid)
    reward = session.reward
    if isinstance(result, RolloutResult):
        if result.reward is not None:
            reward = result.reward
        for k, v in result.metrics.items():
            stats.fn_metrics.setdefault(k, []).append(float(v))
    elif result is not None:
        raise TypeError(f"the rollout function returned {type(result).__name__}; expected RolloutResult or None")
    finish = session.finish_reason or session.last_turn_finish or "stop"
    stats.finish[finish] += 1
    return SessionRecord(uid=session.uid, token_ids=list(session.token_ids), prompt_len=session.prompt_len,
                         loss_mask=list(session.loss_mask), logprobs=list(session.logprobs),
                         policy_versions=list(session.policy_versions), kv_versions=list(session.kv_versions),
                         num_turns=session.num_turns, finish_reason=finish,
                         reward=None if reward is None else float(reward), response=session.response,
                         messages=list(session.messages))


def item_fields(item) -> dict[str, Any]:
    """A prompt row's fields for the rollout function: the dataset row as read (`PromptItem.row`),
    with "uid", and "messages" when the prompt was a chat."""
    row = dict(getattr(item, "row", None) or {})
    row.setdefault("uid", item.uid)
    if item.messages is not None:
        row.setdefault("messages", [dict(m) for m in item.messages])
    if item.answer is not None:
        row.setdefault("answer", item.answer)
    return row


async def run_groups(fn: RolloutFn, items: Sequence[Any], *, n: int, backend: TurnBackend, deltas: TemplateDeltas,
                     limits_of: Callable[[Any, int], SessionLimits], stats: RolloutStats,
                     prefix: str = "") -> list[list[SessionRecord]]:
    """Run `n` concurrent sessions per item (all of them at once: their turns interleave in the
    engine's batch); [item][sample] records. Session i of an item is `<prefix><uid>/<i>` (its turns'
    request ids extend it: sessions that may share an engine need distinct prefixes)."""
    tasks = []
    for item in items:
        fields = item_fields(item)
        for i in range(n):
            session = Session(deltas=deltas, backend=backend, limits=limits_of(item, i), uid=f"{prefix}{item.uid}/{i}",
                              stats=stats)
            tasks.append(run_session(fn, session, fields))
    records = await asyncio.gather(*tasks)
    return [list(records[k * n:(k + 1) * n]) for k in range(len(items))]


def limits_from_config(cfg, *, eos_token_ids: Sequence[int], seed: int | None, greedy: bool = False) -> SessionLimits:
    r = cfg.rollout
    return SessionLimits(max_turns=r.max_turns, max_total_tokens=r.max_total_tokens, max_new_tokens=r.max_new_tokens,
                         tool_timeout_s=r.tool_timeout_s, temperature=0.0 if greedy else r.temperature,
                         top_p=1.0 if greedy else r.top_p, top_k=0 if greedy else r.top_k,
                         stop_token_ids=[] if r.ignore_eos else list(eos_token_ids), seed=seed)

