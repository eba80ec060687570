"""Is a predicted answer mathematically the gold answer? Math-Verify decides, with the few
rules of ours that the labelled table (tests/rewards/test_answers_match.py) shows it gets
wrong on our benchmarks' answers.

Two reward modes, chosen in the config:

- ``boxed`` (`math_reward`): the paper's rule. The last ``\\boxed{}`` only; no box, no reward.
- ``math_verify`` (`math_verify_reward`): Math-Verify's own extraction (LaTeX and plain
  expressions anywhere in the response), as TRL and open-r1 use it.

Both compare with `answers_match`. Math-Verify runs with its own (signal-based) limits as a
soft fence that scores 0 without costing a worker; call through `RewardPool` for the hard
wall-clock limit, memory cap and crash recovery.

Our rules, each decided before Math-Verify is asked:

- Identical answers match, also after `normalize` (spacing, ``\\left``, ``\\dfrac``, units):
  no parsing, and Math-Verify compares what it cannot parse (``M_{\\odot}``) as raw strings.
- Two plain numbers (after `normalize`: units, ``\\$``, thousands separators, degrees,
  percent words) compare exactly when both are exact, and with relative tolerance 1e-4 when
  either is a decimal; an integer gold must be hit exactly; a percent sign on either side
  also admits the value scaled by 100. Math-Verify rounds to 6 decimal places, absolutely,
  so it takes ``3.61e-10`` for ``3.62e-10`` and rejects ``1.41421`` for ``\\sqrt{2}``.
- A decimal prediction against a closed-form constant (``\\pi``, ``\\sqrt{2}``, ``e^2``) is
  compared by value with the same relative tolerance.
- A multiple-choice gold (``A``-``E``) is matched by its letter only.
- A set gold is not matched by a lone element; an answer that contains ``\\boxed`` is refused.
- Inequalities in one variable are compared with intervals (``x > 5`` is ``(5, \\infty)``,
  Math-Verify's `allow_set_relation_comp`, both ways round).
- Before Math-Verify parses an answer: a one-column matrix becomes a tuple, a leading
  ``m_{\\max} =`` is dropped, and a few spellings it misses are rewritten (`_SPELLINGS`).

Each rule is there because a labelled case fails without it (tests/rewards).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from math_verify.utils import timeout
from sympy import Basic

from simko_tune.rewards.extract import extract_answer
from simko_tune.rewards.normalize import normalize
from simko_tune.rewards.numbers import numbers_equal, parse_number

MAX_ANSWER_CHARS = 1000
MAX_RESPONSE_CHARS = 200_000  # math_verify mode scans the whole response
MAX_NESTING = 20
APPROX_TOL = 1e-4
# Math-Verify's own limits (whole seconds, SIGALRM): a slow parse scores 0 without the pool
# having to kill and respawn a worker. The pool's wall clock stays the hard limit.
SOFT_TIMEOUT_S = 3
_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())

_CHOICE_GOLD_RE = re.compile(r"^\(?([A-E])\)?$")
_CHOICE_PRED_RE = re.compile(r"^\(?([A-E])\)?$|^\(([A-E])\)(?![-+*/^=])")
_SOLUTION_RE = re.compile(r"(?<!\\)\$|\\boxed")
_LIST_COMMA_RE = re.compile(r",\s")
_SET_RE = re.compile(r"^\\\{.+\\\}$")  # a non-empty set literal
_NAME_EQ_RE = re.compile(r"^\s*[a-zA-Z](?:_\{?[\w\\ ]+\}?)?\s*=(?!=)")
_COLUMN_RE = re.compile(r"^\\begin\{[pb]matrix\}(.*)\\end\{[pb]matrix\}$", re.S)
# Spellings Math-Verify's parser misses: unicode symbols, `\varnothing`, `\sqrt{-1}` for i.
_SPELLINGS = {
    "\u221a": "\\sqrt",
    "\u03c0": "\\pi ",
    "\u2212": "-",
    "\\varnothing": "\\emptyset",
    "\\sqrt{-1}": "i",
}

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every timeout


def _too_big(s: str) -> bool:
    depth = best = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth -= 1
    return len(s) > MAX_ANSWER_CHARS or best > MAX_NESTING


def _latex_for_math_verify(answer: str) -> str:
    """The small rewrites Math-Verify needs for our answers: `_SPELLINGS`, a leading
    ``m_{\\max} =`` (Math-Verify unwraps only plain-symbol assignments), a one-column matrix
    written as a tuple."""
    s = answer.strip()
    for src, dst in _SPELLINGS.items():
        s = s.replace(src, dst)
    if _NAME_EQ_RE.match(s) and s.count("=") == 1 and "," not in s:
        s = s.split("=", 1)[1]
    m = _COLUMN_RE.match(s)
    if m and "&" not in m.group(1):
        rows = [r.strip() for r in m.group(1).split("\\\\") if r.strip()]
        s = "(" + ", ".join(rows) + ")"
    return s


@functools.lru_cache(maxsize=4096)  # a group of rollouts repeats its gold and its answers
def parse_answer(answer: str) -> tuple[Any, ...]:
    """Math-Verify's parse of one bare answer (as if it were boxed); a gold given as a
    whole solution (with `$...$` or `\\boxed`) is read with Math-Verify's extraction."""
    if _SOLUTION_RE.search(answer):
        return tuple(parse(answer, _EXTRACTION, parsing_timeout=SOFT_TIMEOUT_S))
    latex = _latex_for_math_verify(answer)
    return tuple(parse(f"\\boxed{{{latex}}}", _EXTRACTION, parsing_timeout=SOFT_TIMEOUT_S))


@timeout(SOFT_TIMEOUT_S)
def _evalf(expr: Basic) -> complex:
    return complex(expr.evalf(30))


def _constant_value(parsed: tuple[Any, ...]) -> float | None:
    """The value of a closed-form constant (``\\sqrt{2}``, ``e^{2}``), if that is what it is
    (None for a tower such as ``9^{9^{9^{9}}}``, which the soft limit stops)."""
    for item in parsed:
        if isinstance(item, Basic) and getattr(item, "is_number", False):
            try:
                value = _evalf(item)
            except (TimeoutException, TypeError, ValueError, OverflowError, ZeroDivisionError):
                return None
            return value.real if value.imag == 0 and math.isfinite(value.real) else None
    return None


def _decimal_matches_constant(decimal: float, parsed: tuple[Any, ...]) -> bool:
    value = _constant_value(parsed)
    return value is not None and abs(value - decimal) <= APPROX_TOL * max(abs(value), 1e-12)


def _plain_number(raw: str, normalized: str):
    """A plain number, unless the raw answer is a list (`32, 349` is not 32349)."""
    return None if _LIST_COMMA_RE.search(raw) else parse_number(normalized)


def _text_verdict(pred: str, gold: str) -> bool | None:
    """Our rules that need no parsing (see the module docstring); None: undecided."""
    if "\\boxed" in pred:
        return False
    p, g = normalize(pred), normalize(gold)
    if m := _CHOICE_GOLD_RE.match(g.text):
        choice = _CHOICE_PRED_RE.match(p.text)
        return bool(choice) and (choice.group(1) or choice.group(2)) == m.group(1)
    if p.text and p.text == g.text and p.percent == g.percent:  # spacing, \left, \dfrac
        return True
    pred_num, gold_num = _plain_number(pred, p.text), _plain_number(gold, g.text)
    if pred_num and gold_num:
        return numbers_equal(gold_num, pred_num, p.percent or g.percent)
    if _SET_RE.match(g.text) and not _SET_RE.match(p.text) and "," not in p.text:
        return False
    return None


def _decimal_verdict(pred: str, gold: str, pred_parsed: tuple, gold_parsed: tuple) -> bool:
    """A decimal on one side, a closed-form constant on the other: compared by value."""
    for decimal, other in ((pred, gold_parsed), (gold, pred_parsed)):
        number = _plain_number(decimal, normalize(decimal).text)
        if number and number.approx and _decimal_matches_constant(float(number.value), other):
            return True
    return False


def _match(pred: str, pred_parsed: Callable[[], tuple], gold: str) -> bool:
    """`pred_parsed` is called only when our text rules leave the verdict open."""
    if _too_big(pred):
        return False
    if pred.strip() == gold.strip():
        return True
    gold_parsed = None
    if _SOLUTION_RE.search(gold):  # our rules read the answer Math-Verify found in it
        gold_parsed = parse_answer(gold)
        gold = next((g for g in gold_parsed if isinstance(g, str)), "")
    if _too_big(gold):
        return False
    verdict = _text_verdict(pred, gold)
    if verdict is not None:
        return verdict
    gold_parsed = gold_parsed or parse_answer(gold)
    parsed = pred_parsed()
    if _decimal_verdict(pred, gold, parsed, gold_parsed):
        return True
    return verify(
        list(gold_parsed),
        list(parsed),
        allow_set_relation_comp=True,
        timeout_seconds=SOFT_TIMEOUT_S,
    )


def answers_match(pred: str, gold: str) -> bool:
    """Whether the bare answer `pred` is mathematically the same answer as `gold`.

    Oversized or deeply nested answers are refused outright (scored wrong)."""
    if pred is None or gold is None or _too_big(pred):
        return False
    return _cached_match(pred, gold)


@functools.lru_cache(maxsize=8192)
def _cached_match(pred: str, gold: str) -> bool:
    return _match(pred, lambda: parse_answer(pred), gold)


def math_reward(response: str, gold: str) -> float:
    """``boxed`` mode: 1.0 when the last ``\\boxed{}`` of the response matches `gold`."""
    pred = extract_answer(response)
    return 1.0 if pred is not None and answers_match(pred, gold) else 0.0


def math_verify_extract(response: str) -> tuple[tuple[Any, ...], str | None]:
    """Math-Verify's extraction from a whole response: its parsed answer and the answer's
    text (None when it found nothing)."""
    if len(response) > MAX_RESPONSE_CHARS:
        return (), None
    parsed = tuple(parse(response, _EXTRACTION, parsing_timeout=SOFT_TIMEOUT_S))
    text = next((p for p in parsed if isinstance(p, str)), None)
    return parsed, text


def math_verify_reward(response: str, gold: str) -> float:
    """``math_verify`` mode: Math-Verify's extraction (LaTeX and plain expressions anywhere
    in the response, the last boxed answer first) compared by `answers_match`'s rules."""
    if gold is None:
        return 0.0
    parsed, text = math_verify_extract(response)
    if not parsed or text is None or _too_big(text):
        return 0.0
    # Math-Verify's parse of the response in context (it reads `1000,99` as a decimal) and
    # ours of the answer text alone (with `_latex_for_math_verify`'s rewrites): either counts.
    return 1.0 if _match(text, lambda: parsed + parse_answer(text), gold) else 0.0


REWARD_MODES = {"boxed": math_reward, "math_verify": math_verify_reward}


def reward_fn_for_mode(mode: str):
    """The reward function of a config's ``rewards.mode``."""
    if mode not in REWARD_MODES:
        raise ValueError(f"rewards.mode must be one of {sorted(REWARD_MODES)}, got {mode!r}")
    return REWARD_MODES[mode]


def extract_for_mode(response: str, mode: str = "boxed") -> str | None:
    """The answer text each mode grades (for logs and eval rows)."""
    reward_fn_for_mode(mode)
    if mode == "boxed":
        return extract_answer(response)
    return math_verify_extract(response)[1]


__all__ = [
    "answers_match",
    "extract_for_mode",
    "math_reward",
    "math_verify_reward",
    "reward_fn_for_mode",
]
