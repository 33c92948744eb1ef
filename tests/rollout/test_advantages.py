"""Group advantages against per-group loop references; DAPO dynamic-sampling filter."""

import pytest
import torch

from rl_engine.rollout.advantages import (
    AdvantageConfig,
    compute_advantages,
    dr_grpo_advantages,
    filter_uniform_groups,
    grpo_advantages,
    rloo_advantages,
)

# Interleaved, non-contiguous group ids of different sizes (3, 4, 2, 5).
GROUP_IDS = torch.tensor([7, 2, 7, 9, 2, 2, 7, 40, 9, 40, 40, 2, 40, 40])


def _rewards(seed: int = 0) -> torch.Tensor:
    return torch.randn(GROUP_IDS.numel(), generator=torch.Generator().manual_seed(seed))


def _reference(rewards: torch.Tensor, per_group) -> torch.Tensor:
    out = torch.empty_like(rewards)
    for g in GROUP_IDS.unique().tolist():
        idx = (GROUP_IDS == g).nonzero()[:, 0].tolist()
        values = [float(rewards[i]) for i in idx]
        for k, i in enumerate(idx):
            out[i] = per_group(values, k)
    return out


def test_grpo_matches_torch_std_per_group() -> None:
    r = _rewards()

    def ref(values: list[float], k: int) -> float:
        t = torch.tensor(values)
        return (values[k] - float(t.mean())) / (float(t.std()) + 1e-6)

    torch.testing.assert_close(grpo_advantages(r, GROUP_IDS, eps=1e-6), _reference(r, ref))


def test_dr_grpo_is_mean_centred_only() -> None:
    r = _rewards(1)
    expected = _reference(r, lambda v, k: v[k] - sum(v) / len(v))
    torch.testing.assert_close(dr_grpo_advantages(r, GROUP_IDS), expected)


def test_rloo_is_leave_one_out() -> None:
    r = _rewards(2)
    expected = _reference(r, lambda v, k: v[k] - (sum(v) - v[k]) / (len(v) - 1))
    torch.testing.assert_close(rloo_advantages(r, GROUP_IDS), expected)


def test_uniform_and_singleton_groups() -> None:
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = grpo_advantages(r, g)
    assert torch.equal(adv[:3], torch.zeros(3)) and adv[5] == 0  # no NaN for std 0 or a group of one
    assert adv[3] < 0 < adv[4]
    with pytest.raises(ValueError, match="groups \\[2\\] have 1"):
        rloo_advantages(r, g)


def test_compute_advantages_dispatch_and_config() -> None:
    r = _rewards(3)
    assert torch.equal(compute_advantages(r, GROUP_IDS, config=AdvantageConfig(estimator="rloo")),
                       rloo_advantages(r, GROUP_IDS))
    assert torch.equal(compute_advantages(r, GROUP_IDS, config=AdvantageConfig(estimator="dr_grpo")),
                       dr_grpo_advantages(r, GROUP_IDS))
    with pytest.raises(ValueError, match="choose one of \\['grpo', 'dr_grpo', 'rloo'\\]"):
        AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="must both be flat"):
        grpo_advantages(r[:3], GROUP_IDS)


def test_dynamic_sampling_drops_groups_with_equal_rewards() -> None:
    r = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0.5, 0.5 + 1e-6])
    g = torch.tensor([3, 3, 3, 1, 1, 1, 8, 8, 5, 5])
    result = filter_uniform_groups(r, g)
    assert (result.num_groups, result.num_dropped_groups, result.num_kept_groups) == (4, 2, 2)
    assert result.keep.tolist() == [False] * 3 + [True] * 3 + [False] * 2 + [True] * 2
    tolerant = filter_uniform_groups(r, g, atol=1e-5)
    assert tolerant.num_dropped_groups == 3 and not tolerant.keep[8:].any()
