"""The server of the tests: the app on a free loopback port (a thread of this process) over an engine (in
a process of its own, as `rl-engine serve` runs it, unless told otherwise), with the official `openai`
client bound to it."""

from __future__ import annotations

API_KEY = "test-key-123"
MODEL_NAME = "tiny-chat"


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
