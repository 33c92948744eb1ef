"""Context parallelism without processes: the load-balanced split, dynamic CP's whole sequences, the
attention blocks against the causal mask of each packed sequence, the merged block attention against
the reference kernel, and the layout's rank order and errors."""

import pytest
import torch

from rl_engine.kernels.reference import varlen_causal_attention
from rl_engine.policy.context_parallel import CPPlan, _block_forward, _expand, _merge, check_cp_options
from rl_engine.policy.parallel import all_group_ranks, check_layout, rank_coords
from parallel_helpers import DENSE, DSV3

# odd lengths, length 1, shorter than 2 cp chunks, and longer than 2 cp chunks
LENGTHS = [7, 1, 2, 13, 33, 4, 1]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_load_balanced_split_holds_chunks_r_and_2cp_minus_1_minus_r(cp):
    plan = CPPlan(_cu(LENGTHS), cp=cp)
    rows = torch.cat(plan.rows)
    assert sorted(rows.tolist()) == list(range(sum(LENGTHS)))  # every token once, no padding
    start = 0
    for i, n in enumerate(LENGTHS):
        edges = plan.chunks[i]
        sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
        assert len(sizes) == 2 * cp and sum(sizes) == n and max(sizes) - min(sizes) <= 1
        for r in range(cp):
            mine = set(plan.rows[r].tolist())
            for c in range(2 * cp):
                chunk = set(range(start + edges[c], start + edges[c + 1]))
                assert chunk <= mine if c in (r, 2 * cp - 1 - r) else not chunk & mine
        start += n
    # balance: the ranks' token counts differ by at most one per sequence
    assert max(plan.counts) - min(plan.counts) <= len(LENGTHS)


def test_dynamic_cp_keeps_short_sequences_whole_balanced_by_tokens():
    plan = CPPlan(_cu(LENGTHS), cp=2, min_tokens=8)
    assert plan.ring_seqs == [3, 4]  # 13 and 33 tokens go through the ring
    assert plan.ring_rows == [23, 23]
    # whole sequences, longest first, each to the rank with the fewest tokens: 7 -> r0, 4 -> r1,
    # 2 -> r1, 1 -> r0, 1 -> r1 (ties to the lower rank)
    assert [n for _, n in plan.whole[0]] == [7, 1] and [n for _, n in plan.whole[1]] == [4, 2, 1]
    assert plan.counts == [31, 30]
    starts = _cu(LENGTHS).tolist()
    for r in range(2):
        for first, n in plan.whole[r]:
            seq = plan.rows[r][first:first + n].tolist()
            assert seq[0] in starts and seq == list(range(seq[0], seq[0] + n))  # contiguous, in order


@pytest.mark.parametrize("cp, min_tokens", [(2, 0), (3, 0), (4, 0), (2, 8), (3, 5)])
def test_blocks_cover_the_causal_mask_exactly_once(cp, min_tokens):
    """Every (query, key) pair of the same sequence with key position <= query position is attended
    in exactly one block, and no other pair is."""
    plan = CPPlan(_cu(LENGTHS), cp=cp, min_tokens=min_tokens)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    want = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    seen = torch.zeros(want.shape, dtype=torch.int64)
    for r in range(cp):
        for src in range(cp):
            for b in plan.blocks(r, src):
                q = plan.rows[r][b.q0:b.q1]
                k = plan.rows[src][b.k0:b.k1]
                if src != r:
                    assert b.k1 <= plan.ring_rows[src]  # only ring rows travel
                mask = torch.ones(len(q), len(k), dtype=torch.int64)
                if b.causal:
                    assert len(q) == len(k)
                    mask = mask.tril()
                seen[q[:, None], k[None, :]] += mask
    assert torch.equal(seen, want.long())


@pytest.mark.parametrize("cp, min_tokens", [(2, 0), (3, 6)])
def test_merged_blocks_equal_reference_attention(cp, min_tokens):
    """The blocks' outputs merged by log-sum-exp (what the ring computes, without the sends) equal the
    reference varlen attention; GQA heads expanded per block."""
    torch.manual_seed(0)
    T, H, Hkv, D = sum(LENGTHS), 4, 2, 8
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    ref = varlen_causal_attention(q, k, v, _cu(LENGTHS), 0.3)
    plan = CPPlan(_cu(LENGTHS), cp=cp, min_tokens=min_tokens)
    for r in range(cp):
        rows = plan.rows[r]
        out = torch.zeros(len(rows), H, D)
        lse = torch.full((len(rows), H), float("-inf"))
        for src in range(cp):
            ks, vs = k[plan.rows[src]], v[plan.rows[src]]
            for b in plan.blocks(r, src):
                o, l = _block_forward(q[rows][b.q0:b.q1], _expand(ks[b.k0:b.k1], 2), _expand(vs[b.k0:b.k1], 2),
                                      causal=b.causal, scale=0.3)
                _merge(out, lse, slice(b.q0, b.q1), o, l)
        # fp32 softmax-weighted sums of <= 33 terms in another order: a few ulps of |v| ~ 4
        assert (out - ref[rows]).abs().max().item() < 1e-5


def test_layout_with_cp_in_megatron_order():
    groups = all_group_ranks(tp=2, cp=2, pp=2, ep=2, dp=1)
    assert groups["tp"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups["cp"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups["dp"] == [(r,) for r in range(8)]
    assert groups["dp_cp"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups["pp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups["ep"] == [(0, 2), (1, 3), (4, 6), (5, 7)]  # ep carved out of dp x cp
    assert rank_coords(6, tp=2, cp=2, pp=2, ep=2, dp=1) == {"tp": 0, "cp": 1, "dp": 0, "pp": 1, "ep": 1, "edp": 0}
    wide = all_group_ranks(tp=1, cp=2, pp=1, ep=2, dp=2)
    assert wide["cp"] == [(0, 1), (2, 3)] and wide["dp"] == [(0, 2), (1, 3)]
    assert wide["dp_cp"] == [(0, 1, 2, 3)] and wide["ep"] == [(0, 1), (2, 3)] and wide["edp"] == [(0, 2), (1, 3)]
    for kind in ("tp", "cp", "dp", "dp_cp", "pp", "ep", "edp"):
        assert sorted(r for g in groups[kind] for r in g) == list(range(8))
    assert check_layout(tp=2, cp=2, pp=1, ep=1, dp=None, world_size=8) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=2, cp=2, pp=1, ep=1, dp=2, world_size=4), r"tp \(2\) x cp \(2\) x pp \(1\) x dp \(2\) = 8 is not the world size \(4\)"),
    (dict(tp=1, cp=3, pp=1, ep=1, dp=None, world_size=4), r"world size \(4\) is not divisible by tp \(1\) x cp \(3\) x pp \(1\) = 3"),
    (dict(tp=1, cp=2, pp=1, ep=4, dp=1, world_size=2), r"ep \(4\) must divide dp \(1\) x cp \(2\) = 2"),
    (dict(tp=1, cp=0, pp=1, ep=1, dp=1, world_size=1), r"cp must be a positive integer, got 0"),
])
def test_bad_cp_layouts_name_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_layout(**kwargs)


def test_bad_cp_options_name_the_values():
    with pytest.raises(ValueError, match=r"cp_comm must be one of \('ring', 'allgather'\), got 'a2a'"):
        check_cp_options(DENSE, cp=2, cp_comm="a2a", cp_min_tokens=0)
    with pytest.raises(ValueError, match=r"cp_min_tokens must be an integer >= 0 .* got -1"):
        check_cp_options(DENSE, cp=2, cp_comm="ring", cp_min_tokens=-1)
    with pytest.raises(ValueError, match=r"cp \(2\) > 1 does not support multi-head latent attention"):
        check_cp_options(DSV3, cp=2, cp_comm="ring", cp_min_tokens=0)


def test_cp_config_keys_and_their_errors():
    from rl_engine.config import ConfigError, load_config
    from rl_engine.train_config import RLConfig

    cfg = load_config(RLConfig, None, ["placement.mode=colocated", "train.cp=2", "train.dp=2",
                                       "train.cp_comm=allgather", "train.cp_min_tokens=64"])
    assert (cfg.train.world_size, cfg.train.cp_comm, cfg.train.cp_min_tokens) == (4, "allgather", 64)
    for overrides, message in [
        (["train.cp=0"], r"train.cp=0 must be >= 1"),
        (["train.cp_min_tokens=-1"], r"train.cp_min_tokens=-1 must be >= 0"),
        (["train.cp_comm=a2a"], r"train.cp_comm"),
        (["placement.mode=colocated", "train.cp=2", "train.ep=4"],
         r"train.ep=4 must divide train.dp x train.cp \(1 x 2 = 2\)"),
        (["train.cp=2"], r"train tp=1 pp=1 dp=1 ep=1 cp=2 needs several trainer ranks"),
        (["placement.mode=colocated", "train.cp=2", "train.shared_prefix=true"],
         r"train.shared_prefix=true has no context-parallel form \(train.cp=2\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(RLConfig, None, overrides)
