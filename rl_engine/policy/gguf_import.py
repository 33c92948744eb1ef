"""GGUF files (llama.cpp's format) as a Hugging Face model directory, through the `gguf` library.

`read_gguf(file)` gives the Hugging Face config dict and an iterator of de-quantized tensors under
Hugging Face names; `from_pretrained` loads them straight into the policy. `convert_gguf(file, dst)`
writes a directory that transformers and our loaders both read: config.json, model.safetensors,
generation_config.json, and the tokenizer and chat template from the GGUF metadata as
tokenizer.json / tokenizer_config.json.

Two things GGUF changes that we undo: tensor names (`blk.3.attn_q.weight` ->
`model.layers.3.self_attn.q_proj.weight`) and the rotary layout of q/k. llama.cpp's
`convert_hf_to_gguf.py` permutes the rows of each q/k head from Hugging Face's half-split rotary
order ([x0..x_{d/2-1}, x_{d/2}..]) to the interleaved order ggml's rope uses (pairs (x0, x1), ...);
`_unpermute` is the inverse.

The tokenizer is rebuilt by transformers' GGUF tokenizer converter
(`transformers.integrations.gguf`), so `convert_gguf` needs transformers at run time (the `real`
extra); reading weights (`read_gguf`, `from_pretrained` of a .gguf) needs only `gguf`.
Supported: the `llama` architecture without rope scaling, in the quantisation types of
`SUPPORTED_TYPES`; anything else is an `InputError` naming it, raised before any tensor is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Iterator

import torch

from rl_engine.config import InputError

SUPPORTED_ARCHITECTURES = ("llama",)
# The float types and llama.cpp's classic and k-quants, which gguf's numpy de-quantizers implement.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
EXTRA_HINT = "pip install 'rl_engine[real]'"


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise InputError(f"reading a .gguf file needs the `gguf` package: {EXTRA_HINT}") from None
    return gguf


def _reader(file: str):
    gguf = _import_gguf()
    if not os.path.isfile(file):
        raise InputError(f"GGUF file {file!r} does not exist")
    try:
        return gguf.GGUFReader(file)
    except Exception as e:  # of any type: not a GGUF file, truncated, another version
        raise InputError(f"{file}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama GGUF tensor; an `InputError` for a name we do not know."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _LAYER.match(gguf_name)
    if m is not None and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    raise InputError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in a llama model; known: "
                     f"{', '.join(GLOBAL_NAMES)}, blk.N.{{{', '.join(LAYER_NAMES)}}}")


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k `permute`: per head, interleaved rotary pairs -> half-split order.
    weight: [num_heads * head_dim, hidden]."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_config(reader, file: str) -> dict[str, Any]:
    """The Hugging Face config.json of a GGUF file's model, after checking we can import it."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"{file}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    bad = sorted({f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                  if t.tensor_type.name not in SUPPORTED_TYPES})
    if bad:
        raise InputError(f"{file}: {len(bad)} tensor(s) in an unsupported quantisation type, e.g. {bad[:3]}; "
                         f"supported: {', '.join(SUPPORTED_TYPES)}")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise InputError(f"{file}: rope scaling ({scaling or 'rope_freqs.weight'}) is not supported in a GGUF import")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise InputError(f"{file}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise InputError(f"{file}: partial rotary ({arch}.rope.dimension_count={rope_dim} of head_dim {head_dim}) "
                         "is not supported")
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(embed.shape[-1])  # ggml order: [hidden, vocab]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if tokens is not None and len(tokens) != vocab:
        raise InputError(f"{file}: {len(tokens)} tokenizer tokens but token_embd.weight has {vocab} rows")
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{name}")
        if value is not None:
            config[key] = int(value)
    return config


def iter_tensors(reader, config: dict[str, Any], *, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, de-quantized tensor in `dtype`) for every tensor of the file."""
    from gguf import dequantize

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the fastest dimension first
        tensor = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
        if name.endswith("q_proj.weight"):
            tensor = _unpermute(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = _unpermute(tensor, kv_heads)
        yield name, tensor.to(dtype)


def read_gguf(file: str, *, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Any], Iterator]:
    """(Hugging Face config dict, iterator of (name, tensor)); the checks run before any tensor is read."""
    reader = _reader(file)
    config = hf_config(reader, file)
    return config, iter_tensors(reader, config, dtype=dtype)


def write_tokenizer(file: str, dst: str, config: dict[str, Any]) -> None:
    """tokenizer.json (transformers' GGUF tokenizer converter) and tokenizer_config.json with the
    special tokens, BOS/EOS flags and chat template of the GGUF metadata."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        raise InputError(f"converting a GGUF tokenizer needs transformers >= 5.25 (its GGUF tokenizer converter): "
                         f"{EXTRA_HINT}") from None
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(file)
    if "tokens" not in tokenizer_dict:
        raise InputError(f"{file}: the GGUF metadata holds no tokenizer (tokenizer.ggml.tokens)")
    try:
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (KeyError, ValueError) as e:  # a tokenizer model transformers cannot rebuild (named)
        raise InputError(f"{file}: its tokenizer ({tokenizer_dict.get('tokenizer_type')!r}) cannot be "
                         f"converted: {e}") from None
    backend.save(os.path.join(dst, "tokenizer.json"))
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config["max_position_embeddings"]}
    out.update({k: v for k, v in tokenizer_config.items() if v is not None})
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(out, f, indent=2)


def convert_gguf(file: str, dst: str, *, dtype: torch.dtype = torch.float32) -> str:
    """Write the Hugging Face directory of a GGUF file at `dst` (built beside it, renamed into place)."""
    from safetensors.torch import save_file

    if dtype not in (torch.float32, torch.bfloat16):
        raise InputError(f"a GGUF import is written in float32 or bfloat16, not {dtype}")
    if os.path.exists(dst):
        raise InputError(f"{dst} already exists; remove it or give another destination")
    config, tensors = read_gguf(file, dtype=dtype)
    tmp = dst.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = dict(tensors)
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    config["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}, f, indent=2)
    write_tokenizer(file, tmp, config)
    os.replace(tmp, dst)
    return dst
