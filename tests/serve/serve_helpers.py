"""The server of the tests: the app on a free loopback port (a thread of this process) over an engine (in
a process of its own, as `rl-engine serve` runs it, unless told otherwise), with the official `openai`
client bound to it."""

from __future__ import annotations

API_KEY = "test-key-123"
MODEL_NAME = "tiny-chat"
HOLD_ID = "test-hold"  # the owner's request that keeps the server's stepper from stepping (`hold_engine`)


# Fault injection through the engine's owner/guest protocol (rl_engine.serve.host): while the owner has a
# request of its own in the engine, the server's stepper admits and aborts served requests but never steps
# them (the owner's steps serve them). These run as exclusive calls (`RunningServer.call`): the test decides
# when and how far served requests are generated, whatever the machine's speed.
def hold_engine(engine) -> None:
    """Stop the server's stepper: an owner request in the engine (never stepped by the stepper)."""
    from rl_engine.inference import SamplingParams

    engine.add_request(HOLD_ID, [1, 2, 3], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))


def step_engine(engine, steps: int) -> int:
    """`steps` engine steps as its owner (served requests' outputs are delivered as usual); returns the
    tokens the served requests have generated so far."""
    for _ in range(steps):
        engine.step()
    return served_tokens(engine)


def served_tokens(engine) -> int:
    return sum(len(seq.output_token_ids) for rid, request in engine.requests.items() if rid != HOLD_ID
               for seq in request.seqs)


def release_engine(engine) -> None:
    """Undo `hold_engine`: the stepper steps served requests again."""
    engine.abort(HOLD_ID)


def spy_logprobs(engine) -> None:
    """Record what the server asks of the engine: each added request's `SamplingParams.logprobs` (by request
    id) and, per sampler call, whether it computed log-probs. `read_logprobs_spy` returns them and removes
    the spy."""
    add_request, sample = engine.add_request, engine.sampler.sample
    engine.logprobs_spy = {"requests": {}, "sampler_calls": []}

    def spied_add_request(request_id, prompt, params=None, **kw):
        engine.logprobs_spy["requests"][request_id] = "default" if params is None else params.logprobs
        return add_request(request_id, prompt, params, **kw)

    def spied_sample(logits, params, draw, *, logprobs=True, **kw):
        engine.logprobs_spy["sampler_calls"].append(logprobs)
        return sample(logits, params, draw, logprobs=logprobs, **kw)

    engine.add_request, engine.sampler.sample = spied_add_request, spied_sample


def read_logprobs_spy(engine) -> dict:
    del engine.add_request, engine.sampler.sample  # the class's methods again
    return engine.__dict__.pop("logprobs_spy")


class StepGate:
    """The same control over `AsyncEngine` (no owner/guest: its loop steps whatever is in the engine), in
    this process: its engine's `step` waits for a permit while the gate is held."""

    def __init__(self, engine) -> None:
        import threading

        self.engine, self._step = engine, engine.step
        self._cond = threading.Condition()
        self.permits, self.steps, self.open = 0, 0, False
        engine.step = self._gated

    def _gated(self):
        with self._cond:
            self._cond.wait_for(lambda: self.open or self.permits > 0)
            if not self.open:
                self.permits -= 1
        try:
            return self._step()
        finally:
            with self._cond:
                self.steps += 1
                self._cond.notify_all()

    def step(self, steps: int, timeout_s: float = 300.0) -> int:
        """Let `steps` steps run and wait for them (the engine's loop is then waiting for a permit)."""
        with self._cond:
            target, self.permits = self.steps + steps, self.permits + steps
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: self.steps >= target, timeout_s), "the engine did not step"
        return served_tokens(self.engine)

    def release(self) -> None:
        with self._cond:
            self.open = True
            self._cond.notify_all()
        self.engine.__dict__.pop("step", None)  # the class's method again (idempotent: also from a finally)


class RunningServer:
    def __init__(self, model_dir: str, *, api_key: str | None = API_KEY, backend: str = "process",
                 **llm_kwargs) -> None:
        """backend "process": the engine in a process of its own (`EngineClient`), as `rl-engine serve`
        runs it; "host": `EngineHost` in this process, as an RL run serves; "async": `AsyncEngine`."""
        from functools import partial

        from rl_engine.inference import LLM, AsyncEngine
        from rl_engine.serve import build_app
        from rl_engine.serve.engine_process import EngineClient
        from rl_engine.serve.host import EngineHost
        from rl_engine.serve.server import ServerThread

        self.kind = backend
        llm_kwargs = {"kv_cache_memory": 16 << 20, **llm_kwargs}
        if backend == "process":
            self.backend = EngineClient(partial(LLM, model_dir, **llm_kwargs))
        else:
            llm = LLM(model_dir, **llm_kwargs)
            self.backend = EngineHost(llm.engine) if backend == "host" else AsyncEngine.from_llm(llm)
        self.tokenizer = self.backend.engine.tokenizer
        self.app = build_app(self.backend, model_name=MODEL_NAME, api_key=api_key)
        self.thread = ServerThread(self.app, host="127.0.0.1", port=0).start()
        self.base_url = f"http://127.0.0.1:{self.thread.port}/v1"
        self.api_key = api_key

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {sample name with labels: value}."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        text = httpx.get(self.base_url[:-3] + "/metrics", headers=headers).text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def call(self, fn, timeout_s: float = 300.0):
        """`fn(engine)` with the engine to itself (between two steps), from this thread: run on the server's
        event loop (which reads the engine's pipe). Not for "async" (see `StepGate`). A liveness bound."""
        import asyncio

        if self.kind == "process":
            coro = self.backend.call(fn, exclusive=True)
        elif self.kind == "host":
            coro = self.backend.run_exclusive(lambda: fn(self.backend.engine))
        else:
            raise ValueError(f"call() needs the owner/guest protocol: backend {self.kind!r} has none")
        return asyncio.run_coroutine_threadsafe(coro, self.thread.loop).result(timeout_s)

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, **kw)

    def async_client(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, **kw)

    def stop(self) -> None:
        self.thread.stop()
        if hasattr(self.backend, "close"):
            self.backend.close()
