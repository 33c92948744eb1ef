"""Sampled speculative decoding keeps the target's distribution and log-probs.

- Draft model (a 1-layer cut of the target: deliberately different, most drafts are rejected at
  top-k 3): 4000 seeded samples of the next 4 tokens (3 of them speculative) pass a chi-square test
  against the exact distribution computed with transformers, as the joint over all 81 top-3 paths and,
  without truncation, as the marginals of the 2nd and 3rd token. Deliberately broken verifiers
  (residual drawn from p instead of max(0, p - q); every draft accepted) fail the same tests.
- N-gram drafts (a point mass): seeded sampled outputs are token-for-token those of plain decoding.
- Same seed -> same output with the draft model, whatever the batch; log-probs equal the trainer's
  recomputation (fp32, <= 1e-5).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from inference_helpers import PARITY_OVERRIDES, mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.inference.speculative import speculator as speculator_module
from rl_engine.policy import from_pretrained
from spec_helpers import chi_square_critical_999, pooled_chi_square, truncated_draft

PROMPT = [5, 17, 42, 8, 63]
NUM_SAMPLES = 4000


@pytest.fixture(scope="module")
def models(checkpoints):
    hf, path = checkpoints.get("qwen2", **PARITY_OVERRIDES["qwen2"])
    target = from_pretrained(path, dtype=torch.float32)
    return hf, target, truncated_draft(target, 1)


def next_token_probs(hf, contexts: list[list[int]], temperature: float, top_k: int) -> torch.Tensor:
    """transformers' next-token distribution (fp64) after each context, top-k truncated."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(contexts)).logits[:, -1].double() / temperature
    p = torch.softmax(logits, dim=-1)
    if top_k:
        p = torch.where(p >= torch.topk(p, top_k, dim=-1).values[:, -1:], p, 0.0)
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def exact_joint(hf, depth: int, temperature: float, top_k: int) -> dict[tuple, float]:
    probs = {(): 1.0}
    for _ in range(depth):
        paths = list(probs)
        rows = next_token_probs(hf, [PROMPT + list(c) for c in paths], temperature, top_k)
        probs = {c + (t,): probs[c] * row[t].item()
                 for c, row in zip(paths, rows) for t in row.nonzero().view(-1).tolist()}
    return probs


def exact_marginals(hf, temperature: float) -> tuple[dict, dict]:
    """P(2nd token) and P(3rd token), summing over the paths before them (97 and 97^2 contexts)."""
    vocab = hf.config.vocab_size
    p1 = next_token_probs(hf, [PROMPT], temperature, 0)[0]
    p2 = next_token_probs(hf, [PROMPT + [a] for a in range(vocab)], temperature, 0)
    pair = (p1[:, None] * p2).reshape(-1)  # P(t1, t2)
    p3 = next_token_probs(hf, [PROMPT + [a, b] for a in range(vocab) for b in range(vocab)], temperature, 0)
    second, third = pair.view(vocab, vocab).sum(0), (pair[:, None] * p3).sum(0)
    return dict(enumerate(second.tolist())), dict(enumerate(third.tolist()))


def speculative_samples(target, draft, *, temperature: float, top_k: int, variant: str | None = None):
    """NUM_SAMPLES seeded 4-token continuations of PROMPT with draft-model speculation (k = 3)."""
    saved = speculator_module.accept_mask, speculator_module.residual_sample
    if variant == "residual_from_p":  # a classic bug: resample from p after a rejection
        speculator_module.residual_sample = lambda p, q, u: saved[1](p, torch.zeros_like(q), u)
    elif variant == "accept_all":
        speculator_module.accept_mask = lambda p, q, x, u: [True] * len(u)
    try:
        llm = LLM(target, speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
        params = [SamplingParams(n=250, temperature=temperature, top_k=top_k, max_tokens=4, seed=seed,
                                 ignore_eos=True) for seed in range(NUM_SAMPLES // 250)]
        outputs = llm.generate([PROMPT] * len(params), params)
    finally:
        speculator_module.accept_mask, speculator_module.residual_sample = saved
    samples = [tuple(c.token_ids) for out in outputs for c in out.outputs]
    assert len(samples) == NUM_SAMPLES and all(len(s) == 4 for s in samples)
    return samples, llm.engine.stats()["speculative"]


def test_draft_model_samples_follow_the_target_joint_distribution_top_k(models):
    hf, target, draft = models
    expected = exact_joint(hf, 4, 1.0, 3)
    samples, stats = speculative_samples(target, draft, temperature=1.0, top_k=3)
    stat, df = pooled_chi_square(Counter(samples), expected, NUM_SAMPLES)
    print(f"joint top-3: chi2 = {stat:.1f}, df = {df}, 0.999 critical = {chi_square_critical_999(df):.1f}, "
          f"acceptance = {stats['acceptance_rate']:.3f}")
    assert df >= 40 and stat < chi_square_critical_999(df)
    assert 0.05 < stats["acceptance_rate"] < 0.5 and stats["draft_tokens"] > 2000  # both paths exercised
    broken, _ = speculative_samples(target, draft, temperature=1.0, top_k=3, variant="residual_from_p")
    broken_stat, broken_df = pooled_chi_square(Counter(broken), expected, NUM_SAMPLES)
    print(f"joint top-3, residual drawn from p: chi2 = {broken_stat:.1f}, df = {broken_df}")
    assert broken_stat > 3 * chi_square_critical_999(broken_df)


def test_draft_model_samples_follow_the_target_marginals_full_vocabulary(models):
    hf, target, draft = models
    second, third = exact_marginals(hf, 0.7)
    samples, stats = speculative_samples(target, draft, temperature=0.7, top_k=0)
    for position, expected in ((1, second), (2, third)):
        stat, df = pooled_chi_square(Counter(s[position] for s in samples), expected, NUM_SAMPLES)
        print(f"token {position + 1} marginal: chi2 = {stat:.1f}, df = {df}, "
              f"0.999 critical = {chi_square_critical_999(df):.1f}, acceptance = {stats['acceptance_rate']:.3f}")
        assert df >= 60 and stat < chi_square_critical_999(df)
    assert 0.3 < stats["acceptance_rate"] < 0.95  # accepted runs, bonus tokens and residual draws
    broken, _ = speculative_samples(target, draft, temperature=0.7, top_k=0, variant="accept_all")
    broken_stat, broken_df = pooled_chi_square(Counter(s[1] for s in broken), second, NUM_SAMPLES)
    print(f"token 2 marginal, every draft accepted: chi2 = {broken_stat:.1f}, df = {broken_df}")
    assert broken_stat > 3 * chi_square_critical_999(broken_df)


def repetitive_prompts(num: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() * 4
            for _ in range(num)]


def test_ngram_sampled_outputs_equal_plain_decoding_with_the_same_seed(models):
    """Point-mass drafts are verified with plain decoding's own per-position uniforms."""
    _, target, _ = models
    prompts = repetitive_prompts(8, seed=20) + mixed_prompts(4, seed=21, max_len=30)
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=300 + i, n=2, ignore_eos=True)
              for i in range(len(prompts))]
    plain = LLM(target).generate(prompts, params)
    llm = LLM(target, speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                          "prompt_lookup_min": 1})
    spec = llm.generate(prompts, params)
    stats = llm.engine.stats()["speculative"]
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]
    for s, p in zip(spec, plain):
        for cs, cp in zip(s.outputs, p.outputs):
            assert cs.token_ids == cp.token_ids
            assert max(abs(a - b) for a, b in zip(cs.logprobs, cp.logprobs)) <= 1e-5


def test_draft_model_same_seed_same_output_whatever_the_batch(models):
    """Each position's outcome is a function of (seed, sample index, position, the sequence's drafts),
    and drafts depend only on the sequence: other requests and their order do not matter as long as
    nothing trims this sequence's drafts (a binding token budget or KV pool, preemption), which
    changes the realised sample but not its distribution."""
    _, target, draft = models
    config = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}
    prompts = mixed_prompts(6, seed=22, max_len=30)
    params = [SamplingParams(temperature=0.9, top_k=20, max_tokens=12, seed=500 + i, n=2, ignore_eos=True)
              for i in range(len(prompts))]
    first = LLM(target, speculative_config=config).generate(prompts, params)
    order = list(reversed(range(len(prompts))))
    shuffled = LLM(target, speculative_config=config, max_num_seqs=5).generate(
        [prompts[i] for i in order], [params[i] for i in order])
    alone = LLM(target, speculative_config=config).generate([prompts[2]], params[2])[0]
    tokens = lambda out: [c.token_ids for c in out.outputs]  # noqa: E731
    for i in range(len(prompts)):
        assert tokens(first[i]) == tokens(shuffled[order.index(i)])
    assert tokens(alone) == tokens(first[2])
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    a = LLM(target, speculative_config=config, seed=3).generate(prompts, unseeded)
    b = LLM(target, speculative_config=config, seed=3).generate(prompts, unseeded)
    c = LLM(target, speculative_config=config, seed=4).generate(prompts, unseeded)
    assert [tokens(o) for o in a] == [tokens(o) for o in b] != [tokens(o) for o in c]


def trainer_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    seq = prompt + output
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor(seq), positions=torch.arange(len(seq)),
                                     cu_seqlens=torch.tensor([0, len(seq)], dtype=torch.int32))
        logprobs, _ = model.token_logprobs(hidden[len(prompt) - 1:len(seq) - 1], torch.tensor(output),
                                           temperature=temperature)
    return logprobs


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_speculative_logprobs_equal_trainer_recompute(models, method, temperature):
    _, target, draft = models
    config = ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
              if method == "ngram" else {"method": "draft_model", "model": draft, "num_speculative_tokens": 4})
    prompts = repetitive_prompts(4, seed=23) + mixed_prompts(4, seed=24, max_len=30)
    # greedy and sampled requests verified in the same steps; greedy log-probs are at temperature 1
    temperatures = [temperature if i % 4 else 0.0 for i in range(len(prompts))]
    params = [SamplingParams(temperature=t, top_k=30, max_tokens=16, seed=9, n=2, ignore_eos=True)
              for t in temperatures]
    llm = LLM(target, speculative_config=config, block_size=4)
    outputs = llm.generate(prompts, params)
    assert llm.engine.stats()["speculative"]["accepted_tokens"] > 0
    worst = 0.0
    for prompt, out, t in zip(prompts, outputs, temperatures):
        for c in out.outputs:
            expected = trainer_logprobs(target, prompt, c.token_ids, t or 1.0)
            worst = max(worst, (torch.tensor(c.logprobs) - expected).abs().max().item())
    assert worst <= 1e-5
