"""Packing: budget, first-fit and LPT-balance properties, equal micro-batch counts, flat tensors."""

import random

import pytest
import torch

from rl_engine.rollout.packing import build_packed_batch, concat_values, plan_micro_batches


def _check_plan(lengths: list[int], budget: int, dp_size: int) -> None:
    plan = plan_micro_batches(lengths, max_tokens_per_micro_batch=budget, dp_size=dp_size)
    assert len(plan.micro_batches) == dp_size
    counts = {len(mbs) for mbs in plan.micro_batches}
    assert len(counts) == 1  # every rank runs the same number of micro-batches
    every = sorted(i for mbs in plan.micro_batches for mb in mbs for i in mb)
    assert every == list(range(len(lengths)))  # each sample exactly once
    for mbs in plan.micro_batches:
        loads = [sum(lengths[i] for i in mb) for mb in mbs]
        assert all(load <= budget for load in loads)
        real = [mb for mb in mbs if mb]
        # Padding only at the end; first-fit: no item of a later micro-batch fits an earlier one.
        assert mbs[: len(real)] == real
        for j, later in enumerate(real):
            for i in range(j):
                for index in later:
                    assert loads[i] + lengths[index] > budget
    # LPT: rank loads differ by at most one sample's length.
    rank_loads = plan.tokens_per_rank(lengths)
    assert max(rank_loads) - min(rank_loads) <= max(lengths)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_random_plans_satisfy_packing_properties(seed: int, dp_size: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
    _check_plan(lengths, budget=rng.randint(40, 90), dp_size=dp_size)


def test_known_plan() -> None:
    lengths = [5, 9, 2, 7, 3, 4]
    plan = plan_micro_batches(lengths, max_tokens_per_micro_batch=10, dp_size=2)
    # LPT by length 9,7,5,4,3,2: 9->r0, 7->r1, 5->r1 (7<9), 4->r0 (9<12), 3->r1 (12<13), 2->r0
    # => r0 {9,4,2} = 15 tokens, r1 {7,5,3} = 15. FFD: r0 [9] [4,2]; r1 [7,3] [5].
    assert plan.micro_batches == [[[1], [2, 5]], [[3, 4], [0]]]
    assert plan.tokens_per_rank(lengths) == [15, 15] and plan.num_micro_batches == 2


def test_more_ranks_than_samples_get_empty_micro_batches() -> None:
    plan = plan_micro_batches([3, 3], max_tokens_per_micro_batch=4, dp_size=3)
    assert plan.micro_batches == [[[0]], [[1]], [[]]]
    assert plan_micro_batches([], max_tokens_per_micro_batch=4, dp_size=2).micro_batches == [[[]], [[]]]


def test_balance_beats_naive_split() -> None:
    lengths = [10, 10, 10, 10, 1, 1, 1, 1]  # contiguous halves would be 40 vs 4 tokens
    plan = plan_micro_batches(lengths, max_tokens_per_micro_batch=100, dp_size=2)
    assert plan.tokens_per_rank(lengths) == [22, 22]


def test_errors_name_the_numbers() -> None:
    with pytest.raises(ValueError, match="sample 1 has 12 tokens, more than max_tokens_per_micro_batch \\(10\\)"):
        plan_micro_batches([3, 12], max_tokens_per_micro_batch=10)
    with pytest.raises(ValueError, match="sample 0 has length 0"):
        plan_micro_batches([0], max_tokens_per_micro_batch=10)
    with pytest.raises(ValueError, match="dp_size \\(0\\)"):
        plan_micro_batches([1], max_tokens_per_micro_batch=10, dp_size=0)


def test_build_packed_batch_tensors() -> None:
    token_ids = [[10, 11, 12], [20], [30, 31], [40, 41]]
    loss_mask = [[0, 1, 1], [1], [0, 1], [1, 1]]
    packed = build_packed_batch(
        [0, 1, 3],
        token_ids=token_ids,
        per_token={"loss_mask": [torch.tensor(m, dtype=torch.bool) for m in loss_mask]},
        per_sample={"advantages": [0.5, -1.0, 2.0, 3.0]},
    )
    assert packed.input_ids.tolist() == [10, 11, 12, 20, 40, 41]
    assert packed.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert packed.seq_ids.tolist() == [0, 0, 0, 1, 2, 2]
    assert packed.values["loss_mask"].tolist() == [False, True, True, True, True, True]
    assert packed.values["advantages"].tolist() == [0.5, 0.5, 0.5, -1.0, 3.0, 3.0]
    assert (packed.num_seqs, packed.num_tokens, packed.max_seqlen) == (3, 6, 3)


def test_build_packed_batch_empty_and_mismatch() -> None:
    empty = build_packed_batch([], token_ids=[[1]], per_token={"m": [[1]]}, per_sample={"a": [1.0]})
    assert empty.num_tokens == 0 and empty.cu_seqlens.tolist() == [0] and empty.values["a"].numel() == 0
    with pytest.raises(ValueError, match="per_token\\['logprobs'\\] of sample 1 has 1 values but the sample has 2 tokens"):
        build_packed_batch([0, 1], token_ids=[[1], [2, 3]], per_token={"logprobs": [[0.0], [0.0]]})


@pytest.mark.parametrize("pieces", [
    [[1, 2, 3], [4], [5, 6]],  # ints: int64
    [[0.0, -1.25], [3.4028235e38 * 2, 1e-46, 0.1]],  # floats: float32 rounding, overflow and underflow as torch's
    [[True, False], [True]],  # bools
    [[2**70], [1]],  # past int64: numpy gives up, torch.as_tensor decides
    [torch.tensor([1, 2]), [3]],  # a tensor among the pieces
    [[], [1, 2]],  # an empty list: torch.cat promotes the ints to its float32
    [[], []],
])
def test_concat_values_is_torch_cat_of_as_tensor(pieces) -> None:
    # the packing's one-conversion path gives exactly the per-piece torch.as_tensor result, dtype included
    try:
        expected = torch.cat([torch.as_tensor(p).reshape(-1) for p in pieces])
    except (RuntimeError, OverflowError, ValueError) as e:
        with pytest.raises(type(e)):
            concat_values(pieces)
        return
    got = concat_values(pieces)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize(("pieces", "dtype"), [
    ([[1, 2, -3], [2**62], [0]], torch.int64),
    ([[0, 1, 2], [-1, 0]], torch.bool),  # nonzero
    ([[True, False], [True]], torch.int64),
    ([[0.0, -1.25], [3.4028235e38 * 2, 1e-46, 0.1, 1 / 3]], torch.float32),  # one rounding, overflow to inf
    ([[1, 2], [3]], torch.float32),
    ([torch.tensor([1, 2]), [3]], torch.bool),  # torch's way, then .to
    ([[], [1, 2]], torch.int64),
])
def test_concat_values_with_a_dtype_is_the_inferred_result_converted(pieces, dtype) -> None:
    # the straight conversion (numpy's fromiter) gives the values of the inferred result's .to(dtype)
    expected = torch.cat([torch.as_tensor(p).reshape(-1) for p in pieces]).to(dtype)
    got = concat_values(pieces, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, expected)
