"""Helpers of the speculative-decoding tests: a draft model cut from the target, and chi-square
goodness of fit without scipy: Pearson's statistic over cells pooled to an expected count of at least
5, against the 0.999 critical values of the standard table (NIST/SEMATECH e-Handbook, 1.3.6.7.4),
linearly interpolated between tabulated degrees of freedom (the quantile is concave in df, so the
interpolation is slightly low, i.e. strict, by < 0.1%)."""

from __future__ import annotations

import dataclasses

_CRITICAL_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
                 9: 27.877, 10: 29.588, 12: 32.909, 15: 37.697, 20: 45.315, 25: 52.620, 30: 59.703, 40: 73.402,
                 50: 86.661, 60: 99.607, 70: 112.317, 80: 124.839, 90: 137.208, 100: 149.449}


def chi_square_critical_999(df: int) -> float:
    """The statistic a true null exceeds with probability 0.001, for 1 <= df <= 100."""
    if df in _CRITICAL_999:
        return _CRITICAL_999[df]
    lo = max(d for d in _CRITICAL_999 if d < df)
    hi = min(d for d in _CRITICAL_999 if d > df)
    w = (df - lo) / (hi - lo)
    return (1 - w) * _CRITICAL_999[lo] + w * _CRITICAL_999[hi]


def chi_square(observed: list[float], expected: list[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


def pooled_chi_square(observed: dict, probs: dict, n: int, *, min_expected: float = 5.0) -> tuple[float, int]:
    """(statistic, degrees of freedom) of counts `observed` (cell -> count, n in total) against cell
    probabilities `probs` (summing to 1); cells expected below `min_expected` are pooled into one, and
    an observation in a cell of probability 0 makes the statistic infinite."""
    if any(c not in probs or probs[c] <= 0 for c in observed):
        return float("inf"), 1
    big = [c for c, p in probs.items() if p * n >= min_expected]
    obs = [observed.get(c, 0) for c in big]
    exp = [probs[c] * n for c in big]
    rest_exp = n - sum(exp)
    if rest_exp > 1e-9:
        obs.append(n - sum(obs))
        exp.append(rest_exp)
    return chi_square(obs, exp), len(obs) - 1


def truncated_draft(target, num_layers: int = 1):
    """A smaller CausalLM that shares the target's tokenizer: its embedding, first `num_layers` layers,
    final norm and LM head (copies). Related to the target but different: drafts are often rejected."""
    from rl_engine.policy import CausalLM

    draft = CausalLM(dataclasses.replace(target.config, num_layers=num_layers), dtype=target.dtype)
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft.eval()
