"""Continuous batching with chunked prefill under a token budget, and preemption by recompute.

Every step the scheduler fills one flat batch of at most `max_num_batched_tokens` tokens: first the
running sequences in admission order (a decode costs one token, a prompt still being prefilled takes
what is left of the budget), then waiting sequences in arrival order. A sequence only ever asks for
its tokens that have no KV yet, so prefills, chunk continuations, decodes and recomputes are one case.

When the pool has no block for a running sequence, the newest running sequence is preempted: its
blocks are released (shared and cached blocks survive through their refcounts) and it goes back to
the front of the queue with its generated tokens, log-probs and versions; when readmitted it
recomputes the KV of prompt + output and carries on. Nothing is lost or sampled twice.

Speculative decoding: a running sequence may end in draft tokens (a verify chunk of 1 + d tokens).
Drafts are optional work: they shrink to the token budget and to the free blocks before anyone is
preempted for them, and a sequence that is preempted or not scheduled loses them. After `schedule()`
every sequence holds exactly the drafts it computes this step.
"""

from __future__ import annotations

from collections import deque

from rl_engine.inference.block_manager import BlockManager
from rl_engine.inference.sequence import SchedulerOutput, Sequence, SeqStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, *, front: bool = False) -> None:
        seq.status = SeqStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and release its blocks (finish or abort)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass  # a pending fork, not queued yet
        self.block_manager.free(seq)

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        singles: list[Sequence] = []
        chunks: list[Sequence] = []
        chunk_sizes: list[int] = []
        preempted: list[Sequence] = []
        running = self.running

        bs = bm.block_size
        free = bm.num_free_blocks  # kept up to date below (allocate takes, a preemption gives back)
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            computed = seq.num_computed_tokens
            n = min(len(seq.token_ids) - computed, budget)
            need = -(-(computed + n) // bs) - len(seq.block_table)  # bm.blocks_needed, inlined (every step)
            if seq.num_draft_tokens:
                if need > free:  # drafts are optional: shrink them before preempting anyone
                    room = (len(seq.block_table) + free) * bs - computed
                    n = max(1, min(n, room))
                    need = bm.blocks_needed(seq, computed + n)
                seq.truncate_drafts(n - 1)  # the budget or the pool may not cover them all
            while need > free:
                victim = running.pop()  # the newest; scheduled ones are all before index i
                self._preempt(victim)
                preempted.append(victim)
                free = bm.num_free_blocks
                if victim is seq:
                    break
            else:
                if need > 0:
                    bm.allocate(seq, need)
                    free -= need
                if n == 1:
                    singles.append(seq)
                else:
                    chunks.append(seq)
                    chunk_sizes.append(n)
                budget -= n
                i += 1

        for seq in running[i:]:  # not scheduled this step: their drafts are stale next step
            seq.truncate_drafts(0)

        # Admit waiting sequences (not in a step that had to preempt: the pool is full).
        while not preempted and self.waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.match_prefix(seq) if seq.num_computed_tokens == 0 else []
            start = seq.num_computed_tokens + len(cached) * bm.block_size
            n = min(seq.num_tokens - start, budget)
            need = bm.blocks_needed(seq, start + n) - len(cached)
            if not bm.can_allocate(need, cached):
                break
            self.waiting.popleft()
            if seq.num_computed_tokens == 0:
                seq.kv_epoch = bm.epoch
            bm.acquire_cached(seq, cached) if cached else None
            bm.allocate(seq, need)
            seq.status = SeqStatus.RUNNING
            running.append(seq)
            if n == 1:
                singles.append(seq)
            else:
                chunks.append(seq)
                chunk_sizes.append(n)
            budget -= n

        self.num_preemptions += len(preempted)
        return SchedulerOutput(seqs=singles + chunks, num_new_tokens=[1] * len(singles) + chunk_sizes,
                               num_single=len(singles), preempted=preempted)

    def _preempt(self, seq: Sequence) -> None:
        seq.truncate_drafts(0)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.add(seq, front=True)
