"""`SpeculativeConfig`: the vLLM-style `speculative_config` dict, typed and validated where it is built.

    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    {"method": "draft_model", "model": PATH_OR_CAUSAL_LM, "num_speculative_tokens": k}
    {"method": "mtp", "num_speculative_tokens": k}  (DeepSeek-V3's own multi-token-prediction layers)

Optional for both: "disable_by_batch_size": no drafting while that many sequences are running.
Unknown keys are errors naming the nearest valid key; keys of the other method are errors too. The
n-gram window defaults follow vLLM: neither bound given -> both 5; one given -> the other equals it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model", "mtp")
_NGRAM_ONLY = ("prompt_lookup_max", "prompt_lookup_min")
_DRAFT_ONLY = ("model",)


@dataclass(kw_only=True)
class SpeculativeConfig:
    method: str  # "ngram" (prompt lookup) or "draft_model" (a smaller CausalLM sharing the tokenizer)
    num_speculative_tokens: int  # k: drafts proposed per sequence per step
    prompt_lookup_max: int | None = None  # ngram: longest suffix n-gram searched for
    prompt_lookup_min: int | None = None  # ngram: shortest n-gram that counts as a match
    model: Any = None  # draft_model: a Hugging Face directory or a CausalLM (used in place, never copied)
    # No drafts in a step when at least this many sequences are running (large batches are compute-bound
    # and gain little from speculation); None: always draft. vLLM's knob of the same name.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"speculative_config method {self.method!r} is not one of {', '.join(METHODS)}{hint}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer >= 1, got {k!r}")
        b = self.disable_by_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be an integer >= 1 or None, got {b!r}")
        if self.method == "mtp":
            for name in (*_NGRAM_ONLY, *_DRAFT_ONLY):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config {name!r} is not for method 'mtp': the target's own MTP "
                                     "layers draft")
        elif self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config 'model' is only for method 'draft_model'; "
                                 "the ngram method drafts from the prompt and output itself")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ValueError(f"speculative_config {name} must be an integer >= 1, got {value!r}")
            if lo is None and hi is None:
                lo = hi = 5
            lo = hi if lo is None else lo
            hi = lo if hi is None else hi
            if lo > hi:
                raise ValueError(f"speculative_config prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
            self.prompt_lookup_min, self.prompt_lookup_max = lo, hi
        else:
            for name in _NGRAM_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config {name!r} is only for method 'ngram'")
            if self.model is None:
                raise ValueError("speculative_config method 'draft_model' needs 'model': a Hugging Face model "
                                 "directory or a CausalLM sharing the target's tokenizer")
            if not isinstance(self.model, (str, os.PathLike)) and not hasattr(self.model, "kv_cache_spec"):
                raise ValueError(f"speculative_config model must be a model directory or a CausalLM, "
                                 f"got {type(self.model).__name__}")

    @classmethod
    def from_dict(cls, config: "dict[str, Any] | SpeculativeConfig") -> "SpeculativeConfig":
        if isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict or a SpeculativeConfig, got {type(config).__name__}")
        valid = [f.name for f in fields(cls)]
        for key in config:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
                raise ValueError(f"unknown speculative_config key {key!r}{hint}")
        for key in ("method", "num_speculative_tokens"):
            if key not in config:
                raise ValueError(f"speculative_config needs {key!r} (e.g. {{'method': 'ngram', "
                                 "'num_speculative_tokens': 3}})")
        return cls(**config)
