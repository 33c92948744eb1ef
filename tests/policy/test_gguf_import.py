"""GGUF import on tiny files written by the `gguf` library's GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py writes a llama model (renamed tensors, q/k rows permuted for ggml's rope):
the converted directory gives the original transformers model's logits (our loader and
transformers'), Q8_0 weights de-quantize within the format's bound, and unsupported quantisation
types, architectures and tensor names are refused by name. No download."""

import json
import os

import numpy as np
import pytest
import torch

from hf_models import hf_logits_per_sequence, make_hf_model, packed
from rl_engine import cli
from rl_engine.config import InputError
from rl_engine.policy import from_pretrained
from rl_engine.policy.checkpoint import weight_table
from rl_engine.policy.gguf_import import GLOBAL_NAMES, LAYER_NAMES, convert_gguf
from rl_engine.policy.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="the GGUF import needs the gguf package (in the dev extra)")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SEQUENCES = [[5, 17, 3, 88, 41, 9, 60], [12, 2], [33, 71, 4, 4, 19, 50, 7, 28, 90, 1, 64]]


def _tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["he", "ll"] + SPECIALS


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF half-split rotary -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if hf_name in inverse:
        return inverse[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{ {v: k for k, v in LAYER_NAMES.items()}[rest]}"


def write_gguf(path: str, model, *, arch: str = "llama", quant=None, extra: dict | None = None) -> str:
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens = _tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, p in model.state_dict().items():
        t = p.detach().float()
        if name.endswith("q_proj.weight"):
            t = _permute(t, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, c.num_key_value_heads)
        array = t.numpy()
        if quant is not None and array.ndim == 2:
            w.add_tensor(_gguf_name(name), gguf.quantize(array, quant), raw_dtype=quant)
        else:
            w.add_tensor(_gguf_name(name), array)
    for name, (array, raw_dtype) in (extra or {}).items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_llama():
    # GQA (4 heads, 2 kv heads) so q and k are un-permuted with different head counts
    return make_hf_model("llama", vocab_size=len(_tokens()), tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def test_converted_gguf_gives_the_original_models_logits(tmp_path, hf_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    file = write_gguf(str(tmp_path / "tiny.gguf"), hf_llama)
    out = tmp_path / "hf"
    assert cli.main(["convert", "--from-gguf", file, str(out)]) == 0
    ids, positions, cu = packed(SEQUENCES)
    expected = hf_logits_per_sequence(hf_llama, SEQUENCES)
    with torch.no_grad():
        ours = from_pretrained(str(out))(ids, positions=positions, cu_seqlens=cu)
        direct = from_pretrained(file)(ids, positions=positions, cu_seqlens=cu)  # a .gguf without converting
    theirs = hf_logits_per_sequence(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), SEQUENCES)
    # F32 tensors: the same weights, so only the summation order differs (fp32 matmuls over 64-96 terms)
    for got in (ours, direct, theirs):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # the un-permutation matters: without it the same file gives other logits (so the check above could fail)
    import rl_engine.policy.gguf_import as gguf_import

    monkeypatch.setattr(gguf_import, "_unpermute", lambda w, n: w)
    with torch.no_grad():
        unpermuted = from_pretrained(file)(ids, positions=positions, cu_seqlens=cu)
    assert (unpermuted - expected).abs().max() > 1e-2


def test_gguf_tokenizer_and_chat_template(tmp_path, hf_llama):
    file = write_gguf(str(tmp_path / "tiny.gguf"), hf_llama)
    out = str(tmp_path / "hf")
    convert_gguf(file, out)
    tok = Tokenizer.from_pretrained(out)
    tokens = _tokens()
    assert tok.encode("hello", add_special_tokens=False) == [tokens.index("he"), tokens.index("ll"),
                                                             tokens.index("o")]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text, add_special_tokens=False)[0] == tokens.index("<|im_start|>")
    assert tok.eos_token_ids == [tokens.index("<|im_end|>")]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == tokens.index("<|im_end|>")


def test_q8_0_weights_dequantize_within_the_format_bound(tmp_path, hf_llama):
    file = write_gguf(str(tmp_path / "q8.gguf"), hf_llama, quant=gguf.GGMLQuantizationType.Q8_0)
    model = from_pretrained(file)
    original = hf_llama.state_dict()
    name = "model.layers.1.self_attn.k_proj.weight"  # permuted, then quantized in blocks of 32 along a row
    w = original[name]
    # Q8_0: per block of 32, scale d = max|x| / 127 (stored in fp16), q = round(x / d): |error| <= d / 2 plus
    # the fp16 rounding of d (2^-11 relative) times 127.
    d = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
    bound = (d * (0.5 + 127 * 2.0**-11)).expand(-1, -1, 32).reshape(w.shape)
    exported = weight_table(model)[name].export()
    assert ((exported - w).abs() <= bound + 1e-7).all()
    assert (exported - w).abs().max() > 0  # it really went through Q8_0


def test_unsupported_type_architecture_and_tensor_are_refused_by_name(tmp_path, hf_llama):
    iq = gguf.GGMLQuantizationType.IQ2_XXS
    bad_type = write_gguf(str(tmp_path / "iq.gguf"), hf_llama,
                          extra={"blk.0.attn_extra.weight": (np.zeros((1, 66), dtype=np.uint8), iq)})
    with pytest.raises(InputError, match=r"IQ2_XXS.*supported: F32"):
        convert_gguf(bad_type, str(tmp_path / "out1"))
    bad_arch = write_gguf(str(tmp_path / "gpt2.gguf"), hf_llama, arch="gpt2")
    with pytest.raises(InputError, match="architecture 'gpt2' is not supported"):
        from_pretrained(bad_arch)
    f32 = gguf.GGMLQuantizationType.F32
    bad_name = write_gguf(str(tmp_path / "name.gguf"), hf_llama,
                          extra={"blk.0.attn_sinks.weight": (np.zeros(4, dtype=np.float32), f32)})
    with pytest.raises(InputError, match="'blk.0.attn_sinks.weight' has no Hugging Face counterpart"):
        from_pretrained(bad_name)
    assert not os.path.exists(tmp_path / "out1") and not os.path.exists(tmp_path / "out1.partial")
    assert cli.main(["convert", "--from-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out2")]) != 0
