"""Built-in model presets (sizes as code, like gpt-fast's `ModelArgs.from_name`) and a character
tokenizer, so the demo, tests and benchmarks run with nothing downloaded.

`write_preset_checkpoint(name, path)` writes an ordinary Hugging Face directory (config.json,
model.safetensors with a seeded random init, tokenizer.json, tokenizer_config.json with a chat
template) that every loader in the project, and transformers, reads like any other model.
"""

from __future__ import annotations

import json
import os
import string

import torch

from rl_engine.policy.config import ModelConfig

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
# Tool calls are written in the Hermes format (rl_engine.inference.chat parses it back); a tool's
# result is a user turn. The tools' schemas are not listed: the tiny models learn the format from data.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}"
    "{% for tc in m['tool_calls'] or [] %}<tool_call>\n"
    "{{ {'name': tc['function']['name'], 'arguments': tc['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}<|eos|>"
    "{% elif m['role'] == 'tool' %}<|user|>{{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# name -> HF-style config fields (Qwen2 shape). vocab_size is filled from the character vocabulary.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "3m": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2),
    # DeepSeek-V3 shape: MLA with q LoRA, one dense layer then MoE layers with sigmoid group-limited
    # routing (8 experts in 2 groups, top-2 within the best group), a shared expert. routed_scaling_factor
    # is 1, not DeepSeek-V3's 2.5: at this size 2.5 left the demo's warm start at 2% held-out accuracy
    # (41% with 1) and RL then barely moved it.
    "tiny_dsv3": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], tie_word_embeddings=False,
                      hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                      moe_intermediate_size=64, n_group=2, topk_group=1, routed_scaling_factor=1.0,
                      norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=0),
}


def char_vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}


def preset_hf_config(name: str, *, vocab_size: int | None = None, max_position_embeddings: int = 512) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    vocab = char_vocab()
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": vocab_size or len(vocab),
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": vocab["<|bos|>"],
        "eos_token_id": vocab["<|eos|>"],
        "pad_token_id": vocab["<|pad|>"],
        "torch_dtype": "float32",
        **PRESETS[name],
    }


def preset_config(name: str, **kw) -> ModelConfig:
    return ModelConfig.from_hf_dict(preset_hf_config(name, **kw))


def write_char_tokenizer(path: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = char_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
                   "pad_token": "<|pad|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 512}, f, indent=2)


def write_preset_checkpoint(name: str, path: str, *, seed: int = 0, **kw) -> str:
    """A randomly initialised preset as a Hugging Face directory at `path`; returns `path`."""
    from rl_engine.policy.checkpoint import save_pretrained
    from rl_engine.policy.model import CausalLM

    config = preset_config(name, **kw)
    torch.manual_seed(seed)
    model = CausalLM(config)
    save_pretrained(model, path)
    write_char_tokenizer(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": config.eos_token_id, "bos_token_id": config.bos_token_id}, f)
    return path
