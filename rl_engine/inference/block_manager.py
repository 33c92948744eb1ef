"""The paged KV block pool: refcounted blocks, prefix caching with chained content hashes, LRU eviction.

Block 0 is reserved as the dummy block that padded batch slots write into; blocks 1.. are handed out.
A full block's hash is BLAKE2b-256(parent block hash + its token ids as little-endian int64), so equal
prefixes hash equally in every process (never Python's salted `hash()`); a hit is verified against the
block's stored token ids before it is reused. A block whose refcount drops to 0 keeps its hash and goes
to an LRU list, from which it is revived by a hit or evicted when fresh blocks run out.

`epoch` changes on `reset_prefix_cache()` (a weights update): a sequence whose KV was started in an
older epoch never registers blocks again, since its KV mixes two weights versions.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from hashlib import blake2b as _blake2b
from itertools import chain

from rl_engine.inference.sequence import Sequence

DUMMY_BLOCK = 0


_PACKS: dict[int, Callable[..., bytes]] = {}  # token count -> its little-endian int64 packer (a block's: one)


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Chained content hash of one full block; stable across processes and Python versions. BLAKE2b-256
    (CPython's own) rather than OpenSSL's sha256: decode steps register their rows' filled blocks (~570 in
    generate.py's batch-64 run) right after a forward has evicted the hash's code and state, where
    `register_full_blocks` took 5.0 ms a run with sha256 and 4.0 with BLAKE2b (in-run thread time, 30 runs each,
    alternated). Nothing stores or compares these hashes outside the process's block manager."""
    n = len(tokens)
    pack = _PACKS.get(n) or _PACKS.setdefault(n, struct.Struct(f"<{n}q").pack)
    return _blake2b(parent + pack(*tokens), digest_size=32).digest()


class BlockManager:
    def __init__(self, *, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the padding block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.ref_counts[DUMMY_BLOCK] = 1  # never freed, never handed out
        self.free_ids: deque[int] = deque(range(1, num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0 but hashed, LRU first
        self.hash_to_block: dict[bytes, int] = {}
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.block_version: list[int] = [0] * num_blocks  # weights version that computed the block
        self.epoch = 0
        self.num_hits = 0
        self.num_queries = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` tokens fit."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ---- prefix cache ---------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq` (verified), at most all but its last token so that
        at least one token is computed (its logits are needed). Also fills `seq.block_hashes`."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        tokens = seq.token_ids
        max_blocks = (len(tokens) - 1) // bs
        hashes = seq.block_hashes
        hits: list[int] = []
        parent = hashes[-1] if hashes else b""
        for i in range(max_blocks):
            if i == len(hashes):
                parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
                hashes.append(parent)
            block = self.hash_to_block.get(hashes[i])
            if block is None or self.block_tokens[block] != tuple(tokens[i * bs:(i + 1) * bs]):
                break
            hits.append(block)
        self.num_queries += max_blocks
        self.num_hits += len(hits)
        return hits

    def can_allocate(self, num_new: int, cached: list[int] = ()) -> bool:
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)
        return num_new <= self.num_free_blocks - revived

    def acquire_cached(self, seq: Sequence, cached: list[int]) -> None:
        """Give `seq` the hit blocks (refcount +1, revived from the LRU list if free)."""
        for b in cached:
            if self.ref_counts[b] == 0:
                del self.evictable[b]
            self.ref_counts[b] += 1
            seq.kv_version = self.block_version[b] if seq.kv_version is None else min(seq.kv_version,
                                                                                        self.block_version[b])
        seq.block_table.extend(cached)
        seq.num_hashed_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size

    def share(self, child: Sequence, parent: Sequence, num_blocks: int) -> None:
        """Fork: `child` takes `parent`'s first `num_blocks` (full) blocks."""
        shared = parent.block_table[:num_blocks]
        for b in shared:
            self.ref_counts[b] += 1
        child.block_table = list(shared)
        child.block_hashes = list(parent.block_hashes[:num_blocks])
        child.num_hashed_blocks = min(num_blocks, parent.num_hashed_blocks)
        child.num_computed_tokens = num_blocks * self.block_size
        child.kv_epoch = parent.kv_epoch
        child.kv_version = parent.kv_version

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash and publish the blocks of `seq` that became full of computed KV."""
        if not self.enable_prefix_caching or seq.kv_epoch != self.epoch:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        start = seq.num_hashed_blocks
        if num_full <= start:
            return
        tokens = seq.token_ids
        hashes = seq.block_hashes
        table = seq.block_table
        hash_to_block, block_hashes = self.hash_to_block, self.block_hash
        version = seq.kv_version or 0
        for i in range(start, num_full):  # (a decode step's: one)
            block_tokens = tokens[i * bs:(i + 1) * bs]
            if i == len(hashes):
                h = block_hash(hashes[-1] if hashes else b"", block_tokens)
                hashes.append(h)
            else:
                h = hashes[i]
            block = table[i]
            if h not in hash_to_block and block_hashes[block] is None:
                hash_to_block[h] = block
                block_hashes[block] = h
                self.block_tokens[block] = tuple(block_tokens)
                self.block_version[block] = version
        seq.num_hashed_blocks = num_full

    # ---- allocation -----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new: int) -> None:
        for _ in range(num_new):
            if self.free_ids:
                b = self.free_ids.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)  # least recently used
                self._forget(b)
            self.ref_counts[b] = 1
            seq.block_table.append(b)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Tail blocks are released first, so they are evicted first."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
        seq.kv_version = None

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """KV rollback: keep the blocks holding `seq`'s first `num_tokens` tokens and release the rest
        (a rollback that crosses a block boundary frees blocks). Released blocks keep their prefix-cache
        entry if they have one: their KV still matches their hash. The kept last block will be written
        again past `num_tokens`, so it must be private to `seq` (refcount 1, which the engine guarantees:
        shared and cached blocks are full blocks below any rolled-back position); if it was published
        in the prefix cache it is unpublished."""
        bs = self.block_size
        keep = -(-num_tokens // bs)
        table = seq.block_table
        for b in reversed(table[keep:]):
            self._release(b)
        if keep < len(table):  # a new list: a table changes in place only by appending (the model runner relies on it)
            seq.block_table = table = table[:keep]
        full = num_tokens // bs
        if keep > full:  # a partly kept block
            b = table[-1]
            assert self.ref_counts[b] == 1, f"rollback into block {b} shared by {self.ref_counts[b]} holders"
            self._forget(b)
        del seq.block_hashes[full:]
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, full)
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    def _release(self, b: int) -> None:
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            if self.block_hash[b] is not None:
                self.evictable[b] = None
            else:
                self.free_ids.append(b)

    def _forget(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
            self.block_hash[b] = None
            self.block_tokens[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (after a weights update). Blocks in use stay with their sequences."""
        for b in list(self.hash_to_block.values()):
            self._forget(b)
        # lowest ids first from here on: the pool's blocks the next sequences take are those the last ones used,
        # not the next stretch of a pool cycled through from end to end (the free list is first in, first out),
        # so a run's KV stays on the pages (and huge pages) of the part of the pool it needs. generate.py batch 64,
        # ~3.5M model, 1 thread, engines alternated in one process: with the KV pool on huge pages
        # (model_runner._huge_page_kv_pool, faulted in as first reached) 1.038x against neither (median pair 1.035,
        # 9/10; the pool faulted in at build: 1.022x); grpo_step's tiny-preset rollout (128 rows, 64 tokens, both,
        # faulted in at build) 1.05x (11/12 pairs). The sort, once a reset: ~2 ms for 65k nearly sorted blocks, up to
        # ~20 ms shuffled.
        self.free_ids = deque(sorted(chain(self.free_ids, self.evictable)))
        self.evictable.clear()
        self.epoch += 1

    def check_invariants(self) -> None:
        """For tests: refcounts match block tables, every block is in exactly one place."""
        free = set(self.free_ids)
        evict = set(self.evictable)
        assert not free & evict and DUMMY_BLOCK not in free | evict
        for b in range(1, self.num_blocks):
            in_pool = (b in free) + (b in evict)
            assert in_pool == (self.ref_counts[b] == 0), (b, self.ref_counts[b], in_pool)
