"""Input checks and index math shared by every backend of the paged-attention and sampling ops.

The torch reference, the FlashInfer adapter and the Triton kernels take the same arguments; this
module is the one place that says what those arguments must look like and how a token finds its
cache slot, so the backends cannot drift apart. The paged layout (the inference engine's):

- k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], one pair per layer;
- block_tables: [batch, max_blocks] int, entries past a request's blocks may hold anything (-1);
- context_lens: [batch] int, cached tokens including the new ones; 0 marks a padding request;
- token t of a request lives in block block_tables[b, t // block_size] at offset t % block_size,
  i.e. at flat slot block * block_size + offset (`slot_mapping` in `reshape_and_cache`).

The shape checks read only tensor metadata (no device sync), so they are safe inside a CUDA-graph
capture; `check_block_capacity` reads values and is for the paths that synchronise anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PagedDims(NamedTuple):
    """The sizes of one paged-attention call, read from its arguments."""

    batch: int  # requests
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    group: int  # query heads per kv head (GQA)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_caches_and_q(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> PagedDims:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads,"
                         f" head_dim]; got {_shape(k_cache)} and {_shape(v_cache)}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(f"{op}: q {_shape(q)} does not fit the cache {_shape(k_cache)}: q must be"
                         f" [tokens, num_heads, head_dim={head_dim}] with num_heads a multiple of"
                         f" num_kv_heads={num_kv_heads}")
    return PagedDims(batch=0, num_heads=q.shape[1], num_kv_heads=num_kv_heads, head_dim=head_dim,
                     block_size=block_size, group=q.shape[1] // num_kv_heads)


def check_tables(op: str, block_tables: torch.Tensor, context_lens: torch.Tensor) -> int:
    if block_tables.dim() != 2 or context_lens.shape != block_tables.shape[:1]:
        raise ValueError(f"{op}: block_tables must be [batch, max_blocks] and context_lens [batch];"
                         f" got {_shape(block_tables)} and {_shape(context_lens)}")
    if block_tables.dtype.is_floating_point or context_lens.dtype.is_floating_point:
        raise ValueError(f"{op}: block_tables and context_lens must be integer tensors; got"
                         f" {block_tables.dtype} and {context_lens.dtype}")
    return block_tables.shape[0]


def check_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, context_lens: torch.Tensor) -> PagedDims:
    """Check a `paged_decode_attention` call (q [batch, num_heads, head_dim], one query per
    request) and return its sizes. Raises ValueError naming the mismatched shapes."""
    op = "paged_decode_attention"
    dims = _check_caches_and_q(op, q, k_cache, v_cache)
    batch = check_tables(op, block_tables, context_lens)
    if q.shape[0] != batch:
        raise ValueError(f"{op}: q has {q.shape[0]} rows but block_tables has {batch} requests"
                         " (decode takes one query per request)")
    return dims._replace(batch=batch)


def check_paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        context_lens: torch.Tensor) -> PagedDims:
    """Check a `paged_prefill_attention` call (q [T, num_heads, head_dim] packed by request,
    cu_seqlens_q [batch + 1]) and return its sizes."""
    op = "paged_prefill_attention"
    dims = _check_caches_and_q(op, q, k_cache, v_cache)
    batch = check_tables(op, block_tables, context_lens)
    if cu_seqlens_q.shape != (batch + 1,):
        raise ValueError(f"{op}: cu_seqlens_q must be [batch + 1] = [{batch + 1}] (cumulative query"
                         f" lengths starting at 0); got {_shape(cu_seqlens_q)}")
    return dims._replace(batch=batch)


def check_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Check a `reshape_and_cache` call: k/v [T, num_kv_heads, head_dim], slot_mapping [T]."""
    if (k.dim() != 3 or v.shape != k.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape
            or k_cache.shape[2:] != k.shape[1:]):
        raise ValueError(f"reshape_and_cache: k {_shape(k)} / v {_shape(v)} must be [tokens,"
                         f" num_kv_heads, head_dim] of the caches {_shape(k_cache)} / {_shape(v_cache)}")
    if slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"reshape_and_cache: slot_mapping must be [tokens] = [{k.shape[0]}]; got"
                         f" {_shape(slot_mapping)}")


def check_rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Check a `rotary_kv_write` call: q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim] of the caches,
    cos/sin fp32 [T, rotary_dim // 2] with rotary_dim <= head_dim, slot_mapping [T] int, one dtype for q, k, v
    and the caches. Raises ValueError naming the mismatch."""
    op = "rotary_kv_write"
    check_cache_write(k, v, k_cache, v_cache, slot_mapping)
    if q.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q {_shape(q)} must be [tokens={k.shape[0]}, num_heads, head_dim={k.shape[2]}]"
                         f" like k {_shape(k)}")
    if cos.dim() != 2 or sin.shape != cos.shape or cos.shape[0] != q.shape[0] or not 0 < 2 * cos.shape[1] <= q.shape[2]:
        raise ValueError(f"{op}: cos {_shape(cos)} / sin {_shape(sin)} must both be [tokens={q.shape[0]},"
                         f" rotary_dim // 2] with 0 < rotary_dim <= head_dim={q.shape[2]}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"{op}: cos / sin must be float32 (the rotary tables); got {cos.dtype} and {sin.dtype}")
    if slot_mapping.dtype.is_floating_point:
        raise ValueError(f"{op}: slot_mapping must be an integer tensor; got {slot_mapping.dtype}")
    dtypes = {t.dtype for t in (q, k, v, k_cache, v_cache)}
    if len(dtypes) > 1:
        raise ValueError(f"{op}: q, k, v and the caches must share a dtype; got q {q.dtype}, k {k.dtype},"
                         f" v {v.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")


def check_slots_in_cache(op: str, slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Every slot of `slot_mapping` is inside the cache or negative (no write); reads the slots (not when traced)."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    bad = slot_mapping[slot_mapping >= num_slots]
    if bad.numel():
        raise ValueError(f"{op}: slot_mapping holds slot {int(bad[0])}, outside the cache's {num_slots} slots"
                         f" ({k_cache.shape[0]} blocks x block_size {k_cache.shape[1]}); a slot is block * block_size"
                         " + offset, a negative slot (-1) skips the token's write")


def check_unit_stride(op: str, **tensors: torch.Tensor) -> None:
    """Kernels that address rows by strides need the last dimension contiguous."""
    bad = [name for name, t in tensors.items() if t.stride(-1) != 1]
    if bad:
        raise ValueError(f"{op} needs a unit stride in the last dimension of {', '.join(bad)}"
                         " (pass .contiguous() tensors, or views that keep head_dim contiguous)")


def blocks_needed(context_lens: torch.Tensor | int, block_size: int) -> torch.Tensor | int:
    """Cache blocks holding `context_lens` tokens: ceil(context_len / block_size), elementwise."""
    if isinstance(context_lens, int):
        return -(-context_lens // block_size)
    return (context_lens.to(torch.int64) + block_size - 1) // block_size


def last_block_len(context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Tokens in each request's last block, in [1, block_size]; 0 for an empty request. [batch] int64."""
    lens = context_lens.to(torch.int64)
    return torch.where(lens > 0, lens - (blocks_needed(lens, block_size) - 1) * block_size, 0)


def check_block_capacity(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> None:
    """Every context fits the block table's columns (reads values: synchronises on a GPU)."""
    if block_tables.shape[0] == 0:
        return
    most = int(blocks_needed(context_lens, block_size).max())
    if most > block_tables.shape[1]:
        raise ValueError(f"a context of up to {int(context_lens.max())} tokens needs {most} blocks of"
                         f" {block_size} but block_tables has only {block_tables.shape[1]} columns")


def token_slots(block_table: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of tokens 0..num_tokens-1 of one request (block_table [max_blocks]): [n] int64."""
    t = torch.arange(num_tokens, device=block_table.device)
    return block_table.long()[t // block_size] * block_size + t % block_size


def sampling_limits(top_k: torch.Tensor | int, top_p: torch.Tensor | float, *, batch: int, vocab: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k (int64; <= 0 or > vocab means the whole vocabulary, so `vocab`) and top-p
    (fp32) of `top_k_top_p_sampling`, broadcast from scalars or [batch] tensors."""
    top_k = torch.as_tensor(top_k, device=device)
    top_p = torch.as_tensor(top_p, device=device, dtype=torch.float32)
    if top_k.dim() > 1 or top_p.dim() > 1 or top_k.numel() not in (1, batch) or top_p.numel() not in (1, batch):
        raise ValueError(f"top_k_top_p_sampling: top_k {_shape(top_k)} and top_p {_shape(top_p)} must"
                         f" be scalars or [batch] = [{batch}]")
    top_k = top_k.to(torch.int64).expand(batch)
    return torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k), top_p.expand(batch)
