"""GRPO-family policy losses on flat packed tensors, with importance-sampling correction.

Every tensor is flat over the T tokens of a micro-batch (many packed sequences): `seq_ids[T]` says
which local sequence a token belongs to and `loss_mask[T]` marks the response tokens the loss sees.
Three log-probs meet here: `logprobs` (current policy, with grad), `old_logprobs` (the proximal
policy: the trainer's own log-probs computed once at the start of the step, before its first update;
the PPO anchor), and `behavior_logprobs` (what the rollout engine reported, possibly stale). This is
the decoupled objective: the PPO/GSPO ratio is logprobs/old; the importance weight that corrects the
engine mismatch (and staleness) is old/behavior (TIS truncates it, MIS masks it), per token for
PPO and per sequence for GSPO (the geometric mean of the token ratios, as GSPO defines its own ratio,
so the product of the two is the geometric mean of current/behavior). With one update per
step the proximal policy is the current one, and `old_logprobs=None` (old = logprobs.detach()) is
the same loss without a second forward pass.

Main design choice, the normalisation contract: the caller fixes global normalisers for the whole
optimizer-step batch before it is split (`compute_loss_normalizer`); each micro-batch returns its
loss SUM divided by them. Summing the micro-batch losses, and summing gradients over data-parallel
ranks, then gives exactly the full-batch loss and gradient, whatever the split or packing. Metrics
follow the same rule (additive, except keys ending in `_max`), so `reduce_metrics` combines them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

LOSS_TYPES = ("ppo_clip", "gspo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
IS_MODES = ("none", "truncate", "mask")
IS_LEVELS = ("token", "sequence", "geometric")
# exp() of a log-ratio beyond this overflows fp32 gradients; reached only by diverging runs.
_MAX_LOG_RATIO = 20.0


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


@dataclass(kw_only=True)
class ImportanceSamplingConfig:
    """Correction between behavior (rollout engine) and training (old/proximal) log-probs.

    mode: "none" (weights 1; mismatch metrics still reported), "truncate" (TIS: w = min(r, cap)),
    "mask" (MIS: w = r inside [mask_low, mask_high], else 0). level: "token" (r per token),
    "sequence" (product of token ratios), "geometric" (geometric mean of token ratios), or None:
    the loss's own level, "token" for ppo_clip and "geometric" for gspo (whose ratio is one per
    sequence, so its correction is too: w_i = min(exp(mean_t log(old_t / behavior_t)), cap) on
    every token of sequence i; a per-token weight would re-weight the tokens inside GSPO's sequence
    gradient, which the paper's objective does not do).
    """

    # Default TIS: a no-op when behavior and training weights agree (sync, fp32: r = 1 within 1e-6),
    # and what keeps async runs (stale tokens, r far from 1) from blowing up.
    mode: str = "truncate"
    level: str | None = None
    truncate_cap: float = 2.0
    mask_low: float = 0.5
    mask_high: float = 2.0

    def __post_init__(self) -> None:
        _check_choice("importance_sampling.mode", self.mode, IS_MODES)
        if self.level is not None:
            _check_choice("importance_sampling.level", self.level, IS_LEVELS)
        if not self.truncate_cap > 0:
            raise ValueError(f"importance_sampling.truncate_cap ({self.truncate_cap}) must be > 0 (typical: 2.0)")
        if not 0 <= self.mask_low <= 1 <= self.mask_high:
            raise ValueError(
                f"importance_sampling mask bounds [{self.mask_low}, {self.mask_high}] must satisfy "
                "0 <= mask_low <= 1 <= mask_high (typical: [0.5, 2.0])"
            )


@dataclass(kw_only=True)
class PolicyLossConfig:
    """loss_type "ppo_clip" clips per token in [1 - clip_low, 1 + clip_high] (DAPO clip-higher:
    clip_high=0.28); "gspo" clips the length-normalised sequence ratio (paper: 3e-4 / 4e-4).
    dual_clip c > 1 caps the loss of negative-advantage tokens at -A*c. agg is the verl-style
    aggregation; "seq-mean-token-sum-norm" (Dr.GRPO) divides each sequence's token sum by the
    normaliser's constant instead of its length."""

    loss_type: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    # KL to the reference as a reward penalty (verl's use_kl_in_reward; every placement): each
    # sample's reward loses kl_coef * its summed per-token KL(proximal || ref) before the advantages,
    # and the loss has no KL term.
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    importance_sampling: ImportanceSamplingConfig = field(default_factory=ImportanceSamplingConfig)

    def __post_init__(self) -> None:
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("agg", self.agg, AGG_MODES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if not 0 < self.clip_low < 1:
            raise ValueError(f"clip_low ({self.clip_low}) must be in (0, 1): the ratio floor is 1 - clip_low")
        if not self.clip_high > 0:
            raise ValueError(f"clip_high ({self.clip_high}) must be > 0: the ratio ceiling is 1 + clip_high")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip ({self.dual_clip}) must be > 1 (typical: 3.0), or None to disable")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"kl_coef ({self.kl_coef}) and entropy_coef ({self.entropy_coef}) must be >= 0")
        if self.loss_type == "gspo" and self.importance_sampling.level == "token":
            raise ValueError("importance_sampling.level='token' does not fit loss_type='gspo': GSPO's ratio is one"
                             " per sequence, so is its importance weight; leave the level unset (the GSPO form,"
                             " 'geometric': the geometric mean of the token ratios) or choose 'geometric' or"
                             " 'sequence'")

    @property
    def is_level(self) -> str:
        """The importance-sampling level in force: the configured one, else the loss's own."""
        level = self.importance_sampling.level
        return level if level is not None else ("geometric" if self.loss_type == "gspo" else "token")


@dataclass(frozen=True, kw_only=True)
class LossNormalizer:
    """Global denominators of one optimizer step, fixed before the batch is split.

    num_tokens: response tokens in the whole batch; num_sequences: sequences with at least one
    response token; token_sum_constant: Dr.GRPO's fixed per-sequence divisor (e.g. max response
    length)."""

    num_tokens: int
    num_sequences: int
    token_sum_constant: float = 1.0

    def __post_init__(self) -> None:
        if self.num_tokens <= 0 or self.num_sequences <= 0:
            raise ValueError(
                f"LossNormalizer needs num_tokens ({self.num_tokens}) and num_sequences "
                f"({self.num_sequences}) > 0: the batch has no response tokens; skip the step instead"
            )
        if not self.token_sum_constant > 0:
            raise ValueError(f"token_sum_constant ({self.token_sum_constant}) must be > 0")


def compute_loss_normalizer(
    response_lengths: Sequence[int] | torch.Tensor, *, token_sum_constant: float = 1.0
) -> LossNormalizer:
    """Normalisers from the loss-mask token count of every sequence of the WHOLE global batch
    (all micro-batches, all dp ranks). With sharded data, all-reduce the two counts instead."""
    lengths = torch.as_tensor(response_lengths, dtype=torch.int64)
    if (lengths < 0).any():
        raise ValueError(f"response lengths must be >= 0, got {lengths.tolist()}")
    return LossNormalizer(
        num_tokens=int(lengths.sum()),
        num_sequences=int((lengths > 0).sum()),
        token_sum_constant=token_sum_constant,
    )


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[n+1] cumulative lengths -> [T] int64 sequence index of every token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def _segment_sum(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[T] -> [num_seqs] sums per sequence (differentiable)."""
    return values.new_zeros(num_seqs).index_add(0, seq_ids, values)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's estimators). k1 =
    log(pi/ref) (unbiased, can be negative); k2 = log(pi/ref)^2 / 2 (biased, >= 0, its gradient is
    the reverse KL's); k3 = ref/pi - 1 - log(ref/pi) (unbiased, always >= 0, the low-variance one)."""
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    log_ratio = (logprobs - ref_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.exp(-log_ratio) - 1 + log_ratio


def importance_weights(
    *,
    training_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    config: ImportanceSamplingConfig,
    normalizer: LossNormalizer,
    level: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token weights [T] (no grad) correcting behavior -> training, plus additive metrics.
    `level` overrides `config.level` (`PolicyLoss` passes its loss's level); with neither, "token".

    Metrics: mismatch_k3 / mismatch_k1 estimate KL(behavior || training) per response token;
    is_ratio_mean / is_ratio_max / is_affected_frac are over units (tokens or sequences) of
    `config.level`; is_affected_frac is the fraction truncated (TIS) or masked (MIS)."""
    mask = loss_mask.bool()
    # [T] log(pi_train / pi_behavior), 0 off the response.
    dtype = torch.promote_types(training_logprobs.dtype, torch.float32)  # at least fp32 for bf16 inputs
    log_ratio = torch.where(mask, (training_logprobs - behavior_logprobs).detach().to(dtype), 0.0)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    metrics = {
        "mismatch_k3": (torch.exp(log_ratio) - 1 - log_ratio).sum() / normalizer.num_tokens,
        "mismatch_k1": (-log_ratio).sum() / normalizer.num_tokens,
    }
    level = level or config.level or "token"
    _check_choice("importance_sampling.level", level, IS_LEVELS)
    if level == "token":
        unit_log_ratio, valid, denominator = log_ratio, mask, normalizer.num_tokens
    else:
        seq_len = _segment_sum(mask.float(), seq_ids, num_seqs)  # [S]
        unit_log_ratio = _segment_sum(log_ratio, seq_ids, num_seqs)  # [S] log of the product
        if level == "geometric":
            unit_log_ratio = unit_log_ratio / seq_len.clamp(min=1)
        valid, denominator = seq_len > 0, normalizer.num_sequences
    ratio = torch.exp(unit_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    if config.mode == "truncate":
        weights, affected = ratio.clamp(max=config.truncate_cap), ratio > config.truncate_cap
    elif config.mode == "mask":
        inside = (ratio >= config.mask_low) & (ratio <= config.mask_high)
        weights, affected = torch.where(inside, ratio, 0.0), ~inside
    else:
        weights, affected = torch.ones_like(ratio), torch.zeros_like(valid)
    metrics["is_ratio_mean"] = torch.where(valid, ratio, 0.0).sum() / denominator
    metrics["is_ratio_max"] = torch.where(valid, ratio, 0.0).max() if ratio.numel() else ratio.new_zeros(())
    metrics["is_affected_frac"] = (affected & valid).float().sum() / denominator
    if level != "token":
        weights = weights[seq_ids]  # [S] -> [T]
    return weights.to(training_logprobs.dtype), metrics


def _token_ratio(
    logprobs: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int
) -> torch.Tensor:
    """PPO: pi / pi_old per token."""
    return torch.exp(log_ratio)


def _gspo_token_ratio(
    logprobs: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int
) -> torch.Tensor:
    """GSPO-token form: the value is the sequence's geometric-mean ratio s_i on every token; the
    gradient per token is s_i * grad log pi_t (stop-gradient trick), so a sequence's token mean
    has exactly the gradient of s_i."""
    seq_len = _segment_sum(mask.to(log_ratio.dtype), seq_ids, num_seqs).clamp(min=1)
    seq_log_ratio = _segment_sum(torch.where(mask, log_ratio, 0.0), seq_ids, num_seqs) / seq_len  # [S]
    token_log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach()[seq_ids]
    return torch.exp(token_log_ratio.clamp(max=_MAX_LOG_RATIO))


@dataclass(kw_only=True)
class LossOutput:
    loss: torch.Tensor  # scalar with grad: this micro-batch's share of the global loss
    metrics: dict[str, torch.Tensor]  # detached scalars; additive, except `*_max`


class PolicyLoss:
    """The configured policy loss; call it once per micro-batch and sum the returned losses."""

    def __init__(self, config: PolicyLossConfig) -> None:
        self.config = config
        self._ratio = _gspo_token_ratio if config.loss_type == "gspo" else _token_ratio

    def __call__(
        self,
        *,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        seq_ids: torch.Tensor,
        num_seqs: int,
        normalizer: LossNormalizer,
        old_logprobs: torch.Tensor | None = None,
        behavior_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
    ) -> LossOutput:
        """All tensors are [T]. old_logprobs None means on-policy (old = logprobs.detach()); given,
        they are the proximal policy's and add `proximal_clipfrac` (response tokens whose ratio to
        the proximal policy lies outside the clip range) and `behavior_vs_proximal_kl`.
        behavior_logprobs None skips the importance correction and its metrics."""
        cfg = self.config
        mask = loss_mask.bool()
        num_masked = mask.float().sum()
        old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
        log_ratio = (logprobs - old).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [T]
        ratio = self._ratio(logprobs, log_ratio, mask, seq_ids, num_seqs)  # [T]
        pg_unclipped = -advantages * ratio
        pg_clipped = -advantages * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
        pg = torch.maximum(pg_unclipped, pg_clipped)
        metrics = {
            "pg_clipfrac": (mask & (pg_clipped > pg_unclipped)).float().sum() / normalizer.num_tokens,
            # KL(old || current), k3 estimator: how far this update has moved the policy.
            "approx_kl": torch.where(mask, torch.expm1(log_ratio) - log_ratio, 0.0).detach().sum()
            / normalizer.num_tokens,
        }
        if cfg.dual_clip is not None:
            pg_dual = -advantages * cfg.dual_clip
            dual = (advantages < 0) & (pg > pg_dual)
            pg = torch.where(dual, pg_dual, pg)
            metrics["pg_clipfrac_dual"] = (mask & dual).float().sum() / normalizer.num_tokens
        if old_logprobs is not None:
            outside = (ratio < 1 - cfg.clip_low) | (ratio > 1 + cfg.clip_high)
            metrics["proximal_clipfrac"] = (mask & outside).float().sum().detach() / normalizer.num_tokens

        if behavior_logprobs is not None:
            weights, is_metrics = importance_weights(
                training_logprobs=old,
                behavior_logprobs=behavior_logprobs,
                loss_mask=mask,
                seq_ids=seq_ids,
                num_seqs=num_seqs,
                config=cfg.importance_sampling,
                normalizer=normalizer,
                level=cfg.is_level,
            )
            pg = pg * weights
            metrics.update(is_metrics)
            if old_logprobs is not None:
                metrics["behavior_vs_proximal_kl"] = is_metrics["mismatch_k3"]
        per_token = pg
        metrics["pg_loss"] = self._aggregate(pg.detach(), mask, seq_ids, num_seqs, normalizer)
        # The regularisers act on the current policy and are not importance-weighted.
        if ref_logprobs is not None:
            kl = kl_penalty(logprobs, ref_logprobs.detach(), estimator=cfg.kl_estimator)
            metrics["kl_ref"] = torch.where(mask, kl.detach(), 0.0).sum() / normalizer.num_tokens
            if cfg.kl_coef > 0 and not cfg.kl_in_reward:
                per_token = per_token + cfg.kl_coef * kl
        elif cfg.kl_coef > 0 and not cfg.kl_in_reward:
            raise ValueError(f"kl_coef ({cfg.kl_coef}) > 0 needs ref_logprobs; pass them or set kl_coef=0")
        if entropy is not None:
            metrics["entropy"] = torch.where(mask, entropy.detach(), 0.0).sum() / normalizer.num_tokens
            if cfg.entropy_coef > 0:
                per_token = per_token - cfg.entropy_coef * entropy
        elif cfg.entropy_coef > 0:
            raise ValueError(f"entropy_coef ({cfg.entropy_coef}) > 0 needs entropy; pass it or set entropy_coef=0")
        metrics["response_tokens"] = num_masked.detach()
        loss = self._aggregate(per_token, mask, seq_ids, num_seqs, normalizer)
        return LossOutput(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})

    def _aggregate(
        self,
        per_token: torch.Tensor,
        mask: torch.Tensor,
        seq_ids: torch.Tensor,
        num_seqs: int,
        normalizer: LossNormalizer,
    ) -> torch.Tensor:
        """Sum of this micro-batch's share divided by the global normaliser (never a local mean).
        Sequences are never split across micro-batches, so per-sequence lengths are complete here."""
        masked = torch.where(mask, per_token, 0.0)  # where, not *: NaN off the response must not leak
        agg = self.config.agg
        if agg == "token-mean":
            return masked.sum() / normalizer.num_tokens
        if agg == "seq-mean-token-mean":
            seq_len = _segment_sum(mask.to(masked.dtype), seq_ids, num_seqs).clamp(min=1)
            return (_segment_sum(masked, seq_ids, num_seqs) / seq_len).sum() / normalizer.num_sequences
        return masked.sum() / (normalizer.num_sequences * normalizer.token_sum_constant)


def reduce_metrics(per_micro_batch: Iterable[Mapping[str, torch.Tensor | float]]) -> dict[str, float]:
    """Combine micro-batch metrics into step metrics: sum, or max for keys ending in `_max`.
    Across dp ranks, all-reduce with SUM (and MAX for `_max` keys) in the same way."""
    out: dict[str, float] = {}
    for metrics in per_micro_batch:
        for key, value in metrics.items():
            value = float(value)
            if key not in out:
                out[key] = value
            elif key.endswith("_max"):
                out[key] = max(out[key], value)
            else:
                out[key] += value
    return out
