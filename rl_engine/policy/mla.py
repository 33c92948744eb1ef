"""Multi-head latent attention (DeepSeek-V2/V3), as transformers' `DeepseekV3Attention` computes it.

Per token: q = q_b(norm(q_a(x))) (or a plain q projection when `q_lora_rank` is 0), split per head
into a no-rotary part [qk_nope_head_dim] and a rotary part [qk_rope_head_dim]; the KV side is one
compressed latent c = norm(kv_a(x)[:kv_lora_rank]) [kv_lora_rank] plus one rotary key k_pe
[qk_rope_head_dim] shared by every head; kv_b(c) expands the latent into each head's k_nope and v.

Tensor parallelism splits the heads (q_b / q_proj, kv_b, o_proj) as Megatron does; the
down-projections (q_a, kv_a) and their norms are replicated. The latent's gradient is summed over
the tp ranks where it enters the column-parallel up-projections, and k_pe's where it meets the
rank's heads, so the replicated parameters get the full gradient on every rank (no tp reduction of
their own). Sequence parallelism is not supported (its reduce-scatter would need the latent path's
gradients partial).

Training takes the expanded form (full k and v per head, varlen attention). The inference engine's
`attn_context.attend_latent` gets the latent and k_pe to cache (kv_lora_rank + qk_rope_head_dim
values per token) and the pieces to absorb kv_b into the query and output sides at decode.
DeepSeek's rotary dimensions are interleaved pairs (`rope_interleave`): they are de-interleaved
(a fixed permutation of q_pe's and k_pe's columns) and rotated rotate-half style, which is exactly
transformers' `apply_rotary_pos_emb_interleave`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rl_engine import kernels
from rl_engine.policy import comm
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.layers import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    select_rows,
)
from rl_engine.policy.parallel import ParallelGroups

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        tp = groups.tp_size
        if cfg.num_heads % tp:
            raise ValueError(f"num_attention_heads ({cfg.num_heads}) must be divisible by tensor_parallel_size ({tp})")
        if groups.sequence_parallel:
            raise ValueError("sequence parallelism is not supported with multi-head latent attention "
                             f"(model_type {cfg.model_type!r}); turn sequence_parallel off")
        self.layer_idx = layer_idx
        self.groups = groups
        self.num_heads = cfg.num_heads // tp
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = cfg.attention_scale(self.qk_dim)
        H = cfg.num_heads
        kw = dict(dtype=dtype, device=device)
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if cfg.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(cfg.hidden_size, cfg.q_lora_rank, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS, **kw)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, [H * self.qk_dim], groups=groups, bias=False, **kw)
        else:
            self.q_proj = ColumnParallelLinear(cfg.hidden_size, [H * self.qk_dim], groups=groups, bias=False, **kw)
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, self.kv_lora_rank + self.rope_dim, **kw)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS, **kw)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, [H * (self.nope_dim + self.v_dim)], groups=groups,
                                              bias=False, **kw)
        self.o_proj = RowParallelLinear(H * self.v_dim, cfg.hidden_size, groups=groups, bias=False, **kw)
        self.rope_perm = None
        if cfg.rope_interleave:  # pairs (x0, x1), (x2, x3)... -> [x0, x2, ... | x1, x3, ...]
            self.rope_perm = torch.cat([torch.arange(0, self.rope_dim, 2), torch.arange(1, self.rope_dim, 2)])
        self.bind_kernels(self.o_proj.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        self._varlen_attention = kernels.resolve("varlen_causal_attention", device)
        if self.rope_perm is not None:
            self.rope_perm = self.rope_perm.to(device)

    def project(self, x: torch.Tensor, rotary: RotaryEmbedding, rope) -> tuple[torch.Tensor, ...]:
        """(q_nope [T, H, nope], q_pe [T, H, rope] rotated, latent [T, kv_lora_rank] normed,
        k_pe [T, rope] rotated) of this rank's heads."""
        T, H = x.shape[0], self.num_heads
        if self.q_proj is None:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(T, H, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = comm.copy_to_tp(k_pe, self.groups.tp_group)  # every head of every rank reads it
        pe = torch.cat((q_pe, k_pe[:, None]), dim=1)  # [T, H + 1, rope]: one rotary pass for q and k
        if self.rope_perm is not None:
            pe = pe.index_select(-1, self.rope_perm)
        q_pe, k_pe = rotary.rotate(pe, rope).split([H, 1], dim=1)
        return q_nope, q_pe, latent, k_pe[:, 0]

    def forward(self, x, rotary: RotaryEmbedding, rope, cu_seqlens, attn_context, *,
                residual: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """residual + attention(x); `rows` set: those rows of it only (`Attention.forward`)."""
        q_nope, q_pe, latent, k_pe = self.project(x, rotary, rope)
        if attn_context is None:
            o = self._varlen_attention(*self.expand(q_nope, q_pe, latent, k_pe), cu_seqlens, self.scale)
        else:
            o = attn_context.attend_latent(self.layer_idx, self, q_nope, q_pe, latent, k_pe)
        o = o.reshape(o.shape[0], -1)
        if rows is not None:
            o, residual = select_rows(o, rows), select_rows(residual, rows)
        return self.o_proj(o, residual)

    def expand(self, q_nope, q_pe, latent, k_pe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The expanded form: q and k [T, H, nope + rope], v [T, H, v_head_dim] (k_pe shared by the heads)."""
        T, H = latent.shape[0], self.num_heads
        k_nope, v = self.kv_b_proj(latent).view(T, H, self.nope_dim + self.v_dim).split(
            [self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(T, H, self.rope_dim)), dim=-1)
        return q, k, v

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b split per head for the absorbed (decode) form: w_uk [H, nope, kv_lora_rank] maps a
        latent to k_nope, w_uv [H, v_head_dim, kv_lora_rank] to v."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]


def latent_attention_reference(q_nope, q_pe, latents, k_pes, w_uk, w_uv, scale: float) -> torch.Tensor:
    """One query token against its cached context in the absorbed form: scores =
    (q_nope W_uk) . c + q_pe . k_pe, out = (softmax . c) W_uv^T. q_nope [H, nope], q_pe [H, rope],
    latents [L, r], k_pes [L, rope] -> [H, v_head_dim]."""
    q_lat = torch.einsum("hn,hnr->hr", q_nope, w_uk)  # [H, r]
    scores = (q_lat @ latents.t() + q_pe @ k_pes.t()) * scale  # [H, L]
    probs = F.softmax(scores.float(), dim=-1).to(latents.dtype)
    return torch.einsum("hr,hvr->hv", probs @ latents, w_uv)
