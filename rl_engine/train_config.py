"""The RL run's config tree. `rl-engine train` with no arguments uses these defaults: the built-in
demo (a tiny preset model on the built-in upper task, on CPU, in one process).

Each section checks the range of every field where it is built (at config load, before any work),
naming the dotted key: `rollout.top_p=1.5 must be in (0, 1]`. `RLConfig.__post_init__` checks the rules
that tie sections together (placement against the trainer's parallel layout, options the loop cannot
honour) and the values of the sections that live in other packages. What needs the model or the data
(the longest prompt against `train.micro_batch_tokens`, the KV pool, the reward function) is checked
by `rl-engine train` before it starts the run (`train_cli.check_inputs`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from rl_engine.builtin_models import REAL_MODELS
from rl_engine.config import ConfigError, check_float, check_int
from rl_engine.demo_task import TASKS
from rl_engine.inference.speculative import SpeculativeConfig
from rl_engine.losses import PolicyLossConfig
from rl_engine.metrics_backends import MetricsConfig
from rl_engine.policy.lr_schedule import SCHEDULERS as LR_SCHEDULERS
from rl_engine.policy.presets import PRESETS
from rl_engine.rollout.advantages import AdvantageConfig
from rl_engine.rollout.rewards import RewardConfig

MAX_SEED = 2**63 - 1  # what torch.manual_seed and numpy's SeedSequence both take
MAX_SAMPLES_PER_PROMPT = 4096  # rollout.n: a GRPO group is 4-64 samples; more is a typo, not a group
MAX_TEMPERATURE = 100.0  # rollout.temperature: past a few the policy samples noise; inf divides logits to 0
MAX_BUILTIN_EVAL = 10_000  # held-out prompts a builtin task can draw (its strings are 5 of 10 letters)
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "0:0:0:0:0:0:0:0", "")


def _check_text(key: str, value: str | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not value or not value.strip():
        raise ConfigError(f"{key}={value!r} must be a non-empty string" + (" or null" if optional else ""))


def _check_builtin(key: str, value: str, known: tuple[str, ...]) -> None:
    if value.startswith("builtin:") and value.split(":", 1)[1] not in known:
        raise ConfigError(f"{key}={value!r} names no builtin; known: "
                          + ", ".join(f"builtin:{name}" for name in known))

@dataclass(kw_only=True)
class ModelSection:
    # A Hugging Face model directory, a .gguf file (converted once into ~/.cache/rl_engine), "builtin:<preset>"
    # (random init + character tokenizer) or a real pretrained builtin ("builtin:smollm2-135m-instruct", the
    # `real` extra; rl_engine/builtin_models.py).
    path: str = "builtin:tiny"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0  # the builtin preset's random init
    # Every forward op (matmul, attention, norms, log-softmax) reduces in an order independent of the
    # batch: the trainer's recomputed log-probs equal the engine's behavior log-probs bit for bit
    # (rl_engine/kernels/invariant.py). Engine and trainer must share the tensor-parallel layout.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        _check_text("model.path", self.path)
        _check_builtin("model.path", self.path, tuple(PRESETS) + tuple(REAL_MODELS))
        check_int("model.seed", self.seed, lo=0, hi=MAX_SEED)


@dataclass(kw_only=True)
class DataSection:
    # Prompts with an answer field: JSONL, Parquet, a Hugging Face `datasets` directory (save_to_disk) or
    # data files (.csv, .arrow, a pattern like dir/train-*.parquet; rollout/data.py), or "builtin:upper" /
    # "builtin:reverse" / "builtin:arith" (written into the run dir).
    path: str = "builtin:upper"
    eval_path: str | None = None  # held-out prompts for accuracy; builtin tasks bring their own
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    apply_chat_template: bool = True
    shuffle: bool = True
    num_eval: int = 200  # held-out prompts evaluated (the first num_eval of eval_path)

    def __post_init__(self) -> None:
        _check_text("data.path", self.path)
        _check_builtin("data.path", self.path, tuple(TASKS))
        _check_text("data.eval_path", self.eval_path, optional=True)
        _check_text("data.prompt_key", self.prompt_key)
        _check_text("data.answer_key", self.answer_key)
        check_int("data.num_eval", self.num_eval, lo=1,
                  hi=MAX_BUILTIN_EVAL if self.path.startswith("builtin:") else None)


@dataclass(kw_only=True)
class WarmupSection:
    """Optional supervised warm start on (prompt, response) JSONL before RL."""

    path: str | None = "builtin"  # "builtin": the builtin task's demonstrations; None: no warm start
    steps: int = 600  # 0: no warm start
    batch_size: int = 64
    lr: float = 3e-3

    def __post_init__(self) -> None:
        _check_text("warmup.path", self.path, optional=True)
        check_int("warmup.steps", self.steps, lo=0)
        check_int("warmup.batch_size", self.batch_size, lo=1)
        check_float("warmup.lr", self.lr, lo=0, lo_open=True)


@dataclass(kw_only=True)
class RolloutSection:
    prompts_per_step: int = 16
    n: int = 8  # samples per prompt (the GRPO group), at most MAX_SAMPLES_PER_PROMPT
    temperature: float = 1.0  # in (0, MAX_TEMPERATURE]; no greedy (0): log-probs are taken at this temperature
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 or -1 = off
    max_new_tokens: int = 12
    ignore_eos: bool = False  # fixed-length completions (benchmarks), as vLLM's ignore_eos
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (actors: and refill them)
    max_refill_rounds: int = 4  # dynamic sampling: extra generation rounds per step before training on fewer
    routing_replay: bool = False  # MoE: the trainer reuses the experts the engine chose at rollout
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 4096
    # CPU: decode attention by the C++ kernel that reads K/V in place in their cache blocks, and rotary fused
    # with the KV cache write by another (bit-equal to the torch path with g++), where a compiler builds them
    # (the torch paths otherwise, the reason logged); false: always the torch paths.
    # Both are within the log-prob contract; batch-invariant mode has its own attention either way.
    cpu_decode_kernel: bool = True
    # n > 1: each sample forked from a prompt's first, admitted while that one still holds its prompt's KV, copies
    # its partial last prompt block and computes one token instead of prefilling that block's tokens (the
    # engine's fork_copy_partial_block); within the log-prob contract, not bit for bit with the prefill. false:
    # the samples prefill it.
    fork_copy_partial_block: bool = True
    # CPU: each decode bucket's step compiled by torch.compile (the engine's compile_decode: buckets of 2+ rows
    # share one step with a dynamic batch size, so an EOS-varied rollout compiles once), within the log-prob
    # contract but not bit for bit; the first rollout pays the compile (engine stats' decode_compile_s; in every
    # placement the step rows' rollout/decode_compile_s: the engines' compile seconds since the previous row).
    compile_decode: bool = False
    # "sync": each step generates with the newest weights, then trains. "async" (actors only): rollout
    # and training overlap; a weight update interrupts in-flight requests, which resume with the new
    # weights (partial rollouts), their earlier tokens keeping their versions and log-probs.
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = 1  # async: a sample whose oldest token is more versions old than this is not trained
    stale_policy: Literal["drop", "regenerate"] = "drop"  # async: what happens to such a sample's prompt
    prompts_in_flight: int = 0  # async: prompts being generated or buffered at once; 0 = 2 * prompts_per_step
    # Agentic multi-turn rollouts (rl_engine/rollout/agentic.py): "package.module:function", an
    # `async def fn(session, item)` run once per sample; None: the built-in single-turn rollout.
    # max_new_tokens is then the cap of each turn.
    fn: str | None = None
    max_turns: int = 8  # assistant turns per session
    max_total_tokens: int = 1024  # prompt + every turn's observation and sampled tokens
    tool_timeout_s: float = 10.0  # per tool call (session.call_tools)
    # Speculative decoding in every rollout engine of the run, with the engine's `speculative_config` keys:
    # {method: ngram, num_speculative_tokens: k, prompt_lookup_max, prompt_lookup_min}, {method: draft_model,
    # model: DIR, num_speculative_tokens: k} (a separate small model sharing the tokenizer: fixed while the
    # policy trains), {method: mtp, num_speculative_tokens: k} (DeepSeek-V3's MTP layers: the policy's own
    # weights, updated by every weight sync); disable_by_batch_size. Behavior log-probs are the target's
    # under the log-prob contract either way; acceptance per step is in rollout/spec_*. null: off.
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        check_int("rollout.prompts_per_step", self.prompts_per_step, lo=1)
        _check_text("rollout.fn", self.fn, optional=True)
        if self.fn is not None and ":" not in self.fn:
            raise ConfigError(f"rollout.fn={self.fn!r} must be 'package.module:function' (an async def fn(session, item))")
        check_int("rollout.max_turns", self.max_turns, lo=1)
        check_int("rollout.max_total_tokens", self.max_total_tokens, lo=2)
        check_float("rollout.tool_timeout_s", self.tool_timeout_s, lo=0, lo_open=True)
        check_int("rollout.n", self.n, lo=1, hi=MAX_SAMPLES_PER_PROMPT)
        if not 0 < self.temperature <= MAX_TEMPERATURE:  # also refuses NaN
            raise ConfigError(f"rollout.temperature={self.temperature} must be > 0 and <= {MAX_TEMPERATURE:g}; "
                              "0 (greedy) is not allowed for RL: training log-probs are taken at the sampling "
                              "temperature")
        check_float("rollout.top_p", self.top_p, lo=0, lo_open=True, hi=1)
        if self.top_k < -1:
            raise ConfigError(f"rollout.top_k={self.top_k} must be >= 1, or 0 / -1 (off)")
        check_int("rollout.max_new_tokens", self.max_new_tokens, lo=1)
        check_int("rollout.max_refill_rounds", self.max_refill_rounds, lo=0)
        check_int("rollout.kv_cache_memory_mb", self.kv_cache_memory_mb, lo=1)
        check_int("rollout.max_num_batched_tokens", self.max_num_batched_tokens, lo=1)
        check_int("rollout.max_staleness", self.max_staleness, lo=0)
        check_int("rollout.prompts_in_flight", self.prompts_in_flight, lo=0)
        if self.prompts_in_flight and self.prompts_in_flight < self.prompts_per_step:
            raise ConfigError(f"rollout.prompts_in_flight={self.prompts_in_flight} must be 0 (auto) or at least "
                              f"rollout.prompts_per_step ({self.prompts_per_step})")

    @property
    def counted_speculative(self) -> SpeculativeConfig | None:
        """`speculative` where the loop reports acceptance per step (rollout/spec_*, from each sample's own
        counts): single-turn rollouts. An agentic session's turns are separate engine requests whose
        counts are not summed, so with `fn` nothing is reported."""
        return self.speculative if self.fn is None else None

    @property
    def async_prompts_in_flight(self) -> int:
        return self.prompts_in_flight or 2 * self.prompts_per_step


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # the global gradient norm's cap; .inf: no clipping
    # The lr of each RL step (rl_engine/policy/lr_schedule.py; every update of a step uses it): a linear
    # warmup over `warmup_steps` steps, then `lr_scheduler` constant, linear or cosine down to
    # `min_lr_ratio` * lr at train.steps (verl's lr_warmup_steps / lr_scheduler_type / min_lr_ratio).
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # KL-adaptive lr (rl_games' "adaptive" schedule): null (off), or the KL per step it steers toward:
    # after a step whose last update's forward pass found the policy further than 2x this from the
    # proximal one (approx_kl, mean k3 per response token) the lr's scale is divided by
    # `kl_adaptive_factor` (down to `kl_adaptive_min_ratio`), below half of it multiplied (up to 1: the
    # scheduled lr is the ceiling). Needs several updates per step (train.mini_batches_per_step).
    # `kl_adaptive_up_factor`: the multiplier on the way up, >= 1 (null: kl_adaptive_factor, rl_games'
    # symmetric rule; 1: the scale never rises again).
    kl_adaptive_target: float | None = None
    kl_adaptive_factor: float = 1.5
    kl_adaptive_up_factor: float | None = None
    kl_adaptive_min_ratio: float = 0.01

    def __post_init__(self) -> None:
        check_float("optim.lr", self.lr, lo=0, lo_open=True)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"optim.lr_scheduler={self.lr_scheduler!r} must be one of {', '.join(LR_SCHEDULERS)}")
        check_int("optim.warmup_steps", self.warmup_steps, lo=0)
        check_float("optim.min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        if self.kl_adaptive_target is not None:
            check_float("optim.kl_adaptive_target", self.kl_adaptive_target, lo=0, lo_open=True)
        check_float("optim.kl_adaptive_factor", self.kl_adaptive_factor, lo=1, lo_open=True)
        if self.kl_adaptive_up_factor is not None:
            check_float("optim.kl_adaptive_up_factor", self.kl_adaptive_up_factor, lo=1)
        check_float("optim.kl_adaptive_min_ratio", self.kl_adaptive_min_ratio, lo=0, hi=1, lo_open=True)
        check_float("optim.weight_decay", self.weight_decay, lo=0)
        for i, beta in enumerate(self.betas):
            check_float(f"optim.betas[{i}]", beta, lo=0, hi=1, hi_open=True)
        check_float("optim.eps", self.eps, lo=0, lo_open=True)
        check_float("optim.grad_clip", self.grad_clip, lo=0, lo_open=True, finite=False)


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
    # torch's thread count is process-wide: the trainer sets it when built and puts the earlier one back
    # at close(); meanwhile anything else in the process (a served engine, a benchmark's peer) runs with it.
    threads: int = 1
    # glibc's malloc keeps the memory a micro-batch frees for the next one (kernels/cpu/host_memory.py: mmap
    # threshold 32 MiB, no heap trim) instead of handing it back to the OS, which the next micro-batch then
    # page-faults back in (tiny preset: 3-10k faults, ~9 ms of a ~100 ms training pass); the process keeps its heap's
    # peak extent, fragmentation included (more resident memory than glibc's trimming). Process-wide and for the
    # process's life (glibc cannot go back to its dynamic threshold); the single process, or every actor process
    # (rollout workers and coordinator too, not only the trainer ranks).
    # Ignored where malloc is not glibc's. false: glibc's defaults.
    keep_freed_memory: bool = True
    pack_sequences: bool = True  # false: one sample per micro-batch (same loss and gradient, slower)
    # The rows no loss term reads (loss_mask 0: the prompt, a multi-turn response's observations) feed only
    # the attention of later rows: the single-process trainer skips their last-layer attention output
    # projection and MLP, the final norm and the LM head (the scored rows' log-probs the same up to fp32
    # rounding: the last layer's matmuls and the LM head run over fewer rows, and BLAS may then sum a row in
    # another order, e.g. at 1-3 rows; the weight gradients too, their sums leaving out the zero rows). The
    # actors' trainer group computes every row. false: every row through the whole model.
    skip_unscored_rows: bool = True
    # Shared-prefix training (Prefix Grouper): the samples of a group that share their prompt are packed
    # with the prompt once, its hidden states and K/V computed once per group, each completion attending
    # to them (same log-probs, loss and gradients as unshared, up to rounding; token budgets count the
    # prompt once; a group stays in one micro-batch when it fits). auto: groups of at least 2 samples
    # (rollout.n > 1), off under model.batch_invariant; true: every group; false: each sample whole.
    shared_prefix: bool | Literal["auto"] = "auto"
    # The training forward's decoder layers compiled by torch.compile (policy/compile.py: each layer's two
    # attention-free halves, dynamic token count; the attention stays eager): inductor fuses the norms,
    # rotary, SwiGLU and residual adds, forward and backward. The first step pays the compile (seconds).
    # Single-process runs of dense attention models; log-probs within the fp32 contract of the eager ones.
    compile: bool = False
    # Several optimizer updates per rollout batch (verl's ppo_mini_batch_size / ppo_epochs): the batch
    # is split into `mini_batches_per_step` mini-batches, each one update, `epochs_per_step` times over.
    # The loss clips against the proximal policy (the trainer's log-probs before the step's first
    # update) and corrects behavior -> proximal by importance weights (decoupled PPO). 1, 1: one update.
    mini_batches_per_step: int = 1
    epochs_per_step: int = 1
    # PPO's KL early stop (Spinning Up's / Stable-Baselines3's target_kl): a mini-batch update whose
    # own forward pass finds the policy further than `target_kl` (mean k3 KL per response token) from
    # the proximal policy is not applied, nor are the step's remaining updates. Adam normalises the
    # step size, so clipping (which only removes tokens from the gradient) does not bound how far
    # several updates on one batch move the policy; this does. null: every update is applied.
    target_kl: float | None = None
    # Checkpoints under <output_dir>/checkpoints/step_<k>: every `checkpoint_every` steps (0: at the
    # end only), the newest `keep_checkpoints` kept. `resume`: "auto" (the newest checkpoint of
    # output_dir, or a fresh start when there is none), a checkpoint directory, or null.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    deterministic: bool = False  # torch.use_deterministic_algorithms; the metrics JSONL is seed-determined
    # <output_dir>/samples.jsonl: one JSON object per trained sample (step, uid, token_ids, loss_mask,
    # behavior_logprobs, policy_versions, reward, num_turns, finish_reason), per-token lists aligned with token_ids
    dump_samples: bool = False
    # The trainer group's parallel layout (world = tp * cp * pp * dp ranks; ep divides dp * cp).
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    # Context parallelism: each micro-batch's tokens split over `cp` ranks (weights replicated over them),
    # attention by a ring of K/V sends or an all-gather (`cp_comm`); `micro_batch_tokens` is then the budget
    # per cp rank (a micro-batch packs up to cp x micro_batch_tokens). Dynamic CP: sequences shorter than
    # `cp_min_tokens` are not split but kept whole on one cp rank (0: every sequence through the ring).
    cp: int = 1
    cp_comm: Literal["ring", "allgather"] = "ring"
    cp_min_tokens: int = 0

    def __post_init__(self) -> None:
        check_int("train.steps", self.steps, lo=1)
        check_int("train.micro_batch_tokens", self.micro_batch_tokens, lo=1)
        check_int("train.seed", self.seed, lo=0, hi=MAX_SEED)
        check_int("train.eval_every", self.eval_every, lo=0)
        _check_text("train.output_dir", self.output_dir)
        if not _DEVICE.match(self.device):
            raise ConfigError(f"train.device={self.device!r} must be cpu, cuda, cuda:<index>, mps or xpu")
        check_int("train.threads", self.threads, lo=0, note="0 is torch's default (one per core)")
        check_int("train.checkpoint_every", self.checkpoint_every, lo=0)
        check_int("train.keep_checkpoints", self.keep_checkpoints, lo=1)
        check_int("train.mini_batches_per_step", self.mini_batches_per_step, lo=1)
        check_int("train.epochs_per_step", self.epochs_per_step, lo=1)
        if self.shared_prefix not in (True, False, "auto"):
            raise ConfigError(f"train.shared_prefix={self.shared_prefix!r} must be true, false or auto")
        if self.target_kl is not None:
            check_float("train.target_kl", self.target_kl, lo=0, lo_open=True)
        _check_text("train.resume", self.resume, optional=True)
        for name in ("tp", "pp", "dp", "ep", "cp"):
            check_int(f"train.{name}", getattr(self, name), lo=1)
        check_int("train.cp_min_tokens", self.cp_min_tokens, lo=0, note="0 sends every sequence through the ring")
        if self.cp_comm not in ("ring", "allgather"):
            raise ConfigError(f"train.cp_comm={self.cp_comm!r} must be ring or allgather")
        if (self.dp * self.cp) % self.ep:
            raise ConfigError(f"train.ep={self.ep} must divide train.dp x train.cp ({self.dp} x {self.cp} = "
                              f"{self.dp * self.cp}): expert parallelism is carved out of data and context "
                              "parallelism")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp


@dataclass(kw_only=True)
class RefSection:
    """The frozen reference policy of `loss.kl_coef` (KL(policy || ref) per response token), held in
    the trainer process(es), sharded like the trainer, scoring the trainer's own micro-batches."""

    # A Hugging Face model directory with the policy's tokenizer; None: the initial policy (the
    # weights RL starts from, after the warm start) when loss.kl_coef > 0, else no reference.
    path: str | None = None
    # "cpu": the weights stay in host memory between uses, on the training device only while they
    # score a step (rl_engine/policy/offload.py); "none": always on the device.
    offload: Literal["none", "cpu"] = "none"

    def __post_init__(self) -> None:
        _check_text("ref.path", self.path, optional=True)


@dataclass(kw_only=True)
class DistillSection:
    """On-policy distillation: the student (the policy) samples, a frozen teacher scores every sampled
    token, and each response token's advantage gets -coef * (log pi_student - log pi_teacher), the
    per-token reverse KL on the student's samples. The teacher is held and sharded like the reference
    (any size or family, with the policy's tokenizer)."""

    teacher_path: str | None = None  # a Hugging Face model directory; None: no distillation
    coef: float = 1.0
    # "reverse_kl": the teacher's signal alone (task rewards ignored); "reverse_kl+reward": added to
    # the task's group advantages.
    mode: Literal["reverse_kl", "reverse_kl+reward"] = "reverse_kl"
    offload: Literal["none", "cpu"] = "none"  # the teacher's weights, as ref.offload

    def __post_init__(self) -> None:
        _check_text("distill.teacher_path", self.teacher_path, optional=True)
        check_float("distill.coef", self.coef, lo=0, lo_open=True)


@dataclass(kw_only=True)
class PlacementSection:
    """Where the actors run. "single_process": the whole loop in this process (the demo's fast path,
    no ZMQ). "colocated": a coordinator process and trainer ranks that host the inference engines
    and alternate generation and training over the same weights. "disaggregated": a coordinator,
    trainer ranks and `num_rollout_workers` rollout worker processes; weights are pushed through
    weight_sync over ZMQ after every step."""

    mode: Literal["single_process", "colocated", "disaggregated"] = "single_process"
    # Who starts the actors: "local" (processes on this machine) or "ray" (placed by a Ray placement group
    # across the cluster's nodes; the `ray` section says which cluster and what each actor asks for).
    launcher: Literal["local", "ray"] = "local"
    num_rollout_workers: int = 1  # disaggregated only
    # Every socket binds here: loopback unless configured. A wildcard (0.0.0.0, ::, *) is refused: bind the
    # one address the other actors reach this host by. Every socket is authenticated (rl_engine.auth).
    host: str = "127.0.0.1"
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
    # An OpenAI-compatible server on the run's rollout engine(s), answering from the weights being trained
    # (rl_engine/serve): single_process, the run's engine; colocated (tp=1), trainer rank 0's engine;
    # disaggregated, rollout worker i on serve_port + i. null: no server; 0: a free port each. Each
    # server's address goes to <output_dir>/serve/<name>.json. Loopback unless serve_host says otherwise;
    # the API key comes from the RL_ENGINE_API_KEY environment variable (never from the config, which
    # is logged), and a non-loopback host without one logs a warning.
    serve_port: int | None = None
    serve_host: str = "127.0.0.1"
    serve_model_name: str = "policy"

    def __post_init__(self) -> None:
        check_int("placement.num_rollout_workers", self.num_rollout_workers, lo=1)
        _check_text("placement.host", self.host)
        if self.host.strip("[]") in WILDCARD_HOSTS:
            raise ConfigError(f"placement.host={self.host} is a wildcard address: the run's sockets would listen on every "
                              "interface; give the one address the actors reach this host by (127.0.0.1 on one "
                              "machine)")
        check_int("placement.threads_per_process", self.threads_per_process, lo=1)
        for name in ("heartbeat_interval_s", "heartbeat_timeout_s", "startup_timeout_s", "weight_sync_timeout_s",
                     "dist_timeout_s", "grace_period_s"):
            check_float(f"placement.{name}", getattr(self, name), lo=0, lo_open=True)
        if not self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ConfigError(f"placement.heartbeat_timeout_s={self.heartbeat_timeout_s} must exceed "
                              f"heartbeat_interval_s ({self.heartbeat_interval_s})")
        check_int("placement.weight_bucket_mb", self.weight_bucket_mb, lo=1)
        if self.serve_port is not None:
            check_int("placement.serve_port", self.serve_port, lo=0, hi=65535, note="0 picks a free port")
        _check_text("placement.serve_host", self.serve_host)
        _check_text("placement.serve_model_name", self.serve_model_name)

    @property
    def uses_actors(self) -> bool:
        return self.mode != "single_process"


_HOST_PORT = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:(\d+)$")


def _check_resources(key: str, resources: dict[str, float]) -> None:
    if not resources:
        raise ConfigError(f"{key}={{}} must ask for at least one resource, e.g. {{CPU: 1}}")
    for name, amount in resources.items():
        if not name or not name.strip():
            raise ConfigError(f"{key}: resource names must be non-empty strings, got {name!r}")
        check_float(f"{key}.{name}", amount, lo=0)
    if not any(amount > 0 for amount in resources.values()):
        raise ConfigError(f"{key}={resources} asks for nothing: at least one amount must be > 0")


@dataclass(kw_only=True)
class RaySection:
    """The Ray cluster of `placement.launcher=ray` (rl_engine.launch.ray_cluster). One placement group
    per run, one bundle per actor process, each bundle asking for the resources below (CPU, GPU and
    custom resources such as `node:<ip>` or a label given to `ray start --resources`)."""

    # null: start a private local Ray instance for this run and stop it at the end; "auto": join the
    # cluster this machine belongs to (`ray start` / `ray job submit`); or the head's "host:port".
    address: str | None = None
    namespace: str = "rl_engine"
    runtime_env: dict[str, Any] = field(default_factory=dict)  # passed to Ray as given (working_dir, pip, ...)
    trainer_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})  # per trainer rank
    rollout_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})  # per rollout worker
    coordinator_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    # The placement group's strategy: PACK fills a node before the next one (trainer ranks of one TP group
    # together), SPREAD puts bundles on distinct nodes when it can; STRICT_* fail rather than bend.
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # How many times a rollout worker whose process dies (SIGKILL, OOM, `ray.kill` of its host, its node
    # lost) is started again in its bundle; the restarted worker receives the current weights and rejoins.
    # Its prompts are requeued on the others either way (the coordinator hears of the death from Ray at
    # once, and from the heartbeats). 0: never restarted, as under the local launcher.
    max_worker_restarts: int = 0

    def __post_init__(self) -> None:
        if self.address is not None and self.address != "auto":
            match = _HOST_PORT.match(self.address)
            if not match or not 1 <= int(match.group(1)) <= 65535:
                raise ConfigError(f"ray.address={self.address!r} must be null (a private local Ray instance), "
                                  "'auto' (the running cluster) or the head's host:port, e.g. 10.0.0.1:6379")
        _check_text("ray.namespace", self.namespace)
        for name in ("trainer_resources", "rollout_resources", "coordinator_resources"):
            _check_resources(f"ray.{name}", getattr(self, name))
        check_int("ray.max_worker_restarts", self.max_worker_restarts, lo=0, hi=1000)


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
    ref: RefSection = field(default_factory=RefSection)
    distill: DistillSection = field(default_factory=DistillSection)
    placement: PlacementSection = field(default_factory=PlacementSection)
    ray: RaySection = field(default_factory=RaySection)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # TensorBoard, W&B, metrics.png

    def __post_init__(self) -> None:
        self._check_other_sections()
        p, t = self.placement, self.train
        if p.launcher == "ray" and not p.uses_actors:
            raise ConfigError("placement.launcher=ray places actor processes: set placement.mode to colocated or "
                              "disaggregated (single_process runs in this process)")
        layout = f"tp={t.tp} pp={t.pp} dp={t.dp} ep={t.ep}" + (f" cp={t.cp}" if t.cp > 1 else "")
        if t.cp > 1 and t.shared_prefix is True:
            raise ConfigError(f"train.shared_prefix=true has no context-parallel form (train.cp={t.cp}): set "
                              "train.shared_prefix to auto (off under cp) or false, or train.cp=1")
        if p.mode == "single_process" and t.world_size > 1:
            raise ConfigError(f"train {layout} needs several trainer ranks: set placement.mode to colocated or "
                              "disaggregated (single_process runs one rank)")
        if self.ray.max_worker_restarts and (p.launcher != "ray" or p.mode != "disaggregated"):
            raise ConfigError(f"ray.max_worker_restarts={self.ray.max_worker_restarts} restarts rollout worker "
                              "processes: it needs placement.launcher=ray and placement.mode=disaggregated (got "
                              f"{p.launcher}, {p.mode})")
        if p.serve_port is not None and p.mode == "colocated" and t.tp > 1:
            raise ConfigError(f"placement.serve_port with placement.mode=colocated needs train.tp=1 (got {layout}): "
                              "served requests would have to enter the tp ranks' engines in lockstep; use "
                              "placement.mode=disaggregated to serve from a tensor-parallel run")
        if p.serve_port is not None and p.mode == "disaggregated" and p.serve_port \
                and p.serve_port + p.num_rollout_workers - 1 > 65535:
            raise ConfigError(f"placement.serve_port={p.serve_port}: rollout workers serve on serve_port + i, up to "
                              f"{p.serve_port + p.num_rollout_workers - 1} > 65535; pick a lower port or 0")
        if p.mode == "colocated" and (t.pp > 1 or t.ep > 1):
            raise ConfigError(f"placement.mode=colocated needs train.pp=1 and train.ep=1 (got {layout}): each rank's "
                              "engine runs every layer and every expert; use placement.mode=disaggregated")
        if self.model.batch_invariant and p.mode == "disaggregated" and t.tp > 1:
            raise ConfigError(f"model.batch_invariant=true with placement.mode=disaggregated needs train.tp=1 (got "
                              f"{layout}): the rollout workers' tp=1 engines sum each matmul over the whole "
                              "hidden size where tp ranks sum shards, so their log-probs cannot match bit for bit; "
                              "use placement.mode=colocated (engines on the trainer's shards) or train.tp=1")
        if p.uses_actors and self.train.device != "cpu":
            raise ConfigError(f"train.device={t.device!r}: the trainer ranks (ParallelTrainer on gloo) run on CPU in "
                              "this build; use train.device=cpu or placement.mode=single_process")
        if self.rollout.mode == "async" and not p.uses_actors:
            raise ConfigError("rollout.mode=async overlaps rollout and training in separate actors: set "
                              "placement.mode to colocated or disaggregated (single_process runs sync only)")
        if self.rollout.mode == "async" and self.rollout.routing_replay:
            raise ConfigError("rollout.routing_replay=true with rollout.mode=async is not supported: a partial rollout "
                              "continued with new weights re-routes its earlier tokens; use rollout.mode=sync")
        if self.optim.kl_adaptive_target is not None and t.mini_batches_per_step * t.epochs_per_step == 1:
            raise ConfigError("optim.kl_adaptive_target adapts the lr to the KL that a step's updates move the policy, "
                              "measured from its second update on: set train.mini_batches_per_step (or "
                              "train.epochs_per_step) above 1, or optim.kl_adaptive_target=null")
        if self.optim.kl_adaptive_up_factor is not None and self.optim.kl_adaptive_target is None:
            raise ConfigError(f"optim.kl_adaptive_up_factor={self.optim.kl_adaptive_up_factor} sets how the KL-adaptive lr "
                              "scale rises, and that scale is off (optim.kl_adaptive_target=null): set "
                              "optim.kl_adaptive_target or drop optim.kl_adaptive_up_factor")
        spec = self.rollout.speculative
        if spec is not None and self.rollout.routing_replay:
            raise ConfigError("rollout.speculative with rollout.routing_replay=true is not supported: the engine would "
                              "record the routing of rejected draft positions; set one of them off")
        if spec is not None and spec.method == "draft_model" and not isinstance(spec.model, str):
            raise ConfigError(f"rollout.speculative.model={spec.model!r} must be the draft model's directory (a Hugging "
                              "Face checkpoint sharing the policy's tokenizer)")
        if t.compile and p.mode != "single_process":
            raise ConfigError(f"train.compile=true compiles the single-process trainer's layers (placement.mode="
                              f"{p.mode}): set placement.mode=single_process or train.compile=false")
        if t.compile and self.model.batch_invariant:
            raise ConfigError("train.compile=true with model.batch_invariant=true is not supported: the batch-invariant "
                              "ops are checked outside compiled graphs; set train.compile=false")
        if self.train.shared_prefix is True and self.model.batch_invariant:
            raise ConfigError("train.shared_prefix=true with model.batch_invariant=true is not supported: the batch-"
                              "invariant kernels have no shared-prefix attention; set train.shared_prefix=auto or false")
        if self.warmup.path == "builtin" and not self.data.path.startswith("builtin:"):
            raise ConfigError(f"warmup.path='builtin' needs a builtin task in data.path (got {self.data.path!r}); "
                              "give a JSONL path of (prompt, response) rows, or null")
        r = self.rollout
        # A sample trains on its prompt and response but the last token: at least 1 + max_new_tokens - 1.
        # The check against the longest prompt needs the tokenizer (train_cli.check_inputs).
        if r.fn is not None and t.micro_batch_tokens < r.max_total_tokens:
            raise ConfigError(f"train.micro_batch_tokens={t.micro_batch_tokens} must be at least rollout.max_total_tokens "
                              f"({r.max_total_tokens}) with rollout.fn: a whole session is one sample and must fit in "
                              "one micro-batch")
        if r.fn is not None and r.routing_replay:
            raise ConfigError("rollout.routing_replay=true with rollout.fn is not supported: routing is recorded per "
                              "engine request, a session spans several; use rollout.routing_replay=false")
        if t.micro_batch_tokens < r.max_new_tokens:
            raise ConfigError(f"train.micro_batch_tokens={t.micro_batch_tokens} must be at least the longest prompt "
                              f"plus rollout.max_new_tokens ({r.max_new_tokens}) minus 1: every sample must fit in "
                              "one micro-batch")

    @property
    def uses_reference(self) -> bool:
        """A reference policy is scored every step (and `train/kl_ref` logged): `ref.path` is given,
        or `loss.kl_coef > 0` regularises toward the initial policy."""
        return self.ref.path is not None or self.loss.kl_coef > 0

    def _check_other_sections(self) -> None:
        """What the reward, advantage and loss configs (in their own packages) leave open: they refuse
        NaN through their `> 0` checks but take infinities, which these values cannot be. (Caps such as
        loss.clip_high or importance_sampling.truncate_cap may be .inf: no cap.)"""
        _check_text("reward.name", self.reward.name)
        check_float("reward.timeout_s", self.reward.timeout_s, lo=0, lo_open=True)
        check_float("advantage.eps", self.advantage.eps, lo=0, lo_open=True)
        check_float("loss.kl_coef", self.loss.kl_coef, lo=0)
        if self.loss.kl_in_reward and not self.loss.kl_coef > 0:
            raise ConfigError("loss.kl_in_reward=true needs loss.kl_coef > 0 (the penalty's weight, e.g. 0.05)")
        check_float("loss.entropy_coef", self.loss.entropy_coef, lo=0)
