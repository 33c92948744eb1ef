"""The graph lookup cache: bucket choice, O(1) table, padding that only touches the dummy block."""

from __future__ import annotations

import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.inference.block_manager import DUMMY_BLOCK
from rl_engine.inference.graph_cache import GraphCache, default_buckets


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_buckets(32) == [1, 2, 4, 8, 16, 24, 32]


def test_lookup_pads_to_smallest_bucket_and_builds_each_runner_once():
    built = []

    def make(b):
        built.append(b)
        return object()

    cache = GraphCache([8, 2, 4], make)
    assert [cache.bucket_for(b) for b in range(1, 9)] == [2, 2, 4, 4, 8, 8, 8, 8]
    assert cache.bucket_for(9) is None and cache.lookup(9) is None
    r3 = cache.lookup(3)
    assert cache.lookup(4) is r3 and cache.runner_of[3] is r3 and cache.runner_of[4] is r3
    assert cache.lookup(1) is cache.lookup(2) is not r3
    assert built == [4, 2] and cache.num_runners == 2


def test_padded_rows_write_only_the_dummy_block(qwen2, test_device):
    llm = LLM(qwen2[1], graph_batch_sizes=[8], block_size=4, device=test_device)
    engine = llm.engine
    prompts = mixed_prompts(3, seed=9, max_len=20)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # prefill (eager, exact batch)
    before = [k.clone() for k in engine.runner.k_caches]
    engine.step()  # 3 decodes padded to the bucket of 8
    positions = [(s, s.num_computed_tokens - 1) for s in engine.scheduler.running]
    slots = {s.block_table[p // 4] * 4 + p % 4 for s, p in positions}
    assert len(slots) == 3
    assert engine.runner.graphs.num_runners == 1
    for old, new in zip(before, engine.runner.k_caches):
        changed = (old != new).flatten(2).any(-1).nonzero().tolist()  # [(block, offset)]
        changed_slots = {b * 4 + o for b, o in changed}
        assert changed_slots - slots <= {DUMMY_BLOCK * 4}
        assert slots <= changed_slots


def test_outputs_do_not_depend_on_bucket_padding(qwen2, test_device):
    prompts = mixed_prompts(5, seed=10)
    params = SamplingParams(temperature=0.8, max_tokens=10, seed=3, ignore_eos=True)
    exact = LLM(qwen2[1], graph_batch_sizes=list(range(1, 9)), device=test_device).generate(prompts, params)
    padded = LLM(qwen2[1], graph_batch_sizes=[16], device=test_device).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in exact] == [o.outputs[0].token_ids for o in padded]
    diff = max((torch.tensor(a.outputs[0].logprobs) - torch.tensor(b.outputs[0].logprobs)).abs().max().item()
               for a, b in zip(exact, padded))
    assert diff <= 1e-5


def test_decode_block_tables_rewrite_only_what_changed_and_match_the_sequences():
    """`_write_block_tables` across decode steps: appended blocks, new lists (a rollback's, a readmitted
    sequence's), rows reordered and a batch that shrinks then grows (rows past it were padded) leave every row
    equal to its sequence's blocks."""
    import types

    import numpy as np

    from rl_engine.inference.model_runner import ModelRunner

    state = types.SimpleNamespace(_table_ids=np.zeros(8, dtype=np.int64), _table_widths=np.zeros(8, dtype=np.int64),
                                  _table_lists=[])
    np_tables = np.full((8, 6), -7, dtype=np.int32)
    a, b, c = [1, 2], [3], [4, 5, 6]

    def write(tables):
        ModelRunner._write_block_tables(state, np_tables, tables)
        for row, t in enumerate(tables):
            assert np_tables[row, :len(t)].tolist() == t, (row, t)

    write([a, b, c])
    a.append(7)
    write([a, b, c])
    b = [3, 9]  # a new list with another block (a rollback, a preempted sequence readmitted)
    write([a, b, c])
    write([c, a, b])  # reordered
    np_tables[1:, 0] = 0  # pad(1): rows past the batch become padding
    write([c])
    c.append(10)
    write([c, a, b])  # the rows they held before the padding: written again
    assert state._table_ids[3:].tolist() == [0] * 5


def test_capturing_a_bucket_after_decode_steps_rewrites_the_block_tables_it_padded():
    """A CUDA bucket's capture pads all its rows (`pad(0)`) in the static block tables every bucket shares; a bucket
    captured after decode steps ran must not leave the rows' recorded tables standing, or the next step would skip
    rewriting their first blocks. The capture is faked on CPU by that `pad(0)`."""
    import types

    import numpy as np

    from rl_engine.inference.graph_cache import DecodeRunner, StaticInputs
    from rl_engine.inference.model_runner import ModelRunner

    inputs = StaticInputs(8, max_blocks=4, device=torch.device("cpu"))
    runner = DecodeRunner(4, inputs=inputs, model=None, attn=types.SimpleNamespace(block_size=16))
    runner.capture = lambda pool=None: runner.pad(0)
    state = types.SimpleNamespace(_table_ids=np.zeros(8, dtype=np.int64), _table_widths=np.zeros(8, dtype=np.int64),
                                  _table_lists=[])
    tables = [[1, 2], [3], [4, 5, 6]]
    ModelRunner._write_block_tables(state, runner.np_block_tables, tables)
    assert ModelRunner._captured(state, runner, pool=None) is runner
    assert runner.np_block_tables[:3, 0].tolist() == [DUMMY_BLOCK] * 3  # the capture's padding
    ModelRunner._write_block_tables(state, runner.np_block_tables, tables)
    for row, t in enumerate(tables):
        assert runner.np_block_tables[row, :len(t)].tolist() == t, (row, t)


def test_decode_tables_are_reused_only_as_views_of_the_same_static_buffers():
    """`PagedAttention.prepare` reuses the C++ decode kernel's tables of the last step for the same block-table and
    context-length tensors and row count (a runner's static buffers, written in place): they are views, so they read
    this step's values. Tensors the tables are copies of (int64: converted), other tensors or another row count make
    them anew, so they never read a stale copy."""
    from rl_engine.inference.attention import PagedAttention

    caches = [torch.zeros(8, 4, 2, 16)]
    attn = PagedAttention(caches, [c.clone() for c in caches], first_layer=0, cpu_decode=True)

    def prepare(tables, lens, n):
        attn.prepare(slot_mapping=torch.zeros(n, dtype=torch.int64), num_single=n, block_tables=tables,
                     context_lens=lens, max_context_len=int(lens[:n].max()), prefills=[])
        return attn.decode_tables

    tables = torch.tensor([[1, 2], [3, 0], [4, 5]], dtype=torch.int32)
    lens = torch.tensor([5, 2, 7], dtype=torch.int32)
    first = prepare(tables, lens, 3)
    tables[1, 1], lens[1] = 6, 5  # the next step's rows, written in place
    again = prepare(tables, lens, 3)
    assert again is first and torch.equal(again[0], tables) and torch.equal(again[1], lens)
    two = prepare(tables, lens, 2)  # fewer rows: its own views
    assert two[0].shape[0] == two[1].shape[0] == 2 and torch.equal(two[0], tables[:2])
    wide = tables.long()  # converted to int32: a copy, made anew at every step
    copied = prepare(wide, lens, 3)
    wide[0, 0] = 7
    fresh = prepare(wide, lens, 3)
    assert fresh is not copied and fresh[0][0, 0] == 7 and copied[0][0, 0] == 1
