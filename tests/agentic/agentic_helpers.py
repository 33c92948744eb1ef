"""Offline tokenizers and chat templates for the agentic tests: a byte-level BPE trained here (so that
decoding sampled ids and encoding the text again changes them: the merges make a canonical split that
the model need not sample), Qwen2.5's chat template (tools, Hermes `<tool_call>`, `<|im_end|>` then a
newline separator), and a Qwen3-style one that drops `<think>` blocks of earlier assistant turns."""

from __future__ import annotations

import json
import os

from serve.chat_models import QWEN25_TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

QWEN_TEMPLATE = QWEN25_TEMPLATE  # tests/serve/chat_models.py: Qwen2.5's own template

# Qwen3's rule, reduced: an assistant turn before the last user message loses its <think> block.
THINK_DROPPING_TEMPLATE = r"""{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- if loop.index0 < ns.last_user and '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_CORPUS = [
    "the quick brown fox jumps over the lazy dog", "calculator expression arguments name result",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    '{"name": "calculator", "arguments": {"expression": "12*34+5"}}', "You are Qwen, created by Alibaba Cloud.",
    "system user assistant tool", "0123456789 + - * / ( ) = . ,", "hello world, this is a test of the tokenizer",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ", "# Tools You may call one or more functions",
]


def write_bpe_tokenizer(path: str, *, chat_template: str = QWEN_TEMPLATE, vocab_size: int = 320) -> int:
    """A byte-level BPE with Qwen's special tokens and `chat_template`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": chat_template}, f)
    return tok.get_vocab_size(with_added_tokens=True)


def write_bpe_model(path: str, *, chat_template: str = QWEN_TEMPLATE, seed: int = 0) -> str:
    """A tiny random policy (the `tiny` preset's shape) whose vocabulary is the BPE tokenizer's."""
    from rl_engine.policy.presets import write_preset_checkpoint
    from rl_engine.policy.tokenizer import Tokenizer

    probe = path + "_tok"
    vocab = write_bpe_tokenizer(probe, chat_template=chat_template)
    write_preset_checkpoint("tiny", path, seed=seed, vocab_size=vocab)
    write_bpe_tokenizer(path, chat_template=chat_template)  # replaces the character tokenizer
    im_end = Tokenizer.from_pretrained(path).token_to_id("<|im_end|>")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": im_end}, f)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.update(eos_token_id=im_end, bos_token_id=None)
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path
