"""Tiny chat checkpoints for the server and agentic tests, written offline: a character tokenizer with
Qwen-style special tokens and the Qwen2.5 chat template (tools included), over a random Qwen2 model, or
over a "chain" model whose greedy continuation of a token is a fixed next token (so a test can make
the model emit an exact text, e.g. a `<tool_call>` block)."""

from __future__ import annotations

import json
import os
import string

import torch

# The Qwen2.5-Instruct chat template (tools as Hermes <tool_call> JSON), as its tokenizer_config.json has it.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")


def chat_vocab(words: list[str] = ()) -> dict[str, int]:
    """Special tokens, then single characters, then whole `words` (added tokens)."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS + list(words))}


def write_chat_tokenizer(path: str, *, words: list[str] = (), template: str = QWEN25_TEMPLATE) -> dict[str, int]:
    """A character-level tokenizer.json (special tokens and `words` matched whole) with the template;
    `<|im_end|>` is the EOS, as in Qwen instruct models. Returns the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = chat_vocab(words)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens(SPECIAL_TOKENS[:3])
    tok.add_tokens(SPECIAL_TOKENS[3:] + list(words))  # not special: they stay in decoded text
    tok.decoder = decoders.Fuse()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "chat_template": template, "model_max_length": 512}, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": vocab["<|im_end|>"]}, f)
    return vocab


def _hf_config(vocab: dict[str, int], **overrides):
    from transformers import AutoConfig

    kw = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"], tie_word_embeddings=False)
    kw.update(overrides)
    return AutoConfig.for_model("qwen2", **kw)


def write_chat_model(path: str, *, seed: int = 0, max_position_embeddings: int = 1024) -> str:
    """A random tiny Qwen2 (tests/hf_models' init) with the chat tokenizer; returns `path`."""
    from hf_models import make_hf_model

    vocab = write_chat_tokenizer(path)
    model = make_hf_model("qwen2", seed=seed, vocab_size=len(vocab), max_position_embeddings=max_position_embeddings,
                          eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"],
                          tie_word_embeddings=False)
    model.save_pretrained(path)
    return path


def write_chain_model(path: str, *, chain: dict[str, str], words: list[str] = ()) -> str:
    """A Qwen2 whose greedy next token after token `a` is `chain[a]` (tokens given as their text): every
    layer adds nothing to the residual (o_proj and down_proj are zero), so the final hidden state is the
    normed embedding of the current token; embeddings are orthonormal rows and lm_head maps each one to
    its successor with a margin of 20 nats. Tokens without a successor have all-equal logits."""
    from transformers import AutoModelForCausalLM

    vocab = write_chat_tokenizer(path, words=words)
    hidden = 64 * ((len(vocab) + 63) // 64)
    model = AutoModelForCausalLM.from_config(_hf_config(vocab, hidden_size=hidden, intermediate_size=64,
                                                        num_attention_heads=4, num_key_value_heads=2,
                                                        head_dim=16), dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                p.normal_(0, 0.02)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
        embed = q[:len(vocab)]  # orthonormal rows; rmsnorm scales each to norm sqrt(hidden)
        model.model.embed_tokens.weight.copy_(embed)
        lm_head = torch.zeros(len(vocab), hidden)
        for a, b in chain.items():
            lm_head[vocab[b]] += embed[vocab[a]] * (20.0 / hidden ** 0.5)
        model.lm_head.weight.copy_(lm_head)
    model.save_pretrained(path)
    return path
