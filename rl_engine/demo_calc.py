"""The built-in agentic task `builtin:calc`: multi-step arithmetic with a `calculator` tool.

A question is `calc A*B+C` (two-digit A, B, C; the answer has four digits): a product the tiny models
cannot compute in their heads, and one tool call away. `calc_agent` (`rollout.fn:
rl_engine.demo_calc:calc_agent`) gives the policy the tool; a turn whose output holds a Hermes
`<tool_call>` is answered with the calculator's result as a tool message, a turn without one is the
final answer, scored by exact match.

The warm start imitates a demonstrator that calls the tool only `p_tool` of the time and otherwise
answers at once with a guess, always the same kind (`calc 37*48+12` -> `3748`; given a tool result, it
answers with it): the warm-started policy calls the tool in a minority of its samples and guesses
under greedy decoding (the guess's first digit is more likely than the tool call's `<`), so held-out
accuracy starts near 0 and RL has to discover that the tool pays (as the `upper` demo's noisy
demonstrator does).
"""

from __future__ import annotations

import ast
import json
import operator
import os
import random

CALCULATOR_TOOL = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression of integers with + - * / and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """The tool: an integer arithmetic expression's value ("1788"; "7.5" for an inexact quotient).
    Raises ValueError for anything else (the session turns it into a tool message)."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("expression must be a string of at most 200 characters")

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    result = value(tree.body)
    return str(int(result)) if result == int(result) else f"{result:g}"


def tool_call_text(expression: str) -> str:
    """The Hermes tool call as the chat template writes it (rl_engine.policy.presets.CHAT_TEMPLATE)."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def _questions(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    out, seen = [], set(exclude)
    while len(out) < n:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        expression = f"{a}*{b}+{c}"
        if 1000 <= a * b + c <= 9999 and expression not in seen:
            seen.add(expression)
            out.append(expression)
    return out


def write_calc_task(directory: str, *, seed: int = 0, num_train: int = 4000, num_eval: int = 200,
                    num_sft: int = 2000, p_tool: float = 0.3) -> dict[str, str]:
    """train.jsonl / eval.jsonl ({"prompt", "answer"}) and sft.jsonl (per-turn demonstrations:
    {"messages": the conversation so far, "response": the assistant turn}) in `directory`."""
    rng = random.Random(seed)
    evals = _questions(rng, num_eval, set())
    train = _questions(rng, num_train, set(evals))
    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f"{k}.jsonl") for k in ("train", "eval", "sft")}
    for key, questions in (("train", train), ("eval", evals)):
        with open(paths[key], "w") as f:
            for expression in questions:
                f.write(json.dumps({"prompt": f"calc {expression}", "answer": calculator(expression)}) + "\n")
    with open(paths["sft"], "w") as f:
        for i in range(num_sft):
            expression = train[i % len(train)]
            user = {"role": "user", "content": f"calc {expression}"}
            if rng.random() < p_tool:
                f.write(json.dumps({"messages": [user], "response": tool_call_text(expression)}) + "\n")
            else:  # a guess, the same one every time: A and B side by side (wrong for every question)
                a, b = expression.split("+")[0].split("*")
                f.write(json.dumps({"messages": [user], "response": a + b}) + "\n")
            # Once it has a result, the demonstrator answers with it: the second turn is taught well.
            call = {"id": "call_0", "type": "function",
                    "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}
            turn2 = [user, {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_0", "content": calculator(expression)}]
            f.write(json.dumps({"messages": turn2, "response": calculator(expression)}) + "\n")
    return paths


async def calc_agent(session, item: dict) -> None:
    """The rollout function of `builtin:calc`: chat, run the tool calls, until a turn calls none."""
    messages = [{"role": "user", "content": item["prompt"]}]
    while True:
        reply = await session.chat(messages, tools=CALCULATOR_TOOL)
        messages.append(reply)
        if not reply.get("tool_calls"):
            return None
        messages += await session.call_tools(reply, {"calculator": calculator})
