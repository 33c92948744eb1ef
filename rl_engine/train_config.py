"""The RL run's config tree. `rl-engine train` with no arguments uses these defaults: the built-in
demo (a tiny preset model on the built-in upper task, on CPU, in one process).

Each section validates its own fields; `RLConfig.__post_init__` checks the rules that tie sections
together (placement against the trainer's parallel layout, options the loop cannot honour).
"""

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
    ignore_eos: bool = False  # fixed-length completions (benchmarks), as vLLM's ignore_eos
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (actors: and refill them)
    max_refill_rounds: int = 4  # dynamic sampling: extra generation rounds per step before training on fewer
    routing_replay: bool = False  # MoE: the trainer reuses the experts the engine chose at rollout
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 4096
    # "sync": each step generates with the newest weights, then trains. "async" (actors only): rollout
    # and training overlap; a weight update interrupts in-flight requests, which resume with the new
    # weights (partial rollouts), their earlier tokens keeping their versions and log-probs.
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1  # async: a sample whose oldest token is more versions old than this is not trained
    stale_policy: Literal["drop", "regenerate"] = "drop"  # async: what happens to such a sample's prompt
    prompts_in_flight: int = 0  # async: prompts being generated or buffered at once; 0 = 2 * prompts_per_step

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1 or self.n < 1:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) and n ({self.n}) must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature ({self.temperature}) must be > 0 for RL: training log-probs are taken "
                             "at the sampling temperature")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if self.max_refill_rounds < 0:
            raise ValueError(f"max_refill_rounds ({self.max_refill_rounds}) must be >= 0")
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness ({self.max_staleness}) must be >= 0")
        if self.prompts_in_flight and self.prompts_in_flight < self.prompts_per_step:
            raise ValueError(f"rollout.prompts_in_flight ({self.prompts_in_flight}) must be 0 (auto) or at least "
                             f"prompts_per_step ({self.prompts_per_step})")

    @property
    def async_prompts_in_flight(self) -> int:
        return self.prompts_in_flight or 2 * self.prompts_per_step


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
    # torch intra-op threads of the single process; 0 = torch's default (one per core). 1 by default:
    # the demo's tiny model gains nothing from more, and an OpenMP team whose other core is busy
    # spins (measured: a 2-thread warm start 25x slower than 1 thread while another process ran).
    threads: int = 1
    pack_sequences: bool = True  # false: one sample per micro-batch (same loss and gradient, slower)
    # Checkpoints under <output_dir>/checkpoints/step_<k>: every `checkpoint_every` steps (0: at the
    # end only), the newest `keep_checkpoints` kept. `resume`: "auto" (the newest checkpoint of
    # output_dir, or a fresh start when there is none), a checkpoint directory, or null.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    deterministic: bool = False  # torch.use_deterministic_algorithms; the metrics JSONL is seed-determined
    # The trainer group's parallel layout (world = tp * pp * dp ranks; ep divides dp).
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} ({getattr(self, name)}) must be >= 1")
        if self.dp % self.ep:
            raise ValueError(f"train.ep ({self.ep}) must divide train.dp ({self.dp}): expert parallelism is carved "
                             "out of data parallelism")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"train.micro_batch_tokens ({self.micro_batch_tokens}) must be >= 1")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"train.checkpoint_every ({self.checkpoint_every}) must be >= 0 and "
                             f"train.keep_checkpoints ({self.keep_checkpoints}) >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(kw_only=True)
class PlacementSection:
    """Where the actors run. "single_process": the whole loop in this process (the demo's fast path,
    no ZMQ). "colocated": a coordinator process and trainer ranks that host the inference engines
    and alternate generation and training over the same weights. "disaggregated": a coordinator,
    trainer ranks and `num_rollout_workers` rollout worker processes; weights are pushed through
    weight_sync over ZMQ after every step."""

    mode: Literal["single_process", "colocated", "disaggregated"] = "single_process"
    num_rollout_workers: int = 1  # disaggregated only
    host: str = "127.0.0.1"  # every socket binds here (loopback unless configured)
    threads_per_process: int = 1  # torch intra-op threads of each actor process
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 30.0  # a silent rollout worker is declared dead and its prompts requeued
    startup_timeout_s: float = 600.0  # every actor must register within this time
    weight_sync_timeout_s: float = 300.0
    weight_bucket_mb: int = 64
    # Disaggregated weight updates: "shm" (same host: the trainer writes straight into double-buffered
    # /dev/shm staging regions of each worker; two copies of the model per worker), "zmq" (raw tensor
    # frames over TCP; any host), or "auto": shm when /dev/shm has room for the two copies (the local
    # launcher puts every process on this host), else zmq.
    weight_transport: Literal["auto", "zmq", "shm"] = "auto"
    verify_probe: bool = True  # disaggregated: each engine checks its log-probs of a probe after a sync
    dist_timeout_s: float = 7200.0  # torch.distributed collectives (trainer ranks idle during rollouts)
    grace_period_s: float = 10.0  # on stop: SIGTERM, then SIGKILL after this

    def __post_init__(self) -> None:
        if self.num_rollout_workers < 1:
            raise ValueError(f"placement.num_rollout_workers ({self.num_rollout_workers}) must be >= 1")
        if self.threads_per_process < 1:
            raise ValueError(f"placement.threads_per_process ({self.threads_per_process}) must be >= 1")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError(f"placement.heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                             f"heartbeat_interval_s ({self.heartbeat_interval_s}) > 0")
        for name in ("startup_timeout_s", "weight_sync_timeout_s", "dist_timeout_s", "grace_period_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"placement.{name} ({getattr(self, name)}) must be > 0")
        if self.weight_bucket_mb < 1:
            raise ValueError(f"placement.weight_bucket_mb ({self.weight_bucket_mb}) must be >= 1")

    @property
    def uses_actors(self) -> bool:
        return self.mode != "single_process"


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
    placement: PlacementSection = field(default_factory=PlacementSection)

    def __post_init__(self) -> None:
        p, t = self.placement, self.train
        layout = f"tp={t.tp} pp={t.pp} dp={t.dp} ep={t.ep}"
        if p.mode == "single_process" and t.world_size > 1:
            raise ValueError(f"train {layout} needs several trainer ranks: set placement.mode to colocated or "
                             "disaggregated (single_process runs one rank)")
        if p.mode == "colocated" and (t.pp > 1 or t.ep > 1):
            raise ValueError(f"placement.mode=colocated needs train.pp=1 and train.ep=1 (got {layout}): each rank's "
                             "engine runs every layer and every expert; use placement.mode=disaggregated")
        if p.uses_actors and self.train.device != "cpu":
            raise ValueError(f"train.device={t.device!r}: the trainer ranks (ParallelTrainer on gloo) run on CPU in "
                             "this build; use train.device=cpu or placement.mode=single_process")
        if self.rollout.mode == "async" and not p.uses_actors:
            raise ValueError("rollout.mode=async overlaps rollout and training in separate actors: set "
                             "placement.mode to colocated or disaggregated (single_process runs sync only)")
        if self.rollout.mode == "async" and self.rollout.routing_replay:
            raise ValueError("rollout.routing_replay=true with rollout.mode=async is not supported: a partial rollout "
                             "continued with new weights re-routes its earlier tokens; use rollout.mode=sync")
        if self.loss.kl_coef > 0:
            raise ValueError(f"loss.kl_coef ({self.loss.kl_coef}) > 0 needs reference-policy log-probs, which the "
                             "RL loop does not compute yet; set loss.kl_coef=0")
