"""The C++ batch-invariant attention (csrc/invariant_attention.cpp through kernels/invariant.py): within an
analysed bound of float64 attention, a query's bits the same in paged decode, chunked prefill (any chunk
size), full prefill and the trainer's packed varlen path among other sequences (1 and 2 threads, GQA, a
head dim that is not a multiple of the 16 lanes), bad block tables refused, gradients close to plain
attention's, and the torch implementation everywhere when the kernel cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from rl_engine.kernels import cpu as cpu_kernels
from rl_engine.kernels import invariant as inv

pytestmark = pytest.mark.skipif(not inv.native_attention("cpu"), reason="the C++ invariant attention did not build")

SCALE = 0.37
BLOCK = 16


def _sequence(dtype, length=150, hq=6, hkv=2, d=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(length, hq, d, generator=gen)).to(dtype)
    k, v = (torch.randn(length, hkv, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


def _paged(k, v, *, seed=1):
    """k/v [L, Hkv, D] written into a cache of scattered blocks (block 0 unused): caches, table [1, nb]."""
    blocks = -(-k.shape[0] // BLOCK)
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)) + 1
    k_cache = torch.full((blocks + 1, BLOCK, *k.shape[1:]), float("nan"), dtype=k.dtype)  # unread
    v_cache = k_cache.clone()
    for pos in range(k.shape[0]):
        k_cache[table[pos // BLOCK], pos % BLOCK] = k[pos]
        v_cache[table[pos // BLOCK], pos % BLOCK] = v[pos]
    return k_cache, v_cache, table[None].int()


def _exact(q, k, v, scale):
    """float64 causal attention of q [n, Hq, D] at positions 0..n-1 over k, v; also sum_t p_t |v_t|
    and the terms the bound needs."""
    n, hq, d = q.shape
    g = hq // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = torch.einsum("nhd,lhd->hnl", qd, kd) * scale
    visible = torch.arange(k.shape[0])[None, :] <= torch.arange(n)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    p = scores.softmax(-1)
    out = torch.einsum("hnl,lhd->nhd", p, vd)
    weighted_abs_v = torch.einsum("hnl,lhd->nhd", p, vd.abs())
    score_mag = torch.einsum("nhd,lhd->hnl", (qd * scale).abs(), kd.abs())  # sum_d |q' k|
    spread = (scores.amax(-1, keepdim=True) - scores).masked_fill(~visible, 0)  # |s_t - m|
    return out, weighted_abs_v, score_mag.masked_fill(~visible, 0), spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [24, 32])
def test_within_the_analysed_bound_of_float64_attention(threads, dtype, d):
    """Forward error analysis of the kernel's fp32 steps (u = 2^-24): a score is an fma chain over
    ceil(D/16) terms per lane then a 4-level lane tree, after q' = q * scale (one rounding):
    |ds_t| <= (ceil(D/16) + 5) u sum_d |q'_d k_d|. The weight e_t = exp(s_t - m) then carries a
    relative error eta_t <= |ds_t| + |ds_max| + u |s_t - m| (the subtraction) + 4u (the polynomial, ~2 ulp,
    and the scaling); the output, a ratio of sums of the e_t, is off by at most 2 max_t eta_t plus the
    accumulations (P.V: an fma chain over L keys, gamma_L; the sum: L/16 + 4 adds) and the division, all
    relative to sum_t p_t |v_t|, plus the final rounding to the dtype (eps_dtype / 2 |o|). Second-order
    terms are covered by a factor 2."""
    q, k, v = _sequence(dtype, d=d)
    out = inv.contiguous_attention(q, k, v, torch.zeros(q.shape[0]), torch.arange(q.shape[0]), scale=SCALE)
    exact, weighted_abs_v, score_mag, spread = _exact(q, k, v, SCALE)
    u, length = 2.0 ** -24, q.shape[0]
    score_err = (-(-d // 16) + 5) * u * score_mag  # [h, n, l]
    eta = score_err + score_err.amax(-1, keepdim=True) + u * spread + 4 * u
    rel = 2 * eta.amax(-1) + (length + length / 16 + 5) * u  # [h, n]
    bound = 2 * (rel.transpose(0, 1)[..., None] * weighted_abs_v) + torch.finfo(dtype).eps / 2 * exact.abs()
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0  # the comparison is not vacuous: the kernel rounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 24), (4, 4, 32), (8, 1, 16), (2, 2, 320), (4, 2, 256)])
def test_a_query_gets_the_same_bits_in_every_path(threads, dtype, hq, hkv, d):
    q, k, v = _sequence(dtype, hq=hq, hkv=hkv, d=d)
    n = q.shape[0]
    full = inv.sequence_attention(q, k, v, torch.arange(n), scale=SCALE)  # prefill of the whole sequence
    # the trainer's packed varlen forward, with other sequences before and after it
    q1, k1, v1 = _sequence(dtype, length=37, hq=hq, hkv=hkv, d=d, seed=5)
    q2, k2, v2 = _sequence(dtype, length=70, hq=hq, hkv=hkv, d=d, seed=6)
    packed = inv.varlen_causal_attention(torch.cat([q1, q, q2]), torch.cat([k1, k, k2]), torch.cat([v1, v, v2]),
                                         [0, 37, 37 + n, 37 + n + 70], SCALE)
    assert torch.equal(packed[37:37 + n], full)
    assert torch.equal(packed[:37], inv.sequence_attention(q1, k1, v1, torch.arange(37), scale=SCALE))
    with torch.enable_grad():  # the autograd Function's forward is the same kernel
        assert torch.equal(inv.varlen_causal_attention(q.requires_grad_(), k, v, [0, n], SCALE).detach(), full)
    q.requires_grad_(False)
    # a query alone over only its prefix
    for p in (0, 1, 15, 16, 17, 100, n - 1):
        alone = inv.sequence_attention(q[p:p + 1], k[:p + 1], v[:p + 1], torch.tensor([p]), scale=SCALE)
        assert torch.equal(alone[0], full[p]), p
    k_cache, v_cache, table = _paged(k, v)
    # paged decode: each row one query at its context's end, rows of other lengths beside it
    rows = [3, 77, n - 1, 31, 0]
    tables = table.repeat(len(rows), 1)
    decode = inv.paged_decode_attention(q[rows], k_cache, v_cache, tables, torch.tensor(rows) + 1, SCALE)
    assert torch.equal(decode, full[rows])
    # chunked prefill over the paged cache: every chunk size, and two requests in one call
    for chunk in (1, 7, 16, 50, n):
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            got = inv.paged_prefill_attention(q[start:end], k_cache, v_cache, table, torch.tensor([0, end - start]),
                                              torch.tensor([end]), SCALE)
            assert torch.equal(got, full[start:end]), (chunk, start)
    two = inv.paged_prefill_attention(torch.cat([q[10:20], q[90:95]]), k_cache, v_cache, table.repeat(2, 1),
                                      torch.tensor([0, 10, 15]), torch.tensor([20, 95]), SCALE)
    assert torch.equal(two, torch.cat([full[10:20], full[90:95]]))
    # the engine's form: one call for decodes and chunks, each query with its table row and position
    both = inv.paged_attention(q[[40, 41, 42, 120]], k_cache, v_cache, table, torch.zeros(4), torch.tensor([40, 41, 42, 120]),
                               scale=SCALE)
    assert torch.equal(both, full[[40, 41, 42, 120]])


def test_padding_rows_get_zeros_and_bad_block_tables_are_refused():
    q, k, v = _sequence(torch.float32, length=40)
    k_cache, v_cache, table = _paged(k, v)
    out = inv.paged_decode_attention(q[:2], k_cache, v_cache, table.repeat(2, 1), torch.tensor([0, 40]), SCALE)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0
    for bad in (-1, k_cache.shape[0]):  # an entry within the context outside the cache
        broken = table.clone()
        broken[0, 1] = bad
        with pytest.raises(RuntimeError, match="outside"):
            inv.paged_decode_attention(q[:1], k_cache, v_cache, broken, torch.tensor([40]), SCALE)
    # past the context an entry is never read: -1 there is fine (the engine pads tables with it)
    padded = torch.cat([table, torch.full((1, 3), -1, dtype=torch.int32)], 1)
    assert torch.equal(inv.paged_decode_attention(q[:1], k_cache, v_cache, padded, torch.tensor([17]), SCALE),
                       inv.paged_decode_attention(q[:1], k_cache, v_cache, table, torch.tensor([17]), SCALE))
    with pytest.raises(ValueError, match="needs 3 blocks"):  # too few columns: op_inputs' check
        inv.paged_decode_attention(q[:1], k_cache, v_cache, table[:, :2], torch.tensor([40]), SCALE)
    with pytest.raises(RuntimeError, match="outside"):  # a table row that does not exist
        inv.paged_attention(q[:1], k_cache, v_cache, table, torch.tensor([1]), torch.tensor([5]), scale=SCALE)
    with pytest.raises(RuntimeError, match="run past"):  # keys past the key rows
        inv.contiguous_attention(q[:1], k[:10], v[:10], torch.tensor([5]), torch.tensor([5]), scale=SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_close_to_plain_attention(dtype):
    """The trainer's varlen forward is the kernel; its backward recomputes plain fp32 attention, so the
    gradients are plain attention's (float64 here) up to fp32 rounding (and the bf16 rounding of q, k, v
    and of the gradients themselves)."""
    lengths = [20, 45, 9]
    cu = torch.tensor([0, 20, 65, 74])
    q, k, v = _sequence(dtype, length=74)
    grad = torch.randn(74, *q.shape[1:], generator=torch.Generator().manual_seed(9)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (inv.varlen_causal_attention(*leaves, cu, SCALE) * grad).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    outs, start = [], 0
    for n in lengths:
        outs.append(_exact(*(t[start:start + n] for t in ref_leaves), SCALE)[0])
        start += n
    (torch.cat(outs) * grad.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for got, want in zip(leaves, ref_leaves):
        assert ((got.grad.double() - want.grad).abs() <= tol * (1 + want.grad.abs())).all()


def test_falls_back_to_torch_when_the_kernel_cannot_be_built(monkeypatch, caplog):
    q, k, v = _sequence(torch.float32, length=70)
    native = inv.varlen_causal_attention(q, k, v, [0, 70], SCALE)
    monkeypatch.setattr(cpu_kernels, "load_source", lambda path: (None, "no C++ compiler (test)"))
    calls = []
    torch_attention = inv._attention
    monkeypatch.setattr(inv, "_attention", lambda *a, **kw: calls.append(1) or torch_attention(*a, **kw))
    inv.attention_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=inv.__name__):
            assert not inv.native_attention("cpu")
            assert not inv.native_attention("cpu")
        assert sum("no C++ compiler (test)" in r.getMessage() for r in caplog.records) == 1  # logged once
        fallback = inv.varlen_causal_attention(q, k, v, [0, 70], SCALE)
        assert calls and torch.equal(fallback, inv.sequence_attention(q, k, v, torch.arange(70), scale=SCALE))
        torch.testing.assert_close(fallback, native, atol=1e-5, rtol=1e-5)
        k_cache, v_cache, table = _paged(k, v)  # the engine's paths take the torch implementation too
        calls.clear()
        decode = inv.paged_decode_attention(q[[69]], k_cache.nan_to_num(), v_cache.nan_to_num(), table,
                                            torch.tensor([70]), SCALE)
        assert calls and torch.equal(decode, fallback[[69]])
    finally:
        monkeypatch.undo()
        inv.attention_kernel.cache_clear()
    assert inv.native_attention("cpu")  # the next tests get the kernel again


def test_the_bits_are_the_same_with_avx2_and_scalar_lanes():
    """The 16 lanes written for AVX-512, AVX2 (two 8-lane registers) and plain C++ (std::fma) give the
    same bits: the source built with each forced (two more builds, 1-2 min each the first time; cached
    in the torch extensions directory afterwards)."""
    from torch.utils import cpp_extension

    source = inv._ATTENTION_SOURCE
    builds = {"native": inv.attention_kernel()}
    for variant, flags in (("avx2", ["-DRL_INVARIANT_AVX2"]), ("scalar", ["-DRL_INVARIANT_SCALAR"])):
        builds[variant] = cpp_extension.load(name=f"{cpu_kernels.extension_name(source)}_{variant}",
                                             sources=[str(source)], extra_cflags=[*cpu_kernels.build_flags(), *flags])
    if builds["native"].isa == "avx2":  # this CPU has no AVX-512: the native build is the AVX2 one
        assert builds["avx2"].isa == "avx2"
    assert builds["scalar"].isa == "scalar"
    for dtype in (torch.float32, torch.bfloat16):
        for hq, hkv, d in ((6, 2, 24), (4, 4, 64), (2, 1, 8)):
            q, k, v = _sequence(dtype, hq=hq, hkv=hkv, d=d)
            args = (q, k, v, torch.zeros(q.shape[0], dtype=torch.int32), torch.arange(q.shape[0], dtype=torch.int32),
                    SCALE)
            want = builds["native"].contiguous(*args)
            for variant in ("avx2", "scalar"):
                assert torch.equal(builds[variant].contiguous(*args), want), (variant, dtype, d)
