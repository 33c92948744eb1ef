"""The paged-decode kernels against the engine's own torch attention, on a real engine state.

The engine runs a tiny GQA model with a KV pool far too small for its requests (so sequences are
preempted and recomputed into whatever blocks are free) and prompts that share a prefix, with prefix
caching and `n` samples per prompt (so block tables point at shared blocks). The attention's
`decode_observer` records decode calls as they happen: q, the layer's whole K/V pool, the block
tables and context lengths the engine used, and the engine's output. The Triton kernel (in the
interpreter on CPU) and the torch reference must reproduce that output from the same state.
"""

from __future__ import annotations

import pytest
import torch

from inference_helpers import tiny_gqa_model
from rl_engine import LLM, SamplingParams
from rl_engine.kernels import reference

BLOCK_SIZE = 4
NUM_KV_BLOCKS = 24  # 23 usable blocks; the requests below need ~50 at their longest


def max_sharing(tables: torch.Tensor, lens: torch.Tensor) -> int:
    """The most rows of one step that read a common (non-dummy) block."""
    counts: dict[int, int] = {}
    for i, n in enumerate(lens.tolist()):
        for b in set(tables[i, :-(-n // BLOCK_SIZE)].tolist()) - {0}:
            counts[b] = counts.get(b, 0) + 1
    return max(counts.values(), default=0)


@pytest.fixture(scope="module")
def engine_run() -> tuple[list[dict], dict]:
    """Decode calls recorded after the first preemption in which more than the 2 samples of one
    prompt read a common block (so prefix-cache sharing between prompts), and the engine's stats."""
    llm = LLM(tiny_gqa_model(), block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=6,
              enable_prefix_caching=True)
    engine = llm.engine
    captured: list[dict] = []

    def observe(layer, q, k_cache, v_cache, block_tables, context_lens, scale, out):
        if len(captured) >= 6 or not engine.scheduler.num_preemptions or q.shape[0] < 2:
            return
        if max_sharing(block_tables, context_lens) < 3:
            return
        captured.append({"layer": layer, "q": q.clone(), "k_cache": k_cache.clone(), "v_cache": v_cache.clone(),
                         "block_tables": block_tables.clone(), "context_lens": context_lens.clone(),
                         "scale": scale, "out": out.clone()})

    engine.runner.attn.decode_observer = observe
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 64, (10,), generator=g).tolist()
    # Six prompts, two samples each, six sequences at a time: later prompts find the common prefix
    # in the prefix cache, and the pool holds only about half of what the running ones need.
    prompts = [prefix + torch.randint(3, 64, (int(k),), generator=g).tolist() for k in (1, 3, 5, 6, 2, 4)]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=24, ignore_eos=True, seed=5)
    outs = llm.generate(prompts, params)
    assert all(len(c.token_ids) == 24 for o in outs for c in o.outputs)
    return captured, engine.stats()


def test_engine_state_has_preemption_prefix_hits_and_shared_blocks(engine_run):
    captured, stats = engine_run
    assert stats["preemptions"] > 0, stats
    assert stats["prefix_cache_hits"] > 0, stats
    assert captured, "no decode step after a preemption had 3 rows sharing a block"
    tables = captured[-1]["block_tables"]
    lens = captured[-1]["context_lens"]
    # A real paged state: some row's blocks are not one consecutive run of the pool.
    runs = [tables[i, :-(-int(n) // BLOCK_SIZE)].tolist() for i, n in enumerate(lens)]
    assert any(r != list(range(r[0], r[0] + len(r))) for r in runs if len(r) > 1)


def test_reference_decode_matches_engine_attention_on_engine_state(engine_run):
    captured, _ = engine_run
    assert captured
    for s in captured:
        out = reference.paged_decode_attention(s["q"], s["k_cache"], s["v_cache"], s["block_tables"],
                                               s["context_lens"], s["scale"])
        torch.testing.assert_close(out, s["out"], atol=1e-5, rtol=1e-5)


def test_triton_decode_matches_engine_attention_on_engine_state(engine_run, triton_device, assert_close):
    from rl_engine.kernels.triton.paged_attention import paged_decode_attention

    captured, _ = engine_run
    assert captured
    for s in captured[:3]:  # the interpreter is slow; three steps cover both layers
        to = lambda t: t.to(triton_device)  # noqa: E731
        out = paged_decode_attention(to(s["q"]), to(s["k_cache"]), to(s["v_cache"]), to(s["block_tables"]),
                                     to(s["context_lens"]), s["scale"])
        assert_close(out, s["out"], torch.float32)
