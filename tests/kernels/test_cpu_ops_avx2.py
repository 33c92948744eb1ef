"""The AVX2 paths of the C++ kernels (`csrc/cpu_ops.cpp`: paged decode attention, one-row linear, greedy pick), on
any CPU that has AVX2: the engine's build takes the AVX-512 paths where the CPU has AVX-512, so the AVX2 paths are
tested through a second build of the same source with AVX-512 switched off (`cpu.isa_variant("avx2")`, ~35 s of
compiler time once, then cached), which must report that it compiled the AVX2 paths. Decode cases and reference are
test_cpu_ops.py's (GQA groups of 1-7, head dims 12-128, contexts across block boundaries and ending in partial
blocks, padding requests, shared blocks); the one-row linear's bound is test_packed_linear.py's; the greedy pick
must give torch.max's index exactly; the engine's AVX-512 sampling (16 rows abreast) must give the AVX2 build's
row-by-row tokens and log-probs bit for bit.

Tolerances: as in test_cpu_ops.py (fp16 there too: both vector paths widen fp16 rows by vcvtph2ps).
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from rl_engine.kernels import cpu, reference
from tests.kernels.test_cpu_ops import (AVAILABLE, DECODE_CASES, DECODE_TOLERANCES, REASON, argmax_cases,
                                        decode_case)
from tests.kernels.test_packed_linear import _bound, _inputs


@pytest.fixture(scope="module")
def avx2_build() -> ModuleType:
    if not AVAILABLE:
        pytest.skip(f"C++ CPU kernels unavailable: {REASON}")
    if not cpu.cpu_has_avx2():
        pytest.skip("this CPU lacks AVX2, FMA or F16C: the AVX2 path cannot run here")
    module = cpu.isa_variant("avx2")  # a build failure here is a failure, not a skip: the engine's build worked
    assert module.isa() == "avx2", f"the build with AVX-512 switched off compiled the {module.isa()} path"
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("context_lens", "block_size", "num_kv_heads", "group", "head_dim"), DECODE_CASES)
def test_avx2_paged_decode_matches_reference(avx2_build, dtype, context_lens, block_size, num_kv_heads, group,
                                             head_dim):
    args, expected = decode_case(context_lens, block_size=block_size, num_kv_heads=num_kv_heads, group=group,
                                 head_dim=head_dim, dtype=dtype)
    out = avx2_build.paged_decode_attention(*args, max(context_lens))
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out.float(), expected, **DECODE_TOLERANCES[dtype])
    assert torch.all(out[args[4] == 0] == 0)  # padding requests


def test_avx2_build_checks_block_tables_like_the_engines(avx2_build):
    cache = torch.zeros(3, 16, 1, 32)
    tables = torch.tensor([[0, 7]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache's 3 blocks"):
        avx2_build.paged_decode_attention(torch.zeros(1, 2, 32), cache, cache, tables,
                                          torch.tensor([20], dtype=torch.int32), 1.0, 20)


def test_unknown_isa_variant_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown ISA variant 'sse'; choose one of \['avx2', 'portable'\]"):
        cpu.isa_variant("sse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(96, 40), (100, 41), (7, 3), (512, 1), (24, 9), (112, 43)])
def test_avx2_one_row_linear_matches_the_exact_product(avx2_build, dtype, k, n):
    """AVX2 gemv (4 weight rows side by side, far apart, in 2 sums of 8 lanes each: K in steps of 16, then of 8,
    then the last K % 8 through a zero-padded load; the last N % 4 rows one at a time) within fp32 accumulation of
    the exact product, with bias, residual, both and neither; outside the engine's reading switch the op is
    F.linear itself."""
    x, w, b, r = _inputs(dtype, rows=1, k=k, n=n, seed=k + n)
    w = w.detach()
    exact = x.double() @ w.double().t()
    previous = avx2_build.set_reading(True)
    try:
        outs = {"bias": avx2_build.gemv(x, w, b, None), "res": avx2_build.gemv(x, w, None, r),
                "both": avx2_build.gemv(x, w, b, r), "none": avx2_build.gemv(x, w, None, None)}
    finally:
        avx2_build.set_reading(previous)
    for name, extra in [("bias", b), ("res", r), ("both", b + r), ("none", torch.zeros_like(b))]:
        want = exact + extra.double()
        assert outs[name].dtype == dtype and outs[name].shape == (1, n), name
        assert ((outs[name].double() - want).abs() <= _bound(x, w, want, dtype) * 2).all(), name
    assert torch.equal(avx2_build.gemv(x, w, b, None), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 5, 31, 32, 33, 40, 63, 64, 65, 100, 2048, 32000, 32001])
def test_avx2_greedy_pick_equals_torch_max_index(avx2_build, dtype, vocab):
    """Exactly torch.max(dim=-1)'s index (the first maximum, a NaN counting as the maximum): rows of 32+ logits take
    the AVX2 pass (4 lane sets of 8, whole vectors of the tail, the last < 8 one by one), shorter ones the portable
    pass."""
    x = argmax_cases(vocab, dtype)
    got = avx2_build.argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, reference.greedy_argmax(x))


@pytest.mark.parametrize(("rows", "vocab"), [(64, 2048), (61, 2047), (128, 101), (4, 32000), (17, 16), (5, 17),
                                             (3, 2048), (2, 33), (1, 7), (20, 1)])
def test_avx512_sampling_equals_the_row_by_row_chain(avx2_build, rows, vocab):
    """The engine's AVX-512 build samples 4+ rows in groups of 16 (each row's double sums in a lane, its token found
    from the block-end sums and one block summed again) and 1-3 rows one at a time; the AVX2 build sums every row
    in one chain. The same adds in the same order and the same fast_exp bits: identical tokens and log-probs, over
    -inf logits (zero mass), vocabularies that end inside a 16-column block, strided rows, draws of 0 and just
    below 1, and logits spread wide (a peaked row) and narrow (a flat one)."""
    engine_build = cpu.extension()
    if engine_build.isa() != "avx512":
        pytest.skip(f"the engine's build runs the {engine_build.isa()} path: the AVX2 build's row-by-row chain")
    for seed, scale in enumerate((0.01, 3.0, 30.0)):
        torch.manual_seed(rows * vocab + seed)
        z = torch.randn(rows, 2 * vocab)[:, :vocab] * scale  # rows read in place, stride 2 * vocab
        if vocab > 3:
            z[:, 0] = float("-inf")
            z[::3, 2:4] = float("-inf")
        u = torch.rand(rows, dtype=torch.float64)
        u[0] = 0.0
        u[-1] = 1.0 - 2.0**-53
        want_tokens, want_lp = avx2_build.sample_rows(z, u, True)
        tokens, lp = engine_build.sample_rows(z, u, True)
        assert torch.equal(tokens, want_tokens), (seed, torch.nonzero(tokens != want_tokens).view(-1).tolist())
        assert torch.equal(lp.view(torch.int32), want_lp.view(torch.int32)), seed
        assert torch.equal(engine_build.sample_rows(z, u, False)[0], want_tokens)


@pytest.mark.parametrize("vocab", [2, 3])
def test_avx512_sampling_masses_are_fast_exps_bits(avx2_build, vocab):
    """Rows of two or three logits within 0.7 of each other: the total mass lies in [1, 3], where one ulp of a mass
    can move the float total and so the log-prob, so a fast_exp16 that differs from fast_exp in its last bits (one
    polynomial constant 4 ulps off gave 16-17 rows of 4,096 other log-prob bits) fails here, where the wide
    vocabularies above absorb it."""
    engine_build = cpu.extension()
    if engine_build.isa() != "avx512":
        pytest.skip(f"the engine's build runs the {engine_build.isa()} path: the AVX2 build's row-by-row chain")
    torch.manual_seed(vocab)
    z = torch.zeros(4096, vocab)
    z[:, 1:] = torch.rand(4096, vocab - 1) * -0.7
    u = torch.rand(4096, dtype=torch.float64)
    want_tokens, want_lp = avx2_build.sample_rows(z, u, True)
    tokens, lp = engine_build.sample_rows(z, u, True)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(lp.view(torch.int32), want_lp.view(torch.int32)), torch.nonzero(lp != want_lp).view(-1)[:8]
