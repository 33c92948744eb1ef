"""Reward functions for the RL loop tests, found by dotted path (`rl_test_rewards:has_vowel`) from
the actor processes too (tests put this directory on PYTHONPATH).

An untrained model on the built-in task never earns the exact-match reward, so every group would be
uniform; this one pays for any lowercase vowel, which a random policy emits about a third of the
time: groups mix 0s and 1s, advantages are non-zero, and some groups are uniform (dynamic sampling)."""


def has_vowel(response: str, answer: str | None, **_: object) -> float:
    return float(any(c in "aeiou" for c in response))
