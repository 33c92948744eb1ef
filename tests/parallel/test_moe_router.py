"""Router training terms in one process: aux and z losses reach the gradient through the block
output, and the aux-loss-free bias moves toward balanced loads and steers the top-k choice."""

import torch

from parallel_helpers import MOE
from rl_engine.policy.moe import MoEBlock
from rl_engine.policy.parallel import SINGLE


def _block(**overrides) -> MoEBlock:
    torch.manual_seed(0)
    return MoEBlock(MOE.replace(**overrides), 0, groups=SINGLE, dtype=torch.float32)


def test_aux_and_z_loss_gradients_equal_an_explicit_loss_term():
    x = torch.randn(24, MOE.hidden_size)
    block = _block(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    block.aux_loss_scale = 0.5
    block(x).sum().backward()
    attached = block.gate.grad.clone()

    plain = _block(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    out = plain(x)
    logits = x @ plain.gate.t()
    probs = logits.softmax(-1)
    ids = probs.topk(MOE.num_experts_per_tok, dim=-1).indices
    frac = torch.bincount(ids.reshape(-1), minlength=MOE.num_experts).float() / x.shape[0]
    aux = 0.1 * MOE.num_experts * (frac * probs.mean(0)).sum() + 0.01 * logits.logsumexp(-1).pow(2).mean()
    (out.sum() + 0.5 * aux).backward()
    assert torch.allclose(attached, plain.gate.grad, atol=1e-6)
    assert not torch.allclose(attached, _grad_without_aux(x), atol=1e-4)  # the terms do matter


def _grad_without_aux(x):
    block = _block(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    block(x).sum().backward()
    return block.gate.grad


def test_aux_loss_free_bias_update_and_steering():
    block = _block(router_bias_update_rate=0.1)
    x = torch.randn(10, MOE.hidden_size)
    block(x)
    assert int(block.tokens_per_expert.sum()) == 10 * MOE.num_experts_per_tok  # counted under grad
    with torch.no_grad():
        block(x)  # inference does not count
    assert int(block.tokens_per_expert.sum()) == 10 * MOE.num_experts_per_tok
    block.tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    block.update_expert_bias(None)
    assert block.expert_bias.tolist() == [-0.1, 0.1, 0.0, 0.0] or torch.allclose(
        block.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert block.tokens_per_expert.sum() == 0
    block.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    _, probs, weights, ids = block.route(x, None)
    assert (ids == 3).any(-1).all()  # the bias steers the choice...
    assert torch.allclose(weights, probs.gather(1, ids).to(weights.dtype))  # ...not the weights
