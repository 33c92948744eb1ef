"""FlashInfer adapter: the pure-torch page-table conversion on CPU; the attention calls on CUDA."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import reference
from rl_engine.kernels.flashinfer_adapter import flashinfer_page_table

needs_flashinfer = pytest.mark.skipif(not torch.cuda.is_available(),
                                      reason="FlashInfer attention needs CUDA (unverified on CPU)")


def test_page_table_from_block_tables():
    block_tables = torch.tensor([[7, 2, -1, -1], [3, 9, 4, 0], [5, -1, -1, -1], [0, 0, 0, 0]],
                                dtype=torch.int32)
    context_lens = torch.tensor([5, 12, 1, 0], dtype=torch.int32)
    table = flashinfer_page_table(block_tables, context_lens, block_size=4)
    assert table.indptr.tolist() == [0, 2, 5, 6, 6]
    assert table.indices.tolist() == [7, 2, 3, 9, 4, 5]
    assert table.last_page_len.tolist() == [1, 4, 1, 0]
    assert table.indptr.dtype == table.indices.dtype == table.last_page_len.dtype == torch.int32


@pytest.mark.parametrize("block_size", [1, 16])
def test_page_table_reconstructs_every_token_slot(block_size):
    """Walking FlashInfer's table visits the same cache slots as our block tables, token by token."""
    gen = torch.Generator().manual_seed(0)
    lens = [1, 17, 33, 16]
    max_blocks = max(-(-n // block_size) for n in lens) + 1
    block_tables = torch.randint(0, 100, (len(lens), max_blocks), generator=gen, dtype=torch.int32)
    table = flashinfer_page_table(block_tables, torch.tensor(lens, dtype=torch.int32), block_size)
    for b, n in enumerate(lens):
        pages = table.indices[table.indptr[b]:table.indptr[b + 1]].tolist()
        page_lens = [block_size] * (len(pages) - 1) + [int(table.last_page_len[b])]
        slots = [p * block_size + o for p, length in zip(pages, page_lens) for o in range(length)]
        expected = [int(block_tables[b, t // block_size]) * block_size + t % block_size for t in range(n)]
        assert slots == expected


def test_page_table_rejects_too_short_block_table():
    with pytest.raises(ValueError, match="blocks"):
        flashinfer_page_table(torch.zeros(1, 2, dtype=torch.int32),
                              torch.tensor([9], dtype=torch.int32), block_size=4)


@pytest.mark.cuda
@needs_flashinfer
@pytest.mark.parametrize("group", [1, 4])
def test_flashinfer_decode_matches_reference(group):
    pytest.importorskip("flashinfer", reason="flashinfer is not installed")
    from rl_engine.kernels.flashinfer_adapter import paged_decode_attention

    torch.manual_seed(0)
    block_size, num_kv_heads, head_dim = 16, 2, 64
    k_cache = torch.randn(12, block_size, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.tensor([[3, 1, 7], [0, 5, -1], [2, -1, -1]], dtype=torch.int32, device="cuda")
    lens = torch.tensor([40, 17, 1], dtype=torch.int32, device="cuda")
    q = torch.randn(3, num_kv_heads * group, head_dim, device="cuda", dtype=torch.bfloat16)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, head_dim ** -0.5)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@needs_flashinfer
def test_flashinfer_prefill_matches_reference():
    pytest.importorskip("flashinfer", reason="flashinfer is not installed")
    from rl_engine.kernels.flashinfer_adapter import paged_prefill_attention

    torch.manual_seed(0)
    k_cache = torch.randn(12, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.tensor([[3, 1, 7], [0, 5, -1]], dtype=torch.int32, device="cuda")
    lens = torch.tensor([40, 17], dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, 8, 25], dtype=torch.int32, device="cuda")  # a chunk, a full prompt
    q = torch.randn(25, 8, 64, device="cuda", dtype=torch.bfloat16)
    out = paged_prefill_attention(q, k_cache, v_cache, block_tables, cu, lens, 0.125)
    expected = reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu, lens, 0.125)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
