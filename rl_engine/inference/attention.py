"""Paged attention for one flat batch: the `attn_context` the engine hands the policy model.

The batch is `num_single` one-token queries (decodes, one-token prefill chunks) followed by longer
prefill chunks. Per layer, `attend` writes the new k/v into the paged cache at `slot_mapping`
(block_id * block_size + offset; padding writes go to the dummy block 0), then:
- one-token queries: every row's blocks are gathered into a padded [B, L, Hkv, D] tensor and one
  SDPA call runs with a length mask (a lone row on consecutive blocks is read as a view, unmasked);
  a GQA group of query heads is laid out as SDPA's query-length axis ([B, Hkv, G, D]), so KV heads
  are never repeated. (A dense per-row copy of the decode batch's KV, saving the gather, was
  measured no faster on CPU: the gather's output is cache-hot when SDPA reads it, and both variants
  read every KV byte from memory once per layer.)
- prefill chunks: one SDPA call per sequence, over the chunk's own k/v when it starts the sequence
  (plain causal), else over its gathered cached prefix with an offset causal mask.
Index tensors and masks are built once per step (`prepare`), not per layer. On CUDA, decode calls the
`paged_decode_attention` op from the kernel registry instead (unverified here: no GPU in CI).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F



@dataclass
class PrefillChunk:
    start: int  # first row in the flat batch
    end: int
    context_len: int  # tokens with KV after this step (cached prefix + this chunk)
    block_ids: torch.Tensor | None  # [num_blocks] long, None when the chunk starts the sequence


class PagedAttention:
    """Implements the model's `AttentionContext` over per-layer caches
    [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], *, first_layer: int,
                 decode_op=None) -> None:
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.first_layer = first_layer
        self.block_size = k_caches[0].shape[1]
        self.num_kv_heads = k_caches[0].shape[2]
        self.head_dim = k_caches[0].shape[3]
        self._k_flat = [k.view(-1, self.num_kv_heads, self.head_dim) for k in k_caches]
        self._v_flat = [v.view(-1, self.num_kv_heads, self.head_dim) for v in v_caches]
        self.decode_op = decode_op  # a registry kernel (CUDA); None: SDPA below
        self.slot_mapping: torch.Tensor | None = None
        self.num_single = 0
        self.max_context_len = 0  # longest context among the one-token rows
        self.decode_len = 0  # context length the one-token rows' keys are padded to
        self.decode_mask: torch.Tensor | None = None  # [B, 1, 1, decode_len] bool; None for a lone row
        self.decode_blocks: torch.Tensor | None = None  # [B * nb] block ids, row-major
        self.decode_span: tuple[int, int] | None = None  # a lone row's consecutive blocks [start, end)
        self.block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 (registry op)
        self.context_lens: torch.Tensor | None = None  # [B] int32 (registry op)
        self.prefills: list[PrefillChunk] = []

    def prepare(self, *, slot_mapping: torch.Tensor, num_single: int, block_tables: torch.Tensor | None,
                context_lens: torch.Tensor | None, max_context_len: int, prefills: list[PrefillChunk],
                first_block: int | None = None) -> None:
        """Set this step's metadata. block_tables [B, >= nb] and context_lens [B] describe the
        `num_single` one-token rows; `max_context_len` is the longest of their contexts. `first_block`:
        a lone row whose blocks are first_block, first_block + 1, ... (read as a view)."""
        self.slot_mapping = slot_mapping
        self.num_single = num_single
        self.prefills = prefills
        self.block_tables = block_tables
        self.context_lens = context_lens
        self.max_context_len = max_context_len
        if num_single and self.decode_op is None:
            nb = -(-max_context_len // self.block_size)
            self.decode_len = nb * self.block_size
            self.decode_span = None
            self.decode_mask = None
            if num_single > 1:
                self.decode_blocks = block_tables[:num_single, :nb].reshape(-1).long()
                positions = torch.arange(self.decode_len, device=context_lens.device)
                self.decode_mask = (positions[None, :] < context_lens[:num_single, None])[:, None, None, :]
            elif first_block is not None:
                self.decode_span = (first_block, first_block + nb)
            else:
                self.decode_blocks = block_tables[0, :nb].long()

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float) -> torch.Tensor:
        i = layer_idx - self.first_layer
        k_flat, v_flat = self._k_flat[i], self._v_flat[i]
        k_flat.index_copy_(0, self.slot_mapping, k)
        v_flat.index_copy_(0, self.slot_mapping, v)
        nd = self.num_single
        if not self.prefills:
            return self._decode(i, q, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(i, q[:nd], scale)
        kc, vc = self.k_caches[i], self.v_caches[i]
        gqa = q.shape[1] != k.shape[1]
        for c in self.prefills:
            qs = q[c.start:c.end].transpose(0, 1)  # [Hq, n, D]
            if c.block_ids is None:
                ks, vs = k[c.start:c.end].transpose(0, 1), v[c.start:c.end].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                n, ctx = c.end - c.start, c.context_len
                ks = kc[c.block_ids].view(-1, self.num_kv_heads, self.head_dim)[:ctx].transpose(0, 1)
                vs = vc[c.block_ids].view(-1, self.num_kv_heads, self.head_dim)[:ctx].transpose(0, 1)
                q_pos = torch.arange(ctx - n, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [n, ctx]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
            out[c.start:c.end] = o.transpose(0, 1)
        return out

    def _decode(self, i: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """One query token per sequence: q [B, Hq, D] -> [B, Hq, D]."""
        B, Hq, D = q.shape
        if self.decode_op is not None:
            return self.decode_op(q, self.k_caches[i], self.v_caches[i], self.block_tables[:B],
                                  self.context_lens[:B], scale)
        Hkv, L = self.num_kv_heads, self.decode_len
        if self.decode_span is not None:
            start, end = self.decode_span
            k, v = self.k_caches[i][start:end].view(B, L, Hkv, D), self.v_caches[i][start:end].view(B, L, Hkv, D)
        else:  # index_select of flat block ids is ~1.7x faster than kc[blocks[B, nb]]
            k = self.k_caches[i].index_select(0, self.decode_blocks).view(B, L, Hkv, D)
            v = self.v_caches[i].index_select(0, self.decode_blocks).view(B, L, Hkv, D)
        if self.decode_mask is None:  # a lone row: its exact context, no mask
            k, v = k[:, :self.max_context_len], v[:, :self.max_context_len]
        o = F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=self.decode_mask, scale=scale)
        return o.reshape(B, Hq, D)
