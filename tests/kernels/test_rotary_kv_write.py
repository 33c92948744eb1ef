"""The fused rotary + paged KV cache write (`kernels.cpu.ops.rotary_kv_write`, the C++ kernel) against the torch
reference (`reference.rotary_kv_write`: `apply_rotary` + `reshape_and_cache`) and against what it replaces in the
engine (the model's `RotaryEmbedding.rotate` and `PagedAttention.attend`'s `index_copy_`), and the engine with it.

Expected precision, from the arithmetic: the kernel computes each output as the torch ops do, fp32 products
x1 * cos and x2 * sin each rounded, then their difference or sum, then one rounding to the storage dtype; its
section of cpu_ops.cpp is compiled without contraction into fused multiply-adds (`#pragma GCC optimize`), so
with g++ (the project's compiler) every output, in every dtype, is the reference's bit for bit, and these tests
ask for that. A compiler that ignores the pragma and fuses (clang) would differ by one fp32 rounding of a
product (<= 2^-24 |x|, then at most one ulp of a bf16 / fp16 result): the tests then use those bounds.
Interleaved rotary is not a case: the engine de-interleaves such checkpoints at load (DeepSeek, GGUF), so every
rotation it applies is rotate-half (neox).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import pytest
import torch

from rl_engine.kernels import backends, cpu, reference, registry
from rl_engine.kernels.backends import BackendStatus
from rl_engine.policy.layers import RotaryEmbedding

AVAILABLE, REASON = cpu.extension_status()
needs_cpu_kernels = pytest.mark.skipif(not AVAILABLE, reason=f"C++ CPU kernels unavailable: {REASON}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _built_by_gcc() -> bool:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return False
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in version and "clang" not in version


EXACT = _built_by_gcc()
# |x| <= ~5 here: one fp32 rounding of a product is <= 2^-24 * 5 * 1; bf16 / fp16: one ulp of the result
FUSED_MULTIPLY_ADD_TOLERANCE = {torch.float32: {"atol": 1e-6, "rtol": 0.0},
                                torch.bfloat16: {"atol": 2 ** -8 * 5, "rtol": 0.0},
                                torch.float16: {"atol": 2 ** -11 * 5, "rtol": 0.0}}


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if EXACT:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, **FUSED_MULTIPLY_ADD_TOLERANCE[expected.dtype])


def _inputs(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, dtype: torch.dtype,
            seed: int = 0):
    """q, k, v as views of one fused projection output (strided rows, as the model passes them), cos / sin
    [tokens, rotary_dim // 2] of random positions (Llama's inv_freq over rotary_dim)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).mul(1.5).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    q, k, v = q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim), v.view(tokens, -1, head_dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    cos, sin = reference.rotary_cos_sin(torch.randint(0, 4096, (tokens,), generator=gen), inv_freq)
    return q, k, v, cos, sin


CASES = [  # (tokens, num_heads, num_kv_heads, head_dim, rotary_dim, block_size, slots)
    (5, 4, 4, 16, 16, 4, [3, 4, 5, 8, 0]),  # consecutive slots across a block boundary (3 | 4 5 | 8)
    (7, 8, 2, 32, 32, 16, [16, 17, 31, 32, 47, 48, -1]),  # GQA 4, boundaries, a skipped (-1) padding row
    (6, 6, 2, 12, 6, 3, [0, 2, 3, 5, 6, 17]),  # partial rotary (6 of 12 dims), group 3, odd blocks
    (3, 7, 1, 64, 64, 5, [4, 5, 9]),  # group 7, head dim 64
    (64, 8, 2, 20, 8, 16, None),  # a decode step's rows: one token in each of 64 scattered blocks
    (300, 4, 2, 16, 16, 16, None),  # a prefill: split over threads, consecutive slots
]


def _slots(case_slots, tokens: int, block_size: int, num_blocks: int) -> torch.Tensor:
    if case_slots is not None:
        return torch.tensor(case_slots)
    if tokens <= 64:
        return torch.randperm(num_blocks)[:tokens] * block_size + tokens % block_size
    return torch.arange(tokens) + block_size


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "num_heads", "num_kv_heads", "head_dim", "rotary_dim", "block_size", "slots"),
                         CASES)
def test_rotary_kv_write_matches_the_reference(dtype, tokens, num_heads, num_kv_heads, head_dim, rotary_dim,
                                               block_size, slots):
    from rl_engine.kernels.cpu.ops import rotary_kv_write

    q, k, v, cos, sin = _inputs(tokens, num_heads, num_kv_heads, head_dim, rotary_dim, dtype)
    num_blocks = 80
    slot_mapping = _slots(slots, tokens, block_size, num_blocks)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype) for _ in range(4)]
    for return_k in (False, True):
        q_rot, k_rot = rotary_kv_write(q, k, v, cos, sin, slot_mapping, caches[0], caches[1], return_k=return_k)
        q_ref, k_ref = reference.rotary_kv_write(q, k, v, cos, sin, slot_mapping, caches[2], caches[3], return_k=True)
        assert q_rot.shape == q.shape and q_rot.dtype == dtype
        assert_same(q_rot, q_ref)
        assert (k_rot is None) == (not return_k)
        if return_k:
            assert_same(k_rot, k_ref)
        assert_same(caches[0], caches[2])
        assert torch.equal(caches[1], caches[3])  # v is copied
    if rotary_dim < head_dim:  # the dims past rotary_dim pass through
        assert torch.equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])
    skipped = slot_mapping < 0
    assert torch.equal(k_rot[skipped], k_ref[skipped])  # a row without a slot still returns its rotated k
    written = torch.zeros(caches[0].shape[:2], dtype=torch.bool).view(-1)
    written[slot_mapping[~skipped]] = True
    assert torch.all(caches[0].view(-1, num_kv_heads, head_dim)[~written] == 7.0)  # nothing else is touched


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_rotary_kv_write_is_the_engines_rotary_and_cache_write(dtype, num_kv_heads):
    """What the fused op replaces: the model rotates its q|k heads with `RotaryEmbedding.rotate` (full-width
    cos and signed sin, x * cos + roll(x) * sin) and `PagedAttention.attend` index_copy_s k and v into the flat
    cache; the fused op takes the same tables' half-width views."""
    from rl_engine.kernels.cpu.ops import rotary_kv_write

    tokens, num_heads, head_dim, block_size = 9, 8, 32, 4
    q, k, v, _, _ = _inputs(tokens, num_heads, num_kv_heads, head_dim, head_dim, dtype, seed=1)
    qk = q.as_strided((tokens, num_heads + num_kv_heads, head_dim), (q.stride(0), head_dim, 1))  # the q|k heads
    rotary = RotaryEmbedding(head_dim=head_dim, max_positions=256, device=torch.device("cpu"), attention_factor=1.3)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.tensor([0, 3, 4, 5, 17, 100, 255, 300, 1])  # 300: past the table, computed rows
    slot_mapping = torch.tensor([0, 5, 6, 7, 8, 11, 12, 30, 31])  # the engine's: int64, padding to block 0
    k_cache, v_cache = (torch.zeros(10, block_size, num_kv_heads, head_dim, dtype=dtype) for _ in range(2))
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    with torch.inference_mode():
        q_rot, k_rot = rotary.rotate(qk, rotary.tables(positions, inv_freq)).split([num_heads, num_kv_heads], dim=1)
        expected_k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k_rot)
        expected_v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
        cos, sin = rotary.tables(positions, inv_freq, half_width=True)
        q_fused, k_fused = rotary_kv_write(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, return_k=True)
    assert_same(q_fused, q_rot)
    assert_same(k_fused, k_rot)
    assert_same(k_cache, expected_k_cache)
    assert torch.equal(v_cache, expected_v_cache)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "num_heads", "num_kv_heads", "head_dim", "rotary_dim", "block_size", "slots"),
                         CASES)
def test_rotary_kv_write_qkv_is_rotary_kv_write_of_the_fused_projections_views(dtype, tokens, num_heads, num_kv_heads,
                                                                              head_dim, rotary_dim, block_size, slots):
    """The extension's `rotary_kv_write_qkv` (the direct decode forward's call) takes the fused projection's output
    and its head counts: the same rotated q and cache writes as `rotary_kv_write` of its q, k and v views."""
    from rl_engine.kernels.cpu.ops import extension

    q, k, v, cos, sin = _inputs(tokens, num_heads, num_kv_heads, head_dim, rotary_dim, dtype)
    qkv = q.as_strided((tokens, (num_heads + 2 * num_kv_heads) * head_dim), (q.stride(0), 1))  # _inputs' base
    num_blocks = 80
    slot_mapping = _slots(slots, tokens, block_size, num_blocks)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype) for _ in range(4)]
    q_rot = extension().rotary_kv_write_qkv(qkv, num_heads, num_kv_heads, cos, sin, slot_mapping, caches[0], caches[1])
    q_ref, _ = extension().rotary_kv_write(q, k, v, cos, sin, slot_mapping, caches[2], caches[3], False)
    assert q_rot.shape == q.shape and torch.equal(q_rot, q_ref)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(RuntimeError, match=r"qkv must be \[tokens, \(q_heads \+ 2 kv_heads\) head_dim\]"):
        extension().rotary_kv_write_qkv(qkv[:, 1:], num_heads, num_kv_heads, cos, sin, slot_mapping, caches[0],
                                        caches[1])


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "num_heads", "num_kv_heads", "head_dim", "rotary_dim", "block_size", "slots"),
                         CASES)
def test_rotary_kv_write_qkv_at_positions_reads_the_rows_that_tables_gathers(dtype, tokens, num_heads, num_kv_heads,
                                                                             head_dim, rotary_dim, block_size, slots):
    """With `positions` (the direct decode forward's call), `rotary_kv_write_qkv` takes the whole half-width rotary
    tables (`RotaryEmbedding.half_width_table`) and reads each token's row itself: the same rotated q and cache
    writes as the call on the rows `RotaryEmbedding.tables` gathers (repeated and unsorted positions, the first
    and last rows); a position outside the tables is refused by name before anything is written."""
    from rl_engine.kernels.cpu.ops import extension

    q, k, v, _, _ = _inputs(tokens, num_heads, num_kv_heads, head_dim, rotary_dim, dtype)
    qkv = q.as_strided((tokens, (num_heads + 2 * num_kv_heads) * head_dim), (q.stride(0), 1))  # _inputs' base
    rotary = RotaryEmbedding(head_dim=rotary_dim, max_positions=200, device=torch.device("cpu"),
                             attention_factor=1.3)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    positions = torch.randint(0, 200, (tokens,), generator=torch.Generator().manual_seed(tokens))
    positions[0], positions[-1] = 199, 0
    num_blocks = 80
    slot_mapping = _slots(slots, tokens, block_size, num_blocks)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype) for _ in range(4)]
    cos, sin = rotary.tables(positions, inv_freq, half_width=True)
    cos_table, sin_table = rotary.half_width_table(positions.device, inv_freq)
    assert cos_table.shape == sin_table.shape == (200, rotary_dim // 2)
    q_at = extension().rotary_kv_write_qkv(qkv, num_heads, num_kv_heads, cos_table, sin_table, slot_mapping,
                                           caches[0], caches[1], positions)
    q_ref = extension().rotary_kv_write_qkv(qkv, num_heads, num_kv_heads, cos, sin, slot_mapping, caches[2],
                                            caches[3])
    assert torch.equal(q_at, q_ref)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    before = [c.clone() for c in caches[:2]]
    for bad in (200, -1):
        positions[tokens // 2] = bad
        with pytest.raises(RuntimeError, match=rf"position {bad} is outside the rotary tables' 200 rows"):
            extension().rotary_kv_write_qkv(qkv, num_heads, num_kv_heads, cos_table, sin_table, slot_mapping,
                                            caches[0], caches[1], positions)
        assert torch.equal(caches[0], before[0]) and torch.equal(caches[1], before[1])
    with pytest.raises(RuntimeError, match=r"positions must be a contiguous int64 \[tokens\] CPU tensor"):
        extension().rotary_kv_write_qkv(qkv, num_heads, num_kv_heads, cos_table, sin_table, slot_mapping,
                                        caches[0], caches[1], positions.to(torch.int32))


@needs_cpu_kernels
def test_rotary_kv_write_refuses_bad_input_with_a_clear_error():
    from rl_engine.kernels.cpu.ops import rotary_kv_write

    q, k, v, cos, sin = _inputs(4, 4, 2, 16, 16, torch.float32)
    slots = torch.arange(4)
    caches = [torch.zeros(2, 4, 2, 16) for _ in range(2)]
    cases = [
        (dict(k_cache=torch.zeros(2, 4, 1, 16), v_cache=torch.zeros(2, 4, 1, 16)),
         "num_kv_heads, head_dim] of the caches"),
        (dict(q=q[:3]), r"q \(3, 4, 16\) must be \[tokens=4"),
        (dict(cos=cos.double(), sin=sin.double()), "cos / sin must be float32"),
        (dict(cos=torch.zeros(4, 9), sin=torch.zeros(4, 9)), "0 < rotary_dim <= head_dim=16"),
        (dict(slot_mapping=slots.float()), "slot_mapping must be an integer tensor"),
        (dict(k_cache=caches[0].bfloat16(), v_cache=caches[1].bfloat16()), "must share a dtype"),
        (dict(slot_mapping=torch.tensor([0, 1, 2, 8])),
         r"slot_mapping holds slot 8, outside the cache's 8 slots \(2 blocks x block_size 4\)"),
        (dict(k_cache=torch.zeros(4, 2, 2, 16).transpose(0, 1)), "must be contiguous"),
    ]
    for changes, message in cases:
        args = dict(q=q, k=k, v=v, cos=cos, sin=sin, slot_mapping=slots, k_cache=caches[0], v_cache=caches[1])
        args.update(changes)
        with pytest.raises(ValueError, match=message):
            rotary_kv_write(**args)


@needs_cpu_kernels
def test_rotary_kv_write_traces_as_a_custom_op_under_torch_compile():
    """fullgraph torch.compile through the wrapper: one opaque node that writes the caches (declared mutated)."""
    from rl_engine.kernels.cpu import ops

    q, k, v, cos, sin = _inputs(6, 4, 2, 16, 16, torch.float32)
    slots = torch.tensor([1, 2, 3, 9, 10, -1])
    caches = [torch.zeros(4, 4, 2, 16) for _ in range(4)]

    def step(q, k, v, cos, sin, k_cache, v_cache):
        return ops.rotary_kv_write(q, k, v, cos, sin, slots, k_cache, v_cache, return_k=True)

    with torch.inference_mode():
        expected = step(q, k, v, cos, sin, caches[0], caches[1])
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, cos, sin, caches[2], caches[3])
    for a, b in zip(list(got) + caches[2:], list(expected) + caches[:2]):
        assert torch.equal(a, b)


@needs_cpu_kernels
def test_registry_and_engine_take_the_kernel_where_it_builds_and_log_why_not(caplog, monkeypatch):
    from rl_engine import LLM
    from rl_engine.kernels.cpu import ops
    from tests.kernels.test_paged_decode_engine_state import tiny_gqa_model

    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    resolution = registry.default_registry().resolution("rotary_kv_write", "cpu")
    assert resolution.backend == "cpu" and resolution.fn is ops.rotary_kv_write
    assert LLM(tiny_gqa_model(), max_num_seqs=2).engine.runner.attn.fuses_rotary
    # an engine serving an RL run (cpu_decode_kernel=False) keeps the torch path, as for decode attention
    assert not LLM(tiny_gqa_model(), max_num_seqs=2, cpu_decode_kernel=False).engine.runner.attn.fuses_rotary
    monkeypatch.setattr(backends, "cpu_kernels_status", lambda *_: BackendStatus(False, "no C++ compiler ('c++' not on "
                                                                                     "PATH; set CXX or install g++)"))
    registry.clear_cache()
    caplog.set_level(logging.INFO, logger="rl_engine.kernels.registry")
    llm = LLM(tiny_gqa_model(), max_num_seqs=2)
    assert not llm.engine.runner.attn.fuses_rotary
    assert any("rotary_kv_write on cpu -> torch (torch reference: C++ CPU kernels unavailable (no C++ compiler"
               in r.getMessage() for r in caplog.records)


QWEN3 = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "head_dim": 16,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
         "eos_token_id": 2}




@needs_cpu_kernels
@pytest.mark.parametrize(("model_kind", "compile_decode"),
                         [("qwen2_gqa", False), ("qwen3_qk_norm", False), ("qwen2_gqa", True)])
def test_engine_with_the_fused_write_generates_what_the_torch_path_does(model_kind, compile_decode):
    """Greedy tokens and log-probs of the engine with the fused op against the same engine with the model's
    rotary and the index_copy_ write, through prefills (fresh and over a cached prefix), shared prefix blocks,
    preemption (24 blocks for ~50 needed) and decode; eager steps bit for bit (g++), compiled steps (both
    engines compile_decode) within the compiled kernels' reordering."""
    from rl_engine import LLM, SamplingParams
    from inference_helpers import seeded_model, tiny_gqa_model
    from tests.kernels.test_paged_decode_engine_state import NUM_KV_BLOCKS

    make_model = tiny_gqa_model if model_kind == "qwen2_gqa" else lambda: seeded_model(QWEN3)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (3, 9, 17, 5)]
    prompts.append(prompts[1][:8] + [7])  # shares a block with prompt 1 (prefix caching)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    results = {}
    for backend in ("torch", "cpu"):
        registry.configure(registry.KernelConfig(overrides={"rotary_kv_write": backend}))
        llm = LLM(make_model(), block_size=4, num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=4,
                  compile_decode=compile_decode)
        assert llm.engine.runner.attn.fuses_rotary == (backend == "cpu")
        results[backend] = llm.generate(prompts, params)
        assert llm.engine.stats()["preemptions"] > 0 and llm.engine.stats()["prefix_cache_hits"] > 0
    for ours, ref in zip(results["cpu"], results["torch"]):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        logprobs, expected = torch.tensor(ours.outputs[0].logprobs), torch.tensor(ref.outputs[0].logprobs)
        if EXACT and not compile_decode:
            assert torch.equal(logprobs, expected)
        else:  # inductor compiles the torch path's rotary into its own kernels (other roundings)
            torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
