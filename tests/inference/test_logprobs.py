"""Behavior log-probs equal the trainer's recomputation (the log-prob contract), and sampling is
reproducible per request: same seed -> same tokens, whatever the batch order."""

from __future__ import annotations

import pytest
import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.policy import from_pretrained


def trainer_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """What the trainer computes: packed forward (cu_seqlens), log-probs of the output tokens."""
    seq = prompt + output
    device = next(model.parameters()).device
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor(seq, device=device), positions=torch.arange(len(seq), device=device),
                                     cu_seqlens=torch.tensor([0, len(seq)], dtype=torch.int32, device=device))
        rows = hidden[len(prompt) - 1:len(seq) - 1]
        logprobs, _ = model.token_logprobs(rows, torch.tensor(output, device=device), temperature=temperature)
    return logprobs.cpu()


@pytest.fixture(scope="module")
def policy(qwen2, test_device):
    return from_pretrained(qwen2[1], dtype=torch.float32, device=test_device)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_engine_logprobs_equal_trainer_recompute(policy, temperature):
    llm = LLM(policy, block_size=8, max_num_batched_tokens=128)  # chunked prefill + decode mixed
    assert llm.model is policy
    prompts = mixed_prompts(12, seed=3)
    params = SamplingParams(temperature=temperature, max_tokens=20, n=2, seed=7, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        for completion in out.outputs:
            assert len(completion.logprobs) == len(completion.token_ids) == 20
            expected = trainer_logprobs(policy, prompt, completion.token_ids, temperature or 1.0)
            worst = max(worst, (torch.tensor(completion.logprobs) - expected).abs().max().item())
    assert worst <= 1e-5


def test_engine_runs_on_the_trainers_tensors(policy):
    """No copy: a change to the trainer's parameters is what the engine computes with."""
    llm = LLM(policy)
    engine_params = {p.data_ptr() for p in llm.model.parameters()}
    assert engine_params == {p.data_ptr() for p in policy.parameters()}
    prompt = mixed_prompts(1, seed=5)[0]
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=1, ignore_eos=True)
    before = llm.generate([prompt], params)[0].outputs[0]
    with torch.no_grad():
        saved = policy.norm.weight.clone()
        policy.norm.weight.mul_(3.0)
    try:
        llm.update_weights()
        after = llm.generate([prompt], params)[0].outputs[0]
        expected = trainer_logprobs(policy, prompt, after.token_ids, 1.0)
        assert (torch.tensor(after.logprobs) - expected).abs().max().item() <= 1e-5
        assert after.logprobs != before.logprobs
    finally:
        with torch.no_grad():
            policy.norm.weight.copy_(saved)


def test_same_seed_same_output_and_order_does_not_matter(policy):
    prompts = mixed_prompts(6, seed=4)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_tokens=16, seed=100 + i, n=2, ignore_eos=True)
              for i in range(len(prompts))]
    first = LLM(policy, seed=1).generate(prompts, params)
    again = LLM(policy, seed=2).generate(prompts, params)  # engine seed irrelevant for seeded requests
    order = list(reversed(range(len(prompts))))
    shuffled = LLM(policy, max_num_batched_tokens=40).generate([prompts[i] for i in order], [params[i] for i in order])
    alone = LLM(policy).generate([prompts[3]], params[3])[0]
    tokens = lambda out: [c.token_ids for c in out.outputs]  # noqa: E731
    for i in range(len(prompts)):
        assert tokens(first[i]) == tokens(again[i]) == tokens(shuffled[order.index(i)])
    assert tokens(alone) == tokens(first[3])
    # the n samples of a request differ from each other
    assert any(out.outputs[1].token_ids != out.outputs[0].token_ids for out in first)


def test_unseeded_requests_reproduce_with_the_engine_seed(policy):
    prompts = mixed_prompts(6, seed=6)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = LLM(policy, seed=3).generate(prompts, params)
    b = LLM(policy, seed=3).generate(prompts, params)
    c = LLM(policy, seed=4).generate(prompts, params)
    ids = lambda outs: [o.outputs[0].token_ids for o in outs]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_top_logprobs_for_the_requests_that_ask_in_a_mixed_batch(policy):
    # one step samples rows that asked for top log-probs beside rows that did not
    prompts = mixed_prompts(3, seed=11)
    asks = SamplingParams(temperature=1.0, max_tokens=5, seed=1, logprobs=3, ignore_eos=True)
    plain = SamplingParams(temperature=1.0, max_tokens=5, seed=2, ignore_eos=True)
    outs = LLM(policy).generate(prompts, [plain, asks, plain])
    assert outs[0].outputs[0].top_logprobs is None and outs[2].outputs[0].top_logprobs is None
    out = outs[1].outputs[0]
    assert len(out.top_logprobs) == len(out.token_ids) == 5 and all(len(top) == 3 for top in out.top_logprobs)
    # each token's own log-prob is at most the most likely token's: both are log_softmax(logits / T)
    # entries, computed by two formulas that the log-prob contract holds to 1e-5 of each other in fp32
    for lp, top in zip(out.logprobs, out.top_logprobs):
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True) and lp <= top[0][1] + 1e-5


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_request_that_asks_for_no_logprobs_gets_none_and_the_same_tokens(policy, temperature):
    """SamplingParams(logprobs=None) (vLLM's default) skips the log-prob pass: no log-probs come back, and
    the tokens are those of the same request with log-probs, alone or beside requests that keep them."""
    prompts = mixed_prompts(6, seed=6)
    kept = [SamplingParams(temperature=temperature, max_tokens=12, n=2, seed=20 + i, ignore_eos=True)
            for i in range(len(prompts))]
    none = [p.clone(logprobs=None) for p in kept]
    mixed = [none[i] if i % 2 else kept[i] for i in range(len(prompts))]
    with_logprobs = LLM(policy, block_size=8).generate(prompts, kept)
    all_none = LLM(policy, block_size=8).generate(prompts, none)
    half = LLM(policy, block_size=8).generate(prompts, mixed)
    for i, prompt in enumerate(prompts):
        for ref, got_none, got_half in zip(with_logprobs[i].outputs, all_none[i].outputs, half[i].outputs):
            assert len(ref.token_ids) == 12 and ref.token_ids == got_none.token_ids == got_half.token_ids
            assert got_none.logprobs is None and got_none.policy_versions == ref.policy_versions
            if i % 2:
                assert got_half.logprobs is None
            else:  # the rows that keep them, in a batch beside rows that opted out
                expected = trainer_logprobs(policy, prompt, got_half.token_ids, temperature or 1.0)
                assert (torch.tensor(got_half.logprobs) - expected).abs().max().item() <= 1e-5


def test_rollout_sampling_params_always_carry_behaviour_logprobs(policy):
    """The RL contract: the trainer's rollout params and the actors' wire params map to requests that return
    behaviour log-probs (within the fp32 1e-5 contract); a wire request asking for none is refused."""
    from rl_engine import protocol as P
    from rl_engine.actors.wire import engine_sampling, wire_sampling
    from rl_engine.rl_step import sampling_params
    from rl_engine.train_config import RLConfig

    cfg = RLConfig()
    local = sampling_params(cfg, step=0, eos_token_ids=[0]).clone(n=2, max_tokens=10, ignore_eos=True, seed=3)
    remote = engine_sampling(wire_sampling(local), n=2)
    prompt = mixed_prompts(1, seed=9)[0]
    for params in (local, remote):
        assert params.logprobs == 0
        for completion in LLM(policy).generate([prompt], params)[0].outputs:
            assert len(completion.logprobs) == len(completion.token_ids) == 10
            expected = trainer_logprobs(policy, prompt, completion.token_ids, params.temperature or 1.0)
            assert (torch.tensor(completion.logprobs) - expected).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="logprobs = False"):
        engine_sampling(P.WireSamplingParams(logprobs=False), n=1)
