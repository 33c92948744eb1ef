"""Our model against Hugging Face transformers on every supported family."""

import pytest
import torch

from hf_models import FAMILIES, hf_logits_per_sequence, make_hf_model, packed
from rl_engine.policy import from_pretrained


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_logits_match_transformers_and_roundtrip(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(model_type, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 33, 12, 70]
    seqs = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    ref = hf_logits_per_sequence(hf, seqs)

    model = from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    input_ids, positions, cu = packed(seqs)
    with torch.no_grad():
        ours = model(input_ids, positions=positions, cu_seqlens=cu)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4

    # Save -> transformers reload -> identical logits.
    model.save_pretrained(str(tmp_path / "ours"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    again = hf_logits_per_sequence(reloaded, seqs)
    assert torch.equal(again, ref) or (again - ref).abs().max().item() <= 1e-6
