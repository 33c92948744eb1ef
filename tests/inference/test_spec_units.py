"""Speculative decoding, piece by piece: the config's validation, n-gram lookup, KV rollback in the block
manager (refcounts, prefix-cache entries), the scheduler shrinking drafts, the rejection-sampling math
against a known distribution, and the `rl-engine generate` flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rl_engine.inference.block_manager import BlockManager
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.scheduler import Scheduler
from rl_engine.inference.sequence import Request, Sequence
from rl_engine.inference.speculative import SpeculativeConfig
from rl_engine.inference.speculative.ngram import ngram_lookup
from rl_engine.inference.speculative.rejection import accept_mask, residual_sample
from spec_helpers import chi_square, chi_square_critical_999


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({"num_speculative_tokens": 2}, "needs 'method'"),
    ({"method": "ngrams", "num_speculative_tokens": 2}, "did you mean 'ngram'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "integer >= 1, got 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_maxx": 3}, "did you mean 'prompt_lookup_max'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(4\) must be <= prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "only for method 'draft_model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "x", "prompt_lookup_max": 2},
     "only for method 'ngram'"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": 3}, "directory or a CausalLM"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size must be"),
])
def test_config_refuses_bad_values_with_the_fix(config, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(config)


def test_config_ngram_window_defaults_follow_vllm():
    both = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (4, 4)


def test_llm_refuses_speculation_with_routing_record():
    from rl_engine.inference.config import EngineConfig

    with pytest.raises(ValueError, match="record_routing=True cannot be combined"):
        EngineConfig(record_routing=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})


# ---- n-gram lookup --------------------------------------------------------------------------------
def lookup(tokens, *, min_n=1, max_n=3, k=3):
    return ngram_lookup(np.array(tokens, dtype=np.int64), min_n=min_n, max_n=max_n, num_drafts=k)


def test_ngram_takes_the_longest_suffix_then_the_most_recent_match():
    # suffix [1, 2, 3]: the 3-gram occurs once (followed by 7); the 1-gram [3] occurs later (followed by 9)
    assert lookup([1, 2, 3, 7, 8, 3, 9, 1, 2, 3]) == [7, 8, 3]
    assert lookup([5, 3, 4, 6, 3, 9, 9, 3], max_n=1) == [9, 9, 3]  # most recent occurrence of [3]
    assert lookup([1, 2, 3, 7, 8, 3, 9, 1, 2, 3], min_n=3, k=1) == [7]
    assert lookup([1, 2, 3, 4], min_n=1) == []  # the suffix never recurs
    assert lookup([4, 5, 6, 5, 6], min_n=3) == []  # only a 2-gram recurs
    assert lookup([2, 2, 2, 2], k=5) == [2]  # overlapping match: drafts stop at the sequence's end
    assert lookup([8, 1, 2, 8], k=2) == [1, 2]
    assert lookup([3]) == []


# ---- KV rollback ----------------------------------------------------------------------------------
def make_seq(tokens, prompt_len=None):
    params = SamplingParams(max_tokens=100)
    request = Request("r", prompt=None, prompt_token_ids=tokens[:prompt_len or len(tokens)], params=params,
                      stream=False)
    seq = Sequence(request, 0, list(tokens), num_prompt_tokens=prompt_len or len(tokens), rng_seed=None)
    seq.kv_epoch = 0  # admitted in the pool's first prefix-cache epoch
    return seq


def test_truncate_frees_blocks_past_the_boundary_and_keeps_cached_ones():
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=True)
    seq = make_seq(list(range(10)))
    bm.allocate(seq, 3)
    seq.num_computed_tokens = 10
    bm.register_full_blocks(seq)  # blocks 0-1 of the table are full and published
    cached = list(seq.block_table[:2])
    other = make_seq(list(range(9)))  # shares the cached prefix blocks
    bm.acquire_cached(other, bm.match_prefix(other))
    assert seq.block_table[:2] == other.block_table
    bm.allocate(seq, 2)  # room for 8 drafts (positions 10..17)
    seq.token_ids += [50, 51, 52, 53, 54, 55, 56, 57]
    seq.num_computed_tokens = 18
    free_before = bm.num_free_blocks
    bm.truncate(seq, 11)  # accepted one draft: 11 tokens, 3 blocks
    del seq.token_ids[11:]
    assert len(seq.block_table) == 3 and bm.num_free_blocks == free_before + 2
    assert seq.num_computed_tokens == 11 and seq.num_hashed_blocks == 2
    assert [bm.ref_counts[b] for b in cached] == [2, 2]
    bm.check_invariants()
    bm.truncate(seq, 8)  # exactly on a block boundary: the third block goes, the cached ones stay
    assert seq.block_table == cached and [bm.ref_counts[b] for b in cached] == [2, 2]
    bm.free(seq)
    bm.free(other)
    assert bm.num_free_blocks == bm.num_usable_blocks and len(bm.evictable) == 2  # still cached
    bm.check_invariants()


def test_truncate_into_a_published_private_block_unpublishes_it():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    seq = make_seq(list(range(8)))
    bm.allocate(seq, 2)
    seq.num_computed_tokens = 8
    bm.register_full_blocks(seq)
    last = seq.block_table[1]
    bm.truncate(seq, 6)  # positions 6, 7 will be rewritten with other tokens
    assert bm.block_hash[last] is None and seq.num_hashed_blocks == 1 and len(seq.block_hashes) == 1
    assert bm.match_prefix(make_seq(list(range(8)) + [1])) == seq.block_table[:1]


def test_scheduler_shrinks_drafts_to_the_budget_and_the_pool_before_preempting():
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=False)  # 4 usable blocks
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq(list(range(7))), make_seq(list(range(3)))
    for s in (a, b):
        sched.add(s)
    sched.schedule()  # prefill both: a holds 2 blocks, b holds 1
    a.num_computed_tokens, b.num_computed_tokens = 7, 3
    a.token_ids.append(1)
    b.token_ids.append(1)
    a.token_ids += [9] * 5  # a: 1 + 5 drafts would need positions 7..12 -> 4 blocks, only 3 available
    a.num_draft_tokens = 5
    out = sched.schedule()
    assert not out.preempted and out.seqs == [b, a] and out.num_new_tokens == [1, 5]
    assert a.num_draft_tokens == 4 and a.num_tokens == 12 and len(a.block_table) == 3
    # budget: drafts are cut to what the token budget leaves; an unscheduled sequence loses its drafts
    sched.max_num_batched_tokens = 3
    a.num_computed_tokens = 8
    del a.token_ids[9:]
    a.token_ids += [9, 9, 9]
    a.num_draft_tokens = 3
    b.token_ids += [9, 9]
    b.num_draft_tokens = 2
    out = sched.schedule()
    assert out.seqs == [a] and out.num_new_tokens == [3] and a.num_draft_tokens == 2 and a.num_tokens == 11
    assert b.num_draft_tokens == 0 and b.num_tokens == 4


# ---- rejection sampling math ----------------------------------------------------------------------
def test_rejection_step_reproduces_the_target_distribution():
    """Draw x ~ q, accept w.p. min(1, p/q), else sample the residual: the result is distributed as p,
    including tokens q never proposes and tokens p never emits."""
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10, 0.0])
    q = torch.tensor([0.05, 0.40, 0.0, 0.15, 0.20, 0.20])
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(q, n, replacement=True, generator=g)
    P, Q = p.expand(n, 6).clone(), q.expand(n, 6).clone()
    accepted = torch.tensor(accept_mask(P, Q, x, torch.rand(n, generator=g).tolist()))
    out = x.clone()
    rejected = (~accepted).nonzero().view(-1)
    out[rejected] = torch.tensor(residual_sample(P[rejected], Q[rejected], torch.rand(len(rejected), generator=g)
                                                 .tolist()))
    counts = torch.bincount(out, minlength=6)
    assert counts[5] == 0
    stat = chi_square(counts[:5].tolist(), (p[:5] * n).tolist())
    assert stat < chi_square_critical_999(4), stat
    assert abs(accepted.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.01


def test_chi_square_threshold_table():
    # the table and its interpolation agree with an independent approximation (Wilson-Hilferty, which
    # runs slightly high at small df): no typo in the table
    for df in range(5, 101):
        z = 3.090232  # the 0.999 normal quantile
        wh = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
        assert 0.985 < chi_square_critical_999(df) / wh < 1.002, df
    assert chi_square_critical_999(10) == pytest.approx(29.588)


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_speculative_flags(char_model, capsys):
    from rl_engine.cli import main

    base = ["generate", "--model", char_model, "--prompt", "abcabcabc", "--max-tokens", "12", "--temperature", "0",
            "--ignore-eos", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--speculative-method", "ngram", "--num-speculative-tokens", "3",
                        "--prompt-lookup-max", "3", "--prompt-lookup-min", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["outputs"][0]["token_ids"] == plain["outputs"][0]["token_ids"]
    assert json.loads(captured.err.split("speculative: ", 1)[1])["draft_tokens"] > 0
    assert main(base + ["--speculative-method", "draft_model", "--num-speculative-tokens", "2",
                        "--draft-model", char_model]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["outputs"][0]["token_ids"] == plain["outputs"][0]["token_ids"]
    assert json.loads(captured.err.split("speculative: ", 1)[1])["acceptance_rate"] == 1.0  # its own draft
    for bad, message in [(["--num-speculative-tokens", "3"], "need --speculative-method"),
                         (["--speculative-method", "ngram"], "needs --num-speculative-tokens"),
                         (["--speculative-method", "ngram", "--num-speculative-tokens", "0"], "integer >= 1"),
                         (["--speculative-method", "draft_model", "--num-speculative-tokens", "2"], "--draft-model"),
                         (["--speculative-method", "ngram", "--num-speculative-tokens", "2", "--draft-model", "x"],
                          "only for --speculative-method draft_model")]:
        assert main(base + bad) == 2
        assert message in capsys.readouterr().err
