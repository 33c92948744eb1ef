"""Chunked fused log-probs and entropy against a full log_softmax reference, with gradients."""

import pytest
import torch

from hf_models import make_hf_model, packed
from rl_engine.policy.logprobs import reference_logprobs_and_entropy, token_logprobs_and_entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_logprobs_match_full_log_softmax(temperature, chunk, test_device):
    torch.manual_seed(0)
    T, H, V = 23, 16, 50
    hidden = torch.randn(T, H, dtype=torch.float64).float().to(test_device).requires_grad_()
    weight = torch.randn(V, H).to(test_device).requires_grad_()
    targets = torch.randint(0, V, (T,)).to(test_device)
    g_lp, g_ent = torch.randn(T).to(test_device), torch.randn(T).to(test_device)

    lp, ent = token_logprobs_and_entropy(hidden, weight, targets, temperature=temperature, chunk_tokens=chunk)
    (lp * g_lp + ent * g_ent).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    # The reference runs in float64 from the same fp32 inputs, so it is the exact answer.
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_lp, ref_ent = reference_logprobs_and_entropy(h64 @ w64.t(), targets, temperature)
    (ref_lp * g_lp.double() + ref_ent * g_ent.double()).sum().backward()
    assert (lp - ref_lp).abs().max() <= 1e-5
    assert (ent - ref_ent).abs().max() <= 1e-5
    assert (grads[0] - h64.grad).abs().max() <= 1e-5
    assert (grads[1] - w64.grad).abs().max() <= 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_logits_give_the_recomputed_gradients(temperature, monkeypatch):
    # A call with few logits keeps its forward's for backward (KEEP_LOGITS_ELEMENTS); the gradients are the ones
    # the recomputing backward gives, bit for bit (the same product of the same inputs: with the default dense,
    # F.linear, as in the CPU trainer; another dense, e.g. model.batch_invariant's, changes the forward's bits).
    from rl_engine.policy import logprobs

    torch.manual_seed(2)
    T, H, V = 37, 16, 101
    hidden, weight = torch.randn(T, H), torch.randn(V, H)
    targets = torch.randint(0, V, (T,))
    g_lp, g_ent = torch.randn(T), torch.randn(T)

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = token_logprobs_and_entropy(h, w, targets, temperature=temperature)
        (lp * g_lp + ent * g_ent).sum().backward()
        return h.grad, w.grad

    assert T * V <= logprobs.KEEP_LOGITS_ELEMENTS
    kept = grads()
    monkeypatch.setattr(logprobs, "KEEP_LOGITS_ELEMENTS", 0)  # every call recomputes its logits
    recomputed = grads()
    assert torch.equal(kept[0], recomputed[0]) and torch.equal(kept[1], recomputed[1])


def test_padded_vocab_rows_are_excluded():
    # A vocab shard with padding rows (tp padding) must behave as if they did not exist.
    torch.manual_seed(1)
    hidden = torch.randn(9, 8)
    weight = torch.randn(12, 8)
    targets = torch.randint(0, 10, (9,))
    lp, ent = token_logprobs_and_entropy(hidden, weight, targets, vocab_real_rows=10, chunk_tokens=4)
    ref_lp, ref_ent = reference_logprobs_and_entropy(hidden @ weight[:10].t(), targets)
    assert (lp - ref_lp).abs().max() <= 1e-5 and (ent - ref_ent).abs().max() <= 1e-5


def test_model_token_logprobs_match_hf_logits(tmp_path):
    from rl_engine.policy import from_pretrained

    hf = make_hf_model("qwen3", seed=3)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    seqs = [[1, 5, 9, 2, 7], [3, 3, 8], [4] * 11]
    input_ids, positions, cu = packed(seqs)
    targets = torch.roll(input_ids, -1)
    h = model.hidden_states(input_ids, positions=positions, cu_seqlens=cu)
    lp, ent = model.token_logprobs(h, targets, temperature=0.5, chunk_tokens=4)
    with torch.no_grad():
        ref_logits = torch.cat([hf(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    ref_lp, ref_ent = reference_logprobs_and_entropy(ref_logits, targets, 0.5)
    assert (lp.detach() - ref_lp).abs().max() <= 1e-5
    assert (ent.detach() - ref_ent).abs().max() <= 1e-5
    lp.sum().backward()
    assert model.layers[0].self_attn.qkv_proj.weight.grad.abs().sum() > 0


def test_bfloat16_parameters_run_and_stay_close(tmp_path):
    from rl_engine.policy import from_pretrained

    hf = make_hf_model("llama", seed=2)
    hf.save_pretrained(tmp_path)
    m32 = from_pretrained(str(tmp_path), dtype=torch.float32)
    m16 = from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    input_ids, positions, cu = packed([[1, 2, 3, 4, 5, 6], [7, 8, 9]])
    targets = torch.roll(input_ids, -1)
    lp32, _ = m32.token_logprobs(m32.hidden_states(input_ids, positions=positions, cu_seqlens=cu), targets)
    h16 = m16.hidden_states(input_ids, positions=positions, cu_seqlens=cu)
    lp16, ent16 = m16.token_logprobs(h16, targets)
    assert lp16.dtype == torch.float32
    assert (lp16 - lp32).abs().max() < 0.1  # bf16 weights and activations: ~2-3 significant digits
    lp16.sum().backward()
    assert m16.layers[0].mlp.down_proj.weight.grad.dtype == torch.bfloat16


def test_bad_temperature_and_shapes_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_and_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(5, dtype=torch.long))
