"""Shared-prefix training (train.shared_prefix): the prompt of a group computed once, each completion
attending to its K/V, gives the unshared path's log-probs, loss and gradients (fp32, <= 1e-5), for
mixed prompt and completion lengths, groups of 16 and of 1, whole or split over micro-batches; the
attention against an explicit-mask reference; the packing plan; bad input refused."""

import pytest
import torch
import torch.nn.functional as F

from rl_engine.config import ConfigError, load_config
from rl_engine.losses import ImportanceSamplingConfig, PolicyLoss, PolicyLossConfig, compute_loss_normalizer
from rl_engine.policy import shared_prefix as shared_prefix_attention
from rl_engine.policy.model import CausalLM
from rl_engine.policy.presets import preset_config
from rl_engine.policy.shared_prefix import SharedPrefixAttention
from rl_engine.rl_step import (StepLoss, attach_logprobs, build_micro_batches, forward_logprobs, make_sample,
                               run_micro_batches)
from rl_engine.rollout.shared_prefix import find_units
from rl_engine.train_config import RLConfig, TrainSection
from test_losses import INVARIANCE_CONFIGS

LOSS = PolicyLossConfig(agg="seq-mean-token-mean", clip_high=0.28, entropy_coef=0.01,
                        importance_sampling=ImportanceSamplingConfig(mode="truncate", truncate_cap=1.5))
TOL = 1e-5


def grpo_batch(vocab: int, group_sizes: list[int], *, seed: int = 0, max_prompt: int = 40, max_response: int = 30):
    """Groups of `group_sizes` samples; one prompt per group (lengths 2..max_prompt), responses of
    1..max_response tokens; behavior log-probs off the policy so importance weights vary."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for g, n in enumerate(group_sizes):
        p = int(torch.randint(2, max_prompt + 1, (1,), generator=gen))
        prompt = torch.randint(5, vocab, (p,), generator=gen).tolist()
        for _ in range(n):
            r = int(torch.randint(1, max_response + 1, (1,), generator=gen))
            response = torch.randint(5, vocab, (r,), generator=gen).tolist()
            samples.append(make_sample(prompt_ids=prompt, response_ids=response, group=g, reward=0.0,
                                       logprobs=(-3.0 - torch.rand(r, generator=gen)).tolist(),
                                       policy_versions=[0] * r))
    return samples, torch.randn(len(samples), generator=gen)


def per_token(samples, micro_batches, logprobs) -> dict[tuple[int, int], float]:
    """(sample, input row) -> log-prob; a shared prompt row stands for every sample of its unit."""
    out = {}
    for mb, lp in zip(micro_batches, logprobs):
        for s, pos, value in zip(mb.loss_inputs["sample"].tolist(), mb.positions.tolist(), lp.tolist()):
            out[(s, pos)] = value
    prompt_of = {}
    for i, s in enumerate(samples):
        prompt_of.setdefault((s.group, tuple(s.input_ids[:s.prompt_len - 1])), i)
    for i, s in enumerate(samples):  # fill the rows of a shared prompt from the sample that carried it
        first = prompt_of[(s.group, tuple(s.input_ids[:s.prompt_len - 1]))]
        for pos in range(s.prompt_len - 1):
            out.setdefault((i, pos), out.get((first, pos)))
    return out


def step(model, samples, advantages, **kw):
    """Loss, gradients and no-grad log-probs of one step over `samples`."""
    model.zero_grad(set_to_none=True)
    mbs = build_micro_batches(samples, advantages, temperature=0.9, **kw)
    normalizer = compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=30)
    loss = StepLoss(PolicyLoss(LOSS), normalizer)
    run_micro_batches(model, mbs, loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.metrics()["loss"], grads, per_token(samples, mbs, forward_logprobs(model, mbs)), mbs


def assert_same(shared, unshared, samples):
    loss_s, grads_s, lp_s, _ = shared
    loss_u, grads_u, lp_u, _ = unshared
    assert set(lp_s) == set(lp_u) == {(i, t) for i, s in enumerate(samples) for t in range(len(s.input_ids))}
    lp_diff = max(abs(lp_s[k] - lp_u[k]) for k in lp_u)
    scale = max(g.abs().max().item() for g in grads_u.values())
    grad_diff = max((grads_s[n] - grads_u[n]).abs().max().item() for n in grads_u) / scale
    print(f"log-prob max diff {lp_diff:.1e}, loss diff {abs(loss_s - loss_u):.1e}, grad rel diff {grad_diff:.1e}")
    assert set(grads_s) == set(grads_u)
    assert lp_diff <= TOL and abs(loss_s - loss_u) <= TOL * max(1.0, abs(loss_u)) and grad_diff <= TOL


@pytest.mark.parametrize("preset", ["tiny", "tiny_dsv3"])
@pytest.mark.parametrize("group_sizes", [[16, 16, 16], [1, 1, 1, 1, 1], [16, 1, 3, 16]], ids=["n16", "n1", "mixed"])
def test_shared_prefix_equals_unshared(preset, group_sizes):
    torch.manual_seed(0)
    model = CausalLM(preset_config(preset))
    samples, advantages = grpo_batch(model.config.vocab_size, group_sizes)
    unshared = step(model, samples, advantages, micro_batch_tokens=100_000)
    assert abs(unshared[0]) > 1e-4 and all(g.abs().max() > 0 for g in unshared[1].values())
    for budget, pack in [(100_000, True), (300, True), (100_000, False)]:
        shared = step(model, samples, advantages, micro_batch_tokens=budget, pack=pack, shared_prefix_min_group=1)
        assert all(mb.attention is not None for mb in shared[3])
        print(f"{preset} {group_sizes} budget {budget} pack {pack}: {len(shared[3])} micro-batches")
        assert_same(shared, unshared, samples)


@pytest.mark.parametrize("name", list(INVARIANCE_CONFIGS))
def test_every_loss_of_the_invariance_tests_is_unchanged(name):
    """The loss configurations `tests/test_losses.py` holds invariant to splits (PPO / GSPO, token and
    sequence aggregations, TIS / MIS, KL to a reference): with shared prefixes on, split over
    micro-batches, the unshared whole batch's loss and gradients; the reference's log-probs are
    computed on the same shared-prefix micro-batches (`forward_logprobs`, as the trainer does)."""
    config = INVARIANCE_CONFIGS[name]
    torch.manual_seed(0)
    model, ref = CausalLM(preset_config("tiny")), CausalLM(preset_config("tiny"))
    samples, advantages = grpo_batch(model.config.vocab_size, [8, 1, 3], max_prompt=20, max_response=12)
    # Behavior log-probs near the policy's (every ratio kind then has sequences inside its bounds).
    whole = build_micro_batches(samples, advantages, micro_batch_tokens=100_000, temperature=0.9)
    policy = per_token(samples, whole, forward_logprobs(model, whole))
    gen = torch.Generator().manual_seed(1)
    for i, s in enumerate(samples):
        s.behavior_logprobs = [policy[(i, t)] + 0.1 * float(torch.randn(1, generator=gen)) if m else 0.0
                               for t, m in enumerate(s.loss_mask)]
    normalizer = compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=12)
    results = []
    for share, budget in [(None, 100_000), (1, 120)]:
        model.zero_grad(set_to_none=True)
        mbs = build_micro_batches(samples, advantages, micro_batch_tokens=budget, temperature=0.9,
                                  shared_prefix_min_group=share)
        if config.kl_coef > 0:
            attach_logprobs(mbs, forward_logprobs(ref, mbs), key="ref")
        loss = StepLoss(PolicyLoss(config), normalizer)
        run_micro_batches(model, mbs, loss)
        results.append((loss.metrics()["loss"], {n: p.grad.clone() for n, p in model.named_parameters()}, len(mbs)))
    (loss_u, grads_u, _), (loss_s, grads_s, count) = results
    scale = max(g.abs().max().item() for g in grads_u.values())
    assert count > 1 and abs(loss_u) > 1e-4 and scale > 0
    assert abs(loss_s - loss_u) <= TOL * abs(loss_u)
    assert max((grads_s[n] - grads_u[n]).abs().max().item() for n in grads_u) <= TOL * scale


def test_long_completions_take_one_call_each_and_still_match(monkeypatch):
    """Past the padded call's size limit each completion gets its own SDPA call: same results."""
    monkeypatch.setattr(shared_prefix_attention, "_PADDED_MAX_ENTRIES", 0)
    torch.manual_seed(0)
    model = CausalLM(preset_config("tiny"))
    samples, advantages = grpo_batch(model.config.vocab_size, [16, 1, 3])
    unshared = step(model, samples, advantages, micro_batch_tokens=100_000)
    shared = step(model, samples, advantages, micro_batch_tokens=300, shared_prefix_min_group=1)
    assert all(mb.attention.padded is False for mb in shared[3])
    assert_same(shared, unshared, samples)


def test_the_prompt_is_counted_once_and_a_group_stays_whole():
    torch.manual_seed(0)
    samples, advantages = grpo_batch(100, [8, 8, 1], max_prompt=40, max_response=10)
    mbs = build_micro_batches(samples, advantages, micro_batch_tokens=100_000, temperature=1.0,
                              shared_prefix_min_group=2)
    (mb,) = mbs
    by_group = {}
    for s in samples:
        by_group.setdefault(s.group, []).append(s)
    expected = sum(g[0].prompt_len - 1 + sum(s.response_len for s in g) if len(g) > 1 else len(g[0].input_ids)
                   for g in by_group.values())
    assert mb.num_tokens == expected < sum(len(s.input_ids) for s in samples)
    # A budget below one group's shared length splits the group into units that each hold the prompt.
    group0 = [i for i, s in enumerate(samples) if s.group == 0]
    shared_len = samples[0].prompt_len - 1 + sum(samples[i].response_len for i in group0)
    units = find_units([s.input_ids for s in samples], [s.prompt_len for s in samples], [s.group for s in samples],
                       min_group=2, budget=shared_len - 1)
    g0 = [u for u in units if u.samples[0] in group0]
    assert len(g0) == 2 and all(u.prefix_len == samples[0].prompt_len - 1 for u in g0)
    assert sorted(i for u in g0 for i in u.samples) == group0
    # Fewer units than data-parallel ranks: the largest is halved until every rank has one.
    units = find_units([s.input_ids for s in samples], [s.prompt_len for s in samples], [s.group for s in samples],
                       min_group=2, budget=100_000, dp_size=4)
    assert len(units) == 4
    for rank in range(4):
        assert build_micro_batches(samples, advantages, micro_batch_tokens=100_000, temperature=1.0, dp_size=4,
                                   dp_rank=rank, shared_prefix_min_group=2)


def test_groups_whose_prompts_differ_are_not_shared():
    samples, advantages = grpo_batch(100, [4], max_prompt=10)
    other = make_sample(prompt_ids=samples[0].input_ids[:samples[0].prompt_len - 1] + [7, 8], response_ids=[9, 9],
                        group=0, reward=0.0, logprobs=[-1.0, -1.0], policy_versions=[0, 0])
    units = find_units([s.input_ids for s in samples + [other]], [s.prompt_len for s in samples + [other]],
                       [0] * 5, min_group=2, budget=1000)
    assert sorted(len(u.samples) for u in units) == [1, 4] and [u.prefix_len for u in units if
                                                               len(u.samples) == 1] == [0]


@pytest.mark.parametrize("completion_lengths", [[2, 6, 1], [3, 3, 3]], ids=["uneven", "equal"])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2)], ids=["gqa2", "gqa3", "mha"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "per_completion"])
def test_attention_matches_an_explicit_mask(padded, heads, completion_lengths):
    """Segments: a prompt (5), an unshared sequence (4), a prompt (3); completions 2+6 of the first, 1 of
    the third (or 3 tokens each: the padded call's equal-length view); query / KV heads 4 / 2, 6 / 2
    (GQA groups along the padded call's query axis) and 2 / 2. Reference: one SDPA over all T tokens
    with the mask the layout means."""
    torch.manual_seed(0)
    lengths, prefix_of = [5, 4, 3, *completion_lengths], [-1, -1, -1, 0, 0, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T, (Hq, Hkv), D = int(cu[-1]), heads, 8
    q, k, v = (torch.randn(T, h, D, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv))
    layout = SharedPrefixAttention(cu, torch.tensor(prefix_of), padded=padded)
    assert layout.padded == padded
    out = layout.attend(0, q, k, v, scale=0.3)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = torch.arange(T)
    pre = torch.tensor(prefix_of)[seg]
    mask = ((seg[:, None] == seg[None]) & (idx[None] <= idx[:, None])) | (pre[:, None] == seg[None])
    group = Hq // Hkv
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
                                         v.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask, scale=0.3)
    ref = ref.transpose(0, 1)
    assert (out - ref).abs().max() < 1e-12
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) < 1e-12


def test_bad_layouts_and_settings_are_refused():
    cu = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="must come first"):
        SharedPrefixAttention(cu, torch.tensor([-1, 0, -1]))
    with pytest.raises(ValueError, match="not a prefix-free segment"):
        SharedPrefixAttention(cu, torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match="prefix_of has 2 entries for 3 segments"):
        SharedPrefixAttention(cu, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        SharedPrefixAttention(torch.tensor([0, 3, 2], dtype=torch.int32), torch.tensor([-1, 0]))
    layout = SharedPrefixAttention(cu, torch.tensor([-1, 0, 0]))
    with pytest.raises(ValueError, match="covers 7 tokens, the forward has 6"):
        layout.attend(0, torch.zeros(6, 2, 4), torch.zeros(6, 2, 4), torch.zeros(6, 2, 4), scale=1.0)
    with pytest.raises(ValueError, match="prompt_len 9 must be in"):
        find_units([[1, 2, 3]], [9], [0], min_group=1, budget=10)
    with pytest.raises(ValueError, match=r"sample 1 has 4 tokens, more than max_tokens_per_micro_batch \(3\)"):
        find_units([[1, 2, 3], [1, 2, 4, 5]], [2, 2], [0, 0], min_group=1, budget=3)
    with pytest.raises(ConfigError, match="train.shared_prefix='yes' must be true, false or auto"):
        TrainSection(shared_prefix="yes")
    with pytest.raises(ConfigError, match="shared_prefix"):
        load_config(RLConfig, overrides=["train.shared_prefix=sometimes"])
    with pytest.raises(ConfigError, match="train.shared_prefix=true with model.batch_invariant=true"):
        load_config(RLConfig, overrides=["train.shared_prefix=true", "model.batch_invariant=true"])
