"""MoE token permute / unpermute (the dispatcher's local reorder) in Triton.

The index bookkeeping (a stable sort of the flat expert ids, counts per expert, the inverse
permutation) is small and stays in torch (`reference.sort_by_expert`), so every backend orders rows
identically. Triton moves the hidden rows: permute gathers token rows into expert order; unpermute
gathers each token's k rows back and sums them with the top-k weights in fp32. Each is the other's
backward (permute's backward is an unweighted unpermute); unpermute's backward scatters weighted
gradient rows and computes the weight gradients (row . grad) in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl_engine.kernels.reference import MoePermutation, sort_by_expert
from rl_engine.kernels.triton._launch import next_pow2, num_warps_for

_MAX_BLOCK_H = 1024


@triton.jit
def _gather_rows(SRC, DST, INDEX, stride_src, stride_dst, hidden, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    src = tl.load(INDEX + row).to(tl.int64)
    x = tl.load(SRC + src * stride_src + cols, mask=mask, other=0.0)
    tl.store(DST + row * stride_dst + cols, x, mask=mask)


@triton.jit
def _combine_rows(ROWS, WEIGHTS, SLOT_TO_ROW, OUT, stride_rows, stride_out, hidden, top_k,
                  HAS_WEIGHTS: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in range(0, top_k):
        r = tl.load(SLOT_TO_ROW + t * top_k + j).to(tl.int64)
        x = tl.load(ROWS + r * stride_rows + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            x = x * tl.load(WEIGHTS + t * top_k + j).to(tl.float32)
        acc += x
    tl.store(OUT + t * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd(GRAD_OUT, ROWS, WEIGHTS, SLOT_TO_ROW, GRAD_ROWS, GRAD_W, stride_go, stride_rows,
                   stride_gr, hidden, top_k, BLOCK_H: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)  # flat (token, j)
    t = slot // top_k
    r = tl.load(SLOT_TO_ROW + slot).to(tl.int64)
    w = tl.load(WEIGHTS + slot).to(tl.float32)
    dot = tl.zeros([BLOCK_H], tl.float32)
    for start in range(0, hidden, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < hidden
        g = tl.load(GRAD_OUT + t * stride_go + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(ROWS + r * stride_rows + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(GRAD_ROWS + r * stride_gr + cols, (g * w).to(GRAD_ROWS.dtype.element_ty), mask=mask)
        dot += g * x
    tl.store(GRAD_W + slot, tl.sum(dot, axis=0))


def _block(hidden: int) -> int:
    return min(next_pow2(hidden), _MAX_BLOCK_H)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _combine(rows: torch.Tensor, slot_to_row: torch.Tensor, weights: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    num_tokens, top_k = slot_to_row.shape
    hidden = rows.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=rows.device)
    if out.numel():
        block = _block(hidden)
        _combine_rows[(num_tokens, triton.cdiv(hidden, block))](
            rows, weights if weights is not None else rows, slot_to_row.contiguous(), out,
            rows.stride(0), out.stride(0), hidden, top_k, HAS_WEIGHTS=weights is not None,
            BLOCK_H=block, num_warps=num_warps_for(block))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, row_to_token, slot_to_row):
        hidden = _unit_rows(hidden)
        out = torch.empty(row_to_token.numel(), hidden.shape[1], dtype=hidden.dtype,
                          device=hidden.device)
        if out.numel():
            block = _block(hidden.shape[1])
            _gather_rows[(out.shape[0], triton.cdiv(hidden.shape[1], block))](
                hidden, out, row_to_token, hidden.stride(0), out.stride(0), hidden.shape[1],
                BLOCK_H=block, num_warps=num_warps_for(block))
        ctx.save_for_backward(slot_to_row)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        (slot_to_row,) = ctx.saved_tensors
        return _combine(_unit_rows(grad_rows), slot_to_row, None, ctx.hidden_dtype), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, slot_to_row, topk_weights):
        expert_out = _unit_rows(expert_out)
        topk_weights = topk_weights.contiguous()
        ctx.save_for_backward(expert_out, slot_to_row, topk_weights)
        return _combine(expert_out, slot_to_row, topk_weights, expert_out.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, slot_to_row, topk_weights = ctx.saved_tensors
        grad_out = _unit_rows(grad_out)
        grad_rows = torch.empty_like(expert_out)
        grad_w = torch.empty(topk_weights.shape, dtype=torch.float32, device=grad_out.device)
        if slot_to_row.numel():
            _unpermute_bwd[(slot_to_row.numel(),)](
                grad_out, expert_out, topk_weights, slot_to_row.contiguous(), grad_rows, grad_w,
                grad_out.stride(0), expert_out.stride(0), grad_rows.stride(0), expert_out.shape[1],
                slot_to_row.shape[1], BLOCK_H=_block(expert_out.shape[1]))
        return grad_rows, None, grad_w.to(topk_weights.dtype)


def moe_permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> MoePermutation:
    """Triton twin of `reference.moe_permute`; differentiable in `hidden`."""
    row_to_token, tokens_per_expert, slot_to_row = sort_by_expert(topk_ids, num_experts)
    permuted = _Permute.apply(hidden, row_to_token, slot_to_row)
    return MoePermutation(permuted, tokens_per_expert, slot_to_row, row_to_token)


def moe_unpermute(
    expert_out: torch.Tensor, slot_to_row: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Triton twin of `reference.moe_unpermute`; differentiable in expert_out and topk_weights."""
    if slot_to_row.shape != topk_weights.shape:
        raise ValueError(f"moe_unpermute: slot_to_row {tuple(slot_to_row.shape)} and topk_weights"
                         f" {tuple(topk_weights.shape)} must both be [T, k]")
    return _Unpermute.apply(expert_out, slot_to_row, topk_weights)
