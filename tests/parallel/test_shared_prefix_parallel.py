"""Shared-prefix training under tensor + sequence, pipeline, data and expert parallelism: in each
layout (two gloo processes, `ParallelTrainer`, fp32) the shared-prefix micro-batches give the
unshared ones' loss, gradients and log-probs (<= 1e-5), and the loss equals the single process's.
The MoE model has no router aux / z loss here: those count a shared prompt's tokens once."""

import dataclasses
import json
import os

import torch

from parallel_helpers import MODELS, OPTIM, write_json, write_weights
from rl_engine.launch.gloo import spawn
from rl_engine.losses import PolicyLoss, PolicyLossConfig, compute_loss_normalizer
from rl_engine.policy import comm
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import ParallelGroups
from rl_engine.policy.parallel_trainer import ParallelTrainer
from rl_engine.rl_step import StepLoss, build_micro_batches, make_sample, micro_batch_count

LAYOUTS = {"tp2_sp": {"tp": 2, "sp": True}, "pp2": {"pp": 2}, "dp2": {}, "ep2": {"ep": 2, "kind": "moe"}}
# Router losses count tokens (a shared prompt's once); without them MoE gradients are per token.
CONFIGS = {"dense": MODELS["dense"],
           "moe": dataclasses.replace(MODELS["moe"], router_aux_loss_coef=0.0, router_z_loss_coef=0.0)}
LOSS = PolicyLossConfig(agg="seq-mean-token-mean", clip_high=0.28, entropy_coef=0.01)
TOL = 1e-5


def samples():
    """Groups of 3 samples (mixed prompt and response lengths) and a lone one-token sample making
    every micro-batch's token count even in both layouts (sequence parallelism splits it over tp=2):
    unshared minus shared is sum (n - 1)(P - 1), even for n = 3."""
    gen = torch.Generator().manual_seed(5)
    vocab = MODELS["dense"].vocab_size
    out = []
    for g in range(4):
        prompt = torch.randint(0, vocab, (int(torch.randint(2, 30, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(3):
            r = int(torch.randint(1, 12, (1,), generator=gen))
            out.append(make_sample(prompt_ids=prompt, response_ids=torch.randint(0, vocab, (r,), generator=gen).tolist(),
                                   group=g, reward=0.0, logprobs=(-2.0 - torch.rand(r, generator=gen)).tolist(),
                                   policy_versions=[0] * r))
    if sum(len(s.input_ids) for s in out) % 2:
        out.append(make_sample(prompt_ids=[3], response_ids=[4], group=4, reward=0.0, logprobs=[-1.0],
                               policy_versions=[0]))
    return out, torch.randn(len(out), generator=gen)


def run(trainer: ParallelTrainer, *, shared: bool) -> tuple[float, dict, dict]:
    g = trainer.groups
    data, advantages = samples()
    share = 2 if shared else None
    pad = micro_batch_count(data, micro_batch_tokens=100_000, dp_size=g.dp_size, pack=True,
                            shared_prefix_min_group=share) if g.ep_size > 1 else None  # ep ranks in lockstep
    mbs = build_micro_batches(data, advantages, micro_batch_tokens=100_000, temperature=0.9, dp_size=g.dp_size,
                              dp_rank=g.dp_rank, shared_prefix_min_group=share, pad_to_count=pad)
    assert all((mb.attention is not None) == shared for mb in mbs)
    assert all(mb.num_tokens % 2 == 0 for mb in mbs)
    normalizer = compute_loss_normalizer([s.response_len for s in data], token_sum_constant=12)
    logprobs = {}
    for mb, result in zip(mbs, trainer.forward_logprobs(mbs)):  # last stage only
        mask = mb.loss_inputs["loss_mask"]
        for s, pos, lp in zip(mb.loss_inputs["sample"][mask].tolist(), mb.positions[mask].tolist(),
                              result[0][mask].tolist()):
            logprobs[f"{s},{pos}"] = lp
    losses = trainer.runner.run(mbs, StepLoss(PolicyLoss(LOSS), normalizer))
    trainer.optimizer.finish_grad_sync()
    loss = torch.tensor([float(sum(losses)) if losses and g.tp_rank == 0 else 0.0], dtype=torch.float64)
    for group in (g.dp_group, g.pp_group, g.tp_group):
        loss = comm.all_reduce(loss, group)
    grads = {}
    for c in trainer.chunks:
        for n, p in c.named_parameters():
            # the batch's = sum of the dp shares (an expert's: over the ranks holding it)
            grads[n] = comm.all_reduce(p.main_grad.clone(), g.edp_group if getattr(p, "is_expert", False)
                                       else g.dp_group)
            if getattr(p, "tp_partial_grad", False):  # a share of the tokens (sp) or heads: sum over tp
                grads[n] = comm.all_reduce(grads[n], g.tp_group)
    trainer.optimizer.zero_grad()
    return float(loss), grads, logprobs


def _trainer(kind: str, weights: dict[str, str], **layout) -> ParallelTrainer:
    return ParallelTrainer(CONFIGS[kind], groups=ParallelGroups.build(**layout), optim=OptimizerConfig(**OPTIM),
                           hf_path=weights[kind])


def _worker(rank: int, world: int, weights: dict[str, str], out: str) -> None:
    for name, spec in LAYOUTS.items():
        trainer = _trainer(spec.get("kind", "dense"), weights, tp=spec.get("tp", 1), pp=spec.get("pp", 1),
                           ep=spec.get("ep", 1), sequence_parallel=spec.get("sp", False))
        loss_s, grads_s, lp_s = run(trainer, shared=True)
        loss_u, grads_u, lp_u = run(trainer, shared=False)
        scale = max(t.abs().max().item() for t in grads_u.values())
        write_json(os.path.join(out, f"{name}_{rank}.json"), {
            "loss_shared": loss_s, "loss_unshared": loss_u, "grad_scale": scale,
            "grad_rel_diff": max((grads_s[n] - grads_u[n]).abs().max().item() for n in grads_u) / scale,
            "logprobs_shared": lp_s, "logprobs_unshared": lp_u})


def test_shared_prefix_matches_unshared_in_every_layout(tmp_path):
    weights = {kind: write_weights(str(tmp_path / kind), kind) for kind in CONFIGS}
    single = {kind: run(_trainer(kind, weights), shared=False) for kind in CONFIGS}
    assert all(abs(loss) > 1e-3 and len(lp) > 0 for loss, _, lp in single.values())
    spawn(_worker, 2, weights, str(tmp_path))
    for name, spec in LAYOUTS.items():
        reference, _, lp_single = single[spec.get("kind", "dense")]
        ranks = [json.load(open(tmp_path / f"{name}_{rank}.json")) for rank in range(2)]
        for rank, r in enumerate(ranks):
            print(name, rank, {k: v for k, v in r.items() if not k.startswith("logprobs")})
            assert r["grad_scale"] > 0 and r["grad_rel_diff"] <= TOL, (name, rank)
            assert abs(r["loss_shared"] - r["loss_unshared"]) <= TOL * abs(r["loss_unshared"]), (name, rank)
            assert abs(r["loss_unshared"] - reference) <= TOL * abs(reference), (name, rank)
        # Log-probs of every response token over the ranks that compute them (the last stage; each dp
        # rank its own samples), against the single process's.
        for key in ("logprobs_shared", "logprobs_unshared"):
            merged = {}
            for r in ranks if name != "pp2" else ranks[1:]:
                merged.update(r[key])
            assert sorted(merged) == sorted(lp_single), (name, key)
            assert max(abs(merged[k] - lp_single[k]) for k in lp_single) <= TOL, (name, key)
