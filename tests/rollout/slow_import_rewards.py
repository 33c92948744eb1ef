"""A reward module whose import is slow, or fails, in reward worker processes only: in any process
but RL_ENGINE_TEST_REWARD_PARENT (the test's own, which imports it at once), the import sleeps
RL_ENGINE_TEST_REWARD_IMPORT_S seconds, or raises ImportError when RL_ENGINE_TEST_REWARD_IMPORT_FAIL
is set. The response "import_seconds" scores how long this process's import slept."""

import os
import time

IMPORT_SECONDS = 0.0
if str(os.getpid()) != os.environ.get("RL_ENGINE_TEST_REWARD_PARENT", str(os.getpid())):
    if os.environ.get("RL_ENGINE_TEST_REWARD_IMPORT_FAIL"):
        raise ImportError("slow_import_rewards: failing in the worker on purpose")
    _start = time.monotonic()
    time.sleep(float(os.environ.get("RL_ENGINE_TEST_REWARD_IMPORT_S", "0")))
    IMPORT_SECONDS = time.monotonic() - _start


def score(response: str, answer: str | None, **metadata: object) -> float:
    if response == "hang":
        time.sleep(100)
    if response == "import_seconds":
        return IMPORT_SECONDS
    return float(len(response))
