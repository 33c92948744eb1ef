"""Triton RMSNorm (with and without the residual add) against the torch reference, fwd and bwd."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import reference


def _run(fn, x, weight, residual, grad_y, grad_res):
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight)]
    res = residual.detach().clone().requires_grad_() if residual is not None else None
    y, new_res = fn(inputs[0], inputs[1], 1e-6, res)
    loss = (y.float() * grad_y).sum()
    if res is not None:
        loss = loss + (new_res.float() * grad_res).sum()
    loss.backward()
    grads = [inputs[0].grad, inputs[1].grad] + ([res.grad] if res is not None else [])
    return y, new_res, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 8), (5, 37), (2, 3, 20)])
def test_rms_norm_matches_reference(triton_device, assert_close, dtype, with_residual, shape):
    from rl_engine.kernels.triton.rms_norm import rms_norm

    torch.manual_seed(0)
    x = torch.randn(shape, device=triton_device).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=triton_device)).to(dtype)
    residual = torch.randn(shape, device=triton_device).to(dtype) if with_residual else None
    grad_y = torch.randn(shape, device=triton_device)
    grad_res = torch.randn(shape, device=triton_device)
    y, res, grads = _run(rms_norm, x, weight, residual, grad_y, grad_res)
    # bf16 is checked against the fp32 reference on the same (bf16-valued) inputs
    residual_ref = residual.float() if with_residual else None
    y_ref, res_ref, grads_ref = _run(reference.rms_norm, x.float(), weight.float(), residual_ref,
                                     grad_y, grad_res)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype)
    if with_residual:
        assert res.dtype == dtype
        assert_close(res, res_ref, dtype)
    else:
        assert res is None
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, g_ref, dtype)


def test_rms_norm_empty_batch(triton_device):
    from rl_engine.kernels.triton.rms_norm import rms_norm

    x = torch.randn(0, 16, device=triton_device, requires_grad=True)
    weight = torch.ones(16, device=triton_device, requires_grad=True)
    y, _ = rms_norm(x, weight, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(weight.grad, torch.zeros(16))


def test_rms_norm_fp32_weight_bf16_input_promotes_like_reference(triton_device):
    from rl_engine.kernels.triton.rms_norm import rms_norm

    x = torch.randn(3, 16, device=triton_device).bfloat16()
    weight = torch.randn(16, device=triton_device)
    y, _ = rms_norm(x, weight, 1e-6)
    y_ref, _ = reference.rms_norm(x, weight, 1e-6)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
