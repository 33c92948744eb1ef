"""MTP speculative decoding (DeepSeek-V3's own multi-token-prediction layer drafts): greedy outputs
equal plain decoding for k = 1, 2, 3 (also under preemption and prefix caching); every first draft is
the argmax of transformers' MtpModel on the same prefix; sampled outputs keep the target's
distribution (chi-square on the marginals of the 2nd and 3rd token, as for the draft-model drafter,
and a broken verifier fails it)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hf_models import write_dsv3_with_mtp
from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.inference.speculative import speculator as speculator_module
from rl_engine.inference.speculative.mtp import MTPProposer
from rl_engine.policy import from_pretrained
from spec_helpers import chi_square_critical_999, pooled_chi_square
from test_spec_sampling import PROMPT

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
SETTINGS = {
    "default": dict(),
    "preemption": dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=96),
    "prefix_cache": dict(block_size=8, max_num_batched_tokens=64, enable_prefix_caching=True),
}


@pytest.fixture(scope="module")
def dsv3_mtp(tmp_path_factory):
    """(transformers model, transformers MtpModel, our policy with its MTP layer)."""
    path = str(tmp_path_factory.mktemp("dsv3_mtp"))
    hf, mtp = write_dsv3_with_mtp(path, seed=2)
    return hf, mtp, from_pretrained(path)


def prompts_for(setting: str) -> list[list[int]]:
    if setting == "prefix_cache":
        g = torch.Generator().manual_seed(11)
        prefixes = [torch.randint(0, 97, (20,), generator=g).tolist() for _ in range(2)]
        return [prefixes[i % 2] + torch.randint(0, 97, (1 + i,), generator=g).tolist() for i in range(8)]
    return mixed_prompts(10, seed=12, max_len=40)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_greedy_equals_plain(dsv3_mtp, setting, k):
    policy = dsv3_mtp[2]
    prompts = prompts_for(setting)
    plain = LLM(policy, **SETTINGS[setting]).generate(prompts, GREEDY)
    llm = LLM(policy, speculative_config={"method": "mtp", "num_speculative_tokens": k}, **SETTINGS[setting])
    spec = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    worst = max(abs(a - b) for o, r in zip(spec, plain) for a, b in zip(o.outputs[0].logprobs, r.outputs[0].logprobs))
    assert worst <= 1e-5
    stats = llm.engine.stats()
    assert stats["speculative"]["draft_tokens"] > 0
    if setting == "preemption":
        assert stats["preemptions"] > 0
    if setting == "prefix_cache":
        assert stats["prefix_cache_hits"] > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_mtp_first_drafts_are_transformers_mtp_argmax(dsv3_mtp, monkeypatch):
    """Each proposal's first draft, made from the engine's kept hidden states and the MTP rows
    cached across steps, is the argmax of transformers' MtpModel over the whole prefix."""
    hf, mtp, policy = dsv3_mtp
    seen = []
    propose = MTPProposer._propose

    def recording(self, seqs, max_drafts):
        before = [(list(s.token_ids), s.num_tokens) for s in seqs]
        propose(self, seqs, max_drafts)
        seen.extend((tokens, s.token_ids[n]) for (tokens, n), s in zip(before, seqs) if s.num_draft_tokens)

    monkeypatch.setattr(MTPProposer, "_propose", recording)
    llm = LLM(policy, block_size=4, max_num_batched_tokens=48,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    llm.generate(mixed_prompts(6, seed=13, max_len=30), GREEDY)
    assert len(seen) > 50
    for tokens, draft in seen[::5]:
        ids = torch.tensor([tokens])
        with torch.no_grad():
            h = hf(ids, output_hidden_states=True).hidden_states[-1]
            y = mtp.forward_layer(0, h[:, :-1], torch.arange(1, len(tokens))[None], None, input_ids=ids[:, 1:])
            expected = mtp._project_to_logits(y)[0, -1].argmax().item()
        assert draft == expected


def exact_marginals(policy, temperature: float) -> tuple[dict, dict]:
    """P(2nd token) and P(3rd token) after PROMPT, summing over the paths before them (97 and 97^2
    contexts), from our policy in packed forwards (its logits equal transformers' to 1e-4:
    test_dsv3_hf_parity; transformers' per-expert loop over 97^2 contexts takes a minute here)."""
    vocab = policy.config.vocab_size

    def next_probs(contexts: list[list[int]]) -> torch.Tensor:
        n = len(contexts[0])
        ids = torch.tensor(contexts).view(-1)
        with torch.no_grad():
            h = policy.hidden_states(ids, positions=torch.arange(n).repeat(len(contexts)),
                                     cu_seqlens=torch.arange(0, n * len(contexts) + 1, n, dtype=torch.int32))
            logits = policy.compute_logits(h.view(len(contexts), n, -1)[:, -1]).double()
        return torch.softmax(logits / temperature, dim=-1)

    p1 = next_probs([PROMPT])[0]
    p2 = next_probs([PROMPT + [a] for a in range(vocab)])
    pair = (p1[:, None] * p2).reshape(-1)
    p3 = next_probs([PROMPT + [a, b] for a in range(vocab) for b in range(vocab)])
    second, third = pair.view(vocab, vocab).sum(0), (pair[:, None] * p3).sum(0)
    return dict(enumerate(second.tolist())), dict(enumerate(third.tolist()))


def _mtp_samples(policy, *, variant: str | None = None, num: int = 2000):
    saved = speculator_module.accept_mask
    if variant == "accept_all":
        speculator_module.accept_mask = lambda p, q, x, u: [True] * len(u)
    try:
        llm = LLM(policy, speculative_config={"method": "mtp", "num_speculative_tokens": 3})
        params = [SamplingParams(n=250, temperature=0.7, max_tokens=4, seed=seed, ignore_eos=True)
                  for seed in range(num // 250)]
        outputs = llm.generate([PROMPT] * len(params), params)
    finally:
        speculator_module.accept_mask = saved
    return [tuple(c.token_ids) for out in outputs for c in out.outputs], llm.engine.stats()["speculative"]


def test_mtp_samples_follow_the_target_marginals(dsv3_mtp):
    policy = dsv3_mtp[2]
    second, third = exact_marginals(policy, 0.7)
    samples, stats = _mtp_samples(policy)  # 2000 seeded samples of 4 tokens, 3 of them drafted
    for position, expected in ((1, second), (2, third)):
        stat, df = pooled_chi_square(Counter(s[position] for s in samples), expected, len(samples))
        print(f"token {position + 1} marginal: chi2 = {stat:.1f}, df = {df}, "
              f"0.999 critical = {chi_square_critical_999(df):.1f}, acceptance = {stats['acceptance_rate']:.3f}")
        assert df >= 30 and stat < chi_square_critical_999(df)
    assert 0.05 < stats["acceptance_rate"] < 0.95 and stats["draft_tokens"] > 1000
    broken, _ = _mtp_samples(policy, variant="accept_all")
    broken_stat, broken_df = pooled_chi_square(Counter(s[1] for s in broken), second, len(broken))
    print(f"token 2 marginal, every draft accepted: chi2 = {broken_stat:.1f}, df = {broken_df}")
    assert broken_stat > 3 * chi_square_critical_999(broken_df)


def test_mtp_needs_mtp_layers(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("deepseek_v3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multi-token-prediction layers"):
        LLM(str(tmp_path), speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="not for method 'mtp'"):
        LLM(str(tmp_path), speculative_config={"method": "mtp", "num_speculative_tokens": 2, "model": "x"})
