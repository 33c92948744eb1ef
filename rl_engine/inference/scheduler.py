"""Continuous batching with chunked prefill under a token budget, and preemption by recompute.

Every step the scheduler fills one flat batch of at most `max_num_batched_tokens` tokens: first the
running sequences in admission order (a decode costs one token, a prompt still being prefilled takes
what is left of the budget), then waiting sequences in arrival order. A sequence only ever asks for
its tokens that have no KV yet, so prefills, chunk continuations, decodes and recomputes are one case.
When every running sequence decodes, the batch is scheduled in one pass (`_schedule_decodes`); after a step
in which each scheduled sequence computed its token and sampled the next (the engine's report, `decoded`), a
running list that is exactly that step's less the sequences removed since needs no reading of their tokens.

When the pool has no block for a running sequence, the newest running sequence is preempted: its
blocks are released (shared and cached blocks survive through their refcounts) and it goes back to
the front of the queue with its generated tokens, log-probs and versions; when readmitted it
recomputes the KV of prompt + output and carries on. Nothing is lost or sampled twice.

Forked samples (`n` > 1) wait with the full prompt blocks they share with their leader, and may copy its
partial prompt block when admitted (EngineConfig.fork_copy_partial_block: the copy's block is taken at
admission, like the prefill's). Blocks that only waiting sequences hold are released (first the newest waiting
sequence holding a block of its own, else every sample sharing a block of their finished leader) before the newest
running sequence would preempt itself for lack of blocks, and when nothing runs and the first waiting sequence's
blocks cannot be had: a sequence left alone always has the whole pool (the engine's max_seq_len), so they never
leave the engine with nothing to schedule, nor one sequence preempting itself forever. A sample whose leader runs
keeps its blocks (its leader's prompt blocks and its copy); a sequence released for a block of its own drops its
whole table (`_release_waiting_blocks`).

Speculative decoding: a running sequence may end in draft tokens (a verify chunk of 1 + d tokens).
Drafts are optional work: they shrink to the token budget and to the free blocks before anyone is
preempted for them, and a sequence that is preempted or not scheduled loses them. After `schedule()`
every sequence holds exactly the drafts it computes this step.
"""

from __future__ import annotations

from collections import Counter, deque
from itertools import chain, repeat
from operator import attrgetter, floordiv, ge, sub

from rl_engine.inference.block_manager import BlockManager
from rl_engine.inference.sequence import SchedulerOutput, Sequence, SeqStatus, is_remainder

_token_ids = attrgetter("token_ids")
_num_computed = attrgetter("num_computed_tokens")
_block_table = attrgetter("block_table")


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # The persistent decode batch's scheduler side (`_schedule_decodes`): the sequences the last schedule scheduled
        # for one token each (`_singles`), handed on once the engine reports that every scheduled sequence computed
        # its token and sampled the next (`decoded`), and the running sequences removed since the last schedule.
        # Every schedule takes and clears them, as does `forget_decoded` (the engine, once no request is left).
        self._singles: list[Sequence] | None = None
        self._decoded: list[Sequence] | None = None
        self._removed: list[Sequence] = []

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
            self._removed.append(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass  # a pending fork, not queued yet
        self.block_manager.free(seq)

    def decoded(self) -> None:
        """After a step in which every scheduled sequence computed one token and sampled the next (the engine's
        `_emit_decode`, plain decoding): each of them again has exactly one token to compute, which the next
        `schedule` takes without reading them if they are all it runs (`_schedule_decodes`)."""
        self._decoded, self._singles = self._singles, None

    def forget_decoded(self) -> None:
        """Drop the last schedule's sequences and those removed since (what the next schedule would compare the
        running list with): the next one reads the running sequences' tokens instead. The engine's call once no
        request is left, so that finished and aborted sequences are not kept until a next schedule."""
        self._singles = self._decoded = None
        self._removed = []

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        decoded, removed = self._decoded, self._removed
        self._singles = self._decoded = None
        self._removed = []
        budget = self.max_num_batched_tokens
        singles: list[Sequence] = []
        chunks: list[Sequence] = []
        chunk_sizes: list[int] = []
        preempted: list[Sequence] = []
        running = self.running

        bs = bm.block_size
        free = bm.num_free_blocks  # kept up to date below (allocate takes, a preemption gives back)
        i = self._schedule_decodes(singles, free, decoded, removed) if 0 < len(running) <= budget else 0
        if i:
            budget -= i
            free = bm.num_free_blocks
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
                if running[-1] is seq and self._release_waiting_blocks():
                    free = bm.num_free_blocks  # (rather than preempt itself: nothing else would free those)
                    continue
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

        # Admit waiting sequences (not in a step that had to preempt: the pool is full. A preemption never empties
        # the running set: the sequence scheduled alone has the whole pool once waiting sequences released theirs.)
        copies: list[tuple[int, int]] = []
        while not preempted and self.waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = self.waiting[0]
            source = None if seq.fork_leader is None else self._fork_copy_source(seq)
            if source is not None:  # the partial block's KV is copied: only the last prompt token is computed
                cached, start = [], seq.num_prompt_tokens - 1
            else:
                cached = bm.match_prefix(seq) if seq.num_computed_tokens == 0 else []
                start = seq.num_computed_tokens + len(cached) * bm.block_size
            n = min(seq.num_tokens - start, budget)
            need = bm.blocks_needed(seq, start + n) - len(cached)
            if not bm.can_allocate(need, cached):
                if running or not self._release_waiting_blocks():
                    break  # (what runs frees blocks as it finishes or is preempted)
                continue  # the first waiting sequence's admission again, with more blocks free
            self.waiting.popleft()
            if seq.num_computed_tokens == 0 and source is None:
                seq.kv_epoch = bm.epoch
            bm.acquire_cached(seq, cached) if cached else None
            bm.allocate(seq, need)
            if source is not None:
                copies.append((source, seq.block_table[-1]))
                self._take_fork_copy(seq)
            seq.fork_leader = None  # (a later admission, after a preemption, recomputes)
            seq.status = SeqStatus.RUNNING
            running.append(seq)
            if n == 1:
                singles.append(seq)
            else:
                chunks.append(seq)
                chunk_sizes.append(n)
            budget -= n

        self.num_preemptions += len(preempted)
        self._singles = singles
        return SchedulerOutput(seqs=singles + chunks, num_new_tokens=[1] * len(singles) + chunk_sizes,
                               num_single=len(singles), preempted=preempted, block_copies=copies)

    def _release_waiting_blocks(self) -> bool:
        """The newest running sequence lacks blocks, or nothing runs and the first waiting sequence's blocks cannot
        be had: waiting sequences release blocks that only waiting sequences hold, to recompute that KV (or find it
        in the prefix cache) when admitted. First the newest one holding a block of its own (a forked sample whose
        leader and siblings are gone); else, where forked samples alone share a block (their leader is gone), all
        holders of the newest one's such block. A sample whose leader runs keeps its blocks (releasing them would
        free nothing and lose the copy of its leader's partial block); a sequence released for a block of its own
        drops its whole table, a first block shared through the prefix cache included. False: no release would
        free a block."""
        holding = [seq for seq in self.waiting if seq.block_table]
        if not holding:
            return False
        bm = self.block_manager
        refs = bm.ref_counts
        for seq in reversed(holding):
            if 1 in map(refs.__getitem__, seq.block_table):
                bm.free(seq)
                return True
        waiting_refs = Counter(chain.from_iterable(map(_block_table, holding)))
        for seq in reversed(holding):
            block = next((b for b in seq.block_table if refs[b] == waiting_refs[b]), None)
            if block is not None:
                for other in holding:
                    if block in other.block_table:
                        bm.free(other)
                return True
        return False

    def _fork_copy_source(self, seq: Sequence) -> int | None:
        """A forked sample's first admission: its leader's block holding the rest of their prompt but its last
        token, when that block's KV can be copied: the leader runs with those tokens computed, in the sample's
        prefix-cache epoch (the same weights), and the sample still holds the full prompt blocks it shares (none
        was freed since the fork). None: the sample computes those tokens itself. The copy's block is allocated
        like the prefill's (one block either way), so it never makes an admission harder."""
        leader = seq.fork_leader
        k = len(seq.block_table)
        if (leader.status is SeqStatus.RUNNING and leader.kv_epoch == seq.kv_epoch
                and leader.num_computed_tokens >= seq.num_prompt_tokens - 1 and len(leader.block_table) > k
                and seq.num_computed_tokens == k * self.block_manager.block_size
                and (seq.num_prompt_tokens - 1) // self.block_manager.block_size == k):
            return leader.block_table[k]
        return None

    @staticmethod
    def _take_fork_copy(seq: Sequence) -> None:
        """A forked sample admitted with a copy of its leader's partial block: it has the KV of its prompt but the
        last token, computed by its leader (the oldest weights version among it, the recorded MoE routing)."""
        leader = seq.fork_leader
        seq.num_computed_tokens = limit = seq.num_prompt_tokens - 1
        if leader.kv_version is not None:
            seq.kv_version = leader.kv_version if seq.kv_version is None else min(seq.kv_version, leader.kv_version)
        if leader.routing is not None:
            seq.routing = leader.routing_prefix(limit)

    def _schedule_decodes(self, singles: list[Sequence], free: int, decoded: list[Sequence] | None,
                          removed: list[Sequence]) -> int:
        """The steady state of `schedule`'s loop over the running sequences, per batch instead of per sequence: when
        each has exactly one token to compute (no drafts) and the free blocks cover those whose blocks are full, each
        of those takes its block, in running order as the loop would, and all go to `singles`. Returns how many were
        scheduled: all of them, or 0 (nothing done) where the loop decides (preemption, prefill chunks, drafts).
        Each has one token to compute, without reading their tokens, when the running list is exactly `decoded` (the
        last schedule's single-token sequences, each of which computed its token and sampled the next, as the engine
        reported: `decoded()`) less the sequences `removed` since (finished, aborted), in the same order."""
        running = self.running
        bs = self.block_manager.block_size
        computed = list(map(_num_computed, running))
        if not is_remainder(running, decoded, removed) and (
                list(map(sub, map(len, map(_token_ids, running)), computed)).count(1) != len(running)):
            return 0
        # a sequence needs a block when computed + 1 > blocks * bs, i.e. computed // bs >= blocks (then exactly one:
        # its computed tokens lie in its blocks)
        full = list(map(ge, map(floordiv, computed, repeat(bs)), map(len, map(_block_table, running))))
        if True in full:
            growing = [seq for seq, f in zip(running, full) if f]
            if len(growing) > free:
                return 0
            for seq in growing:
                self.block_manager.allocate(seq, 1)
        singles.extend(running)
        return len(running)

    def _preempt(self, seq: Sequence) -> None:
        seq.truncate_drafts(0)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.add(seq, front=True)
