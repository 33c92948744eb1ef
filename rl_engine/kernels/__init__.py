"""The hot ops. Callers use these names; which implementation runs is the registry's business.

Each function here dispatches through the registry by its first tensor's device type (a cached dict
lookup per call). Code that wants to choose at build time calls `resolve(op, device)` once and keeps
the returned function. Signatures are those of the torch references in `reference.py` / `logprob.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rl_engine.kernels.logprob import ShardStats, combine_local_shards, combine_shard_stats
from rl_engine.kernels.reference import MoePermutation
from rl_engine.kernels.registry import (
    OPS,
    KernelConfig,
    KernelRegistry,
    Resolution,
    clear_cache,
    configure,
    default_registry,
    describe,
    format_backends_table,
    resolve,
    set_backend_overrides,
    set_batch_invariant,
)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return resolve("rms_norm", x.device)(x, weight, eps, residual)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("rotary_cos_sin", positions.device)(positions, inv_freq)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("apply_rotary", q.device)(q, k, cos, sin)


def apply_rotary_inplace(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("apply_rotary_inplace", q.device)(q, k, positions, cos_cache, sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return resolve("silu_and_mul", x.device)(x)


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | list[int],
    scale: float,
) -> torch.Tensor:
    return resolve("varlen_causal_attention", q.device)(q, k, v, cu_seqlens, scale)


def shared_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, prefix_of: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return resolve("shared_prefix_attention", q.device)(q, k, v, cu_seqlens, prefix_of, scale)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    return resolve("paged_decode_attention", q.device)(q, k_cache, v_cache, block_tables,
                                                       context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    return resolve("paged_prefill_attention", q.device)(q, k_cache, v_cache, block_tables,
                                                        cu_seqlens_q, context_lens, scale)


def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    resolve("reshape_and_cache", k.device)(k, v, k_cache, v_cache, slot_mapping)


def rotary_kv_write(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, return_k: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return resolve("rotary_kv_write", q.device)(q, k, v, cos, sin, slot_mapping, k_cache, v_cache,
                                                return_k=return_k)


def logprob_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float, vocab_start: int = 0,
    vocab_size: int | None = None, process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("logprob_entropy", logits.device)(
        logits, targets, temperature=temperature, vocab_start=vocab_start, vocab_size=vocab_size,
        process_group=process_group)


def logprob_shard_stats(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float, vocab_start: int = 0,
    vocab_size: int | None = None,
) -> ShardStats:
    return resolve("logprob_shard_stats", logits.device)(
        logits, targets, temperature=temperature, vocab_start=vocab_start, vocab_size=vocab_size)


def logprob_entropy_grad(
    logits: torch.Tensor, targets: torch.Tensor, grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor, logsumexp: torch.Tensor, entropy: torch.Tensor, *,
    temperature: float, vocab_start: int = 0, vocab_size: int | None = None,
) -> torch.Tensor:
    return resolve("logprob_entropy_grad", logits.device)(
        logits, targets, grad_logprobs, grad_entropy, logsumexp, entropy,
        temperature=temperature, vocab_start=vocab_start, vocab_size=vocab_size)


def moe_permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> MoePermutation:
    return resolve("moe_permute", hidden.device)(hidden, topk_ids, num_experts)


def moe_unpermute(
    expert_out: torch.Tensor, slot_to_row: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    return resolve("moe_unpermute", expert_out.device)(expert_out, slot_to_row, topk_weights)


def top_k_top_p_sampling(
    probs: torch.Tensor, top_k: torch.Tensor | int, top_p: torch.Tensor | float, *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return resolve("top_k_top_p_sampling", probs.device)(probs, top_k, top_p, generator=generator)


__all__ = [
    "OPS", "KernelConfig", "KernelRegistry", "MoePermutation", "Resolution", "ShardStats",
    "apply_rotary", "apply_rotary_inplace", "clear_cache", "combine_local_shards",
    "combine_shard_stats", "configure", "default_registry", "describe", "format_backends_table",
    "logprob_entropy", "logprob_entropy_grad", "logprob_shard_stats", "moe_permute",
    "moe_unpermute", "paged_decode_attention", "paged_prefill_attention", "reshape_and_cache",
    "resolve", "rms_norm", "rotary_cos_sin", "rotary_kv_write", "set_backend_overrides", "set_batch_invariant",
    "shared_prefix_attention", "silu_and_mul", "top_k_top_p_sampling", "varlen_causal_attention",
]
