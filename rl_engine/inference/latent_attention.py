"""Paged attention over a latent KV cache, for multi-head latent attention (DeepSeek-V2/V3).

Each layer's cache is [num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]: per token the
normed compressed latent c and the rotated shared key k_pe, instead of k and v per head. The step's
metadata (slot mapping, decode chunks of gathered blocks, prefill chunks) is `PagedAttention`'s,
prepared by one held inside over the same caches as a single "KV head" of that width.

- Decode (one-token rows) takes the absorbed form: kv_b's key half W_uk folds into the query,
  q_lat = q_nope W_uk [H, kv_lora_rank], so that [q_lat | q_pe] . [c | k_pe] is the score, the
  latents themselves are the values, and W_uv maps each head's attended latent to its output. One
  SDPA call per chunk of rows, with the heads on the query-length axis over the one cached "head",
  values the first kv_lora_rank columns of the gathered keys: nothing per head is ever expanded.
- A prefill chunk that starts its sequence takes the expanded form (kv_b applied to its own latents),
  like training. A chunk after a cached prefix (chunked prefill, a speculative verify chunk, a
  prefix-cache hit) takes the absorbed form over the gathered cached rows with an offset causal
  mask: expanding the whole prefix through kv_b for a few query tokens would cost far more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rl_engine.inference.attention import PagedAttention


def absorbed_attention(attn, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """The last n = len(q_nope) tokens of a sequence against its cached rows [ctx, kv_lora_rank +
    rope] (theirs included), causal, in the absorbed form: [n, H, nope], [n, H, rope] -> [n, H, v].
    The n * H (token, head) query rows share the one latent "KV head" (SDPA's query-length axis)."""
    n, H = q_nope.shape[:2]
    ctx, width = cached.shape
    w_uk, w_uv = attn.absorbed_weights()  # [H, nope, r], [H, v, r]
    r = w_uk.shape[2]
    q = torch.cat((torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe), dim=-1).view(1, 1, n * H, width)
    mask = None
    if n > 1:
        positions = torch.arange(ctx, device=q.device)
        mask = (positions[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]).repeat_interleave(H, dim=0)
    k = cached.view(1, 1, ctx, width)
    o_lat = F.scaled_dot_product_attention(q, k, k[..., :r], attn_mask=mask, scale=attn.scale).view(n, H, r)
    return torch.einsum("thr,hvr->thv", o_lat, w_uv)


class PagedLatentAttention:
    """The model's attention context for MLA layers: `attend_latent` (see `MLAttention.forward`)."""

    def __init__(self, caches: list[torch.Tensor], *, first_layer: int, kv_lora_rank: int) -> None:
        self.caches = caches
        self.first_layer = first_layer
        self.kv_lora_rank = kv_lora_rank
        self.width = caches[0].shape[3]
        self._flat = [c.view(-1, self.width) for c in caches]
        # Metadata only: K and V of this PagedAttention are the same latent caches.
        self.meta = PagedAttention(caches, caches, first_layer=first_layer)
        self.block_size = self.meta.block_size

    def prepare(self, **kw) -> None:
        self.meta.prepare(**kw)

    def attend_latent(self, layer_idx: int, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                      k_pe: torch.Tensor) -> torch.Tensor:
        """Store this step's [latent | k_pe] rows; q_nope [T, H, nope], q_pe [T, H, rope] -> [T, H, v_head_dim]."""
        i = layer_idx - self.first_layer
        m = self.meta
        self._flat[i].index_copy_(0, m.slot_mapping, torch.cat((latent, k_pe), dim=-1))
        nd = m.num_single
        if not m.prefills:
            return self._decode(i, attn, q_nope, q_pe)
        out = q_nope.new_empty(q_nope.shape[0], attn.num_heads, attn.v_dim)
        if nd:
            out[:nd] = self._decode(i, attn, q_nope[:nd], q_pe[:nd])
        for c in m.prefills:
            rows = slice(c.start, c.end)
            if c.block_ids is None:  # the chunk starts its sequence: its own latents, causal
                q, k, v = attn.expand(q_nope[rows], q_pe[rows], latent[rows], k_pe[rows])
                o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                   v.transpose(0, 1)[None], is_causal=True, scale=attn.scale)
                out[rows] = o[0].transpose(0, 1)
            else:
                cached = self.caches[i][c.block_ids].view(-1, self.width)[:c.context_len]
                out[rows] = absorbed_attention(attn, q_nope[rows], q_pe[rows], cached)
        return out

    def _decode(self, i: int, attn, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """Absorbed form for one query token per sequence: [B, H, nope], [B, H, rope] -> [B, H, v_head_dim]."""
        B, H = q_nope.shape[:2]
        w_uk, w_uv = attn.absorbed_weights()  # [H, nope, r], [H, v, r]
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)
        q = torch.cat((q_lat, q_pe), dim=-1).view(B, 1, H, self.width)  # heads on SDPA's query axis
        cache, r = self.caches[i], self.kv_lora_rank
        chunks = self.meta.decode_chunks
        outs = []
        for rows, blocks, (size, stride, offset), mask in chunks:
            if blocks is None:
                k = cache.as_strided(size, stride, offset)
            else:
                k = cache.index_select(0, blocks).as_strided(size, stride)
            outs.append(F.scaled_dot_product_attention(q if len(chunks) == 1 else q[rows], k, k[..., :r],
                                                       attn_mask=mask, scale=attn.scale))
        o_lat = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(B, H, r)
        return torch.einsum("bhr,hvr->bhv", o_lat, w_uv)
