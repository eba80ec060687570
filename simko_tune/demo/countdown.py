"""Countdown arithmetic: the synthetic, verifiable task the CPU default trains on.

A problem gives a few small numbers and a target; a response is one arithmetic expression
that uses **every given number exactly once** (no other numbers), only ``+ - * /`` and
parentheses, and evaluates exactly (rational arithmetic) to the target. Most problems have
several valid expressions, so pass@K and diversity mean something on it.

Prompt (the whole prompt; use the ``plain`` template)::

    Numbers: 3 5 7. Target: 22.\\n

Response: ``3*5+7`` followed by the stop token ``<|im_end|>``. The gold answer encodes the
numbers and the target: ``"3,5,7=22"``.

Responses are untrusted: they are checked by a small recursive-descent parser over a token
list, bounded in length and nesting, never by ``eval``.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simko_tune.data import MathProblem

STOP_TOKEN = "<|im_end|>"
SOURCE = "countdown"
# Longer responses are rejected before parsing: a valid answer with four one- or two-digit
# numbers is at most ~25 characters; this leaves room for redundant parentheses.
MAX_RESPONSE_CHARS = 64
MAX_PAREN_DEPTH = 8
_OPS = "+-*/"
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_TOKEN_RE = re.compile(r"\s*(?:([0-9]{1,3})|([-+*/()]))")
_GOLD_RE = re.compile(r"^[0-9]{1,3}(?:,[0-9]{1,3}){1,5}=[0-9]{1,4}$")


def format_prompt(numbers: Sequence[int], target: int) -> str:
    return f"Numbers: {' '.join(map(str, numbers))}. Target: {target}.\n"


def format_gold(numbers: Sequence[int], target: int) -> str:
    return f"{','.join(map(str, numbers))}={target}"


def parse_gold(gold: str) -> tuple[list[int], int]:
    """``"3,5,7=22"`` → ``([3, 5, 7], 22)``. Gold strings come from our own generator, so a
    malformed one is a configuration error, not a wrong answer: it raises."""
    if not _GOLD_RE.match(gold):
        raise ValueError(f"countdown gold answer {gold!r} is not of the form '3,5,7=22'")
    nums, target = gold.split("=")
    return [int(n) for n in nums.split(",")], int(target)


# ---------------------------------------------------------------------------------------------
# Parsing and exact evaluation of untrusted expressions


class ExpressionError(ValueError):
    """The text is not an expression of the allowed form."""


def tokenize(text: str) -> list[str]:
    """Split into number, operator and parenthesis tokens; anything else is an error."""
    if len(text) > MAX_RESPONSE_CHARS:
        raise ExpressionError(f"expression longer than {MAX_RESPONSE_CHARS} characters")
    tokens: list[str] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ExpressionError(f"unexpected character at {pos}: {text[pos]!r}")
        number = m.group(1)
        if number is not None and number != str(int(number)):
            raise ExpressionError(f"number with a leading zero at {pos}: {number!r}")
        tokens.append(number or m.group(2))
        pos = m.end()
    return tokens


class _Parser:
    """``expr := term (('+'|'-') term)*``, ``term := atom (('*'|'/') atom)*``,
    ``atom := NUMBER | '(' expr ')'``. No unary minus, no implicit multiplication.
    Division by zero raises ``ZeroDivisionError``."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.numbers: list[int] = []

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ExpressionError("empty expression")
        value = self.expr()
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected token {self.tokens[self.pos]!r}")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.atom()
        while self.peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.atom()
            value = value * rhs if op == "*" else value / rhs
        return value

    def atom(self) -> Fraction:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("expression ends early")
        self.pos += 1
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_PAREN_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_PAREN_DEPTH}")
            value = self.expr()
            if self.peek() != ")":
                raise ExpressionError("missing ')'")
            self.pos += 1
            self.depth -= 1
            return value
        if tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected token {tok!r}")


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of ``text`` and the numbers it uses, in order of appearance.
    Raises :class:`ExpressionError` or ``ZeroDivisionError``."""
    parser = _Parser(tokenize(text))
    return parser.parse(), parser.numbers


def clean_response(response: str) -> str:
    """The expression part of a response: surrounding whitespace and a trailing stop token
    (present when an engine does not strip it) removed."""
    text = response.strip()
    if text.endswith(STOP_TOKEN):
        text = text[: -len(STOP_TOKEN)].rstrip()
    return text


def countdown_reward(response: str, gold: str) -> float:
    """1.0 iff ``response`` is an expression that uses exactly the numbers of ``gold`` (each
    once, all of them), only ``+ - * /`` and parentheses, and equals the target; else 0.0.

    Top-level and picklable: it runs in the reward process pool.
    """
    numbers, target = parse_gold(gold)
    text = clean_response(response)
    try:
        tokens = tokenize(text)
    except ExpressionError:
        return 0.0
    # Cheap checks first: the number multiset must match before anything is evaluated.
    used = sorted(int(t) for t in tokens if t.isdigit())
    if used != sorted(numbers):
        return 0.0
    try:
        value = _Parser(tokens).parse()
    except (ExpressionError, ZeroDivisionError):
        return 0.0
    return 1.0 if value == target else 0.0


# ---------------------------------------------------------------------------------------------
# Exhaustive solver


@dataclass(frozen=True)
class _Expr:
    text: str
    value: Fraction
    op: str | None  # top-level operator; None for a single number


def _wrap(e: _Expr, parent: str, right: bool) -> str:
    """Parenthesise a child only where the tree needs it (what ``ast.unparse`` writes):
    lower precedence, or equal precedence on the right of any operator."""
    if e.op is None:
        return e.text
    if _PRECEDENCE[e.op] < _PRECEDENCE[parent] or (
        right and _PRECEDENCE[e.op] == _PRECEDENCE[parent]
    ):
        return f"({e.text})"
    return e.text


def _combine(a: _Expr, b: _Expr) -> Iterator[_Expr]:
    for op in _OPS:
        if op == "/" and b.value == 0:
            continue
        value = {
            "+": lambda: a.value + b.value,
            "-": lambda: a.value - b.value,
            "*": lambda: a.value * b.value,
            "/": lambda: a.value / b.value,
        }[op]()
        yield _Expr(f"{_wrap(a, op, False)}{op}{_wrap(b, op, True)}", value, op)


def _all_expressions(numbers: tuple[int, ...]) -> list[_Expr]:
    """Every binary expression tree over ``numbers`` in this order (all operator choices)."""
    if len(numbers) == 1:
        return [_Expr(str(numbers[0]), Fraction(numbers[0]), None)]
    out = []
    for split in range(1, len(numbers)):
        for a in _all_expressions(numbers[:split]):
            for b in _all_expressions(numbers[split:]):
                out.extend(_combine(a, b))
    return out


@lru_cache(maxsize=4096)
def solutions_by_target(numbers: tuple[int, ...]) -> dict[Fraction, tuple[str, ...]]:
    """All distinct expressions using every number once (any order), grouped by value.
    Keyed by the sorted multiset so that reorderings share the cache."""
    found: dict[Fraction, set[str]] = {}
    for perm in set(itertools.permutations(sorted(numbers))):
        for e in _all_expressions(perm):
            found.setdefault(e.value, set()).add(e.text)
    return {v: tuple(sorted(s)) for v, s in found.items()}


def solve(numbers: Sequence[int], target: int) -> list[str]:
    """Every distinct expression (minimal parentheses) that uses each of ``numbers`` once and
    equals ``target``; empty when it is unreachable."""
    return list(solutions_by_target(tuple(sorted(numbers))).get(Fraction(target), ()))


# ---------------------------------------------------------------------------------------------
# Problem generation


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CountdownSpec:
    """What problems look like. The defaults give 1,716 distinct problems (1,358 train, 193
    val, 165 test), median 4 solutions each; prompts are 15–16 tokens, answers 5–8. The
    validation split is for choosing settings, so the test split stays unseen until the
    report."""

    num_count: int = 3
    max_number: int = 9
    max_target: int = 50
    min_solutions: int = 2
    test_fraction: float = 0.1
    val_fraction: float = 0.1


def problem_split(
    numbers: Sequence[int], target: int, test_fraction: float, val_fraction: float = 0.0
) -> str:
    """``"train"``, ``"val"`` or ``"test"``, fixed per problem (multiset + target) by a
    stable hash, so held-out problems never appear in training whatever the seed."""
    key = format_gold(sorted(numbers), target).encode()
    bucket = zlib.crc32(key) % 1000
    if bucket < test_fraction * 1000:
        return "test"
    return "val" if bucket < (test_fraction + val_fraction) * 1000 else "train"


@lru_cache(maxsize=16)
def problem_universe(spec: CountdownSpec) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Every problem of ``spec`` as ``(sorted numbers, target)``: each multiset of numbers in
    1..max_number with each integer target in 1..max_target it reaches in at least
    ``min_solutions`` ways."""
    out = []
    for numbers in itertools.combinations_with_replacement(
        range(1, spec.max_number + 1), spec.num_count
    ):
        for value, sols in solutions_by_target(numbers).items():
            if value.denominator == 1 and 1 <= value <= spec.max_target:
                if len(sols) >= spec.min_solutions:
                    out.append((numbers, int(value)))
    return tuple(sorted(out))


def make_countdown_problems(
    n: int | None, seed: int, split: str = "train", spec: CountdownSpec | None = None
) -> list[MathProblem]:
    """``n`` distinct problems of ``split`` (one of ``SPLITS``) in a seeded random order,
    numbers shown in a seeded random order. For one seed, a smaller ``n`` gives a prefix of a
    larger one; ``None``: the whole split. Raises if the split holds fewer than ``n``."""
    from simko_tune.data import MathProblem

    spec = spec or CountdownSpec()
    if split not in SPLITS:
        raise ValueError(f"countdown split must be one of {SPLITS}, got {split!r}")
    pool = [
        (numbers, target)
        for numbers, target in problem_universe(spec)
        if problem_split(numbers, target, spec.test_fraction, spec.val_fraction) == split
    ]
    n = len(pool) if n is None else n
    if n > len(pool):
        raise ValueError(
            f"countdown {split} split holds {len(pool)} problems, {n} were requested ({spec}); "
            "ask for fewer or widen the spec"
        )
    rng = random.Random(f"countdown/{seed}")
    rng.shuffle(pool)
    out: list[MathProblem] = []
    for sorted_numbers, target in pool[:n]:
        numbers = list(sorted_numbers)
        rng.shuffle(numbers)
        gold = format_gold(numbers, target)
        out.append(MathProblem(f"countdown:{gold}", format_prompt(numbers, target), gold, SOURCE))
    return out


def load_countdown(
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    num_count: int = 3,
    max_number: int = 9,
    max_target: int = 50,
    min_solutions: int = 2,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
) -> list[MathProblem]:
    """Dataset entry point for configs (``_component_: simko_tune.demo.countdown.load_countdown``)."""
    spec = CountdownSpec(
        num_count, max_number, max_target, min_solutions, test_fraction, val_fraction
    )
    return make_countdown_problems(n, seed, split, spec)
