"""Policy losses: against per-sequence loop references, split/packing/dp invariance, IS identities."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from rl_engine.losses import (
    ImportanceSamplingConfig,
    LossNormalizer,
    PolicyLoss,
    PolicyLossConfig,
    compute_loss_normalizer,
    importance_weights,
    kl_penalty,
    reduce_metrics,
    seq_ids_from_cu_seqlens,
)
from rl_engine.rollout.packing import build_packed_batch, plan_micro_batches

VOCAB = 7


@dataclass
class ToyBatch:
    """A toy 'model': theta[t] are the logits of global token t; its target is token_ids[t]."""

    theta: torch.Tensor  # [T_total, V]
    token_ids: list[list[int]]
    loss_mask: list[list[bool]]
    global_index: list[list[int]]
    old: torch.Tensor  # [T_total]
    behavior: torch.Tensor
    ref: torch.Tensor
    advantages: torch.Tensor  # [S]

    @property
    def num_samples(self) -> int:
        return len(self.token_ids)

    def response_lengths(self) -> list[int]:
        return [sum(m) for m in self.loss_mask]


def make_batch(*, seed: int = 0, num_samples: int = 8, dtype: torch.dtype = torch.float32) -> ToyBatch:
    g = torch.Generator().manual_seed(seed)
    token_ids, loss_mask, global_index = [], [], []
    offset = 0
    for _ in range(num_samples):
        p = int(torch.randint(1, 4, (), generator=g))
        r = int(torch.randint(1, 7, (), generator=g))
        token_ids.append(torch.randint(0, VOCAB, (p + r,), generator=g).tolist())
        loss_mask.append([False] * p + [True] * r)
        global_index.append(list(range(offset, offset + p + r)))
        offset += p + r
    theta = (torch.randn(offset, VOCAB, generator=g) * 0.7).to(dtype)
    flat_targets = torch.tensor([t for ids in token_ids for t in ids])
    lp = torch.log_softmax(theta, -1).gather(-1, flat_targets[:, None])[:, 0]
    old = lp + 0.4 * torch.randn(offset, generator=g, dtype=dtype)
    behavior = old + 0.3 * torch.randn(offset, generator=g, dtype=dtype)
    ref = old + 0.3 * torch.randn(offset, generator=g, dtype=dtype)
    advantages = torch.randn(num_samples, generator=g, dtype=dtype)
    return ToyBatch(theta, token_ids, loss_mask, global_index, old, behavior, ref, advantages)


def run_split(
    batch: ToyBatch, ranks: list[list[list[int]]], config: PolicyLossConfig, normalizer: LossNormalizer
) -> tuple[float, torch.Tensor, list[dict]]:
    """Loss and gradient of theta for a split: ranks[r][i] = sample indices of micro-batch i.
    Each simulated dp rank has its own copy of theta; rank gradients are summed (all-reduce SUM)."""
    loss_fn = PolicyLoss(config)
    total, grads, metrics = 0.0, [], []
    for micro_batches in ranks:
        theta = batch.theta.detach().clone().requires_grad_()
        for mb in micro_batches:
            packed = build_packed_batch(
                mb,
                token_ids=batch.token_ids,
                per_token={"loss_mask": batch.loss_mask, "gidx": batch.global_index},
                per_sample={"advantages": batch.advantages},
            )
            gidx = packed.values["gidx"].long()
            logp_all = torch.log_softmax(theta[gidx], -1)  # [T, V]
            logprobs = logp_all.gather(-1, packed.input_ids[:, None])[:, 0]
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            out = loss_fn(
                logprobs=logprobs,
                advantages=packed.values["advantages"],
                loss_mask=packed.values["loss_mask"],
                seq_ids=packed.seq_ids,
                num_seqs=packed.num_seqs,
                normalizer=normalizer,
                old_logprobs=batch.old[gidx],
                behavior_logprobs=batch.behavior[gidx],
                ref_logprobs=batch.ref[gidx],
                entropy=entropy,
            )
            out.loss.backward()
            total += float(out.loss.detach())
            metrics.append(out.metrics)
        grads.append(theta.grad if theta.grad is not None else torch.zeros_like(theta))
    return total, torch.stack(grads).sum(0), metrics


def reference_loss(batch: ToyBatch, config: PolicyLossConfig, *, token_sum_constant: float = 1.0) -> tuple[float, torch.Tensor]:
    """Straightforward per-sequence, per-token loop over the objective as written in the papers."""
    theta = batch.theta.detach().clone().requires_grad_()
    is_cfg = config.importance_sampling
    seq_terms, num_tokens = [], 0
    for s in range(batch.num_samples):
        A = batch.advantages[s]
        tokens = [(g, t) for g, t, m in zip(batch.global_index[s], batch.token_ids[s], batch.loss_mask[s]) if m]
        lps = [torch.log_softmax(theta[g], -1)[t] for g, t in tokens]
        seq_log_is = sum(float(batch.old[g] - batch.behavior[g]) for g, _ in tokens)
        if config.loss_type == "gspo":
            s_ratio = torch.exp(sum(lp - batch.old[g] for lp, (g, _) in zip(lps, tokens)) / len(tokens))
            obj = torch.min(s_ratio * A, torch.clamp(s_ratio, 1 - config.clip_low, 1 + config.clip_high) * A)
            terms = [-obj] * len(tokens)  # every token carries the sequence objective
        else:
            terms = []
            for lp, (g, _) in zip(lps, tokens):
                ratio = torch.exp(lp - batch.old[g])
                obj = torch.min(ratio * A, torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high) * A)
                if config.dual_clip is not None and A < 0:
                    obj = torch.max(obj, config.dual_clip * A)
                terms.append(-obj)
        for i, (lp, (g, _)) in enumerate(zip(lps, tokens)):
            if is_cfg.mode == "truncate" and config.is_level == "token":
                terms[i] = terms[i] * min(math.exp(float(batch.old[g] - batch.behavior[g])), is_cfg.truncate_cap)
            elif is_cfg.mode == "truncate" and config.is_level == "geometric":  # GSPO's: one weight per sequence
                terms[i] = terms[i] * min(math.exp(seq_log_is / len(tokens)), is_cfg.truncate_cap)
            elif is_cfg.mode == "mask" and config.is_level == "sequence":
                r = math.exp(seq_log_is)
                terms[i] = terms[i] * (r if is_cfg.mask_low <= r <= is_cfg.mask_high else 0.0)
            else:
                assert is_cfg.mode == "none", "reference covers token/geometric TIS and sequence MIS only"
            q = batch.ref[g]
            terms[i] = terms[i] + config.kl_coef * (torch.exp(q - lp) - (q - lp) - 1)
            p = torch.softmax(theta[g], -1)
            terms[i] = terms[i] - config.entropy_coef * -(p * p.log()).sum()
        num_tokens += len(tokens)
        seq_terms.append(terms)
    if config.agg == "token-mean":
        loss = sum(t for terms in seq_terms for t in terms) / num_tokens
    elif config.agg == "seq-mean-token-mean":
        loss = sum(sum(terms) / len(terms) for terms in seq_terms) / len(seq_terms)
    else:
        loss = sum(sum(terms) / token_sum_constant for terms in seq_terms) / len(seq_terms)
    loss.backward()
    return float(loss.detach()), theta.grad


def _whole(batch: ToyBatch) -> list[list[list[int]]]:
    return [[list(range(batch.num_samples))]]


PPO_FULL = dict(loss_type="ppo_clip", clip_low=0.2, clip_high=0.28, dual_clip=1.3, kl_coef=0.1, entropy_coef=0.01)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("is_mode", ["none", "truncate"])
def test_ppo_clip_matches_loop_reference(agg: str, is_mode: str) -> None:
    batch = make_batch(seed=1, dtype=torch.float64)
    config = PolicyLossConfig(
        **PPO_FULL, agg=agg, importance_sampling=ImportanceSamplingConfig(mode=is_mode, truncate_cap=1.2)
    )
    normalizer = compute_loss_normalizer(batch.response_lengths(), token_sum_constant=6.0)
    batch.theta = batch.theta.double()
    loss, grad, metrics = run_split(batch, _whole(batch), config, normalizer)
    ref_loss, ref_grad = reference_loss(batch, config, token_sum_constant=6.0)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    m = reduce_metrics(metrics)
    # The batch exercises every branch: clipping, dual clip and (when on) truncation happen.
    assert 0 < m["pg_clipfrac"] < 1 and 0 < m["pg_clipfrac_dual"] < 1
    if is_mode == "truncate":
        assert 0 < m["is_affected_frac"] < 1


def test_gspo_token_form_matches_sequence_level_reference() -> None:
    batch = make_batch(seed=2, dtype=torch.float64)
    batch.theta = batch.theta.double()
    config = PolicyLossConfig(loss_type="gspo", clip_low=0.05, clip_high=0.08, agg="seq-mean-token-mean",
                              importance_sampling=ImportanceSamplingConfig(mode="none"))  # the GSPO form alone
    normalizer = compute_loss_normalizer(batch.response_lengths())
    loss, grad, metrics = run_split(batch, _whole(batch), config, normalizer)
    ref_loss, ref_grad = reference_loss(batch, config)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert 0 < reduce_metrics(metrics)["pg_clipfrac"] < 1


def test_gspo_with_tis_matches_sequence_level_reference() -> None:
    """GSPO with the default TIS (mode truncate, level unset): one weight per sequence, the truncated
    geometric mean of its tokens' old/behavior ratios, against the per-sequence loop reference; the
    batch has truncated and untruncated sequences, clipped and unclipped ratios."""
    batch = make_batch(seed=2, dtype=torch.float64)
    batch.theta = batch.theta.double()
    config = PolicyLossConfig(loss_type="gspo", clip_low=0.05, clip_high=0.08, agg="seq-mean-token-mean",
                              importance_sampling=ImportanceSamplingConfig(truncate_cap=1.1))
    assert config.is_level == "geometric"
    normalizer = compute_loss_normalizer(batch.response_lengths())
    loss, grad, metrics = run_split(batch, _whole(batch), config, normalizer)
    ref_loss, ref_grad = reference_loss(batch, config)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    m = reduce_metrics(metrics)
    assert 0 < m["pg_clipfrac"] < 1 and 0 < m["is_affected_frac"] < 1
    untruncated, _, _ = run_split(batch, _whole(batch), PolicyLossConfig(
        loss_type="gspo", clip_low=0.05, clip_high=0.08, agg="seq-mean-token-mean",
        importance_sampling=ImportanceSamplingConfig(mode="none")), normalizer)
    assert abs(loss - untruncated) > 1e-3  # the correction is not a no-op on this batch


def test_gspo_with_tis_by_hand() -> None:
    """Two sequences, every number by hand. clip 0.2, cap 1.1, seq-mean-token-mean (2 sequences).
    seq 0 (A = 1): log(pi/old) = [0.2, -0.1] -> s0 = e^0.05; log(old/behavior) = [0.3, 0.2] ->
    geometric mean e^0.25 = 1.284 > cap -> w0 = 1.1 (truncated).
    seq 1 (A = -0.5): log(pi/old) = [0.1, 0, -0.1] -> s1 = 1; log(old/behavior) = [-0.1, 0.1, -0.1]
    -> w1 = e^(-0.1/3).
    loss = (-(1) s0 w0 + 0.5 s1 w1) / 2; d loss / d logprob_t = -A_i w_i s_i / (|y_i| * 2) (GSPO-token:
    each token carries s_i's value with the gradient of its own log-prob)."""
    lp = torch.tensor([-1.0, -2.0, -0.5, -1.0, -1.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.2, -1.9, -0.6, -1.0, -1.4], dtype=torch.float64)
    behavior = torch.tensor([-1.5, -2.1, -0.5, -1.1, -1.3], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -0.5, -0.5, -0.5], dtype=torch.float64)
    config = PolicyLossConfig(loss_type="gspo", clip_low=0.2, clip_high=0.2, agg="seq-mean-token-mean",
                              importance_sampling=ImportanceSamplingConfig(mode="truncate", truncate_cap=1.1))
    out = PolicyLoss(config)(logprobs=lp, advantages=adv, loss_mask=torch.ones(5, dtype=torch.bool),
                             seq_ids=torch.tensor([0, 0, 1, 1, 1]), num_seqs=2,
                             normalizer=LossNormalizer(num_tokens=5, num_sequences=2), old_logprobs=old,
                             behavior_logprobs=behavior)
    out.loss.backward()
    s0, w0, w1 = math.exp(0.05), 1.1, math.exp(-0.1 / 3)
    assert float(out.loss.detach()) == pytest.approx((-s0 * w0 + 0.5 * w1) / 2, rel=1e-12)
    expected_grad = [-w0 * s0 / 4] * 2 + [0.5 * w1 / 6] * 3
    torch.testing.assert_close(lp.grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(out.metrics["is_affected_frac"]) == pytest.approx(1 / 2)  # over sequences
    assert float(out.metrics["is_ratio_mean"]) == pytest.approx((math.exp(0.25) + w1) / 2, rel=1e-12)
    assert float(out.metrics["is_ratio_max"]) == pytest.approx(math.exp(0.25), rel=1e-12)
    assert float(out.metrics["pg_clipfrac"]) == 0


def test_gspo_refuses_a_token_level_importance_weight() -> None:
    with pytest.raises(ValueError, match="importance_sampling.level='token' does not fit loss_type='gspo'"):
        PolicyLossConfig(loss_type="gspo", importance_sampling=ImportanceSamplingConfig(level="token"))
    for level, expected in ((None, "geometric"), ("sequence", "sequence"), ("geometric", "geometric")):
        config = PolicyLossConfig(loss_type="gspo", importance_sampling=ImportanceSamplingConfig(level=level))
        assert config.is_level == expected
    assert PolicyLossConfig().is_level == "token"


def test_sequence_mis_matches_reference_and_zeroes_masked_sequences() -> None:
    batch = make_batch(seed=3, dtype=torch.float64)
    batch.theta = batch.theta.double()
    is_cfg = ImportanceSamplingConfig(mode="mask", level="sequence", mask_low=0.7, mask_high=1.4)
    config = PolicyLossConfig(importance_sampling=is_cfg)
    normalizer = compute_loss_normalizer(batch.response_lengths())
    loss, grad, metrics = run_split(batch, _whole(batch), config, normalizer)
    ref_loss, ref_grad = reference_loss(batch, config)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    masked = [
        s for s in range(batch.num_samples)
        if not 0.7 <= math.exp(sum(float(batch.old[g] - batch.behavior[g])
                                   for g, m in zip(batch.global_index[s], batch.loss_mask[s]) if m)) <= 1.4
    ]
    assert 0 < len(masked) < batch.num_samples
    assert reduce_metrics(metrics)["is_affected_frac"] == pytest.approx(len(masked) / batch.num_samples)
    for s in masked:  # no gradient at all from a masked sequence
        assert grad[batch.global_index[s]].abs().max() == 0


INVARIANCE_CONFIGS = {
    "ppo-tis-token-mean": PolicyLossConfig(**PPO_FULL, importance_sampling=ImportanceSamplingConfig(mode="truncate")),
    "ppo-mis-seq-mean": PolicyLossConfig(
        **PPO_FULL, agg="seq-mean-token-mean", importance_sampling=ImportanceSamplingConfig(mode="mask")
    ),
    "drgrpo-sum-norm": PolicyLossConfig(agg="seq-mean-token-sum-norm", kl_coef=0.05, kl_estimator="k1"),
    "gspo-tis": PolicyLossConfig(loss_type="gspo", clip_low=0.05, clip_high=0.08, agg="seq-mean-token-mean",
                                 importance_sampling=ImportanceSamplingConfig(truncate_cap=1.1)),
    "gspo-geometric-mis": PolicyLossConfig(
        loss_type="gspo", clip_low=0.05, clip_high=0.08, agg="seq-mean-token-mean",
        importance_sampling=ImportanceSamplingConfig(mode="mask", level="geometric", mask_low=0.8, mask_high=1.25),
    ),
}


@pytest.mark.parametrize("name", list(INVARIANCE_CONFIGS))
def test_loss_and_grad_do_not_depend_on_split_packing_or_dp(name: str) -> None:
    config = INVARIANCE_CONFIGS[name]
    batch = make_batch(seed=4, num_samples=10)
    normalizer = compute_loss_normalizer(batch.response_lengths(), token_sum_constant=6.0)
    lengths = [len(t) for t in batch.token_ids]
    n = batch.num_samples
    splits = {
        "whole": _whole(batch),
        "one-per-micro-batch (no packing)": [[[i] for i in range(n)]],
        "uneven-3": [[[0, 5, 9], [1, 2], [3, 4, 6, 7, 8]]],
        "packed-dp1": plan_micro_batches(lengths, max_tokens_per_micro_batch=14, dp_size=1).micro_batches,
        "packed-dp2": plan_micro_batches(lengths, max_tokens_per_micro_batch=14, dp_size=2).micro_batches,
        "dp2-whole-halves": [[list(range(0, n, 2))], [list(range(1, n, 2))]],
    }
    ref_loss, ref_grad, ref_metrics = run_split(batch, splits.pop("whole"), config, normalizer)
    ref_m = reduce_metrics(ref_metrics)
    assert ref_grad.abs().max() > 0
    for split_name, ranks in splits.items():
        loss, grad, metrics = run_split(batch, ranks, config, normalizer)
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), split_name
        assert (grad - ref_grad).abs().max() <= 1e-6 * ref_grad.abs().max(), split_name
        m = reduce_metrics(metrics)
        assert m.keys() == ref_m.keys()
        for key in m:
            assert m[key] == pytest.approx(ref_m[key], rel=1e-5, abs=1e-7), (split_name, key)


@pytest.mark.parametrize("mode,level", [("truncate", "token"), ("mask", "token"), ("mask", "sequence"), ("truncate", "geometric")])
def test_is_weights_are_one_and_mismatch_zero_when_behavior_equals_training(mode: str, level: str) -> None:
    batch = make_batch(seed=5)
    batch.behavior = batch.old.clone()
    config = PolicyLossConfig(**PPO_FULL, importance_sampling=ImportanceSamplingConfig(mode=mode, level=level))
    packed = build_packed_batch(range(batch.num_samples), token_ids=batch.token_ids,
                                per_token={"loss_mask": batch.loss_mask})
    normalizer = compute_loss_normalizer(batch.response_lengths())
    weights, metrics = importance_weights(
        training_logprobs=batch.old, behavior_logprobs=batch.behavior, loss_mask=packed.values["loss_mask"],
        seq_ids=packed.seq_ids, num_seqs=packed.num_seqs, config=config.importance_sampling, normalizer=normalizer,
    )
    assert torch.equal(weights, torch.ones_like(weights))
    assert float(metrics["mismatch_k3"]) == 0 and float(metrics["mismatch_k1"]) == 0
    assert float(metrics["is_ratio_max"]) == 1 and float(metrics["is_affected_frac"]) == 0
    # And the loss equals the uncorrected loss.
    with_is, grad_is, _ = run_split(batch, _whole(batch), config, normalizer)
    plain = PolicyLossConfig(**PPO_FULL)
    without, grad_plain, _ = run_split(batch, _whole(batch), plain, normalizer)
    assert with_is == without and torch.equal(grad_is, grad_plain)


def test_mismatch_metrics_against_direct_formulas() -> None:
    batch = make_batch(seed=6)
    packed = build_packed_batch(range(batch.num_samples), token_ids=batch.token_ids,
                                per_token={"loss_mask": batch.loss_mask})
    mask = packed.values["loss_mask"]
    normalizer = compute_loss_normalizer(batch.response_lengths())
    cfg = ImportanceSamplingConfig(mode="mask", level="token", mask_low=0.8, mask_high=1.25)
    weights, metrics = importance_weights(
        training_logprobs=batch.old, behavior_logprobs=batch.behavior, loss_mask=mask,
        seq_ids=packed.seq_ids, num_seqs=packed.num_seqs, config=cfg, normalizer=normalizer,
    )
    lr = (batch.old - batch.behavior)[mask]
    r = lr.exp()
    assert float(metrics["mismatch_k3"]) == pytest.approx(float((r - 1 - lr).mean()), rel=1e-5)
    assert float(metrics["mismatch_k1"]) == pytest.approx(float((-lr).mean()), rel=1e-5)
    assert float(metrics["is_ratio_max"]) == pytest.approx(float(r.max()), rel=1e-6)
    inside = (r >= 0.8) & (r <= 1.25)
    torch.testing.assert_close(weights[mask], torch.where(inside, r, 0.0))
    assert float(metrics["is_affected_frac"]) == pytest.approx(float((~inside).float().mean()))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_are_unbiased_for_exact_kl(estimator: str) -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(11, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(11, generator=g, dtype=torch.float64), -1)
    exact = float((logp.exp() * (logp - logq)).sum())
    expected = float((logp.exp() * kl_penalty(logp, logq, estimator=estimator)).sum())
    assert expected == pytest.approx(exact, rel=1e-12)
    if estimator == "k3":
        assert (kl_penalty(logp, logq, estimator="k3") >= 0).all()


def test_empty_micro_batch_contributes_zero() -> None:
    theta = torch.randn(3, requires_grad=True)
    normalizer = LossNormalizer(num_tokens=5, num_sequences=2)
    out = PolicyLoss(PolicyLossConfig())(
        logprobs=theta[:0], advantages=torch.empty(0), loss_mask=torch.empty(0, dtype=torch.bool),
        seq_ids=torch.empty(0, dtype=torch.int64), num_seqs=0, normalizer=normalizer,
        behavior_logprobs=torch.empty(0),
    )
    out.loss.backward()
    assert float(out.loss.detach()) == 0 and torch.equal(theta.grad, torch.zeros(3))


def test_nan_outside_the_response_does_not_leak() -> None:
    logprobs = torch.tensor([float("nan"), -1.0, -2.0], requires_grad=True)
    out = PolicyLoss(PolicyLossConfig())(
        logprobs=logprobs, advantages=torch.ones(3), loss_mask=torch.tensor([False, True, True]),
        seq_ids=torch.zeros(3, dtype=torch.int64), num_seqs=1, normalizer=LossNormalizer(num_tokens=2, num_sequences=1),
    )
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(-1.0) and logprobs.grad[1:].tolist() == [-0.5, -0.5]


def test_normalizer_and_helpers() -> None:
    norm = compute_loss_normalizer([3, 0, 2], token_sum_constant=4.0)
    assert (norm.num_tokens, norm.num_sequences, norm.token_sum_constant) == (5, 2, 4.0)
    assert seq_ids_from_cu_seqlens(torch.tensor([0, 2, 2, 5], dtype=torch.int32)).tolist() == [0, 0, 2, 2, 2]
    merged = reduce_metrics([{"a": torch.tensor(1.0), "r_max": 2.0}, {"a": 0.5, "r_max": torch.tensor(3.0)}])
    assert merged == {"a": 1.5, "r_max": 3.0}
    with pytest.raises(ValueError, match="no response tokens"):
        compute_loss_normalizer([0, 0])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(clip_low=1.2), "clip_low (1.2) must be in (0, 1)"),
        (dict(clip_high=0.0), "clip_high (0.0) must be > 0"),
        (dict(dual_clip=0.5), "dual_clip (0.5) must be > 1"),
        (dict(loss_type="ppo"), "loss_type='ppo' is not valid; choose one of ['ppo_clip', 'gspo']"),
        (dict(agg="mean"), "agg='mean' is not valid"),
        (dict(kl_estimator="k4"), "choose one of ['k1', 'k2', 'k3']"),
    ],
)
def test_config_validation_names_value_and_fix(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        PolicyLossConfig(**kwargs)
    assert needle in str(info.value)


def test_is_config_validation_and_missing_inputs() -> None:
    with pytest.raises(ValueError, match="mask_low <= 1 <= mask_high"):
        ImportanceSamplingConfig(mode="mask", mask_low=1.5)
    with pytest.raises(ValueError, match="choose one of"):
        ImportanceSamplingConfig(level="tok")
    lp = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        PolicyLoss(PolicyLossConfig(kl_coef=0.1))(
            logprobs=lp, advantages=torch.ones(2), loss_mask=torch.ones(2, dtype=torch.bool),
            seq_ids=torch.zeros(2, dtype=torch.int64), num_seqs=1, normalizer=LossNormalizer(num_tokens=2, num_sequences=1),
        )


def test_each_kl_estimator_equals_its_formula() -> None:
    g = torch.Generator().manual_seed(5)
    logp, ref = -torch.rand(50, generator=g) * 4, -torch.rand(50, generator=g) * 4
    d = logp - ref
    expected = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) - 1 + d}
    for estimator, value in expected.items():
        torch.testing.assert_close(kl_penalty(logp, ref, estimator=estimator), value, rtol=0, atol=0)
    assert (kl_penalty(logp, ref, estimator="k2") >= 0).all()


def test_proximal_metrics_and_decoupled_weights() -> None:
    """Given a proximal policy: the ratio is current/proximal, the importance weight proximal/behavior,
    and `proximal_clipfrac` counts tokens whose ratio left the clip range (whatever the advantage)."""
    lp = torch.tensor([-1.0, -1.0, -1.0, -1.0], requires_grad=True)
    proximal = torch.tensor([-1.0, -1.5, -0.5, -1.05])  # ratios 1, e^0.5, e^-0.5, e^0.05
    behavior = torch.tensor([-1.0, -1.5, -0.4, -1.05])
    mask = torch.tensor([True, True, True, False])
    loss_fn = PolicyLoss(PolicyLossConfig(importance_sampling=ImportanceSamplingConfig(mode="none")))
    out = loss_fn(logprobs=lp, advantages=torch.tensor([1.0, -1.0, 1.0, 1.0]), loss_mask=mask,
                  seq_ids=torch.zeros(4, dtype=torch.long), num_seqs=1,
                  normalizer=LossNormalizer(num_tokens=3, num_sequences=1), old_logprobs=proximal,
                  behavior_logprobs=behavior)
    assert float(out.metrics["proximal_clipfrac"]) == pytest.approx(2 / 3)
    k3 = torch.exp(proximal - behavior) - 1 - (proximal - behavior)  # KL(behavior || proximal), k3 on behavior samples
    assert float(out.metrics["behavior_vs_proximal_kl"]) == pytest.approx(float(k3[:3].sum() / 3))
    on_policy = loss_fn(logprobs=lp, advantages=torch.ones(4), loss_mask=mask, seq_ids=torch.zeros(4, dtype=torch.long),
                        num_seqs=1, normalizer=LossNormalizer(num_tokens=3, num_sequences=1))
    assert "proximal_clipfrac" not in on_policy.metrics and "behavior_vs_proximal_kl" not in on_policy.metrics


def test_mini_batch_split_and_update_aggregation() -> None:
    from rl_engine.rl_step import aggregate_updates, make_sample, split_mini_batches

    samples = [make_sample(prompt_ids=[1, 2], response_ids=[3] * (i + 1), logprobs=[-1.0] * (i + 1),
                           policy_versions=[0] * (i + 1), reward=0.0, group=i // 2) for i in range(10)]
    adv = torch.arange(10.0)
    parts = split_mini_batches(samples, adv, count=4)
    assert [len(s) for s, _ in parts] == [2, 3, 2, 3] and [s for p, _ in parts for s in p] == samples
    assert torch.equal(torch.cat([a for _, a in parts]), adv)
    assert len(split_mini_batches(samples[:2], adv[:2], count=4)) == 2  # never an empty mini-batch
    one = {"loss": 0.25, "micro_batches": 3, "is_ratio_max": 1.5}
    assert aggregate_updates([one], mini_batches=1) == one  # unchanged, ints stay ints
    two = aggregate_updates([one, {"loss": 0.75, "micro_batches": 1, "is_ratio_max": 2.0,}], mini_batches=2)
    assert two == {"loss": 0.5, "micro_batches": 4.0, "is_ratio_max": 2.0}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_matches_a_hand_computed_gradient(estimator: str) -> None:
    """One micro-batch, fp32, token-mean, on-policy (ratio 1), no importance correction: the loss is
    sum_t mask_t (-A_t + c * kl_t) / N and d loss / d logprob_t = mask_t (-A_t + c * dkl_t) / N, with
    dkl = 1 (k1), log(pi/ref) (k2), 1 - ref/pi (k3)."""
    g = torch.Generator().manual_seed(11)
    lp0 = -torch.rand(9, generator=g) * 3
    ref = -torch.rand(9, generator=g) * 3
    adv = torch.randn(9, generator=g)
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    c, n = 0.3, 11  # the normaliser counts tokens of other micro-batches too
    lp = lp0.clone().requires_grad_(True)
    loss_fn = PolicyLoss(PolicyLossConfig(kl_coef=c, kl_estimator=estimator,
                                          importance_sampling=ImportanceSamplingConfig(mode="none")))
    out = loss_fn(logprobs=lp, advantages=adv, loss_mask=mask, seq_ids=torch.tensor([0] * 4 + [1] * 5), num_seqs=2,
                  normalizer=LossNormalizer(num_tokens=n, num_sequences=2), ref_logprobs=ref)
    out.loss.backward()
    d = lp0 - ref
    kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) - 1 + d}[estimator]
    dkl = {"k1": torch.ones_like(d), "k2": d, "k3": 1 - torch.exp(-d)}[estimator]
    m = mask.float()
    assert abs(float(out.loss) - float((m * (-adv + c * kl)).sum() / n)) <= 1e-6
    assert (lp.grad - m * (-adv + c * dkl) / n).abs().max() <= 1e-6
    assert abs(float(out.metrics["kl_ref"]) - float((m * kl).sum() / n)) <= 1e-6
