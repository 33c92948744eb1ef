"""Group-relative advantages and DAPO dynamic sampling, on flat tensors.

Every function takes `rewards[N]` (one scalar per sample) and `group_ids[N]` (samples of the same
prompt share an id; ids need not be contiguous or sorted) and works with segment reductions
(`index_add`), so groups of different sizes mix freely in one batch and nothing loops in Python.
Advantages are per sample; broadcast them to tokens when packing (`build_packed_batch(per_sample=)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


@dataclass(kw_only=True)
class AdvantageConfig:
    """estimator: "grpo" ((r - mean) / (std + eps)), "dr_grpo" (r - mean), "rloo" (r - mean of the
    others). eps guards GRPO's division for groups with (near) equal rewards."""

    estimator: str = "grpo"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not valid; choose one of {list(ESTIMATORS)}")
        if not self.eps > 0:
            raise ValueError(f"eps ({self.eps}) must be > 0 (typical: 1e-6)")


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """-> (group index per sample [N], group sizes [G], group means [G], unbiased group stds [G])."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be flat [N]"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    values = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    sizes = torch.zeros(num_groups, dtype=values.dtype).index_add(0, inverse, torch.ones_like(values))
    means = torch.zeros(num_groups, dtype=values.dtype).index_add(0, inverse, values) / sizes
    sq_dev = (values - means[inverse]) ** 2
    # Unbiased (n - 1) like torch.std, which verl and TRL use; a group of one has std 0.
    var = torch.zeros(num_groups, dtype=values.dtype).index_add(0, inverse, sq_dev) / (sizes - 1).clamp(min=1)
    return inverse, sizes, means, var.sqrt()


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps)."""
    inverse, _, means, stds = _group_stats(rewards, group_ids)
    return (rewards - means[inverse]) / (stds[inverse] + eps)


def dr_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: r - group mean (no std scaling; pair with the "seq-mean-token-sum-norm" loss)."""
    inverse, _, means, _ = _group_stats(rewards, group_ids)
    return rewards - means[inverse]


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO: r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean). Needs groups of >= 2 samples."""
    inverse, sizes, means, _ = _group_stats(rewards, group_ids)
    if (sizes < 2).any():
        lonely = torch.unique(group_ids)[sizes < 2].tolist()
        raise ValueError(f"RLOO needs at least 2 samples per group; groups {lonely} have 1. Sample n >= 2")
    n = sizes[inverse]
    return (n / (n - 1)) * (rewards - means[inverse])


def compute_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, config: AdvantageConfig) -> torch.Tensor:
    """Per-sample advantages [N] with the configured estimator."""
    if config.estimator == "grpo":
        return grpo_advantages(rewards, group_ids, eps=config.eps)
    if config.estimator == "dr_grpo":
        return dr_grpo_advantages(rewards, group_ids)
    return rloo_advantages(rewards, group_ids)


@dataclass(frozen=True, kw_only=True)
class DynamicSamplingResult:
    keep: torch.Tensor  # [N] bool: sample belongs to a group with reward variation
    num_groups: int
    num_dropped_groups: int

    @property
    def num_kept_groups(self) -> int:
        return self.num_groups - self.num_dropped_groups


def filter_uniform_groups(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, atol: float = 0.0
) -> DynamicSamplingResult:
    """DAPO dynamic sampling: drop groups whose rewards are all equal (within atol); such groups
    have zero advantage everywhere and only dilute the batch. Refilling is the caller's job."""
    inverse, _, _, _ = _group_stats(rewards, group_ids)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    values = rewards.float() if not rewards.is_floating_point() else rewards
    high = torch.full((num_groups,), -torch.inf, dtype=values.dtype).scatter_reduce(0, inverse, values, "amax")
    low = torch.full((num_groups,), torch.inf, dtype=values.dtype).scatter_reduce(0, inverse, values, "amin")
    varied = (high - low) > atol  # [G]
    return DynamicSamplingResult(
        keep=varied[inverse],
        num_groups=num_groups,
        num_dropped_groups=int((~varied).sum()),
    )
