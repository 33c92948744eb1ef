"""The RL run's config tree. `rl-engine train` with no arguments uses these defaults: the built-in
demo (a tiny preset model on the built-in reverse task, on CPU)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rl_engine.losses import PolicyLossConfig
from rl_engine.rollout.advantages import AdvantageConfig
from rl_engine.rollout.rewards import RewardConfig


@dataclass(kw_only=True)
class ModelSection:
    # A Hugging Face model directory, or "builtin:<preset>" (random init + character tokenizer).
    path: str = "builtin:tiny"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0


@dataclass(kw_only=True)
class DataSection:
    # JSONL/Parquet prompts with an answer field, or "builtin:upper" / "builtin:reverse" (written
    # into the run dir).
    path: str = "builtin:upper"
    eval_path: str | None = None  # held-out prompts for accuracy; builtin tasks bring their own
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    apply_chat_template: bool = True
    shuffle: bool = True
    num_eval: int = 200


@dataclass(kw_only=True)
class WarmupSection:
    """Optional supervised warm start on (prompt, response) JSONL before RL."""

    path: str | None = "builtin"  # "builtin": the builtin task's demonstrations; None: no warm start
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3


@dataclass(kw_only=True)
class RolloutSection:
    prompts_per_step: int = 16
    n: int = 8  # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 12
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 4096


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(kw_only=True)
class TrainSection:
    steps: int = 100
    micro_batch_tokens: int = 4096
    seed: int = 0
    eval_every: int = 0  # 0: evaluate before and after only
    output_dir: str = "runs/demo"
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass(kw_only=True)
class RLConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardConfig = field(
        default_factory=lambda: RewardConfig(name="exact_match", num_workers=0, kwargs={"ignore_case": False}))
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
