"""The MTP loss: the mean cross-entropy of token i+2 from MTP row i, checked against the same sum
written out per sequence with full logits, and its gradient reaches only the MTP layer when the
hidden states are detached."""

import torch

from hf_models import write_dsv3_with_mtp
from rl_engine.policy import from_pretrained
from rl_engine.policy.mtp import mtp_loss


def test_mtp_loss_equals_per_sequence_cross_entropy(tmp_path):
    write_dsv3_with_mtp(str(tmp_path), seed=6)
    model = from_pretrained(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (9, 2, 14, 3)]
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    cu = torch.tensor([0, 9, 11, 25, 28], dtype=torch.int32)
    hidden = model.hidden_states(ids, positions=positions, cu_seqlens=cu).detach()
    loss = mtp_loss(model, hidden, ids, positions=positions, cu_seqlens=cu)
    terms = []
    with torch.no_grad():
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            n = len(s)
            if n < 3:
                continue
            y = model.mtp_hidden_states(s[1:n - 1], hidden[a:b - 2], positions=torch.arange(1, n - 1))
            terms.append(torch.nn.functional.cross_entropy(model.compute_logits(y), s[2:], reduction="none"))
    expected = torch.cat(terms).mean()
    assert abs(loss.item() - expected.item()) <= 1e-5
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("mtp_layers.") or n.startswith("embed_tokens") or n.startswith("lm_head")
                         for n in grads)
    assert any(n.startswith("mtp_layers.0.block.mlp") for n in grads)
