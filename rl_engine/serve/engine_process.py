"""`EngineClient`: the engine in a process of its own behind the HTTP server (`rl-engine serve`).

In one process the event loop's Python work (HTTP parsing, the handlers, SSE encoding, socket
writes) and the engine's stepping share one GIL, so every step waits for the loop's share of each
token and the two never overlap. As vLLM V1 splits `AsyncLLM` from `EngineCore` (over ZMQ there),
the engine runs in a child process (spawned) under an `EngineHost` that steps while it holds
requests; each step's outputs cross a `multiprocessing` pipe as one message of deltas per request
(new token ids, log-probs, versions, the new tail of the text), which this side turns back into
the cumulative `RequestOutput`s the handlers read, in one wake-up of the event loop. Requests,
aborts (a client that went away) and calls on the engine (`call`: the echoed prompt's log-probs,
the /metrics gauges) go the other way. The child's main thread only reads its pipe (calls run on a
thread of their own, steps on the host's), so a message in either direction never waits for a step.

The pipe is an anonymous socket pair that only the server and the child it spawned hold (nothing
binds or listens), and its messages are pickled: the tokenizer at start-up and the functions of `call`
cross it. That is outside ARCHITECTURE.md's wire rule (msgspec, no pickle on any socket), which is
written for the actors' addressable sockets; moving this pipe to msgspec frames too is an open item.

`engine` is a read-only view of what the handlers need (tokenizer, limits, weights version); an RL
run's server stays in the run's process (`host.RunServer`), where the engine belongs to the run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, AsyncIterator, Callable

from rl_engine.inference.async_engine import outputs_of
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.sequence import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)


class EngineProcessError(RuntimeError):
    """The engine process failed to start or exited."""


# ---- the engine's process -----------------------------------------------------------------------------
class _DeltaSink:
    """`EngineHost`'s delivery in the engine process: each step's outputs as one pipe message of
    per-request deltas against what was sent before (so a long generation costs each step its new
    tokens, not all of them)."""

    def __init__(self, send: Callable[[tuple], None], engine) -> None:
        self.send = send
        self.engine = engine
        self.sent: dict[str, list[list]] = {}  # request id -> per sample [tokens sent, text sent]
        self.dropped: deque[str] = deque()  # cancelled by the server (its reader thread appends): forget them

    def __call__(self, items: list[tuple[str, object]]) -> None:
        outs, errors = [], []
        for rid, item in items:
            if isinstance(item, BaseException):
                errors.append((rid, type(item).__name__, str(item)))
                self.sent.pop(rid, None)
            else:
                outs.append(self._delta(rid, item))
        if outs or errors:
            self.send(("out", self.engine.weights_version, outs, errors))
        while self.dropped:  # after the items: a step that was running when the cancel came has delivered
            self.sent.pop(self.dropped.popleft(), None)

    def _delta(self, rid: str, out: RequestOutput) -> tuple:
        state = self.sent.get(rid)
        first = state is None
        if first:
            state = self.sent[rid] = []
        samples = []
        for c in out.outputs:
            while len(state) <= c.index:
                state.append([0, ""])
            seen = state[c.index]
            start, text = seen[0], c.text or ""
            # the text usually grows at the end; a trailing incomplete character (U+FFFD) may become a
            # real one, and a stop string cuts the final text: then the common prefix is kept
            keep = len(seen[1])
            if not text.startswith(seen[1]):
                keep = next((i for i, (a, b) in enumerate(zip(seen[1], text)) if a != b), min(keep, len(text)))
            tops = None if c.top_logprobs is None else c.top_logprobs[start:]
            logprobs = None if c.logprobs is None else c.logprobs[start:]  # None: the request asked for none
            samples.append((c.index, start, c.token_ids[start:], logprobs, c.policy_versions[start:],
                            c.kv_versions[start:], tops, None if c.text is None else keep, text[keep:],
                            c.finish_reason, c.stop_reason, c.num_preemptions))
            seen[0], seen[1] = len(c.token_ids), text
        if out.finished:
            del self.sent[rid]
        return rid, out.finished, list(out.prompt_token_ids) if first else None, samples


def _engine_main(conn, build_llm: Callable[[], Any], log_level: int) -> None:
    """The engine process: build the engine, then serve the pipe until the server closes it."""
    from rl_engine.serve.host import EngineHost

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")

    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:  # the stepper thread and this one both write
            conn.send(message)

    try:
        engine = build_llm().engine
    except BaseException as e:  # noqa: BLE001 - reported to the server, which raises it
        send(("failed", type(e).__name__, str(e)))
        return
    sink = _DeltaSink(send, engine)
    host = EngineHost(engine, deliver=sink)
    send(("ready", {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
                    "vocab_size": engine.model.config.vocab_size, "speculative": engine.speculator is not None,
                    "weights_version": engine.weights_version}))

    def run_call(call_id: int, fn: Callable[[Any], Any], exclusive: bool) -> None:
        try:
            if exclusive:
                with host.lock:
                    result = ("ok", fn(engine))
            else:
                result = ("ok", fn(engine))
        except Exception as e:  # noqa: BLE001 - handed to the caller
            result = ("error", type(e).__name__, str(e))
        send(("ret", call_id, result))

    # Calls run on a thread of their own: an exclusive one waits for the engine's lock (a step in
    # progress), and this loop must keep reading meanwhile, or the server's writes to a full pipe
    # would block its event loop (and, with the stepper blocked writing to the server, deadlock).
    calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-calls")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server went away
            break
        kind = message[0]
        if kind == "add":
            host.submit(*message[1:])
        elif kind == "abort":
            host.cancel(message[1])
            sink.dropped.append(message[1])
        elif kind == "call":
            calls.submit(run_call, *message[1:])
        elif kind == "stop":
            break
    calls.shutdown(wait=True)
    host.close()


# ---- the server's process -----------------------------------------------------------------------------
_EMPTY = CompletionOutput(index=0, token_ids=[], text=None, logprobs=[], policy_versions=[], kv_versions=[],
                          finish_reason=None)


class _Stream:
    """One request's outputs as they accumulate on the server's side."""

    __slots__ = ("queue", "prompt_token_ids", "samples", "finished")

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_token_ids: list[int] = []
        self.samples: dict[int, CompletionOutput] = {}
        self.finished = False

    def apply(self, rid: str, finished: bool, prompt_ids: list[int] | None, samples: list) -> RequestOutput:
        if prompt_ids is not None:
            self.prompt_token_ids = prompt_ids
        for (index, start, tokens, logprobs, versions, kv_versions, tops, keep, tail, finish_reason, stop_reason,
             preemptions) in samples:
            c = self.samples.get(index) or _EMPTY
            assert start == len(c.token_ids), (rid, start, len(c.token_ids))  # deltas arrive in order
            # a new object per output (its lists copied): the handlers hold cumulative snapshots
            text = None if keep is None else (c.text or "")[:keep] + tail
            self.samples[index] = CompletionOutput(
                index=index, token_ids=c.token_ids + tokens, text=text,
                logprobs=None if logprobs is None else (c.logprobs or []) + logprobs, policy_versions=c.policy_versions + versions,
                kv_versions=c.kv_versions + kv_versions, finish_reason=finish_reason, stop_reason=stop_reason,
                num_preemptions=preemptions,
                top_logprobs=None if tops is None else (c.top_logprobs or []) + tops)
        self.finished = finished
        return RequestOutput(request_id=rid, prompt=None, prompt_token_ids=self.prompt_token_ids,
                             outputs=[self.samples[i] for i in sorted(self.samples)], finished=finished)


class EngineClient:
    """The backend of `build_app` with the engine in a child process (see the module doc).
    `build_llm` (picklable: a module-level function or a `functools.partial` of one) makes the `LLM` in
    the child; a failure there is raised here (ValueError for a bad value, EngineProcessError otherwise)."""

    def __init__(self, build_llm: Callable[[], Any], *, start_timeout_s: float = 600.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        log_level = logging.getLogger().getEffectiveLevel()
        self._proc = ctx.Process(target=_engine_main, args=(child, build_llm, log_level), name="rl-engine-core",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._send_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: str | None = None
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise EngineProcessError(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self.close()
            raise EngineProcessError(f"the engine process exited while starting (exit code {self._proc.exitcode})") \
                from None
        if message[0] == "failed":
            self.close()
            _, kind, text = message
            raise ValueError(text) if kind in ("ValueError", "InputError") else EngineProcessError(f"{kind}: {text}")
        info = message[1]
        # what the handlers read of the engine (`backend.engine`): its tokenizer, limits and version
        self.engine = SimpleNamespace(tokenizer=info["tokenizer"], max_model_len=info["max_model_len"],
                                      model=SimpleNamespace(config=SimpleNamespace(vocab_size=info["vocab_size"])),
                                      speculator=True if info["speculative"] else None,
                                      weights_version=info["weights_version"])

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the engine process is running (GET /health answers 503 once it is not)."""
        return self._dead is None and self._proc.is_alive()

    # ---- the backend's surface ----------------------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None, *,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self._attach()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already being generated")
        stream = self._streams[request_id] = _Stream()
        try:
            self._send(("add", request_id, prompt, params))
            async for item in outputs_of(stream.queue):
                yield item
        finally:
            if self._streams.pop(request_id, None) is not None and not stream.finished and self._dead is None:
                try:
                    self._send(("abort", request_id))  # the consumer went away: stop generating for it
                except EngineProcessError:
                    pass

    async def call(self, fn: Callable[[Any], Any], *, exclusive: bool = True) -> Any:
        """`fn(engine)` in the engine's process (`fn` picklable); `exclusive`: with the engine to itself
        (between steps), as a forward pass over its model needs."""
        self._attach()
        call_id = next(self._call_ids)
        future = self._calls[call_id] = asyncio.get_running_loop().create_future()
        try:
            self._send(("call", call_id, fn, exclusive))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._loop.remove_reader, self._conn.fileno())
            except RuntimeError:
                pass
        try:
            with self._send_lock:
                self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    # ---- the pipe ------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        if self._dead is not None:
            raise EngineProcessError(self._dead)
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the engine process is gone (its reader will see the end of the pipe)
            raise EngineProcessError(f"the engine process exited (exit code {self._proc.exitcode})") from None

    def _attach(self) -> None:
        """Read the pipe from the running event loop (the first caller's: the server's)."""
        if self._dead is not None:
            raise EngineProcessError(self._dead)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._engine_gone()

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "out":
            _, version, outs, errors = message
            self.engine.weights_version = version
            for rid, finished, prompt_ids, samples in outs:
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.queue.put_nowait(stream.apply(rid, finished, prompt_ids, samples))
            for rid, kind_name, text in errors:
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.finished = True
                    stream.queue.put_nowait(ValueError(text) if kind_name == "ValueError" else RuntimeError(text))
        elif kind == "ret":
            _, call_id, result = message
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                if result[0] == "ok":
                    future.set_result(result[1])
                else:
                    future.set_exception(ValueError(result[2]) if result[1] == "ValueError"
                                         else RuntimeError(f"{result[1]}: {result[2]}"))

    def _engine_gone(self) -> None:
        self._proc.join(1)
        self._dead = f"the engine process exited (exit code {self._proc.exitcode})"
        logger.error("%s; failing the requests in flight", self._dead)
        self._loop.remove_reader(self._conn.fileno())
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineProcessError(self._dead))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineProcessError(self._dead))
