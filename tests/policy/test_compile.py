"""train.compile (policy/compile.py): the training forward with each decoder layer's attention-free halves
compiled gives the eager layers' log-probs (fp32 contract, <= 1e-5), loss and gradients, packed plainly
or with shared prefixes, every row or the scored rows alone after the last attention
(train.skip_unscored_rows), with one graph for every micro-batch size; no-grad forwards (the engine, the
proximal log-probs) stay eager, bit for bit; the layouts it cannot compile are refused by name."""

import copy

import pytest
import torch

from rl_engine.config import ConfigError, load_config
from rl_engine.losses import PolicyLoss, compute_loss_normalizer
from rl_engine.policy.compile import apply_compile
from rl_engine.policy.model import CausalLM
from rl_engine.policy.presets import preset_config
from rl_engine.rl_step import StepLoss, build_micro_batches, forward_logprobs, run_micro_batches
from rl_engine.train_config import RLConfig
from test_shared_prefix import LOSS, grpo_batch

# The log-prob contract's fp32 bound. The compiled halves run the eager ops' arithmetic with elementwise
# chains fused and reductions (RMSNorm's sum of squares over 64 features) possibly reassociated: each
# value moves by a few units of fp32 rounding (~6e-8 relative), which through two layers and a
# log-softmax over logits of magnitude ~1-10 stays near 1e-6. Gradients: each weight-gradient entry sums
# a few hundred token products whose order the fused backward may change, ~sqrt(T) * 6e-8 of the summed
# magnitudes; 1e-5 of the largest gradient entry (the shared-prefix tests' bound) holds that with margin.
TOL = 1e-5


def random_model(preset: str = "tiny") -> CausalLM:
    """A preset model with weights of std 0.3 (0.02's near-uniform log-probs would hide differences)."""
    torch.manual_seed(0)
    model = CausalLM(preset_config(preset))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def train_pass(model, micro_batches, samples, *, skip_unscored: bool = False):
    """Log-probs of the forward that autograd records, the loss and the gradients of one pass."""
    model.zero_grad(set_to_none=True)
    normalizer = compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=30)
    loss = StepLoss(PolicyLoss(LOSS), normalizer)
    recorded = []

    def recording(lp, ent, mb):
        recorded.append(lp.detach().clone())
        return loss(lp, ent, mb)

    run_micro_batches(model, micro_batches, recording, skip_unscored=skip_unscored)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(recorded), loss.metrics()["loss"], grads


@pytest.mark.parametrize("skip_unscored", [False, True], ids=["every_row", "skip_unscored_rows"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_compiled_layers_match_eager(shared_prefix, skip_unscored):
    eager = random_model()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    samples, advantages = grpo_batch(eager.config.vocab_size, [3, 1, 5, 2], seed=1)
    # Three micro-batches of different token counts: one graph must serve them all.
    micro_batches = build_micro_batches(samples, advantages, temperature=0.9, micro_batch_tokens=120,
                                        shared_prefix_min_group=2 if shared_prefix else None)
    assert len({mb.input_ids.shape[0] for mb in micro_batches}) >= 2
    if shared_prefix:
        assert any(mb.attention is not None for mb in micro_batches)
    lp_e, loss_e, grads_e = train_pass(eager, micro_batches, samples, skip_unscored=skip_unscored)
    lp_c, loss_c, grads_c = train_pass(compiled, micro_batches, samples, skip_unscored=skip_unscored)
    scale = max(g.abs().max().item() for g in grads_e.values())
    lp_diff = (lp_c - lp_e).abs().max().item()
    grad_diff = max((grads_c[n] - grads_e[n]).abs().max().item() for n in grads_e) / scale
    print(f"log-prob max diff {lp_diff:.1e}, loss diff {abs(loss_c - loss_e):.1e}, grad rel diff {grad_diff:.1e}")
    assert set(grads_c) == set(grads_e)
    assert lp_diff <= TOL and abs(loss_c - loss_e) <= TOL * max(1.0, abs(loss_e)) and grad_diff <= TOL
    # no-grad forwards (the proximal log-probs here; the engine's steps) run the eager layers: bit-equal
    for a, b in zip(forward_logprobs(compiled, micro_batches), forward_logprobs(eager, micro_batches)):
        assert torch.equal(a, b)


def test_one_graph_for_every_micro_batch_size():
    model = random_model()
    apply_compile(model)
    samples, advantages = grpo_batch(model.config.vocab_size, [2, 3, 1, 4], seed=2)
    first, *rest = build_micro_batches(samples, advantages, temperature=1.0, micro_batch_tokens=100)
    train_pass(model, [first], samples)  # compiles both halves, forward and backward
    assert rest and {mb.input_ids.shape[0] for mb in rest} - {first.input_ids.shape[0]}
    with torch.compiler.set_stance("fail_on_recompile"):
        train_pass(model, rest, samples)


def test_refused_layouts():
    with pytest.raises(ValueError, match=r"train.compile=true compiles dense attention decoder layers; layer 0 has "
                                         r"multi-head latent attention: set train.compile=false"):
        apply_compile(CausalLM(preset_config("tiny_dsv3")))
    with pytest.raises(ConfigError, match=r"train.compile=true compiles the single-process trainer's layers "
                                          r"\(placement.mode=colocated\): set placement.mode=single_process"):
        load_config(RLConfig, None, ["train.compile=true", "placement.mode=colocated"])
    with pytest.raises(ConfigError, match=r"train.compile=true with model.batch_invariant=true is not supported"):
        load_config(RLConfig, None, ["train.compile=true", "model.batch_invariant=true"])
