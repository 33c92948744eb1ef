"""What the completions and chat handlers share: running a request's prompts on the engine, stream
bookkeeping (text and token deltas per choice), log-prob formats, and the weights-version stamp.

The backend is anything with the `AsyncEngine` surface the server uses: `engine` (an `LLMEngine`, read
for its tokenizer, limits and stats) and `generate(prompt_ids, params, request_id=...)`, an async
iterator of cumulative `RequestOutput`s that aborts the request when the consumer goes away. A client
that disconnects cancels the task consuming it, which closes the iterators and frees the KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import msgspec
from starlette.requests import Request

from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.sequence import CompletionOutput, RequestOutput
from rl_engine.serve.protocol import APIError

_counter = itertools.count()


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}-{next(_counter)}"


async def on_engine(backend, fn, *, exclusive: bool = True):
    """`fn(engine)` for the handlers: in the engine's process when it has its own (`EngineClient.call`,
    `fn` picklable); else, with `exclusive`, between steps (`run_exclusive`), or at once (a read of
    counters, which must not wait for an RL run that holds the engine while it trains)."""
    from rl_engine.serve.engine_process import EngineClient

    if isinstance(backend, EngineClient):
        return await backend.call(fn, exclusive=exclusive)
    if exclusive:
        return await backend.run_exclusive(lambda: fn(backend.engine))
    return fn(backend.engine)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its requests were aborted."""


async def start_streams(backend, prompts: list[list[int]], params: SamplingParams,
                        rid: str) -> list[tuple[AsyncIterator[RequestOutput], RequestOutput]]:
    """One engine request per prompt, all submitted at once and each primed with its first output, so
    that a refusal by the engine is a 400 before any response is sent. Closes them all on failure."""
    gens = [backend.generate(ids, params, request_id=f"{rid}-{i}") for i, ids in enumerate(prompts)]
    try:
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
    except BaseException:
        for g in gens:
            await g.aclose()
        raise
    errors = [e for e in firsts if isinstance(e, BaseException)]
    if errors:
        for g in gens:
            await g.aclose()
        if isinstance(errors[0], ValueError):
            raise APIError(str(errors[0]), param="prompt") from None
        raise errors[0]
    return list(zip(gens, firsts))


async def merged(streams: list[tuple[AsyncIterator[RequestOutput], RequestOutput]]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every stream as they come, first outputs first; closing this
    iterator (or cancelling its consumer) closes every stream, aborting their requests."""
    for i, (_, first) in enumerate(streams):
        yield i, first
    if len(streams) == 1:  # one prompt: no tasks in between
        gen, first = streams[0]
        try:
            if not first.finished:
                async for out in gen:
                    yield 0, out
        finally:
            await gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    live = [i for i, (_, first) in enumerate(streams) if not first.finished]
    tasks = [asyncio.create_task(pump(i, streams[i][0])) for i in live]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled
                pass
        for gen, _ in streams:
            await gen.aclose()


async def collect(backend, prompts: list[list[int]], params: SamplingParams, rid: str,
                  request: Request | None) -> list[RequestOutput]:
    """Every prompt's final output; aborted (and its KV freed) if the client disconnects first."""
    streams = await start_streams(backend, prompts, params, rid)
    finals: list[RequestOutput | None] = [None] * len(prompts)

    async def consume() -> None:
        async for i, out in merged(streams):
            if out.finished:
                finals[i] = out

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and request is not None and await request.is_disconnected():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                raise ClientGone()
        task.result()
    finally:
        if not task.done():  # this handler was cancelled
            task.cancel()
    return finals  # type: ignore[return-value]


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object (msgspec: several times faster than json.dumps,
    which matters at one event per token per stream)."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


# ---- weights versions -----------------------------------------------------------------------------
def fingerprint(versions: list[int], current: int) -> str:
    """`system_fingerprint`: "v<k>" when one weights version sampled every token (the current one when
    no token was sampled), "v<first>-v<last>" when a weight update fell inside the request."""
    if not versions:
        return f"v{current}"
    lo, hi = min(versions), max(versions)
    return f"v{lo}" if lo == hi else f"v{lo}-v{hi}"


# ---- streaming deltas -----------------------------------------------------------------------------
@dataclass
class ChoiceCursor:
    """What was already sent of one choice: characters of its text and its tokens."""

    text_sent: int = 0
    tokens_sent: int = 0
    finished: bool = False

    def text_delta(self, out: CompletionOutput, *, stop: list[str]) -> str:
        """New text safe to send: while running, a tail that may still become a stop string (or is an
        incomplete UTF-8 character) is held back; the engine cuts the final text at the stop string."""
        text = out.text or ""
        if not out.finished:
            hold = max((len(s) - 1 for s in stop), default=0)
            stable = text[:len(text) - hold] if hold else text
            stable = stable.rstrip("\ufffd")
        else:
            stable = text
        if len(stable) <= self.text_sent:
            return ""
        delta = stable[self.text_sent:]
        self.text_sent = len(stable)
        return delta

    def new_tokens(self, out: CompletionOutput) -> range:
        new = range(self.tokens_sent, len(out.token_ids))
        self.tokens_sent = len(out.token_ids)
        return new


# ---- log-prob formats -----------------------------------------------------------------------------
@dataclass
class TokenText:
    """Token id -> its text for log-prob entries (special tokens included), memoised."""

    tokenizer: Any
    cache: dict[int, str] = field(default_factory=dict)

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)
            self.cache[token_id] = text
        return text


def completion_logprobs(out: CompletionOutput, positions: range, token_text: TokenText, *, text_offset: int,
                        prompt_ids: list[int] | None = None, prompt_logprobs: "PromptLogprobs | None" = None
                        ) -> dict[str, Any]:
    """The legacy completions `logprobs` object for generated tokens `positions`, after the echoed
    prompt's tokens (`prompt_ids`, with `prompt_logprobs`: the first token's is null, as OpenAI's)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for j, t in enumerate(prompt_ids or []):
        s = token_text(t)
        lp = top = None
        if prompt_logprobs is not None and j > 0:
            lp = prompt_logprobs.logprobs[j - 1]
            top = {token_text(i): v for i, v in prompt_logprobs.top[j - 1]}
        tokens.append(s), token_logprobs.append(lp), tops.append(top), offsets.append(offset)
        offset += len(s)
    for k in positions:
        t = out.token_ids[k]
        s = token_text(t)
        tokens.append(s)
        token_logprobs.append(out.logprobs[k])
        tops.append({token_text(i): lp for i, lp in out.top_logprobs[k]} if out.top_logprobs is not None else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(out: CompletionOutput, positions: range, token_text: TokenText) -> dict[str, Any]:
    """The chat `logprobs` object ({"content": [{token, logprob, bytes, top_logprobs}]})."""
    content = []
    for k in positions:
        s = token_text(out.token_ids[k])
        tops = [{"token": token_text(i), "logprob": lp, "bytes": list(token_text(i).encode())}
                for i, lp in (out.top_logprobs[k] if out.top_logprobs is not None else [])]
        content.append({"token": s, "logprob": out.logprobs[k], "bytes": list(s.encode()), "top_logprobs": tops})
    return {"content": content}


@dataclass
class PromptLogprobs:
    """Per prompt token after the first: its log-prob and the `k` most likely (id, log-prob) pairs."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


def prompt_logprobs(engine, prompt: list[int], *, temperature: float, k: int) -> PromptLogprobs:
    """The prompt tokens' log-probs under the log-prob contract (log_softmax(logits / T), T = 1 when
    greedy), from one forward pass of the engine's model over the prompt (no KV cache involved). The
    caller holds the engine (`on_engine`): the weights must not change meanwhile."""
    import torch

    model = engine.model
    device = next(model.parameters()).device
    with torch.inference_mode():
        ids = torch.tensor(prompt, device=device)
        logits = model(ids, positions=torch.arange(len(prompt), device=device))[:-1].float()  # [T-1, V]
        logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
        token = logp.gather(1, ids[1:, None])[:, 0].tolist()
        if k:
            values, top_ids = logp.topk(k, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        else:
            top = [[] for _ in token]
    return PromptLogprobs(logprobs=token, top=top)


def usage(outputs: list[RequestOutput | None]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs if o is not None)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(out: CompletionOutput) -> str | None:
    return out.finish_reason


def now() -> int:
    return int(time.time())
