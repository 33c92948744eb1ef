"""Continuous batching: token budget, chunked prefill, admission limits, preemption of the newest."""

from __future__ import annotations

from rl_engine.inference import scheduler as scheduler_module
from rl_engine.inference.block_manager import BlockManager
from rl_engine.inference.scheduler import Scheduler
from rl_engine.inference.sequence import SeqStatus

from test_block_manager import make_seq


def finish_step(sched_out) -> None:
    """What the engine does after a forward: computed tokens advance; a finished prompt samples one."""
    for seq, n in zip(sched_out.seqs, sched_out.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(0)


def test_chunked_prefill_under_token_budget_with_decodes_first():
    bm = BlockManager(num_blocks=100, block_size=4, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    short, long = make_seq([1, 2, 3]), make_seq(list(range(25)))
    s.add(short)
    s.add(long)
    out = s.schedule()
    assert out.seqs == [short, long] and out.num_new_tokens == [3, 7] and out.num_single == 0
    finish_step(out)
    out = s.schedule()  # short decodes (1 token, listed first), long continues with the rest of the budget
    assert out.seqs == [short, long] and out.num_new_tokens == [1, 9] and out.num_single == 1
    finish_step(out)
    out = s.schedule()
    assert out.num_new_tokens == [1, 9]
    finish_step(out)
    out = s.schedule()  # long's prompt is complete: both decode
    assert out.num_new_tokens == [1, 1] and out.num_single == 2


def test_max_num_seqs_limits_admission():
    bm = BlockManager(num_blocks=100, block_size=4, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq([i, i + 1]) for i in range(3)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert out.seqs == seqs[:2] and list(s.waiting) == seqs[2:]


def test_preemption_takes_the_newest_and_requeues_it_first():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)  # 5 usable blocks
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = make_seq([1, 2, 3, 4]), make_seq([5, 6, 7, 8]), make_seq([9])
    for q in (a, b, c):
        s.add(q)
    out = s.schedule()
    assert out.seqs == [c, a, b] and out.num_single == 1  # c's one-token prefill counts as a single
    finish_step(out)
    assert bm.num_free_blocks == 0
    # a and b each need a third block: c (the newest) is preempted for a, then b preempts itself.
    out = s.schedule()
    assert out.seqs == [a] and out.preempted == [c, b]
    assert list(s.waiting) == [b, c] and s.running == [a]
    assert c.status is SeqStatus.WAITING and c.num_computed_tokens == 0 and c.block_table == []
    assert c.token_ids == [9, 0] and c.num_preemptions == 1  # its sampled token is kept
    bm.check_invariants()
    finish_step(out)
    out = s.schedule()  # no admission while the pool is full
    assert out.seqs == [a] and not out.preempted


def test_sequence_preempts_itself_when_it_is_the_newest():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)  # 3 usable blocks
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    b, a = make_seq([1]), make_seq(list(range(2, 10)))
    s.add(b)
    s.add(a)
    finish_step(s.schedule())
    out = s.schedule()  # b still fits its block; a needs a third one and is the newest
    assert out.seqs == [b] and out.preempted == [a]
    assert a.status is SeqStatus.WAITING and a.token_ids[-1] == 0 and len(a.token_ids) == 9
    bm.check_invariants()


def forked_child(s: Scheduler, leader, shared: int):
    """What LLMEngine._fork does for one sample: the leader's first `shared` blocks, queued first, its leader kept
    for the partial block's copy."""
    child = make_seq(leader.token_ids[:leader.num_prompt_tokens])
    s.block_manager.share(child, leader, shared)
    child.fork_leader = leader
    s.add(child, front=True)
    return child


def test_forked_sample_copies_its_leaders_partial_block_when_admitted_while_the_leader_runs():
    bm = BlockManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    leader = make_seq([1, 2, 3, 4, 5, 6])  # blocks [1 2] [3 4] [5 6]: tokens 0..4 are the child's to copy
    s.add(leader)
    finish_step(s.schedule())
    child = forked_child(s, leader, 2)
    assert child.num_computed_tokens == 4 and len(child.block_table) == 2 and bm.num_free_blocks == 9 - 3
    out = s.schedule()
    assert out.seqs == [leader, child] and out.num_new_tokens == [1, 1]  # the child computes token 5 only
    assert out.block_copies == [(leader.block_table[2], child.block_table[2])] and child.num_computed_tokens == 5
    assert child.block_table[:2] == leader.block_table[:2] and child.block_table[2] != leader.block_table[2]
    assert child.fork_leader is None
    bm.check_invariants()


def test_forked_sample_recomputes_when_its_leader_finished_before_it_was_admitted():
    bm = BlockManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    leader = make_seq([1, 2, 3, 4, 5, 6])
    s.add(leader)
    finish_step(s.schedule())
    child = forked_child(s, leader, 2)
    s.remove(leader)  # it stopped: its partial block is released (and may be reused)
    leader.status = SeqStatus.FINISHED
    out = s.schedule()
    assert out.seqs == [child] and out.num_new_tokens == [2] and out.block_copies == []  # tokens 4 and 5
    bm.check_invariants()


def test_waiting_samples_release_their_blocks_when_nothing_runs_and_the_first_cannot_be_admitted():
    """A forked sample waits with the blocks it shares; its leader finished, so it alone holds them. The first
    waiting sequence needs more blocks than are free and nothing runs (nothing would ever free a block): the
    sample releases its blocks (it will recompute them) and the first is admitted."""
    bm = BlockManager(num_blocks=5, block_size=2, enable_prefix_caching=False)  # 4 usable blocks
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    leader = make_seq([1, 2, 3, 4, 5])
    s.add(leader)
    finish_step(s.schedule())
    child = forked_child(s, leader, 2)
    s.remove(leader)
    leader.status = SeqStatus.FINISHED
    first = make_seq(list(range(10, 17)))  # 7 tokens: 4 blocks
    s.add(first, front=True)
    assert bm.num_free_blocks == 2
    out = s.schedule()
    assert out.seqs == [first] and out.num_new_tokens == [7]
    assert list(s.waiting) == [child] and child.block_table == [] and child.num_computed_tokens == 0
    bm.check_invariants()


def test_a_release_for_a_running_sequence_frees_a_waiting_sequences_own_blocks_and_keeps_shared_ones():
    """The newest running sequence x needs a block and none is free. Two forked samples wait: c shares its
    prompt block with its running leader l (releasing it frees nothing, and c would lose the copy of l's partial
    block), d holds the block of its finished leader m alone. c is the newer, but d releases: x gets d's block, c
    keeps its block and copies l's partial block when admitted."""
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)  # 5 usable blocks
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    l, m, x = make_seq(list(range(1, 9))), make_seq(list(range(11, 17))), make_seq([21, 22, 23, 24])
    for q in (l, m, x):
        s.add(q)
    finish_step(s.schedule())  # l: 2 blocks, m: 2, x: 1; each decodes next (l and x into a new block)
    c = forked_child(s, l, 1)
    d = forked_child(s, m, 1)
    s.remove(m)  # it stopped: d alone holds its first block
    m.status = SeqStatus.FINISHED
    assert list(s.waiting) == [d, c] and bm.num_free_blocks == 1 and bm.ref_counts[c.block_table[0]] == 2
    shared = list(c.block_table)
    out = s.schedule()
    assert out.seqs == [l, x] and out.preempted == [] and len(x.block_table) == 2
    assert d.block_table == [] and d.num_computed_tokens == 0
    assert c.block_table == shared and c.num_computed_tokens == 4
    bm.check_invariants()
    finish_step(out)
    s.remove(d)
    s.remove(x)  # (frees x's 2 blocks: c's admission needs one)
    out = s.schedule()
    assert out.seqs == [l, c] and out.num_new_tokens == [1, 1]  # c computes its last prompt token only
    assert out.block_copies == [(l.block_table[1], c.block_table[1])] and c.block_table[0] == shared[0]
    bm.check_invariants()


def test_a_running_sequence_preempts_itself_rather_than_release_blocks_its_leader_shares():
    """The only waiting sample's block is its running leader's too: releasing it would free nothing, so the newest
    running sequence preempts itself and the sample keeps its block."""
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)  # 3 usable blocks
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    l, x = make_seq(list(range(1, 7))), make_seq([21, 22, 23, 24])
    s.add(l)
    s.add(x)
    finish_step(s.schedule())  # l: 2 blocks, x: 1 (full: its decode needs another)
    c = forked_child(s, l, 1)
    assert bm.num_free_blocks == 0
    out = s.schedule()
    assert out.seqs == [l] and out.preempted == [x] and list(s.waiting) == [x, c]
    assert c.block_table == l.block_table[:1] and c.num_computed_tokens == 4
    bm.check_invariants()


def test_samples_sharing_a_block_only_among_themselves_all_release_it_when_nothing_runs():
    """Two samples share their finished leader's prompt block (neither holds a block of its own): when nothing
    runs and the first waiting sequence cannot be admitted, both release it, which frees it."""
    bm = BlockManager(num_blocks=5, block_size=2, enable_prefix_caching=False)  # 4 usable blocks
    s = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    leader = make_seq([1, 2, 3, 4, 5])
    s.add(leader)
    finish_step(s.schedule())
    c1, c2 = forked_child(s, leader, 2), forked_child(s, leader, 2)
    s.remove(leader)
    leader.status = SeqStatus.FINISHED
    first = make_seq(list(range(10, 17)))  # 7 tokens: 4 blocks
    s.add(first, front=True)
    assert bm.num_free_blocks == 2 and bm.ref_counts[c1.block_table[0]] == 2
    out = s.schedule()
    assert out.seqs == [first] and c1.block_table == [] and c2.block_table == []
    bm.check_invariants()


def test_decode_steps_scheduled_per_batch_match_the_loop_over_sequences():
    """`Scheduler._schedule_decodes` (every running sequence decodes: one pass over the batch) against `schedule`'s
    loop over the sequences (the fast path switched off) from the same start, step by step: the same sequences, the
    same blocks taken in the same order, and the same preemptions once the pool runs short (where it leaves the step
    to the loop)."""
    def run(per_batch: bool) -> list:
        bm = BlockManager(num_blocks=14, block_size=4, enable_prefix_caching=False)
        s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
        if not per_batch:
            s._schedule_decodes = lambda singles, free, decoded, removed: 0
        seqs = [make_seq(list(range(10 * i, 10 * i + n))) for i, n in enumerate((3, 5, 4, 7, 1))]
        for q in seqs:  # prompts ending at different offsets in their blocks
            s.add(q)
        history = []
        for _ in range(12):
            out = s.schedule()
            history.append(([seqs.index(q) for q in out.seqs], out.num_new_tokens, out.num_single,
                            [seqs.index(q) for q in out.preempted], [list(q.block_table) for q in s.running],
                            bm.num_free_blocks))
            finish_step(out)
        return history

    fast, loop = run(True), run(False)
    assert fast == loop
    assert any(step[3] for step in loop)  # the pool ran short: preemption happened


def test_decode_schedules_continued_after_decoded_match_the_loop_over_sequences(monkeypatch):
    """`Scheduler.decoded` (the engine's report after a step in which every scheduled sequence computed one token and
    sampled the next) lets the next schedule take each running sequence's one token to compute without reading it
    when the running list is the last schedule's less the sequences removed since. Step by step against the loop
    over sequences (and the per-batch path without the report), over steps where the running sequences outnumber
    the token budget (the last ones, a prompt still being prefilled among them, not scheduled), a removal, an
    admission, and a prompt put into the running list behind the scheduler's back; the report is taken (fewer reads)
    in most decode steps."""
    def run(mode: str) -> tuple[list, dict[int, bool]]:
        bm = BlockManager(num_blocks=60, block_size=4, enable_prefix_caching=False)
        s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
        continued: dict[int, bool] = {}  # step -> whether it took the report
        if mode == "loop":
            s._schedule_decodes = lambda singles, free, decoded, removed: 0
        else:
            check = scheduler_module.is_remainder

            def counted(running, decoded, removed):
                continued[step] = ok = check(running, decoded, removed)
                return ok

            monkeypatch.setattr(scheduler_module, "is_remainder", counted)
        seqs = [make_seq(list(range(10 * i, 10 * i + n))) for i, n in enumerate((1, 2, 1, 2, 9))]
        for q in seqs:
            s.add(q)
        history, step = [], 0
        for step in range(40):
            if step == 12:  # a sample finishes
                s.remove(seqs[1])
                seqs[1].status = SeqStatus.FINISHED
            if step == 20:  # an admission among decodes
                seqs.append(make_seq(list(range(200, 203))))
                s.add(seqs[-1])
            if step == 24:  # two finish; a prompt takes a running sequence's place behind the scheduler's back
                for q in (seqs[0], seqs[2]):
                    s.remove(q)
                    q.status = SeqStatus.FINISHED
                s.running.remove(seqs[3])  # (not through remove: the list keeps the length the report expects)
                bm.free(seqs[3])
                seqs[3].status = SeqStatus.FINISHED
                seqs.append(make_seq(list(range(300, 306))))
                seqs[-1].status = SeqStatus.RUNNING
                s.running.append(seqs[-1])
            out = s.schedule()
            history.append(([seqs.index(q) for q in out.seqs], out.num_new_tokens, out.num_single,
                            [list(q.block_table) for q in s.running], bm.num_free_blocks))
            sampled = 0
            for seq, n in zip(out.seqs, out.num_new_tokens):
                seq.num_computed_tokens += n
                if seq.num_computed_tokens == seq.num_tokens:
                    seq.token_ids.append(0)
                    sampled += 1
            if mode == "decoded" and sampled == len(out.seqs) == out.num_single:
                s.decoded()  # (as the engine's _emit_decode)
        monkeypatch.undo()
        return history, continued

    (loop, _), (per_batch, _), (decoded, continued) = run("loop"), run("per_batch"), run("decoded")
    assert decoded == loop and per_batch == loop
    assert any(len(q) == n < 5 for q, _, n, _, _ in loop[:12])  # decode steps that left a prefill out
    assert loop[24][1] == [1, 3]  # (the prompt put into the running list by hand computes 3 tokens)
    assert continued[12] and not continued[24] and sum(continued.values()) > 20  # (12: after a removal)
