"""varlen_causal_attention (both its per-sequence and its padded-batch paths) against dense
attention with a block-diagonal causal mask, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from rl_engine.kernels import reference


def dense_reference(q, k, v, lengths, scale):
    T = q.shape[0]
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = torch.arange(T)
    mask = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


@pytest.mark.parametrize("lengths", [[5, 17, 1, 30, 22, 3], [200, 7], [9], [4, 0, 6]])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_varlen_matches_dense_block_diagonal(lengths, kv_heads):
    torch.manual_seed(0)
    T = sum(lengths)
    q = torch.randn(T, 4, 8, dtype=torch.float64).requires_grad_()
    k = torch.randn(T, kv_heads, 8, dtype=torch.float64).requires_grad_()
    v = torch.randn(T, kv_heads, 8, dtype=torch.float64).requires_grad_()
    cu = torch.tensor([0] + lengths).cumsum(0)
    out = reference.varlen_causal_attention(q, k, v, cu, 0.3)
    ref = dense_reference(q, k, v, lengths, 0.3)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert (out - ref).abs().max() < 1e-10
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-10


def test_short_batches_take_the_padded_path(monkeypatch):
    calls = []
    real = reference._padded_causal_attention
    monkeypatch.setattr(reference, "_padded_causal_attention", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(12, 2, 4)
    reference.varlen_causal_attention(q, q, q, torch.tensor([0, 5, 12]), 0.5)
    assert calls, "many short sequences should use one padded batched call"
    calls.clear()
    q = torch.randn(300, 2, 4)
    reference.varlen_causal_attention(q, q, q, torch.tensor([0, 290, 300]), 0.5)
    assert not calls, "long sequences should use per-sequence fused calls"
