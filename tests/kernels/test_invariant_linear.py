"""The C++ batch-invariant linear (`csrc/invariant_linear.cpp`, `invariant.linear` under
model.batch_invariant): a row's bits do not depend on the rows around it, the thread count or the
instruction set; the values stay within the analysed bound of the exact product; gradients are
F.linear's; and without the extension `invariant.linear` falls back to the MKL tiles."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from rl_engine.kernels import invariant as inv

kernel = inv.linear_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="the C++ invariant linear did not build (no compiler?)")

# (K, N): the lane groups whole and with a tail of K % 16, feature blocks whole and cut
SHAPES = [(64, 40), (37, 19), (256, 33), (5, 3)]


def _inputs(dtype, m, k, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype),
            torch.randn(n, generator=gen).to(dtype))


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    yield lambda: torch.set_num_threads(2)
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", SHAPES)
def test_a_rows_bits_do_not_depend_on_its_batch_position_threads_or_isa(two_threads, dtype, k, n):
    x, w, b = _inputs(dtype, 140, k, n)
    torch.set_num_threads(1)
    full = kernel.linear(x, w, b)
    for m in range(1, 131):  # every row count at 1 thread, a row alone and at other positions
        start = (7 * m) % (x.shape[0] - m + 1)
        assert torch.equal(kernel.linear(x[start:start + m], w, b), full[start:start + m]), (m, start)
    two_threads()
    for start, m in ((0, 140), (3, 1), (5, 6), (1, 64), (11, 129)):
        assert torch.equal(kernel.linear(x[start:start + m], w, b), full[start:start + m]), (start, m)
    for isa in kernel.isas():  # AVX-512, AVX2 and scalar fma: the same lanes in the same order
        assert torch.equal(kernel.linear(x, w, b, isa), full), isa
        assert torch.equal(kernel.linear(x[9:10], w, None, isa), kernel.linear(x, w, None)[9:10]), isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", SHAPES + [(1000, 7)])
def test_values_within_the_bound_of_the_lane_order(dtype, k, n):
    """Each of 16 lanes adds ceil(K/16) exact products by fma (one rounding each), then 4 tree levels
    and the bias add: at most ceil(K/16) + 5 roundings of u = eps/2 on sum |x w| + |b| (bounded by
    eps for the 1/(1 - n u) of the standard bound); a bf16/fp16 output adds one rounding of its own."""
    x, w, b = _inputs(dtype, 9, k, n, seed=k)
    y = inv.linear(x, w, b).double()
    exact = x.double() @ w.double().t() + b.double()
    magnitude = x.double().abs() @ w.double().abs().t() + b.double().abs()
    fp32_bound = (math.ceil(k / 16) + 5) * torch.finfo(torch.float32).eps * magnitude
    bound = fp32_bound + (0 if dtype == torch.float32 else torch.finfo(dtype).eps * (exact.abs() + fp32_bound))
    assert ((y - exact).abs() <= bound).all()
    if dtype == torch.float32:  # the order is the lane tree's: an fp32 emulation of it gives the same bits
        lanes = torch.zeros(9, n, 16, dtype=torch.float64)
        xp = F.pad(x, (0, -k % 16)).view(9, 1, -1, 16)
        wp = F.pad(w, (0, -k % 16)).view(1, n, -1, 16)
        prods = xp.double() * wp.double()  # exact
        for g in range(prods.shape[2]):  # fp32 fma: exact product plus the lane, rounded once
            lanes = (lanes + prods[:, :, g]).float().double()
        for half in (8, 4, 2, 1):
            lanes = (lanes[..., :half] + lanes[..., half:2 * half]).float().double()
        assert torch.equal(inv.linear(x, w, b), (lanes[..., 0].float() + b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6,), (2, 3)], ids=["2d", "3d"])
def test_gradients_are_f_linears(dtype, shape):
    x, w, b = _inputs(dtype, math.prod(shape) * 5, 24, 10, seed=3)
    x = x.view(*shape[:-1], shape[-1] * 5, 24)
    grad = torch.randn(*x.shape[:-1], 10).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = inv.linear(*leaves)
    assert torch.equal(out.detach(), inv.linear(x, w, b))  # autograd on: the same forward bits
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(F.linear(*ref_leaves), ref_leaves, grad)
    for g, r, name in zip(got, want, ("x", "weight", "bias")):
        assert torch.equal(g, r), name


def test_without_the_extension_linear_falls_back_to_the_mkl_tiles(monkeypatch, caplog):
    monkeypatch.setattr(inv.cpu_kernels, "load_source", lambda source: (None, "disabled for this test"))
    inv.linear_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=inv.__name__):
            x, w, b = _inputs(torch.float32, 9, 64, 12)
            y = inv.linear(x, w, b)
            assert torch.equal(y, inv._mm_rows(x, w.t()) + b)
            assert torch.equal(inv.linear(x[4:5], w, b), y[4:5])  # the tiles are invariant too
        assert [r.message for r in caplog.records].count(
            "batch-invariant linear: C++ kernel unavailable (disabled for this test); using MKL tiles of 4-128 rows") == 1
    finally:
        inv.linear_kernel.cache_clear()  # the next caller loads the real extension again


def test_bf16_denormals_follow_vdpbf16ps_on_every_isa():
    """bf16 runs vdpbf16ps's order and its fixed denormal rule (inputs and each step's result flushed
    to zero); the AVX2 and scalar emulations of it must give the instruction's bits on denormal inputs
    and on products and partial sums that fall below fp32's normal range."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 70, generator=gen) * 2.0 ** -60
    w = torch.randn(9, 70, generator=gen) * 2.0 ** -66
    x[:, ::3] = torch.randn(7, 24, generator=gen) * 2.0 ** -128  # bf16 denormals
    x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
    assert (x.float().abs() < torch.finfo(torch.float32).tiny).any()
    want = kernel.linear(x, w, None, kernel.isas()[0])
    for isa in kernel.isas():
        assert torch.equal(kernel.linear(x, w, None, isa), want), isa
