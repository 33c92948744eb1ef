"""The dynamic-batching inference engine: paged KV with prefix caching, continuous batching with
chunked prefill, a graph lookup cache, a seeded sampler under the log-prob contract, speculative
decoding (n-gram lookup, draft model), RL controls (interrupt / resume, weights versions), and the
vLLM-style `LLM` API on top."""

from rl_engine.inference.async_engine import AsyncEngine
from rl_engine.inference.config import EngineConfig
from rl_engine.inference.engine import LLMEngine
from rl_engine.inference.llm import LLM
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.sequence import CompletionOutput, RequestOutput
from rl_engine.inference.speculative import SpeculativeConfig

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams",
           "SpeculativeConfig"]
