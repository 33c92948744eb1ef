"""Tiny random Hugging Face checkpoints written offline by transformers, for reference tests."""

from __future__ import annotations

import os

import torch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)

FAMILY_OVERRIDES = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
FAMILIES = list(FAMILY_OVERRIDES)
# DeepSeek-V3 (MLA, sigmoid group-limited routing, shared experts), kept out of FAMILIES: its engine
# path and tests are its own (tests/**/test_*dsv3*). Variants override this base.
DSV3 = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            max_position_embeddings=512, num_nextn_predict_layers=0)


def make_hf_model(model_type: str, seed: int = 0, **overrides):
    """A random transformers model with weights large enough that logits differ meaningfully."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {**TINY, **FAMILY_OVERRIDES[model_type]} if model_type != "deepseek_v3" else DSV3
    kw = {**base, **overrides}
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's balancing bias, nonzero to matter
                b.normal_(0, 0.1)
    return model


def write_dsv3_with_mtp(directory: str, seed: int = 0, **overrides):
    """A DeepSeek-V3 checkpoint with one MTP layer as DeepSeek ships it (under the layer index after
    the last decoder layer, with copies of the embedding and head); returns (transformers model,
    transformers' MtpModel over it with the same MTP weights), the reference for MTP."""
    from safetensors.torch import load_file, save_file
    from transformers.modeling_layers import MtpModel

    hf = make_hf_model("deepseek_v3", seed=seed, **{**overrides, "num_nextn_predict_layers": 1})
    mtp = MtpModel(hf, 1).eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in mtp.layers.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        for name, b in mtp.layers.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    hf.save_pretrained(directory)
    file = os.path.join(directory, "model.safetensors")
    tensors = load_file(file)
    pre = f"model.layers.{hf.config.num_hidden_layers}."
    for name, t in {**dict(mtp.layers.named_parameters()), **dict(mtp.layers.named_buffers())}.items():
        name = name.removeprefix("0.").replace("mtp_block.", "").replace("post_norm", "shared_head.norm")
        tensors[pre + name] = t.detach().clone().contiguous()
    tensors[pre + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[pre + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    return hf, mtp


def write_hf_checkpoint(directory: str, model_type: str, seed: int = 0, **overrides) -> str:
    model = make_hf_model(model_type, seed=seed, **overrides)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def hf_logits_per_sequence(hf_model, sequences: list[list[int]]) -> torch.Tensor:
    """Reference logits for packed sequences: each sequence run alone (no padding), concatenated."""
    outs = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            outs.append(hf_model(input_ids=ids).logits[0])
    return torch.cat(outs)


def packed(sequences: list[list[int]]):
    """input_ids, positions, cu_seqlens of a packed batch."""
    input_ids = torch.tensor([t for s in sequences for t in s])
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(s) for s in sequences]), 0)
    return input_ids, positions, cu
