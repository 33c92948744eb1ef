"""Reward functions used by the reward tests: importable by dotted path in spawned workers."""

import os
import time

from rl_engine.rollout.rewards import register_reward


def length_reward(response: str, answer: str | None, **metadata: object) -> float:
    return float(len(response)) * float(metadata.get("scale", 1.0))


def dict_reward(response: str, answer: str | None, **metadata: object) -> dict:
    return {"score": 0.5, "note": response[:3]}


def hang_on_hang(response: str, answer: str | None, **metadata: object) -> float:
    if response == "hang":
        time.sleep(100)
    if response == "raise":
        raise RuntimeError("boom from the reward")
    if response == "die":
        os._exit(3)
    if response == "nan":
        return float("nan")
    if response == "str":
        return "1.0"  # type: ignore[return-value]
    return 1.0


@register_reward("test_registered_upper")
def registered_upper(response: str, answer: str | None, **metadata: object) -> float:
    return 1.0 if response.isupper() else 0.0


NOT_CALLABLE = 42
