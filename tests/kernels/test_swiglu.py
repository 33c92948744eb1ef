"""Triton SwiGLU (silu(gate) * up) against the torch reference, fwd and bwd."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2), (5, 74), (2, 3, 40), (0, 8)])
def test_silu_and_mul(triton_device, assert_close, dtype, shape):
    from rl_engine.kernels.triton.swiglu import silu_and_mul

    torch.manual_seed(0)
    x = (2 * torch.randn(shape, device=triton_device)).to(dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, device=triton_device)

    def run(fn, x):
        x = x.clone().requires_grad_()
        y = fn(x)
        (y.float() * grad).sum().backward()
        return y, x.grad

    y, dx = run(silu_and_mul, x)
    y_ref, dx_ref = run(reference.silu_and_mul, x.float())
    assert y.dtype == dx.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)


def test_silu_and_mul_block_boundary(triton_device, assert_close, monkeypatch):
    """Width past one column block: the 2-D grid must cover every column exactly once."""
    from rl_engine.kernels.triton import swiglu

    monkeypatch.setattr(swiglu, "_MAX_BLOCK", 16)
    x = torch.randn(3, 2 * 37, device=triton_device)
    assert_close(swiglu.silu_and_mul(x), reference.silu_and_mul(x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_inference_path_is_bitwise_the_autograd_path(dtype):
    """Without grad the reference multiplies in place (one allocation less): same bits, input intact."""
    torch.manual_seed(0)
    x = (2 * torch.randn(7, 2 * 33)).to(dtype)
    before = x.clone()
    with torch.inference_mode():
        y = reference.silu_and_mul(x)
    y_grad_path = reference.silu_and_mul(x.clone().requires_grad_())
    assert torch.equal(y, y_grad_path.detach())
    assert torch.equal(x, before)
