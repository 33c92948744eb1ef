"""Tokenizer and chat template of a Hugging Face model directory, without transformers.

`tokenizer.json` is read by the `tokenizers` library; the chat template (from tokenizer_config.json
or chat_template.jinja) is rendered with jinja2 in a sandbox, with the same environment options and
helpers (`raise_exception`, `tojson`, `strftime_now`) that transformers gives templates, so that
prompts match what users get from `AutoTokenizer.apply_chat_template`.
"""

from __future__ import annotations

import datetime
import json
import os
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


def _token_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        return value.get("content")
    raise ValueError(f"unexpected special-token entry {value!r} in tokenizer_config.json")


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, *, config: dict[str, Any], chat_template: str | None,
                 eos_token_ids: list[int]) -> None:
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        ids = list(eos_token_ids)
        if self.eos_token is not None:
            eos_id = self._tok.token_to_id(self.eos_token)
            if eos_id is not None and eos_id not in ids:
                ids.append(eos_id)
        self.eos_token_ids = ids

    @classmethod
    def from_pretrained(cls, path: str, *, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}; a fast (tokenizers) tokenizer is required")
        config: dict[str, Any] = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        if eos_token_ids is None:
            eos_token_ids = []
            gen_cfg = os.path.join(path, "generation_config.json")
            if os.path.isfile(gen_cfg):
                with open(gen_cfg) as f:
                    eos = json.load(f).get("eos_token_id")
                eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(_HFTokenizer.from_file(tok_file), config=config, chat_template=template, eos_token_ids=eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Token text -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            from jinja2.exceptions import TemplateError

            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render a conversation with the model's chat template (as transformers does)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja); "
                             "pass plain-text prompts or add a template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "", **kwargs)
        # A template already writes the special tokens it wants; do not add them again.
        return self.encode(text, add_special_tokens=False) if tokenize else text
