"""Paged-attention decode and KV-cache writes in Triton, on the engine's cache layout.

Layout (shared with the inference engine): per layer k_cache / v_cache [num_blocks, block_size,
num_kv_heads, head_dim]; block_tables [batch, max_blocks_per_seq] int32; context_lens [batch] int32
counting the cached tokens including the current one; q [batch, num_heads, head_dim].

Decode: one program per (request, kv head) serves all query heads of that GQA group, so each K/V
row is loaded once per group. It walks the context in BLOCK_N-token tiles independent of the cache
block size (any block size works, 1 included): a token's cache row is found through the block
table, and an online softmax keeps one pass over K/V. Scores use broadcast-and-sum rather than
`tl.dot`, which has 16-wide minimum tile shapes and would waste work on small GQA groups; long
contexts on big batches would profit from a split-K (flash-decoding) variant, not written yet.
The input checks and the paged index math live in `rl_engine.kernels.op_inputs`, shared with the
torch reference and FlashInfer; the kernels repeat only the per-token slot arithmetic in-kernel
(block_tables[t // block_size] * block_size + t % block_size, as `op_inputs.token_slots`).

Verified on CPU only, under the Triton interpreter (tests/kernels, against the torch reference,
fp32 and bf16). UNVERIFIED ON GPU in this repository: compiled-kernel numerics, CUDA-graph capture
of the decode kernel, and its speed (scripts/gpu_check.sh runs these tests compiled on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl_engine.kernels import op_inputs
from rl_engine.kernels.triton._launch import next_pow2

_BLOCK_N = 16


@triton.jit
def _paged_decode_kernel(Q, K_CACHE, V_CACHE, BLOCK_TABLES, CONTEXT_LENS, OUT, scale,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                         stride_vh, stride_bt, stride_ob, stride_oh, block_size, head_dim, group,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    context_len = tl.load(CONTEXT_LENS + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group
    d_mask = d < head_dim
    heads = kv_head * group + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [G, D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, context_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < context_len
        block = tl.load(BLOCK_TABLES + b * stride_bt + n // block_size, mask=n_mask, other=0)
        block = tl.where(n_mask, block, 0).to(tl.int64)  # unused table entries may be -1
        offset = (n % block_size).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K_CACHE + block[:, None] * stride_kb + offset[:, None] * stride_ks
                    + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, N]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)  # m_i = -inf on the first tile -> 0
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V_CACHE + block[:, None] * stride_vb + offset[:, None] * stride_vs
                    + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # context_len 0 (padding slot): zeros
    tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton twin of `reference.paged_decode_attention` (forward only: decode needs no grad)."""
    batch, _, num_kv_heads, head_dim, block_size, group = op_inputs.check_paged_decode(
        q, k_cache, v_cache, block_tables, context_lens)
    op_inputs.check_unit_stride("paged_decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), block_size, head_dim, group,
        BLOCK_G=next_pow2(group), BLOCK_N=_BLOCK_N, BLOCK_D=next_pow2(head_dim))
    return out


@triton.jit
def _reshape_and_cache_kernel(K, V, K_CACHE, V_CACHE, SLOTS, stride_kt, stride_kh, stride_vt,
                              stride_vh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs,
                              stride_vch, num_kv_heads, head_dim, block_size,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # slot -1 = skip; broadcast by hand (the interpreter rejects vector_mask & scalar_bool)
    valid = (h[:, None] * 0 + slot) >= 0
    mask = valid & (h[:, None] < num_kv_heads) & (d[None, :] < head_dim)
    safe_slot = tl.maximum(slot, 0)
    block = safe_slot // block_size
    offset = safe_slot % block_size
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
    tl.store(K_CACHE + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + d[None, :],
             k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :],
             v.to(V_CACHE.dtype.element_ty), mask=mask)


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton twin of `reference.reshape_and_cache`: k/v [T, num_kv_heads, head_dim] into the
    caches at slot_mapping [T] (block_id * block_size + offset; -1 skips)."""
    op_inputs.check_cache_write(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    op_inputs.check_unit_stride("reshape_and_cache", k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), num_kv_heads, head_dim, k_cache.shape[1],
        BLOCK_H=next_pow2(num_kv_heads), BLOCK_D=next_pow2(head_dim))
