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

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # fp32 logits per chunk: 16 MiB, cache-friendly on CPU


def _chunk_rows(vocab_local: int, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_local))


def _scaled_logits(h: torch.Tensor, weight: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    z = (h @ weight.t()).float()
    return z.mul_(inv_temperature) if inv_temperature != 1.0 else z


class _FusedLogprobEntropy(torch.autograd.Function):
    # `weight` holds only the real vocabulary rows of this rank's shard (padding sliced off by the
    # caller), so there are no -inf columns to special-case.
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_start, group, chunk):
        T, V = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        logprobs = torch.empty(T, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(T, dtype=torch.float32, device=hidden.device)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            z = _scaled_logits(hidden[s:e], weight, inv_t)  # [c, V_local]
            local_t = targets[s:e] - vocab_start
            in_shard = (local_t >= 0) & (local_t < V)
            zt = torch.where(in_shard, z.gather(1, local_t.clamp(0, V - 1)[:, None]).squeeze(1), 0.0)
            m = z.max(dim=-1).values
            comm.all_reduce_no_grad(m, group, op=dist.ReduceOp.MAX)
            z.sub_(m[:, None])  # z - m <= 0
            ez = torch.exp(z)
            sum_e = ez.sum(-1)
            # Entropy = log S - Σ e (z - m) / S: both terms stay small, unlike lse - E[z] when
            # logits are large.
            sum_ez = (ez.mul_(z)).sum(-1)
            stats = torch.stack([sum_e, sum_ez, zt])  # one all-reduce for the three sums
            comm.all_reduce_no_grad(stats, group)
            sum_e, sum_ez, zt = stats
            lse = m + sum_e.log()
            logprobs[s:e] = zt - lse
            entropy[s:e] = sum_e.log() - sum_ez / sum_e
            lse_all[s:e] = lse
        ctx.save_for_backward(hidden, weight, targets, lse_all, entropy)
        ctx.cfg = (inv_t, vocab_start, chunk)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, targets, lse_all, entropy = ctx.saved_tensors
        inv_t, vocab_start, chunk = ctx.cfg
        T, V = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_lp = torch.zeros(T, device=hidden.device) if grad_lp is None else grad_lp.float()
        grad_ent = torch.zeros(T, device=hidden.device) if grad_ent is None else grad_ent.float()
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            h = hidden[s:e]
            g = _scaled_logits(h, weight, inv_t).sub_(lse_all[s:e, None])  # log p
            p = torch.exp(g)
            # dz = -p * (g_lp + g_ent * (log p + H)) + onehot * g_lp, all times 1/τ; in place.
            g.add_(entropy[s:e, None]).mul_(grad_ent[s:e, None]).add_(grad_lp[s:e, None]).mul_(p).neg_()
            local_t = targets[s:e] - vocab_start
            rows = torch.nonzero((local_t >= 0) & (local_t < V)).squeeze(1)
            g[rows, local_t[rows]] += grad_lp[s:e][rows]
            if inv_t != 1.0:
                g.mul_(inv_t)
            if grad_hidden is not None:
                grad_hidden[s:e] = g.to(hidden.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h.float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


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
    if vocab_real_rows is not None and vocab_real_rows < weight.shape[0]:
        weight = weight[:vocab_real_rows]  # a view: its gradient lands in the full parameter
    chunk = _chunk_rows(weight.shape[0], chunk_tokens)
    return _FusedLogprobEntropy.apply(hidden, weight, targets, float(temperature), vocab_start, group, chunk)


def reference_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """The plain full-vocabulary reference: what the fused version must equal."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent
