"""`POST /v1/completions`: prompts (text, lists of text, token ids, vLLM's `prompt_token_ids`) in,
`n` choices per prompt out (choice index = prompt index * n + sample index), streamed as server-sent
events or answered whole. Each choice carries `policy_versions` (the weights version that sampled each
token); `return_token_ids` adds `prompt_token_ids` and `token_ids`; `echo` puts the prompt before the
text; with `logprobs` its tokens' log-probs come from one forward pass over the prompt (the first
token's is null, as OpenAI's), which lm-eval's loglikelihood requests rely on."""

from __future__ import annotations

from functools import partial
from typing import Any, AsyncIterator

from rl_engine.serve.generation import (DONE, ChoiceCursor, TokenText, collect, completion_logprobs, fingerprint,
                                        merged, now, on_engine, prompt_logprobs, request_id, sse, start_streams, usage)
from rl_engine.serve.protocol import (APIError, CompletionRequest, check_top_logprobs, resolve_max_tokens,
                                      sampling_params, warn_unknown_fields)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def prompt_ids(req: CompletionRequest, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str | None]]:
    """Each prompt as token ids (and its text, when given as text)."""
    if req.prompt is not None and req.prompt_token_ids is not None:
        raise APIError("give either prompt or prompt_token_ids, not both", param="prompt_token_ids")
    raw = req.prompt if req.prompt is not None else req.prompt_token_ids
    param = "prompt" if req.prompt is not None else "prompt_token_ids"
    if raw is None or (isinstance(raw, list) and not raw):
        raise APIError("prompt is required: a string, a list of strings, token ids or a list of token-id lists",
                       param="prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and isinstance(raw[0], int)):
        raw = [raw]
    ids, texts = [], []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            if tokenizer is None:
                raise APIError("text prompts need a tokenizer; this model has none (send token ids)", param=param)
            if not p:
                raise APIError(f"{param}[{i}] is empty; it needs at least one token", param=param)
            ids.append(tokenizer.encode(p)), texts.append(p)
        else:
            if not p or not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
                raise APIError(f"{param}[{i}] must be a non-empty list of token ids in [0, {vocab_size})", param=param)
            ids.append(list(p)), texts.append(None)
    return ids, texts


async def create_completion(backend, req: CompletionRequest, *, http_request, model_name: str, stats) -> Any:
    warn_unknown_fields(req, "/v1/completions")
    engine = backend.engine
    tokenizer = engine.tokenizer
    vocab = engine.model.config.vocab_size
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix", code="invalid_value")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(f"best_of = {req.best_of} is invalid; allowed: null or equal to n ({req.n})", param="best_of",
                       code="invalid_value")
    prompts, texts = prompt_ids(req, tokenizer, vocab)
    param = "prompt" if req.prompt is not None else "prompt_token_ids"
    max_tokens = min(resolve_max_tokens(req.max_tokens, param="max_tokens", prompt_len=len(p),
                                        max_model_len=engine.max_model_len, default=DEFAULT_MAX_TOKENS,
                                        prompt_param=param) for p in prompts)
    if req.max_tokens is None and len(prompts) > 1:  # the default budget fits every prompt
        max_tokens = min(max_tokens, DEFAULT_MAX_TOKENS)
    logprobs = None if req.logprobs is None else check_top_logprobs(req.logprobs, "logprobs",
                                                                    speculative=engine.speculator is not None)
    params = sampling_params(req, max_tokens=max_tokens, vocab_size=vocab, logprobs=logprobs)
    if req.stop and tokenizer is None:
        raise APIError("stop strings need a tokenizer; this model has none (use stop_token_ids)", param="stop")
    rid = request_id("cmpl")
    token_text = TokenText(tokenizer)
    if req.stream:
        echoed = await _echo_logprobs(backend, req, prompts, params)
        streams = await start_streams(backend, prompts, params, rid)
        stats.request_started("completions", prompts)
        return _stream(req, streams, prompts, texts, rid=rid, model_name=model_name, token_text=token_text,
                       engine=engine, stats=stats, echoed=echoed)
    stats.request_started("completions", prompts)
    finals: list = []
    try:
        finals = await collect(backend, prompts, params, rid, http_request)
    finally:
        stats.request_done(sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs))
    echoed = await _echo_logprobs(backend, req, prompts, params)
    choices, versions = [], []
    for p, out in enumerate(finals):
        for c in out.outputs:
            text = c.text or ""
            echo_text = (texts[p] if texts[p] is not None else (tokenizer.decode(prompts[p]) if tokenizer else "")) \
                if req.echo else ""
            choice: dict[str, Any] = {"index": p * req.n + c.index, "text": echo_text + text,
                                      "logprobs": None, "finish_reason": c.finish_reason,
                                      "stop_reason": c.stop_reason, "policy_versions": c.policy_versions}
            if req.logprobs is not None:
                choice["logprobs"] = completion_logprobs(c, range(len(c.token_ids)), token_text, text_offset=0,
                                                         prompt_ids=prompts[p] if req.echo else None,
                                                         prompt_logprobs=echoed[p])
            if req.return_token_ids:
                choice["prompt_token_ids"], choice["token_ids"] = prompts[p], c.token_ids
            choices.append(choice)
            versions += c.policy_versions
    return {"id": rid, "object": "text_completion", "created": now(), "model": model_name,
            "system_fingerprint": fingerprint(versions, engine.weights_version), "choices": choices,
            "usage": usage(finals)}


async def _echo_logprobs(backend, req: CompletionRequest, prompts: list[list[int]], params) -> list:
    """With echo and logprobs: each prompt's token log-probs (one forward pass over it, the engine held),
    as lm-eval's loglikelihood requests need. Otherwise None per prompt."""
    if not (req.echo and req.logprobs is not None):
        return [None] * len(prompts)
    return [await on_engine(backend, partial(prompt_logprobs, prompt=p, temperature=params.temperature, k=req.logprobs))
            for p in prompts]


async def _stream(req: CompletionRequest, streams, prompts, texts, *, rid: str, model_name: str,
                  token_text: TokenText, engine, stats, echoed: list) -> AsyncIterator[bytes]:
    created = now()
    cursors: dict[tuple[int, int], ChoiceCursor] = {}
    finals: list = [None] * len(prompts)
    versions: list[int] = []
    stop = params_stop(req)
    offsets: dict[tuple[int, int], int] = {}
    try:
        async for p, out in merged(streams):
            if out.finished:
                finals[p] = out
            for c in out.outputs:
                key = (p, c.index)
                cursor = cursors.get(key)
                first = cursor is None
                if first:
                    cursor = cursors[key] = ChoiceCursor()
                if cursor.finished:
                    continue
                positions = cursor.new_tokens(c)
                delta = cursor.text_delta(c, stop=stop)
                if first and req.echo:
                    echo = texts[p] if texts[p] is not None else (token_text.tokenizer.decode(prompts[p])
                                                                 if token_text.tokenizer else "")
                    delta = echo + delta
                if not delta and not positions and not c.finished:
                    continue
                new_versions = [c.policy_versions[k] for k in positions]
                versions += new_versions
                choice: dict[str, Any] = {"index": p * req.n + c.index, "text": delta, "logprobs": None,
                                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                          "policy_versions": new_versions}
                if req.logprobs is not None:
                    choice["logprobs"] = completion_logprobs(c, positions, token_text, text_offset=offsets.get(key, 0),
                                                             prompt_ids=prompts[p] if first and req.echo else None,
                                                             prompt_logprobs=echoed[p])
                    offsets[key] = offsets.get(key, 0) + sum(len(s) for s in choice["logprobs"]["tokens"])
                if req.return_token_ids:
                    choice["token_ids"] = [c.token_ids[k] for k in positions]
                    if first:
                        choice["prompt_token_ids"] = prompts[p]
                cursor.finished = c.finished
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                         "system_fingerprint": fingerprint(new_versions, engine.weights_version), "choices": [choice]}
                if req.stream_options and req.stream_options.continuous_usage_stats:
                    chunk["usage"] = usage([out])
                yield sse(chunk)
        if req.stream_options and req.stream_options.include_usage:
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                     "system_fingerprint": fingerprint(versions, engine.weights_version), "choices": [],
                     "usage": usage(finals)}
            yield sse(chunk)
        yield DONE
    finally:
        stats.request_done(sum(c.tokens_sent for c in cursors.values()))


def params_stop(req) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
