"""Per-token log-probs and entropy of given targets, straight from hidden states.

The log-prob contract (ARCHITECTURE.md): `log_softmax(logits / temperature)[target]` over the full
vocabulary, and the entropy of that same distribution. This module computes both from the final
hidden states and the (vocab-parallel) LM-head weight in token chunks, inside one autograd Function
that saves only the hidden states and two floats per token: backward recomputes each chunk's
logits, so no `[T, vocab]` tensor of the batch is ever held at once, neither in forward nor for
backward. Under tensor parallelism each rank holds a vocab shard; the softmax needs one all-reduce of
the max and one of the sums (exp-sum, target logit, Σ exp(z - max)·(z - max)), and never gathers logits.

Gradients (s = z / τ, p = softmax(s), H = -Σ p log p):
    d logprob / dz = (onehot(target) - p) / τ
    d H / dz       = -p (log p + H) / τ
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rl_engine.policy import comm

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk: 64 MiB


def _chunk_rows(vocab_local: int, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_local))


def _scaled_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float, n_real: int) -> torch.Tensor:
    z = (h @ weight.t()).float()
    if temperature != 1.0:
        z = z / temperature
    if n_real < z.shape[-1]:
        z[:, n_real:] = float("-inf")
    return z


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_start, n_real, group, chunk):
        T = hidden.shape[0]
        logprobs = torch.empty(T, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(T, dtype=torch.float32, device=hidden.device)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            z = _scaled_logits(hidden[s:e], weight, temperature, n_real)  # [c, V_local]
            m = z.max(dim=-1).values
            comm.all_reduce_no_grad(m, group, op=dist.ReduceOp.MAX)
            zm = z - m[:, None]
            ez = torch.exp(zm)
            sum_e = ez.sum(-1)
            # Σ exp(z - m) (z - m), padded columns (exp = 0, z = -inf) contributing 0. Entropy is
            # then log S - Σ e (z - m) / S: both terms stay small, unlike lse - E[z] for large logits.
            sum_ez = torch.where(ez > 0, ez * zm, torch.zeros_like(z)).sum(-1)
            local_t = targets[s:e] - vocab_start
            in_shard = (local_t >= 0) & (local_t < n_real)
            zt = torch.where(
                in_shard, z.gather(1, local_t.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), torch.zeros_like(m)
            )
            stats = torch.stack([sum_e, sum_ez, zt])  # one all-reduce for the three sums
            comm.all_reduce_no_grad(stats, group)
            sum_e, sum_ez, zt = stats
            lse = m + sum_e.log()
            logprobs[s:e] = zt - lse
            entropy[s:e] = sum_e.log() - sum_ez / sum_e
            lse_all[s:e] = lse
        ctx.save_for_backward(hidden, weight, targets, lse_all, entropy)
        ctx.cfg = (temperature, vocab_start, n_real, chunk)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, targets, lse_all, entropy = ctx.saved_tensors
        temperature, vocab_start, n_real, chunk = ctx.cfg
        T = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_lp = torch.zeros(T, device=hidden.device) if grad_lp is None else grad_lp.float()
        grad_ent = torch.zeros(T, device=hidden.device) if grad_ent is None else grad_ent.float()
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            h = hidden[s:e]
            z = _scaled_logits(h, weight, temperature, n_real)
            logp = z - lse_all[s:e, None]
            p = torch.exp(logp)
            # Entropy term; padded columns have p = 0 and log p = -inf, their gradient is 0.
            g = -grad_ent[s:e, None] * torch.where(p > 0, p * (logp + entropy[s:e, None]), torch.zeros_like(p))
            g = g - grad_lp[s:e, None] * p
            local_t = targets[s:e] - vocab_start
            in_shard = (local_t >= 0) & (local_t < n_real)
            rows = torch.nonzero(in_shard).squeeze(1)
            g[rows, local_t[rows]] += grad_lp[s:e][rows]
            if temperature != 1.0:
                g = g / temperature
            g = g.to(hidden.dtype) if hidden.dtype != torch.float32 else g
            if grad_hidden is not None:
                grad_hidden[s:e] = g @ weight
            if grad_weight is not None:
                grad_weight += g.t().float() @ h.float()
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy per token, fp32, [T] each.

    hidden: [T, H] final hidden states (replicated over the tp group, already passed through
    `comm.copy_to_tp` / `gather_sequence` by the caller so that its gradient is reduced);
    weight: [V_local, H] this rank's vocab shard of the LM head, rows `vocab_start` onward, of which
    the first `vocab_real_rows` are real vocabulary (the rest is padding). targets: [T] global ids.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs (got {temperature})")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [T, H] and targets [T]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    n_real = weight.shape[0] if vocab_real_rows is None else vocab_real_rows
    chunk = _chunk_rows(weight.shape[0], chunk_tokens)
    return _FusedLogprobEntropy.apply(hidden, weight, targets, float(temperature), vocab_start, n_real, group, chunk)


def reference_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """The plain full-vocabulary reference: what the fused version must equal."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent
