"""Built-in rule-based rewards: `math` (answer checking), `exact_match`, `format`.

Math checking extracts one final answer from each side and compares them numerically with exact
rational arithmetic (`fractions.Fraction`), so "1,234", "1234.0", "$1234" and "\\boxed{1234}" agree
and 1/3 never equals 0.333. Non-numeric answers fall back to comparing normalised LaTeX strings.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from rl_engine.rollout.rewards import register_reward

THINK_ANSWER_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"

# A number as written in text: optional sign and $, thousands separators, decimals, a/b, percent.
_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|-?\$?\.\d+%?"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FRAC_RE = re.compile(r"^(-?)\\frac\{([^{}]*)\}\{([^{}]*)\}$")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces nested to any depth."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        # "\boxed 5" form: the next whitespace-separated token.
        rest = text[start:].split(maxsplit=1)
        return rest[1].split()[0].rstrip(".$") if len(rest) == 2 else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced braces: no answer


def extract_after_hashes(text: str) -> str | None:
    """GSM8K style: the rest of the line after the last '####'."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()


def extract_last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def extract_predicted_answer(response: str) -> str | None:
    """The model's final answer: inside the last <answer> tag if any, then \\boxed, then '####',
    then the last number."""
    response = response.replace("\u2212", "-")  # unicode minus, common in model output
    tagged = _ANSWER_TAG_RE.findall(response)
    if tagged:
        response = tagged[-1]
    for extract in (extract_boxed, extract_after_hashes):
        found = extract(response)
        if found:
            return found
    return extract_last_number(response)


def extract_gold_answer(answer: str) -> str:
    """The reference answer: after '####' (GSM8K), inside \\boxed (MATH), else the whole field."""
    return extract_after_hashes(answer) or extract_boxed(answer) or answer.strip()


def normalize_answer(text: str) -> str:
    """LaTeX-insensitive canonical form: no spacing macros, \\left/\\right, \\text, $, spaces."""
    s = text.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}", "\\$", "$"):
        s = s.replace(token, "")
    s = s.replace("\\%", "%")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s.strip())  # "x = 5" -> "5"
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def parse_number(text: str) -> list[Fraction] | None:
    """Numeric value(s) of an answer, or None. A percentage has two readings: p% == p == p/100."""
    s = normalize_answer(text)
    unit = re.fullmatch(rf"({_NUMBER})([a-zA-Z]+)", s)  # "18dollars" -> "18"
    if unit:
        s = unit.group(1)
    percent = s.endswith("%")
    s = s.rstrip("%").replace("$", "")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    frac = _FRAC_RE.match(s)
    try:
        if frac:
            value = Fraction(frac.group(2)) / Fraction(frac.group(3))
            value = -value if frac.group(1) else value
        else:
            value = Fraction(s)  # ints, decimals, "a/b", scientific notation
    except (ValueError, ZeroDivisionError):
        return None
    return [value, value / 100] if percent else [value]


def math_answers_equal(predicted: str, gold: str) -> bool:
    pred_values, gold_values = parse_number(predicted), parse_number(gold)
    if pred_values is not None and gold_values is not None:
        return any(p == g for p in pred_values for g in gold_values)
    return normalize_answer(predicted) == normalize_answer(gold)


@register_reward("math")
def math_reward(response: str, answer: str | None, **metadata: Any) -> float:
    """1.0 when the response's final answer equals the reference answer, else 0.0."""
    if answer is None:
        raise ValueError("the math reward needs an answer; set the dataset's answer_key")
    predicted = extract_predicted_answer(response)
    if predicted is None:
        return 0.0
    return 1.0 if math_answers_equal(predicted, extract_gold_answer(str(answer))) else 0.0


@register_reward("exact_match")
def exact_match_reward(response: str, answer: str | None, *, ignore_case: bool = True, **metadata: Any) -> float:
    """1.0 when response and answer are equal up to whitespace (and case, unless ignore_case=False:
    RewardConfig(name="exact_match", kwargs={"ignore_case": False}))."""
    if answer is None:
        raise ValueError("the exact_match reward needs an answer; set the dataset's answer_key")
    a, b = " ".join(response.split()), " ".join(str(answer).split())
    if ignore_case:
        a, b = a.lower(), b.lower()
    return 1.0 if a == b else 0.0


@register_reward("format")
def format_reward(
    response: str, answer: str | None, *, pattern: str = THINK_ANSWER_PATTERN, **metadata: Any
) -> float:
    """1.0 when `pattern` (re.search, DOTALL) matches; default: <think>...</think><answer>...</answer>.
    Configure with RewardConfig(name="format", kwargs={"pattern": ...})."""
    return 1.0 if re.search(pattern, response, flags=re.DOTALL) else 0.0
