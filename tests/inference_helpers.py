"""Helpers shared by the inference tests (imported by name: test modules must not import
`conftest`, whose module name is ambiguous across test folders)."""

from __future__ import annotations

import torch

from rl_engine.policy import CausalLM, ModelConfig

NUM_NEW_TOKENS = 24
# Qwen2 with tied embeddings and random weights repeats one token forever; untied it varies, which
# makes token-for-token equality a stronger check.
PARITY_OVERRIDES = {"qwen2": dict(tie_word_embeddings=False), "llama": {}, "qwen3_moe": {}}


def mixed_prompts(num: int = 32, *, vocab: int = 97, seed: int = 0, max_len: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (num,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf_model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuations, EOS ignored: one left-padded batch with an attention mask."""
    hf_model.generation_config.eos_token_id = None
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=0)
    return out[:, width:].tolist()


def seeded_model(hf: dict, *, std: float = 0.3) -> CausalLM:
    """A model from an HF config dict, seeded (0), its matrices drawn from N(0, std): weights large enough that
    attention is far from uniform."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_dict(hf))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return model


def tiny_gqa_model() -> CausalLM:
    """A 2-layer GQA qwen2 (hidden 32, 8 query heads over 2 KV heads, vocab 64), seeded
    (tests/kernels/test_paged_decode_engine_state's engine state)."""
    return seeded_model({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                         "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                         "tie_word_embeddings": True, "torch_dtype": "float32", "eos_token_id": 2})


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps; Linux): `hg` marks memory
    advised madvise(MADV_HUGEPAGE)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise LookupError(f"no mapping of this process holds address {address:#x}")
