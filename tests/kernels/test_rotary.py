"""Triton rotary embedding against the torch reference: in place with positions, and autograd."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import reference


def _inv_freq(head_dim: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "num_heads", "num_kv_heads", "head_dim"),
                         [(1, 2, 2, 8), (7, 4, 1, 12), (0, 2, 1, 8)])
def test_apply_rotary_fwd_bwd(triton_device, assert_close, dtype, num_tokens, num_heads,
                              num_kv_heads, head_dim):
    from rl_engine.kernels.triton.rotary import apply_rotary

    torch.manual_seed(0)
    dev = triton_device
    positions = torch.randint(0, 50, (num_tokens,), device=dev)
    cos, sin = reference.rotary_cos_sin(positions, _inv_freq(head_dim).to(dev))
    q = torch.randn(num_tokens, num_heads, head_dim, device=dev).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=dev).to(dtype)
    gq, gk = torch.randn(q.shape, device=dev), torch.randn(k.shape, device=dev)

    def run(fn, q, k):
        q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
        q_out, k_out = fn(q, k, cos, sin)
        ((q_out.float() * gq).sum() + (k_out.float() * gk).sum()).backward()
        return q_out, k_out, q.grad, k.grad

    outs = run(apply_rotary, q, k)
    refs = run(reference.apply_rotary, q.float(), k.float())
    for out, ref in zip(outs, refs):
        assert out.dtype == dtype
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_inplace_on_qkv_views(triton_device, assert_close, dtype):
    """q and k as strided views into one fused qkv projection output, rotated in place."""
    from rl_engine.kernels.triton.rotary import apply_rotary_inplace

    torch.manual_seed(1)
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 4, 2, 16
    dev = triton_device
    cos_cache, sin_cache = reference.rotary_cos_sin(torch.arange(64, device=dev),
                                                    _inv_freq(head_dim).to(dev))
    positions = torch.tensor([0, 63, 7, 7, 30], device=dev)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=dev).to(dtype)
    expected = qkv.clone()

    def views(t):
        q, k, v = t.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim), v)

    q, k, v_before = views(qkv)
    v_before = v_before.clone()
    q_ret, k_ret = apply_rotary_inplace(q, k, positions, cos_cache, sin_cache)
    assert q_ret.data_ptr() == q.data_ptr() and k_ret.data_ptr() == k.data_ptr()
    q_ref, k_ref, _ = views(expected.float())
    reference.apply_rotary_inplace(q_ref, k_ref, positions, cos_cache, sin_cache)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(views(qkv)[2], v_before)  # v untouched


def test_reference_inplace_matches_out_of_place():
    torch.manual_seed(2)
    cos_cache, sin_cache = reference.rotary_cos_sin(torch.arange(32), _inv_freq(8))
    positions = torch.tensor([3, 0, 31])
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    cos, sin = reference.rotary_cos_sin(positions, _inv_freq(8))
    q_ref, k_ref = reference.apply_rotary(q, k, cos, sin)
    reference.apply_rotary_inplace(q, k, positions, cos_cache, sin_cache)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
