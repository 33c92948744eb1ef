"""The server of the tests: the app on a free loopback port (a thread of this process) over an engine,
with the official `openai` client bound to it."""

from __future__ import annotations

API_KEY = "test-key-123"
MODEL_NAME = "tiny-chat"


class RunningServer:
    def __init__(self, model_dir: str, *, api_key: str | None = API_KEY, backend: str = "host", **llm_kwargs) -> None:
        """backend "host": `EngineHost`, as `rl-engine serve` runs it; "async": `AsyncEngine`."""
        from rl_engine.inference import LLM, AsyncEngine
        from rl_engine.serve import build_app
        from rl_engine.serve.host import EngineHost
        from rl_engine.serve.server import ServerThread

        self.llm = LLM(model_dir, **{"kv_cache_memory": 16 << 20, **llm_kwargs})
        self.engine = self.llm.engine
        self.backend = EngineHost(self.engine) if backend == "host" else AsyncEngine.from_llm(self.llm)
        self.app = build_app(self.backend, model_name=MODEL_NAME, api_key=api_key)
        self.thread = ServerThread(self.app, host="127.0.0.1", port=0).start()
        self.base_url = f"http://127.0.0.1:{self.thread.port}/v1"
        self.api_key = api_key

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
