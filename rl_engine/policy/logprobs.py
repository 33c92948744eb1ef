"""Per-token log-probs and entropy of given targets, straight from hidden states.

The log-prob contract (ARCHITECTURE.md): `log_softmax(logits / temperature)[target]` over the full
vocabulary, and the entropy of that same distribution. This module computes both from the final
hidden states and the (vocab-parallel) LM-head weight in token chunks, inside one autograd Function
that saves only the hidden states and two floats per token: backward recomputes each chunk's
logits, so no `[T, vocab]` tensor of the batch is ever held at once, neither in forward nor for
backward (only a call whose logits are small anyway, at most `KEEP_LOGITS_ELEMENTS` in one chunk: a
small vocabulary, keeps them for backward instead of running its LM-head product twice). The softmax
statistics of a chunk and its logits gradient are the kernel registry's `logprob_shard_stats` /
`logprob_entropy_grad` (Triton on CUDA, C++ on CPU in fp32), merged over the tensor-parallel vocab
shards by `kernels.logprob.combine_shard_stats` (one MAX and one SUM all-reduce; logits are never
gathered): one implementation of the statistics for training, the kernels and, under
`model.batch_invariant`, the engine's behavior log-probs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rl_engine import kernels
from rl_engine.kernels.logprob import combine_shard_stats

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # fp32 logits per chunk: 16 MiB, cache-friendly on CPU
# A call's logits up to this many (4 MiB fp32) are kept for backward, not recomputed (tiny preset: [3584, 101] a
# micro-batch; the recompute was ~0.4 ms of its LM head matmul)
KEEP_LOGITS_ELEMENTS = 1 << 20


def _chunk_rows(vocab_local: int, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_local))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, dense: Callable = F.linear) -> torch.Tensor:
    """[c, V_local] fp32 logits of one chunk (rounded to the model dtype first, as the engine's are)."""
    return dense(h, weight).float()


class _FusedLogprobEntropy(torch.autograd.Function):
    # `weight` holds only the real vocabulary rows of this rank's shard (padding sliced off by the
    # caller), so there are no padded columns to exclude.
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_start, group, chunk, dense):
        T = hidden.shape[0]
        stats_fn = kernels.resolve("logprob_shard_stats", hidden.device)
        logprobs = torch.empty(T, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(T, dtype=torch.float32, device=hidden.device)
        kept = None  # the logits of a call whose logits are small: backward reads them instead of recomputing
        keep = any(ctx.needs_input_grad[:2]) and T <= chunk and T * weight.shape[0] <= KEEP_LOGITS_ELEMENTS
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            logits = _chunk_logits(hidden[s:e], weight, dense)
            stats = stats_fn(logits, targets[s:e], temperature=temperature, vocab_start=vocab_start)
            lse, target_logit, entropy[s:e] = combine_shard_stats(stats, group)
            logprobs[s:e] = target_logit - lse
            lse_all[s:e] = lse
            kept = logits if keep else None
        ctx.save_for_backward(hidden, weight, targets, lse_all, entropy, kept)
        ctx.cfg = (temperature, vocab_start, chunk)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, targets, lse_all, entropy, kept = ctx.saved_tensors
        temperature, vocab_start, chunk = ctx.cfg
        grad_fn = kernels.resolve("logprob_entropy_grad", hidden.device)
        T = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_lp = torch.zeros(T, device=hidden.device) if grad_lp is None else grad_lp.float()
        grad_ent = torch.zeros(T, device=hidden.device) if grad_ent is None else grad_ent.float()
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            h = hidden[s:e]
            # d(loss)/d(logits) of the chunk, fp32 (the logits are passed in fp32)
            logits = kept if kept is not None else _chunk_logits(h, weight)
            g = grad_fn(logits, targets[s:e], grad_lp[s:e], grad_ent[s:e], lse_all[s:e],
                        entropy[s:e], temperature=temperature, vocab_start=vocab_start)
            if grad_hidden is not None:
                grad_hidden[s:e] = g.to(hidden.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h.float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    vocab_real_rows: int | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    dense: Callable[..., torch.Tensor] = F.linear,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy per token, fp32, [T] each.

    hidden: [T, H] final hidden states (replicated over the tp group, already passed through
    `comm.copy_to_tp` / `gather_sequence` by the caller so that its gradient is reduced);
    weight: [V_local, H] this rank's vocab shard of the LM head, rows `vocab_start` onward, of which
    the first `vocab_real_rows` are real vocabulary (the rest is padding). targets: [T] global ids.
    dense: the forward's chunk-logits product (the LM head's bound `dense` op: under
    `model.batch_invariant` the engine's tiled matmul); backward recomputes the logits with F.linear, or, when
    the call's logits were kept (`KEEP_LOGITS_ELEMENTS`), reads the forward's (`dense`'s): the same bits where
    `dense` is F.linear (the CPU trainer's), not under another `dense`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs (got {temperature})")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [T, H] and targets [T]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if vocab_real_rows is not None and vocab_real_rows < weight.shape[0]:
        weight = weight[:vocab_real_rows]  # a view: its gradient lands in the full parameter
    chunk = _chunk_rows(weight.shape[0], chunk_tokens)
    return _FusedLogprobEntropy.apply(hidden, weight, targets, float(temperature), vocab_start, group, chunk, dense)


def full_logits_logprobs_and_entropy(
    hidden: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    *,
    temperature: float,
    vocab_size: int,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `model.batch_invariant` path: per token chunk, the full-vocabulary logits exactly as the
    engine's sampler receives them (`logits_fn`, the model's `compute_logits`: gathered over tp) and
    the registry's `logprob_entropy` on them, which is the function the sampler's behavior log-probs
    use, so both sides reduce the same numbers in the same order whatever the tp layout. Each chunk
    is recomputed in backward (activation checkpointing), so no [T, vocab] tensor is kept."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs (got {temperature})")
    fn = kernels.resolve("logprob_entropy", hidden.device)

    def chunk_fn(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fn(logits_fn(h), t, temperature=temperature)

    step = _chunk_rows(vocab_size, chunk_tokens)
    pieces = []
    for s in range(0, hidden.shape[0], step):
        h, t = hidden[s:s + step], targets[s:s + step]
        pieces.append(checkpoint(chunk_fn, h, t, use_reentrant=False) if torch.is_grad_enabled() and h.requires_grad
                      else chunk_fn(h, t))
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def reference_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """The plain full-vocabulary reference: what the fused version must equal."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent
