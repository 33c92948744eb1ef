"""Block pool bookkeeping: refcounts, chained content hashes, verified prefix hits, LRU eviction."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from rl_engine.inference.block_manager import DUMMY_BLOCK, BlockManager, block_hash
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.sequence import Request, Sequence


def make_seq(tokens: list[int]) -> Sequence:
    req = Request("r", prompt=None, prompt_token_ids=tokens, params=SamplingParams(), stream=False)
    return Sequence(req, 0, list(tokens), num_prompt_tokens=len(tokens), rng_seed=None)


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit `seq` like the scheduler does and mark all but its last token computed."""
    cached = bm.match_prefix(seq)
    seq.kv_epoch = bm.epoch
    if cached:
        bm.acquire_cached(seq, cached)
    bm.allocate(seq, bm.blocks_needed(seq, seq.num_tokens))
    seq.num_computed_tokens = seq.num_tokens
    seq.kv_version = 0
    bm.register_full_blocks(seq)


def test_hash_is_stable_across_processes():
    tokens = list(range(16))
    here = block_hash(block_hash(b"", tokens), [7] * 16).hex()
    code = ("from rl_engine.inference.block_manager import block_hash as h; "
            "print(h(h(b'', list(range(16))), [7] * 16).hex())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
    assert block_hash(b"", [1, 2]) != block_hash(b"", [2, 1])
    assert block_hash(b"x", [1, 2]) != block_hash(b"", [1, 2])


def test_hash_is_the_documented_blake2b_at_every_length():
    """BLAKE2b-256(parent + the tokens as little-endian int64), for blocks of different lengths in turn (the packer
    is kept per length) and tokens over the int64 range."""
    parent = hashlib.blake2b(b"p", digest_size=32).digest()
    for tokens in ([5] * 16, [1, 2], list(range(16)), [-(2**63), 2**63 - 1, 0], [3] * 16):
        ref = hashlib.blake2b(parent + b"".join(t.to_bytes(8, "little", signed=True) for t in tokens),
                              digest_size=32).digest()
        assert block_hash(parent, tokens) == ref


def test_refcounts_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    assert bm.num_free_blocks == 9  # block 0 is the padding block
    a, b = make_seq(list(range(10))), make_seq(list(range(5)))
    run_prefill(bm, a)
    run_prefill(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert DUMMY_BLOCK not in a.block_table + b.block_table
    assert bm.num_free_blocks == 4
    child = make_seq(list(range(10)))
    bm.share(child, a, 2)
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert bm.num_free_blocks == 5  # only a's private last block came back
    bm.free(child)
    bm.free(b)
    assert bm.num_free_blocks == 9
    bm.check_invariants()


def test_prefix_hit_reuses_blocks_and_keeps_last_token_to_compute():
    bm = BlockManager(num_blocks=20, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(12)))
    run_prefill(bm, a)
    b = make_seq(list(range(12)))  # identical: all 3 blocks cached, but the last token must be computed
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    c = make_seq(list(range(8)) + [99, 98, 97, 96, 95])
    assert bm.match_prefix(c) == a.block_table[:2]
    d = make_seq([1] + list(range(1, 12)))  # differs in the first block: no hit at all
    assert bm.match_prefix(d) == []


def test_a_block_filled_by_decoding_registers_in_the_step_that_fills_it():
    """A prefill publishes all its full blocks at once; decoding computes one token a step, and the step that
    fills a block hashes and publishes exactly that block (chained on the prompt's), which a later prompt with
    that prefix hits."""
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    seq = make_seq(list(range(1, 10)))
    run_prefill(bm, seq)
    assert seq.num_hashed_blocks == 2 and all(bm.block_hash[b] is not None for b in seq.block_table[:2])
    for token, hashed in ((10, 2), (11, 2), (12, 3), (13, 3)):
        seq.token_ids.append(token)
        bm.allocate(seq, bm.blocks_needed(seq, seq.num_tokens))
        seq.num_computed_tokens += 1
        bm.register_full_blocks(seq)
        assert seq.num_hashed_blocks == hashed
    block = seq.block_table[2]
    ref = block_hash(block_hash(block_hash(b"", [1, 2, 3, 4]), [5, 6, 7, 8]), [9, 10, 11, 12])
    assert bm.block_hash[block] == seq.block_hashes[2] == ref
    assert bm.block_tokens[block] == (9, 10, 11, 12)
    assert bm.match_prefix(make_seq(list(range(1, 13)) + [0])) == seq.block_table[:3]
    bm.check_invariants()


def test_hit_is_verified_against_stored_tokens():
    bm = BlockManager(num_blocks=20, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    # Simulate a hash collision: the cached block claims other tokens than the ones hashed.
    bm.block_tokens[a.block_table[0]] = (9, 9, 9, 9)
    assert bm.match_prefix(make_seq(list(range(9)))) == []


def test_freed_cached_blocks_are_revived_or_evicted_lru():
    bm = BlockManager(num_blocks=7, block_size=2, enable_prefix_caching=True)
    old, new = make_seq([1, 2, 3, 4, 5]), make_seq([7, 8, 9, 10, 11])
    run_prefill(bm, old)
    run_prefill(bm, new)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 6 and len(bm.evictable) == 4  # full blocks stay cached
    again = make_seq([7, 8, 9, 10, 11])
    assert bm.match_prefix(again) == new_blocks[:2]
    # Fresh blocks come from the never-hashed list first, then the least recently freed cached blocks.
    hog = make_seq(list(range(100, 106)))
    bm.allocate(hog, 3)
    assert set(hog.block_table[:2]) == {old_blocks[2], new_blocks[2]}
    assert hog.block_table[2] in old_blocks[:2]  # old's blocks were freed first
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5])) != old_blocks[:2]
    assert bm.match_prefix(make_seq([7, 8, 9, 10, 11])) == new_blocks[:2]
    bm.check_invariants()


def test_reset_prefix_cache_forgets_hashes_and_stops_stale_registration():
    bm = BlockManager(num_blocks=20, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(9)))
    run_prefill(bm, a)
    running = make_seq(list(range(50, 59)))
    run_prefill(bm, running)
    bm.reset_prefix_cache()
    assert bm.match_prefix(make_seq(list(range(9)))) == []
    # `running` keeps its blocks but, its KV being from the old weights, never publishes more.
    running.token_ids.extend([60, 61, 62, 63])
    bm.allocate(running, 1)
    running.num_computed_tokens = 13
    bm.register_full_blocks(running)
    assert bm.hash_to_block == {}
    bm.check_invariants()


def test_after_a_reset_the_lowest_free_blocks_are_taken_first():
    """A run's sequences, freed and the cache reset, leave the next run the same (lowest) blocks, not the next
    stretch of the pool (the free list is first in, first out between resets)."""
    bm = BlockManager(num_blocks=40, block_size=2, enable_prefix_caching=True)
    first = [make_seq(list(range(10 * i, 10 * i + 7))) for i in range(3)]  # 4 blocks each, 3 of them full
    for seq in first:
        run_prefill(bm, seq)
    used = sorted(b for seq in first for b in seq.block_table)
    assert used == list(range(1, 13))
    for seq in reversed(first):
        bm.free(seq)
    bm.reset_prefix_cache()
    second = make_seq(list(range(200, 219)))  # 10 blocks
    run_prefill(bm, second)
    assert second.block_table == list(range(1, 11))
    bm.check_invariants()


@pytest.mark.parametrize("num_blocks", [0, 1])
def test_pool_needs_two_blocks(num_blocks):
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=False)


def test_a_block_table_changes_in_place_only_by_appending():
    """The model runner rewrites a decode row's block table only where the list it wrote is the sequence's list
    still (`ModelRunner._write_block_tables`): allocation appends to it, a rollback or a free gives a new one."""
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    seq = make_seq(list(range(10)))
    run_prefill(bm, seq)
    table = seq.block_table
    bm.allocate(seq, 1)
    assert seq.block_table is table and len(table) == 4
    bm.truncate(seq, 16)  # nothing released: the same list
    assert seq.block_table is table
    bm.truncate(seq, 5)
    assert seq.block_table is not table and len(seq.block_table) == 2 and table[:2] == seq.block_table
    table = seq.block_table
    bm.free(seq)
    assert seq.block_table is not table and seq.block_table == []
