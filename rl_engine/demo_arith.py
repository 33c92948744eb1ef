"""The built-in task `builtin:arith`: arithmetic word problems with integer answers, for a real
pretrained chat model (`builtin:smollm2-135m-instruct`, `examples/smollm2_arith.yaml`).

Problems are generated here from templates and a seed (nothing downloaded), in three levels:
1. one addition or subtraction of two-digit numbers;
2. one multiplication or exact division (a one-digit factor);
3. two steps (a product then a sum or difference).
Each prompt asks for just the number; the trainer renders it with the model's chat template
(`data.apply_chat_template`). The eval split is held out: no (kind, numbers) key of it appears in
train. `arith_reward` parses the last number of the response (exact match: 1.0) and can add a
format bonus when the response is nothing but the number.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Callable

from rl_engine.rollout.verifiers import extract_last_number

NAMES = ("Tom", "Ann", "Sam", "Mia", "Leo", "Zoe", "Ben", "Eva", "Max", "Ivy")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cards", "books", "coins", "shells")
INSTRUCTION = "Answer with just the number."
LEVELS = (1, 2, 3)
MAX_EVAL = 600  # held-out problems, a third per level: level 2 has 272 distinct (kind, numbers) keys


def _level1(rng: random.Random) -> tuple[str, int, tuple]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b, ("add", a, b)
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b, ("sub", a, b)


def _level2(rng: random.Random) -> tuple[str, int, tuple]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 19), rng.randint(2, 9)
    if rng.random() < 0.5:
        return f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?", a * b, \
            ("mul", a, b)
    return f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?", a, \
        ("div", a * b, b)


def _level3(rng: random.Random) -> tuple[str, int, tuple]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    if rng.random() < 0.5:
        return (f"{name} has {c} {item} and buys {a} packs of {b} {item}. How many {item} does {name} have now?",
                c + a * b, ("muladd", a, b, c))
    c = rng.randint(1, a * b - 1)
    return (f"{name} buys {a} packs of {b} {item} and gives away {c}. How many {item} are left?", a * b - c,
            ("mulsub", a, b, c))


GENERATORS: dict[int, Callable[[random.Random], tuple[str, int, tuple]]] = {1: _level1, 2: _level2, 3: _level3}


def problems(rng: random.Random, n: int, *, exclude: set[tuple], distinct: bool,
             levels: tuple[int, ...] = LEVELS) -> list[dict]:
    """`n` problems cycling through `levels`, none whose (kind, numbers) key is in `exclude`; with
    `distinct`, no key twice (and `exclude` grows with the keys drawn). Level 2 has 272 keys, so a
    large train split repeats numbers (with other names and items)."""
    out: list[dict] = []
    while len(out) < n:
        level = levels[len(out) % len(levels)]
        question, answer, key = GENERATORS[level](rng)
        if key in exclude:
            continue
        if distinct:
            exclude.add(key)
        out.append({"prompt": f"{question} {INSTRUCTION}", "answer": str(answer), "level": level})
    return out


def write_arith_task(directory: str, *, seed: int = 0, num_train: int = 4000, num_eval: int = 200,
                     num_sft: int = 2000) -> dict[str, str]:
    """train.jsonl, eval.jsonl (held out) and sft.jsonl (correct demonstrations: the number) in
    `directory`; returns their paths."""
    if not 1 <= num_eval <= MAX_EVAL:
        raise ValueError(f"builtin:arith holds out at most {MAX_EVAL} distinct problems; data.num_eval={num_eval}")
    rng = random.Random(seed)
    seen: set[tuple] = set()
    evals = problems(rng, num_eval, exclude=seen, distinct=True)
    train = problems(rng, num_train, exclude=seen, distinct=False)
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f"{k}.jsonl") for k in ("train", "eval", "sft")}
    for key, rows in (("train", train), ("eval", evals)):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(paths["sft"], "w") as f:
        for i in range(num_sft):
            row = train[i % len(train)]
            f.write(json.dumps({"prompt": row["prompt"], "response": row["answer"]}) + "\n")
    return paths


_JUST_A_NUMBER = re.compile(r"^\s*-?\d+\.?\s*$")


def arith_reward(response: str, answer: str | None, *, format_bonus: float = 0.0, **metadata: Any) -> float:
    """1.0 when the last number of the response equals the integer answer, plus `format_bonus` when
    the response is just a number (reward.kwargs={format_bonus: 0.1})."""
    if answer is None:
        raise ValueError("the arith reward needs an answer; set the dataset's answer_key")
    predicted = extract_last_number(response.replace("\u2212", "-").replace(",", ""))
    correct = predicted is not None and re.fullmatch(r"-?\d+(\.0*)?", predicted) is not None \
        and int(float(predicted)) == int(answer)
    bonus = format_bonus if _JUST_A_NUMBER.match(response) else 0.0
    return (1.0 if correct else 0.0) + bonus
