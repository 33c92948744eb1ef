"""Request models of the OpenAI-compatible API, their checks, and the OpenAI error object.

Pydantic parses the JSON (a wrong type is a 400 naming the field); `check_*` then refuse values
outside their range with the field and the allowed range, and turn a request into `SamplingParams`.
Parameters the engine cannot honour (`logit_bias`, penalties, `suffix`, a non-text `response_format`)
are refused by name rather than ignored; fields this server does not know are ignored with a warning,
as vLLM does. A request that asks for no log-probs (completions without `logprobs`, chat without
`logprobs: true`) runs with `SamplingParams(logprobs=None)`: the engine computes none. A client that
records behaviour log-probs (an RL rollout through this API) asks for them: completions `logprobs: 0`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rl_engine.inference.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_N = 128  # samples per prompt in one request
MAX_TOP_LOGPROBS = 20  # as vLLM and OpenAI
MAX_TEMPERATURE = 100.0
MAX_STOP = 16  # stop strings / stop token ids per request


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Request(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    prompt_token_ids: list[int] | list[list[int]] | None = None  # vLLM: token ids in
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


def warn_unknown_fields(request: BaseModel, endpoint: str) -> None:
    extra = sorted(request.model_extra or {})
    if extra:
        logger.warning("%s: ignoring unknown request fields %s", endpoint, ", ".join(extra))


def _range(ok: bool, param: str, value: Any, allowed: str) -> None:
    if not ok:
        raise APIError(f"{param} = {value!r} is invalid; allowed: {allowed}", param=param, code="invalid_value")


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def sampling_params(req: _Request, *, max_tokens: int | None, vocab_size: int, logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams; APIError (400) naming the field and its range otherwise.
    `max_tokens` is the request's limit already resolved against the context (None: until full);
    `logprobs` is the engine's (None: the request asked for none, and the engine computes none)."""
    _range(isinstance(req.n, int) and 1 <= req.n <= MAX_N, "n", req.n, f"an integer in [1, {MAX_N}]")
    temperature = 1.0 if req.temperature is None else req.temperature
    _range(_finite(temperature) and 0 <= temperature <= MAX_TEMPERATURE, "temperature", temperature,
           f"[0, {MAX_TEMPERATURE:g}] (0 means greedy)")
    top_p = 1.0 if req.top_p is None else req.top_p
    _range(_finite(top_p) and 0 < top_p <= 1, "top_p", top_p, "(0, 1]")
    top_k = 0 if req.top_k is None else req.top_k
    _range(top_k == -1 or 0 <= top_k <= vocab_size, "top_k", top_k, f"-1 or 0 (off), or an integer in [1, {vocab_size}]")
    min_p = 0.0 if req.min_p is None else req.min_p
    _range(_finite(min_p) and 0 <= min_p <= 1, "min_p", min_p, "[0, 1]")
    _range(req.seed is None or -(1 << 63) <= req.seed < (1 << 64), "seed", req.seed, "a 64-bit integer")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    _range(len(stop) <= MAX_STOP and all(s for s in stop), "stop", req.stop,
           f"a non-empty string or a list of at most {MAX_STOP} non-empty strings")
    stop_ids = list(req.stop_token_ids or [])
    _range(len(stop_ids) <= MAX_STOP and all(0 <= t < vocab_size for t in stop_ids), "stop_token_ids",
           req.stop_token_ids, f"at most {MAX_STOP} token ids in [0, {vocab_size})")
    _range(isinstance(req.min_tokens, int) and req.min_tokens >= 0 and (max_tokens is None or req.min_tokens <= max_tokens),
           "min_tokens", req.min_tokens, "an integer in [0, max_tokens]")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        _range(value is None or value == 0, name, value, "0 (penalties are not supported by this engine)")
    _range(not req.logit_bias, "logit_bias", req.logit_bias, "null or {} (not supported by this engine)")
    seed = None if req.seed is None else req.seed % (1 << 63)
    return SamplingParams(n=req.n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                          max_tokens=max_tokens, min_tokens=req.min_tokens, stop=stop, stop_token_ids=stop_ids,
                          ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output,
                          logprobs=logprobs)


def resolve_max_tokens(requested: int | None, *, param: str, prompt_len: int, max_model_len: int,
                       default: int | None, prompt_param: str) -> int:
    """The generation budget: the request's (checked), or the default, capped by the context. A prompt
    that leaves no room, or a budget past the context, is a 400 (vLLM's wording)."""
    if prompt_len >= max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                       f"{prompt_len} tokens, which leaves no room to generate; shorten the prompt",
                       param=prompt_param, code="context_length_exceeded")
    room = max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    _range(isinstance(requested, int) and requested >= 1, param, requested, f"an integer in [1, {room}]")
    if requested > room:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in {param}); "
                       f"{param} must be <= {room}", param=param, code="context_length_exceeded")
    return requested


def check_top_logprobs(value: int | None, param: str, *, speculative: bool) -> int:
    if value is None:
        return 0
    _range(isinstance(value, int) and 0 <= value <= MAX_TOP_LOGPROBS, param, value,
           f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    _range(not (value and speculative), param, value,
           "0 on this server: top log-probs are not available with speculative decoding")
    return value
