"""The engine's RMSNorm and SwiGLU on CPU (`kernels/cpu/engine_elementwise.py`): fp32 gives the training kernels'
forward bits (what the trainer's recorded pass computes) within the fp32 error bound of the torch reference; bf16
RMSNorm (csrc/bf16_rms_norm.cpp) against the reference; a row's result does not depend on the rows beside it; the
reference itself wherever the kernels do not apply.

Tolerances from the kernels' arithmetic. fp32 RMSNorm: the row's sum of squares (width roundings at most), rstd and
the products (a few): within (width + 8) eps of the terms' magnitudes, relative. fp32 SwiGLU: fast_exp's ~2 ulp,
then 1 + e, the reciprocal and two products: 8 eps relative. bf16 RMSNorm rounds to bf16 where the reference rounds,
from fp32 values within a few fp32 ulp of the reference's, so a rounding lands one bf16 ulp (2^-8 to 2^-7
relative) apart only where its fp32 value sits at a rounding boundary; it rounds twice (x * inv, then weight *
that), so a flip in the first can move the second by up to two ulps: rtol 2^-6. How many flip: a rounding lands
apart only when its fp32 value lies within the fp32 discrepancy (k ulps, k a few: 2^-23 relative each) of a bf16
rounding boundary (2^-7 to 2^-8 relative apart), a fraction ~2k * 2^-23 / 2^-8 = k * 2^-14 (~2.4e-4 at k = 4) per
rounding, ~5e-4 for the two: the test allows 1% of the elements (a 20x margin).
"""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import reference
from rl_engine.kernels.cpu import engine_elementwise as ee
from rl_engine.kernels.cpu import train_elementwise as te

EPS = torch.finfo(torch.float32).eps
needs_fp32 = pytest.mark.skipif(te.kernel() is None, reason="the training elementwise C++ kernels do not build")
needs_bf16 = pytest.mark.skipif(ee.bf16_kernel() is None, reason="the bf16 RMSNorm C++ kernel does not build")


def _strided(shape: tuple[int, ...], *, pad: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of `shape`, a slice of a wider last dim when pad > 0."""
    wide = (torch.randn(*shape[:-1], shape[-1] + pad) * 3).to(dtype)
    return wide[..., pad:]  # (a slice's .to(dtype) would be a contiguous copy)


@needs_fp32
@pytest.mark.parametrize("shape,pad", [((64, 256), 0), ((3, 50, 130), 0), ((300, 37), 5), ((1, 512), 0)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fp32_rms_norm_gives_the_training_kernels_bits_within_the_reference_bound(shape, pad, with_residual):
    torch.manual_seed(shape[-1] + pad)
    x = _strided(shape, pad=pad)
    w = 1 + 0.3 * torch.randn(shape[-1])
    res = _strided(shape, pad=pad) if with_residual else None
    with torch.inference_mode():
        out, new_res = ee.rms_norm(x, w, 1e-6, res)
        train_out, train_res = te.rms_norm(x, w, 1e-6, res)
    assert out.shape == x.shape and torch.equal(out, train_out)
    if with_residual:
        assert torch.equal(new_res, x + res) and torch.equal(new_res, train_res)  # one fp32 add, as torch's
    else:
        assert new_res is None
    h = (x + res if with_residual else x).double()
    expected = w.double() * h * (h.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    bound = (shape[-1] + 8) * EPS * expected.abs() + 1e-30
    assert ((out.double() - expected).abs() <= bound).all()


@needs_fp32
@pytest.mark.parametrize("shape,pad", [((64, 256), 0), ((300, 37), 5), ((1, 512), 0), ((7, 130), 3)])
def test_fp32_rms_norm_out_is_rms_norm_forwards_output(shape, pad):
    """`rms_norm_out` (the direct decode forward's RMSNorm without a residual): rms_norm_forward's first result,
    bit for bit, at any row stride."""
    torch.manual_seed(shape[-1] + pad)
    x, w = _strided(shape, pad=pad), 1 + 0.3 * torch.randn(shape[-1])
    out = te.kernel().rms_norm_out(x, w, 1e-6)
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, te.kernel().rms_norm_forward(x, w, 1e-6, None)[0])
    with pytest.raises(RuntimeError, match="weight has 3 entries"):
        te.kernel().rms_norm_out(x, w[:3], 1e-6)


@needs_fp32
@pytest.mark.parametrize("shape,pad", [((64, 2 * 768), 0), ((2, 30, 2 * 100), 0), ((5, 2 * 7), 3), ((1, 2 * 1792), 0)])
def test_fp32_silu_and_mul_gives_the_training_kernels_bits_within_the_reference_bound(shape, pad):
    torch.manual_seed(shape[-1])
    x = _strided(shape, pad=pad)
    with torch.inference_mode():
        out = ee.silu_and_mul(x)
        train_out = te.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and torch.equal(out, train_out)
    gate, up = x.double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    assert ((out.double() - expected).abs() <= 8 * EPS * expected.abs() + 1e-30).all()


@needs_bf16
@pytest.mark.parametrize("shape,pad", [((256, 512), 0), ((3, 100, 200), 0), ((300, 40), 0), ((1, 256), 0),
                                       ((300, 37), 5), ((2, 9, 64), 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_bf16_rms_norm_matches_the_reference(shape, pad, with_residual):
    """pad > 0: x and the residual are slices of a wider last dim (rows at a stride the kernel reads in place)."""
    torch.manual_seed(shape[-1] + pad)
    x = _strided(shape, pad=pad, dtype=torch.bfloat16)
    w = torch.randn(shape[-1]).bfloat16()
    res = _strided(shape, pad=pad, dtype=torch.bfloat16) if with_residual else None
    assert x.is_contiguous() == (pad == 0)
    with torch.inference_mode():
        out, new_res = ee.rms_norm(x, w, 1e-6, res)
    ref, ref_res = reference.rms_norm(x, w, 1e-6, res)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2.0 ** -6, atol=1e-6)
    assert (out != ref).float().mean() < 0.01
    if with_residual:
        assert torch.equal(new_res, ref_res)  # x + residual rounded once, as in torch
    else:
        assert new_res is None


@needs_bf16
@needs_fp32
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gives_the_same_bits_alone_and_among_many(dtype):
    """The engine's batch invariance leans on it: a prompt's rows round the same in a prefill of 2,000 rows, split
    over threads, as alone."""
    torch.manual_seed(1)
    x, res = torch.randn(2000, 256).to(dtype), torch.randn(2000, 256).to(dtype)
    w, gate_up = torch.randn(256).to(dtype), torch.randn(2000, 1536).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            many = ee.rms_norm(x, w, 1e-6, res)
            many_silu = ee.silu_and_mul(gate_up)
            for r in (0, 777, 1999):
                alone = ee.rms_norm(x[r:r + 1], w, 1e-6, res[r:r + 1])
                assert torch.equal(alone[0], many[0][r:r + 1]) and torch.equal(alone[1], many[1][r:r + 1])
                assert torch.equal(ee.silu_and_mul(gate_up[r:r + 1]), many_silu[r:r + 1])
    finally:
        torch.set_num_threads(previous)


def test_the_reference_runs_where_the_kernels_do_not_apply(monkeypatch):
    """fp16, bf16 SwiGLU, inputs that need a gradient and traced calls take the torch reference itself."""
    w = torch.randn(64)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(300, 64).to(dtype)
        assert torch.equal(ee.silu_and_mul(x), reference.silu_and_mul(x))
    x16 = torch.randn(300, 64).half()
    assert torch.equal(ee.rms_norm(x16, w.half(), 1e-6)[0], reference.rms_norm(x16, w.half(), 1e-6)[0])
    x = torch.randn(300, 64, requires_grad=True)
    out, _ = ee.rms_norm(x, w, 1e-6)
    (out.sum() + ee.silu_and_mul(x).sum()).backward()  # autograd through the reference
    assert x.grad is not None and torch.equal(out, reference.rms_norm(x, w, 1e-6)[0])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.inference_mode():
        y = torch.randn(300, 64)
        assert torch.equal(ee.rms_norm(y, w, 1e-6)[0], reference.rms_norm(y, w, 1e-6)[0])
        assert torch.equal(ee.silu_and_mul(y), reference.silu_and_mul(y))
