"""How to sample one request: vLLM's `SamplingParams` surface, validated when built.

Every invalid value is refused with the value and its allowed range, so a bad parameter fails at
`SamplingParams(...)` rather than deep inside a batched step. Log-probs are returned under the
log-prob contract (ARCHITECTURE.md): `log_softmax(logits / temperature)` over the full vocabulary,
before top-k / top-p / min-p truncation; at temperature 0 (greedy) the temperature-1 log-probs. They are
on by default (`logprobs=0`: the sampled tokens'), which every RL rollout path keeps; `logprobs=None`
(vLLM's default) asks for none, and the sampler then skips the log-prob pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class SamplingParams:
    """Sampling settings of one request (shared by its `n` samples)."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    max_tokens: int | None = 16  # None = until the context is full
    min_tokens: int = 0  # EOS / stop tokens / stop strings are ignored before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None  # per request: same seed -> same tokens, whatever else is in the batch
    # Per generated token, also return the `logprobs` most likely tokens and their log-probs (under the
    # contract's temperature, before truncation), as vLLM's `logprobs`. 0: only the sampled token's.
    # None: no log-probs at all (CompletionOutput.logprobs is None; the sampler computes none).
    logprobs: int | None = 0
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 means greedy)")
        _check(isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1), "top_k", self.top_k,
               "-1 or 0 (off) or an integer >= 1")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "(0, 1] (1 means off)")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "[0, 1] (0 means off)")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", self.max_tokens, "an integer >= 1 or None")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
               "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for t in self.stop_token_ids:
            _check(isinstance(t, int) and t >= 0, "stop_token_ids entry", t, "an integer token id >= 0")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop entry", s, "a non-empty string")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "an integer or None")
        # A bool is refused although it is an int (as the wire's `logprobs: bool` invites): False would still return
        # the sampled tokens' log-probs (False == 0; None is the opt-out), True would add a top-1 list per token
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                         and self.logprobs >= 0), "logprobs", self.logprobs,
               "None (no log-probs) or an integer >= 0 (top log-probs per token besides the sampled one's; "
               "0: the sampled tokens' only), not a bool")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} = {value!r} is invalid; allowed: {allowed}")
