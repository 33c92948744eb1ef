"""MoE permute/unpermute: the reference's bookkeeping, and Triton against it (fwd and bwd)."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import reference


def test_reference_permutation_bookkeeping():
    topk_ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    hidden = torch.arange(3.0)[:, None].expand(3, 4)
    perm = reference.moe_permute(hidden, topk_ids, num_experts=4)
    assert perm.tokens_per_expert.tolist() == [2, 2, 2, 0]
    # expert 0: tokens 0, 1; expert 1: tokens 1, 2; expert 2: tokens 0, 2 (token order kept)
    assert perm.row_to_token.tolist() == [0, 1, 1, 2, 0, 2]
    assert perm.hidden[:, 0].tolist() == [0, 1, 1, 2, 0, 2]
    # inverse permutation: row of token t's j-th copy
    assert perm.slot_to_row.tolist() == [[4, 0], [1, 2], [5, 3]]
    assert torch.equal(perm.hidden[perm.slot_to_row][..., 0], topk_ids.new_tensor([[0, 0], [1, 1], [2, 2]]).float())
    # identity experts with weights summing to one give the input back
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(reference.moe_unpermute(perm.hidden, perm.slot_to_row, weights), hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "top_k", "num_experts", "hidden"),
                         [(1, 1, 4, 8), (7, 2, 5, 20), (5, 4, 6, 33), (0, 2, 4, 8)])
def test_triton_permute_unpermute_match_reference(triton_device, assert_close, dtype, num_tokens,
                                                  top_k, num_experts, hidden):
    from rl_engine.kernels.triton import moe_permute as tri

    gen = torch.Generator().manual_seed(0)
    dev = triton_device
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(dev)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    topk_weights, topk_ids = scores.topk(top_k, dim=-1)  # distinct experts per token
    topk_weights, topk_ids = topk_weights.to(dev), topk_ids.to(dev)
    expert_scale = torch.randn(num_experts, hidden, generator=gen).to(dev)
    grad_out = torch.randn(num_tokens, hidden, generator=gen).to(dev)

    def run(permute, unpermute, x, weights):
        x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
        perm = permute(x, topk_ids, num_experts)
        # a stand-in expert computation that differs per expert
        expert_ids = torch.repeat_interleave(torch.arange(num_experts, device=dev),
                                             perm.tokens_per_expert)
        expert_out = (perm.hidden.float() * expert_scale[expert_ids]).to(perm.hidden.dtype)
        out = unpermute(expert_out, perm.slot_to_row, weights)
        (out.float() * grad_out).sum().backward()
        return perm, out, x.grad, weights.grad

    perm, out, dx, dw = run(tri.moe_permute, tri.moe_unpermute, x, topk_weights)
    perm_ref, out_ref, dx_ref, dw_ref = run(reference.moe_permute, reference.moe_unpermute,
                                            x.float(), topk_weights)
    assert torch.equal(perm.tokens_per_expert, perm_ref.tokens_per_expert)
    assert torch.equal(perm.slot_to_row, perm_ref.slot_to_row)
    assert torch.equal(perm.hidden.float(), x.float()[perm_ref.row_to_token])  # a pure copy
    assert out.dtype == dx.dtype == dtype
    assert_close(out, out_ref, dtype)
    assert_close(dx, dx_ref, dtype)
    assert_close(dw, dw_ref, dtype)


def test_triton_block_boundary(triton_device, assert_close, monkeypatch):
    """Hidden wider than one column block."""
    from rl_engine.kernels.triton import moe_permute as tri

    monkeypatch.setattr(tri, "_MAX_BLOCK_H", 16)
    x = torch.randn(4, 40, device=triton_device, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 0]], device=triton_device)
    weights = torch.rand(4, 2, device=triton_device, requires_grad=True)
    perm = tri.moe_permute(x, ids, 3)
    out = tri.moe_unpermute(perm.hidden * 2, perm.slot_to_row, weights)
    out.sum().backward()
    assert_close(out, 2 * x.detach() * weights.detach().sum(1, keepdim=True), torch.float32)
    assert_close(weights.grad, (2 * x.detach().sum(1, keepdim=True)).expand(4, 2), torch.float32)
