"""The C++ CPU kernels (`rl_engine.kernels.cpu`, the registry's "cpu" backend) against their torch
references, and how the registry chooses them or falls back.

Tolerances are the kernel tests' (conftest.TOLERANCES): fp32 1e-5, the same values as the reference
up to fp32 summation order (online softmax rescales by exp(m_old - m_new) per cache block, rounded
once per block: a few ulps relative on outputs of magnitude <= 4 here); bf16 2e-2: the kernels round
intermediates to bf16 where the reference does, so a result differs by at most one or two bf16 ulps
(2^-8 relative each) when its fp32 value lands on the other side of a rounding boundary; fp16 decode:
DECODE_TOLERANCES (below).
"""

from __future__ import annotations

import logging

import pytest
import torch

from rl_engine.kernels import backends, cpu, reference, registry
from rl_engine.kernels.backends import BackendStatus
from tests.kernels.conftest import TOLERANCES
from tests.kernels.test_paged_attention import make_paged_state

AVAILABLE, REASON = cpu.extension_status()
needs_cpu_kernels = pytest.mark.skipif(not AVAILABLE, reason=f"C++ CPU kernels unavailable: {REASON}")

DTYPES = [torch.float32, torch.bfloat16]
# fp16 decode (both vector paths widen fp16 rows by vcvtph2ps): fp32 math rounded once to fp16, at most half an fp16
# ulp (2^-11 relative, 4.9e-4) off the fp32 reference, plus fp32 summation order (~1e-6 absolute on outputs of
# magnitude <= 4): rtol 1e-3, atol 1e-5
DECODE_TOLERANCES = {**TOLERANCES, torch.float16: {"atol": 1e-5, "rtol": 1e-3}}

DECODE_CASES = [  # (context_lens, block_size, num_kv_heads, group, head_dim)
    ([5, 17, 1, 0, 33], 16, 2, 1, 12),  # padding request (0), lengths across block boundaries
    ([20, 20, 1, 3], 1, 1, 4, 32),  # one-token blocks, shared prefix blocks
    ([1], 16, 2, 4, 64),  # a lone one-token context
    ([40, 33, 0, 16, 15], 4, 2, 7, 20),  # odd GQA group, exact block multiples and one short
    ([257, 130], 16, 3, 2, 128),  # long contexts: many online-softmax rescales
    ([80, 9, 31], 16, 2, 2, 16),  # head dim 16 (the GRPO benchmark's tiny model)
    # the tiny model's heads at every context length 1..33: each remainder of a chunk's scores past whole vectors
    # (the vector softmax's last vector, its lanes past the context left out of the sum; the running max's last,
    # overlapping vector)
    (list(range(1, 34)), 16, 2, 2, 16),
    ([70, 31, 64, 16], 32, 2, 4, 32),  # blocks of two 16-token score tiles, the ~3.4M model's heads
    ([23, 8, 9], 8, 1, 3, 64),  # blocks shorter than a score tile
    ([19, 40, 0], 16, 2, 7, 64),  # AVX-512 passes of 4, 2 and 1 query heads of a group
    ([33, 5], 5, 1, 6, 32),  # passes of 4 and 2, blocks of an odd size
    # AVX-512's pair scores (head dim 16, pairs of query heads; every tail length 1..33 in the row above): 16-token
    # tiles two to a block, and blocks of an odd size (the rows past a block's end left out)
    ([70, 31, 64, 16, 0], 32, 2, 2, 16),
    ([45, 7, 32, 19, 16], 5, 2, 2, 16),
    ([19, 40, 0, 33, 1, 17], 16, 2, 6, 16),  # a pair pass after a 4-head pass (query heads 4-5 of each group)
]


def decode_case(context_lens: list[int], *, block_size: int, num_kv_heads: int, group: int, head_dim: int,
                dtype: torch.dtype) -> tuple[tuple, torch.Tensor]:
    """One DECODE_CASES row: the decode attention's arguments (q, k_cache, v_cache, block_tables, context_lens,
    scale) and the fp32 reference output."""
    scale = head_dim ** -0.5
    _, _, k_cache, v_cache, tables, lens = make_paged_state(
        context_lens, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
        device="cpu")
    # q as a strided view (a slice of a fused q|k projection), like the engine passes it
    qk = torch.randn(len(context_lens), num_kv_heads * group + num_kv_heads, head_dim).to(dtype)
    q = qk[:, :num_kv_heads * group]
    expected = reference.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                                scale)
    return (q, k_cache, v_cache, tables, lens, scale), expected


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize(("context_lens", "block_size", "num_kv_heads", "group", "head_dim"), DECODE_CASES)
def test_paged_decode_matches_reference(dtype, context_lens, block_size, num_kv_heads, group, head_dim):
    from rl_engine.kernels.cpu.ops import paged_decode_attention

    args, expected = decode_case(context_lens, block_size=block_size, num_kv_heads=num_kv_heads, group=group,
                                 head_dim=head_dim, dtype=dtype)
    q, k_cache, v_cache, tables, lens, scale = args
    out = paged_decode_attention(*args)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, **DECODE_TOLERANCES[dtype])
    assert torch.all(out[lens == 0] == 0)
    # the engine passes the longest context it already knows: same result
    known = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max(context_lens))
    assert torch.equal(known, out)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("block_size", [16, 8, 32, 5, 1])
@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim"), [(2, 4, 32), (2, 4, 64), (2, 2, 32), (4, 4, 32)])
def test_paged_decode_gives_a_row_the_same_bits_in_a_batch_as_alone(dtype, block_size, num_kv_heads, group,
                                                                   head_dim):
    """A batch at one thread runs a task per request over all its kv heads (AVX-512 at GQA 4 / 2 kv heads of 32:
    both heads through one chunk together, fused_chunk); a lone row at two threads, a task per kv head
    (group_chunk's passes). Same sums in the same order: the same bits, over contexts of several 64-key chunks.
    (Both paths also equal the builds before fused_chunk, whose softmax sum softmax_chunk's asm barrier keeps out of
    an FMA: checked against ebaa9d5's build over 270 cases in session 20, not here: one build cannot hold both.)"""
    from rl_engine.kernels.cpu.ops import paged_decode_attention

    context_lens = [257, 1, 15, 64, 65, 130, 0, 200, 129, 48]
    args, _ = decode_case(context_lens, block_size=block_size, num_kv_heads=num_kv_heads, group=group,
                          head_dim=head_dim, dtype=dtype)
    q, k_cache, v_cache, tables, lens, scale = args
    q = q * 4  # peaked scores: running maxima that move between chunks
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batch = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max(context_lens))
        torch.set_num_threads(2)
        for r in range(len(context_lens)):
            alone = paged_decode_attention(q[r:r + 1], k_cache, v_cache, tables[r:r + 1], lens[r:r + 1], scale,
                                           context_lens[r])
            assert torch.equal(alone, batch[r:r + 1]), (r, (alone.float() - batch[r:r + 1].float()).abs().max())
    finally:
        torch.set_num_threads(previous)


@needs_cpu_kernels
@pytest.mark.parametrize("head_dim", [8, 16, 32, 64])  # the generic kernel; the vector one's pair and GQA passes
def test_paged_decode_rejects_a_block_outside_the_cache(head_dim):
    from rl_engine.kernels.cpu.ops import paged_decode_attention

    # the bad block in the second of three rows (the vector kernel's prefetch cursor walks past it), one row empty
    cache = torch.zeros(3, 4, 1, head_dim)
    tables = torch.tensor([[0, 1], [0, 7], [2, 0]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache's 3 blocks"):
        paged_decode_attention(torch.zeros(3, 2, head_dim), cache, cache, tables,
                               torch.tensor([6, 6, 0], dtype=torch.int32), 1.0)


PREFILL_CASES = [  # (context_lens, query_lens, block_size, num_kv_heads, group, head_dim)
    ([9, 5, 16], [9, 2, 1], 4, 2, 2, 8),  # a fresh prompt, a continued chunk, one query over a cached prefix
    ([70, 31, 64, 16, 128], [70, 31, 64, 16, 128], 16, 2, 4, 32),  # fresh prompts, the ~3.5M model's heads
    ([100, 40, 3, 57], [36, 40, 3, 9], 16, 2, 4, 64),  # the ~40M model's heads, chunks over shared blocks
    ([3, 0, 21], [3, 0, 5], 4, 1, 3, 12),  # a request without queries, a head dim that is no multiple of 16
    # contexts over several 128-key blocks (online softmax across them), query tiles of 32 across block edges
    ([300, 200, 129, 17], [300, 61, 1, 17], 16, 2, 4, 64),
    ([260, 33], [259, 33], 8, 3, 1, 80),  # no GQA group, a head dim of 5 vectors
]


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("context_lens", "query_lens", "block_size", "num_kv_heads", "group", "head_dim"),
                         PREFILL_CASES)
def test_paged_prefill_matches_reference(assert_close, dtype, context_lens, query_lens, block_size, num_kv_heads,
                                         group, head_dim):
    """Every request's chunk in one call: the queries are the last query_lens[i] of context_lens[i] cached tokens
    (shuffled blocks, requests 0 and 1 sharing prefix blocks); q rows past the last request's get zeros."""
    from rl_engine.kernels.cpu.ops import paged_prefill_attention

    scale = head_dim ** -0.5
    _, _, k_cache, v_cache, tables, lens = make_paged_state(
        context_lens, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
        device="cpu")
    cu = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    # q as a strided view of a fused projection, with two padding rows past the last request's queries
    qk = torch.randn(sum(query_lens) + 2, num_kv_heads * (group + 1), head_dim).to(dtype)
    q = qk[:, :num_kv_heads * group]
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale)
    expected = reference.paged_prefill_attention(q.float(), k_cache.float(), v_cache.float(), tables, cu, lens,
                                                 scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype)
    assert torch.all(out[-2:] == 0)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_gives_a_query_the_same_bits_however_its_prompt_is_chunked(dtype):
    """A query's output depends on its position and its keys only, not on the chunk it comes in, the other
    chunks of the call or where the chunk starts: the engine's chunked prefill, prefix-cache hits and preemption
    recompute then give one prompt the same bits (key blocks are taken from key 0, rows are not mixed). A
    300-token prompt (past two 128-key blocks) whole, against the same queries in chunks of 37 / 150 / 113
    (three calls over the cache, each chunk's context its end), and beside another request in one call."""
    from rl_engine.kernels.cpu.ops import paged_prefill_attention

    _, _, k_cache, v_cache, tables, lens = make_paged_state([300, 90], block_size=16, num_kv_heads=2, head_dim=64,
                                                            dtype=dtype, device="cpu", shared_prefix_blocks=0)
    q = torch.randn(300 + 90, 8, 64).to(dtype)
    scale = 0.125

    def call(chunks):  # [(request, first query position, count)] -> the output rows
        rows = torch.cat([q[(0 if r == 0 else 300) + a:(0 if r == 0 else 300) + a + n] for r, a, n in chunks])
        cu = torch.tensor([0] + [n for _, _, n in chunks]).cumsum(0).to(torch.int32)
        ctx = torch.tensor([a + n for _, a, n in chunks], dtype=torch.int32)
        return paged_prefill_attention(rows, k_cache, v_cache, tables[[r for r, _, _ in chunks]], cu, ctx, scale)

    whole = call([(0, 0, 300)])
    pieces = torch.cat([call([(0, 0, 37)]), call([(0, 37, 150)]), call([(0, 187, 113)])])
    assert torch.equal(pieces, whole)
    beside = call([(1, 0, 90), (0, 0, 300)])[90:]
    assert torch.equal(beside, whole)


@needs_cpu_kernels
def test_paged_prefill_rejects_a_block_outside_the_cache():
    from rl_engine.kernels.cpu.ops import paged_prefill_attention

    cache = torch.zeros(4, 4, 1, 8)
    tables = torch.tensor([[1, 9]], dtype=torch.int32)  # block 9 of a 4-block cache
    with pytest.raises(ValueError, match="paged_prefill_attention: .*outside"):
        paged_prefill_attention(torch.zeros(6, 2, 8), cache, cache, tables, torch.tensor([0, 6], dtype=torch.int32),
                                torch.tensor([6], dtype=torch.int32), 0.5)


@needs_cpu_kernels
def test_kernels_trace_as_custom_ops_under_torch_compile():
    """fullgraph torch.compile through the wrapper: dynamo failed in the cpp_extension loader ("marked as
    skipped") before the kernels were custom ops; the traced op runs the same kernel, so the result equals
    the eager call's."""
    from rl_engine.kernels.cpu import ops

    torch.manual_seed(2)
    _, _, k_cache, v_cache, tables, lens = make_paged_state([5, 17, 1], block_size=4, num_kv_heads=2,
                                                            head_dim=32, dtype=torch.float32, device="cpu")
    q = torch.randn(3, 4, 32)

    def step(q):
        return ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125, 17)

    with torch.inference_mode():
        expected = step(q)
        got = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)(q)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def argmax_cases(vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that test the tie and NaN rules: random, all equal, two NaNs, all -inf, a tie at the top in the
    middle and at the end, +inf near the end, a tie between a row's main loop and its tail."""
    x = torch.randn(8, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    if vocab >= 4:
        x[1] = 0.5
        x[2, 3], x[2, vocab - 1] = float("nan"), float("nan")
        x[3] = float("-inf")
        x[4, vocab // 2], x[4, vocab - 1] = 100.0, 100.0
        x[5, vocab - 2] = float("inf")
        x[6, vocab // 3], x[6, vocab - vocab % 64 - 1], x[6, vocab - 1] = 7.0, 9.0, 9.0
    return x


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 16, 63, 64, 65, 100, 2048, 32000, 32001])
def test_greedy_argmax_equals_torch_max_index(dtype, vocab):
    """Exactly torch.max(dim=-1)'s index: the first maximum, a NaN counting as the maximum (the AVX-512 pass
    takes rows of 64+ logits, in lane sets and a tail; shorter rows take the portable pass)."""
    from rl_engine.kernels.cpu.ops import greedy_argmax

    x = argmax_cases(vocab, dtype)
    got = greedy_argmax(x)
    assert got.dtype == torch.int64 and torch.equal(got, reference.greedy_argmax(x))
    wide = torch.cat([x, x], dim=1)[:, :vocab]  # rows vocab * 2 apart: read in place
    assert not wide.is_contiguous() and torch.equal(greedy_argmax(wide), reference.greedy_argmax(x))


@needs_cpu_kernels
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_greedy_argmax_refuses_rows_past_int32_lane_indices(isa):
    """2^31 columns (a stride-0 view: nothing allocated) are refused by name before anything is read; the wrapper
    sends rows wider than ARGMAX_MAX_COLUMNS to the reference without calling the kernel."""
    if isa == "avx2" and not cpu.cpu_has_avx2():
        pytest.skip("this CPU lacks AVX2, FMA or F16C")
    module = cpu.extension() if isa == "native" else cpu.isa_variant(isa)
    wide = torch.zeros(1, 1).expand(2, 2**31)
    with pytest.raises(RuntimeError, match=r"shape \[2, 2147483648\] need 1 \.\. 2\^31 - 1 columns"):
        module.argmax_rows(wide)
    widest = torch.zeros(1, 1).expand(2, 2**31 - 1)  # accepted by the shape check, refused for its stride 0
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        module.argmax_rows(widest)


def test_greedy_argmax_sends_rows_past_its_limit_to_the_reference(monkeypatch):
    from rl_engine.kernels.cpu import ops

    def no_kernel():
        raise AssertionError("the C++ kernel was called")

    monkeypatch.setattr(ops, "ARGMAX_MAX_COLUMNS", 39)
    monkeypatch.setattr(ops, "extension", no_kernel)
    x = argmax_cases(40, torch.float32)
    assert torch.equal(ops.greedy_argmax(x), reference.greedy_argmax(x))


def test_greedy_argmax_other_inputs_give_the_reference_result():
    from rl_engine.kernels.cpu.ops import greedy_argmax

    x = torch.randn(3, 40)
    for other in (x.half(), x[0], x.t()):  # fp16, one row (1-D), a transposed view
        assert torch.equal(greedy_argmax(other), reference.greedy_argmax(other))


@needs_cpu_kernels
@pytest.mark.parametrize("rows,vocab,scale", [(128, 101, 3.0), (64, 2048, 5.0), (4, 32000, 8.0), (3, 1, 1.0),
                                              (9, 7, 0.01)])
def test_inverse_cdf_sample_matches_the_reference(rows, vocab, scale):
    """The reference's draws: a token may differ only where the draw lies within the kernel's exp rounding
    (fast_exp, a few ulp; the cumulative mass rounded to fp32 either way) of a boundary between two tokens, so
    each differing token's cumulative mass under the reference is within 1e-5 (relative) of the draw's target;
    log-probs within 1e-5 (values up to ~100 here, fp32: ~1e-5 is a few ulp). -inf logits are never drawn."""
    from rl_engine.kernels.cpu.ops import inverse_cdf_sample

    torch.manual_seed(rows * vocab)
    z = torch.randn(rows, vocab) * scale
    if vocab > 1:
        z[:, 0] = float("-inf")  # a padded vocabulary row: zero mass
    u = torch.rand(rows, dtype=torch.float64)
    u[0] = 0.0
    want, want_lp = reference.inverse_cdf_sample(z, u)
    got, got_lp = inverse_cdf_sample(z, u)
    assert got.dtype == torch.int64 and got.shape == (rows,) and got_lp.dtype == torch.float32
    assert vocab == 1 or (got > 0).all()
    cdf = (z - z.amax(-1, keepdim=True)).exp().cumsum(-1)
    target = u.float() * cdf[:, -1]
    for r in torch.nonzero(got != want).view(-1).tolist():
        lo = min(int(got[r]), int(want[r]))
        assert abs(float(cdf[r, lo]) - float(target[r])) <= 1e-5 * float(cdf[r, -1]), (r, got[r], want[r])
    same = got == want
    assert same.float().mean() > 0.9
    assert (got_lp[same] - want_lp[same]).abs().max() <= 1e-5
    tokens, no_lp = inverse_cdf_sample(z, u, logprobs=False)
    assert torch.equal(tokens, got) and no_lp is None
    wide = torch.cat([z, z], dim=1)[:, :vocab]  # rows read in place
    assert torch.equal(inverse_cdf_sample(wide, u)[0], got)


def test_the_reference_draw_takes_host_uniforms_for_logits_on_another_device():
    """The sampler's uniforms come from the host (numpy); a CUDA engine's logits do not (no CPU kernel there, so the
    reference runs): it moves them to the logits' device, where it multiplied a host tensor by a device one. The meta
    device stands in for CUDA here (it refuses the mix as CUDA does)."""
    z, u = torch.randn(3, 10, device="meta"), torch.rand(3, dtype=torch.float64)
    tokens, logprobs = reference.inverse_cdf_sample(z, u)
    assert tokens.device.type == logprobs.device.type == "meta" and tokens.shape == logprobs.shape == (3,)


def test_inverse_cdf_sample_other_inputs_give_the_reference_result():
    from rl_engine.kernels.cpu.ops import inverse_cdf_sample

    z, u = torch.randn(3, 40), torch.rand(3, dtype=torch.float64)
    for other in (z.double(), z.bfloat16()):  # fp32 only: any other dtype takes the reference
        for a, b in zip(inverse_cdf_sample(other, u), reference.inverse_cdf_sample(other, u)):
            assert torch.equal(a, b)


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [0, 1, 7, 128, 1000])
def test_token_uniforms_at_are_numpys_bit_for_bit(rows):
    """The C++ seeded uniforms equal the numpy form's bits (and `token_seed(...) / 2**63`, the per-token
    definition) over seeds across the whole uint64 range (the largest included), sample indices and positions up
    to 2**40, from a decode step's int64 lengths or a list of ints."""
    import numpy as np

    from rl_engine.inference.sampler import token_seed, token_uniform_base, token_uniforms_at
    from rl_engine.kernels.cpu.ops import token_uniforms_at as kernel

    rng = np.random.default_rng(rows)
    seeds = [int(s) for s in rng.integers(0, 2**63, rows, dtype=np.int64) * 2 + rng.integers(0, 2, rows)]
    seeds[:1] = [2**64 - 1][:rows]
    indices = [int(i) for i in rng.integers(0, 64, rows)]
    positions = rng.integers(0, 2**40, rows, dtype=np.int64)
    base = token_uniform_base(seeds, indices)
    want = token_uniforms_at(base, positions)
    got = kernel(base, positions)
    assert got.dtype == np.float64 and np.array_equal(got.view(np.uint64), want.view(np.uint64))
    assert np.array_equal(kernel(base, positions.tolist()).view(np.uint64), want.view(np.uint64))
    for r in range(min(rows, 16)):
        assert got[r] == token_seed(seeds[r], indices[r], int(positions[r])) / 2.0**63
    assert ((got >= 0) & (got < 1)).all()


def test_token_uniforms_at_other_inputs_give_the_numpy_result():
    """A base that is not a 1-D uint64 array (or positions of another length) takes the numpy form, which names
    the problem or computes what it computes."""
    import numpy as np

    from rl_engine.inference.sampler import token_uniform_base, token_uniforms_at
    from rl_engine.kernels.cpu.ops import token_uniforms_at as kernel

    base = token_uniform_base([3, 5], [0, 1])
    assert np.array_equal(kernel(base.reshape(2, 1), [[7], [9]]), token_uniforms_at(base.reshape(2, 1), [[7], [9]]))
    with pytest.raises(ValueError):
        kernel(base, [1, 2, 3])


@needs_cpu_kernels
@pytest.mark.parametrize("rows,vocab", [(128, 101), (7, 2048), (1, 3)])
def test_seeded_inverse_cdf_sample_is_the_two_calls_in_one(rows, vocab):
    """The seeded draw and pick in one C++ call give token_uniforms_at's uniforms through inverse_cdf_sample: the
    same tokens and log-probs, bit for bit, from a decode step's int32 lengths or a list; logits the kernel does not
    take (bf16) give the reference's result."""
    import numpy as np

    from rl_engine.inference.sampler import seeded_inverse_cdf_sample as reference_form
    from rl_engine.inference.sampler import token_uniform_base
    from rl_engine.kernels.cpu.ops import inverse_cdf_sample, seeded_inverse_cdf_sample, token_uniforms_at

    rng = np.random.default_rng(rows)
    base = token_uniform_base([int(s) for s in rng.integers(0, 2**62, rows)], list(range(rows)))
    positions = rng.integers(0, 5000, rows).astype(np.int32)
    torch.manual_seed(vocab)
    z = torch.randn(rows, vocab) * 3
    want = inverse_cdf_sample(z, torch.as_tensor(token_uniforms_at(base, positions)))
    for pos in (positions, positions.tolist()):
        got = seeded_inverse_cdf_sample(z, base, pos)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    tokens, no_lp = seeded_inverse_cdf_sample(z, base, positions, logprobs=False)
    assert torch.equal(tokens, want[0]) and no_lp is None
    for a, b in zip(seeded_inverse_cdf_sample(z.bfloat16(), base, positions),
                    reference_form(z.bfloat16(), base, positions)):
        assert torch.equal(a, b)


@needs_cpu_kernels
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_continue_decode_inputs_are_numpys(block_size):
    """A continued decode step's inputs by the C++ pass equal the numpy form's (the runner's arrays, every element, and
    the returned positions and block tables: values, dtypes, shapes) over batches with and without stopped rows (the
    first, the last, several), rows whose new position starts a block (widening the tables or not) and rows that
    do not; rows past the batch are left as they were."""
    from types import SimpleNamespace

    import numpy as np

    from rl_engine.inference.model_runner import continue_decode_inputs as numpy_form
    from rl_engine.kernels.cpu.ops import continue_decode_inputs as kernel

    rng = np.random.default_rng(block_size)
    for case in range(60):
        m, w = int(rng.integers(3, 40)), int(rng.integers(1, 5))
        positions = np.sort(rng.integers(0, w * block_size, m))  # (rows sorted by position, as the runner's)
        if case % 2:
            positions[-1] = w * block_size - 1  # the last row's next position starts a block past the tables
        tables = rng.integers(1, 1000, (m, w)).astype(np.int32)
        stopped = [[], [0], [m - 1], sorted(rng.choice(m, m // 3, replace=False).tolist())][case % 4]
        kept = [i for i in range(m) if i not in stopped]
        seqs = [SimpleNamespace(block_table=tables[i].tolist() + rng.integers(1, 1000, 2).tolist()) for i in kept]
        tokens = rng.integers(0, 100, m).tolist()
        results = []
        for form in (numpy_form, kernel):
            arrays = [np.full(48, -7, np.int64), np.full(48, -7, np.int64), np.full(48, -7, np.int32),
                      np.full(48, -7, np.int64), np.full((48, 8), -7, np.int32)]
            new_positions, new_tables = form(tokens, stopped, positions.copy(), tables.copy(), seqs, block_size,
                                             *arrays)
            results.append((new_positions, new_tables, arrays))
        (want_p, want_t, want_a), (got_p, got_t, got_a) = results
        for got, want in ((got_p, want_p), (got_t, want_t), *zip(got_a, want_a)):
            assert got.dtype == want.dtype and np.array_equal(got, want), case
        assert (want_a[1][:len(kept)] == positions[kept] + 1).all()


@needs_cpu_kernels
def test_registry_picks_the_cpu_kernels_when_asked_and_logs_why(caplog, monkeypatch):
    from rl_engine.kernels.cpu import ops

    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    assert registry.default_registry().resolution("apply_rotary", "cpu").backend == "torch"  # no C++ kernel
    registry.configure(registry.KernelConfig(overrides={"*": "cpu"}))
    assert registry.resolve("paged_decode_attention", "cpu") is ops.paged_decode_attention
    assert registry.resolve("apply_rotary", "cpu") is reference.apply_rotary  # it has no C++ kernel
    registry.configure(registry.KernelConfig())
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    caplog.set_level(logging.INFO, logger="rl_engine.kernels.registry")
    for op in ("paged_decode_attention", "greedy_argmax"):
        resolution = registry.default_registry().resolution(op, "cpu")
        assert resolution.backend == "cpu" and resolution.fn is getattr(ops, op)
        assert "C++ CPU kernel" in resolution.reason
    assert registry.resolve("apply_rotary", "cpu") is reference.apply_rotary
    assert any("greedy_argmax on cpu -> cpu" in r.getMessage() for r in caplog.records)
    registry.configure(registry.KernelConfig(disabled_backends=("cpu",)))
    resolution = registry.default_registry().resolution("rms_norm", "cpu")
    assert resolution.backend == "torch" and "disabled by config" in resolution.reason


def test_registry_falls_back_to_torch_with_the_reason(monkeypatch):
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    monkeypatch.setattr(backends, "cpu_kernels_status",
                        lambda *_: BackendStatus(False, "no C++ compiler ('c++' not on PATH; set CXX or install g++)"))
    registry.clear_cache()
    resolution = registry.default_registry().resolution("paged_decode_attention", "cpu")
    assert resolution.backend == "torch" and resolution.fn is reference.paged_decode_attention
    assert "C++ CPU kernels unavailable (no C++ compiler" in resolution.reason
    with pytest.raises(ValueError, match="cannot run on cpu: no C\\+\\+ compiler"):
        registry.configure(registry.KernelConfig(overrides={"rms_norm": "cpu"}))
        registry.resolve("rms_norm", "cpu")


def test_batch_invariant_mode_keeps_its_own_kernels(monkeypatch):
    monkeypatch.setenv(cpu.ENV_SWITCH, "1")
    registry.configure(registry.KernelConfig(batch_invariant=True))
    resolution = registry.default_registry().resolution("paged_decode_attention", "cpu")
    assert resolution.backend == "torch" and "batch-invariant" in resolution.reason
    assert resolution.fn.__module__ == "rl_engine.kernels.invariant"


def test_loader_reports_a_missing_compiler_and_the_switch(monkeypatch):
    """The build is skipped, with a reason a person can act on (the cached loader is bypassed)."""
    monkeypatch.setenv("CXX", "no-such-compiler-rl-engine")
    module, reason = cpu.load_source.__wrapped__(cpu.SOURCE)
    assert module is None and "'no-such-compiler-rl-engine' not on PATH" in reason
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    module, reason = cpu.load_source.__wrapped__(cpu.SOURCE)
    assert module is None and reason == f"disabled by {cpu.ENV_SWITCH}=0"


def test_a_failed_build_falls_back_with_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    module, reason = cpu.load_source.__wrapped__(broken)
    assert module is None and reason.startswith("build failed (")


def test_a_build_lock_left_by_a_dead_builder_does_not_hang_the_next_load(tmp_path):
    """torch's build lock (a `lock` file in the extension's build directory) left by a builder that died
    mid-build is removed by the next load_source, which holds an flock no dead process can hold, and the
    build runs: here a broken source, so it fails at once. Before, every later load waited for the file
    forever; the child's timeout turns such a regression into a failure instead of a hung suite."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: load_source never reaches a build")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    env = {k: v for k, v in os.environ.items() if k != cpu.ENV_SWITCH}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    code = ("import sys; from pathlib import Path; from torch.utils import cpp_extension; from rl_engine.kernels import cpu; "
            "src = Path(sys.argv[1]); d = cpp_extension._get_build_directory(cpu.extension_name(src), verbose=False); "
            "open(d + '/lock', 'w').close(); print(cpu.load_source(src)[1])")
    out = subprocess.run([sys.executable, "-c", code, str(broken)], env=env, capture_output=True, text=True,
                         timeout=240, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("build failed ("), out.stdout


@needs_cpu_kernels
def test_engines_decode_with_the_cpp_kernel_by_default_and_rl_engines_with_torch(monkeypatch):
    """The C++ paged decode attention is the CPU default; an engine built with cpu_decode_kernel=False (those
    serving an RL run) keeps the torch path unless the kernel is asked for explicitly."""
    from rl_engine import LLM
    from tests.kernels.test_paged_decode_engine_state import tiny_gqa_model

    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    model = tiny_gqa_model()
    assert LLM(model, max_num_seqs=2).engine.runner.attn.cpu_decode
    assert not LLM(model, max_num_seqs=2, cpu_decode_kernel=False).engine.runner.attn.cpu_decode
    for request in ({"overrides": {"paged_decode_attention": "cpu"}}, {"env": "1"}):
        registry.configure(registry.KernelConfig(overrides=request.get("overrides", {})))
        if "env" in request:
            monkeypatch.setenv(cpu.ENV_SWITCH, request["env"])
        assert LLM(model, max_num_seqs=2, cpu_decode_kernel=False).engine.runner.attn.cpu_decode, request


def test_an_rl_engine_does_not_probe_the_cpp_decode_kernel(monkeypatch):
    """An engine built with cpu_decode_kernel=False (and the kernel not asked for) never loads cpu_ops.cpp,
    the C++ paged decode attention's extension: loading it builds it first on a cold cache (~30-60 s in
    every process of an RL run, for a kernel none of them uses). The model's packed training attention
    (varlen_attention.cpp, a CPU default) is probed from its own source, which the trainer runs."""
    from rl_engine import LLM
    from tests.kernels.test_paged_decode_engine_state import tiny_gqa_model

    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    registry.clear_cache()
    loaded = []
    real_load = cpu.load_source

    def load(source, **kwargs):
        loaded.append(source.name)
        return real_load(source, **kwargs)

    monkeypatch.setattr(cpu, "load_source", load)
    llm = LLM(tiny_gqa_model(), max_num_seqs=2, cpu_decode_kernel=False)
    assert not llm.engine.runner.attn.cpu_decode
    assert cpu.SOURCE.name not in loaded, loaded


@needs_cpu_kernels
@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])
def test_engine_with_the_cpp_kernels_generates_what_the_torch_engine_does(max_num_batched_tokens):
    """Greedy tokens equal and sampled-token log-probs within fp32 reordering, through the engine's
    decode (C++ paged attention over shuffled, shared and preempted blocks), its prefill (every chunk of a
    step in one C++ call: whole prompts, or chunks of at most 7 tokens over their cached prefix) and the
    model's norms."""
    from rl_engine import LLM, SamplingParams
    from tests.kernels.test_paged_decode_engine_state import NUM_KV_BLOCKS, tiny_gqa_model

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (3, 9, 17, 5)]
    prompts.append(prompts[1][:8] + [7])  # shares a block with prompt 1 (prefix caching)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    results = {}
    for name, overrides in (("torch", {"*": "torch"}), ("cpp", {"*": "cpu"})):
        registry.configure(registry.KernelConfig(overrides=overrides))
        llm = LLM(tiny_gqa_model(), block_size=4, num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=4,
                  max_num_batched_tokens=max_num_batched_tokens)
        assert llm.engine.runner.attn.cpu_decode == (name == "cpp")
        assert (llm.engine.runner.attn.prefill_op is not None) == (name == "cpp")
        results[name] = llm.generate(prompts, params)
    for ours, ref in zip(results["cpp"], results["torch"]):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(ours.outputs[0].logprobs), torch.tensor(ref.outputs[0].logprobs),
                                   atol=1e-5, rtol=0)


def test_the_cache_name_covers_the_shared_headers(tmp_path):
    """A source's build is named by a hash that includes csrc/'s headers (fast_exp.h): an edited header
    must rebuild every source that includes it, not load the stale build of the unchanged .cpp."""
    source, header = tmp_path / "kernel.cpp", tmp_path / "shared.h"
    source.write_text('#include "shared.h"\n')
    header.write_text("// one\n")
    before = cpu.extension_name(source)
    header.write_text("// two\n")
    assert cpu.extension_name(source) != before


def test_a_clang_build_contracts_only_within_expressions_so_the_rotary_pragma_holds(monkeypatch):
    """The rotary sections (rotary_kv_write, rotary_full) are bit-equal to torch only without fused multiply-adds:
    g++ takes GCC's optimize pragma there under -ffp-contract=fast; clang ignores it, and its `#pragma clang fp
    contract(off)` too under fast (a clang-14 build under fast: 4 of 22 rotary cases not bit-equal), so a clang
    build gets -ffp-contract=on, which honours that pragma (the same cases all bit-equal). The build's cache name
    follows the flags: a clang build never loads a g++ build of the same source, nor the other way."""
    monkeypatch.setattr(cpu, "_is_clang", lambda compiler: False)
    assert cpu.build_flags() == cpu.CFLAGS and "-ffp-contract=fast" in cpu.CFLAGS
    gcc_name = cpu.extension_name(cpu.SOURCE)
    monkeypatch.setattr(cpu, "_is_clang", lambda compiler: True)
    assert cpu.build_flags() == tuple("-ffp-contract=on" if f == "-ffp-contract=fast" else f for f in cpu.CFLAGS)
    assert cpu.extension_name(cpu.SOURCE) != gcc_name


@pytest.mark.parametrize("compiler", ["g++", "clang++", "clang++-14"])
def test_the_compiler_probe_tells_clang_from_gcc(compiler):
    import shutil

    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    assert cpu._is_clang(compiler) == compiler.startswith("clang")
