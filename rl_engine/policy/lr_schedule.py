"""Learning-rate schedules over RL steps, shared by the single process and the trainer group.

The lr of step s (0-based; every optimizer update of that step uses it) is
`scheduled_lr(s) * kl_scale`:
- `scheduled_lr`: a linear warmup from lr / warmup_steps to lr over the first `warmup_steps` steps
  (the first step is not wasted at lr 0), then constant, or a linear or cosine decay to
  `min_lr_ratio * lr` at `total_steps` (verl's `lr_scheduler_type` / `lr_warmup_steps` /
  `min_lr_ratio`, HF's `get_cosine_schedule_with_warmup` shapes). A pure function of the step: a
  resumed run needs nothing saved for it.
- `KLAdaptiveScale`: rl_games' "adaptive" schedule. After each step, the KL of the policy to the
  step's proximal policy measured at the step's last forward pass (`approx_kl`, mean k3 per response
  token) moves a factor in (min_ratio, 1]: divided by `factor` above 2 * target, multiplied by
  `up_factor` (up to 1; rl_games: `factor` both ways) below target / 2. The configured lr is thus the
  ceiling, never exceeded. A slower way up than down keeps the scale from climbing back to 1 over a
  few quiet steps (little to learn, so little KL at any lr) before the next step with a strong signal.
  Adam normalises each update to about lr per parameter whatever the loss, so this is what bounds how
  far a step's updates move the policy. Its one float of state travels in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULERS = ("constant", "linear", "cosine")


@dataclass(kw_only=True, frozen=True)
class LRSchedule:
    lr: float
    scheduler: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"lr scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.warmup_steps < 0 or self.total_steps < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"bad lr schedule: warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
                             f"min_lr_ratio={self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        """The lr of RL step `step` (0-based), before any KL-adaptive scale."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.scheduler == "constant":
            return self.lr
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(step - self.warmup_steps, decay_steps) / decay_steps
        shape = 1 - progress if self.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)


class KLAdaptiveScale:
    """The KL-adaptive factor on the scheduled lr (see the module docstring)."""

    def __init__(self, *, target: float, factor: float = 1.5, min_ratio: float = 0.01,
                 up_factor: float | None = None) -> None:
        up_factor = factor if up_factor is None else up_factor
        if target <= 0 or factor <= 1 or up_factor < 1 or not 0 < min_ratio <= 1:
            raise ValueError(f"bad KL-adaptive lr: target={target}, factor={factor}, up_factor={up_factor}, "
                             f"min_ratio={min_ratio}")
        self.target, self.factor, self.up_factor, self.min_ratio = target, factor, up_factor, min_ratio
        self.scale = 1.0

    def update(self, kl: float) -> float:
        """Fold in the KL one step measured; returns the scale for the next step."""
        if kl > 2 * self.target:
            self.scale = max(self.scale / self.factor, self.min_ratio)
        elif kl < self.target / 2:
            self.scale = min(self.scale * self.up_factor, 1.0)
        return self.scale


@dataclass
class StepLR:
    """One run's lr: the schedule times the KL-adaptive scale (when configured)."""

    schedule: LRSchedule
    adaptive: KLAdaptiveScale | None = None

    @property
    def varies(self) -> bool:
        """Whether the lr can differ from the configured one (then the loops log `train/lr`)."""
        s = self.schedule
        return self.adaptive is not None or s.warmup_steps > 0 or (s.scheduler != "constant" and s.min_lr_ratio < 1)

    def lr(self, step: int) -> float:
        return self.schedule(step) * (self.adaptive.scale if self.adaptive is not None else 1.0)

    def observe(self, last_kl: float | None) -> None:
        """After a step: `last_kl` is the approx_kl of the step's last forward pass that saw a moved
        policy (an update after the first; None when the step had no such pass: no change)."""
        if self.adaptive is not None and last_kl is not None:
            self.adaptive.update(last_kl)

    def state_dict(self) -> dict[str, float]:
        return {"kl_scale": self.adaptive.scale} if self.adaptive is not None else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """A checkpoint of a run without the adaptive scale (none saved) resumes it at 1."""
        if self.adaptive is not None:
            self.adaptive.scale = float(state.get("kl_scale", 1.0))
