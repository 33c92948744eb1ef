"""SwiGLU (silu(gate) * up) forward and backward in Triton.

Input rows are [gate | up] halves of one [..., 2d] tensor (the fused gate_up projection), so the
kernel reads both halves of a row and writes one; backward writes the gradient of both halves into
one [..., 2d] tensor. A 2-D grid (row, column block) keeps any width in bounded registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl_engine.kernels.triton._launch import next_pow2, num_warps_for, rows_2d

_MAX_BLOCK = 1024


@triton.jit
def _swiglu_fwd(X, Y, stride_x, stride_y, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * stride_y + cols, out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(X, DY, DX, stride_x, stride_dy, stride_dx, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dy * gate * sig
    tl.store(DX + row * stride_dx + cols, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + d + cols, dup.to(DX.dtype.element_ty), mask=mask)


def _grid(rows: int, d: int) -> tuple[tuple[int, int], int]:
    block = min(next_pow2(d), _MAX_BLOCK)
    return (rows, triton.cdiv(d, block)), block


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = rows_2d(x)
        d = x2.shape[1] // 2
        y = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
        grid, block = _grid(x2.shape[0], d)
        if y.numel():
            _swiglu_fwd[grid](x2, y, x2.stride(0), y.stride(0), d, BLOCK=block,
                              num_warps=num_warps_for(block))
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        d = x2.shape[1] // 2
        dy2 = rows_2d(dy)
        dx = torch.empty_like(x2)
        grid, block = _grid(x2.shape[0], d)
        if dx.numel():
            _swiglu_bwd[grid](x2, dy2, dx, x2.stride(0), dy2.stride(0), dx.stride(0), d,
                              BLOCK=block, num_warps=num_warps_for(block))
        return dx.view(ctx.shape)


def silu_and_mul(x: torch.Tensor, *, overwrite_input: bool = False) -> torch.Tensor:
    """Triton twin of `reference.silu_and_mul`: x [..., 2d] as [gate | up] -> [..., d] (`overwrite_input` taken
    and not used: the backward allocates its gradient)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim ({x.shape[-1]}) must be even ([gate | up])")
    return _SiluAndMul.apply(x)
