"""Conversions between the engine's and the loop's objects and the wire protocol's messages:
sampling parameters, engine outputs -> GenerateResult, GenerateResult -> samples, samples <->
TrainBatch (flat tensors: a handful of frames per step whatever the batch size)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rl_engine import protocol as P
from rl_engine.inference import RequestOutput, SamplingParams
from rl_engine.inference.sequence import CompletionOutput
from rl_engine.rl_step import Sample, make_sample


def wire_sampling(params: SamplingParams) -> P.WireSamplingParams:
    return P.WireSamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                                max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids),
                                seed=params.seed, ignore_eos=params.ignore_eos)


def engine_sampling(wire: P.WireSamplingParams, *, n: int) -> SamplingParams:
    """Raises ValueError (from SamplingParams) on values a peer should not have sent. A rollout always
    returns behaviour log-probs (logprobs=0: the sampled tokens'), which the loss needs."""
    if not wire.logprobs:
        raise ValueError("WireSamplingParams.logprobs = False: a rollout always returns behaviour log-probs "
                         "(the loss needs them); send logprobs=True")
    return SamplingParams(n=n, temperature=wire.temperature, top_p=wire.top_p, top_k=max(wire.top_k, 0),
                          max_tokens=wire.max_tokens, stop_token_ids=list(wire.stop_token_ids), seed=wire.seed,
                          ignore_eos=wire.ignore_eos, detokenize=False, logprobs=0)


def add_to_engine(engine, request: P.GenerateRequest) -> None:
    """Queue `request` in an `LLMEngine`: a new prompt, or (`request.resume`) a partial rollout to
    continue with the engine's current weights. Raises ValueError for a request it cannot serve."""
    if not request.sample_ids:
        raise ValueError("sample_ids is empty: nothing to generate")
    params = engine_sampling(request.sampling, n=len(request.sample_ids))
    prompt: list[int] | RequestOutput = list(request.prompt_token_ids)
    if request.resume is not None:
        if len(request.resume) != len(request.sample_ids):
            raise ValueError(f"resume has {len(request.resume)} samples for {len(request.sample_ids)} sample ids")
        outputs = [CompletionOutput(index=i, token_ids=s.token_ids.tolist(), text=None,
                                    logprobs=s.behavior_logprobs.tolist(), policy_versions=s.policy_versions.tolist(),
                                    kv_versions=s.kv_versions.tolist(),
                                    finish_reason=s.finish_reason if s.finish_reason in ("stop", "length") else None,
                                    spec_draft_tokens=s.spec_draft_tokens, spec_accepted_tokens=s.spec_accepted_tokens,
                                    spec_verifies=s.spec_verifies)
                   for i, s in enumerate(request.resume)]
        prompt = RequestOutput(request_id=request.request_id, prompt=None, prompt_token_ids=prompt, outputs=outputs,
                               finished=False, sampling_params=params)
    engine.add_request(request.request_id, prompt, params)


def generate_result(request: P.GenerateRequest, out: RequestOutput, *, interrupted: bool = False) -> P.GenerateResult:
    if out.error:
        return P.GenerateResult(request_id=request.request_id, samples=[], error=out.error)
    samples = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        routed = None
        if c.routed_experts is not None:  # [tokens, moe layers, k]; int16 halves the bytes of int32
            routed = torch.tensor(c.routed_experts, dtype=torch.int32)
            if routed.numel() and int(routed.max()) < 2**15:
                routed = routed.to(torch.int16)
        samples.append(P.SampleResult(
            sample_id=request.sample_ids[c.index], token_ids=torch.tensor(c.token_ids, dtype=torch.int64),
            behavior_logprobs=torch.tensor(c.logprobs, dtype=torch.float32),
            policy_versions=torch.tensor(c.policy_versions, dtype=torch.int64),
            kv_versions=torch.tensor(c.kv_versions, dtype=torch.int64), finish_reason=c.finish_reason or "abort",
            routed_experts=routed, spec_draft_tokens=c.spec_draft_tokens, spec_accepted_tokens=c.spec_accepted_tokens,
            spec_verifies=c.spec_verifies))
    return P.GenerateResult(request_id=request.request_id, samples=samples, interrupted=interrupted)


def samples_of(result: P.GenerateResult, *, prompt_ids: Sequence[int], rewards: Sequence[float], group: int,
               uid: str) -> list[Sample]:
    return [make_sample(prompt_ids=prompt_ids, response_ids=s.token_ids.tolist(),
                        logprobs=s.behavior_logprobs.tolist(), policy_versions=s.policy_versions.tolist(),
                        kv_versions=s.kv_versions.tolist(), reward=r, group=group, uid=uid, finish_reason=s.finish_reason,
                        routed_experts=None if s.routed_experts is None else s.routed_experts.clone(),
                        spec_counts=(s.spec_draft_tokens, s.spec_accepted_tokens, s.spec_verifies))
            for s, r in zip(result.samples, rewards)]


def train_batch(samples: Sequence[Sample], advantages: torch.Tensor, *, step: int, policy_version: int,
                weight_targets: dict[str, str] | None = None) -> P.TrainBatch:
    def flat(values: list[list], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([x for v in values for x in v], dtype=dtype)

    routed = None
    if samples and all(s.routed_experts is not None for s in samples):
        routed = torch.cat([s.routed_experts for s in samples])
    return P.TrainBatch(
        step=step, policy_version=policy_version,
        prompt_lens=torch.tensor([s.prompt_len for s in samples], dtype=torch.int64),
        response_lens=torch.tensor([s.response_len for s in samples], dtype=torch.int64),
        token_ids=flat([s.input_ids + s.targets[-1:] for s in samples], torch.int64),
        behavior_logprobs=flat([s.behavior_logprobs[s.prompt_len - 1:] for s in samples], torch.float32),
        policy_versions=flat([s.policy_versions[s.prompt_len - 1:] for s in samples], torch.int64),
        kv_versions=flat([s.kv_versions or [-1] * s.response_len for s in samples], torch.int64),
        advantages=advantages.to(torch.float32).contiguous(), routed_experts=routed,
        weight_targets=dict(weight_targets or {}),
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        groups=torch.tensor([s.group for s in samples], dtype=torch.int64),
        loss_mask=None if all(s.num_loss_tokens == s.response_len for s in samples) else
        flat([s.loss_mask[s.prompt_len - 1:] for s in samples], torch.bool))


def samples_from_batch(batch: P.TrainBatch) -> tuple[list[Sample], torch.Tensor]:
    """The samples (with their rewards and groups when the batch carries them) and their advantages [N]."""
    samples, tok, resp, routed = [], 0, 0, 0
    rewards = [0.0] * len(batch.prompt_lens) if batch.rewards is None else batch.rewards.tolist()
    groups = list(range(len(batch.prompt_lens))) if batch.groups is None else batch.groups.tolist()
    tokens = batch.token_ids.tolist()
    behavior, versions, kv = (batch.behavior_logprobs.tolist(), batch.policy_versions.tolist(),
                              batch.kv_versions.tolist())
    mask = None if batch.loss_mask is None else batch.loss_mask.tolist()
    for i, (p, r) in enumerate(zip(batch.prompt_lens.tolist(), batch.response_lens.tolist())):
        experts = None
        if batch.routed_experts is not None:
            experts = batch.routed_experts[routed:routed + p + r - 1]
            routed += p + r - 1
        samples.append(make_sample(prompt_ids=tokens[tok:tok + p], response_ids=tokens[tok + p:tok + p + r],
                                   logprobs=behavior[resp:resp + r], policy_versions=versions[resp:resp + r],
                                   kv_versions=kv[resp:resp + r], reward=rewards[i], group=groups[i],
                                   routed_experts=experts, response_mask=None if mask is None else mask[resp:resp + r]))
        tok, resp = tok + p + r, resp + r
    return samples, batch.advantages.float().clone()
