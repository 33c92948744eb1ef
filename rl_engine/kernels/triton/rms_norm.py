"""RMSNorm with the optional fused residual add, forward and backward, in Triton.

One program normalises one row held whole in registers (hidden sizes up to a few tens of
thousands). Rounding follows the torch reference exactly: the residual sum is rounded to its dtype
before it is normalised, and the normalised row is rounded to that dtype before the weight multiply.
Backward runs a persistent grid whose programs each walk a slice of rows, so the weight gradient is
reduced from one fp32 partial per program instead of atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl_engine.kernels.triton._launch import next_pow2, num_warps_for, persistent_programs, rows_2d


@triton.jit
def _rms_norm_fwd(X, R, W, Y, RES_OUT, RSTD, stride_x, stride_r, stride_y, stride_ro, n_cols, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = (x * rstd).to(RES_OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DRES, DX, DW_PARTIAL, stride_dy, stride_x, stride_dres, stride_dx,
                  n_rows, n_cols, rows_per_program,
                  HAS_DRES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (first + i).to(tl.int64)
        # the row test is broadcast by hand: the interpreter rejects vector_mask & scalar_bool
        mask = col_mask & ((cols * 0 + row) < n_rows)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < n_rows, other=0.0)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        normed = x * rstd
        dnormed = dy * w
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / n_cols))
        if HAS_DRES:
            dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        shape, n_cols = x.shape, x.shape[-1]
        x2 = rows_2d(x)
        sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        if residual is not None:
            r2 = rows_2d(residual)
            res_out = torch.empty(x2.shape, dtype=sum_dtype, device=x.device)
        else:
            r2, res_out = x2, x2  # res_out only carries the dtype when there is no residual
        block = next_pow2(n_cols)
        if x2.shape[0]:
            _rms_norm_fwd[(x2.shape[0],)](
                x2, r2, weight, y, res_out, rstd, x2.stride(0), r2.stride(0), y.stride(0),
                res_out.stride(0), n_cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                num_warps=num_warps_for(block))
        normalized_input = res_out if residual is not None else x2
        ctx.save_for_backward(normalized_input, weight, rstd)
        ctx.has_residual = residual is not None
        ctx.x_dtype = x.dtype
        ctx.shape = shape
        new_residual = res_out.view(shape) if residual is not None else None
        return y.view(shape), new_residual

    @staticmethod
    def backward(ctx, dy, dres):
        normalized_input, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = normalized_input.shape
        dy2 = rows_2d(dy)
        dres2 = rows_2d(dres) if dres is not None else dy2
        dx = torch.empty(n_rows, n_cols, dtype=normalized_input.dtype, device=dy.device)
        programs = persistent_programs(dy.device, n_rows)
        dw_partial = torch.zeros(programs, n_cols, dtype=torch.float32, device=dy.device)
        block = next_pow2(n_cols)
        if n_rows:
            _rms_norm_bwd[(programs,)](
                dy2, normalized_input, weight, rstd, dres2, dx, dw_partial, dy2.stride(0),
                normalized_input.stride(0), dres2.stride(0), dx.stride(0), n_rows, n_cols,
                triton.cdiv(n_rows, programs), HAS_DRES=dres is not None, BLOCK=block,
                num_warps=num_warps_for(block))
        dx = dx.view(ctx.shape)
        dw = dw_partial.sum(0).to(weight.dtype)
        if not ctx.has_residual:
            return dx.to(ctx.x_dtype), dw, None, None
        return dx.to(ctx.x_dtype), dw, None, dx


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `reference.rms_norm`: (normed, new_residual | None), differentiable."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x's last dim ({x.shape[-1]}) must match weight ({weight.shape[-1]})")
    return _RMSNorm.apply(x, weight, eps, residual)
