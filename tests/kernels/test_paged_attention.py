"""Paged KV cache ops: reshape_and_cache and paged decode (Triton vs torch reference), and the
torch references themselves against dense attention on the same tokens.

States are built like the engine's: blocks handed out in shuffled order, requests sharing prefix
blocks, unused block-table entries -1, padding requests with context_len 0, and lengths that are
not multiples of the kernel's 16-token tile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rl_engine.kernels import op_inputs, reference


def make_paged_state(context_lens, *, block_size, num_kv_heads, head_dim, dtype, device,
                     shared_prefix_blocks=2, seed=0):
    """Per-request dense K/V [len, kv_heads, dim] and the paged caches/block tables holding them.

    Requests 0 and 1 share their first `shared_prefix_blocks` full blocks (prefix caching): their
    dense K/V agree on those tokens and their block tables point at the same blocks.
    """
    gen = torch.Generator().manual_seed(seed)
    num_blocks_per = [-(-n // block_size) for n in context_lens]
    max_blocks = max(num_blocks_per + [1])
    total_blocks = sum(num_blocks_per) + 3
    order = torch.randperm(total_blocks, generator=gen).tolist()
    k_cache = torch.zeros(total_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    dense_k, dense_v = [], []
    shared = min(shared_prefix_blocks, *(n // block_size for n in context_lens[:2])) \
        if len(context_lens) >= 2 else 0
    for i, n in enumerate(context_lens):
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        for b in range(num_blocks_per[i]):
            if i == 1 and b < shared:  # reuse request 0's block and its tokens
                block_tables[1, b] = block_tables[0, b]
                k[b * block_size:(b + 1) * block_size] = dense_k[0][b * block_size:(b + 1) * block_size]
                v[b * block_size:(b + 1) * block_size] = dense_v[0][b * block_size:(b + 1) * block_size]
            else:
                block_tables[i, b] = order.pop()
        slots = op_inputs.token_slots(block_tables[i], n, block_size)
        reference.reshape_and_cache(k, v, k_cache, v_cache, slots)
        dense_k.append(k)
        dense_v.append(v)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return dense_k, dense_v, to(k_cache), to(v_cache), to(block_tables), to(lens)


def dense_decode(q, dense_k, dense_v, scale):
    """Last-token attention per request with plain SDPA over its dense K/V (fp32)."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i, (k, v) in enumerate(zip(dense_k, dense_v)):
        if len(k) == 0:
            continue
        o = F.scaled_dot_product_attention(q[i].float()[:, None, :], k.float().transpose(0, 1),
                                           v.float().transpose(0, 1), scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out[i] = o[:, 0, :]
    return out


CASES = [  # (context_lens, block_size, num_kv_heads, group)
    ([5, 17, 1, 0, 33], 16, 2, 1),
    ([20, 20, 1, 3], 1, 1, 4),
    ([1], 16, 2, 4),
    ([40, 33, 0], 4, 2, 4),
]


@pytest.mark.parametrize(("context_lens", "block_size", "num_kv_heads", "group"), CASES)
def test_reference_decode_matches_dense_attention(context_lens, block_size, num_kv_heads, group):
    head_dim, scale = 12, 12 ** -0.5
    dense_k, dense_v, k_cache, v_cache, tables, lens = make_paged_state(
        context_lens, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=torch.float32, device="cpu")
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim)
    out = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, dense_decode(q, dense_k, dense_v, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("context_lens", "block_size", "num_kv_heads", "group"), CASES)
def test_triton_decode_matches_reference(triton_device, assert_close, dtype, context_lens,
                                         block_size, num_kv_heads, group):
    from rl_engine.kernels.triton.paged_attention import paged_decode_attention

    head_dim, scale = 12, 12 ** -0.5
    _, _, k_cache, v_cache, tables, lens = make_paged_state(
        context_lens, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=dtype, device=triton_device)
    q = torch.randn(len(context_lens), num_kv_heads * group, head_dim, device=triton_device).to(dtype)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    expected = reference.paged_decode_attention(q.float(), k_cache.float(), v_cache.float(), tables,
                                                lens, scale)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    assert torch.all(out[lens == 0] == 0)


def test_triton_decode_empty_batch(triton_device):
    from rl_engine.kernels.triton.paged_attention import paged_decode_attention

    cache = torch.zeros(2, 4, 1, 8, device=triton_device)
    out = paged_decode_attention(torch.zeros(0, 2, 8, device=triton_device), cache, cache,
                                 torch.zeros(0, 3, dtype=torch.int32, device=triton_device),
                                 torch.zeros(0, dtype=torch.int32, device=triton_device), 1.0)
    assert out.shape == (0, 2, 8)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_reshape_and_cache_matches_reference(triton_device, block_size, dtype):
    from rl_engine.kernels.triton.paged_attention import reshape_and_cache

    torch.manual_seed(0)
    num_blocks, num_kv_heads, head_dim = 40 // block_size + 1, 2, 12
    k = torch.randn(6, num_kv_heads, head_dim, device=triton_device).to(dtype)
    v = torch.randn(6, num_kv_heads, head_dim, device=triton_device).to(dtype)
    slots = torch.tensor([3, -1, 0, 17, -1, 39], dtype=torch.int32, device=triton_device)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0,
                         device=triton_device).to(dtype) for _ in range(4)]
    reshape_and_cache(k, v, caches[0], caches[1], slots)
    reference.reshape_and_cache(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    flat = caches[0].view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[17], k[3]) and torch.all(flat[1] == 7.0)  # written / untouched slots


def test_triton_reshape_and_cache_strided_kv(triton_device):
    """k and v as views into a fused qkv output (row stride > heads * dim)."""
    from rl_engine.kernels.triton.paged_attention import reshape_and_cache

    qkv = torch.randn(3, 4 * 8 + 2 * 8, device=triton_device)
    k = qkv[:, 32:40].view(3, 1, 8)
    v = qkv[:, 40:].view(3, 1, 8)
    slots = torch.tensor([2, 0, 5], device=triton_device)
    k_cache = torch.zeros(2, 4, 1, 8, device=triton_device)
    v_cache = torch.zeros_like(k_cache)
    reshape_and_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 1, 8)[slots.long()], k)
    assert torch.equal(v_cache.view(-1, 1, 8)[slots.long()], v)


@pytest.mark.parametrize(("context_lens", "query_lens"), [([9, 5, 16], [9, 2, 1]), ([3, 0], [3, 0])])
def test_reference_prefill_matches_causal_attention(context_lens, query_lens):
    """Chunked prefill over the cache = the last rows of full causal attention over the context."""
    head_dim, scale, group = 8, 8 ** -0.5, 2
    dense_k, dense_v, k_cache, v_cache, tables, lens = make_paged_state(
        context_lens, block_size=4, num_kv_heads=2, head_dim=head_dim, dtype=torch.float32,
        device="cpu")
    full_q = [torch.randn(n, 2 * group, head_dim) for n in context_lens]
    q = torch.cat([fq[n - m:] for fq, n, m in zip(full_q, context_lens, query_lens)])
    cu = torch.tensor([0] + query_lens).cumsum(0)
    out = reference.paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale)
    expected = []
    for fq, k, v, n, m in zip(full_q, dense_k, dense_v, context_lens, query_lens):
        if m:
            full = reference.varlen_causal_attention(fq, k, v, [0, n], scale)
            expected.append(full[n - m:])
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)
