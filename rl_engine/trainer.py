"""The GRPO-family RL loop, colocated: one process holds the policy, trains it, and serves its
rollouts from the very same parameter tensors through the inference engine.

One step: take prompts → generate `n` samples each (behavior log-probs and policy versions per
token) → rewards → group advantages → pack samples into micro-batches by token budget → recompute
log-probs at the rollout temperature → policy loss with importance correction, normalised by global
counts fixed before the split → AdamW step → publish the new version to the engine.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from rl_engine.inference import LLM, SamplingParams
from rl_engine.losses import PolicyLoss, compute_loss_normalizer, reduce_metrics
from rl_engine.policy import from_pretrained
from rl_engine.policy.tokenizer import Tokenizer
from rl_engine.rollout.advantages import compute_advantages, filter_uniform_groups
from rl_engine.rollout.data import PromptDataConfig, PromptDataset, PromptItem, read_records
from rl_engine.rollout.packing import build_packed_batch, plan_micro_batches
from rl_engine.rollout.rewards import RewardComputer
from rl_engine.train_config import RLConfig

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One completion made ready for training. Per-token lists are aligned with the model input
    (prompt + response without its last token): entry t is about predicting token t + 1."""

    group: int
    input_ids: list[int]
    targets: list[int]
    loss_mask: list[int]
    behavior_logprobs: list[float]
    policy_versions: list[int]
    reward: float
    response_len: int


def _resolve_paths(cfg: RLConfig) -> tuple[str, str, str | None, str | None]:
    """(model dir, train prompts, eval prompts, warm-start data), writing builtins into the run dir."""
    out = cfg.train.output_dir
    model_path = cfg.model.path
    if model_path.startswith("builtin:"):
        from rl_engine.policy.presets import write_preset_checkpoint

        model_path = os.path.join(out, "init_model")
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            write_preset_checkpoint(cfg.model.path.split(":", 1)[1], model_path, seed=cfg.model.seed)
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


class GRPOTrainer:
    def __init__(self, config: RLConfig) -> None:
        self.config = cfg = config
        if cfg.rollout.temperature <= 0:
            raise ValueError(f"rollout.temperature ({cfg.rollout.temperature}) must be > 0 for RL: training "
                             "log-probs are taken at the sampling temperature")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        model_path, data_path, eval_path, self.warmup_path = _resolve_paths(cfg)
        dtype = getattr(torch, cfg.model.dtype)
        self.model = from_pretrained(model_path, dtype=dtype, device=cfg.train.device)
        self.tokenizer = Tokenizer.from_pretrained(model_path, eos_token_ids=self.model.config.eos_token_id or None)
        self.llm = LLM(model=self.model, tokenizer=self.tokenizer, kv_cache_memory=cfg.rollout.kv_cache_memory_mb << 20,
                       max_num_batched_tokens=cfg.rollout.max_num_batched_tokens, seed=cfg.train.seed)
        template = None
        if cfg.data.apply_chat_template and self.tokenizer.chat_template is not None:
            template = functools.partial(self.tokenizer.apply_chat_template, add_generation_prompt=True)
        self._template = template
        data_cfg = PromptDataConfig(path=data_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
                                    shuffle=cfg.data.shuffle, seed=cfg.train.seed)
        self.dataset = PromptDataset.from_config(data_cfg, apply_chat_template=template)
        self.eval_items: list[PromptItem] = []
        if eval_path:
            eval_cfg = PromptDataConfig(path=eval_path, prompt_key=cfg.data.prompt_key,
                                        answer_key=cfg.data.answer_key, shuffle=False)
            self.eval_items = PromptDataset.from_config(eval_cfg, apply_chat_template=template).take(cfg.data.num_eval)
        self.rewards = RewardComputer(cfg.reward)
        self.loss_fn = PolicyLoss(cfg.loss)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.policy_version = 0
        self.step_count = 0

    # ---- helpers -------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self._template is None)

    def _eos(self) -> list[int]:
        return list(self.tokenizer.eos_token_ids)

    # ---- supervised warm start -----------------------------------------------------------------
    def warm_start(self) -> dict[str, float]:
        """Next-token cross-entropy on (prompt, response) pairs, response tokens only."""
        cfg = self.config.warmup
        if not self.warmup_path or cfg.steps <= 0:
            return {}
        rows = [row for _, row in read_records(self.warmup_path)]
        for i, row in enumerate(rows):
            if "prompt" not in row or "response" not in row:
                raise ValueError(f"{self.warmup_path}: row {i + 1} needs 'prompt' and 'response' keys")
        examples = []
        eos = self._eos()[:1]
        for row in rows:
            text = self._template([{"role": "user", "content": row["prompt"]}]) if self._template else row["prompt"]
            prompt = self.encode_prompt(text)
            response = self.tokenizer.encode(row["response"], add_special_tokens=False) + eos
            examples.append((prompt, response))
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
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
        # The warm-started weights are the RL run's version 0; drop KV cached under the old ones.
        self.llm.reset_prefix_cache()
        return {"warmup/loss_first": losses[0], "warmup/loss_last": sum(losses[-10:]) / len(losses[-10:])}

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy (mean reward) on the held-out prompts."""
        if not self.eval_items:
            return {}
        params = SamplingParams(temperature=0.0, max_tokens=self.config.rollout.max_new_tokens,
                                stop_token_ids=self._eos())
        outs = self.llm.generate([self.encode_prompt(it.text) for it in self.eval_items], params)
        texts = [self.tokenizer.decode(o.outputs[0].token_ids) for o in outs]
        outcomes, _ = self.rewards.compute(texts, [it.answer for it in self.eval_items])
        return {"eval/accuracy": sum(o.score for o in outcomes) / len(outcomes)}

    # ---- one RL step ---------------------------------------------------------------------------
    def rollout(self) -> tuple[list[Sample], dict[str, float]]:
        r = self.config.rollout
        items = self.dataset.take(r.prompts_per_step)
        prompts = [self.encode_prompt(it.text) for it in items]
        params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_tokens=r.max_new_tokens, stop_token_ids=self._eos(),
                                seed=self.config.train.seed * 1_000_003 + self.step_count)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        gen_s = time.perf_counter() - t0
        completions, answers, groups = [], [], []
        for g, (item, prompt, out) in enumerate(zip(items, prompts, outs)):
            if out.error:
                raise ValueError(f"prompt {item.uid} was refused by the engine: {out.error}")
            for c in out.outputs:
                completions.append((prompt, c))
                answers.append(item.answer)
                groups.append(g)
        texts = [self.tokenizer.decode(c.token_ids) for _, c in completions]
        outcomes, reward_stats = self.rewards.compute(texts, answers)
        samples = []
        for (prompt, c), outcome, g in zip(completions, outcomes, groups):
            tokens = prompt + list(c.token_ids)
            p = len(prompt)
            n_resp = len(c.token_ids)
            samples.append(Sample(
                group=g, input_ids=tokens[:-1], targets=tokens[1:],
                loss_mask=[0] * (p - 1) + [1] * n_resp,
                behavior_logprobs=[0.0] * (p - 1) + list(c.logprobs),
                policy_versions=[-1] * (p - 1) + list(c.policy_versions),
                reward=outcome.score, response_len=n_resp))
        num_tokens = sum(s.response_len for s in samples)
        metrics = {
            "reward/mean": sum(s.reward for s in samples) / len(samples),
            "reward/std": torch.tensor([s.reward for s in samples]).std().item() if len(samples) > 1 else 0.0,
            "reward/failed": reward_stats.num_failed,
            "response_length/mean": num_tokens / len(samples),
            "tokens/total": sum(len(s.input_ids) + 1 for s in samples),
            "response_length/max": max(s.response_len for s in samples),
            "perf/rollout_tokens_per_s": num_tokens / gen_s,
            "perf/rollout_s": gen_s,
        }
        return samples, metrics

    def train_on(self, samples: list[Sample]) -> dict[str, float]:
        cfg = self.config
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups = torch.tensor([s.group for s in samples])
        metrics: dict[str, float] = {}
        if cfg.rollout.dynamic_sampling:
            kept = filter_uniform_groups(rewards, groups)
            metrics["rollout/dropped_groups"] = kept.num_dropped_groups
            keep = kept.keep.tolist()
            samples = [s for s, k in zip(samples, keep) if k]
            if not samples:
                return metrics
            rewards, groups = rewards[kept.keep], groups[kept.keep]
        advantages = compute_advantages(rewards, groups, config=cfg.advantage)
        normalizer = compute_loss_normalizer([s.response_len for s in samples],
                                             token_sum_constant=cfg.rollout.max_new_tokens)
        plan = plan_micro_batches([len(s.input_ids) for s in samples],
                                  max_tokens_per_micro_batch=cfg.train.micro_batch_tokens)
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        per_mb = []
        for indices in plan.micro_batches[0]:
            if not indices:
                continue
            batch = build_packed_batch(
                indices, token_ids=[s.input_ids for s in samples],
                per_token={"targets": [s.targets for s in samples], "loss_mask": [s.loss_mask for s in samples],
                           "behavior": [s.behavior_logprobs for s in samples]},
                per_sample={"advantages": advantages})
            v = batch.values
            h = self.model.hidden_states(batch.input_ids, positions=batch.positions, cu_seqlens=batch.cu_seqlens)
            lp, ent = self.model.token_logprobs(h, v["targets"], temperature=cfg.rollout.temperature)
            out = self.loss_fn(logprobs=lp, advantages=v["advantages"].float(), loss_mask=v["loss_mask"],
                               seq_ids=batch.seq_ids, num_seqs=batch.num_seqs, normalizer=normalizer,
                               behavior_logprobs=v["behavior"].float(), entropy=ent)
            out.loss.backward()
            per_mb.append({**out.metrics, "loss": out.loss.detach()})
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t0
        self.policy_version += 1
        t1 = time.perf_counter()
        # Colocated: the engine already reads these tensors; publishing is a version bump.
        self.llm.update_weights(version=self.policy_version)
        metrics.update({f"train/{k}": v for k, v in reduce_metrics(per_mb).items()})
        metrics.update({
            "train/grad_norm": float(grad_norm),
            "train/micro_batches": len(per_mb),
            "perf/train_tokens_per_s": sum(len(s.input_ids) for s in samples) / train_s,
            "perf/train_s": train_s,
            "perf/weight_sync_s": time.perf_counter() - t1,
        })
        return metrics

    def step(self) -> dict[str, float]:
        samples, metrics = self.rollout()
        metrics.update(self.train_on(samples))
        self.step_count += 1
        metrics["step"] = self.step_count
        metrics["policy_version"] = self.policy_version
        return metrics

    def close(self) -> None:
        self.rewards.close()
