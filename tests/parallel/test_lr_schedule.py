"""Learning-rate schedules (`optim.lr_scheduler`, `optim.warmup_steps`, `optim.min_lr_ratio`) against
torch.optim.lr_scheduler, the KL-adaptive scale's rule (rl_games' adaptive schedule), and the
distributed optimizer under a changing lr against torch.optim.AdamW driven by torch's scheduler."""

import math

import pytest
import torch

from parallel_helpers import DENSE, OPTIM, loss_fn, micro_batches, write_weights
from rl_engine.policy import from_pretrained
from rl_engine.policy.lr_schedule import KLAdaptiveScale, LRSchedule, StepLR
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import SINGLE
from rl_engine.policy.parallel_trainer import ParallelTrainer

LR, STEPS = 2e-3, 40


def _torch_lrs(scheduler_fn, steps: int) -> list[float]:
    """The lr torch's scheduler gives each of `steps` steps (read before each optimizer step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = scheduler_fn(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# torch's closed forms and ours agree up to rounding; torch's cosine is the recursive form, whose
# rounding compounds over the steps (~1e-16 relative each): 1e-12 relative is far above that and far
# below any difference in the schedule's shape (a step off is ~1e-2 relative here).
REL = 1e-12


@pytest.mark.parametrize("warmup", [1, 7])
def test_warmup_matches_torch_linear_lr(warmup):
    ours = LRSchedule(lr=LR, warmup_steps=warmup, total_steps=STEPS)
    # LinearLR from 1/W to 1 over W - 1 steps: (s + 1) / W, the first step not wasted at lr 0.
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / warmup, end_factor=1.0,
                                                                 total_iters=max(1, warmup - 1)), warmup)
    assert [ours(s) for s in range(warmup)] == pytest.approx(ref, rel=REL)
    assert all(ours(s) == LR for s in range(warmup, STEPS))  # constant after the warmup
    assert ours(0) == LR / warmup > 0


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
@pytest.mark.parametrize("warmup", [0, 5])
def test_decay_matches_torch_schedulers(warmup, min_ratio):
    decay = STEPS - warmup
    linear = LRSchedule(lr=LR, scheduler="linear", warmup_steps=warmup, total_steps=STEPS, min_lr_ratio=min_ratio)
    cosine = LRSchedule(lr=LR, scheduler="cosine", warmup_steps=warmup, total_steps=STEPS, min_lr_ratio=min_ratio)
    ref_linear = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=min_ratio,
                                                                        total_iters=decay), decay + 3)
    ref_cosine = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=decay,
                                                                                 eta_min=min_ratio * LR), decay + 1)
    assert [linear(warmup + t) for t in range(decay + 3)] == pytest.approx(ref_linear, rel=REL, abs=1e-18)
    assert [cosine(warmup + t) for t in range(decay + 1)] == pytest.approx(ref_cosine, rel=REL, abs=1e-18)
    # Past train.steps (a run extended on resume) the decay stays at its floor.
    assert cosine(STEPS + 5) == pytest.approx(min_ratio * LR, abs=1e-18)
    assert linear(STEPS - 1) > min_ratio * LR  # the last step of the run still trains


def test_kl_adaptive_scale_follows_rl_games_rule():
    target = 0.02
    scale = KLAdaptiveScale(target=target, factor=1.5, min_ratio=0.1)
    seen = [scale.update(kl) for kl in (0.05, 0.05, 0.03, 0.0401, 0.005, 0.011, 0.009, 0.0, 0.0, 1.0, 1.0, 1.0,
                                         1.0, 1.0, 1.0, 1.0)]
    expected = [1 / 1.5, 1 / 1.5 ** 2, 1 / 1.5 ** 2, 1 / 1.5 ** 3, 1 / 1.5 ** 2, 1 / 1.5 ** 2, 1 / 1.5, 1.0, 1.0]
    expected += [1 / 1.5, 1 / 1.5 ** 2, 1 / 1.5 ** 3, 1 / 1.5 ** 4, 1 / 1.5 ** 5, 0.1, 0.1]  # floored at min_ratio
    assert seen == pytest.approx(expected, rel=1e-15)
    step_lr = StepLR(LRSchedule(lr=LR, warmup_steps=2, total_steps=10), scale)
    assert step_lr.lr(0) == pytest.approx(0.5 * LR * 0.1) and step_lr.varies
    restored = StepLR(LRSchedule(lr=LR, warmup_steps=2, total_steps=10),
                      KLAdaptiveScale(target=target, factor=1.5, min_ratio=0.1))
    restored.load_state_dict(step_lr.state_dict())
    assert restored.lr(3) == step_lr.lr(3)
    assert not StepLR(LRSchedule(lr=LR, total_steps=10)).varies
    assert not StepLR(LRSchedule(lr=LR, scheduler="cosine", total_steps=10, min_lr_ratio=1.0)).varies


def test_kl_adaptive_scale_rises_by_its_own_up_factor():
    """`up_factor` below `factor`: down by 1.5 as before, up by 1.1 only (1: never up again)."""
    scale = KLAdaptiveScale(target=0.01, factor=1.5, up_factor=1.1, min_ratio=0.01)
    seen = [scale.update(kl) for kl in (0.05, 0.05, 0.001, 0.001, 0.01, 0.0, 0.05)]
    down2 = 1 / 1.5 ** 2
    expected = [1 / 1.5, down2, down2 * 1.1, down2 * 1.1 ** 2, down2 * 1.1 ** 2, down2 * 1.1 ** 3,
                down2 * 1.1 ** 3 / 1.5]
    assert seen == pytest.approx(expected, rel=1e-15)
    for _ in range(40):  # still capped at 1
        scale.update(0.0)
    assert scale.scale == 1.0
    never_up = KLAdaptiveScale(target=0.01, up_factor=1.0)
    assert [never_up.update(kl) for kl in (0.05, 0.0, 0.0)] == pytest.approx([1 / 1.5] * 3, rel=1e-15)
    with pytest.raises(ValueError, match="up_factor=0.9"):
        KLAdaptiveScale(target=0.01, up_factor=0.9)


def test_an_up_factor_without_the_adaptive_scale_is_refused():
    from rl_engine.config import ConfigError, load_config
    from rl_engine.train_config import RLConfig

    with pytest.raises(ConfigError, match=r"kl_adaptive_up_factor=1.05 .*\(optim.kl_adaptive_target=null\)"):
        load_config(RLConfig, None, ["optim.kl_adaptive_up_factor=1.05"])
    cfg = load_config(RLConfig, None, ["optim.kl_adaptive_up_factor=1.05", "optim.kl_adaptive_target=0.01",
                                       "train.mini_batches_per_step=4"])
    assert cfg.optim.kl_adaptive_up_factor == 1.05


@pytest.mark.parametrize("bad", [dict(scheduler="cosin"), dict(warmup_steps=-1), dict(min_lr_ratio=1.5)])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError, match="lr"):
        LRSchedule(lr=LR, total_steps=10, **bad)


def test_distributed_optimizer_follows_a_changing_lr_as_torch_adamw(tmp_path):
    """Warmup then cosine, set on the ZeRO-1 optimizer before each step, against torch.optim.AdamW
    stepped by torch's own schedulers (weight decay on: it is scaled by the lr too)."""
    weights = write_weights(str(tmp_path / "dense"), "dense")
    wd, warmup, steps = 0.1, 2, 5
    trainer = ParallelTrainer(DENSE, groups=SINGLE, hf_path=weights,
                              optim=OptimizerConfig(**{**OPTIM, "lr": 1e-2, "weight_decay": wd}))
    schedule = LRSchedule(lr=1e-2, scheduler="cosine", warmup_steps=warmup, total_steps=steps, min_lr_ratio=0.1)
    ref = from_pretrained(weights)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=OPTIM["betas"], eps=OPTIM["eps"], weight_decay=wd,
                            foreach=False)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=1e-3)], milestones=[warmup])
    mbs = micro_batches("dense")
    lrs = []
    for step in range(steps):
        trainer.optimizer.lr = schedule(step)
        lrs.append(opt.param_groups[0]["lr"])
        assert trainer.optimizer.lr == pytest.approx(lrs[-1], rel=REL)
        trainer.train_step(mbs, loss_fn)
        opt.zero_grad()
        for mb in mbs:
            h = ref.hidden_states(mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens)
            loss_fn(*ref.token_logprobs(h, mb.targets), mb).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM["clip_grad"])
        opt.step()
        sched.step()
    assert len(set(lrs)) == steps  # the lr changed every step
    ours = dict(trainer.chunks[0].named_parameters())
    # fp32 both sides, the same operations: as test_optimizer's constant-lr parity bound.
    diff = max((ours[n] - p).abs().max().item() for n, p in ref.named_parameters())
    assert diff <= 1e-6, diff
    assert not math.isclose(lrs[0], lrs[-1])
