"""For one batch, the loss and its gradients do not depend on how the batch is split: micro-batch
token budgets, packing on or off, one data-parallel rank or two. Real model, `ParallelTrainer`, the
shared `build_micro_batches` + `StepLoss` the trainer group uses (fp32, <= 1e-6 relative); and the
single-process path (`run_micro_batches`, what `GRPOTrainer` runs) gives the same loss and gradients.
The same holds with a KL term toward a frozen reference (`FrozenPolicy`, sharded like the trainer)."""

import os

import torch

from rl_engine.losses import ImportanceSamplingConfig, PolicyLoss, PolicyLossConfig, compute_loss_normalizer
from rl_engine.policy import OptimizerConfig, ParallelGroups, ParallelTrainer, from_pretrained
from rl_engine.policy.frozen import FrozenPolicy
from rl_engine.launch.gloo import spawn
from rl_engine.policy.presets import write_preset_checkpoint
from rl_engine.rl_step import (StepLoss, attach_logprobs, build_micro_batches, forward_logprobs, make_sample,
                               run_micro_batches)

LOSS = PolicyLossConfig(agg="seq-mean-token-mean", clip_high=0.28, dual_clip=3.0, entropy_coef=0.01,
                        importance_sampling=ImportanceSamplingConfig(mode="truncate", truncate_cap=1.5))
LOSS_KL = PolicyLossConfig(agg="seq-mean-token-mean", clip_high=0.28, kl_coef=0.1, kl_estimator="k3",
                           importance_sampling=ImportanceSamplingConfig(mode="truncate", truncate_cap=1.5))
WHOLE = {"budget": 100_000, "pack": True}  # the reference: the whole batch in one micro-batch
SPLITS = {"packed_64": {"budget": 64, "pack": True}, "unpacked": {"budget": 100_000, "pack": False}}
TOL = 1e-6


def batch(vocab: int):
    """12 samples of uneven lengths; behavior log-probs off the policy, so importance weights vary."""
    gen = torch.Generator().manual_seed(3)
    samples = []
    for i in range(12):
        p, r = int(torch.randint(3, 12, (1,), generator=gen)), int(torch.randint(1, 14, (1,), generator=gen))
        tokens = torch.randint(5, vocab, (p + r,), generator=gen).tolist()
        samples.append(make_sample(prompt_ids=tokens[:p], response_ids=tokens[p:], group=i // 4, reward=0.0,
                                   logprobs=(-3.0 - torch.rand(r, generator=gen)).tolist(), policy_versions=[0] * r))
    return samples, torch.randn(len(samples), generator=gen)


def loss_and_grads(trainer: ParallelTrainer, *, budget: int, pack: bool,
                   ref: FrozenPolicy | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    g = trainer.groups
    samples, advantages = batch(trainer.config.vocab_size)
    mbs = build_micro_batches(samples, advantages, micro_batch_tokens=budget, temperature=0.9, dp_size=g.dp_size,
                              dp_rank=g.dp_rank, pack=pack)
    if ref is not None:
        attach_logprobs(mbs, ref.forward_logprobs(mbs), key="ref")
    normalizer = compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=13)
    losses = trainer.runner.run(mbs, StepLoss(PolicyLoss(LOSS if ref is None else LOSS_KL), normalizer))
    trainer.optimizer.finish_grad_sync()
    loss = torch.tensor([float(sum(losses))], dtype=torch.float64)
    grads = {n: p.main_grad.clone() for n, p in trainer.chunks[0].named_parameters()}
    if g.dp_size > 1:  # the gradient of the batch = sum of the ranks' shares (normalisers are global)
        torch.distributed.all_reduce(loss)
        for t in grads.values():
            torch.distributed.all_reduce(t)
    trainer.optimizer.zero_grad()
    return float(loss), grads


def _trainer(weights: str) -> ParallelTrainer:
    return ParallelTrainer.from_pretrained(weights, groups=ParallelGroups.build(), optim=OptimizerConfig(lr=1e-3))


def _dp2(rank: int, world: int, weights: str, out: str, ref_weights: str | None = None) -> None:
    trainer = _trainer(weights)
    ref = None if ref_weights is None else FrozenPolicy.from_pretrained(ref_weights, groups=trainer.groups)
    results = {name: loss_and_grads(trainer, **split, ref=ref) for name, split in SPLITS.items()}
    if rank == 0:
        torch.save(results, os.path.join(out, "dp2.pt"))


def _close(a: tuple[float, dict], b: tuple[float, dict]) -> tuple[float, float]:
    loss_rel = abs(a[0] - b[0]) / abs(b[0])
    scale = max(t.abs().max().item() for t in b[1].values())
    grad_rel = max((a[1][k] - b[1][k]).abs().max().item() for k in b[1]) / scale
    return loss_rel, grad_rel


def test_loss_and_gradients_do_not_depend_on_the_split(tmp_path):
    weights = write_preset_checkpoint("tiny", str(tmp_path / "weights"), seed=1)
    trainer = _trainer(weights)
    reference = loss_and_grads(trainer, **WHOLE)
    assert abs(reference[0]) > 1e-3 and all(t.abs().max() > 0 for t in reference[1].values())
    samples, advantages = batch(trainer.config.vocab_size)
    counts = {name: len(build_micro_batches(samples, advantages, micro_batch_tokens=s["budget"], temperature=1.0,
                                            pack=s["pack"])) for name, s in {"whole": WHOLE, **SPLITS}.items()}
    assert counts == {"whole": 1, "packed_64": counts["packed_64"], "unpacked": 12} and counts["packed_64"] >= 3
    spawn(_dp2, 2, weights, str(tmp_path))
    dp2 = torch.load(tmp_path / "dp2.pt")
    cases = {f"dp1_{name}": loss_and_grads(trainer, **split) for name, split in SPLITS.items()}
    cases.update({f"dp2_{name}": result for name, result in dp2.items()})

    # The single-process trainer's path: a plain model, .grad accumulated by run_micro_batches.
    model = from_pretrained(weights)
    samples, advantages = batch(model.config.vocab_size)
    loss = StepLoss(PolicyLoss(LOSS), compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=13))
    run_micro_batches(model, build_micro_batches(samples, advantages, micro_batch_tokens=64, temperature=0.9), loss)
    cases["single_process_packed_64"] = (loss.metrics()["loss"], {n: p.grad for n, p in model.named_parameters()})

    for name, result in cases.items():
        loss_rel, grad_rel = _close(result, reference)
        print(f"{name}: loss rel diff {loss_rel:.1e}, grad rel diff {grad_rel:.1e}")
        assert loss_rel <= TOL and grad_rel <= TOL, name


def test_with_kl_to_a_reference_the_split_still_does_not_matter(tmp_path):
    weights = write_preset_checkpoint("tiny", str(tmp_path / "weights"), seed=1)
    ref_weights = write_preset_checkpoint("tiny", str(tmp_path / "ref"), seed=2)
    trainer = _trainer(weights)
    ref = FrozenPolicy.from_pretrained(ref_weights, groups=trainer.groups)
    reference = loss_and_grads(trainer, **WHOLE, ref=ref)
    without_kl = loss_and_grads(trainer, **WHOLE)
    assert abs(reference[0] - without_kl[0]) > 1e-2  # the KL term is there, and large
    spawn(_dp2, 2, weights, str(tmp_path), ref_weights)
    dp2 = torch.load(tmp_path / "dp2.pt")
    cases = {f"dp1_{name}": loss_and_grads(trainer, **split, ref=ref) for name, split in SPLITS.items()}
    cases.update({f"dp2_{name}": result for name, result in dp2.items()})
    model, ref_model = from_pretrained(weights), from_pretrained(ref_weights)
    samples, advantages = batch(model.config.vocab_size)
    mbs = build_micro_batches(samples, advantages, micro_batch_tokens=64, temperature=0.9)
    attach_logprobs(mbs, forward_logprobs(ref_model, mbs), key="ref")
    loss = StepLoss(PolicyLoss(LOSS_KL), compute_loss_normalizer([s.response_len for s in samples],
                                                                  token_sum_constant=13))
    run_micro_batches(model, mbs, loss)
    cases["single_process_packed_64"] = (loss.metrics()["loss"], {n: p.grad for n, p in model.named_parameters()})
    for name, result in cases.items():
        loss_rel, grad_rel = _close(result, reference)
        print(f"{name}: loss rel diff {loss_rel:.1e}, grad rel diff {grad_rel:.1e}")
        assert loss_rel <= TOL and grad_rel <= TOL, name
