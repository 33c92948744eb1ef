"""`EngineHost`: the engine behind the HTTP server, alone (`rl-engine serve`) or as the guest of an
RL run's loop (`placement.serve_port`), answering from the weights being trained.

A stepper thread steps the engine while it holds served requests, handing each step's outputs to the
server's event loop without waiting for it (`call_soon_threadsafe`); requests from the loop wait in an
inbox and join the continuous batch at the start of the next step. Measured against `AsyncEngine`,
which returns to the event loop between steps (`benchmarks/serve.py`, 32 streaming clients on a
busy 2-core CPU): 2-3x the tokens/s, because a step no longer waits for the loop thread to be scheduled.

In an RL run the run's loop owns the engine and keeps stepping it as before (a trainer's
`LLM.generate`, a rollout worker's loop); the host is its guest (`LLMEngine.guest`): `admit()` at the
start of every step, whoever runs it, adds the inbox's requests, and `route()` takes the served
requests' outputs out of what the owner gets. When the engine holds only served requests (between
rollouts) the stepper steps it. One lock (`host.lock`) serialises every use of the engine: the owner
holds it while it generates and while it changes the weights, so a request that arrives during
training or a weight update waits, and the first token sampled after the update carries the new
version; the lock is owner-first (`OwnerFirstLock`): an owner asking for it gets it after the step in
progress, whatever the served requests still have to generate. A served request that the owner
interrupts (async mode's partial rollouts) is continued with the new weights, its earlier tokens
keeping their versions. The host offers the surface the app uses
(`engine`, `generate`), as `AsyncEngine` does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Callable

from rl_engine.inference.async_engine import outputs_of
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.sequence import RequestOutput

logger = logging.getLogger(__name__)


class OwnerFirstLock:
    """A reentrant lock that the stepper takes only while nobody else waits for it (`acquire_if_unwanted`):
    an owner (a run's generation, training, weight update) that asks for the engine gets it at the end
    of the step in progress, rather than racing the stepper for it at every step (threading's locks are
    not fair: a stepper that releases and re-takes the lock at once could keep it until the served
    requests finish)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0  # threads in acquire() (the owner's side)

    def acquire(self) -> bool:
        with self._cond:
            self._waiting += 1
        try:
            return self._lock.acquire()
        finally:
            with self._cond:
                self._waiting -= 1
                if not self._waiting:
                    self._cond.notify_all()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "OwnerFirstLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire_if_unwanted(self, timeout: float) -> bool:
        """The stepper's acquire: once no one waits in `acquire()` (False if that took over `timeout` s)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._waiting, timeout):
                return False
        return self._lock.acquire()


class EngineHost:
    def __init__(self, engine, *, deliver: Callable[[list[tuple[str, object]]], None] | None = None) -> None:
        """`deliver`: where a step's outputs go, as one list of (request id, `RequestOutput` or the
        Exception that failed it), on the stepping thread; by default the `generate()` streams of the
        server's event loop. The engine process (`engine_process.py`) writes them to its pipe instead,
        with requests coming in through `submit()` and `cancel()`."""
        if engine.guest is not None:
            raise ValueError("this engine already has a guest")
        self.engine = engine
        self.lock = OwnerFirstLock()  # every use of the engine, by the owner or the guest
        self._mutex = threading.Lock()  # the inbox and the stream table (never held while stepping)
        self._inbox: list[tuple[str, object, SamplingParams | None]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._active: set[str] = set()  # guest requests in the engine (touched under `lock`)
        self._deliver_to = deliver
        self._wake = threading.Event()
        self._stop = False
        engine.guest = self
        self._thread = threading.Thread(target=self._step_loop, name="engine-host", daemon=True)
        self._thread.start()

    # ---- the server's side (its event loop) -------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams | None = None, *,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        queue: asyncio.Queue = asyncio.Queue()
        with self._mutex:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already being generated")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append((request_id, prompt, params))
        self._wake.set()
        try:
            async for item in outputs_of(queue):
                yield item
        finally:
            with self._mutex:
                if self._streams.pop(request_id, None) is not None:
                    self._aborts.append(request_id)  # the consumer went away: stop generating for it
            self._wake.set()

    def submit(self, request_id: str, prompt, params: SamplingParams | None) -> None:
        """Add a request at the next step, its outputs going to `deliver` (the engine process's side)."""
        with self._mutex:
            self._inbox.append((request_id, prompt, params))
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Abort a request at the next step (nothing if it already finished)."""
        with self._mutex:
            self._aborts.append(request_id)
        self._wake.set()

    async def run_exclusive(self, fn):
        """`fn()` on a worker thread with the engine to itself (its lock held: no step, no weight
        update meanwhile)."""
        def locked():
            with self.lock:
                return fn()

        return await asyncio.to_thread(locked)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(10)
        with self.lock:
            for rid in list(self._active):
                self.engine.abort(rid)
            self._active.clear()
            self.engine.guest = None

    # ---- the engine's side (under `lock`, on whichever thread steps) -------------------------------
    def admit(self) -> None:
        """Add the inbox's requests to the engine and drop those whose client went away."""
        with self._mutex:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for rid, prompt, params in inbox:
            try:
                self.engine.add_request(rid, prompt, params, stream=True)
            except Exception as e:  # noqa: BLE001 - fails this request only: the stepper (or the RL run
                # whose step admits it) goes on
                if not isinstance(e, ValueError):  # bad input is a ValueError; anything else is a bug to see
                    logger.exception("adding served request %s failed", rid)
                self._deliver(rid, e)
                continue
            self._active.add(rid)
        for rid in aborts:
            if rid in self._active:
                self._active.discard(rid)
                self.engine.abort(rid)

    def route(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Deliver the guest's outputs; return the owner's."""
        owner: list[RequestOutput] = []
        resume: list[RequestOutput] = []
        deliveries: list[tuple[str, object]] = []
        for out in outputs:
            rid = out.request_id
            if rid not in self._active:
                owner.append(out)
            elif out.finished and any(c.finish_reason == "abort" for c in out.outputs):
                resume.append(out)  # interrupted by the owner (a weight update): continue it
            else:
                if out.finished:
                    self._active.discard(rid)
                deliveries.append((rid, out))
        self._deliver_all(deliveries)
        for partial in resume:  # continued with the current weights at the next step
            self.engine.add_request(partial.request_id, partial, partial.sampling_params, stream=True)
        assert not owner or threading.current_thread() is not self._thread, "the stepper stepped the owner's work"
        return owner

    def _deliver(self, rid: str, item) -> None:
        self._deliver_all([(rid, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand items to their streams: one wake-up of each event loop per call (a step's outputs
        together), not one per stream; or to `deliver` when given."""
        if self._deliver_to is not None:
            self._deliver_to(items)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._mutex:
            for rid, item in items:
                stream = self._streams.get(rid)
                if stream is not None:
                    by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the server's loop is closed
                pass

    def _has_guest_work(self) -> bool:
        with self._mutex:
            return bool(self._inbox or self._aborts or self._active)

    def _guest_only(self) -> bool:
        """Whether every request in the engine, and every output it holds back, is the guest's: the
        stepper then steps, and no output of the owner can come back to it."""
        engine = self.engine
        return all(rid in self._active for rid in engine.requests) and not engine._ready  # noqa: SLF001

    def _step_loop(self) -> None:
        """Step the engine for the guest's requests whenever the owner is not using it."""
        while not self._stop:
            self._wake.wait(0.05)
            self._wake.clear()
            while not self._stop and self._has_guest_work():
                if not self.lock.acquire_if_unwanted(0.05):
                    continue  # the owner holds or wants the engine (it serves the guest too while it steps)
                try:
                    self.admit()
                    if not self._active or not self._guest_only():
                        break  # the owner has work in the engine: it steps (and so serves the guest too)
                    try:
                        self.engine.step()
                    except Exception:  # noqa: BLE001 - fail the guest's requests, keep the run alive
                        logger.exception("engine step for served requests failed")
                        for rid in list(self._active):
                            self._active.discard(rid)
                            self.engine.abort(rid)
                            self._deliver(rid, RuntimeError("the engine failed on this request"))
                finally:
                    self.lock.release()


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class RunServer:
    """The server of an RL run on one engine: an `EngineHost` and the app on a thread. The owner wraps
    every use of the engine (generation, training that changes the weights it reads, weight updates)
    in `with server.lock:`. The address is logged and written to `address_file` (JSON: url, host,
    port, model) so that a run started with port 0 can be found."""

    def __init__(self, engine, *, host: str, port: int, model_name: str, api_key: str | None,
                 address_file: str | None = None, where: str = "placement.serve_port") -> None:
        from rl_engine.serve.app import build_app
        from rl_engine.serve.server import ServerThread, warn_if_exposed

        warn_if_exposed(host, api_key, where=where)
        self.host = EngineHost(engine)
        self.lock = self.host.lock
        try:
            self.thread = ServerThread(build_app(self.host, model_name=model_name, api_key=api_key),
                                       host=host, port=port).start()
        except BaseException:
            self.host.close()
            raise
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.thread.port}/v1"
        logger.info("serving the run's policy as %r on %s", model_name, self.url)
        if address_file is not None:
            import json
            import os

            os.makedirs(os.path.dirname(address_file), exist_ok=True)
            tmp = f"{address_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"url": self.url, "host": host, "port": self.thread.port, "model": model_name,
                           "api_key_required": api_key is not None}, f)
            os.replace(tmp, address_file)  # readers never see a partial file

    def close(self) -> None:
        self.thread.stop()
        self.host.close()


def start_run_server(cfg, engine, *, name: str, port_offset: int = 0) -> "RunServer | None":
    """The run's server on `engine` when `placement.serve_port` is set (None otherwise). `name` names the
    address file (<output_dir>/serve/<name>.json); rollout worker i serves on serve_port + i."""
    import os

    p = cfg.placement
    if p.serve_port is None:
        return None
    port = p.serve_port + port_offset if p.serve_port else 0
    api_key = os.environ.get("RL_ENGINE_API_KEY") or None
    return RunServer(engine, host=p.serve_host, port=port, model_name=p.serve_model_name, api_key=api_key,
                     address_file=os.path.join(cfg.train.output_dir, "serve", f"{name}.json"))
