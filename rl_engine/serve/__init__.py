"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): `rl-engine serve` over an `AsyncEngine`, and the
same app on the engine(s) of an RL run (`placement.serve_port`), answering from the weights being trained.
Every answer is stamped with the weights version that sampled it."""

from rl_engine.serve.app import build_app

__all__ = ["build_app"]
