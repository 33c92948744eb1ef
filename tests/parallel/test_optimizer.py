"""The distributed optimizer in one process: torch.optim.AdamW parity, gradient accumulation,
bf16 parameters with fp32 master weights; a sharded checkpoint loaded into a plain model (export)."""

import math

import pytest
import torch

from parallel_helpers import DENSE, EPS32, OPTIM, adam_sensitivity, loss_fn, micro_batches, write_weights
from rl_engine.kernels.grad_mode import trainer_pass
from rl_engine.policy import CausalLM, from_pretrained
from rl_engine.policy.dist_checkpoint import load_checkpoint
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import SINGLE
from rl_engine.policy.pipeline import MicroBatch
from rl_engine.policy.parallel_trainer import ParallelTrainer


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(str(tmp_path_factory.mktemp("w") / "dense"), "dense")


def _trainer(weights, **kw):
    return ParallelTrainer(DENSE, groups=SINGLE, optim=OptimizerConfig(**{**OPTIM, **kw.pop("optim", {})}),
                           hf_path=weights, **kw)


def _params(trainer):
    return dict(trainer.chunks[0].named_parameters())


def test_dp1_matches_torch_adamw(weights):
    trainer = _trainer(weights, optim=dict(lr=1e-2))
    ref = from_pretrained(weights)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=OPTIM["betas"], eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"], foreach=False)
    mbs = micro_batches("dense")
    for _ in range(3):
        metrics = trainer.train_step(mbs, loss_fn)
        opt.zero_grad()
        total = 0.0
        for mb in mbs:
            h = ref.hidden_states(mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens)
            loss = loss_fn(*ref.token_logprobs(h, mb.targets), mb)
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM["clip_grad"])
        opt.step()
        assert abs(metrics["loss"] - total) <= 1e-6
        assert abs(metrics["grad_norm"] - norm.item()) <= 1e-5 * norm.item()
    assert metrics["grad_norm"] > OPTIM["clip_grad"]  # clipping was exercised
    ours = _params(trainer)
    diff = max((ours[n] - p).abs().max().item() for n, p in ref.named_parameters())
    assert diff <= 1e-6, diff


def _merge(a: MicroBatch, b: MicroBatch) -> MicroBatch:
    cu = torch.cat([a.cu_seqlens, b.cu_seqlens[1:] + a.num_tokens])
    li = {k: torch.cat([a.loss_inputs[k], b.loss_inputs[k]]) for k in ("advantages", "mask")}
    li["normaliser"] = a.loss_inputs["normaliser"]
    return MicroBatch(input_ids=torch.cat([a.input_ids, b.input_ids]), positions=torch.cat([a.positions, b.positions]),
                      cu_seqlens=cu, targets=torch.cat([a.targets, b.targets]), loss_inputs=li)


def _record_grads(trainer: ParallelTrainer) -> list[dict[str, torch.Tensor]]:
    """A copy, per step, of the accumulated fp32 gradients the optimizer step sees (it zeroes them)."""
    seen = []
    step = trainer.optimizer.step

    def recording_step():
        seen.append({n: p.main_grad.clone() for n, p in trainer.chunks[0].named_parameters()})
        return step()

    trainer.optimizer.step = recording_step
    return seen


def _copy_optimizer_state(src: ParallelTrainer, dst: ParallelTrainer) -> None:
    for s, d in zip(src.optimizer.buffers, dst.optimizer.buffers):
        for kind in ("param_data", "master", "exp_avg", "exp_avg_sq"):
            getattr(d, kind).copy_(getattr(s, kind))


def _loss_terms_abs_sum(trainer: ParallelTrainer, mbs: list[MicroBatch]) -> float:
    """sum over tokens of |each term of loss_fn|: the scale against which its fp32 sums round."""
    total = 0.0
    for (lp, ent), mb in zip(trainer.forward_logprobs(mbs), mbs):
        li = mb.loss_inputs
        terms = (lp * li["advantages"]).abs() + 0.01 * ent.abs() + 0.1 * lp.pow(2)
        total += float((terms * li["mask"]).sum() / li["normaliser"])
    return total


def test_gradient_accumulation_does_not_depend_on_the_split(weights):
    """Four micro-batches against the same sequences packed into two: the same gradients up to the
    rounding of another summation order, and the same AdamW steps up to what Adam makes of it."""
    mbs = micro_batches("dense")
    merged = [_merge(mbs[0], mbs[1]), _merge(mbs[2], mbs[3])]
    num_tokens = sum(mb.num_tokens for mb in mbs)
    a, b = _trainer(weights), _trainer(weights)
    grads_a, grads_b = _record_grads(a), _record_grads(b)
    lr, (beta1, beta2), eps = OPTIM["lr"], OPTIM["betas"], OPTIM["eps"]
    for step in range(1, 4):
        # Every step starts both trainers from a's state: the step's rounding can move a parameter
        # by up to ~2 lr (below), and the next gradients would then differ by the Hessian times
        # that, which no rounding bound covers. Checked from equal states, each step's errors stay
        # those of one step instead of compounding over the steps.
        _copy_optimizer_state(a, b)
        loss_scale = _loss_terms_abs_sum(a, mbs)
        la, lb = a.train_step(mbs, loss_fn), b.train_step(merged, loss_fn)
        ga, gb = grads_a[-1], grads_b[-1]

        # Gradients: each element is a sum over the step's tokens (and, for norms and biases, over
        # heads or positions) whose order differs between the splits: per-token terms in another
        # GEMM blocking, then 4 against 2 fp32 adds into main_grad. Two orders of an n-term fp32
        # sum differ by at most ~n * eps32 * sum|terms|; the terms' absolute sum is of the order of
        # the tensor's largest gradient (per-tensor max difference measured at <= 0.25 of this bound
        # over weight/data seeds, 1 and 2 threads, AVX512/AVX2/default kernels). A micro-batch
        # counted twice, or a loss averaged over micro-batches, moves gradients by ~0.1-1 of max|g|.
        grad_bound = {n: num_tokens * EPS32 * g.abs().max().item() for n, g in ga.items()}
        for name, g in ga.items():
            diff = (g - gb[name]).abs().max().item()
            assert diff <= grad_bound[name], f"step {step} {name}: grads differ by {diff:.3g} > {grad_bound[name]:.3g}"
        # The loss is one such sum of per-token terms; the norm moves by at most the norm of the
        # gradient difference, plus its own fp32 sum of squares' rounding (log2(n) eps, pairwise).
        assert abs(la["loss"] - lb["loss"]) <= num_tokens * EPS32 * loss_scale, (la["loss"], lb["loss"])
        flat_a, flat_b = (torch.cat([g.reshape(-1) for g in grads.values()]) for grads in (ga, gb))
        norm_bound = (flat_a - flat_b).norm().item() + math.log2(flat_a.numel()) * EPS32 * la["grad_norm"]
        assert abs(la["grad_norm"] - lb["grad_norm"]) <= norm_bound, (la["grad_norm"], lb["grad_norm"])

        # Parameters, from the gradient bound above (not from this run's measured difference, so
        # this check holds on its own): each moves by lr * u, u = m_hat / (sqrt(v_hat) + eps)
        # (weight decay acts alike on the equal parameters). A clipped-gradient difference delta
        # changes u by at most K * delta / (sqrt(v_hat) + eps): large where |g| is near or below
        # eps (tiny gradients left by cancellation), and |u| <= R in any case, so where a gradient
        # is within its bound of zero its sign may differ between the runs and the parameters by
        # 2 R lr. Plus a few ulps of the parameter and of the update from the step's own rounding.
        (buf_a,), (buf_b,) = a.optimizer.buffers, b.optimizer.buffers
        clip_a, clip_b = (min(1.0, OPTIM["clip_grad"] / (m["grad_norm"] + 1e-6)) for m in (la, lb))
        flat_bound = torch.cat([torch.full((g.numel(),), grad_bound[n]) for n, g in ga.items()])
        delta = clip_a * flat_bound + abs(clip_a - clip_b) * flat_b.abs()
        r, k = adam_sensitivity(beta1, beta2, step)
        sqrt_v_hat = (torch.minimum(buf_a.exp_avg_sq, buf_b.exp_avg_sq) / (1 - beta2 ** step)).sqrt()
        u_bound = torch.clamp(k * delta / (sqrt_v_hat + eps), max=2 * r)
        u_bound[flat_a.abs() <= flat_bound] = 2 * r
        bound = lr * u_bound + 4 * EPS32 * (buf_a.master.abs() + lr)
        excess = (buf_a.master - buf_b.master).abs() - bound
        worst = int(excess.argmax())
        assert excess[worst] <= 0, (f"step {step}: parameter {worst} differs by "
                                    f"{(buf_a.master - buf_b.master)[worst].item():.3g} > {bound[worst].item():.3g}")


def test_bf16_params_keep_fp32_master_and_grads(weights):
    trainer = _trainer(weights, dtype=torch.bfloat16)
    fp32 = _trainer(weights)
    mbs = micro_batches("dense")
    for _ in range(3):
        lb, lf = trainer.train_step(mbs, loss_fn)["loss"], fp32.train_step(mbs, loss_fn)["loss"]
        assert abs(lb - lf) <= 0.05 * abs(lf)
    (buffer,) = trainer.optimizer.buffers
    assert buffer.master.dtype == torch.float32 and buffer.grad.dtype == torch.float32
    assert buffer.param_data.dtype == torch.bfloat16
    # Parameters are the rounded master weights, and the master holds more than bf16 can.
    assert torch.equal(buffer.param_data[: buffer.master.numel()], buffer.master.to(torch.bfloat16))
    assert not torch.equal(buffer.master, buffer.master.to(torch.bfloat16).float())


def test_sharded_checkpoint_loads_into_a_plain_model_and_exports(weights, tmp_path):
    trainer = _trainer(weights)
    mbs = micro_batches("dense")
    trainer.train_step(mbs, loss_fn)
    trainer.save_checkpoint(str(tmp_path / "ckpt"))
    trainer.save_checkpoint(str(tmp_path / "ckpt"))  # overwriting keeps a whole checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    model = CausalLM(DENSE)
    meta = load_checkpoint(str(tmp_path / "ckpt"), [model])
    assert meta["step"] == 1
    model.save_pretrained(str(tmp_path / "hf"))
    exported = from_pretrained(str(tmp_path / "hf"))
    mb = mbs[0]
    with torch.no_grad():
        want = trainer.forward_logits([mb])[0]
        with trainer_pass():  # the kernels the trainer's forward takes (its fused C++ norms / SwiGLU on CPU)
            got = exported(mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens)
    assert torch.equal(got, want)
