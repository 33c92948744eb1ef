"""`POST /v1/chat/completions`: messages rendered with the model's chat template (`tools` handed to
it), `n` choices, streamed or whole. With `tools` and `tool_choice` "auto" (the default when tools are
given) Hermes/Qwen `<tool_call>` blocks in the output become the message's `tool_calls` (streamed as
one delta per completed call) and the finish reason is "tool_calls"; "none" renders the tools but
parses nothing. "required" and a named function would need constrained decoding, which the engine
does not have: they are refused (400) rather than silently treated as "auto"."""

from __future__ import annotations

from typing import Any, AsyncIterator

from rl_engine.inference.chat import ToolCallStreamParser, parse_tool_calls, render_chat
from rl_engine.serve.generation import (DONE, ChoiceCursor, TokenText, chat_logprobs, collect, fingerprint, merged,
                                        now, request_id, sse, start_streams, usage)
from rl_engine.serve.protocol import (APIError, ChatCompletionRequest, check_top_logprobs, resolve_max_tokens,
                                      sampling_params, warn_unknown_fields)


def _prompt(req: ChatCompletionRequest, tokenizer) -> list[int]:
    if tokenizer is None or tokenizer.chat_template is None:
        raise APIError("this model has no chat template (tokenizer_config.json / chat_template.jinja); use "
                       "/v1/completions", param="messages")
    try:
        text = render_chat(tokenizer, req.messages, tools=req.tools,
                           add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                           continue_final_message=req.continue_final_message,
                           template_kwargs=req.chat_template_kwargs)
    except ValueError as e:
        param = "tools" if str(e).startswith("tools") else "messages"
        raise APIError(str(e), param=param) from None
    return tokenizer.encode(text, add_special_tokens=False)


def _parse_tools(req: ChatCompletionRequest) -> bool:
    """Whether tool calls are parsed out of the output."""
    choice = req.tool_choice
    if choice is None:
        return bool(req.tools)
    if isinstance(choice, dict) or choice == "required":
        raise APIError(f"tool_choice = {choice!r} is not supported (it needs constrained decoding); allowed: "
                       "'auto' or 'none'", param="tool_choice", code="invalid_value")
    if choice == "auto" and not req.tools:
        raise APIError("tool_choice 'auto' needs tools", param="tool_choice", code="invalid_value")
    return choice == "auto"


async def create_chat_completion(backend, req: ChatCompletionRequest, *, http_request, model_name: str,
                                 stats) -> Any:
    warn_unknown_fields(req, "/v1/chat/completions")
    engine = backend.engine
    tokenizer = engine.tokenizer
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise APIError(f"response_format = {req.response_format!r} is not supported; allowed: "
                       "{'type': 'text'}", param="response_format", code="invalid_value")
    if not req.logprobs and req.top_logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    parse = _parse_tools(req)
    prompt = _prompt(req, tokenizer)
    requested, param = req.max_completion_tokens, "max_completion_tokens"
    if requested is None and req.max_tokens is not None:
        requested, param = req.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, param=param, prompt_len=len(prompt), max_model_len=engine.max_model_len,
                                    default=None, prompt_param="messages")
    logprobs = check_top_logprobs(req.top_logprobs, "top_logprobs", speculative=engine.speculator is not None) \
        if req.logprobs else None
    params = sampling_params(req, max_tokens=max_tokens, vocab_size=engine.model.config.vocab_size, logprobs=logprobs)
    rid = request_id("chatcmpl")
    token_text = TokenText(tokenizer)
    if req.stream:
        streams = await start_streams(backend, [prompt], params, rid)
        stats.request_started("chat", [prompt])
        return _stream(req, streams, prompt, parse=parse, rid=rid, model_name=model_name, token_text=token_text,
                       engine=engine, stats=stats)
    stats.request_started("chat", [prompt])
    finals: list = []
    try:
        finals = await collect(backend, [prompt], params, rid, http_request)
    finally:
        stats.request_done(sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs))
    out = finals[0]
    choices, versions = [], []
    for c in out.outputs:
        text = c.text or ""
        if parse:
            parsed = parse_tool_calls(text)
            message: dict[str, Any] = parsed.message()
            finish = "tool_calls" if parsed.tool_calls else c.finish_reason
        else:
            message, finish = {"role": "assistant", "content": text}, c.finish_reason
        choice: dict[str, Any] = {"index": c.index, "message": message, "logprobs": None, "finish_reason": finish,
                                  "stop_reason": c.stop_reason, "policy_versions": c.policy_versions}
        if req.logprobs:
            choice["logprobs"] = chat_logprobs(c, range(len(c.token_ids)), token_text)
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        choices.append(choice)
        versions += c.policy_versions
    response = {"id": rid, "object": "chat.completion", "created": now(), "model": model_name,
                "system_fingerprint": fingerprint(versions, engine.weights_version), "choices": choices,
                "usage": usage(finals)}
    if req.return_token_ids:
        response["prompt_token_ids"] = prompt
    return response


async def _stream(req: ChatCompletionRequest, streams, prompt: list[int], *, parse: bool, rid: str, model_name: str,
                  token_text: TokenText, engine, stats) -> AsyncIterator[bytes]:
    created = now()
    cursors = [ChoiceCursor() for _ in range(req.n)]
    parsers = [ToolCallStreamParser() if parse else None for _ in range(req.n)]
    started = [False] * req.n
    versions: list[int] = []
    final = None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    def chunk(choice: dict[str, Any], chunk_versions: list[int]) -> bytes:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                                "system_fingerprint": fingerprint(chunk_versions, engine.weights_version),
                                "choices": [choice]}
        return sse(body)

    try:
        async for _, out in merged(streams):
            if out.finished:
                final = out
            for c in out.outputs:
                i, cursor = c.index, cursors[c.index]
                if cursor.finished:
                    continue
                delta: dict[str, Any] = {}
                if not started[i]:
                    started[i] = True
                    delta["role"] = "assistant"
                positions = cursor.new_tokens(c)
                text = cursor.text_delta(c, stop=stop)
                tool_deltas = []
                if parsers[i] is not None:
                    text, calls = parsers[i].feed(text)
                    if c.finished:
                        text += parsers[i].finish()
                    first_call = len(parsers[i].tool_calls) - len(calls)
                    tool_deltas = [{"index": first_call + k, **call} for k, call in enumerate(calls)]
                if text or "role" in delta:
                    delta["content"] = text
                if tool_deltas:
                    delta["tool_calls"] = tool_deltas
                if not delta and not positions and not c.finished:
                    continue
                new_versions = [c.policy_versions[k] for k in positions]
                versions += new_versions
                finish = c.finish_reason
                if c.finished and parsers[i] is not None and parsers[i].tool_calls:
                    finish = "tool_calls"
                choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish,
                                          "stop_reason": c.stop_reason, "policy_versions": new_versions}
                if req.logprobs:
                    choice["logprobs"] = chat_logprobs(c, positions, token_text)
                if req.return_token_ids:
                    choice["token_ids"] = [c.token_ids[k] for k in positions]
                    if "role" in delta:
                        choice["prompt_token_ids"] = prompt
                cursor.finished = c.finished
                yield chunk(choice, new_versions)
        if req.stream_options and req.stream_options.include_usage:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": fingerprint(versions, engine.weights_version), "choices": [],
                    "usage": usage([final])}
            yield sse(body)
        yield DONE
    finally:
        stats.request_done(sum(c.tokens_sent for c in cursors))
