"""Fused log-prob + entropy in Triton: per-shard softmax statistics and the logits gradient.

The plumbing (stat merging across tensor-parallel shards, autograd) is `rl_engine.kernels.logprob`;
this module supplies its two heavy pieces. Statistics: one program per token walks the shard's
vocabulary in BLOCK_V chunks with a per-lane online softmax (lane-wise max, rescaled sums of
exp(z - max) and of exp(z - max) (z - max), the stable entropy term), reduced across lanes at the end, so the [T, V] logits are read once and nothing of size V is written.
Gradient: a 2-D grid (token, vocab chunk) writes (g_lp (onehot - p) - g_H p (log p + H)) / tau.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from rl_engine.kernels.logprob import ShardStats, logprob_entropy_with, num_valid_columns
from rl_engine.kernels.triton._launch import next_pow2, num_warps_for

_MAX_BLOCK_V = 2048


@triton.jit
def _stats_kernel(LOGITS, TARGETS, STATS, stride_l, num_tokens, n_valid, vocab_start, temperature,
                  BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)  # sum exp(z - m) per lane
    a = tl.zeros([BLOCK_V], tl.float32)  # sum exp(z - m) (z - m) per lane (the stable entropy term)
    for start in range(0, n_valid, BLOCK_V):
        cols = start + lanes
        mask = cols < n_valid
        z = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z = z / temperature
        m_new = tl.maximum(m, z)
        # lanes that have seen only -inf keep a finite shift, so no -inf - -inf = nan appears
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        # re-centre the lane's sum at the new max: sum e'(z - m_new) = alpha (A + (m - m_new) S)
        a = alpha * (a + tl.where(s > 0, m - shift, 0.0) * s) + e * tl.where(e > 0, z - shift, 0.0)
        s = s * alpha + e
        m = m_new
    row_max = tl.max(m, axis=0)
    row_shift = tl.where(row_max > float("-inf"), row_max, 0.0)
    rescale = tl.exp(m - row_shift)
    a = rescale * (a + tl.where(s > 0, m - row_shift, 0.0) * s)
    target = tl.load(TARGETS + row).to(tl.int64) - vocab_start
    in_shard = (target >= 0) & (target < n_valid)
    target_logit = tl.load(LOGITS + row * stride_l + tl.where(in_shard, target, 0))
    target_logit = tl.where(in_shard, target_logit.to(tl.float32) / temperature, 0.0)
    tl.store(STATS + row, row_max)
    tl.store(STATS + num_tokens + row, tl.sum(s * rescale, axis=0))
    tl.store(STATS + 2 * num_tokens + row, tl.sum(a, axis=0))
    tl.store(STATS + 3 * num_tokens + row, target_logit)


@triton.jit
def _grad_kernel(LOGITS, TARGETS, GRAD_LP, GRAD_H, LSE, ENTROPY, GRAD, stride_l, stride_g, n_local,
                 n_valid, vocab_start, temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < n_valid
    z = tl.load(LOGITS + row * stride_l + cols, mask=valid, other=0.0).to(tl.float32) / temperature
    log_p = z - tl.load(LSE + row)
    p = tl.where(valid, tl.exp(log_p), 0.0)
    g_lp = tl.load(GRAD_LP + row).to(tl.float32)
    g_h = tl.load(GRAD_H + row).to(tl.float32)
    target = tl.load(TARGETS + row).to(tl.int64) - vocab_start
    grad = -p * (g_lp + g_h * (log_p + tl.load(ENTROPY + row)))
    grad = tl.where(cols == target, grad + g_lp, grad)  # cols only reach n_valid via `valid` below
    grad = tl.where(valid, grad / temperature, 0.0)
    tl.store(GRAD + row * stride_g + cols, grad.to(GRAD.dtype.element_ty), mask=cols < n_local)


def _unit_stride(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def logprob_shard_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    block_v: int | None = None,
) -> ShardStats:
    """Triton twin of `logprob.logprob_shard_stats` (`block_v` only for tests of the chunking)."""
    logits = _unit_stride(logits)
    num_tokens, num_local = logits.shape
    n_valid = num_valid_columns(num_local, vocab_start, vocab_size)
    stats = torch.empty(4, num_tokens, dtype=torch.float32, device=logits.device)
    block = block_v or min(next_pow2(num_local), _MAX_BLOCK_V)
    if num_tokens:
        _stats_kernel[(num_tokens,)](logits, targets, stats, logits.stride(0), num_tokens, n_valid,
                                     vocab_start, float(temperature), BLOCK_V=block,
                                     num_warps=num_warps_for(block))
    return ShardStats(*stats)


def logprob_entropy_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logsumexp: torch.Tensor,
    entropy: torch.Tensor,
    *,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Triton twin of `logprob.logprob_entropy_grad`: d(loss)/d(logits) of this shard."""
    logits = _unit_stride(logits)
    num_tokens, num_local = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    block = block_v or min(next_pow2(num_local), _MAX_BLOCK_V)
    if num_tokens:
        _grad_kernel[(num_tokens, triton.cdiv(num_local, block))](
            logits, targets, grad_logprobs.contiguous(), grad_entropy.contiguous(), logsumexp,
            entropy, grad, logits.stride(0), grad.stride(0), num_local,
            num_valid_columns(num_local, vocab_start, vocab_size), vocab_start, float(temperature),
            BLOCK_V=block, num_warps=num_warps_for(block))
    return grad


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `logprob.logprob_entropy`: (logprobs [T], entropy [T]) fp32, differentiable."""
    return logprob_entropy_with(logprob_shard_stats, logprob_entropy_grad, logits, targets,
                                temperature=temperature, vocab_start=vocab_start,
                                vocab_size=vocab_size, process_group=process_group)
