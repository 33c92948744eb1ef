"""EngineConfig.cpu_huge_pages: the CPU engine's packed weights sit in one arena advised madvise(MADV_HUGEPAGE) (the
`hg` VmFlag; Linux), and its KV pool in another, the tokens and log-probs are the bits of an engine with the switch
off, and a weight written in place after the arena was filled decodes as the new weight."""

from __future__ import annotations

import sys

import pytest
import torch

from inference_helpers import mixed_prompts, vm_flags
from rl_engine import LLM, SamplingParams
from rl_engine.inference.model_runner import KV_POOL_STAGGER
from rl_engine.kernels.cpu import host_memory, packed_linear
from rl_engine.policy import from_pretrained

KW = dict(graph_batch_sizes=[2, 4, 8], block_size=8, cpu_threads="fixed")


def _outputs(llm, prompts, params) -> list[tuple[list[int], list[float]]]:
    llm.reset_prefix_cache()
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]


def _params(temperature: float, rows: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=temperature, max_tokens=6 + i, seed=i, logprobs=0, ignore_eos=True)
            for i in range(rows)]


def _in_slot(weight) -> bool:
    entry = getattr(weight, "_rl_packed", None)
    return entry is not None and entry.slot is not None and entry.packed.data_ptr() == entry.slot.data_ptr()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_arena_is_advised_and_the_bits_are_the_same(qwen2):
    on = LLM(from_pretrained(qwen2[1], dtype=torch.float32), **KW)
    off = LLM(from_pretrained(qwen2[1], dtype=torch.float32), cpu_huge_pages=False, **KW)
    # both pools zero before any step (the huge-page one a fresh mapping, faulted in as its blocks are first reached)
    assert all(t.count_nonzero() == 0 for r in (on, off) for t in r.engine.runner.k_caches + r.engine.runner.v_caches)
    prompts = mixed_prompts(7, seed=5, max_len=30)  # 7 rows in the bucket of 8, then fewer as they stop
    for temperature in (0.0, 1.0):
        params = _params(temperature, len(prompts))
        assert _outputs(on, prompts, params) == _outputs(off, prompts, params)  # bit for bit
    runner, plain = on.engine.runner, off.engine.runner
    kv, plain_kv = runner.k_caches + runner.v_caches, plain.k_caches + plain.v_caches
    assert not any("hg" in vm_flags(t.data_ptr()) for t in plain_kv)
    if host_memory._no_huge_pages() is None:  # the KV pool: views of one advised buffer, each staggered
        assert len({t.untyped_storage().data_ptr() for t in kv}) == 1
        assert all("hg" in vm_flags(t.data_ptr()) and "hg" in vm_flags(t.data_ptr() + t.nbytes - 1) for t in kv)
        starts = [t.data_ptr() for t in kv]
        assert [b - a for a, b in zip(starts, starts[1:])] == [kv[0].nbytes + KV_POOL_STAGGER] * (len(kv) - 1)
    assert [(t.shape, t.dtype) for t in kv] == [(t.shape, t.dtype) for t in plain_kv]
    assert plain.packed_weights and all(getattr(w, "_rl_packed").slot is None for w in plain.packed_weights)
    assert not any("hg" in vm_flags(w._rl_packed.packed.data_ptr()) for w in plain.packed_weights
                   if w._rl_packed.packed is not None)
    if packed_linear._small is None or host_memory._no_huge_pages() is not None:
        assert all(getattr(w, "_rl_packed").slot is None for w in runner.packed_weights)
        pytest.skip("no small-M GEMM or no huge pages here: no arena")
    # fp32 panels: every weight read from its slot in one arena, each end of which is advised
    assert runner.packed_weights and all(_in_slot(w) for w in runner.packed_weights)
    slots = [w._rl_packed.slot for w in runner.packed_weights]
    assert len({s.untyped_storage().data_ptr() for s in slots}) == 1
    assert all("hg" in vm_flags(s.data_ptr()) and "hg" in vm_flags(s.data_ptr() + s.nbytes - 1) for s in slots)


def test_a_weight_written_in_place_decodes_as_the_new_weight(qwen2):
    """After the arena's panels were read, one weight written through `.data` (no version bump; update_weights
    invalidates) and one in place under no_grad (its version moves): the engine's tokens and log-probs are those
    of an engine without huge pages over a model loaded and changed the same way."""
    policy = from_pretrained(qwen2[1], dtype=torch.float32)
    llm = LLM(policy, **KW)
    prompts = mixed_prompts(5, seed=9, max_len=30)
    params = _params(1.0, len(prompts))
    before = _outputs(llm, prompts, params)

    def change(model):
        model.layers[0].mlp.down_proj.weight.data.mul_(4.0)
        with torch.no_grad():
            model.layers[1].self_attn.o_proj.weight.mul_(-1.5)

    llm.update_weights(change)
    after = _outputs(llm, prompts, params)
    assert after != before
    changed = policy.layers[0].mlp.down_proj.weight, policy.layers[1].self_attn.o_proj.weight
    assert all(_in_slot(w) for w in changed) or not any(_in_slot(w) for w in policy.parameters())
    reference = from_pretrained(qwen2[1], dtype=torch.float32)
    change(reference)
    assert after == _outputs(LLM(reference, cpu_huge_pages=False, **KW), prompts, params)
