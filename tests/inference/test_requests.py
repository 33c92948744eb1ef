"""The request surface: stop conditions, text, refused requests, sampling-parameter validation."""

from __future__ import annotations

import pytest
import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.policy import from_pretrained


def test_text_prompts_stop_strings_and_stop_tokens(char_model):
    llm = LLM(char_model)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = llm.generate("Hello there", greedy)[0].outputs[0]
    assert full.text == llm.tokenizer.decode(full.token_ids) and len(full.token_ids) == 30
    stop = full.text[10:13]
    first = full.text.find(stop)
    cut = llm.generate("Hello there", greedy.clone(stop=[stop, "never-seen"]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:first]
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
    kept = llm.generate("Hello there", greedy.clone(stop=stop, include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full.text[:first + len(stop)]
    token = full.token_ids[5]
    by_id = llm.generate("Hello there", greedy.clone(stop_token_ids=[token]))[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(token) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == token


def test_eos_min_tokens_and_ignore_eos(qwen2):
    model = from_pretrained(qwen2[1], dtype=torch.float32)
    prompt = mixed_prompts(1, seed=20)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = LLM(model).generate([prompt], greedy)[0].outputs[0].token_ids
    model.config.eos_token_id = [tokens[2]]
    llm = LLM(model)
    first_eos = tokens.index(tokens[2])
    out = llm.generate([prompt], greedy.clone(ignore_eos=False))[0].outputs[0]
    assert out.token_ids == tokens[:first_eos + 1] and out.finish_reason == "stop" and out.stop_reason is None
    out = llm.generate([prompt], greedy)[0].outputs[0]
    assert out.token_ids == tokens and out.finish_reason == "length"
    later = [i for i, t in enumerate(tokens) if t == tokens[2] and i >= 4]
    out = llm.generate([prompt], greedy.clone(ignore_eos=False, min_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == (later[0] + 1 if later else 12)


def test_refused_requests_fail_alone(qwen2):
    llm = LLM(qwen2[1], max_model_len=64, num_kv_blocks=4, block_size=16)  # the pool holds 48 tokens
    ok = mixed_prompts(3, seed=21, max_len=30)
    prompts = [ok[0], list(range(64)), ok[1], [5] * 50, [], [1, 2, 500], ok[2]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    errors = [o.error for o in outs]
    assert errors[0] is None and errors[2] is None and errors[6] is None
    assert "64 tokens but max_model_len is 64" in errors[1]
    assert "50 tokens but the whole KV pool holds 48" in errors[3]
    assert "empty" in errors[4]
    assert "[0, 97)" in errors[5] and "max 500" in errors[5]
    assert all(len(outs[i].outputs[0].token_ids) == 5 for i in (0, 2, 6))
    assert all(outs[i].outputs[0].finish_reason == "abort" for i in (1, 3, 4, 5))
    # Growing past the pool ends a request with "length" instead of stalling the engine.
    out = llm.generate([ok[0]], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(ok[0]) + len(out.outputs[0].token_ids) == 48
    with pytest.raises(ValueError, match="text prompt needs a tokenizer"):
        llm.engine.add_request("x", "hello")


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature = -0.5 is invalid; allowed: >= 0"),
    (dict(top_p=0.0), r"top_p = 0.0 is invalid; allowed: \(0, 1\]"),
    (dict(top_p=1.5), "top_p = 1.5"),
    (dict(top_k=-3), "top_k = -3 is invalid"),
    (dict(min_p=2.0), r"min_p = 2.0 is invalid; allowed: \[0, 1\]"),
    (dict(n=0), "n = 0 is invalid; allowed: an integer >= 1"),
    (dict(max_tokens=0), "max_tokens = 0"),
    (dict(min_tokens=5, max_tokens=3), r"min_tokens \(5\) must be <= max_tokens \(3\)"),
    (dict(stop=[""]), "stop entry = ''"),
    (dict(stop_token_ids=[-1]), "stop_token_ids entry = -1"),
    (dict(logprobs=-1), "logprobs = -1 is invalid"),
    # a bool would pass as an int: False (read as "off") returned log-probs, True asked for top-1 lists
    (dict(logprobs=False), r"logprobs = False is invalid; allowed: None \(no log-probs\).*not a bool"),
    (dict(logprobs=True), "logprobs = True is invalid"),
])
def test_invalid_sampling_params_name_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_strings_need_a_tokenizer(qwen2):
    llm = LLM(qwen2[1])
    out = llm.generate([[1, 2, 3]], SamplingParams(stop=["x"]))[0]
    assert "stop strings need a tokenizer" in out.error


def test_decode_steps_read_a_request_only_where_its_stop_rule_or_fork_may_apply(char_model, monkeypatch):
    """`_emit_decode` skips a row's fork and stop checks when `_Batch.stop_rows` rules them out (its length below its
    request's limit, its token outside the batch's stop tokens): the same outputs as an engine that checks every row,
    on a batch mixing stop tokens, stop strings, EOS with min_tokens, length limits and a leader forking in a decode
    step (a one-token prompt: its prefill is a single-token row), with finishes that compact the batch."""
    from rl_engine.inference.engine import LLMEngine

    def run(check_every_row: bool):
        llm = LLM(char_model, seed=0)
        engine = llm.engine
        if check_every_row:
            monkeypatch.setattr(LLMEngine, "_stop_rows", lambda self, seqs: ([0] * len(seqs), frozenset()))
        forks_in_decode = []
        emit, fork = LLMEngine._emit_decode, LLMEngine._fork
        inside = [False]

        def emitting(self, *a):
            inside[0] = True
            try:
                return emit(self, *a)
            finally:
                inside[0] = False

        def forking(self, request, leader):
            forks_in_decode.append((inside[0], leader.num_output_tokens))  # (it forks at its first token)
            return fork(self, request, leader)

        monkeypatch.setattr(LLMEngine, "_emit_decode", emitting)
        monkeypatch.setattr(LLMEngine, "_fork", forking)
        greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        full = llm.generate(["Hello there", "Once upon", "abc"], greedy)
        texts = [o.outputs[0].text for o in full]
        tokens = [o.outputs[0].token_ids for o in full]
        params = [greedy.clone(stop_token_ids=[tokens[0][6]]), greedy.clone(stop=[texts[1][8:10]]),
                  greedy.clone(max_tokens=9), greedy.clone(ignore_eos=False, min_tokens=3),
                  SamplingParams(temperature=1.0, seed=4, max_tokens=15, stop_token_ids=[tokens[2][3]]),
                  greedy.clone(max_tokens=20)]
        prompts = ["Hello there", "Once upon", "abc", "Hello", "Once upon", "abc"]
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, p)
        outputs, step = {}, 0
        while engine.has_unfinished_requests():
            step += 1
            if step == 4:  # a leader whose whole prompt is one token forks in a decode step
                engine.add_request("fork", [tokens[0][0]], greedy.clone(n=3, max_tokens=7))
            for out in engine.step():
                outputs[out.request_id] = [(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in out.outputs]
        monkeypatch.undo()
        return outputs, forks_in_decode

    want, want_forks = run(check_every_row=True)
    got, got_forks = run(check_every_row=False)
    assert got == want
    assert got_forks == want_forks and (True, 1) in got_forks
    reasons = [r for outs in got.values() for _, r, s, _ in outs]
    assert reasons.count("length") >= 3 and sum(1 for outs in got.values() for _, r, s, _ in outs
                                                 if r == "stop" and s is not None) >= 2
    assert len(got["fork"]) == 3


def test_no_finished_or_aborted_sequence_stays_referenced_once_no_request_is_left(char_model, monkeypatch):
    """The persistent decode batch (the scheduler's last schedule and removals, the model runner's last decode step,
    the engine's sampling batch) is dropped once no request is left, when the last finishes or when `interrupt`
    aborts them all: then a sequence is referenced only by its own request, not kept by the engine until a next
    step. The engine keeps serving the same tokens after it."""
    import gc
    import types

    from rl_engine.inference.scheduler import Scheduler

    seqs = []
    add = Scheduler.add

    def adding(self, seq, **kw):
        seqs.append(seq)
        return add(self, seq, **kw)

    monkeypatch.setattr(Scheduler, "add", adding)

    def held() -> list:
        gc.collect()
        return [type(r).__name__ for seq in seqs for r in gc.get_referrers(seq)
                if r is not seqs and r is not seq.request.seqs and not isinstance(r, types.FrameType)]

    llm = LLM(char_model, seed=0)
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["Hello there", "Once upon", "abc"]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]  # every request finishes
    assert len(seqs) == 3 and held() == []
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy.clone(n=2))
    for _ in range(4):  # decode steps: the batch persists between them
        engine.step()
    assert engine._batch is not None and held()
    interrupted = engine.interrupt()
    assert [o.outputs[0].finish_reason for o in interrupted] == ["abort"] * 3
    assert len(seqs) == 9 and held() == []
    seqs.clear()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == first
