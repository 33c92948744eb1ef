"""`AsyncEngine`: the engine behind asyncio, for servers and async rollout workers.

All engine state is touched by one background task between steps; the step itself (the forward pass)
runs in a worker thread so the event loop stays responsive. `generate()` is an async iterator that
yields the request's cumulative `RequestOutput` after every step that advanced it (the newest of
several, when its consumer fell behind), the last one finished. A refused request raises its
ValueError from `generate()`; the others are unaffected.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator

from rl_engine.inference.engine import LLMEngine
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.sequence import RequestOutput


async def outputs_of(queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
    """A request's outputs from its queue until the finished one (an Exception put there is raised).
    When the consumer fell behind, only the newest of the outputs already queued is yielded: each is
    cumulative, so nothing is lost, and a slow reader gets fewer, larger updates."""
    while True:
        item = await queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
            item = queue.get_nowait()
        if isinstance(item, Exception):
            raise item
        yield item
        if item.finished:
            return


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: list[tuple[str, object, SamplingParams | None]] = []
        self._aborts: list[str] = []
        self._controls: list[tuple[object, asyncio.Future]] = []
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()

    @classmethod
    def from_llm(cls, llm) -> "AsyncEngine":
        return cls(llm.engine)

    async def generate(self, prompt, params: SamplingParams | None = None, *,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one request: its cumulative output after every step, the last one finished."""
        rid = request_id if request_id is not None else f"async-{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"request_id {rid!r} is already being generated")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._pending.append((rid, prompt, params))
        self._ensure_loop()
        try:
            async for item in outputs_of(queue):
                yield item
        finally:
            if self._queues.pop(rid, None) is not None and rid in self.engine.requests:
                self._aborts.append(rid)  # the consumer went away: stop generating for it
                self._ensure_loop()

    async def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._ensure_loop()

    async def interrupt(self) -> list:
        """Between steps: end every request, returning partial outputs (streams get them too)."""
        return await self._between_steps(self.engine.interrupt)

    async def update_weights(self, apply=None, *, version: int | None = None, recompute_kv: bool = False) -> int:
        """Between steps: `LLMEngine.update_weights`."""
        return await self._between_steps(lambda: self.engine.update_weights(apply, version=version,
                                                                            recompute_kv=recompute_kv))

    async def run_exclusive(self, fn):
        """Between steps: `fn()` with the engine to itself (e.g. a forward pass over its model)."""
        return await self._between_steps(fn)

    async def _between_steps(self, fn):
        future = asyncio.get_running_loop().create_future()
        self._controls.append((fn, future))
        self._ensure_loop()
        return await future

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Step while there is work; exit when idle (the next request starts a new task)."""
        engine = self.engine
        while True:
            self._apply_pending()
            if not engine.has_unfinished_requests():
                return
            self._deliver(await asyncio.to_thread(engine.step))

    def _apply_pending(self) -> None:
        engine = self.engine
        pending, self._pending = self._pending, []
        for rid, prompt, params in pending:
            try:
                engine.add_request(rid, prompt, params, stream=True)
            except ValueError as e:
                queue = self._queues.get(rid)
                if queue is not None:
                    queue.put_nowait(e)
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            out = engine.abort(rid)
            if out is not None:
                self._deliver([out])
        controls, self._controls = self._controls, []
        for fn, future in controls:
            try:
                result = fn()
            except Exception as e:  # hand any failure to the caller awaiting it
                future.set_exception(e)
                continue
            if fn == engine.interrupt:
                self._deliver(result)
            future.set_result(result)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
