"""Hugging Face export of aux-loss-free MoE balancing: `router_bias_update_rate` and the `expert_bias`
buffers have no place in transformers' MoE configs, so they travel in our side file and survive a
save -> load round trip (while transformers still loads the export)."""

from __future__ import annotations

import os

import pytest
import torch

from rl_engine.policy import CausalLM, ModelConfig, from_pretrained, load_hf_weights
from rl_engine.policy.checkpoint import EXTRAS_FILE, save_pretrained

MOE = ModelConfig(model_type="qwen2_moe", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=256,
                  max_context_len=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=32, moe_layers=[0, 1], norm_topk_prob=False,
                  router_bias_update_rate=0.01, router_z_loss_coef=0.001)


def _model(config: ModelConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b))  # as after some balancing steps
    return model


def _state(model: CausalLM) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if "inv_freq" not in n
            and "tokens_per_expert" not in n}


def test_round_trip_keeps_router_bias_rate_and_expert_bias(tmp_path):
    model = _model(MOE)
    save_pretrained(model, str(tmp_path))
    assert os.path.isfile(tmp_path / EXTRAS_FILE)
    loaded = from_pretrained(str(tmp_path))
    assert loaded.config.router_bias_update_rate == 0.01 and loaded.config.router_z_loss_coef == 0.001
    want, got = _state(model), _state(loaded)
    assert sorted(want) == sorted(got) and any(n.endswith("expert_bias") for n in got)
    for n in want:
        assert torch.equal(want[n], got[n]), n
    ids = torch.tensor([1, 5, 9, 2, 7, 3])
    pos = torch.arange(ids.numel())
    assert torch.equal(model.hidden_states(ids, positions=pos), loaded.hidden_states(ids, positions=pos))


def test_a_model_built_without_the_bias_is_told_how_to_load_it(tmp_path):
    save_pretrained(_model(MOE), str(tmp_path))
    plain = CausalLM(MOE.replace(router_bias_update_rate=0.0))
    with pytest.raises(ValueError, match="build it with router_bias_update_rate=0.01"):
        load_hf_weights(plain, str(tmp_path))


def test_an_export_without_balancing_writes_no_side_file(tmp_path):
    save_pretrained(_model(MOE), str(tmp_path))
    plain = _model(MOE.replace(router_bias_update_rate=0.0, router_z_loss_coef=0.0))
    save_pretrained(plain, str(tmp_path))  # over the earlier export: its side file must go
    assert not os.path.exists(tmp_path / EXTRAS_FILE)
    assert from_pretrained(str(tmp_path)).config.router_bias_update_rate == 0.0


def test_transformers_still_loads_the_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_pretrained(_model(MOE), str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert hf.config.model_type == "qwen2_moe"
