"""Built-in verifiable tasks for the demo: rewrite a short string of letters (and `calc`, the agentic
multi-step arithmetic task with a calculator tool: rl_engine/demo_calc.py; `arith`, arithmetic word
problems for a real pretrained chat model: rl_engine/demo_arith.py).

`rl-engine train` with no arguments must show RL learning on 2 CPU cores in minutes, with nothing
downloaded. Tasks: "upper" (`upper abcd` -> `ABCD`, the demo's default) and "reverse"
(`reverse abcd` -> `dcba`). Strings have a fixed length (5 by default), so that "upper" is a copy
at a fixed offset plus a per-letter map, which a 2-layer model learns in a few hundred steps
(variable lengths need an induction circuit, which forms late and abruptly); "reverse" needs many
more steps. The reward is exact match, case-sensitive for these tasks.

The supervised warm start imitates a *noisy demonstrator* that does the task only `p_correct` of
the time and otherwise copies the string unchanged: the warm-started policy is right only some of
the time when sampling, and copies under greedy decoding. RL with the exact-match reward has to
discover what pays. Held-out accuracy is measured greedily on strings never seen in training.
"""

from __future__ import annotations

import json
import os
import random

from rl_engine.demo_arith import write_arith_task
from rl_engine.demo_calc import calculator, write_calc_task

ALPHABET = "abcdefghij"


def _strings(rng: random.Random, n: int, min_len: int, max_len: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len)))
        if s not in seen and s != s[::-1]:  # palindromes cannot tell reversing from copying
            seen.add(s)
            out.append(s)
    return out


TASKS = {"upper": str.upper, "reverse": lambda s: s[::-1], "calc": lambda expression: calculator(expression),
         "arith": None}  # arith's answers come with its generated problems


def write_task(directory: str, task: str, *, seed: int = 0, num_train: int = 4000, num_eval: int = 200,
               num_sft: int = 2000, p_correct: float = 0.4, min_len: int = 5, max_len: int = 5) -> dict[str, str]:
    """Write train.jsonl (prompts + answers for RL), eval.jsonl (held out) and sft.jsonl (noisy
    demonstrations: prompt + response) to `directory`; returns their paths."""
    if task not in TASKS:
        raise ValueError(f"unknown builtin task {task!r}; available: {', '.join(TASKS)}")
    if task == "calc":
        return write_calc_task(directory, seed=seed, num_train=num_train, num_eval=num_eval, num_sft=num_sft)
    if task == "arith":
        return write_arith_task(directory, seed=seed, num_train=num_train, num_eval=num_eval, num_sft=num_sft)
    solve = TASKS[task]
    rng = random.Random(seed)
    evals = _strings(rng, num_eval, min_len, max_len, set())
    train = _strings(rng, num_train, min_len, max_len, set(evals))
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f"{k}.jsonl") for k in ("train", "eval", "sft")}
    with open(paths["train"], "w") as f:
        for s in train:
            f.write(json.dumps({"prompt": f"{task} {s}", "answer": solve(s)}) + "\n")
    with open(paths["eval"], "w") as f:
        for s in evals:
            f.write(json.dumps({"prompt": f"{task} {s}", "answer": solve(s)}) + "\n")
    with open(paths["sft"], "w") as f:
        for i in range(num_sft):
            s = train[i % len(train)]
            response = solve(s) if rng.random() < p_correct else s
            f.write(json.dumps({"prompt": f"{task} {s}", "response": response}) + "\n")
    return paths
