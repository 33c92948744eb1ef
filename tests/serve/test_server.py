"""The OpenAI-compatible server through the official `openai` client, on a free loopback port over a tiny
chat checkpoint: outputs against `LLM.generate` on the same weights (greedy token for token, seeded
sampling), streaming against non-streaming, n > 1, log-probs, stop strings, 64 concurrent requests,
tool calls, every error with its status, and a disconnect that frees the KV blocks."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time

import httpx
import openai
import pytest
import torch

from chat_models import write_chain_model
from rl_engine.inference import LLM, SamplingParams
from rl_engine.inference.chat import encode_chat
from serve_helpers import API_KEY, MODEL_NAME, RunningServer, read_logprobs_spy, spy_logprobs

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    """An independent engine on the same checkpoint: the offline reference."""
    return LLM(chat_model_dir, kv_cache_memory=16 << 20)


def _ref_tokens(reference, prompt, **params):
    out = reference.generate([prompt], SamplingParams(**params))[0]
    return out


def test_greedy_completion_equals_llm_generate(server, client, reference):
    prompts = ["Hello there", "2+2=", "The quick brown fox"]
    r = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.system_fingerprint == "v0"
    for i, p in enumerate(prompts):
        ref = _ref_tokens(reference, p, temperature=0, max_tokens=12)
        choice = r.choices[i]
        assert choice.index == i
        assert choice.token_ids == ref.outputs[0].token_ids  # vLLM's return_token_ids extension
        assert choice.prompt_token_ids == ref.prompt_token_ids
        assert choice.text == ref.outputs[0].text
        assert choice.policy_versions == [0] * len(ref.outputs[0].token_ids)
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)


def test_token_id_prompts_and_streaming_equal_whole(client, reference):
    ids = [5, 17, 33, 40, 41, 9]
    whole = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0,
                                      extra_body={"return_token_ids": True})
    ref = _ref_tokens(reference, ids, temperature=0, max_tokens=10)
    assert whole.choices[0].token_ids == ref.outputs[0].token_ids
    via_ext = client.completions.create(model=MODEL_NAME, prompt="", max_tokens=10, temperature=0,
                                        extra_body={"prompt_token_ids": ids, "prompt": None})
    assert via_ext.choices[0].text == whole.choices[0].text
    text, tokens, versions, finish = "", [], [], None
    for chunk in client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0, stream=True,
                                           extra_body={"return_token_ids": True}):
        c = chunk.choices[0]
        text += c.text
        tokens += c.token_ids
        versions += c.policy_versions
        finish = c.finish_reason or finish
    assert (text, tokens, finish) == (whole.choices[0].text, ref.outputs[0].token_ids, "length")
    assert versions == [0] * 10


def test_chat_greedy_stream_and_not(server, client, reference):
    prompt = encode_chat(reference.tokenizer, MESSAGES)
    ref = _ref_tokens(reference, prompt, temperature=0, max_tokens=15)
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=15, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert r.prompt_token_ids == prompt
    assert r.choices[0].token_ids == ref.outputs[0].token_ids
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    streamed, roles = "", []
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        for c in chunk.choices:
            streamed += c.delta.content or ""
            roles.append(c.delta.role)
    assert streamed == r.choices[0].message.content
    assert roles[0] == "assistant"
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_n_seeds_and_logprobs(client, reference):
    kw = dict(model=MODEL_NAME, prompt="Seeded", max_tokens=8, temperature=1.0, n=4, seed=1234, logprobs=3,
              extra_body={"return_token_ids": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]  # reproducible
    assert len({tuple(c.token_ids) for c in a.choices}) > 1  # n samples differ from each other
    ref = _ref_tokens(reference, "Seeded", temperature=1.0, max_tokens=8, n=4, seed=1234)
    assert [c.token_ids for c in a.choices] == [o.token_ids for o in ref.outputs]  # the engine's seeded draw
    for c, o in zip(a.choices, ref.outputs):
        assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(c.logprobs.token_logprobs, o.logprobs))
        for k, top in enumerate(c.logprobs.top_logprobs):
            assert len(top) <= 3 and list(top.values()) == sorted(top.values(), reverse=True)
            # the top entry is at least as likely as the sampled token (whose log-prob is the contract's)
            assert max(top.values()) >= c.logprobs.token_logprobs[k] - 1e-5
        assert "".join(c.logprobs.tokens) == c.text
    c = client.completions.create(model=MODEL_NAME, prompt="Seeded", max_tokens=8, temperature=1.0, n=4, seed=99)
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_chat_top_logprobs_match_greedy_token(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-5)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-5


def test_logprobs_computed_only_when_asked(server, client, reference):
    """A request that asks for no log-probs (completions without `logprobs`, chat without `logprobs: true`)
    reaches the engine with SamplingParams(logprobs=None), so its sampler skips the log-prob pass; one that
    asks (completions `logprobs: N`, chat `logprobs: true` with or without `top_logprobs`) reaches it with
    N >= 0 and gets the sampled tokens' log-probs of `LLM.generate`, streamed or not."""
    prompt = "Hello there"
    ref = _ref_tokens(reference, prompt, temperature=0, max_tokens=8).outputs[0]
    chat_ref = _ref_tokens(reference, encode_chat(reference.tokenizer, MESSAGES), temperature=0, max_tokens=6).outputs[0]
    greedy = dict(model=MODEL_NAME, temperature=0)
    server.call(spy_logprobs)
    try:
        whole = client.completions.create(prompt=prompt, max_tokens=8, **greedy)
        streamed = [c for c in client.completions.create(prompt=prompt, max_tokens=8, stream=True, **greedy)
                    if c.choices]
        chat = client.chat.completions.create(messages=MESSAGES, max_tokens=6, logprobs=False, **greedy)
        chat_streamed = [c for c in client.chat.completions.create(messages=MESSAGES, max_tokens=6, stream=True,
                                                                   **greedy) if c.choices]
    finally:
        spy = server.call(read_logprobs_spy)
    assert whole.choices[0].text == ref.text and whole.choices[0].logprobs is None
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    assert all(c.choices[0].logprobs is None for c in streamed)
    assert chat.choices[0].message.content == chat_ref.text and chat.choices[0].logprobs is None
    assert "".join(c.choices[0].delta.content or "" for c in chat_streamed) == chat_ref.text
    assert all(c.choices[0].logprobs is None for c in chat_streamed)
    assert list(spy["requests"].values()) == [None] * 4
    assert spy["sampler_calls"] and not any(spy["sampler_calls"])  # no step computed log-probs

    server.call(spy_logprobs)
    try:
        sampled_only = client.completions.create(prompt=prompt, max_tokens=8, logprobs=0, **greedy)
        top2 = [c for c in client.completions.create(prompt=prompt, max_tokens=8, logprobs=2, stream=True, **greedy)
                if c.choices]
        chat = client.chat.completions.create(messages=MESSAGES, max_tokens=6, logprobs=True, **greedy)
        chat_top3 = [c for c in client.chat.completions.create(messages=MESSAGES, max_tokens=6, logprobs=True,
                                                               top_logprobs=3, stream=True, **greedy) if c.choices]
    finally:
        spy = server.call(read_logprobs_spy)
    assert list(spy["requests"].values()) == [0, 2, 0, 3]
    assert spy["sampler_calls"] and all(spy["sampler_calls"])

    def close(values: list[float], expected: list[float]) -> bool:
        return len(values) == len(expected) and all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(values, expected))

    assert close(sampled_only.choices[0].logprobs.token_logprobs, ref.logprobs)
    assert close([x for c in top2 for x in c.choices[0].logprobs.token_logprobs], ref.logprobs)
    assert all(len(top) == 2 for c in top2 for top in c.choices[0].logprobs.top_logprobs)
    assert close([e.logprob for e in chat.choices[0].logprobs.content], chat_ref.logprobs)
    assert all(e.top_logprobs == [] for e in chat.choices[0].logprobs.content)
    content = [e for c in chat_top3 if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert close([e.logprob for e in content], chat_ref.logprobs) and all(len(e.top_logprobs) == 3 for e in content)


def test_stop_strings_and_stop_token_ids(client, reference):
    full = client.completions.create(model=MODEL_NAME, prompt="Stop here", max_tokens=20, temperature=0,
                                     extra_body={"return_token_ids": True}).choices[0]
    stop = full.text[5:7]
    cut = full.text.index(stop)
    for stream in (False, True):
        if stream:
            text, finish, reason = "", None, None
            for chunk in client.completions.create(model=MODEL_NAME, prompt="Stop here", max_tokens=20, temperature=0,
                                                   stop=[stop], stream=True):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
                reason = getattr(chunk.choices[0], "stop_reason", None) or reason
        else:
            c = client.completions.create(model=MODEL_NAME, prompt="Stop here", max_tokens=20, temperature=0,
                                          stop=stop).choices[0]
            text, finish, reason = c.text, c.finish_reason, c.stop_reason
        assert (text, finish, reason) == (full.text[:cut], "stop", stop)
    stop_id = full.token_ids[3]
    c = client.completions.create(model=MODEL_NAME, prompt="Stop here", max_tokens=20, temperature=0,
                                  extra_body={"stop_token_ids": [stop_id], "return_token_ids": True}).choices[0]
    first = full.token_ids.index(stop_id)
    assert c.token_ids == full.token_ids[:first + 1] and c.finish_reason == "stop"


def test_echo_and_sampling_knobs(client, chat_model_dir, reference):
    from transformers import AutoModelForCausalLM

    prompt = "Echo me"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    assert r.choices[0].text.startswith(prompt)
    lp = r.choices[0].logprobs
    ids = reference.tokenizer.encode(prompt)
    n = len(ids)
    assert "".join(lp.tokens[:n]) == prompt and lp.token_logprobs[0] is None
    # the prompt tokens' log-probs against transformers on the same checkpoint (fp32)
    hf = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    expected = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:n]), expected, atol=1e-4)
    for j in range(1, n):
        assert len(lp.top_logprobs[j]) == 2 and max(lp.top_logprobs[j].values()) == pytest.approx(
            float(ref[j - 1].max()), abs=1e-4)
    assert all(x is not None for x in lp.token_logprobs[n:]) and len(lp.token_logprobs) == n + 4
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2, stream=True)]
    assert streamed[0].token_logprobs[:n] == lp.token_logprobs[:n]
    r = client.completions.create(model=MODEL_NAME, prompt="knobs", max_tokens=6, temperature=0.7, top_p=0.9, seed=3,
                                  extra_body={"top_k": 5, "min_p": 0.05, "ignore_eos": True, "min_tokens": 6})
    assert len(r.choices[0].text) == 6 and r.choices[0].finish_reason == "length"


def test_64_concurrent_requests(server, reference):
    prompts = [f"Request number {i}:" for i in range(64)]
    refs = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=8))

    async def run():
        client = server.async_client()
        async def one(i):
            if i % 2:
                r = await client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=8, temperature=0,
                                                    extra_body={"return_token_ids": True})
                return r.choices[0].token_ids
            tokens = []
            stream = await client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=8, temperature=0,
                                                     stream=True, extra_body={"return_token_ids": True})
            async for chunk in stream:
                tokens += chunk.choices[0].token_ids
            return tokens
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    got = asyncio.run(run())
    assert got == [r.outputs[0].token_ids for r in refs]


def _error(fn):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("field,value,allowed", [
    ("temperature", -0.5, "[0, 100]"), ("top_p", 0.0, "(0, 1]"), ("n", 0, "[1, 128]"), ("n", 1000, "[1, 128]"),
    ("max_tokens", 0, "[1, "), ("logprobs", 50, "[0, 20]"), ("min_p", 2.0, "[0, 1]"), ("top_k", -3, "-1 or 0"),
    ("presence_penalty", 0.5, "not supported"), ("max_tokens", 100000, "must be <="),
])
def test_bad_parameters_are_400_naming_the_field(client, field, value, allowed):
    kw = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 4}
    body = {field: value}
    err = _error(lambda: client.completions.create(**kw, extra_body=body))
    assert err.status_code == 400
    assert err.body["param"] == field and field in err.body["message"] and allowed in err.body["message"]


def test_error_cases_and_server_keeps_serving(server, client, reference):
    long_prompt = [7] * 600  # > max_model_len (512)
    err = _error(lambda: client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=4))
    assert err.status_code == 400 and "maximum context length is 512" in err.body["message"]
    assert err.body["code"] == "context_length_exceeded"
    err = _error(lambda: client.chat.completions.create(model=MODEL_NAME, messages=[
        {"role": "user", "content": "a" * 600}], max_tokens=4))
    assert err.status_code == 400 and err.body["param"] == "messages"
    err = _error(lambda: client.completions.create(model="gpt-unknown", prompt="x", max_tokens=4))
    assert err.status_code == 404 and err.body["param"] == "model" and MODEL_NAME in err.body["message"]
    err = _error(lambda: server.client().with_options(api_key="wrong").models.list())
    assert err.status_code == 401 and err.body["code"] == "invalid_api_key"
    err = _error(lambda: client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "robot", "content": "x"}]))
    assert err.status_code == 400 and "messages[0].role" in err.body["message"]
    err = _error(lambda: client.completions.create(model=MODEL_NAME, prompt=[[1, 2, 10**6]], max_tokens=2))
    assert err.status_code == 400 and "token ids in [0," in err.body["message"]
    err = _error(lambda: client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tool_choice="required",
                                                        tools=[{"type": "function", "function": {"name": "f"}}]))
    assert err.status_code == 400 and err.body["param"] == "tool_choice"
    base = server.base_url
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
                 json.dumps({"prompt": {"a": 1}}).encode(), json.dumps({"max_tokens": 3}).encode()):
        r = httpx.post(f"{base}/completions", content=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
        assert "error" in r.json() and r.json()["error"]["message"]
    r = httpx.post(f"{base}/chat/completions", content=json.dumps({"model": MODEL_NAME}).encode(), headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(f"{base[:-3]}/health").status_code == 200  # no key needed
    assert httpx.get(f"{base[:-3]}/metrics").status_code == 401
    # still serving, and still right
    r = client.completions.create(model=MODEL_NAME, prompt="still ok", max_tokens=5, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == _ref_tokens(reference, "still ok", temperature=0, max_tokens=5).outputs[0].token_ids


def test_metrics(server, client):
    client.completions.create(model=MODEL_NAME, prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(server.base_url[:-3] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['rl_engine_http_requests_total{endpoint="completions"}'] >= 1
    assert values["rl_engine_generation_tokens_total"] >= 3
    assert values["rl_engine_weights_version"] == 0
    for name in ("rl_engine_num_requests_waiting", "rl_engine_kv_cache_usage_ratio", "rl_engine_prefix_cache_hit_rate",
                 "rl_engine_prompt_tokens_total", "rl_engine_http_requests_in_flight"):
        assert name in values
    assert values["rl_engine_http_requests_in_flight"] == 0
    assert 0 < values["rl_engine_prefix_cache_hit_rate"] <= 1  # repeated prompts hit the prefix cache


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_and_frees_kv(server, stream):
    """Read through /metrics: the engine may be in another process. The test generates the request's
    first tokens itself while the server's stepper is held (fault injection, serve_helpers: an owner
    request in the engine, or a gate on an `AsyncEngine`'s steps) and lets the engine step again only once
    the disconnect was seen: the disconnect always comes mid-generation, and no more than one step can
    follow it, whatever the machine's speed (with the stepper free, a stalled test process could see the
    whole budget generated before its disconnect was noticed)."""
    from functools import partial

    from serve_helpers import StepGate, hold_engine, release_engine, step_engine

    def in_engine(m):
        return m["rl_engine_num_requests_waiting"] + m["rl_engine_num_requests_running"]

    def wait_for(condition, what):  # liveness only: each condition is bound to come
        deadline = time.monotonic() + 120
        while not condition(server.metrics()):
            assert time.monotonic() < deadline, what
            time.sleep(0.02)
        return server.metrics()

    before = server.metrics()
    free, generated = before["rl_engine_kv_cache_blocks_free"], before["rl_engine_engine_generated_tokens_total"]
    assert in_engine(before) == 0
    gate = StepGate(server.backend.engine) if server.kind == "async" else None
    held = 1 if gate is None else 0  # the owner's hold request, counted in the engine
    try:  # a failure below must not leave the engine held (see the finally)
        if gate is None:
            server.call(hold_engine)
        body = json.dumps({"model": MODEL_NAME, "prompt": "a long one", "max_tokens": 490, "n": 4, "temperature": 0,
                           "ignore_eos": True, "stream": stream}).encode()
        host, port = "127.0.0.1", server.thread.port
        steps = 3
        sock = socket.create_connection((host, port))
        try:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda m: in_engine(m) == held + 1, "the request admitted")
            tokens = gate.step(steps) if gate is not None else server.call(partial(step_engine, steps=steps))
            assert 0 < tokens < 4 * 490  # generating
        finally:
            sock.close()  # the client goes away mid-generation
        if gate is None:  # the stepper aborts it without stepping
            mid = wait_for(lambda m: in_engine(m) == held, "the request aborted")
            server.call(release_engine)
        else:  # the abort is asked for; the engine's loop applies it after the step it is waiting to take
            deadline = time.monotonic() + 120
            while not server.backend._aborts:  # noqa: SLF001
                assert time.monotonic() < deadline, "the disconnect was not seen"
                time.sleep(0.02)
            gate.release()
            mid = wait_for(lambda m: in_engine(m) == 0, "the request aborted")
        after = wait_for(lambda m: in_engine(m) == 0 and m["rl_engine_kv_cache_blocks_free"] == free, "KV blocks back")
        assert after["rl_engine_kv_cache_blocks_free"] == free  # its KV blocks are back
        # Only the test's steps and at most one after the disconnect: a token each for 4 samples and the hold.
        assert mid["rl_engine_engine_generated_tokens_total"] - generated <= (steps + 1) * (4 + held)
        assert after["rl_engine_engine_generated_tokens_total"] == mid["rl_engine_engine_generated_tokens_total"]
    finally:  # idempotent: a gate still held would keep its waiting step thread (asyncio's default executor,
        # joined at exit) and so the test process alive forever; a hold left in the module's server would
        # fail the next parametrization on it instead of on its own
        if gate is not None:
            gate.release()
        else:
            server.call(release_engine)  # a no-op once released above (abort of an unknown id)


def test_step_gate_release_frees_a_waiting_step():
    """The disconnect test releases its gate in a `finally`: `release` lets a step waiting for a permit run
    (left waiting, asyncio's executor thread would keep the test process from exiting), may be repeated,
    and puts the engine's own `step` back."""
    import threading

    from serve_helpers import StepGate

    class Engine:
        requests: dict = {}

        def step(self):
            return ["stepped"]

    engine = Engine()
    gate = StepGate(engine)
    results = []
    waiting = threading.Thread(target=lambda: results.append(engine.step()), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and results == []  # no permit: it cannot have stepped
    gate.release()
    waiting.join(60)  # liveness bound
    assert not waiting.is_alive() and results == [["stepped"]]
    gate.release()  # again, as the finally does after the test's own release
    assert "step" not in vars(engine) and engine.step() == ["stepped"]


def test_tool_calls_parsed(tmp_path):
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
    # A chain model: after the generation prompt's last token it writes the call and ends the turn.
    chain = {"\n": "<tool_call>", "<tool_call>": "\t", "\t": call, call: "</tool_call>", "</tool_call>": "<|im_end|>"}
    path = write_chain_model(str(tmp_path / "chain"), chain=chain, words=[call, "\t"])
    s = RunningServer(path, api_key=None, backend="host")
    try:
        client = s.client()
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=tools, temperature=0,
                                           max_tokens=10)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (tc,) = choice.message.tool_calls
        assert tc.type == "function" and tc.function.name == "get_weather" and tc.id.startswith("call_")
        assert json.loads(tc.function.arguments) == {"city": "Paris", "days": 2}
        # streamed: one tool-call delta, the same call
        deltas, finish = [], None
        for chunk in client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=tools, temperature=0,
                                                    max_tokens=10, stream=True):
            for c in chunk.choices:
                deltas += c.delta.tool_calls or []
                finish = c.finish_reason or finish
        assert finish == "tool_calls" and len(deltas) == 1
        assert deltas[0].function.name == "get_weather" and json.loads(deltas[0].function.arguments)["days"] == 2
        # tool_choice none: the text comes back as content, unparsed
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=tools, tool_choice="none",
                                           temperature=0, max_tokens=10)
        assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
        # the conversation continues with the call and its result rendered by the template
        follow = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                             {"role": "tool", "tool_call_id": tc.id, "content": "18C"}]
        r = client.chat.completions.create(model=MODEL_NAME, messages=follow, tools=tools, temperature=0, max_tokens=10,
                                           extra_body={"return_token_ids": True})
        assert "<tool_response>\n18C\n</tool_response>" in s.tokenizer.decode(r.prompt_token_ids)
    finally:
        s.stop()


def test_nonloopback_without_key_warns(caplog):
    from rl_engine.serve.server import warn_if_exposed

    assert warn_if_exposed("127.0.0.1", None) is None
    assert warn_if_exposed("10.1.2.3", "key") is None
    message = warn_if_exposed("10.1.2.3", None)
    assert message and "without an API key" in message and "anyone who can reach this port" in message


@pytest.mark.parametrize("backend", ["host", "async"])
def test_app_over_engine_in_process(chat_model_dir, reference, backend):
    """The same app over an engine in this process, `EngineHost` (as an RL run serves) or `AsyncEngine` (the
    library's asyncio engine), answers alike, streamed or not, and a disconnect aborts there too."""
    s = RunningServer(chat_model_dir, backend=backend)
    try:
        client = s.client()
        prompt = encode_chat(reference.tokenizer, MESSAGES)
        ref = _ref_tokens(reference, prompt, temperature=0, max_tokens=12)
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0, n=2,
                                           extra_body={"return_token_ids": True})
        assert [c.token_ids for c in r.choices] == [ref.outputs[0].token_ids] * 2
        assert all(c.logprobs is None for c in r.choices)  # not asked for
        lp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
        assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(lp.choices[0].logprobs.token_logprobs,
                                                                     ref.outputs[0].logprobs, strict=True))
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0, stream=True) if c.choices)
        assert text == ref.outputs[0].text
        test_disconnect_aborts_and_frees_kv(s, True)
    finally:
        s.stop()


def test_speculative_server(chat_model_dir, reference):
    """With n-gram speculative decoding the greedy answer is unchanged; top log-probs are refused by name."""
    s = RunningServer(chat_model_dir, api_key=None,
                      speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    try:
        client = s.client()
        r = client.completions.create(model=MODEL_NAME, prompt="abcabcabc", max_tokens=10, temperature=0, logprobs=0,
                                      extra_body={"return_token_ids": True})
        ref = _ref_tokens(reference, "abcabcabc", temperature=0, max_tokens=10)
        assert r.choices[0].token_ids == ref.outputs[0].token_ids
        err = _error(lambda: client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, logprobs=2))
        assert err.status_code == 400 and err.body["param"] == "logprobs" and "speculative" in err.body["message"]
        # the engine process dies: requests fail (503, never a hang) and /health says so
        assert httpx.get(s.base_url[:-3] + "/health").status_code == 200
        s.backend._proc.kill()
        s.backend._proc.join(20)
        for stream in (False, True):
            err = _error(lambda: client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, stream=stream))
            assert err.status_code == 503 and "engine is not running" in err.body["message"]
        assert httpx.get(s.base_url[:-3] + "/health").status_code == 503
    finally:
        s.stop()
