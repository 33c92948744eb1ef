"""kernels/cpu/small_gemm: the panel-packed small-M GEMM equals F.linear up to fp32 accumulation error
(any M, N and K, tails included, every panel width and row block), adds its bias and residual, and gives a
row the same bits whatever else is in the batch, the row block or the thread count (sequential-K sums)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rl_engine.kernels import cpu
from rl_engine.kernels.cpu import small_gemm

pytestmark = pytest.mark.skipif(not small_gemm.available()[0], reason=small_gemm.available()[1])


def _inputs(dtype, rows, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    r = torch.randn(rows, n, generator=gen).to(dtype)
    return x, w, b, r


def _bound(x, w, result, dtype):
    """A sum of K fp32 products in any order is within K u32 sum_k |x_k w_k| of the exact value (u32 =
    2^-24; finfo.eps = 2u keeps a factor 2 of slack), the bias and residual adds each add one fp32 rounding
    (u32 |result|), and the result is rounded once to the dtype (eps_dtype / 2 |result|; eps for slack)."""
    magnitude = x.double().abs() @ w.double().abs().t()
    eps32 = torch.finfo(torch.float32).eps
    return x.shape[1] * eps32 * magnitude + (2 * eps32 + torch.finfo(dtype).eps) * (magnitude + result.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 17, 5), (2, 256, 256), (7, 40, 96), (13, 1000, 300), (64, 384, 256),
                                      (37, 2065, 257)])
@pytest.mark.parametrize("panel,row_block", [(16, 12), (32, 8), (48, 8), (64, 6)])
def test_product_equals_f_linear_up_to_accumulation_error(dtype, rows, n, k, panel, row_block):
    x, w, b, r = _inputs(dtype, rows, n, k)
    packed = small_gemm.pack(w, panel=panel)
    exact = x.double() @ w.double().t()
    for bias, residual, want in [(None, None, exact), (b, None, exact + b.double()),
                                 (None, r, exact + r.double()), (b, r, exact + b.double() + r.double())]:
        y = small_gemm.linear(x, packed, bias, residual=residual, row_block=row_block)
        assert y.dtype == dtype and y.shape == (rows, n)
        assert ((y.double() - want).abs() <= _bound(x, w, want, dtype)).all()
    # against the torch reference as well (both within the bound of the exact product)
    ref = F.linear(x.float(), w.float(), b.float())
    y = small_gemm.linear(x, packed, b, row_block=row_block).float()
    assert ((y.double() - ref.double()).abs() <= 2 * _bound(x, w, exact + b.double(), dtype)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_has_the_same_bits_whatever_the_batch_row_block_and_threads(dtype):
    x, w, b, r = _inputs(dtype, 29, 200, 160, seed=1)
    packed = small_gemm.pack(w, panel=32)
    full = small_gemm.linear(x, packed, b, residual=r, row_block=8)
    threads = torch.get_num_threads()
    try:
        for row_block, num_threads in [(1, 1), (5, 2), (12, 2), (3, 1)]:
            torch.set_num_threads(num_threads)
            assert torch.equal(small_gemm.linear(x, packed, b, residual=r, row_block=row_block,
                                                 min_macs_per_thread=1), full)
    finally:
        torch.set_num_threads(threads)
    for i in (0, 13, 28):
        assert torch.equal(small_gemm.linear(x[i:i + 1], packed, b, residual=r[i:i + 1]), full[i:i + 1])
    # every panel width sums each output in the same order: the same bits
    for panel in (16, 48, 64):
        assert torch.equal(small_gemm.linear(x, small_gemm.pack(w, panel=panel), b, residual=r, row_block=4), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_product_of_many_rows_run_in_chunks_has_each_rows_bits(dtype):
    """A product of more rows than one chunk of x (gemm_kernel's kChunkBytes: 64 KiB of x, at least 64 rows) runs
    every panel chunk by chunk: each row's bits are those of the row alone and of a call of a few rows, at any row
    block and thread count, and within the accumulation bound of the exact product."""
    x, w, b, r = _inputs(dtype, 700, 100, 160, seed=2)  # (chunks of 100-200 rows at K = 160)
    packed = small_gemm.pack(w, panel=48)
    full = small_gemm.linear(x, packed, b, residual=r)
    exact = x.double() @ w.double().t() + b.double() + r.double()
    assert ((full.double() - exact).abs() <= _bound(x, w, exact, dtype)).all()
    threads = torch.get_num_threads()
    try:
        for row_block, num_threads in [(5, 1), (8, 2)]:
            torch.set_num_threads(num_threads)
            assert torch.equal(small_gemm.linear(x, packed, b, residual=r, row_block=row_block,
                                                 min_macs_per_thread=1), full)
    finally:
        torch.set_num_threads(threads)
    for i in (0, 99, 100, 250, 699):
        assert torch.equal(small_gemm.linear(x[i:i + 1], packed, b, residual=r[i:i + 1]), full[i:i + 1])
    assert torch.equal(small_gemm.linear(x[190:210], packed, b, residual=r[190:210]), full[190:210])


def test_leading_dims_are_kept():
    x, w, b, _ = _inputs(torch.float32, 6, 40, 24)
    packed = small_gemm.pack(w)
    y = small_gemm.linear(x.view(2, 3, 24), packed, b)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y.view(6, 40), small_gemm.linear(x, packed, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_input_features_gives_the_bias_and_residual(dtype):
    """K = 0 (x [..., 0], W [N, 0]): no products, so every output is 0 (+ bias) (+ residual), one fp32 sum
    rounded once, as F.linear / addmm give, through the Python wrapper and the extension called directly
    (which returned uninitialised rows before)."""
    gen = torch.Generator().manual_seed(2)
    n = 40
    x, w = torch.empty(2, 3, 0, dtype=dtype), torch.empty(n, 0, dtype=dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    r = torch.randn(2, 3, n, generator=gen).to(dtype)
    ext = cpu.extension(small_gemm.SOURCE)
    raw = ext.pack(w, 32)
    assert raw.numel() == 0
    zeros = torch.zeros(2, 3, n, dtype=dtype)
    for bias, residual, want in [(None, None, zeros), (b, None, F.linear(x, w, b)),
                                 (None, r, r), (b, r, (b.float() + r.float()).to(dtype))]:
        direct = ext.linear(x, raw, n, 32, 8, bias, residual, 1)
        wrapped = small_gemm.linear(x, small_gemm.pack(w), bias, residual=residual)
        assert direct.shape == wrapped.shape == (2, 3, n) and direct.dtype == dtype
        assert torch.equal(direct, want) and torch.equal(wrapped, want)
    # fp32: addmm's own result (0 + bias + residual, each add exact or one rounding) bit for bit
    if dtype == torch.float32:
        assert torch.equal(small_gemm.linear(x, small_gemm.pack(w), b, residual=r),
                           torch.addmm(r.view(6, n) + b, x.view(6, 0), w.t()).view(2, 3, n))


def test_bad_inputs_name_the_value():
    x, w, _, _ = _inputs(torch.float32, 4, 40, 24)
    packed = small_gemm.pack(w)
    with pytest.raises(ValueError, match=r"last dim \(23\).*in_features \(24\)"):
        small_gemm.linear(x[:, :23], packed)
    with pytest.raises(ValueError, match=r"row_block \(13\)"):
        small_gemm.linear(x, packed, row_block=13)
    with pytest.raises(ValueError, match=r"panel \(24\)"):
        small_gemm.pack(w, panel=24)
    with pytest.raises(ValueError, match=r"2-D"):
        small_gemm.pack(w[0])
    with pytest.raises(RuntimeError, match="dtype"):
        small_gemm.linear(x.double(), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_into_a_given_tensor_writes_every_element(dtype):
    """`pack(w, panel, out)` (the engine's arena slots, `packed_linear`): the bits `pack` returns, written over
    whatever `out` held (its padding too), `packed_size` elements; a wrong `out` is refused, naming the size."""
    ext = cpu.extension(small_gemm.SOURCE)
    _, w, _, _ = _inputs(dtype, 1, 40, 23)  # N and K off the panel and the bf16 pair
    n = ext.packed_size(w, 32)
    assert n == ext.pack(w, 32).numel()
    out = torch.full((n,), float("nan"), dtype=dtype)
    assert ext.pack(w, 32, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, ext.pack(w, 32))
    with pytest.raises(RuntimeError, match=f"{n} elements"):
        ext.pack(w, 32, torch.empty(n + 1, dtype=dtype))
    with pytest.raises(RuntimeError, match="contiguous 1-D"):
        ext.pack(w, 32, torch.empty(2 * n, dtype=dtype)[::2])
