"""Checkpoint import edge cases: sharded index, fused experts, and errors that name the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import hf_logits_per_sequence, make_hf_model, packed, write_hf_checkpoint
from rl_engine.policy import ModelConfig, from_pretrained


def _logits(model, seqs):
    ids, pos, cu = packed(seqs)
    with torch.no_grad():
        return model(ids, positions=pos, cu_seqlens=cu)


def test_sharded_index_checkpoint_loads(tmp_path):
    hf = make_hf_model("qwen2", seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = from_pretrained(str(tmp_path))
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert (_logits(model, seqs) - hf_logits_per_sequence(hf, seqs)).abs().max() <= 1e-4
    # And our own sharded export reloads.
    model.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=20_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(from_pretrained(str(tmp_path / "ours")), seqs), _logits(model, seqs))


def test_fused_expert_layout_loads(tmp_path):
    hf = make_hf_model("qwen3_moe", seed=5)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp.experts."
        gate_up = torch.stack([torch.cat([tensors.pop(f"{pre}{e}.gate_proj.weight"),
                                          tensors.pop(f"{pre}{e}.up_proj.weight")]) for e in range(4)])
        down = torch.stack([tensors.pop(f"{pre}{e}.down_proj.weight") for e in range(4)])
        tensors[pre + "gate_up_proj"], tensors[pre + "down_proj"] = gate_up, down
    save_file(tensors, tmp_path / "model.safetensors")
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert (_logits(from_pretrained(str(tmp_path)), seqs) - hf_logits_per_sequence(hf, seqs)).abs().max() <= 1e-4


def test_unsupported_model_type_lists_supported(tmp_path):
    write_hf_checkpoint(str(tmp_path), "qwen2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama.*qwen3_moe"):
        from_pretrained(str(tmp_path))


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    write_hf_checkpoint(str(tmp_path), "llama")
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    good = tensors[name]
    tensors[name] = torch.zeros(good.shape[0] + 1, good.shape[1])
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"k_proj.*{good.shape[0]}, {good.shape[1]}.*{good.shape[0] + 1}"):
        from_pretrained(str(tmp_path))
    del tensors[name]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type 'yarn'"),
    ("router_jitter_noise", 0.1, "router_jitter_noise"),
])
def test_unsupported_fields_refused_by_name(field, value, match):
    hf = make_hf_model("mixtral").config.to_dict()
    hf[field] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(hf)


def test_sliding_window_becomes_the_context_limit(tmp_path):
    write_hf_checkpoint(str(tmp_path), "mistral", sliding_window=16)
    model = from_pretrained(str(tmp_path))
    assert model.config.max_context_len == 16
    _logits(model, [list(range(16))])  # fits
    with pytest.raises(ValueError, match="17 tokens exceeds.*16"):
        _logits(model, [list(range(17))])


def test_bad_inputs_are_named(tmp_path):
    write_hf_checkpoint(str(tmp_path), "qwen2")
    model = from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.tensor([1, 2, 3]), positions=torch.arange(3), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="positions must be 1-D"):
        model(torch.tensor([[1, 2, 3]]), positions=torch.arange(3)[None])
