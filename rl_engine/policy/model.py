"""The decoder-only policy: one module for training and inference.

Input is a flat token batch (`input_ids[T]`, `positions[T]`). Training passes `cu_seqlens` (packed
variable-length sequences, no padding); the inference engine passes an `attn_context` that owns the
paged KV cache. The model composes parallel layers and never imports a launcher, a config file or an
environment variable; variants (qk-norm, biases, MoE or dense MLP) are chosen at construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn as nn

from rl_engine import kernels
from rl_engine.kernels.invariant import BatchInvariantMode
from rl_engine.policy import comm
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_tp_partial_grad,
    select_rows,
)
from rl_engine.policy.logprobs import full_logits_logprobs_and_entropy, token_logprobs_and_entropy
from rl_engine.policy.mla import MLAttention
from rl_engine.policy.mtp import MTPLayer
from rl_engine.policy.moe import MoEBlock, RoutingRecord, SwiGLUMLP
from rl_engine.policy.parallel import SINGLE, ParallelGroups


class AttentionContext(Protocol):
    """What the inference engine hands the model instead of `cu_seqlens`.

    `attend` receives this layer's post-rotary q [T, Hq_local, D], k and v [T, Hkv_local, D] for the
    flat batch, stores k and v in its cache and returns the attention output [T, Hq_local, D].
    A context whose `fuses_rotary` is true (an attribute fixed when it is built; a context without it does
    not) is handed q and k before rotary instead, with half-width cos / sin tables [T, D // 2], through
    `attend_rotary`: it rotates them itself as it stores k (the engine's fused C++ op on CPU)."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor: ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        tp = groups.tp_size
        if cfg.num_heads % tp:
            raise ValueError(f"num_attention_heads ({cfg.num_heads}) must be divisible by tensor_parallel_size ({tp})")
        kv_rep = 1
        if cfg.num_kv_heads < tp:
            if tp % cfg.num_kv_heads:
                raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads "
                                 f"({cfg.num_kv_heads}) when it is larger")
            kv_rep = tp // cfg.num_kv_heads  # each KV head is replicated on kv_rep ranks
        elif cfg.num_kv_heads % tp:
            raise ValueError(f"num_key_value_heads ({cfg.num_kv_heads}) must be divisible by tensor_parallel_size ({tp})")
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = cfg.num_kv_heads * kv_rep // tp
        self.scale = cfg.head_dim ** -0.5
        self.q_width = self.num_heads * self.head_dim  # this rank's columns of qkv: [q | k | v]
        self.qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [q_size, kv_size, kv_size], groups=groups,
                                             bias=cfg.qkv_bias, dtype=dtype, device=device, replicas=[1, kv_rep, kv_rep])
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, groups=groups, bias=False, dtype=dtype, device=device)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, dtype=dtype, device=device)
            if tp > 1:  # shared by all heads, each rank sees only its heads
                mark_tp_partial_grad(self.q_norm.weight)
                mark_tp_partial_grad(self.k_norm.weight)
        self.bind_kernels(self.o_proj.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        self._varlen_attention = kernels.resolve("varlen_causal_attention", device)

    def forward(self, x, rotary: RotaryEmbedding, rope, cu_seqlens, attn_context: AttentionContext | None, *,
                residual: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """residual + attention(x): the residual add rides on the output projection's matmul. `rows` set:
        those rows of it only (every row's K/V still joins the attention)."""
        if getattr(attn_context, "fuses_rotary", False):  # the context rotates q and k as it stores k
            o = self._attend_rotary(x, rope, attn_context)
        else:
            o = self.attend(*self.project(x, rotary, rope), cu_seqlens=cu_seqlens, attn_context=attn_context)
        # o's rows are all the tokens: under sequence parallelism x holds this rank's slice of them (the qkv
        # projection gathered the rest), so o, not x, gives the count
        o = o.reshape(o.shape[0], -1)
        if rows is not None:
            o, residual = select_rows(o, rows), select_rows(residual, rows)
        return self.o_proj(o, residual)

    def _attend_rotary(self, x: torch.Tensor, rope, attn_context: AttentionContext) -> torch.Tensor:
        """The attention output [T, Hq_local, D] of a context that rotates q and k itself (`fuses_rotary`: the
        engine's fused C++ op): it is handed q and k before rotary and the half-width cos / sin tables."""
        qkv = self.qkv_proj(x)  # [T, q | k | v]
        T, Hq, Hkv, D = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        kv_width = self.qk_width - self.q_width
        q, k, v = qkv.split([self.q_width, kv_width, kv_width], dim=1)
        q, k = q.view(T, Hq, D), k.view(T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return attn_context.attend_rotary(self.layer_idx, q, k, v.view(T, Hkv, D), *rope, scale=self.scale)

    def project(self, x: torch.Tensor, rotary: RotaryEmbedding, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [T, Hq_local, D], k and v [T, Hkv_local, D]) of this rank's heads, q and k rotated."""
        qkv = self.qkv_proj(x)  # [T, q | k | v]
        T, Hq, Hkv, D = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.q_norm is None:  # q and k heads side by side: one rotary pass over both
            return rotary.rotate_qkv(qkv, rope, q_heads=Hq, kv_heads=Hkv)
        # `split`, not slicing: under autograd the parts' gradients are concatenated once, where
        # each slice's backward would zero-fill a whole [T, qkv] tensor and copy its part in.
        kv_width = self.qk_width - self.q_width
        q, k, v = qkv.split([self.q_width, kv_width, kv_width], dim=1)
        q = rotary.rotate(self.q_norm(q.view(T, Hq, D)), rope)
        k = rotary.rotate(self.k_norm(k.view(T, Hkv, D)), rope)
        return q, k, v.view(T, Hkv, D)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens,
               attn_context: AttentionContext | None) -> torch.Tensor:
        """The attention output [T, Hq_local, D]: packed causal over `cu_seqlens`, or the context's."""
        if attn_context is None:
            return self._varlen_attention(q, k, v, cu_seqlens, self.scale)
        return attn_context.attend(self.layer_idx, q, k, v, scale=self.scale)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, device=device)
        attention = MLAttention if cfg.is_mla else Attention
        self.self_attn = attention(cfg, layer_idx, groups=groups, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, device=device)
        self.is_moe = layer_idx in cfg.moe_layers
        if self.is_moe:
            self.mlp = MoEBlock(cfg, layer_idx, groups=groups, dtype=dtype, device=device)
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, groups=groups, dtype=dtype, device=device)
        if groups.sequence_parallel:  # norms of the token slice of this rank
            mark_tp_partial_grad(self.input_layernorm.weight)
            mark_tp_partial_grad(self.post_attention_layernorm.weight)
        self.compiled_forward: Callable | None = None  # set by policy.compile.apply_compile (train.compile)

    def forward(self, x, rotary, rope, cu_seqlens, attn_context, routing, rows: torch.Tensor | slice | None = None):
        """x: the residual stream [T, H] -> the stream after this layer (each block's output is
        added to it inside the block's last matmul where possible). `rows` (indices or a slice) set: the
        stream's rows `rows` only, [R, H]; every row's K/V still joins the attention, but the other
        rows' attention output projection and MLP are not computed."""
        if rows is not None and self.is_moe:  # the router's loads and aux loss count every row
            return select_rows(self.forward(x, rotary, rope, cu_seqlens, attn_context, routing), rows)
        # train.compile (policy/compile.py): the forwards that autograd records, the training pass, run
        # this layer's compiled halves. The same layers serve the inference engine (no grad), whose
        # steps stay its own (eager, or compile_decode's whole-step graphs); so do no-grad log-prob passes.
        if self.compiled_forward is not None and torch.is_grad_enabled():
            return self.compiled_forward(self, x, rotary, rope, cu_seqlens, attn_context, rows=rows)
        x = self.self_attn(self.input_layernorm(x), rotary, rope, cu_seqlens, attn_context, residual=x, rows=rows)
        h = self.post_attention_layernorm(x)
        return x + self.mlp(h, routing) if self.is_moe else self.mlp(h, x)


class CausalLM(nn.Module):
    """Decoder-only LM. `layer_range` selects the layers this (pipeline) stage holds; the first
    stage owns the embedding, the last the final norm and LM head."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        groups: ParallelGroups = SINGLE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        layer_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype {dtype} not supported; use torch.float32 or torch.bfloat16")
        self.config = config
        self.groups = groups
        self.dtype = dtype
        # model.batch_invariant: read once, at build, from the kernel registry's config, which also gives
        # every layer its ops' batch-invariant implementations (bound in their bind_kernels). The first
        # forward of each kind runs in BatchInvariantMode, which refuses any product or attention that
        # did not go through them; later ones run with no mode (`_invariance_check`).
        self.batch_invariant = kernels.default_registry().config.batch_invariant
        self._checked_kinds: set[tuple] = set()
        start, end = layer_range or (0, config.num_layers)
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"layer_range {layer_range} must satisfy 0 <= start < end <= {config.num_layers}")
        self.layer_range = (start, end)
        self.is_first_stage = start == 0
        self.is_last_stage = end == config.num_layers
        self.embed_tokens = None
        if self.is_first_stage or (self.is_last_stage and config.tie_word_embeddings):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, groups=groups,
                                                       dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, groups=groups, dtype=dtype, device=device) for i in range(start, end)
        )
        self.norm = self.lm_head = None
        if self.is_last_stage:
            self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, device=device)
            if groups.sequence_parallel:
                mark_tp_partial_grad(self.norm.weight)
            head_weights = self.embed_tokens if config.tie_word_embeddings else VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, groups=groups, dtype=dtype, device=device)
            self.lm_head = ParallelLMHead(head_weights)
        # DeepSeek-V3's multi-token-prediction layers ride on the last stage with the LM head they share.
        self.mtp_layers = nn.ModuleList(
            MTPLayer(config, k, groups=groups, dtype=dtype, device=device) for k in range(config.num_mtp_layers)
        ) if self.is_last_stage else nn.ModuleList()
        self.register_buffer("inv_freq", config.inv_freq().to(device), persistent=False)
        self.rotary = RotaryEmbedding(head_dim=config.head_dim, device=self.inv_freq.device,
                                      max_positions=max(config.max_position_embeddings, config.max_context_len),
                                      attention_factor=config.rope_attention_factor)

    def _apply(self, fn, recurse=True):
        """After `.to()` / `.cuda()` / `.float()`: kernels are chosen per device, so choose them again,
        under this model's own `batch_invariant` (the process registry's setting may have changed since
        the build: a model built invariant keeps its invariant ops)."""
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        previous = kernels.set_batch_invariant(self.batch_invariant)
        try:
            self.rotary.bind_kernels(device)
            for module in self.modules():
                if module is not self and hasattr(module, "bind_kernels"):
                    module.bind_kernels(device)
        finally:
            kernels.set_batch_invariant(previous)
        return self

    # ---- forward -------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor | None,
        *,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        attn_context: AttentionContext | None = None,
        routing: RoutingRecord | None = None,
        inputs_embeds: torch.Tensor | None = None,
        rows: torch.Tensor | slice | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, H] (after the final norm on the last stage). A stage that is not
        the first takes `inputs_embeds` (the previous stage's output) instead of `input_ids`.
        `rows` ([R] int64 token indices or a slice, last stage only): the final hidden states of those
        rows only, [R, H], `hidden_states(...)[rows]` up to fp32 rounding (the last layer's matmuls over
        R rows, which BLAS may sum in another order than over T); the other rows (a loss's
        unscored prompt tokens) feed every layer's attention, but the last layer skips their attention
        output projection and MLP and the final norm skips them."""
        if positions.dim() != 1:
            raise ValueError(f"positions must be 1-D [T] (a flat token batch), got shape {tuple(positions.shape)}")
        if rows is not None and (not self.is_last_stage or self.groups.sequence_parallel):
            raise ValueError("hidden_states(rows=...) needs the last stage and every token on this rank (no "
                             "sequence parallelism): pass rows=None and select the rows afterwards")
        if attn_context is None:
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, positions.shape[0]], dtype=torch.int32)
            self.check_packed(positions, cu_seqlens)
        if self.is_first_stage:
            if input_ids is None or input_ids.shape != positions.shape:
                raise ValueError(f"input_ids must be [T] like positions {tuple(positions.shape)}, "
                                 f"got {None if input_ids is None else tuple(input_ids.shape)}")
            x = self.embed_tokens(input_ids)
        else:
            if inputs_embeds is None:
                raise ValueError("a pipeline stage after the first needs inputs_embeds from the previous stage")
            x = inputs_embeds
        with self._invariance_check("hidden_states", attn_context, routing):
            rope = self._rope(positions, attn_context)
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                x = layer(x, self.rotary, rope, cu_seqlens, attn_context, routing, rows=rows if i == last else None)
            return self.norm(x) if self.is_last_stage else x

    def _rope(self, positions: torch.Tensor, attn_context) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's rotary tables: half-width for a context that rotates q and k itself (`fuses_rotary`)."""
        return self.rotary.tables(positions, self.inv_freq, half_width=getattr(attn_context, "fuses_rotary", False))

    def _invariance_check(self, entry: str, attn_context=None, routing: RoutingRecord | None = None
                          ) -> contextlib.AbstractContextManager:
        """Under model.batch_invariant, BatchInvariantMode for the first call of each kind of forward: the
        entry point, autograd on or off, packed or the engine's attention context and which of its paths
        the step takes (`attn_context.path`), routing record/replay. The model's branches follow exactly
        these, so each op the model can run under the switch is checked once; the hot path runs no mode."""
        if not self.batch_invariant:
            return contextlib.nullcontext()
        kind = (entry, torch.is_grad_enabled(), type(attn_context).__name__, getattr(attn_context, "path", None),
                routing.mode if routing is not None else None)
        return contextlib.nullcontext() if kind in self._checked_kinds else self._first_of_kind(kind)

    @contextlib.contextmanager
    def _first_of_kind(self, kind: tuple):
        with BatchInvariantMode():
            yield
        self._checked_kinds.add(kind)  # only once it ran through: a refused kind is refused on every call

    def check_packed(self, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        """cu_seqlens covers the T tokens and no sequence exceeds the model's context."""
        T = positions.shape[0]
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}; got {cu_seqlens.tolist()}")
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        if longest > self.config.max_context_len:
            raise ValueError(f"a sequence of {longest} tokens exceeds the model's context of "
                             f"{self.config.max_context_len} tokens (max_position_embeddings / sliding_window)")

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        attn_context: AttentionContext | None = None,
        routing: RoutingRecord | None = None,
    ) -> torch.Tensor:
        """Full logits [T, vocab] (gathered over tp). Training uses `token_logprobs` instead."""
        h = self.hidden_states(input_ids, positions=positions, cu_seqlens=cu_seqlens, attn_context=attn_context,
                               routing=routing)
        return self.compute_logits(h)

    def mtp_hidden_states(self, input_ids: torch.Tensor, prev_hidden: torch.Tensor, *, positions: torch.Tensor,
                          depth: int = 0, cu_seqlens: torch.Tensor | None = None,
                          attn_context=None) -> torch.Tensor:
        """MTP layer `depth` on rows i: input_ids [T] the tokens i+1, prev_hidden [T, H] the final
        hidden states at positions i (this model's, or the previous depth's output), positions [T]
        = i+1. Returns its normed hidden states [T, H] for `compute_logits` (tokens i+2)."""
        if depth >= len(self.mtp_layers) or self.embed_tokens is None:
            raise ValueError(f"MTP depth {depth} needs an MTP layer and the embedding on this rank; the model has "
                             f"{len(self.mtp_layers)} MTP layer(s) (num_nextn_predict_layers)")
        if attn_context is None and cu_seqlens is None:
            cu_seqlens = torch.tensor([0, positions.shape[0]], dtype=torch.int32)
        rope = self._rope(positions, attn_context)
        return self.mtp_layers[depth](self.embed_tokens(input_ids), prev_hidden, self.rotary, rope, cu_seqlens,
                                      attn_context)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise ValueError("compute_logits is only available on the last pipeline stage")
        with self._invariance_check("compute_logits"):
            return self.lm_head.full_logits(hidden)

    def token_logprobs(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float = 1.0,
        chunk_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of `targets` and entropy ([T] fp32 each), vocab-parallel and chunked:
        the `[T, vocab]` logits are never materialised."""
        if self.lm_head is None:
            raise ValueError("token_logprobs is only available on the last pipeline stage")
        g = self.groups
        if self.batch_invariant and g.tp_size > 1:
            # The engine samples from logits gathered over tp: the same logits and log-softmax, per chunk.
            return full_logits_logprobs_and_entropy(hidden, self.compute_logits, targets, temperature=temperature,
                                                    vocab_size=self.config.vocab_size, chunk_tokens=chunk_tokens)
        hidden = comm.gather_sequence(hidden, g.tp_group) if g.sequence_parallel else comm.copy_to_tp(hidden, g.tp_group)
        shard = self.lm_head.shard
        # Under batch_invariant (tp = 1 here) the chunk logits are the engine's (tiled matmul) and the
        # statistics the sampler's (the registry's logprob_shard_stats on fp32 logits / temperature).
        with self._invariance_check("token_logprobs"):
            return token_logprobs_and_entropy(
                hidden, shard.weight, targets, temperature=temperature, vocab_start=shard.vocab_start,
                vocab_real_rows=shard.vocab_end - shard.vocab_start, group=g.tp_group, chunk_tokens=chunk_tokens,
                dense=self.lm_head.dense)

    # ---- conveniences --------------------------------------------------------------------------
    def kv_cache_spec(self) -> dict:
        """What the inference engine needs to size its paged KV cache for this rank."""
        attn = self.layers[0].self_attn
        spec = {"num_layers": len(self.layers), "first_layer": self.layer_range[0], "dtype": self.dtype}
        if self.config.is_mla:  # one latent "head" per token: [c | k_pe], no V
            return {**spec, "num_kv_heads": 1, "head_dim": attn.kv_lora_rank + attn.rope_dim,
                    "kv_lora_rank": attn.kv_lora_rank}
        return {**spec, "num_kv_heads": attn.num_kv_heads, "head_dim": attn.head_dim, "kv_lora_rank": 0}

    def save_pretrained(self, path: str, *, max_shard_bytes: int = 4 << 30) -> None:
        from rl_engine.policy.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)
