"""Shared-prefix training under tensor + sequence, pipeline and data parallelism:
in each layout (two gloo processes, `ParallelTrainer`, fp32) the shared-prefix micro-batches give the
unshared ones' loss, gradients and log-probs (<= 1e-5), and the loss equals the single process's."""

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
from rl_engine.rl_step import StepLoss, build_micro_batches, make_sample

LAYOUTS = {"tp2_sp": {"tp": 2, "sp": True}, "pp2": {"pp": 2}, "dp2": {}}
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
    mbs = build_micro_batches(data, advantages, micro_batch_tokens=100_000, temperature=0.9, dp_size=g.dp_size,
                              dp_rank=g.dp_rank, shared_prefix_min_group=2 if shared else None)
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
            grads[n] = comm.all_reduce(p.main_grad.clone(), g.dp_group)  # the batch's = sum of the dp shares
            if getattr(p, "tp_partial_grad", False):  # a share of the tokens (sp) or heads: sum over tp
                grads[n] = comm.all_reduce(grads[n], g.tp_group)
    trainer.optimizer.zero_grad()
    return float(loss), grads, logprobs


def _worker(rank: int, world: int, weights: str, out: str) -> None:
    for name, spec in LAYOUTS.items():
        groups = ParallelGroups.build(tp=spec.get("tp", 1), pp=spec.get("pp", 1),
                                      sequence_parallel=spec.get("sp", False))
        trainer = ParallelTrainer(MODELS["dense"], groups=groups, optim=OptimizerConfig(**OPTIM), hf_path=weights)
        loss_s, grads_s, lp_s = run(trainer, shared=True)
        loss_u, grads_u, lp_u = run(trainer, shared=False)
        scale = max(t.abs().max().item() for t in grads_u.values())
        write_json(os.path.join(out, f"{name}_{rank}.json"), {
            "loss_shared": loss_s, "loss_unshared": loss_u, "grad_scale": scale,
            "grad_rel_diff": max((grads_s[n] - grads_u[n]).abs().max().item() for n in grads_u) / scale,
            "logprobs_shared": lp_s, "logprobs_unshared": lp_u})


def test_shared_prefix_matches_unshared_in_every_layout(tmp_path):
    weights = write_weights(str(tmp_path / "dense"), "dense")
    single = ParallelTrainer(MODELS["dense"], groups=ParallelGroups.build(), optim=OptimizerConfig(**OPTIM),
                             hf_path=weights)
    reference, _, lp_single = run(single, shared=False)
    assert abs(reference) > 1e-3 and len(lp_single) > 0
    spawn(_worker, 2, weights, str(tmp_path))
    for name in LAYOUTS:
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
