"""Batched sampling and behavior log-probs.

Sampling is by inverse CDF: one uniform number per row, a cumulative sum of the (truncated,
temperature-scaled) unnormalised probabilities, a binary search. On CPU this is ~10x cheaper than
drawing Gumbel/exponential noise for every vocabulary entry, and the only randomness is one float per
row, computed in Python: for a seeded request from (seed, sample index, token position) through
`token_seed`, so its tokens depend neither on the batch it shares nor on preemption, interruption or
resumption; for an unseeded request from the engine's seeded `random.Random`.

Log-probs follow the contract: `log_softmax(logits / T)` over the full vocabulary before truncation
(T = 1 for greedy rows). Top-p avoids a full-vocabulary sort when the nucleus lies within the top
few hundred tokens (the usual case for trained models), sorting everything only when it does not.
"""

from __future__ import annotations

import random
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rl_engine.inference.compiled_call import direct_or_compiled
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.kernels.logprob import logprobs_only

_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int, position: int) -> int:
    """A 63-bit seed for one token of one sample (splitmix64 finaliser of a linear mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + position * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x >> 1


_U64 = [np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]
_SHIFTS = [np.uint64(c) for c in (30, 27, 31, 1)]


def token_uniforms(seeds: Sequence[int], indices: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """`token_seed(seed, index, position) / 2**63` for a batch of rows at once (numpy uint64 arithmetic
    wraps mod 2**64 as the masked Python does; the float conversion rounds the same 63-bit integer)."""
    return token_uniforms_at(token_uniform_base(seeds, indices), positions)


def token_uniform_base(seeds: Sequence[int], indices: Sequence[int]) -> np.ndarray:
    """The part of `token_uniforms`' linear mix that does not depend on the position (a sample's rows keep it
    from one token to the next): seed * c1 + index * c2 mod 2**64."""
    c1, c2, _, _ = _U64
    x = np.array([s & _MASK64 for s in seeds], dtype=np.uint64) * c1
    x += np.array(indices, dtype=np.uint64) * c2
    return x


def seeded_inverse_cdf_sample(z: torch.Tensor, base: np.ndarray, positions: Sequence[int], *,
                              logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The registry's `seeded_inverse_cdf_sample` reference: `inverse_cdf_sample` (kernels/reference.py) with the
    uniforms `token_uniforms_at(base, positions)`."""
    from rl_engine.kernels import reference

    uniforms = torch.as_tensor(token_uniforms_at(base, positions), dtype=torch.float64)
    return reference.inverse_cdf_sample(z, uniforms, logprobs=logprobs)


def token_uniforms_at(base: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """`token_uniforms` of the rows whose `token_uniform_base` is `base`, at `positions` (the sum mod 2**64 is
    the same whichever term is added first, so the uniforms are bit for bit token_seed's). The registry's
    `token_uniforms_at` (the engine's draw) runs this in one C++ loop on CPU, bit for bit (kernels/cpu/ops.py)."""
    _, _, c3, c4 = _U64
    s30, s27, s31, s1 = _SHIFTS
    x = np.array(positions, dtype=np.uint64)
    x *= c3
    x += base
    x ^= x >> s30
    x *= c3
    x ^= x >> s27
    x *= c4
    x ^= x >> s31
    x >>= s1
    return x * 2.0 ** -63  # (exact: a power of two, as the division by 2**63 was)


def same_setting(params: Sequence[SamplingParams]) -> bool:
    """Whether every row of `params` samples alike (temperature, top-k, top-p, min-p): `Sampler.sample`
    then treats the batch as one setting."""
    p0 = params[0]
    key0 = (p0.temperature, p0.top_k, p0.top_p, p0.min_p)
    return all(p is p0 or (p.temperature, p.top_k, p.top_p, p.min_p) == key0 for p in params)


@dataclass
class SampleRow:
    """What the sampler needs about one row: its params and, if seeded, the token's seed."""

    params: SamplingParams
    seed: int | None  # token_seed(...) of this token, or None to draw from the engine's generator


class DeferredLogits:
    """A CPU decode step's logits, not computed yet (`ModelRunner.defer_logits`): the model, the sampled rows'
    hidden states and the runner's packed-weights context. `tensor()` computes them (once, as the step would
    have); `greedy()` gives each row's first maximum without them where `packed_linear.greedy_pick` decides (the
    same ids as `greedy_argmax` of `tensor()`: an all-greedy batch without log-probs skips ~40% of the head's
    product where the screen is faster on this CPU, `packed_linear.screen_pays`), else from them."""

    __slots__ = ("model", "hidden", "reading", "_logits")

    def __init__(self, model, hidden: torch.Tensor, reading: Callable) -> None:
        self.model, self.hidden, self.reading = model, hidden, reading
        self._logits: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        if self._logits is None:
            with self.reading():
                self._logits = self.model.compute_logits(self.hidden)
        return self._logits

    def greedy(self) -> torch.Tensor | None:
        """[n] token ids, or None (compute `tensor()` and take its argmax)."""
        head, hidden = self.model.lm_head, self.hidden
        if (self._logits is not None or self.model.batch_invariant or head is None or head.groups.tp_size != 1
                or hidden.dtype != torch.float32 or hidden.device.type != "cpu"):
            return None
        from rl_engine.kernels.cpu import packed_linear

        weight = head.weight
        if head.dense is not packed_linear.linear or weight.shape[0] != head.vocab_size:
            return None
        with self.reading():  # (where the screen is not faster on this CPU: the logits, the same ids)
            return packed_linear.greedy_pick(hidden, weight) if packed_linear.screen_pays(hidden, weight) else None


def full_logits(logits: torch.Tensor | DeferredLogits) -> torch.Tensor:
    """The logits as a tensor (a `DeferredLogits`' computed)."""
    return logits.tensor() if type(logits) is DeferredLogits else logits


class Sampler:
    def __init__(self, *, device: torch.device, seed: int, batch_invariant: bool = False,
                 compile_greedy: bool = False) -> None:
        """`batch_invariant` (model.batch_invariant): behavior log-probs come from `logprobs_only`, the
        log-prob-only form of the statistics the trainer's log-probs use (`kernels.logprob`), so both
        round the same way. `compile_greedy` (the engine's compile_decode on CPU; not with batch_invariant):
        an all-greedy batch's tokens and log-probs come from `greedy_logprobs` compiled by torch.compile
        (on first use of each dtype, row kind, vocabulary size and thread count: `_CompiledGreedy`), whatever its
        size: called as its compiled code it is faster than the eager pass at every size measured, 1.3-3.7x over
        [1-64 rows, 64-152,064 columns], fp32 and bf16, 1 and 2 threads (fp32, 1 thread: [1, 64] 5.7 against 8.2 us,
        [1, 2048] 7.5 / 11.9, [8, 2048] 25.3 / 38.6, [64, 152064] 11.7 / 34.6 ms)."""
        if compile_greedy and batch_invariant:
            raise ValueError("compile_greedy=True cannot be combined with batch_invariant: the compiled reduction "
                             "rounds apart from the trainer's log-probs; turn one of them off")
        self.device = device
        self.rng = random.Random(seed)
        self.batch_invariant = batch_invariant
        self._compiled_greedy = _CompiledGreedy() if compile_greedy else None
        self._argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._sample: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._seeded_sample: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def _greedy_argmax(self, logits: torch.Tensor | DeferredLogits) -> torch.Tensor:
        """The registry's `greedy_argmax` for this device (on CPU the C++ pass: torch's max over [64, 32k] took
        ~0.85 ms a step), resolved at the first greedy batch without log-probs, so that engines that never
        have one (RL rollouts ask for log-probs) do not load the C++ extension for it. Deferred logits: their
        screened pick where it decides (`DeferredLogits.greedy`, the same ids)."""
        if type(logits) is DeferredLogits:
            tokens = logits.greedy()
            if tokens is not None:
                return tokens
            logits = logits.tensor()
        if self._argmax is None:
            from rl_engine.kernels import registry

            self._argmax = registry.resolve("greedy_argmax", self.device)
        return self._argmax(logits)

    def _inverse_cdf(self, z: torch.Tensor, uniforms: torch.Tensor, *,
                     logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The registry's `inverse_cdf_sample` for this device, resolved at the first batch that samples
        untruncated rows (as `_greedy_argmax`: an engine that never does, loads no C++ extension for it)."""
        if self._sample is None:
            from rl_engine.kernels import registry

            self._sample = registry.resolve("inverse_cdf_sample", self.device)
        return self._sample(z, uniforms, logprobs=logprobs)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[float]]:
        """logits [n, V] (any float dtype) -> (token ids, log-probs), one per row."""
        return self.sample(logits, [r.params for r in rows], lambda: self.uniforms([r.seed for r in rows]))

    def sample(self, logits: torch.Tensor | DeferredLogits, params: list[SamplingParams],
               draw: Callable[[], Sequence[float]], *, logprobs: bool = True, uniform: bool | None = None,
               seeded: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[list[int], list[float] | None]:
        """logits [n, V] (or a decode step's `DeferredLogits`) -> (token ids, log-probs), one per row of
        `params`. `draw()` gives the rows' uniforms in [0, 1); it is called once, and only when some row
        samples (not all greedy).
        `logprobs=False` (no row asks for any): the log-prob pass is skipped and None comes back in their
        place; the tokens are the same (greedy: one argmax; sampled: the draw never needed the log-sum-exp).
        `uniform`: `same_setting(params)` when the caller knows it (None: computed here).
        `seeded`: (base, positions) when draw() gives `token_uniforms_at(base, positions)`: the one-setting path that
        samples every row from its whole distribution then draws and picks in one call (the registry's
        `seeded_inverse_cdf_sample`) instead of calling draw()."""
        p0 = params[0]
        # One setting for the whole batch (the RL case: a step's requests differ only in their seeds):
        # scalar temperature and truncation, no per-row lists.
        if uniform is None:
            uniform = same_setting(params)
        temps = None if uniform else [p.temperature for p in params]
        if not self.batch_invariant and (p0.temperature == 0 if uniform else not any(temps)):
            # all greedy (the logits as they come: bf16 converts inside)
            if not logprobs:  # the first maximum, as greedy_logprobs' max (bf16 -> fp32 is exact)
                return self._greedy_argmax(logits).tolist(), None
            tokens, logprobs = (self._compiled_greedy or greedy_logprobs)(full_logits(logits))
            return tokens.tolist(), logprobs.tolist()
        logits = full_logits(logits)
        logits = logits if logits.dtype == torch.float32 else logits.float()
        if uniform:
            t0 = p0.temperature
            z = logits / t0 if t0 > 0 and t0 != 1.0 else logits
            if t0 > 0 and not self.batch_invariant and not _truncates(p0, vocab=z.shape[1]):
                # every row samples from its whole distribution (the RL rollout's case): the registry's
                # inverse_cdf_sample, on CPU one C++ pass per row (seeded rows: their uniforms in the same call)
                if seeded is not None:
                    if self._seeded_sample is None:
                        from rl_engine.kernels import registry

                        self._seeded_sample = registry.resolve("seeded_inverse_cdf_sample", self.device)
                    tokens, lps = self._seeded_sample(z, *seeded, logprobs=logprobs)
                    return tokens.tolist(), None if lps is None else lps.tolist()
                tokens, lps = self._inverse_cdf(z, torch.as_tensor(draw(), dtype=torch.float64), logprobs=logprobs)
                return tokens.tolist(), None if lps is None else lps.tolist()
            sampling, all_sampling = t0 > 0, t0 > 0
        elif all(t == temps[0] for t in temps):
            scale = temps[0] if temps[0] > 0 else 1.0
            z = logits / scale if scale != 1.0 else logits
            sampling, all_sampling = temps[0] > 0, temps[0] > 0
        else:
            z = logits / torch.tensor([t if t > 0 else 1.0 for t in temps], device=logits.device)[:, None]
            sampling, all_sampling = any(temps), all(temps)
        u = draw() if sampling else None
        # a row sampling from its whole distribution takes the kernel whatever else is in the batch (the
        # same seed gives the same token: the kernel's and the torch draw can part within a few ulp); the
        # torch path below draws only the other rows
        plain = [] if uniform or not sampling or self.batch_invariant else [
            i for i, p in enumerate(params) if p.temperature > 0 and not _truncates(p, vocab=z.shape[1])]
        if plain:
            if len(plain) == len(params):  # per-request temperatures, no truncation (a serving batch)
                tokens, lps = self._inverse_cdf(z, torch.as_tensor(u, dtype=torch.float64), logprobs=logprobs)
                return tokens.tolist(), None if lps is None else lps.tolist()
            plain_idx = torch.tensor(plain, device=z.device)
            plain_tokens, plain_lps = self._inverse_cdf(
                z[plain_idx], torch.tensor([u[i] for i in plain], dtype=torch.float64), logprobs=logprobs)
            is_plain = set(plain)
            rest = [i for i in range(len(params)) if i not in is_plain]
            all_tokens = torch.empty(len(params), dtype=torch.long, device=z.device)
            all_tokens[plain_idx] = plain_tokens
            all_lps = None
            if logprobs:
                all_lps = torch.empty(len(params), dtype=z.dtype, device=z.device)
                all_lps[plain_idx] = plain_lps
            z = z[torch.tensor(rest, device=z.device)]
            params, temps, u = [params[i] for i in rest], [temps[i] for i in rest], [u[i] for i in rest]
            sampling, all_sampling = any(temps), all(temps)
        if sampling:
            z_max = z.amax(dim=-1, keepdim=True)
            e = (z - z_max).exp_()  # unnormalised probabilities, in (0, 1]
            if logprobs:
                lse = z_max + e.sum(dim=-1, keepdim=True).log_()
            if not uniform:
                e = _truncate(e, z, params)
            elif _truncates(p0, vocab=e.shape[1]):
                e = _truncate(e, z, [p0] * len(params))
            cdf = e.cumsum_(dim=-1)  # e is not needed afterwards
            target = torch.as_tensor(u, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
            # First index whose cumulative mass exceeds the target: never a zero-mass (truncated) entry.
            tokens = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
            if not all_sampling:  # greedy rows (T = 1 there) take argmax
                greedy = torch.tensor([t == 0 for t in temps], device=z.device)[:, None]
                tokens = torch.where(greedy, z.max(dim=-1, keepdim=True)[1], tokens)
        else:  # all greedy: under batch_invariant, or the rows beside untruncated ones
            z_max, tokens = z.max(dim=-1, keepdim=True)
            if logprobs and not self.batch_invariant:
                lse = z_max + (z - z_max).exp_().sum(dim=-1, keepdim=True).log_()
        if self.batch_invariant:
            return tokens.view(-1).tolist(), shared_logprobs(z, tokens.view(-1)).tolist() if logprobs else None
        lps = (z.gather(1, tokens) - lse).view(-1) if logprobs else None
        tokens = tokens.view(-1)
        if plain:
            rest_idx = torch.tensor(rest, device=z.device)
            all_tokens[rest_idx] = tokens
            tokens = all_tokens
            if logprobs:
                all_lps[rest_idx] = lps
                lps = all_lps
        return tokens.tolist(), None if lps is None else lps.tolist()

    def uniforms(self, seeds: list[int | None]) -> list[float]:
        """One uniform in [0, 1) per seed (a `token_seed`), or from the engine's generator for None."""
        return [s / 2.0 ** 63 if s is not None else self.rng.random() for s in seeds]


class _CompiledGreedy:
    """`greedy_logprobs` compiled (shapes dynamic, inductor's C++ wrapper) once per kind of logits a graph serves, of
    contiguous 2-D CPU logits: the dtype, one row or more (dynamo specialises a size of 1), the vocabulary size (the
    graph's guards bound it: inductor sums up to 4096 terms plainly and more through a cascade, whose rounding the
    log-prob contract needs at a 152k vocabulary) and torch's thread count (its parallel loops are built for it; the
    engine may run small steps on one thread). The vocabulary is fixed per engine, so that is one compile per dtype, row
    kind and thread count. Each is called as its compiled code (`compiled_call.direct_code`: ~25-30 us a call less
    than through dynamo's guards, which these keys stand for; [64, 32000] 2.61 -> 2.44 ms, [8, 2048] 57 -> 25 us).
    Other logits take one torch.compile of it as is, guards evaluated."""

    def __init__(self) -> None:
        self._direct: dict[tuple[torch.dtype, bool, int, int], Callable] = {}
        self._guarded = torch.compile(greedy_logprobs, dynamic=True, fullgraph=True)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.dim() != 2 or not logits.is_cpu or not logits.is_contiguous() or logits.shape[1] < 2:
            return self._guarded(logits)
        key = (logits.dtype, logits.shape[0] == 1, logits.shape[1], torch.get_num_threads())
        direct = self._direct.get(key)
        if direct is not None:
            return direct(logits)
        # a copy of greedy_logprobs with a code object of its own: dynamo's cache of this key alone
        fn = types.FunctionType(greedy_logprobs.__code__.replace(), greedy_logprobs.__globals__,
                                f"greedy_logprobs_{str(logits.dtype).split('.')[-1]}_{'one' if key[1] else 'rows'}"
                                f"_v{key[2]}_t{key[3]}")
        compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
        out = compiled(logits)
        self._direct[key] = direct_or_compiled(fn, compiled, (logits,), what="compile_greedy")
        return out


def greedy_logprobs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] (any float dtype) -> (argmax [n] long, its log-prob [n] fp32 at T = 1). The argmax's
    log-prob is -log(sum(exp(z - max z))): the log-softmax's statistics without its output. Compiled
    (`Sampler(compile_greedy=True)`), the bf16 -> fp32 conversion, max/argmax and the sum of exponentials
    become one row-wise kernel reading the logits once, where eagerly they are five passes over [n, V]
    fp32 temporaries (at 64 rows of a 32k vocabulary, 8 MiB each)."""
    z = logits.float()
    z_max, argmax = z.max(dim=-1, keepdim=True)
    return argmax.view(-1), (z - z_max).exp_().sum(dim=-1).log_().neg_()


def shared_logprobs(z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(z)[token] per row of z [n, V] (already divided by the temperature) by the log-prob-only
    form of the softmax statistics (`kernels.logprob.logprobs_only`): bit for bit what the trainer computes
    from the same logits, without its entropy."""
    return logprobs_only(z, tokens)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution the sampler draws from, normalised: softmax(logits / T) after top-k, top-p and
    min-p ([n, V] fp32; every row needs T > 0). Speculative decoding's p (target) and q (draft)."""
    z = logits.float() / torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    e = (z - z.max(dim=-1, keepdim=True).values).exp_()
    e = _truncate(e, z, params)
    return e / e.sum(dim=-1, keepdim=True)


def inverse_cdf(weights: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """Draw one index per row of non-negative `weights` [n, V] (any scale) -> [n] long."""
    cdf = weights.cumsum(dim=-1)
    target = torch.tensor(uniforms, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1).view(-1)


def _truncates(params: SamplingParams, *, vocab: int) -> bool:
    """Whether top-k, top-p or min-p of `params` can remove tokens from a vocabulary of `vocab`."""
    return 0 < params.top_k < vocab or params.top_p < 1.0 or bool(params.min_p)


def _truncate(e: torch.Tensor, z: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, then min-p (the transformers order), zeroing entries of e [n, V] (the
    unnormalised probabilities exp(z - max z)). Returns e, possibly a new tensor."""
    n, vocab = e.shape
    top_ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_ks):
        k_max = max(top_ks)
        kth = torch.topk(z, k_max, dim=-1).values.gather(
            1, torch.tensor([(k or k_max) - 1 for k in top_ks], device=z.device)[:, None])
        kth.masked_fill_(torch.tensor([k == 0 for k in top_ks], device=z.device)[:, None], float("-inf"))
        e = e.masked_fill(z < kth, 0.0)
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        e = e.masked_fill(e < _nucleus_floor(e, top_ps), 0.0)
    min_ps = [p.min_p for p in params]
    if any(min_ps):
        # p >= min_p * p_max  <=>  e >= min_p (e is 1 at the maximum)
        e = e.masked_fill(e < torch.tensor(min_ps, device=e.device)[:, None], 0.0)
    return e


def _nucleus_floor(e: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Per row, the smallest unnormalised probability inside the nucleus ([n, 1]; 0 for top_p = 1):
    tokens sorted by probability are kept while the mass strictly before them is < top_p."""
    n, vocab = e.shape
    p = torch.tensor(top_ps, device=e.device)[:, None]
    total = e.sum(dim=-1, keepdim=True)
    k = min(vocab, 256)
    while True:
        head = torch.topk(e, k, dim=-1).values  # descending
        before = head.cumsum(dim=-1) - head  # unnormalised mass strictly before each entry
        inside = before < p * total
        # the head decides a row when its last entry is already outside the nucleus (or k = vocab)
        if k == vocab or not bool(inside[:, -1][p[:, 0] < 1.0].any()):
            last = inside.sum(dim=-1, keepdim=True).clamp_(min=1) - 1
            floor = head.gather(1, last)
            return floor.masked_fill_(p >= 1.0, 0.0)
        k = min(vocab, k * 8)
