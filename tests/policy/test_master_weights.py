"""`MasterWeightsAdamW`, the single-process trainer's optimizer: a bf16 model keeps fp32 master weights
and AdamW state, so updates below bf16's resolution accumulate instead of rounding away; the weights are
fp32 `torch.optim.AdamW`'s rounded to bf16, and its state dict resumes exactly. An fp32 model is plain
`torch.optim.AdamW`. Its state dict holds the live masters (no second fp32 copy per checkpoint), and a
state of another model is refused, on resume as a `ResumeError`."""

from __future__ import annotations

import pytest
import torch

from rl_engine.policy.optimizer import MasterWeightsAdamW
from rl_engine.trainer import ResumeError, _load_optimizer

LR, WD, STEPS = 1e-4, 0.01, 100


def _start() -> torch.Tensor:
    # Weights in [0.5, 2): half a bf16 ulp there is 2^-9..2^-8 (0.002-0.004), far above one Adam step
    # (at most about 3.2 lr = 3.2e-4 with betas (0.9, 0.999)), far below STEPS steps of ~lr (0.01).
    return torch.linspace(0.5, 1.99, 96).to(torch.bfloat16)


def _grads(steps: int) -> list[torch.Tensor]:
    """A fixed sign per element (the updates add up) with noise, as bf16 gradients would come."""
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(96, generator=gen) < 0.5, -1.0, 1.0)
    return [(sign * (1 + 0.5 * torch.rand(96, generator=gen))).to(torch.bfloat16) for _ in range(steps)]


def _run(opt, param: torch.Tensor, grads: list[torch.Tensor]) -> None:
    for g in grads:
        param.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_bf16_updates_below_resolution_accumulate_as_fp32_adamw_rounded():
    grads = _grads(STEPS)
    plain = _start().requires_grad_()
    _run(torch.optim.AdamW([plain], lr=LR, weight_decay=WD), plain, grads)
    assert torch.equal(plain.detach(), _start())  # the failure fixed here: every update rounded away

    param = _start().requires_grad_()
    opt = MasterWeightsAdamW([param], lr=LR, weight_decay=WD)
    _run(opt, param, grads)
    reference = _start().float().requires_grad_()
    _run(torch.optim.AdamW([reference], lr=LR, weight_decay=WD), reference, [g.float() for g in grads])
    assert torch.equal(opt.masters[0], reference.detach())  # the same fp32 arithmetic, op for op
    assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), reference.detach().to(torch.bfloat16))
    assert bool((param.detach() != _start()).all())  # every weight moved by ~STEPS * LR
    assert all(t.dtype == torch.float32 for t in opt.inner.state[opt.masters[0]].values() if t.dim() > 0)


def test_clip_uses_fp32_gradients_and_state_dict_resumes_exactly():
    grads = _grads(20)
    whole = _start().requires_grad_()
    opt = MasterWeightsAdamW([whole], lr=LR, weight_decay=WD)
    for g in grads:
        whole.grad = g.clone()
        norm = opt.clip_grad_norm_(1.0)
        assert norm == torch.linalg.vector_norm(g.float()) and whole.grad is None
        opt.step()
        opt.zero_grad()

    first = _start().requires_grad_()
    opt1 = MasterWeightsAdamW([first], lr=LR, weight_decay=WD)
    for g in grads[:8]:
        first.grad = g.clone()
        opt1.clip_grad_norm_(1.0)
        opt1.step()
        opt1.zero_grad()
    state = opt1.state_dict()
    resumed = first.detach().clone().requires_grad_()  # what model.pt holds: the bf16 weights
    opt2 = MasterWeightsAdamW([resumed], lr=LR, weight_decay=WD)
    opt2.load_state_dict(state)
    for g in grads[8:]:
        resumed.grad = g.clone()
        opt2.clip_grad_norm_(1.0)
        opt2.step()
        opt2.zero_grad()
    assert torch.equal(opt2.masters[0], opt.masters[0]) and torch.equal(resumed.detach(), whole.detach())


def test_fp32_parameters_are_their_own_masters():
    param = torch.nn.Parameter(torch.linspace(-1, 1, 8))
    opt = MasterWeightsAdamW([param], lr=LR)
    assert opt.masters[0] is param and "master_weights" not in opt.state_dict()


def test_micro_batch_gradients_add_up_in_fp32():
    """1 + 8 micro-batches of 2^-9: in bf16 each small one rounds away against the 1 (the ulp at 1 is
    2^-7), so the sum would stay 1.0; moved into the master after each backward they add up exactly."""
    micro = [1.0] + [2.0 ** -9] * 8
    summed = {}
    for accumulate in (False, True):
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        opt = MasterWeightsAdamW([p], lr=LR)
        for g in micro:
            (p * torch.tensor(g, dtype=torch.bfloat16)).sum().backward()
            if accumulate:
                opt.accumulate_grads()
        opt.clip_grad_norm_(1e9)  # moves what is left, as step() would
        summed[accumulate] = opt.masters[0].grad
    assert torch.equal(summed[False], torch.ones(4))  # summed in bf16 by autograd: the small ones lost
    assert torch.equal(summed[True], torch.full((4,), 1.0 + 8 * 2.0 ** -9))


def test_state_dict_holds_the_masters_without_copying_them():
    param = _start().requires_grad_()
    opt = MasterWeightsAdamW([param], lr=LR)
    saved = opt.state_dict()["master_weights"]
    assert len(saved) == 1 and saved[0].data_ptr() == opt.masters[0].data_ptr()  # no second fp32 copy
    assert saved[0].dtype == torch.float32 and not saved[0].requires_grad


def _bf16_params(n: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(_start()) for _ in range(n)]


def test_state_of_another_model_is_refused_before_anything_is_loaded(tmp_path):
    two = MasterWeightsAdamW(_bf16_params(2), lr=LR)
    one_param = _bf16_params(1)
    one = MasterWeightsAdamW(one_param, lr=LR)
    before = one.masters[0].clone()
    with pytest.raises(ValueError, match="holds 2 fp32 master weights, this model has 1 non-fp32 parameters"):
        one.load_state_dict(two.state_dict())  # zip() over the masters used to load the first and drop the rest
    state = two.state_dict()
    state["master_weights"] = state["master_weights"][:1]  # the counts agree with `one`, torch's groups do not
    with pytest.raises(ValueError):
        one.load_state_dict(state)
    assert torch.equal(one.masters[0], before)

    # On resume both are a ResumeError naming the checkpoint and the counts.
    torch.save(two.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(ResumeError, match=r"cannot resume from .*optimizer\.pt does not fit this model's optimizer: "
                                          r"the optimizer state holds 2 fp32 master weights, this model has 1"):
        _load_optimizer(one, str(tmp_path))
    torch.save(state, tmp_path / "optimizer.pt")
    with pytest.raises(ResumeError, match="does not fit this model's optimizer: loaded state dict contains a "
                                          "parameter group that doesn't match the size of optimizer's group"):
        _load_optimizer(one, str(tmp_path))
