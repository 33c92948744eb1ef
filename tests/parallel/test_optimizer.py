"""The distributed optimizer in one process: torch.optim.AdamW parity, gradient accumulation,
bf16 parameters with fp32 master weights; a sharded checkpoint loaded into a plain model (export)."""

import pytest
import torch

from parallel_helpers import DENSE, OPTIM, loss_fn, micro_batches, write_weights
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


def test_gradient_accumulation_does_not_depend_on_the_split(weights):
    mbs = micro_batches("dense")
    merged = [_merge(mbs[0], mbs[1]), _merge(mbs[2], mbs[3])]
    a, b = _trainer(weights), _trainer(weights)
    for _ in range(2):
        la, lb = a.train_step(mbs, loss_fn), b.train_step(merged, loss_fn)
        assert abs(la["loss"] - lb["loss"]) <= 1e-6 and abs(la["grad_norm"] - lb["grad_norm"]) <= 1e-5
    pa, pb = _params(a), _params(b)
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) <= 1e-6


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
        got = exported(mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens)
    assert torch.equal(got, want)
