"""The per-step pieces of the GRPO loop, shared by the single-process `GRPOTrainer` and the actors
(coordinator and trainer group): prompts, sampling parameters, samples, rollout metrics, micro-batches
and the loss over them. Both placements build each of these the same way, through these functions.

Main design choice: the loss over micro-batches is one `StepLoss` object with the signature of
`ParallelTrainer`'s loss function, `(logprobs, entropy, micro_batch) -> this micro-batch's share`,
normalised by global counts fixed before the split. The single-process trainer drives it with
`run_micro_batches(model, ...)` and plain AdamW; the trainer group with `ParallelTrainer.train_step`.
So loss and gradients do not depend on micro-batching, packing or data parallelism in either.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rl_engine.inference import SamplingParams
from rl_engine.inference.speculative import SpeculativeConfig
from rl_engine.kernels.grad_mode import trainer_pass
from rl_engine.losses import (LossNormalizer, PolicyLoss, compute_loss_normalizer, kl_penalty, reduce_metrics,
                               seq_ids_from_cu_seqlens)
from rl_engine.policy.lr_schedule import KLAdaptiveScale, LRSchedule, StepLR
from rl_engine.policy.moe import MoEBlock, RoutingRecord
from rl_engine.policy.pipeline import MicroBatch
from rl_engine.policy.tokenizer import Tokenizer
from rl_engine.rollout.advantages import compute_advantages, filter_uniform_groups
from rl_engine.rollout.data import PromptDataConfig, PromptDataset, PromptItem
from rl_engine.rollout.packing import build_packed_batch, plan_micro_batches
from rl_engine.rollout.shared_prefix import PrefixUnit, build_shared_prefix_batch, find_units, plan_units
from rl_engine.train_config import RLConfig


@dataclass
class Sample:
    """One completion made ready for training. Per-token lists are aligned with the model input
    (prompt + response without its last token): entry t is about predicting token t + 1."""

    group: int
    input_ids: list[int]
    targets: list[int]
    loss_mask: list[int]
    behavior_logprobs: list[float]
    policy_versions: list[int]  # -1 on prompt positions
    reward: float
    response_len: int
    prompt_len: int
    kv_versions: list[int] | None = None  # per response token
    routed_experts: torch.Tensor | None = None  # [len(input_ids), moe layers, k] (routing replay)
    uid: str = ""  # the prompt's dataset uid ("epoch:index")
    num_turns: int = 1  # assistant turns (agentic sessions; 1 for a single-turn completion)
    finish_reason: str = ""  # "stop", "length", or the limit that ended a session
    # Speculative decoding (rollout.speculative): (drafts the target verified, drafts accepted, verify steps)
    spec_counts: tuple[int, int, int] = (0, 0, 0)

    @property
    def response_ids(self) -> list[int]:
        return self.targets[self.prompt_len - 1:]

    @property
    def num_loss_tokens(self) -> int:
        """Tokens the policy sampled (a multi-turn response also holds observation tokens)."""
        return sum(self.loss_mask)


def make_sample(*, prompt_ids: Sequence[int], response_ids: Sequence[int], logprobs: Sequence[float],
                policy_versions: Sequence[int], reward: float, group: int,
                kv_versions: Sequence[int] | None = None, routed_experts: torch.Tensor | None = None,
                uid: str = "", response_mask: Sequence[int] | None = None, num_turns: int = 1,
                finish_reason: str = "", spec_counts: tuple[int, int, int] = (0, 0, 0)) -> Sample:
    """`response_mask` (one entry per response token; None: all 1): 1 on the tokens the policy sampled,
    0 on context inside the response (an agentic session's observations), whose log-prob and version
    entries are placeholders (0.0, -1) that nothing reads."""
    tokens = [*prompt_ids, *response_ids]
    p, r = len(prompt_ids), len(response_ids)
    mask = [1] * r if response_mask is None else [int(bool(m)) for m in response_mask]
    if len(mask) != r:
        raise ValueError(f"response_mask has {len(mask)} entries for {r} response tokens")
    if not any(mask):
        raise ValueError(f"prompt {uid or group}: an empty completion cannot be trained on")
    if routed_experts is not None and routed_experts.shape[0] != p + r - 1:
        raise ValueError(f"routed_experts covers {routed_experts.shape[0]} tokens, the sample feeds {p + r - 1}")
    behavior_logprobs, versions = [0.0] * (p - 1), [-1] * (p - 1)
    behavior_logprobs.extend(map(float, logprobs))  # (map: ~2x a list comprehension's speed, 128 samples a step)
    versions.extend(map(int, policy_versions))
    return Sample(group=group, input_ids=tokens[:-1], targets=tokens[1:], loss_mask=[0] * (p - 1) + mask,
                  behavior_logprobs=behavior_logprobs, policy_versions=versions, reward=float(reward),
                  response_len=r, prompt_len=p, kv_versions=None if kv_versions is None else list(kv_versions),
                  routed_experts=routed_experts, uid=uid, num_turns=num_turns, finish_reason=finish_reason,
                  spec_counts=tuple(spec_counts))


def sample_dump_row(sample: Sample, *, step: int) -> dict[str, Any]:
    """`train.dump_samples`' JSON object of one trained sample; per-token lists aligned with token_ids
    (entry t is about token t: 0 / 0.0 / -1 on context tokens)."""
    return {"step": step, "uid": sample.uid, "token_ids": sample.input_ids + sample.targets[-1:],
            "loss_mask": [0] + sample.loss_mask, "behavior_logprobs": [0.0] + sample.behavior_logprobs,
            "policy_versions": [-1] + sample.policy_versions, "reward": sample.reward,
            "num_turns": sample.num_turns, "finish_reason": sample.finish_reason}


def dump_samples(path: str, samples: Sequence[Sample], *, step: int) -> None:
    """Append the step's trained samples to `path` (JSON lines)."""
    import json

    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps(sample_dump_row(s, step=step)) + "\n")


def truncate_dump(path: str, *, step: int) -> None:
    """At the start of a run: keep the rows of `path` up to step `step` (a resumed run's checkpoint;
    0 for a new run), as the metrics files are cut, so no sample appears twice."""
    import json
    import os

    from rl_engine.run_checkpoint import write_bytes_atomic

    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    write_bytes_atomic(path, b"".join(lines))


# ---- prompts and sampling ------------------------------------------------------------------------
class PromptSource:
    """A run's tokenizer, chat template and prompt sets (train, held-out)."""

    def __init__(self, cfg: RLConfig, *, model_path: str, data_path: str, eval_path: str | None,
                 eos_token_ids: list[int] | None) -> None:
        self.tokenizer = Tokenizer.from_pretrained(model_path, eos_token_ids=eos_token_ids or None)
        self.template = None
        if cfg.data.apply_chat_template and self.tokenizer.chat_template is not None:
            self.template = functools.partial(self.tokenizer.apply_chat_template, add_generation_prompt=True)
        d = cfg.data
        self.dataset = PromptDataset.from_config(
            PromptDataConfig(path=data_path, prompt_key=d.prompt_key, answer_key=d.answer_key, shuffle=d.shuffle,
                             seed=cfg.train.seed), apply_chat_template=self.template)
        self.eval_items: list[PromptItem] = []
        if eval_path:
            eval_cfg = PromptDataConfig(path=eval_path, prompt_key=d.prompt_key, answer_key=d.answer_key, shuffle=False)
            self.eval_items = PromptDataset.from_config(eval_cfg, apply_chat_template=self.template).take(d.num_eval)

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (the chat template brings its own special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=self.template is None)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.tokenizer.eos_token_ids)


def rollout_seed(cfg: RLConfig, step: int) -> int:
    """The sampling seed of step `step` (0-based), mixed with each prompt's uid by `prompt_seed`."""
    return cfg.train.seed * 1_000_003 + step


def prompt_seed(step_seed: int | None, uid: str) -> int | None:
    """The seed of one prompt's request: the step's seed mixed with a stable hash of the prompt uid
    (not Python's salted `hash`). A requeued or replayed request samples the same tokens, whichever
    engine and batch serve it, while different prompts draw independent streams (with one seed per
    step, sample i of every prompt would reuse the same uniforms, correlating the whole batch)."""
    if step_seed is None:
        return None
    h = int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "little")
    return (step_seed * 0x9E3779B97F4A7C15 + h) & 0x7FFF_FFFF_FFFF_FFFF


def sampling_params(cfg: RLConfig, *, step: int, eos_token_ids: Sequence[int]) -> SamplingParams:
    """A step's rollout sampling. No detokenization in the engine: the loop decodes the token ids itself
    (`PromptSource.decode`), as the actors' wire params already ask. Behaviour log-probs on (logprobs=0:
    the sampled tokens'), as the loss needs."""
    r = cfg.rollout
    return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_tokens=r.max_new_tokens, ignore_eos=r.ignore_eos,
                          stop_token_ids=[] if r.ignore_eos else list(eos_token_ids), seed=rollout_seed(cfg, step),
                          detokenize=False, logprobs=0)


def eval_sampling_params(cfg: RLConfig, *, eos_token_ids: Sequence[int]) -> SamplingParams:
    """Greedy decoding for held-out accuracy."""
    return SamplingParams(temperature=0.0, max_tokens=cfg.rollout.max_new_tokens, stop_token_ids=list(eos_token_ids))


def speculative_metrics(samples: Sequence[Sample], speculative: SpeculativeConfig) -> dict[str, float]:
    """`rollout.speculative`'s acceptance over the step's samples (their own counts, so requests of a
    run's HTTP server and other steps' tokens never mix in; a partial rollout's pieces add up):
    acceptance rate = accepted / drafted (drafts the target verified), mean accepted length = tokens a
    verify step emits (accepted drafts + the target's own token), as vLLM defines both. `spec_draft_fixed`
    is 1 for a separate draft model, which keeps its weights while the policy trains (its acceptance
    falls as the policy moves away from it), 0 for drafts that share the policy's weights (MTP) or
    have none (n-gram)."""
    drafts = sum(s.spec_counts[0] for s in samples)
    accepted = sum(s.spec_counts[1] for s in samples)
    verifies = sum(s.spec_counts[2] for s in samples)
    return {"rollout/spec_draft_tokens": drafts, "rollout/spec_accepted_tokens": accepted,
            "rollout/spec_acceptance_rate": accepted / drafts if drafts else 0.0,
            "rollout/spec_mean_accepted_length": 1.0 + accepted / verifies if verifies else 1.0,
            "rollout/spec_draft_fixed": float(speculative.method == "draft_model")}


class DecodeCompileSeconds:
    """rollout.compile_decode: the seconds an engine spent compiling its decode steps (compile seconds of
    every bucket, summed), handed out once: `take()` gives those since the previous `take()`. Each
    placement reports them as `rollout/decode_compile_s` in the step row written after them."""

    def __init__(self, engine) -> None:
        self.engine, self.taken = engine, 0.0

    def take(self) -> float:
        total = sum(self.engine.runner.compile_seconds().values())
        new, self.taken = total - self.taken, total
        return new


def rollout_metrics(samples: Sequence[Sample], *, num_reward_failed: int, rollout_s: float,
                    speculative: SpeculativeConfig | None = None) -> dict[str, float]:
    """Reward and length statistics of every sample generated in a step (kept or dropped), and the
    speculative-decoding acceptance when `speculative` is given."""
    spec = {} if speculative is None else speculative_metrics(samples, speculative)
    if not samples:
        return {"reward/failed": num_reward_failed, "perf/rollout_s": rollout_s, **spec}
    num_tokens = sum(s.response_len for s in samples)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    return {**spec,
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if len(samples) > 1 else 0.0,
        "reward/failed": num_reward_failed,
        "response_length/mean": num_tokens / len(samples),
        "response_length/max": max(s.response_len for s in samples),
        "tokens/total": sum(len(s.input_ids) + 1 for s in samples),
        "perf/rollout_tokens_per_s": num_tokens / rollout_s if rollout_s > 0 else math.nan,
        "perf/rollout_s": rollout_s,
    }


def collect_groups(cfg: RLConfig, *, take: Callable[[int], list[PromptItem]],
                   generate: Callable[[list[PromptItem]], tuple[list[tuple[PromptItem, list[Sample]]], int]],
                   drop: Callable[[PromptItem, str], None] | None = None,
                   ) -> tuple[list[list[Sample]], list[Sample], dict[str, int]]:
    """One step's groups: `take(k)` prompts, `generate(items)` -> ([(item, its scored samples)], number
    of failed rewards) for the items answered. Under dynamic sampling a group whose rewards are all
    equal is dropped (`drop(item, "uniform_rewards")`) and refilled with new prompts, for at most
    `max_refill_rounds` extra rounds. Returns (kept groups, every sample generated, counters)."""
    r = cfg.rollout
    kept: list[list[Sample]] = []
    generated: list[Sample] = []
    stats = {"reward_failed": 0, "dropped": 0, "rounds": 0}
    while True:
        items = take(r.prompts_per_step - len(kept))
        if not items:
            break
        answered, num_failed = generate(items)
        stats["reward_failed"] += num_failed
        generated += [s for _, group in answered for s in group]
        keep = [True] * len(answered)
        if r.dynamic_sampling and answered:
            rewards = torch.tensor([s.reward for _, group in answered for s in group])
            ids = torch.tensor([g for g, (_, group) in enumerate(answered) for _ in group])
            keep = [False] * len(answered)
            for g, varied in zip(ids.tolist(), filter_uniform_groups(rewards, ids).keep.tolist()):
                keep[g] = varied
        for (item, group), ok in zip(answered, keep):
            if ok:
                kept.append(group)
            else:
                stats["dropped"] += 1
                if drop is not None:
                    drop(item, "uniform_rewards")
        if not r.dynamic_sampling or len(kept) >= r.prompts_per_step or stats["rounds"] >= r.max_refill_rounds:
            break
        stats["rounds"] += 1
    for g, group in enumerate(kept):  # group ids: positions in the kept batch
        for s in group:
            s.group = g
    return kept, generated, stats


# ---- micro-batches and the loss ------------------------------------------------------------------
def build_micro_batches(samples: Sequence[Sample], advantages: torch.Tensor, *, micro_batch_tokens: int,
                        temperature: float, dp_size: int = 1, dp_rank: int = 0, pack: bool = True,
                        moe_layers: Sequence[int] | None = None, pad_to_count: int | None = None,
                        shared_prefix_min_group: int | None = None) -> list[MicroBatch]:
    """Data-parallel rank `dp_rank`'s micro-batches of the whole step's `samples` (every rank computes
    the same plan). `pack=False` puts each sample in its own micro-batch. `moe_layers` set: replay the
    engine's routing (`Sample.routed_experts`). `pad_to_count`: append empty-loss micro-batches up to
    that count (expert parallelism runs every rank of an ep group in lockstep). `shared_prefix_min_group`
    set (`shared_prefix_min_group(cfg)`): the samples of a group sharing their prompt, when at least that
    many, are packed as one shared-prefix unit, the prompt computed once (rollout/shared_prefix.py);
    with `pack=False` each unit is its own micro-batch."""
    if shared_prefix_min_group is not None:
        units, per_rank = _shared_prefix_plan(samples, micro_batch_tokens, dp_size, shared_prefix_min_group)
        chosen = [mb for mb in per_rank[dp_rank] if mb]
        if not pack:
            chosen = [[u] for mb in chosen for u in mb]
        out = [_micro_batch(samples, advantages, temperature, moe_layers, units=[units[u] for u in mb])
               for mb in chosen]
    else:
        plan = plan_micro_batches([len(s.input_ids) for s in samples], max_tokens_per_micro_batch=micro_batch_tokens,
                                  dp_size=dp_size)
        groups = [mb for mb in plan.micro_batches[dp_rank] if mb]
        if not pack:
            groups = [[i] for mb in groups for i in mb]
        out = [_micro_batch(samples, advantages, temperature, moe_layers, indices=indices) for indices in groups]
    while pad_to_count is not None and len(out) < pad_to_count:
        out.append(_empty_micro_batch(temperature, moe_layers, samples))
    return out


def micro_batch_count(samples: Sequence[Sample], *, micro_batch_tokens: int, dp_size: int, pack: bool,
                      shared_prefix_min_group: int | None = None) -> int:
    """The largest number of micro-batches any dp rank gets (to pad the others to)."""
    if shared_prefix_min_group is not None:
        _, per_rank = _shared_prefix_plan(samples, micro_batch_tokens, dp_size, shared_prefix_min_group)
        return max(len(mb) if pack else sum(len(g) for g in mb) for mb in per_rank)
    plan = plan_micro_batches([len(s.input_ids) for s in samples], max_tokens_per_micro_batch=micro_batch_tokens,
                              dp_size=dp_size)
    return max(len(mb) if pack else sum(len(g) for g in mb) for mb in plan.micro_batches)


def _micro_batch(samples: Sequence[Sample], advantages: torch.Tensor, temperature: float,
                 moe_layers: Sequence[int] | None, *, indices: list[int] | None = None,
                 units: Sequence[PrefixUnit] | None = None) -> MicroBatch:
    """A packed micro-batch of whole samples (`indices`) or of shared-prefix units (`units`). Under routing
    replay a shared prompt replays its unit's first sample's routing (the engine routes a prompt's tokens
    alike for every sample of its group)."""
    fields = dict(token_ids=[s.input_ids for s in samples],
                  per_token={"targets": [s.targets for s in samples], "loss_mask": [s.loss_mask for s in samples],
                             "behavior": [s.behavior_logprobs for s in samples]},
                  per_sample={"advantages": advantages, "sample": torch.arange(len(samples))},
                  dtypes={"targets": torch.int64, "loss_mask": torch.bool, "behavior": torch.float32})
    if units is None:
        batch = build_packed_batch(indices, **fields)
        rows, attention = [(i, 0, len(samples[i].input_ids)) for i in indices], None
    else:
        batch = build_shared_prefix_batch(units, **fields)
        rows, attention = batch.segments, batch.attention
    v = batch.values
    return MicroBatch(input_ids=batch.input_ids, positions=batch.positions, cu_seqlens=batch.cu_seqlens,
                      targets=v["targets"].long(), temperature=temperature,
                      routing=_replay_routing(samples, rows, moe_layers), attention=attention,
                      loss_inputs={"advantages": v["advantages"].float(), "loss_mask": v["loss_mask"].bool(),
                                   "behavior": v["behavior"].float(), "sample": v["sample"].long()})


def _replay_routing(samples: Sequence[Sample], pieces: Sequence[tuple[int, int, int]],
                    moe_layers: Sequence[int] | None) -> RoutingRecord | None:
    """The engine's routing of the micro-batch's rows: `pieces` lists (sample, start, end) in row order."""
    if moe_layers is None:
        return None
    chosen = []
    for i, start, end in pieces:
        if samples[i].routed_experts is None:
            raise ValueError("routing replay is on but a sample came without routed_experts; the engine must "
                             "record routing (rollout.routing_replay=true on every rollout engine)")
        chosen.append(samples[i].routed_experts[start:end])
    experts = torch.cat(chosen).long()  # [T, moe layers, k]
    return RoutingRecord(mode="replay", topk_ids={layer: experts[:, j].contiguous()
                                                  for j, layer in enumerate(sorted(moe_layers))})


def shared_prefix_min_group(cfg: RLConfig) -> int | None:
    """`train.shared_prefix` for `build_micro_batches`: true shares every group's prompt (a lone sample
    too), auto the prompts of groups of at least 2 samples that share it (rollout.n > 1; the unshared
    layout under model.batch_invariant, whose kernels have no shared-prefix form), false none."""
    mode = cfg.train.shared_prefix
    if mode is True:
        return 1
    if mode == "auto" and cfg.rollout.n > 1 and not cfg.model.batch_invariant:
        return 2
    return None


def _shared_prefix_plan(samples: Sequence[Sample], micro_batch_tokens: int, dp_size: int,
                        min_group: int) -> tuple[list[PrefixUnit], list[list[list[int]]]]:
    units = find_units([s.input_ids for s in samples], [s.prompt_len for s in samples], [s.group for s in samples],
                       min_group=min_group, budget=micro_batch_tokens, dp_size=dp_size)
    return units, plan_units(units, max_tokens_per_micro_batch=micro_batch_tokens, dp_size=dp_size)


def _empty_micro_batch(temperature: float, moe_layers: Sequence[int] | None, samples: Sequence[Sample]) -> MicroBatch:
    """One masked-out token: zero loss and zero policy gradient, but it runs every collective."""
    routing = None
    if moe_layers is not None:
        k = next(s.routed_experts.shape[-1] for s in samples if s.routed_experts is not None)
        routing = RoutingRecord(mode="replay", topk_ids={layer: torch.arange(k)[None] for layer in moe_layers})
    zero = torch.zeros(1, dtype=torch.int64)
    return MicroBatch(input_ids=zero, positions=zero.clone(), cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                      targets=zero.clone(), temperature=temperature, routing=routing,
                      loss_inputs={"advantages": torch.zeros(1), "loss_mask": torch.zeros(1, dtype=torch.bool),
                                   "behavior": torch.zeros(1), "sample": torch.zeros(1, dtype=torch.int64)})


class StepLoss:
    """The policy loss of one optimizer step as a `ParallelTrainer` loss function; it keeps each
    micro-batch's (additive) metrics for `metrics()`. A micro-batch's `loss_inputs` may carry
    "proximal" (the proximal policy's log-probs, see `attach_logprobs`) and "ref" (a frozen
    reference's); without "proximal" the loss is on-policy (one update per step)."""

    def __init__(self, policy_loss: PolicyLoss, normalizer: LossNormalizer) -> None:
        self.policy_loss, self.normalizer = policy_loss, normalizer
        self.per_micro_batch: list[dict[str, torch.Tensor]] = []

    def __call__(self, logprobs: torch.Tensor, entropy: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        li = mb.loss_inputs
        out = self.policy_loss(logprobs=logprobs, advantages=li["advantages"], loss_mask=li["loss_mask"],
                               seq_ids=seq_ids_from_cu_seqlens(mb.cu_seqlens), num_seqs=mb.cu_seqlens.numel() - 1,
                               normalizer=self.normalizer, behavior_logprobs=li["behavior"], entropy=entropy,
                               old_logprobs=li.get("proximal"), ref_logprobs=li.get("ref"))
        metrics = {**out.metrics, "loss": out.loss.detach()}
        if "teacher" in li:  # reverse KL(student || teacher) per response token, on the student's samples
            rkl = torch.where(li["loss_mask"], li["behavior"] - li["teacher"], 0.0)
            metrics["distill_reverse_kl"] = rkl.sum() / self.normalizer.num_tokens
        self.per_micro_batch.append(metrics)
        return out.loss

    def metrics(self) -> dict[str, float]:
        """This process's share: sums over its micro-batches (max for `*_max` keys)."""
        return reduce_metrics(self.per_micro_batch)

    @staticmethod
    def metric_keys(policy_loss: PolicyLoss, *, proximal: bool = False, ref: bool = False,
                    distill: bool = False) -> list[str]:
        """The metric names every call returns (to reduce them across ranks in a fixed order)."""
        one = torch.zeros(1)
        out = policy_loss(logprobs=one, advantages=one, loss_mask=one.bool(), seq_ids=one.long(), num_seqs=1,
                          normalizer=LossNormalizer(num_tokens=1, num_sequences=1), behavior_logprobs=one,
                          entropy=one, old_logprobs=one if proximal else None, ref_logprobs=one if ref else None)
        return sorted([*out.metrics, "loss", *(["distill_reverse_kl"] if distill else [])])


# ---- mini-batches: several updates per step (decoupled PPO) --------------------------------------
def split_mini_batches(samples: Sequence[Sample], advantages: torch.Tensor, *,
                       count: int) -> list[tuple[list[Sample], torch.Tensor]]:
    """The step's samples in `count` contiguous mini-batches of near-equal sample counts (fewer when
    there are fewer samples), each one optimizer update. Contiguous keeps a GRPO group together
    (samples come ordered by group); the order is the same on every rank."""
    count = max(1, min(count, len(samples)))
    bounds = [len(samples) * i // count for i in range(count + 1)]
    return [(list(samples[a:b]), advantages[a:b]) for a, b in zip(bounds, bounds[1:])]


def mini_batch_normalizer(samples: Sequence[Sample], cfg: RLConfig) -> LossNormalizer:
    """A mini-batch's global counts (over all its micro-batches and dp ranks), fixed before its split:
    each update's loss is the mean over its own mini-batch, as one update of the whole batch was."""
    return compute_loss_normalizer([s.num_loss_tokens for s in samples], token_sum_constant=cfg.rollout.max_new_tokens)


def attach_logprobs(micro_batches: Sequence[MicroBatch], logprobs: Sequence[torch.Tensor], *, key: str) -> None:
    """Store per-micro-batch log-probs [T] (of a no-grad pass: the proximal policy, a frozen
    reference) in `loss_inputs[key]`. `logprobs` is empty on ranks that compute no loss (pp stages
    but the last): nothing is stored there."""
    if not logprobs:
        return
    assert len(logprobs) == len(micro_batches), (len(logprobs), len(micro_batches))
    for mb, lp in zip(micro_batches, logprobs):
        mb.loss_inputs[key] = lp.detach().float()


def aggregate_updates(per_update: Sequence[dict[str, float]], *, mini_batches: int) -> dict[str, float]:
    """A step's metrics from its updates' metrics: the mean over updates, the max for `*_max` keys,
    and counts (`response_tokens`, `micro_batches`) summed over one epoch's mini-batches. One update:
    its metrics unchanged (so the default run writes exactly what it did before mini-batches)."""
    if len(per_update) == 1:
        return dict(per_update[0])
    out: dict[str, float] = {}
    for key in per_update[0]:
        values = [float(m[key]) for m in per_update]
        if key.endswith("_max"):
            out[key] = max(values)
        elif key.endswith(("response_tokens", "micro_batches")):
            out[key] = sum(values) * mini_batches / len(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def sequence_kl(plans: Sequence[Sequence[MicroBatch]], offsets: Sequence[int], num_samples: int, *,
                estimator: str) -> torch.Tensor:
    """[num_samples] fp64: each sample's summed per-token KL(proximal || ref) estimate, from the
    micro-batches of `plans` (mini-batch k's samples start at `offsets[k]`) that carry "ref" log-probs
    on this rank; zeros for the others (sum the vectors over ranks that score a loss). The trainer's
    own log-probs, not the engine's: against a reference equal to the policy they give exactly 0,
    where the engine's rounding noise would become whole advantages after the group's std division."""
    out = torch.zeros(num_samples, dtype=torch.float64)
    for micro_batches, offset in zip(plans, offsets):
        for mb in micro_batches:
            li = mb.loss_inputs
            if "ref" in li:
                kl = torch.where(li["loss_mask"], kl_penalty(li["proximal"], li["ref"], estimator=estimator), 0.0)
                out.index_add_(0, li["sample"] + offset, kl.double())
    return out


def apply_kl_reward_penalty(plans: Sequence[Sequence[MicroBatch]], sizes: Sequence[int], rewards: torch.Tensor,
                            groups: torch.Tensor, cfg: RLConfig, *,
                            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """`loss.kl_in_reward` (verl's use_kl_in_reward): each sample's reward loses kl_coef times its
    summed KL(proximal || ref), the group advantages are computed again from the penalised rewards and
    written into the micro-batches of `plans` (mini-batch k holds `sizes[k]` samples). `reduce` sums the
    per-sample KL over the ranks that score a loss (the trainer group: each dp rank holds some samples'
    tokens); the single process passes None. Returns the mean penalty (`train/kl_reward_penalty`)."""
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    kl = sequence_kl(plans, offsets, len(rewards), estimator=cfg.loss.kl_estimator)
    if reduce is not None:
        kl = reduce(kl)
    penalty = cfg.loss.kl_coef * kl.float()
    set_advantages(plans, offsets, compute_advantages(rewards.float() - penalty, groups, config=cfg.advantage))
    return float(penalty.mean())


def apply_distillation(plans: Sequence[Sequence[MicroBatch]], *, coef: float, with_reward: bool) -> None:
    """On-policy distillation: each response token's advantage becomes -coef * (log pi_student -
    log pi_teacher) (plus the task's advantage `with_reward`), the student's log-probs being the
    behavior ones (the policy that sampled). Micro-batches without "teacher" log-probs (pipeline
    stages that compute no loss) are left alone."""
    for micro_batches in plans:
        for mb in micro_batches:
            li = mb.loss_inputs
            if "teacher" in li:
                signal = -coef * torch.where(li["loss_mask"], li["behavior"] - li["teacher"], 0.0)
                li["advantages"] = signal + (li["advantages"] if with_reward else 0.0)


def set_advantages(plans: Sequence[Sequence[MicroBatch]], offsets: Sequence[int], advantages: torch.Tensor) -> None:
    """Replace the per-token advantages of every micro-batch by `advantages[sample]` (after a reward
    penalty that needed the micro-batches' forward passes)."""
    for micro_batches, offset in zip(plans, offsets):
        for mb in micro_batches:
            mb.loss_inputs["advantages"] = advantages[mb.loss_inputs["sample"] + offset].float()


def scored_rows(mb: MicroBatch) -> torch.Tensor | slice | None:
    """The rows of `mb` whose log-probs a loss reads (loss_mask; the proximal, reference and teacher
    log-probs are read on them too): None when that is every row (or none: an empty micro-batch), a
    slice when they are one run (a shared-prefix micro-batch: its prompts first, then the completions;
    a slice selects by views), else their indices."""
    mask = mb.loss_inputs["loss_mask"]
    if bool(mask.all()) or not bool(mask.any()):
        return None
    index = mask.nonzero().squeeze(1)
    start, end = int(index[0]), int(index[-1]) + 1
    return slice(start, end) if end - start == index.numel() else index


def _logprobs(model: torch.nn.Module, mb: MicroBatch, *, skip_unscored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy) [T] of `mb`; `skip_unscored`: the rows no loss reads go only as far as the
    attention of later rows needs them (`CausalLM.hidden_states(rows=...)`), their entries are 0."""
    rows = scored_rows(mb) if skip_unscored else None
    with trainer_pass():  # the no-grad passes take the recorded pass's kernels (bit for bit the same log-probs)
        h = model.hidden_states(mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens, routing=mb.routing,
                                attn_context=mb.attention, rows=rows)
        targets = mb.targets if rows is None else mb.targets[rows]
        lp, ent = model.token_logprobs(h, targets, temperature=mb.temperature)
    if rows is None:
        return lp, ent
    T = mb.targets.shape[0]
    if isinstance(rows, slice):
        return F.pad(lp, (rows.start, T - rows.stop)), F.pad(ent, (rows.start, T - rows.stop))
    return lp.new_zeros(T).index_copy(0, rows, lp), ent.new_zeros(T).index_copy(0, rows, ent)


@torch.no_grad()
def forward_logprobs(model: torch.nn.Module, micro_batches: Sequence[MicroBatch], *,
                     skip_unscored: bool = False) -> list[torch.Tensor]:
    """No-grad log-probs [T] of each micro-batch on one model holding every layer (the single-process
    counterpart of `ParallelTrainer.forward_logprobs`); `skip_unscored`: as in `run_micro_batches`."""
    return [_logprobs(model, mb, skip_unscored=skip_unscored)[0] for mb in micro_batches]


def run_micro_batches(model: torch.nn.Module, micro_batches: Sequence[MicroBatch], loss_fn: StepLoss,
                      after_backward: Callable[[], None] | None = None, *, skip_unscored: bool = False) -> None:
    """Forward and backward over each micro-batch on one model holding every layer (the single-process
    counterpart of `ParallelTrainer.train_step`'s 1F1B run); gradients accumulate in `.grad`, and
    `after_backward()` runs after each micro-batch's backward (the optimizer's fp32 accumulation).
    `skip_unscored` (`train.skip_unscored_rows`): the rows outside every loss term (loss_mask 0: the
    prompt) skip the last layer's attention output and MLP, the final norm and the LM head."""
    moe = [m for m in model.modules() if isinstance(m, MoEBlock)]
    for m in moe:  # router aux losses: a 1 / (number of micro-batches) share each, as ParallelTrainer does
        m.aux_loss_scale = 1.0 / max(1, len(micro_batches))
    for mb in micro_batches:
        lp, ent = _logprobs(model, mb, skip_unscored=skip_unscored)
        loss_fn(lp, ent, mb).backward()
        if after_backward is not None:
            after_backward()


def step_lr(cfg: RLConfig) -> StepLR:
    """The run's lr per RL step: `optim.lr_scheduler` with its warmup, times the KL-adaptive scale."""
    o = cfg.optim
    adaptive = None if o.kl_adaptive_target is None else KLAdaptiveScale(
        target=o.kl_adaptive_target, factor=o.kl_adaptive_factor, min_ratio=o.kl_adaptive_min_ratio,
        up_factor=o.kl_adaptive_up_factor)
    return StepLR(LRSchedule(lr=o.lr, scheduler=o.lr_scheduler, warmup_steps=o.warmup_steps,
                             total_steps=cfg.train.steps, min_lr_ratio=o.min_lr_ratio), adaptive)


def beyond_target_kl(update: int, metrics: dict[str, float], target_kl: float | None) -> bool:
    """`train.target_kl`: whether the step's update number `update` (from 0) is not applied, its own
    forward pass having found the policy further than `target_kl` from the proximal policy (the mean
    k3 `approx_kl` per response token of its mini-batch). The first update is always applied: its
    policy is the proximal one."""
    return target_kl is not None and update > 0 and float(metrics["approx_kl"]) > target_kl


def discard_expert_loads(model: torch.nn.Module) -> None:
    """A skipped update leaves the router's aux-loss-free bias as it was: forget its passes' loads."""
    for m in model.modules():
        if isinstance(m, MoEBlock) and m.tokens_per_expert is not None:
            m.tokens_per_expert.zero_()


def update_expert_bias(model: torch.nn.Module) -> None:
    """After an optimizer step: aux-loss-free router balancing (no-op for dense models)."""
    for m in model.modules():
        if isinstance(m, MoEBlock):
            m.update_expert_bias(None)
