"""The trainer's no-grad passes (proximal, reference and teacher log-probs) take the kernels its recorded
pass takes (`kernels.grad_mode.trainer_pass`), so over the same weights they give the recorded pass's log-probs bit
for bit: the first update's importance ratio is exactly 1. On CPU the recorded pass's RMSNorm and SwiGLU
are the fused C++ kernels (autograd Functions); the engine's ops (`rms_norm`, `silu_and_mul`) take the torch
reference whenever autograd records, and so would round the recorded pass apart from a no-grad one."""

import threading

import pytest
import torch

from rl_engine import kernels
from rl_engine.kernels.grad_mode import trainer_pass, training_kernels
from rl_engine.losses import PolicyLoss, compute_loss_normalizer
from rl_engine.policy.layers import RMSNorm
from rl_engine.policy.model import CausalLM
from rl_engine.policy.moe import SwiGLUMLP
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import ParallelGroups
from rl_engine.policy.parallel_trainer import ParallelTrainer
from rl_engine.policy.presets import preset_config
from rl_engine.rl_step import StepLoss, build_micro_batches, forward_logprobs, run_micro_batches
from test_shared_prefix import LOSS, grpo_batch


class RecordingLoss:
    """The step's loss, keeping the log-probs the recorded pass computed."""

    def __init__(self, loss: StepLoss) -> None:
        self.loss, self.logprobs = loss, []

    def __call__(self, lp, ent, mb):
        self.logprobs.append(lp.detach().clone())
        return self.loss(lp, ent, mb)


def count_kernel_calls(model: torch.nn.Module) -> dict[str, int]:
    """Counts, per kernel kind, the norm and MLP calls that take the training kernel or the engine's."""
    counts = {"train": 0, "engine": 0}

    def wrap(module, train_attr, engine_attr):
        train, engine = getattr(module, train_attr), getattr(module, engine_attr)

        def train_fn(*a, **k):
            counts["train"] += 1
            return train(*a, **k)

        def engine_fn(*a, **k):
            counts["engine"] += 1
            return engine(*a, **k)

        setattr(module, train_attr, train_fn)
        setattr(module, engine_attr, engine_fn)

    for m in model.modules():
        if isinstance(m, RMSNorm):
            wrap(m, "_rms_norm_train", "_rms_norm")
        elif isinstance(m, SwiGLUMLP):
            wrap(m, "_silu_and_mul_train", "_silu_and_mul")
    return counts


def engine_thread_kernels() -> list[bool]:
    with torch.no_grad():
        return [training_kernels()]


def test_trainer_pass_selects_the_training_kernels_in_this_thread_only():
    with torch.no_grad():
        assert not training_kernels()
        with trainer_pass():
            assert training_kernels()
            seen = []
            thread = threading.Thread(target=lambda: seen.extend(engine_thread_kernels()))
            thread.start()
            thread.join()
            assert seen == [False]  # an engine stepping in another thread keeps its kernels
        assert not training_kernels()


@pytest.mark.parametrize("kind", ["tiny", "tiny_dsv3"])
def test_no_grad_logprobs_equal_the_recorded_pass_bit_for_bit(kind):
    torch.manual_seed(0)
    model = CausalLM(preset_config(kind))
    samples, advantages = grpo_batch(model.config.vocab_size, [4, 1, 3], max_prompt=20, max_response=12)
    mbs = build_micro_batches(samples, advantages, micro_batch_tokens=120, temperature=0.9)
    assert len(mbs) > 1
    counts = count_kernel_calls(model)
    proximal = forward_logprobs(model, mbs)
    assert counts["train"] > 0 and counts["engine"] == 0  # the no-grad pass took the training kernels
    normalizer = compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=12)
    recorded = RecordingLoss(StepLoss(PolicyLoss(LOSS), normalizer))
    run_micro_batches(model, mbs, recorded)
    assert counts["engine"] == 0
    assert len(recorded.logprobs) == len(proximal)
    for a, b in zip(proximal, recorded.logprobs):
        assert torch.equal(a, b)
    with torch.no_grad():  # outside the trainer (the engine's forward): the engine's kernels
        model.hidden_states(mbs[0].input_ids, positions=mbs[0].positions, cu_seqlens=mbs[0].cu_seqlens)
    assert counts["engine"] > 0


def test_parallel_trainer_no_grad_logprobs_equal_its_recorded_pass_bit_for_bit():
    torch.manual_seed(0)
    trainer = ParallelTrainer(preset_config("tiny"), groups=ParallelGroups.build(),
                              optim=OptimizerConfig(lr=1e-3))
    samples, advantages = grpo_batch(trainer.chunks[0].config.vocab_size, [4, 2], max_prompt=20, max_response=12)
    mbs = build_micro_batches(samples, advantages, micro_batch_tokens=100, temperature=0.9)
    counts = count_kernel_calls(trainer.chunks[0])
    proximal = [lp for lp, _ in trainer.forward_logprobs(mbs)]
    assert counts["train"] > 0 and counts["engine"] == 0
    normalizer = compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=12)
    recorded = RecordingLoss(StepLoss(PolicyLoss(LOSS), normalizer))
    trainer.runner.run(mbs, recorded)
    assert len(recorded.logprobs) == len(proximal) > 1
    for a, b in zip(proximal, recorded.logprobs):
        assert torch.equal(a, b)


def test_rms_norm_linear_takes_the_recorded_pass_kernel_in_a_trainer_pass():
    """The `rms_norm_linear` op's torch build (`kernels.modules.RMSNormLinear`) picks its norm as `RMSNorm` does: a
    no-grad pass inside `trainer_pass` gives the recorded pass's output bit for bit (on CPU the C++ training RMSNorm
    both times; the engine's `rms_norm` takes the torch reference when autograd records, and its C++ kernel rounds
    apart from that reference by a few ulp)."""
    torch.manual_seed(0)
    block = kernels.resolve("rms_norm_linear", "cpu")(96, 16, eps=1e-6)
    with torch.no_grad():
        block.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(300, 96)
    recorded = block(x)
    assert recorded.requires_grad
    with torch.no_grad(), trainer_pass():
        assert torch.equal(block(x), recorded)
