"""Rewards: math answer checking on tricky cases, registry and dotted paths, the worker pool."""

import logging
import os

import pytest

import rollout_reward_fns  # pytest puts this test directory on sys.path; spawned workers inherit it
from rl_engine.rollout.rewards import RewardComputer, RewardConfig, get_reward_fn, registered_rewards
from rl_engine.rollout.verifiers import extract_boxed, extract_predicted_answer, math_reward, parse_number


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        ("so she has 72 clips.\n#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),
        ("The total is \\boxed{1234}.", "#### 1,234", 1.0),
        ("The total is \\boxed{1,234}", "#### 1234", 1.0),
        ("costs $18.00 in all", "#### 18", 1.0),
        ("It is \\boxed{\\$18}", "18", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
        ("\\boxed{0.333}", "1/3", 0.0),
        ("\\boxed{25\\%}", "#### 25", 1.0),
        ("25%", "0.25", 1.0),
        ("first 3 then \\boxed{5} then 9", "5", 1.0),  # boxed beats the last number
        ("\\boxed{2} ... on reflection \\boxed{7}", "7", 1.0),  # last boxed wins
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\boxed{\\frac{\\sqrt{3}}{2}}", 1.0),  # nested braces, symbolic
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{2}}{2}", 0.0),
        ("I think 5 apples and then 12 more, so 17", "17", 1.0),
        ("so 17", "18", 0.0),
        ("no digits here", "3", 0.0),
        ("the answer is \u22123", "-3", 1.0),
        ("x = \\boxed{-4}", "-4", 1.0),
        ("\\boxed{x = 2}", "2", 1.0),
        ("<think>maybe 3</think><answer>42</answer> and 7", "42", 1.0),
        ("#### 1,000,000", "1000000", 1.0),
        ("\\boxed{18 \\text{ dollars}}", "18", 1.0),
        ("\\boxed{12", "12", 1.0),  # unbalanced brace: falls back to the last number
        ("3.5 is it", "7/2", 1.0),
        ("\\boxed{1e3}", "1000", 1.0),
    ],
)
def test_math_reward_tricky_cases(response: str, answer: str, expected: float) -> None:
    assert math_reward(response, answer) == expected


def test_extraction_helpers() -> None:
    assert extract_boxed("a \\boxed{\\frac{a}{b^{2}}} b") == "\\frac{a}{b^{2}}"
    assert extract_boxed("\\boxed 5.") == "5"
    assert extract_boxed("nothing") is None
    assert extract_predicted_answer("#### 12 apples") == "12 apples"
    assert parse_number("12 apples") is not None and parse_number("12 apples")[0] == 12
    assert parse_number("1/0") is None


def test_builtin_registry_and_dotted_paths() -> None:
    assert {"math", "exact_match", "format"} <= set(registered_rewards())
    assert get_reward_fn("exact_match")("  Hello   World ", "hello world") == 1.0
    assert get_reward_fn("exact_match")("Hello", "hello world") == 0.0
    assert get_reward_fn("exact_match")("ABC", "abc", ignore_case=False) == 0.0
    assert get_reward_fn("exact_match")(" ABC", "ABC ", ignore_case=False) == 1.0
    fmt = get_reward_fn("format")
    assert fmt("<think>a\nb</think> <answer>4</answer>", None) == 1.0
    assert fmt("<answer>4</answer>", None) == 0.0
    assert fmt("ANSWER: 4", None, pattern=r"^ANSWER: \d+$") == 1.0
    assert get_reward_fn("rollout_reward_fns:length_reward") is rollout_reward_fns.length_reward
    assert get_reward_fn("rollout_reward_fns.length_reward") is rollout_reward_fns.length_reward
    assert get_reward_fn("test_registered_upper") is rollout_reward_fns.registered_upper


@pytest.mark.parametrize(
    "name,needle",
    [
        ("nope", "unknown reward 'nope'; registered: ["),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("rollout_reward_fns:missing", "has no attribute 'missing'"),
        ("rollout_reward_fns:NOT_CALLABLE", "is a int, not a function"),
    ],
)
def test_get_reward_fn_errors_name_the_problem(name: str, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        get_reward_fn(name)
    assert needle in str(info.value)


def test_in_process_mode_scores_and_counts_failures(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(UserWarning, match="not enforced"):
        computer = RewardComputer(RewardConfig(name="rollout_reward_fns:hang_on_hang", num_workers=0, failure_score=-1.0))
    with caplog.at_level(logging.WARNING):
        outcomes, stats = computer.compute(["ok", "raise", "nan", "str"], ["a"] * 4)
    assert [o.score for o in outcomes] == [1.0, -1.0, -1.0, -1.0]
    assert "boom from the reward" in outcomes[1].error
    assert "non-finite" in outcomes[2].error and "expected a float" in outcomes[3].error
    assert (stats.num_errors, stats.num_timeouts, stats.num_failed) == (3, 0, 3)
    assert "boom from the reward" in caplog.text


def test_metadata_and_kwargs_reach_the_function_and_dict_scores() -> None:
    with pytest.warns(UserWarning):
        computer = RewardComputer(RewardConfig(name="rollout_reward_fns:length_reward", num_workers=0, kwargs={"scale": 2.0}))
    outcomes, _ = computer.compute(["abc", "ab"], [None, None], metadata=[{}, {"scale": 10.0}])
    assert [o.score for o in outcomes] == [6.0, 20.0]
    with pytest.warns(UserWarning):
        outcomes, _ = RewardComputer(RewardConfig(name="rollout_reward_fns:dict_reward", num_workers=0)).compute(["xyz!"], [None])
    assert outcomes[0].score == 0.5 and outcomes[0].extra == {"note": "xyz"}
    with pytest.raises(ValueError, match="they must match"):
        computer.compute(["a"], [])


def test_pool_times_out_hung_reward_and_survives_errors_and_deaths() -> None:
    config = RewardConfig(name="rollout_reward_fns:hang_on_hang", num_workers=2, timeout_s=1.5, failure_score=-1.0)
    with RewardComputer(config) as computer:
        responses = ["ok", "hang", "ok", "raise", "die", "ok", "ok"]
        outcomes, stats = computer.compute(responses, ["a"] * len(responses))
        assert [o.score for o in outcomes] == [1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0]
        assert outcomes[1].timed_out and "timed out" in outcomes[1].error
        assert "RuntimeError: boom from the reward" in outcomes[3].error
        assert "worker died (exit code 3)" in outcomes[4].error
        assert (stats.num_items, stats.num_timeouts, stats.num_errors, stats.num_worker_restarts) == (7, 1, 2, 2)
        # The pool was rebuilt: the next batch runs normally on fresh workers.
        outcomes, stats = computer.compute(["ok", "ok", "ok"], ["a"] * 3)
        assert [o.score for o in outcomes] == [1.0, 1.0, 1.0] and stats.num_failed == 0


@pytest.fixture
def slow_import(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Reward workers (not this process) spend 3 s importing `slow_import_rewards`."""
    monkeypatch.setenv("RL_ENGINE_TEST_REWARD_PARENT", str(os.getpid()))
    monkeypatch.setenv("RL_ENGINE_TEST_REWARD_IMPORT_S", "3")
    return monkeypatch


def test_worker_start_up_does_not_count_against_the_reward_timeout(slow_import: pytest.MonkeyPatch) -> None:
    """Each worker spends 3 s importing the reward's module, twice the 1.5 s item timeout: every item
    still scores, the first ones on a fresh worker and the ones after a timeout on its replacement,
    while a call that itself runs past the timeout still times out."""
    config = RewardConfig(name="slow_import_rewards:score", num_workers=1, timeout_s=1.5, failure_score=-1.0)
    with RewardComputer(config) as computer:
        outcomes, stats = computer.compute(["import_seconds", "ab", "hang", "import_seconds", "abcd"], [None] * 5)
        scores = [o.score for o in outcomes]
        assert scores[0] >= 3.0 and scores[3] >= 3.0  # both workers' imports outlasted the timeout
        assert scores[1:3] + scores[4:] == [2.0, -1.0, 4.0]
        assert outcomes[2].timed_out and "timed out after 1.5s" in outcomes[2].error
        assert (stats.num_timeouts, stats.num_errors, stats.num_worker_restarts) == (1, 0, 1)


def test_worker_start_up_has_its_own_bound_and_errors(slow_import: pytest.MonkeyPatch) -> None:
    slow = RewardConfig(name="slow_import_rewards:score", num_workers=1, timeout_s=10, startup_timeout_s=0.5)
    with RewardComputer(slow) as computer:
        with pytest.raises(RuntimeError, match=r"did not start within reward.startup_timeout_s=0.5s"):
            computer.compute(["ab"], [None])
    slow_import.setenv("RL_ENGINE_TEST_REWARD_IMPORT_FAIL", "1")
    with RewardComputer(RewardConfig(name="slow_import_rewards:score", num_workers=1)) as computer:
        with pytest.raises(RuntimeError, match=r"exited with code 1 while starting"):
            computer.compute(["ab"], [None])
    with pytest.raises(ValueError, match="startup_timeout_s \\(inf\\) must be finite and > 0"):
        RewardConfig(startup_timeout_s=float("inf"))


def test_pool_runs_builtin_math_reward() -> None:
    with RewardComputer(RewardConfig(name="math", num_workers=1)) as computer:
        outcomes, stats = computer.compute(["\\boxed{4}", "5"], ["#### 4", "#### 4"])
    assert [o.score for o in outcomes] == [1.0, 0.0] and stats.num_failed == 0


def test_unpicklable_reward_function_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    local = lambda response, answer, **m: 1.0  # noqa: E731
    monkeypatch.setattr(rollout_reward_fns, "local_lambda", local, raising=False)
    computer = RewardComputer(RewardConfig(name="rollout_reward_fns:local_lambda", num_workers=1))
    with pytest.raises(ValueError, match="cannot be sent to a worker process"):
        computer.compute(["x"], [None])


def test_reward_config_validation() -> None:
    with pytest.raises(ValueError, match="num_workers \\(-1\\) must be >= 0"):
        RewardConfig(num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardConfig(timeout_s=0)
