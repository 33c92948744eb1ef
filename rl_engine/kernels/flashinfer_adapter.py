"""FlashInfer adapter: paged prefill/decode attention and top-k/top-p sampling on the engine's caches.

UNVERIFIED ON CPU: everything that calls FlashInfer needs CUDA and the `flashinfer` package and has
never run in this repository's CI (no GPU there); only the pure-torch page-table conversion
(`flashinfer_page_table`) is tested on CPU. FlashInfer is imported through `backends` only.

Design: our caches already match FlashInfer's "NHD" paged layout (one [num_pages, page_size,
num_kv_heads, head_dim] tensor for K and one for V, passed as a tuple), so only the page table is
converted: per request, its first ceil(context_len / block_size) block-table entries, concatenated
(`indices`, with CSR offsets `indptr`), and the fill of its last page (`last_page_len`).
`FlashInferAttention` plans once per engine step and runs per layer (the fast path); the
module-level functions share the reference ops' signatures for the registry and plan on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rl_engine.kernels import backends, op_inputs

_WORKSPACE_BYTES = 128 * 1024 * 1024
_workspaces: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class PageTable:
    """FlashInfer's CSR page table: pages of request b are indices[indptr[b]:indptr[b + 1]]."""

    indptr: torch.Tensor  # [batch + 1] int32
    indices: torch.Tensor  # [total_pages] int32
    last_page_len: torch.Tensor  # [batch] int32, in [1, block_size] (0 for an empty request)


def flashinfer_page_table(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int
) -> PageTable:
    """Convert our block tables ([batch, max_blocks] int32, entries past a request's pages ignored)
    and context lengths ([batch] int32) into FlashInfer's page table. Pure torch, any device."""
    op_inputs.check_tables("flashinfer_page_table", block_tables, context_lens)
    op_inputs.check_block_capacity(block_tables, context_lens, block_size)
    num_pages = op_inputs.blocks_needed(context_lens, block_size)  # [batch] int64
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < num_pages[:, None]
    indices = block_tables[used].to(torch.int32)  # row-major: request by request, in page order
    indptr = torch.zeros(block_tables.shape[0] + 1, dtype=torch.int32, device=block_tables.device)
    indptr[1:] = num_pages.cumsum(0)
    last_page_len = op_inputs.last_block_len(context_lens, block_size)
    return PageTable(indptr=indptr, indices=indices, last_page_len=last_page_len.to(torch.int32))


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _workspaces:
        _workspaces[device] = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[device]


class FlashInferAttention:
    """Paged attention through FlashInfer's wrappers: `plan_*` once per step, `run_*` per layer.

    UNVERIFIED ON CPU (needs CUDA + flashinfer). Wrappers hold planning state, so one instance per
    engine (or per CUDA-graph batch bucket) and device.
    """

    def __init__(self, device: torch.device | str, *, num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, scale: float) -> None:
        flashinfer = backends.import_flashinfer()
        self.device = torch.device(device)
        workspace = _workspace(self.device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.scale = block_size, scale

    def plan_decode(self, block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                    q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        table = flashinfer_page_table(block_tables, context_lens, self.block_size)
        self._decode.plan(table.indptr, table.indices, table.last_page_len, self.num_heads,
                          self.num_kv_heads, self.head_dim, self.block_size,
                          pos_encoding_mode="NONE", sm_scale=self.scale, q_data_type=q_dtype,
                          kv_data_type=kv_dtype)

    def run_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [batch, num_heads, head_dim] -> [batch, num_heads, head_dim]."""
        return self._decode.run(q, (k_cache, v_cache))

    def plan_prefill(self, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     context_lens: torch.Tensor, *, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        table = flashinfer_page_table(block_tables, context_lens, self.block_size)
        self._prefill.plan(cu_seqlens_q.to(torch.int32), table.indptr, table.indices,
                           table.last_page_len, self.num_heads, self.num_kv_heads, self.head_dim,
                           self.block_size, causal=True, sm_scale=self.scale, q_data_type=q_dtype,
                           kv_data_type=kv_dtype)

    def run_prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [T, num_heads, head_dim] packed by request -> [T, num_heads, head_dim]."""
        return self._prefill.run(q, (k_cache, v_cache))


def _one_shot(q: torch.Tensor, k_cache: torch.Tensor, scale: float) -> FlashInferAttention:
    return FlashInferAttention(q.device, num_heads=q.shape[1], num_kv_heads=k_cache.shape[2],
                               head_dim=q.shape[2], block_size=k_cache.shape[1], scale=scale)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """FlashInfer twin of `reference.paged_decode_attention` (plans per call). UNVERIFIED ON CPU.

    Requests with context_len 0 get zeros, as in the reference (FlashInfer is not asked about them).
    Not CUDA-graph capturable (host sync, per-call plan): inside graphs use `FlashInferAttention`
    with `plan_decode` outside the captured region, or the Triton kernel.
    """
    op_inputs.check_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    out = torch.zeros_like(q)
    live = context_lens > 0
    if not bool(live.any()):
        return out
    attention = _one_shot(q, k_cache, scale)
    attention.plan_decode(block_tables[live], context_lens[live], q_dtype=q.dtype, kv_dtype=k_cache.dtype)
    out[live] = attention.run_decode(q[live].contiguous(), k_cache, v_cache)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """FlashInfer twin of `reference.paged_prefill_attention` (plans per call). UNVERIFIED ON CPU."""
    op_inputs.check_paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    attention = _one_shot(q, k_cache, scale)
    attention.plan_prefill(block_tables, cu_seqlens_q, context_lens, q_dtype=q.dtype,
                           kv_dtype=k_cache.dtype)
    return attention.run_prefill(q, k_cache, v_cache)


def top_k_top_p_sampling(
    probs: torch.Tensor,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FlashInfer twin of `reference.top_k_top_p_sampling` (top-k first, then top-p). UNVERIFIED ON CPU.

    Same distribution as the reference, not the same draws: the random streams differ.
    """
    flashinfer = backends.import_flashinfer()
    batch, vocab = probs.shape
    top_k, top_p = op_inputs.sampling_limits(top_k, top_p, batch=batch, vocab=vocab, device=probs.device)
    kwargs: dict[str, Any] = {"filter_apply_order": "top_k_first"}
    if generator is not None:
        kwargs["generator"] = generator
    samples = flashinfer.sampling.top_k_top_p_sampling_from_probs(
        probs.float().contiguous(), top_k.to(torch.int32).contiguous(), top_p.contiguous(), **kwargs)
    return samples.to(torch.int64)
