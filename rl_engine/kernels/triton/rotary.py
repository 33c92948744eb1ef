"""Rotate-half rotary embedding in Triton: in place with positions (inference), and out of place
with autograd (training).

One kernel serves both: a program rotates every head of one token, reading cos/sin from row
`positions[t]` of a cache (or row t of per-token cos/sin). Strides are explicit so q and k may be
views into a fused qkv projection; the in-place form writes back through the same strides. The
backward of a rotation by angle a is the rotation by -a, i.e. the same kernel with sin negated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl_engine.kernels.triton._launch import next_pow2


@triton.jit
def _rotary_kernel(X, OUT, POS, COS, SIN, stride_xt, stride_xh, stride_ot, stride_oh, stride_cos,
                   stride_sin, num_heads, half_dim,
                   HAS_POSITIONS: tl.constexpr, INVERSE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    if HAS_POSITIONS:
        row = tl.load(POS + t).to(tl.int64)
    else:
        row = t
    d = tl.arange(0, BLOCK_D)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d_mask = d < half_dim
    mask = (h[:, None] < num_heads) & d_mask[None, :]
    cos = tl.load(COS + row * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + row * stride_sin + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        sin = -sin
    x_ptr = X + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half_dim, mask=mask, other=0.0).to(tl.float32)
    o_ptr = OUT + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half_dim, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor | None, *, inverse: bool) -> None:
    """out[t] = rotation of x[t] ([T, heads, head_dim], unit last stride) by row t / positions[t]."""
    num_tokens, num_heads, head_dim = x.shape
    if head_dim % 2 or cos.shape[-1] != head_dim // 2 or sin.shape[-1] != head_dim // 2:
        raise ValueError(f"rotary: head_dim ({head_dim}) must be even and cos/sin [*, {head_dim // 2}];"
                         f" got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if x.stride(-1) != 1 or out.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary: q, k, cos and sin need a unit stride in their last dim")
    if num_tokens == 0 or num_heads == 0:
        return
    block_h = min(next_pow2(num_heads), 16)
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _rotary_kernel[grid](
        x, out, positions if positions is not None else cos, cos, sin, x.stride(0), x.stride(1),
        out.stride(0), out.stride(1), cos.stride(0), sin.stride(0), num_heads, head_dim // 2,
        HAS_POSITIONS=positions is not None, INVERSE=inverse, BLOCK_H=block_h,
        BLOCK_D=next_pow2(head_dim // 2))


def apply_rotary_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.apply_rotary_inplace` (no autograd: the inference path)."""
    _rotate(q, q, cos_cache, sin_cache, positions, inverse=False)
    _rotate(k, k, cos_cache, sin_cache, positions, inverse=False)
    return q, k


class _ApplyRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _rotate(q, q_out, cos, sin, None, inverse=False)
        _rotate(k, k_out, cos, sin, None, inverse=False)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        grads = []
        for g in (dq, dk):
            if g is None:
                grads.append(None)
                continue
            g = g if g.stride(-1) == 1 else g.contiguous()
            dx = torch.empty_like(g, memory_format=torch.contiguous_format)
            _rotate(g, dx, cos, sin, None, inverse=True)
            grads.append(dx)
        return grads[0], grads[1], None, None


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.apply_rotary`: new (q, k), differentiable in q and k.

    q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim], cos/sin: [T, head_dim // 2] fp32.
    """
    return _ApplyRotary.apply(q, k, cos, sin)
