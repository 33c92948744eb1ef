"""The GRPO-family RL loop, colocated: one process holds the policy, trains it, and serves its
rollouts from the very same parameter tensors through the inference engine.

One step: take prompts → generate `n` samples each (behavior log-probs and policy versions per
token) → rewards → group advantages → pack samples into micro-batches by token budget → recompute
log-probs at the rollout temperature → policy loss with importance correction, normalised by global
counts fixed before the split → AdamW step → publish the new version to the engine.

The per-step pieces (samples, sampling parameters, micro-batches, the loss) live in `rl_step` and are
shared with the actors (`rl_engine/actors`), whose colocated run at tp = pp = dp = 1 reproduces this one.

Checkpoints (`save_checkpoint` / `load_checkpoint`) hold everything the next step reads: weights, AdamW
state, the dataset cursor, the policy version and step count, the torch RNG and the engine sampler's
generator, and the run's pre-RL results, so a resumed sync run repeats the uninterrupted one bit for bit
(rollouts are seeded per step by `rl_step.rollout_seed`; the engine keeps no KV across steps).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
import json
import logging
import os
import shutil
import time
from typing import Any

import torch

from rl_engine import kernels, run_checkpoint
from rl_engine.builtin_models import resolve_model_path
from rl_engine.config import ConfigError, to_dict
from rl_engine.frozen_models import check_same_tokenizer, reference_path
from rl_engine.inference import LLM
from rl_engine.kernels.cpu import host_memory
from rl_engine.losses import PolicyLoss
from rl_engine.policy import from_pretrained
from rl_engine.policy.compile import apply_compile
from rl_engine.policy.offload import HostOffload, in_use
from rl_engine.policy.optimizer import MasterWeightsAdamW
from rl_engine.rl_step import (
    DecodeCompileSeconds,
    PromptSource,
    Sample,
    StepLoss,
    apply_kl_reward_penalty,
    aggregate_updates,
    apply_distillation,
    attach_logprobs,
    beyond_target_kl,
    build_micro_batches,
    collect_groups,
    discard_expert_loads,
    dump_samples,
    eval_sampling_params,
    forward_logprobs,
    make_sample,
    mini_batch_normalizer,
    prompt_seed,
    rollout_metrics,
    run_micro_batches,
    shared_prefix_min_group,
    step_lr,
    sampling_params,
    split_mini_batches,
    update_expert_bias,
)
from rl_engine.rollout.advantages import compute_advantages
from rl_engine.rollout.data import read_records
from rl_engine.rollout.packing import build_packed_batch
from rl_engine.rollout.rewards import RewardComputer
from rl_engine.train_config import RLConfig

logger = logging.getLogger(__name__)

__all__ = ["GRPOTrainer", "ResumeError", "Sample", "check_resume_config", "resolve_paths"]

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete single-process checkpoint
# Config keys a resumed run may change: run length and bookkeeping, not what a step computes. (A
# different thread count or train.compile may change the last bits of later steps' floats; allowed on purpose.)
RESUMABLE_KEYS = ("train.steps", "train.resume", "train.output_dir", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.eval_every", "train.threads", "train.deterministic",
                  "train.compile", "train.keep_freed_memory", "reward.num_workers")


class ResumeError(ConfigError):
    """`train.resume` names no usable checkpoint, or one this config cannot continue."""


def resolve_paths(cfg: RLConfig) -> tuple[str, str, str | None, str | None]:
    """(model dir, train prompts, eval prompts, warm-start data), writing builtins into the run dir."""
    out = cfg.train.output_dir
    # a preset is written to <out>/init_model; a real builtin or a .gguf file is converted once into the cache
    model_path = resolve_model_path(cfg.model.path, output_dir=out, seed=cfg.model.seed)
    data, eval_path, warm = cfg.data.path, cfg.data.eval_path, cfg.warmup.path
    if data.startswith("builtin:"):
        from rl_engine.demo_task import write_task

        paths = write_task(os.path.join(out, "data"), data.split(":", 1)[1], seed=cfg.train.seed,
                           num_eval=cfg.data.num_eval)
        data, eval_path = paths["train"], eval_path or paths["eval"]
        warm = paths["sft"] if warm == "builtin" else warm
    elif warm == "builtin":
        raise ValueError("warmup.path='builtin' needs a builtin task in data.path; give a JSONL path or null")
    return model_path, data, eval_path, warm


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Where the processes run and where metrics go (TensorBoard, W&B, the plot): a resume may change them.
LAUNCH_KEYS = ("placement.", "ray.", "metrics.")


def check_resume_config(checkpoint: str, cfg: RLConfig) -> dict[str, Any]:
    """The checkpoint's saved state, after checking it was written by a single-process run of the same
    config (up to `RESUMABLE_KEYS`) and lies within `train.steps`; a `ResumeError` names any mismatch."""
    state_path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(state_path):
        raise ResumeError(f"train.resume: {checkpoint} holds no {STATE_FILE}; it is not a complete "
                          "single-process checkpoint (give <output_dir>/checkpoints/step_<k> or 'auto')")
    with open(state_path) as f:
        state = json.load(f)
    if state["placement"] != "single_process":
        raise ResumeError(f"train.resume: {checkpoint} was written by placement.mode={state['placement']}; "
                          "resume it with that placement")
    saved, ours = _flatten(state["config"]), _flatten(to_dict(cfg))
    diffs = [f"{key}: checkpoint {saved.get(key, '<absent>')!r}, this run {ours.get(key, '<absent>')!r}"
             for key in sorted(set(saved) | set(ours))
             if key not in RESUMABLE_KEYS and not key.startswith(LAUNCH_KEYS) and saved.get(key) != ours.get(key)]
    if diffs:
        raise ResumeError(f"cannot resume from {checkpoint}: it was written with a different config ("
                          + "; ".join(diffs) + "). Resume with the checkpoint's config, or start a new run")
    if state["step"] > cfg.train.steps:
        raise ResumeError(f"cannot resume from {checkpoint}: it is at step {state['step']}, past "
                          f"train.steps={cfg.train.steps}")
    return state


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load_optimizer(optimizer: MasterWeightsAdamW, checkpoint: str) -> None:
    """The checkpoint's optimizer.pt into `optimizer`; a state of another model (torch's and
    `MasterWeightsAdamW`'s ValueErrors: parameter counts, master weights) is a `ResumeError` naming it."""
    path = os.path.join(checkpoint, "optimizer.pt")
    try:
        optimizer.load_state_dict(_torch_load(path))
    except ValueError as e:
        raise ResumeError(f"cannot resume from {checkpoint}: {path} does not fit this model's optimizer: "
                          f"{e}") from None


def _torch_load(path: str) -> Any:
    """One torch file of a checkpoint; a file that cannot be read is a `ResumeError` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # of any type: a damaged file (when the manifest was bypassed) is refused whole
        raise ResumeError(f"cannot resume: {path} cannot be read ({type(e).__name__}: {e}); resume from an "
                          "earlier checkpoint") from None


class GRPOTrainer:
    """The whole loop in one process (placement "single_process"): the demo's fast path and the
    reference every distributed placement is tested against.

    Process-wide settings, held from construction to `close()`, which puts back what it found: torch's
    intra-op thread count (`train.threads`; torch has one pool per process, so whatever else runs in this
    process meanwhile, the colocated engine on purpose, a served engine, a benchmark's peer, runs with it
    too), deterministic algorithms, and the kernel registry's batch-invariant mode. One more is set and not put
    back: `train.keep_freed_memory` (glibc's malloc keeps freed memory for reuse; close() gives the free pages
    back to the OS)."""

    def __init__(self, config: RLConfig) -> None:
        self.config = cfg = config
        if cfg.placement.mode != "single_process":
            logger.warning("GRPOTrainer runs in this process; placement.mode=%s is ignored (run it with "
                           "`rl-engine train` to start the actors)", cfg.placement.mode)
        self._hold_process_settings(cfg)
        try:
            self._build(cfg)
        except BaseException:  # a failing config leaves the process as it found it
            if getattr(self, "rewards", None) is not None:
                self.rewards.close()
            self._restore_process_settings()
            raise

    def _hold_process_settings(self, cfg: RLConfig) -> None:
        """Set the process-wide settings the trainer holds until `close()` (the class docstring)."""
        self._was_threads = torch.get_num_threads()
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()
        self._was_cudnn_benchmark = torch.backends.cudnn.benchmark
        self._set_cublas_workspace = False
        # model.batch_invariant: the kernel registry's mode, set before any model is built (undone by close)
        self._was_batch_invariant = kernels.set_batch_invariant(cfg.model.batch_invariant)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.keep_freed_memory:  # (for the process's life: glibc has no way back; close() trims)
            host_memory.keep_freed_memory()
        if cfg.train.deterministic:
            # On CPU a same-seed run is already bitwise repeatable at a fixed thread count; this also
            # makes any op without a deterministic kernel raise. cuBLAS needs its workspace setting
            # before its first call (the CUDA path is unverified here: no GPU where this was written).
            if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
                self._set_cublas_workspace = True
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    def _restore_process_settings(self) -> None:
        torch.use_deterministic_algorithms(self._was_deterministic)
        torch.backends.cudnn.benchmark = self._was_cudnn_benchmark
        if self._set_cublas_workspace:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        kernels.set_batch_invariant(self._was_batch_invariant)
        torch.set_num_threads(self._was_threads)
        host_memory.release_freed_memory()

    def _build(self, cfg: RLConfig) -> None:
        torch.manual_seed(cfg.train.seed)
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        model_path, data_path, eval_path, self.warmup_path = resolve_paths(cfg)
        self.model_path = model_path  # the model directory the run started from (tokenizer, chat template)
        dtype = getattr(torch, cfg.model.dtype)
        self.model = from_pretrained(model_path, dtype=dtype, device=cfg.train.device)
        # The frozen reference policy (loss.kl_coef, train/kl_ref): `ref.path`'s weights, or a copy of
        # the initial policy, refreshed after the warm start and kept in checkpoints.
        self.ref_model = None
        ref_path = reference_path(cfg, initial_policy_path=model_path)
        if ref_path is not None and cfg.ref.path is None:
            self.ref_model = copy.deepcopy(self.model)
        elif ref_path is not None:
            check_same_tokenizer(key="ref.path", path=ref_path, policy_path=model_path)
            self.ref_model = from_pretrained(ref_path, dtype=dtype, device=cfg.train.device)
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False)
        if cfg.train.compile:  # (after the reference's copy: a frozen model runs no compiled forward)
            apply_compile(self.model)
        self.teacher = None  # on-policy distillation's frozen teacher
        if cfg.distill.teacher_path is not None:
            check_same_tokenizer(key="distill.teacher_path", path=cfg.distill.teacher_path, policy_path=model_path)
            self.teacher = from_pretrained(cfg.distill.teacher_path, dtype=dtype, device=cfg.train.device)
            self.teacher.requires_grad_(False)
        # ref.offload / distill.offload: "cpu" keeps a frozen model's weights in host memory between uses
        self.ref_offload, self.teacher_offload = (
            HostOffload(m, device=cfg.train.device) if m is not None and mode == "cpu" else None
            for m, mode in ((self.ref_model, cfg.ref.offload), (self.teacher, cfg.distill.offload)))
        self.prompts = PromptSource(cfg, model_path=model_path, data_path=data_path, eval_path=eval_path,
                                    eos_token_ids=self.model.config.eos_token_id)
        self.tokenizer = self.prompts.tokenizer
        self.dataset, self.eval_items = self.prompts.dataset, self.prompts.eval_items
        r = cfg.rollout
        # cpu_threads fixed: the engine shares this process with training, and a thread count that followed
        # the machine's load would be left to training too, making a run's numbers depend on the load
        self.llm = LLM(model=self.model, tokenizer=self.tokenizer, kv_cache_memory=r.kv_cache_memory_mb << 20,
                       max_num_batched_tokens=r.max_num_batched_tokens, seed=cfg.train.seed,
                       record_routing=r.routing_replay, speculative_config=r.speculative,
                       cpu_threads="fixed", cpu_prepack_weights=False,  # the fp32 log-prob contract (config.py)
                       cpu_decode_kernel=r.cpu_decode_kernel, compile_decode=r.compile_decode,
                       fork_copy_partial_block=r.fork_copy_partial_block)
        self.decode_compile = DecodeCompileSeconds(self.llm.engine) if r.compile_decode else None
        self.moe_layers = sorted(self.model.config.moe_layers) if r.routing_replay else None
        self.rewards = RewardComputer(cfg.reward)
        self.agentic = None  # rollout.fn: multi-turn sessions instead of single-turn completions
        if cfg.rollout.fn is not None:
            from rl_engine.agentic_loop import AgenticRollouts

            self.agentic = AgenticRollouts(cfg, self.prompts, self.rewards)
        self.loss_fn = PolicyLoss(cfg.loss)
        o = cfg.optim
        # fp32 master weights and AdamW state under a bf16 model (as the ZeRO-1 optimizer of the actors' trainer)
        self.optimizer = MasterWeightsAdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                            weight_decay=o.weight_decay)
        self.lr = step_lr(cfg)  # optim.lr_scheduler / warmup / KL-adaptive scale, per RL step
        self.policy_version = 0
        self.update_metrics: list[dict[str, float]] = []  # the last step's, one dict per optimizer update
        self.step_count = 0
        # What the run measured before RL (warm-start losses, held-out accuracy); kept in checkpoints
        # so a resumed run reports the same "before" without repeating the warm start.
        self.before_rl: dict[str, float] = {}

    def encode_prompt(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    # ---- supervised warm start -----------------------------------------------------------------
    def warm_start(self) -> dict[str, float]:
        """Next-token cross-entropy on (prompt, response) pairs, response tokens only."""
        cfg = self.config.warmup
        if not self.warmup_path or cfg.steps <= 0:
            return {}
        rows = [row for _, row in read_records(self.warmup_path)]
        for i, row in enumerate(rows):
            if ("prompt" not in row and "messages" not in row) or "response" not in row:
                raise ValueError(f"{self.warmup_path}: row {i + 1} needs 'prompt' (or 'messages') and 'response' keys")
        examples = []
        eos = self.prompts.eos_token_ids[:1]
        template = self.prompts.template
        for row in rows:
            if "messages" in row:  # a multi-turn demonstration: the conversation so far, then this turn
                from rl_engine.inference.chat import render_chat

                text = render_chat(self.tokenizer, row["messages"], add_generation_prompt=True)
            else:
                text = template([{"role": "user", "content": row["prompt"]}]) if template else row["prompt"]
            prompt = self.prompts.encode(text)
            response = self.tokenizer.encode(row["response"], add_special_tokens=False) + eos
            examples.append((prompt, response))
        opt = MasterWeightsAdamW(self.model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(self.config.train.seed)
        losses = []
        for step in range(cfg.steps):
            idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen).tolist()
            seqs = [examples[i][0] + examples[i][1] for i in idx]
            masks = [[0] * (len(examples[i][0]) - 1) + [1] * len(examples[i][1]) for i in idx]
            batch = build_packed_batch(range(len(seqs)), token_ids=[s[:-1] for s in seqs],
                                       per_token={"targets": [s[1:] for s in seqs], "mask": masks})
            h = self.model.hidden_states(batch.input_ids, positions=batch.positions, cu_seqlens=batch.cu_seqlens)
            lp, _ = self.model.token_logprobs(h, batch.values["targets"])
            mask = batch.values["mask"].float()
            loss = -(lp * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        opt.zero_grad(set_to_none=True)  # leave no gradient behind for the RL optimizer
        self.optimizer.reload_model_params()  # the warm-started weights are its masters now
        if self.ref_model is not None and self.config.ref.path is None:  # the initial policy is this one
            with in_use(self.ref_offload, write_back=True):
                self.ref_model.load_state_dict(self.model.state_dict())
        # The warm-started weights are the RL run's version 0; drop KV cached under the old ones.
        self.llm.reset_prefix_cache()
        return {"warmup/loss_first": losses[0], "warmup/loss_last": sum(losses[-10:]) / len(losses[-10:])}

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy (mean reward) on the held-out prompts."""
        if not self.eval_items:
            return {}
        if self.agentic is not None:
            return {"eval/accuracy": self.agentic.accuracy(self.eval_items, backend=self._turns(), run=asyncio.run)}
        params = eval_sampling_params(self.config, eos_token_ids=self.prompts.eos_token_ids)
        outs = self.llm.generate([self.prompts.encode(it.text) for it in self.eval_items], params)
        texts = [self.prompts.decode(o.outputs[0].token_ids) for o in outs]
        outcomes, _ = self.rewards.compute(texts, [it.answer for it in self.eval_items])
        return {"eval/accuracy": sum(o.score for o in outcomes) / len(outcomes)}

    def _turns(self):
        """Agentic sessions' turns on this process's engine (one `AsyncEngine` per event loop)."""
        from rl_engine.inference.async_engine import AsyncEngine
        from rl_engine.rollout.agentic import EngineTurns

        return EngineTurns(AsyncEngine(self.llm.engine))

    # ---- one RL step ---------------------------------------------------------------------------
    def rollout(self) -> tuple[list[Sample], dict[str, float]]:
        """The step's kept samples (dynamic sampling drops and refills uniform groups, as the actors'
        coordinator does) and the rollout metrics over every sample generated."""
        params = sampling_params(self.config, step=self.step_count, eos_token_ids=self.prompts.eos_token_ids)
        # A step starts with no cached KV (an evaluation's, or a step's that trained on nothing), as it
        # does in a run resumed here: a prefix-cache hit computes the same values in another batch
        # shape, whose floats may differ in the last bits.
        self.llm.reset_prefix_cache()
        gen_s = 0.0

        def generate(items: list) -> tuple[list, int]:
            nonlocal gen_s
            if self.agentic is not None:
                t0 = time.perf_counter()
                records = asyncio.run(self.agentic.sessions(items, backend=self._turns(), n=self.config.rollout.n,
                                                            step_seed=params.seed))
                gen_s += time.perf_counter() - t0
                return self.agentic.groups(items, records)
            prompts = [self.prompts.encode(it.text) for it in items]
            per_prompt = [dataclasses.replace(params, seed=prompt_seed(params.seed, it.uid)) for it in items]
            t0 = time.perf_counter()
            outs = self.llm.generate(prompts, per_prompt)
            gen_s += time.perf_counter() - t0
            for item, out in zip(items, outs):
                if out.error:
                    raise ValueError(f"prompt {item.uid} was refused by the engine: {out.error}")
            texts = [self.prompts.decode(c.token_ids) for out in outs for c in out.outputs]
            answers = [item.answer for item, out in zip(items, outs) for _ in out.outputs]
            outcomes, reward_stats = self.rewards.compute(texts, answers)
            scores = iter(o.score for o in outcomes)
            answered = []
            for g, (item, prompt, out) in enumerate(zip(items, prompts, outs)):
                samples = []
                for c in out.outputs:
                    routed = None if c.routed_experts is None else torch.tensor(c.routed_experts)
                    samples.append(make_sample(prompt_ids=prompt, response_ids=c.token_ids, logprobs=c.logprobs,
                                               policy_versions=c.policy_versions, kv_versions=c.kv_versions,
                                               reward=next(scores), group=g, uid=item.uid, routed_experts=routed,
                                               finish_reason=c.finish_reason or "",
                                               spec_counts=(c.spec_draft_tokens, c.spec_accepted_tokens,
                                                            c.spec_verifies)))
                answered.append((item, samples))
            return answered, reward_stats.num_failed

        kept, generated, stats = collect_groups(self.config, take=self.dataset.take, generate=generate)
        metrics = rollout_metrics(generated, num_reward_failed=stats["reward_failed"], rollout_s=gen_s,
                                  speculative=self.config.rollout.counted_speculative)
        metrics.update({"rollout/kept_groups": len(kept), "rollout/dropped_groups": stats["dropped"],
                        "rollout/refill_rounds": stats["rounds"]})
        if self.agentic is not None:
            metrics.update(self.agentic.metrics())
        if self.decode_compile is not None:  # this step's compiles (and an evaluation's before it)
            metrics["rollout/decode_compile_s"] = self.decode_compile.take()
        return [s for group in kept for s in group], metrics

    def train_on(self, samples: list[Sample]) -> dict[str, float]:
        """Train on one step's samples: `train.mini_batches_per_step` updates per epoch, for
        `train.epochs_per_step` epochs; the proximal log-probs are computed once, before the first."""
        cfg = self.config
        metrics: dict[str, float] = {}
        if not samples:  # every group was dropped (dynamic sampling): no update this step
            return metrics
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups = torch.tensor([s.group for s in samples])
        advantages = compute_advantages(rewards, groups, config=cfg.advantage)
        mini = split_mini_batches(samples, advantages, count=cfg.train.mini_batches_per_step)
        plans = [(build_micro_batches(s, a, micro_batch_tokens=cfg.train.micro_batch_tokens,
                                      temperature=cfg.rollout.temperature, pack=cfg.train.pack_sequences,
                                      moe_layers=self.moe_layers, shared_prefix_min_group=shared_prefix_min_group(cfg)),
                  mini_batch_normalizer(s, cfg)) for s, a in mini]
        t0 = time.perf_counter()
        skip = cfg.train.skip_unscored_rows
        self.model.train()
        if self.ref_model is not None:  # the reference's log-probs, in the same micro-batches
            for micro_batches, _ in plans:
                with in_use(self.ref_offload):
                    attach_logprobs(micro_batches, forward_logprobs(self.ref_model, micro_batches, skip_unscored=skip),
                                    key="ref")
        # Decoupled PPO (several updates) and the KL reward penalty need the proximal policy, once per step.
        if len(plans) * cfg.train.epochs_per_step > 1 or cfg.loss.kl_in_reward:
            for micro_batches, _ in plans:
                attach_logprobs(micro_batches, forward_logprobs(self.model, micro_batches, skip_unscored=skip),
                                key="proximal")
        if cfg.loss.kl_in_reward:  # rewards lose kl_coef * KL(proximal || ref); advantages again
            metrics["train/kl_reward_penalty"] = apply_kl_reward_penalty(
                [m for m, _ in plans], [len(s) for s, _ in mini], rewards, groups, cfg)
        if self.teacher is not None:  # the teacher scores the sampled tokens, in the same micro-batches
            for micro_batches, _ in plans:
                with in_use(self.teacher_offload):
                    attach_logprobs(micro_batches, forward_logprobs(self.teacher, micro_batches, skip_unscored=skip),
                                    key="teacher")
            apply_distillation([m for m, _ in plans], coef=cfg.distill.coef,
                               with_reward=cfg.distill.mode == "reverse_kl+reward")
        per_update = []
        lr = self.lr.lr(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        last_kl = None  # approx_kl of the step's last forward pass after an update (KL-adaptive lr)
        updates = [plan for _ in range(cfg.train.epochs_per_step) for plan in plans]
        for k, (micro_batches, normalizer) in enumerate(updates):
            self.optimizer.zero_grad(set_to_none=True)
            loss = StepLoss(self.loss_fn, normalizer)
            run_micro_batches(self.model, micro_batches, loss, after_backward=self.optimizer.accumulate_grads,
                              skip_unscored=skip)
            update_metrics = loss.metrics()  # (each a float of its micro-batches' tensors: reduced once)
            if k > 0:
                last_kl = float(update_metrics["approx_kl"])
            if beyond_target_kl(k, update_metrics, cfg.train.target_kl):  # PPO's KL early stop
                self.optimizer.zero_grad(set_to_none=True)
                discard_expert_loads(self.model)
                break
            grad_norm = self.optimizer.clip_grad_norm_(cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            update_expert_bias(self.model)
            per_update.append({**update_metrics, "grad_norm": float(grad_norm), "micro_batches": len(micro_batches)})
        if cfg.train.target_kl is not None:
            metrics["train/skipped_updates"] = float(len(updates) - len(per_update))
        if self.lr.varies:  # (logged only then: a run without a schedule keeps its metrics as they were)
            metrics["train/lr"] = lr
        self.lr.observe(last_kl)
        self.update_metrics = per_update  # each update's metrics (tests, debugging)
        train_s = time.perf_counter() - t0
        self.policy_version += 1
        t1 = time.perf_counter()
        # Colocated: the engine already reads these tensors; publishing is a version bump.
        self.llm.update_weights(version=self.policy_version)
        metrics.update({f"train/{k}": v for k, v in aggregate_updates(per_update, mini_batches=len(plans)).items()})
        metrics.update({
            "perf/train_tokens_per_s": sum(len(s.input_ids) for s in samples) / train_s,
            "perf/train_s": train_s,
            "perf/weight_sync_s": time.perf_counter() - t1,
        })
        return metrics

    def step(self) -> dict[str, float]:
        samples, metrics = self.rollout()
        metrics.update(self.train_on(samples))
        self.step_count += 1
        if self.config.train.dump_samples:
            dump_samples(os.path.join(self.config.train.output_dir, "samples.jsonl"), samples, step=self.step_count)
        metrics["step"] = self.step_count
        metrics["policy_version"] = self.policy_version
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> str:
        """Write this process's state into `run_checkpoint.step_dir(output_dir, step)`, each file
        atomically, then commit it as the one to resume from. Returns its directory."""
        cfg = self.config
        if step != self.step_count:
            raise ValueError(f"save_checkpoint(step={step}) but the trainer has run {self.step_count} steps")
        path = run_checkpoint.step_dir(cfg.train.output_dir, step)
        if os.path.isdir(path):  # an uncommitted leftover of a killed run: never mix its files with ours
            shutil.rmtree(path)
        os.makedirs(path)
        run_checkpoint.write_bytes_atomic(os.path.join(path, "model.pt"), _torch_bytes(self.model.state_dict()))
        if self.ref_model is not None and cfg.ref.path is None:  # the initial policy, no longer on disk
            with in_use(self.ref_offload):
                run_checkpoint.write_bytes_atomic(os.path.join(path, "ref_model.pt"),
                                                  _torch_bytes(self.ref_model.state_dict()))
        run_checkpoint.write_bytes_atomic(os.path.join(path, "optimizer.pt"),
                                          _torch_bytes(self.optimizer.state_dict()))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.device(cfg.train.device).type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        run_checkpoint.write_bytes_atomic(os.path.join(path, "rng.pt"), _torch_bytes(rng))
        version, internal, gauss = self.llm.engine.sampler.rng.getstate()  # random.Random, for unseeded requests
        run_checkpoint.write_json_atomic(os.path.join(path, STATE_FILE), {
            "placement": "single_process", "step": step, "policy_version": self.policy_version,
            "dataset": self.dataset.state_dict(), "before_rl": self.before_rl, "lr": self.lr.state_dict(),
            "sampler_rng": [version, list(internal), gauss], "config": to_dict(cfg),
        })
        return run_checkpoint.commit(cfg.train.output_dir, step, keep=cfg.train.keep_checkpoints)

    def load_checkpoint(self, path: str) -> int:
        """Restore the state `save_checkpoint` wrote; returns its step. `path` is one that
        `run_checkpoint.resolve_resume` returned: checked against its manifest, file by file."""
        state = check_resume_config(path, self.config)
        try:
            self.model.load_state_dict(_torch_load(os.path.join(path, "model.pt")))
        except RuntimeError as e:  # missing / unexpected keys, shape mismatches
            raise ResumeError(f"cannot resume from {path}: its weights do not fit this model: {e}") from None
        _load_optimizer(self.optimizer, path)
        if self.ref_model is not None and self.config.ref.path is None:
            with in_use(self.ref_offload, write_back=True):
                self.ref_model.load_state_dict(_torch_load(os.path.join(path, "ref_model.pt")))
        try:
            self.dataset.load_state_dict(state["dataset"])
        except ValueError as e:
            raise ResumeError(f"cannot resume from {path}: {e}") from None
        rng = _torch_load(os.path.join(path, "rng.pt"))
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng:
            torch.cuda.set_rng_state_all(rng["torch_cuda"])
        version, internal, gauss = state["sampler_rng"]
        self.llm.engine.sampler.rng.setstate((version, tuple(internal), gauss))
        self.step_count, self.policy_version = state["step"], state["policy_version"]
        self.before_rl = state["before_rl"]
        self.lr.load_state_dict(state["lr"] if "lr" in state else {})  # absent: a checkpoint from before schedules
        if self.policy_version > self.llm.weights_version:  # the engine tags new tokens with this version
            self.llm.update_weights(version=self.policy_version)
        return self.step_count

    def close(self) -> None:
        self.rewards.close()
        self._restore_process_settings()
