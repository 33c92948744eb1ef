"""Torch reference implementations of the hot ops.

Every other backend (Triton, FlashInfer, Transformer Engine) is checked against these. They run on
any device and are the implementations used on CPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rl_engine.kernels import op_inputs


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim, computed in fp32 and cast back to x's dtype.

    With `residual`, first adds it (`x = x + residual`) and also returns the sum, which is the next
    residual stream (the fused add-norm of Llama-style decoders). Returns (normed, new_residual).
    """
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.float()
    # Hugging Face's h * rsqrt(mean(h^2) + eps) in four dispatches (mean and the scalar add would be
    # four more): between decode matmuls these small ops run cache-cold, and their count is the cost.
    sum_sq = (h * h).sum(-1, keepdim=True)
    h = h * torch.add(_scalar(eps), sum_sq, alpha=1.0 / h.shape[-1]).rsqrt()
    return weight * (h if dtype == torch.float32 else h.to(dtype)), residual


@functools.lru_cache(maxsize=None)
def _scalar(value: float) -> torch.Tensor:
    """A 0-dim fp32 tensor (usable with tensors on any device), cached per value."""
    with torch.inference_mode(False):  # a normal tensor even when first asked for under inference mode
        return torch.tensor(value, dtype=torch.float32)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, [T, head_dim // 2] each, in fp32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding, as Hugging Face Llama/Qwen apply it.

    q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim], cos/sin: [T, head_dim // 2] fp32.
    Returns new tensors of q's and k's dtype.
    """

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_full(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on full-width tables: x [T, heads, head_dim] (a view into the fused projection is
    fine), cos [T, 1, head_dim] and sin [T, 1, head_dim] with the rotate-half sign folded in ([-sin | sin]):
    x * cos + roll(x, head_dim // 2) * sin, a new tensor of x's dtype (computed in fp32)."""
    xf = x if x.dtype == torch.float32 else x.float()
    # Plain mul and add round every element alike in any tensor shape (addcmul's fused multiply-add does
    # not), so every tensor-parallel layout and the reference agree bitwise.
    rotated = xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin
    return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


def silu_and_mul(x: torch.Tensor, *, overwrite_input: bool = False) -> torch.Tensor:
    """SwiGLU: x is [..., 2 * d] laid out as [gate | up]; returns silu(gate) * up, [..., d]. `overwrite_input`
    (the caller's x has no other reader, so a backward may write over it) is taken by the CPU training kernel
    (`kernels/cpu/train_elementwise.py`); here autograd's backward allocates."""
    gate, up = x.chunk(2, dim=-1)  # chunk, not slicing: backward concatenates, no zero-filled grads
    if torch.is_grad_enabled():
        return F.silu(gate) * up
    # Inference: multiply in place into silu's fresh output, one [..., d] allocation instead of two
    # (the same values; a 64-prompt prefill measured 15-20% faster on CPU, decode sizes unchanged).
    return F.silu(gate).mul_(up)


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention over packed variable-length sequences, no padding.

    q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] (GQA: num_heads a multiple of
    num_kv_heads), cu_seqlens: [num_seqs + 1] cumulative lengths. Returns [T, num_heads, head_dim].
    Each sequence attends only to itself. Long sequences take one fused SDPA call each (no work on
    padding or cross-sequence masks); a batch of many short ones (at most `_SHORT_SEQ` tokens, with
    little padding) takes one masked batched call instead, since per-call overhead dominates there.
    """
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        # Expanded KV heads keep SDPA on its fused CPU (flash) kernel; enable_gqa falls back to
        # the unfused math path, about 2x slower forward+backward here.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    longest = max(lengths, default=0)
    if len(lengths) > 1 and longest <= _SHORT_SEQ and len(lengths) * longest <= 2 * q.shape[0]:
        return _padded_causal_attention(q, k, v, lengths, longest, scale)
    # split (not slicing) so that backward concatenates the per-sequence gradients once instead of
    # scattering each into a zero tensor of the whole batch.
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        if qs.shape[0] == 0:
            continue
        # SDPA wants [batch, heads, seq, dim]; 4-D inputs select the fused kernel.
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                           vs.transpose(0, 1)[None], is_causal=True, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)


_SHORT_SEQ = 128


def _padded_causal_attention(q, k, v, lengths: list[int], longest: int, scale: float) -> torch.Tensor:
    """Short sequences padded to [B, L] and attended in one SDPA call with a causal + key-padding
    mask. A padded query row still sees its sequence's real keys, so no row is fully masked."""
    T = q.shape[0]
    lens = torch.tensor(lengths, device=q.device)
    batch_idx = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lens)  # [T]
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(T, device=q.device) - starts[batch_idx]  # [T]

    def pad(x):  # [T, H, D] -> [B, H, L, D]
        out = x.new_zeros(len(lengths), longest, *x.shape[1:])
        out = out.index_put((batch_idx, pos), x)
        return out.transpose(1, 2)

    ar = torch.arange(longest, device=q.device)
    mask = (ar[None, :] <= ar[:, None])[None] & (ar[None, None, :] < lens[:, None, None])  # [B, L, L]
    o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2)[batch_idx, pos]


def shared_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_of: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Packed attention where segment s attends causally to itself and, when prefix_of[s] >= 0, in full to
    segment prefix_of[s]'s keys (a GRPO group's completions to their shared prompt; that segment has no prefix).

    q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim], v: [T, num_kv_heads, v_head_dim] (GQA),
    cu_seqlens: [S + 1], prefix_of: [S] int (-1: none). Returns [T, num_heads, v_head_dim]. One masked SDPA
    call per segment: the oracle of the C++ kernel (policy/shared_prefix.py batches the same layout faster)."""
    bounds = cu_seqlens.tolist()
    prefix = prefix_of.tolist()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs = []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        keys = slice(start, end)
        pre = (bounds[prefix[s]], bounds[prefix[s] + 1]) if prefix[s] >= 0 else (start, start)
        ks, vs = torch.cat((k[pre[0]:pre[1]], k[keys])), torch.cat((v[pre[0]:pre[1]], v[keys]))
        C, P = end - start, pre[1] - pre[0]
        ar = torch.arange(C, device=q.device)
        mask = torch.cat((torch.ones(C, P, dtype=torch.bool, device=q.device), ar[None] <= ar[:, None]), dim=1)
        o = F.scaled_dot_product_attention(q[keys].transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(*q.shape[:2], v.shape[2])


def apply_rotary_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary applied in place to a flat token batch (the inference path).

    q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim] (may be strided views, e.g. slices
    of a fused qkv projection; last dim contiguous), positions: [T] int, cos_cache/sin_cache:
    [max_positions, head_dim // 2] fp32. Returns (q, k), the same tensors, rotated.
    """
    cos, sin = cos_cache[positions], sin_cache[positions]
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    q.copy_(q_rot)
    k.copy_(k_rot)
    return q, k


def _gather_paged_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """[batch, num_tokens, num_kv_heads, head_dim] from [num_blocks, block_size, kv_heads, dim]."""
    num_blocks = op_inputs.blocks_needed(num_tokens, cache.shape[1])
    blocks = block_tables[:, :num_blocks].long().clamp(min=0)  # unused entries may be -1
    gathered = cache[blocks]  # [batch, num_blocks, block_size, kv_heads, dim]
    return gathered.flatten(1, 2)[:, :num_tokens]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One decode query per request attending over its paged KV cache.

    q: [batch, num_heads, head_dim]; k_cache/v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim]; block_tables: [batch, max_blocks_per_seq] int32 (entries past a request's blocks may
    hold anything, e.g. -1); context_lens: [batch] int32, cached tokens including the current one.
    Query head h reads kv head h // (num_heads // num_kv_heads). A request with context_len 0 (a
    padding slot) gets zeros. Returns [batch, num_heads, head_dim] in q's dtype; math in fp32.
    """
    batch, num_heads, num_kv_heads, head_dim, block_size, group = op_inputs.check_paged_decode(
        q, k_cache, v_cache, block_tables, context_lens)
    max_len = int(context_lens.max().item()) if batch else 0
    if max_len == 0:
        return torch.zeros_like(q)
    op_inputs.check_block_capacity(block_tables, context_lens, block_size)
    k = _gather_paged_kv(k_cache, block_tables, max_len).float()  # [B, L, Hkv, D]
    v = _gather_paged_kv(v_cache, block_tables, max_len).float()
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale  # [B, Hkv, G, L]
    valid = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None].to(q.device)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows (len 0) -> zeros
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of new query tokens (prefill chunks) over the paged KV cache.

    q: [T, num_heads, head_dim] packed by request (`cu_seqlens_q` [batch + 1]); the new tokens' k/v
    are already in the cache, so request i's context_lens[i] includes its q tokens, which are the
    last ones of its context: query j of a request with n queries sits at position
    context_len - n + j and sees keys 0..that position. Returns [T, num_heads, head_dim].
    """
    dims = op_inputs.check_paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    op_inputs.check_block_capacity(block_tables, context_lens, dims.block_size)
    group = dims.group
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n_q, ctx = end - start, int(context_lens[i])
        if n_q == 0:
            continue
        k = _gather_paged_kv(k_cache, block_tables[i : i + 1], ctx)[0].float()  # [ctx, Hkv, D]
        v = _gather_paged_kv(v_cache, block_tables[i : i + 1], ctx)[0].float()
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - n_q, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [n_q, ctx]
        o = F.scaled_dot_product_attention(
            q[start:end].float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale,
        )
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new tokens' k/v ([T, num_kv_heads, head_dim]) into the paged caches, in place.

    slot_mapping: [T] int, slot = block_id * block_size + offset; slot -1 means skip (padding).
    The caches must be contiguous [num_blocks, block_size, num_kv_heads, head_dim].
    """
    op_inputs.check_cache_write(k, v, k_cache, v_cache, slot_mapping)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)


def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    return_k: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotary embedding of a step's new tokens fused with their paged KV cache write (the inference path).

    q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim] (strided views are fine), cos/sin fp32
    [T, rotary_dim // 2]: rotate-half (`apply_rotary`) over the first rotary_dim dims of each head, the rest
    passed through (partial rotary). Writes the rotated k and v into the caches at `slot_mapping`
    (`reshape_and_cache`: slot -1 skips). Returns (rotated q, rotated k when `return_k` else None), new tensors.
    """
    op_inputs.check_rotary_kv_write(q, k, v, cos, sin, slot_mapping, k_cache, v_cache)
    rotary_dim = 2 * cos.shape[1]
    q_rot, k_rot = apply_rotary(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
    if rotary_dim < q.shape[-1]:
        q_rot, k_rot = torch.cat((q_rot, q[..., rotary_dim:]), -1), torch.cat((k_rot, k[..., rotary_dim:]), -1)
    reshape_and_cache(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, (k_rot if return_k else None)


class MoePermutation(NamedTuple):
    """Tokens reordered by expert (the dispatcher's local reorder).

    hidden: [T * k, H] rows grouped by expert id ascending, token order kept within an expert;
    tokens_per_expert: [num_experts] int64; slot_to_row: [T, k] int64, the inverse permutation:
    the row of `hidden` holding token t's copy for its j-th chosen expert; row_to_token: [T * k]
    int64, the source token of each row.
    """

    hidden: torch.Tensor
    tokens_per_expert: torch.Tensor
    slot_to_row: torch.Tensor
    row_to_token: torch.Tensor


def sort_by_expert(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index bookkeeping of `moe_permute`: (row_to_token, tokens_per_expert, slot_to_row).

    Expert ids must lie in [0, num_experts). Shared by every backend so they agree on the order.
    """
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # row -> flat slot
    slot_to_row = torch.empty_like(order)
    slot_to_row[order] = torch.arange(order.numel(), device=order.device)
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return order // top_k, tokens_per_expert, slot_to_row.view(num_tokens, top_k)


def moe_permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> MoePermutation:
    """Copy each token once per chosen expert and group the copies by expert id.

    hidden: [T, H], topk_ids: [T, k] int. Differentiable in `hidden`.
    """
    row_to_token, tokens_per_expert, slot_to_row = sort_by_expert(topk_ids, num_experts)
    return MoePermutation(hidden[row_to_token], tokens_per_expert, slot_to_row, row_to_token)


def moe_unpermute(
    expert_out: torch.Tensor, slot_to_row: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Combine expert outputs back per token: out[t] = sum_j topk_weights[t, j] * expert_out[row].

    expert_out: [T * k, H], slot_to_row: [T, k] (from `moe_permute`), topk_weights: [T, k].
    Sums in fp32; returns [T, H] in expert_out's dtype. Differentiable in expert_out and weights.
    """
    rows = expert_out[slot_to_row].float()  # [T, k, H]
    return (rows * topk_weights.float()[..., None]).sum(1).to(expert_out.dtype)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [n, V] -> [n] int64: each row's first maximum (a NaN counts as the maximum), torch.max's index."""
    return logits.max(dim=-1)[1]


def inverse_cdf_sample(z: torch.Tensor, uniforms: torch.Tensor, *,
                       logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of z [n, V] fp32 (logits already divided by the temperature, no truncation) by inverse
    CDF with `uniforms` [n] (float64, in [0, 1), on any device: the sampler's come from the host): the first index
    whose cumulative mass exceeds u * total, u rounded to fp32 (`inference/sampler.py`'s draw). Returns (tokens [n]
    int64, their log-probs log_softmax(z)[token] [n] fp32, or None without `logprobs`)."""
    z_max = z.amax(dim=-1, keepdim=True)
    e = (z - z_max).exp_()  # unnormalised probabilities, in (0, 1]
    lse = z_max + e.sum(dim=-1, keepdim=True).log_() if logprobs else None
    cdf = e.cumsum_(dim=-1)  # e is not needed afterwards
    target = uniforms.to(device=cdf.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    # First index whose cumulative mass exceeds the target: never a zero-mass entry.
    tokens = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    return tokens.view(-1), None if lse is None else (z.gather(1, tokens) - lse).view(-1)


def top_k_top_p_sampling(
    probs: torch.Tensor,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row of `probs` [B, V] after top-k then top-p truncation.

    top_k: [B] or scalar (<= 0 or >= V: no top-k); top_p: [B] or scalar in (0, 1] (1: no top-p).
    The most likely token always survives. Returns [B] int64 token ids.
    """
    batch, vocab = probs.shape
    k_eff, top_p = op_inputs.sampling_limits(top_k, top_p, batch=batch, vocab=vocab, device=probs.device)
    sorted_probs, sorted_ids = probs.float().sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=probs.device)[None, :]
    keep = rank < k_eff[:, None]
    kept = sorted_probs * keep
    mass_before = kept.cumsum(-1) - kept  # mass of strictly more likely kept tokens
    keep &= mass_before < top_p[:, None] * kept.sum(-1, keepdim=True)
    keep[:, 0] = True
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)  # [B, 1]
    return sorted_ids.gather(1, choice).squeeze(1)
