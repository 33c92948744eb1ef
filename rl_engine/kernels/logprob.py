"""Per-token log-prob and entropy from (vocab-sharded) logits: the torch reference and the shared
tensor-parallel plumbing that every backend reuses.

Contract (ARCHITECTURE.md): with z = logits / temperature over the full vocabulary,
    logprob = log_softmax(z)[target],   entropy = -sum p log p = log S - sum e (z - m) / S,
with m = max z, e = exp(z - m), S = sum e: the stable form (both terms stay small, unlike
logsumexp(z) - E[z] when logits are large).
Design: each vocab shard [vocab_start, vocab_start + V_local) reduces its logits to four numbers
per token (`ShardStats`: local max m_r, S_r = sum exp(z - m_r), A_r = sum exp(z - m_r) (z - m_r),
and the target's z when the target is in this shard). `combine_shard_stats` merges shards with one
MAX and one SUM all-reduce (with M the global max and c_r = exp(m_r - M): S = sum c_r S_r,
A = sum c_r (A_r + (m_r - M) S_r)); logits are never gathered. This is the one implementation of
these statistics: the policy's chunked training path (`policy/logprobs.py`) calls the registry's
per-chunk `logprob_shard_stats` / `logprob_entropy_grad` and this merge, and the engine's sampler
computes behavior log-probs under `model.batch_invariant` with `logprobs_only`, their log-prob-only form
(the same bits, without the entropy). Backward needs no communication: with the global
logsumexp and entropy saved, each shard's gradient is local,
    d logprob / d logits = (onehot - p) / temperature,   d H / d logits = -p (log p + H) / temperature.
A backend supplies only the two heavy per-shard pieces (`stats_fn`, `grad_fn`); `logprob_entropy_with`
wraps them in the autograd Function, so the torch and Triton versions share one code path.
Columns with global id >= `vocab_size` (padding rows of the LM head) are excluded from the softmax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

# fp32 elements of one token chunk in the torch reference: bounds its temporaries to 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


class ShardStats(NamedTuple):
    """Per-token softmax statistics of one vocab shard, all [T] fp32 (see module docstring)."""

    max: torch.Tensor  # -inf when the shard has no valid column
    sum_exp: torch.Tensor  # sum exp(z - max)
    sum_exp_shifted_z: torch.Tensor  # sum exp(z - max) * (z - max), <= 0
    target_logit: torch.Tensor  # 0 when the target is outside this shard


StatsFn = Callable[..., ShardStats]
GradFn = Callable[..., torch.Tensor]


def num_valid_columns(num_local: int, vocab_start: int, vocab_size: int | None) -> int:
    """How many of this shard's columns are real vocabulary (the rest are padding)."""
    if vocab_size is None:
        return num_local
    return max(0, min(num_local, vocab_size - vocab_start))


def _check(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [T, V_local >= 1] and targets [T]; got {tuple(logits.shape)}"
                         f" and {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")


def _scaled_chunk(logits: torch.Tensor, temperature: float, n_valid: int) -> torch.Tensor:
    z = logits.float() / temperature
    if n_valid < z.shape[1]:
        z[:, n_valid:] = float("-inf")
    return z


def _chunk_tokens(num_local: int) -> int:
    return max(1, _CHUNK_ELEMENTS // num_local)


def logprob_shard_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> ShardStats:
    """`ShardStats` of logits [T, V_local] for global target ids [T] (torch reference)."""
    _check(logits, targets, temperature)
    num_tokens, num_local = logits.shape
    n_valid = num_valid_columns(num_local, vocab_start, vocab_size)
    out = torch.empty(4, num_tokens, dtype=torch.float32, device=logits.device)
    step = _chunk_tokens(num_local)
    for s in range(0, num_tokens, step):
        e = min(num_tokens, s + step)
        z = _scaled_chunk(logits[s:e], temperature, n_valid)  # [c, V_local]
        m = torch.amax(z, dim=-1, out=out[0, s:e])  # (amax: the max without argmax's index pass)
        local = targets[s:e].long() - vocab_start
        in_shard = (local >= 0) & (local < n_valid)
        out[3, s:e] = torch.where(in_shard, z.gather(1, local.clamp(0, num_local - 1)[:, None]).squeeze(1), 0.0)
        z -= m.clamp(min=torch.finfo(torch.float32).min)[:, None]  # z - m <= 0; -inf rows stay -inf
        ez = torch.exp(z)
        torch.sum(ez, -1, out=out[1, s:e])
        # ez * z in place of z (not needed after); z's -inf entries (padded columns, or a logit masked to
        # -inf) first become the lowest finite float, so their 0 * z is 0, not 0 * -inf = nan
        torch.sum(z.clamp_(min=torch.finfo(torch.float32).min).mul_(ez), -1, out=out[2, s:e])
    return ShardStats(*out)


def logprobs_only(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(z)[target] per row of z [n, V] fp32, logits already divided by the temperature, every
    column real: the log-prob of `logprob_entropy(logits, targets, temperature=T)` with z = logits.float() / T,
    bit for bit, without the entropy's passes and the shard merge (the sampler's behavior log-probs under
    `model.batch_invariant`). The same ops as `logprob_shard_stats` (m = max z, S = sum exp(z - m)) and
    `combine_shard_stats` at one shard (which scales S by exp(m - m) = 1 and adds m + log S): its bits equal
    theirs as long as both stay so (tests/kernels/test_logprob.py)."""
    m = z.max(dim=-1).values
    sum_exp = torch.exp(z - m[:, None]).sum(-1)
    return z.gather(1, targets.long()[:, None]).squeeze(1) - (m + sum_exp.log())


def _rescaled(stats: ShardStats, global_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's (S_r, A_r) re-expressed against the global max: (c S_r, c (A_r + (m_r - M) S_r))."""
    empty = torch.isneginf(stats.max)  # no valid column: S_r = A_r = 0 (and m_r - M would be nan)
    rescale = torch.where(empty, 0.0, torch.exp(stats.max - global_max))
    shift = torch.where(empty, 0.0, stats.max - global_max)
    return stats.sum_exp * rescale, (stats.sum_exp_shifted_z + shift * stats.sum_exp) * rescale


def _finish(global_max, sum_exp, sum_exp_shifted_z, target_logit):
    log_sum = sum_exp.log()
    return global_max + log_sum, target_logit, log_sum - sum_exp_shifted_z / sum_exp


def combine_shard_stats(
    stats: ShardStats, process_group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the shards' stats: (logsumexp, target_logit, entropy), each [T] fp32.

    With a process group of size > 1: one MAX all-reduce, then one SUM all-reduce of three stacked
    vectors. Without one (or at size 1) this is local arithmetic only.
    """
    distributed = process_group is not None and dist.get_world_size(process_group) > 1
    global_max = stats.max.clone()
    if distributed:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=process_group)
    sum_exp, sum_exp_shifted_z = _rescaled(stats, global_max)
    sums = torch.stack([sum_exp, sum_exp_shifted_z, stats.target_logit])
    if distributed:
        dist.all_reduce(sums, group=process_group)
    return _finish(global_max, *sums)


def combine_local_shards(shards: list[ShardStats]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`combine_shard_stats` over shards held in one process (tests, and callers that loop)."""
    global_max = torch.stack([s.max for s in shards]).max(0).values
    sum_exp = torch.zeros_like(global_max)
    sum_exp_shifted_z = torch.zeros_like(global_max)
    target_logit = torch.zeros_like(global_max)
    for s in shards:
        s_r, a_r = _rescaled(s, global_max)
        sum_exp += s_r
        sum_exp_shifted_z += a_r
        target_logit += s.target_logit
    return _finish(global_max, sum_exp, sum_exp_shifted_z, target_logit)


def logprob_entropy_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logsumexp: torch.Tensor,
    entropy: torch.Tensor,
    *,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. this shard's logits [T, V_local] (torch reference), in logits' dtype.

    grad = (g_lp * (onehot - p) - g_H * p * (log p + H)) / temperature, with p, log p from the
    global `logsumexp`; padded columns get 0.
    """
    num_tokens, num_local = logits.shape
    n_valid = num_valid_columns(num_local, vocab_start, vocab_size)
    grad = torch.empty_like(logits)
    step = _chunk_tokens(num_local)
    for s in range(0, num_tokens, step):
        e = min(num_tokens, s + step)
        log_p = _scaled_chunk(logits[s:e], temperature, n_valid).sub_(logsumexp[s:e, None])
        p = log_p.exp()
        g_lp, g_h = grad_logprobs[s:e, None].float(), grad_entropy[s:e, None].float()
        # -p * (g_lp + g_h * (log p + H)), in place on log_p's buffer (the same ops in the same order as
        # the expression; -(p * x) and (-p) * x round alike); where p = 0 (padded columns, -inf logits, or
        # an underflow) log p + H is taken as 0, so g is 0 there and not 0 * -inf = nan
        g = log_p.add_(entropy[s:e, None]).masked_fill_(p == 0, 0.0)
        g = g.mul_(g_h).add_(g_lp).mul_(p).neg_()
        local = targets[s:e].long() - vocab_start
        in_shard = (local >= 0) & (local < n_valid)
        rows = torch.nonzero(in_shard).squeeze(1)
        g[rows, local[rows]] += g_lp[rows, 0]
        grad[s:e] = (g if temperature == 1.0 else g.div_(temperature)).to(grad.dtype)
    return grad


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, vocab_start, vocab_size, process_group,
                stats_fn, grad_fn):
        stats = stats_fn(logits, targets, temperature=temperature, vocab_start=vocab_start,
                         vocab_size=vocab_size)
        logsumexp, target_logit, entropy = combine_shard_stats(stats, process_group)
        logprobs = target_logit - logsumexp
        ctx.save_for_backward(logits, targets, logsumexp, entropy)
        ctx.options = (temperature, vocab_start, vocab_size, grad_fn)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, logsumexp, entropy = ctx.saved_tensors
        temperature, vocab_start, vocab_size, grad_fn = ctx.options
        zeros = torch.zeros_like(logsumexp)
        grad = grad_fn(
            logits, targets,
            zeros if grad_logprobs is None else grad_logprobs,
            zeros if grad_entropy is None else grad_entropy,
            logsumexp, entropy,
            temperature=temperature, vocab_start=vocab_start, vocab_size=vocab_size,
        )
        return grad, None, None, None, None, None, None, None


def logprob_entropy_with(
    stats_fn: StatsFn,
    grad_fn: GradFn,
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprob_entropy` with a backend's per-shard `stats_fn` and `grad_fn`."""
    _check(logits, targets, temperature)
    return _LogprobEntropy.apply(logits, targets, float(temperature), int(vocab_start), vocab_size,
                                 process_group, stats_fn, grad_fn)


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprobs [T], entropy [T]) in fp32, differentiable w.r.t. `logits`.

    logits: [T, V_local], this rank's vocab shard starting at global id `vocab_start`; targets:
    [T] global token ids (a target outside [0, vocab_size) yields garbage: mask such tokens out);
    vocab_size: the real vocabulary (columns at or past it are padding; None: all real);
    process_group: the tensor-parallel group the vocab is sharded over (None: unsharded).
    """
    return logprob_entropy_with(logprob_shard_stats, logprob_entropy_grad, logits, targets,
                                temperature=temperature, vocab_start=vocab_start,
                                vocab_size=vocab_size, process_group=process_group)
