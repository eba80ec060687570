"""Is a predicted answer mathematically the gold answer?

Order of tests, cheapest first: normalised strings, answer structure (lists, sets, tuples,
intervals, matrices, equations, inequalities) compared element-wise, multiple-choice
letters, plain numbers (parsed with `fractions`, never `eval`), then guarded sympy.

Tolerance: two exact answers (integers, fractions, surds) must be equal; an integer gold
must be hit exactly (`204.0` is right, `204.01` is not); otherwise a decimal on either side
is compared with relative tolerance 1e-4, as the Qwen2.5-Math grader does. A percent sign
on either side also admits the value scaled by 100 (`50\\%` = `50` = `0.5`).

Call through `RewardPool`: it adds the hard wall-clock limit that bounds sympy.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from sympy import Rational

from simko_tune.rewards import symbolic
from simko_tune.rewards.extract import extract_answer
from simko_tune.rewards.normalize import normalize

MAX_ANSWER_CHARS = 1000
MAX_NESTING = 20
MAX_ITEMS = 40
_PERCENT_SCALES = (Fraction(1), Fraction(1, 100), Fraction(100))


# ---- answer structure -------------------------------------------------------------------


@dataclass(frozen=True)
class Scalar:
    text: str


@dataclass(frozen=True)
class Sequence:
    """Tuple or interval (`open`/`close` brackets kept), or a bare `a, b` list (no brackets)."""

    items: tuple
    open: str
    close: str


@dataclass(frozen=True)
class SetOf:
    items: tuple


@dataclass(frozen=True)
class Union:
    items: tuple


@dataclass(frozen=True)
class Matrix:
    rows: tuple


@dataclass(frozen=True)
class Equation:
    lhs: str
    rhs: str


@dataclass(frozen=True)
class Relation:
    """`lhs op rhs` with op one of `<`, `\\le` (greater-than forms are flipped)."""

    lhs: str
    op: str
    rhs: str


@dataclass(frozen=True)
class Inequality:
    """One relation or a chain of two (`1 \\le x < 2`)."""

    relations: tuple


_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_MATRIX_RE = re.compile(r"^\\begin\{pmatrix\}(.*)\\end\{pmatrix\}$", re.S)
_REL_RE = re.compile(
    r"\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|\\lt(?![a-zA-Z])|\\gt(?![a-zA-Z])|<=|>=|<|>"
)
_REL_CANON = {
    "\\le": "\\le",
    "<=": "\\le",
    "\\lt": "<",
    "<": "<",
    "\\ge": "\\ge",
    ">=": "\\ge",
    "\\gt": ">",
    ">": ">",
}
_FLIP = {"\\ge": "\\le", ">": "<"}
_NAME_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?[\w\\ ]+\}?|')?(?:\([a-zA-Z,]*\))?$")
_CHOICE_GOLD_RE = re.compile(r"^\(?([A-E])\)?$")
_CHOICE_PRED_RE = re.compile(r"^\(?([A-E])\)?$|^\(([A-E])\)(?![-+*/^=])")


def _split_top(s: str, sep: str) -> list[str]:
    """Split at occurrences of `sep` outside any bracket pair."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            if sep[0] != "\\" or not s[i + len(sep) : i + len(sep) + 1].isalpha():
                parts.append(s[start:i])
                start = i + len(sep)
                i = start
                continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _closes_at_end(s: str) -> bool:
    """Whether the bracket opening at s[0] closes at the last character."""
    depth = 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


def _parse(s: str, level: int = 0) -> object:
    """Answer structure of a normalised string (see the classes above)."""
    if level > 6 or not s:
        return Scalar(s)
    pieces = _split_top(s, "\\cup")
    if len(pieces) > 1:
        return Union(tuple(_parse(p, level + 1) for p in pieces))
    if _THOUSANDS_RE.match(s):
        return Scalar(s.replace(",", ""))
    items = _split_top(s, ",")
    if len(items) > 1:
        return Sequence(tuple(_parse(p, level + 1) for p in items), "", "")
    m = _MATRIX_RE.match(s)
    if m:
        rows = [r for r in _split_top(m.group(1), "\\\\") if r]
        return Matrix(tuple(tuple(_parse(c, level + 1) for c in _split_top(r, "&")) for r in rows))
    if s.startswith("\\{") and s.endswith("\\}") and _closes_at_end(s[1:]):
        inner = s[2:-2].strip()
        return SetOf(tuple(_parse(p, level + 1) for p in _split_top(inner, ",")) if inner else ())
    if s[0] in "([" and s[-1] in ")]" and _closes_at_end(s):
        inner = _split_top(s[1:-1], ",")
        if len(inner) == 1:
            return _parse(inner[0], level + 1)
        return Sequence(tuple(_parse(p, level + 1) for p in inner), s[0], s[-1])
    sides = _split_top(s, "=")
    if len(sides) == 2 and sides[0] and sides[1]:
        return Equation(sides[0], sides[1])
    rel = _parse_relation(s)
    if rel is not None:
        return rel
    pm = _split_top(s, "\\pm")
    if len(pm) == 2:
        return SetOf((Scalar(f"{pm[0]}+{pm[1]}"), Scalar(f"{pm[0]}-{pm[1]}")))
    if s == "\\emptyset":
        return SetOf(())
    return Scalar(s)


def _parse_relation(s: str) -> Inequality | None:
    ops = list(_REL_RE.finditer(s))
    if not ops or len(ops) > 2:
        return None
    parts = _REL_RE.split(s)
    if any(not p.strip() for p in parts):
        return None
    rels = []
    for i, op in enumerate(ops):
        lhs, rhs, canon = parts[i].strip(), parts[i + 1].strip(), _REL_CANON[op.group(0)]
        if canon in _FLIP:
            lhs, rhs, canon = rhs, lhs, _FLIP[canon]
        rels.append(Relation(lhs, canon, rhs))
    return Inequality(tuple(rels))


def _relation_as_interval(ineq: Inequality) -> Sequence | None:
    """`x > 3` -> `(3, \\infty)`, `1 \\le x < 2` -> `[1, 2)`, for one named variable."""
    rels = ineq.relations
    low, high, lo_br, hi_br = "-\\infty", "\\infty", "(", ")"
    names = set()
    for r in rels:
        if _NAME_RE.match(r.lhs) and not _NAME_RE.match(r.rhs):  # x < b
            names.add(r.lhs)
            high, hi_br = r.rhs, ("]" if r.op == "\\le" else ")")
        elif _NAME_RE.match(r.rhs) and not _NAME_RE.match(r.lhs):  # a < x
            names.add(r.rhs)
            low, lo_br = r.lhs, ("[" if r.op == "\\le" else "(")
        else:
            return None
    if len(names) != 1:
        return None
    return Sequence((Scalar(low), Scalar(high)), lo_br, hi_br)


# ---- scalars ----------------------------------------------------------------------------

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_RE = re.compile(rf"^({_NUM})(?:[eE]([+-]?\d{{1,3}}))?$")
_SCI_RE = re.compile(rf"^({_NUM})(?:\\times|\\cdot|\*)10\^\{{?([+-]?\d{{1,3}})\}}?$")
_FRAC_RE = re.compile(rf"^([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}$")
_SLASH_RE = re.compile(rf"^({_NUM})/({_NUM})$")
_MIXED_RE = re.compile(r"^(\d+)\\frac\{(\d+)\}\{(\d+)\}$")


@dataclass(frozen=True)
class _Number:
    value: Fraction
    approx: bool  # written with a decimal point or in scientific notation


def _decimal(text: str) -> Fraction:
    return Fraction(Decimal(text))


def _parse_number(s: str) -> _Number | None:
    """A plain number (integer, decimal, scientific, `a/b`, `\\frac{a}{b}`, mixed number)."""
    if len(s) > 400:
        return None
    try:
        if m := _PLAIN_RE.match(s):
            value = _decimal(m.group(1)) * (Fraction(10) ** int(m.group(2) or 0))
            return _Number(value, "." in m.group(1) or m.group(2) is not None)
        if m := _SCI_RE.match(s):
            return _Number(_decimal(m.group(1)) * Fraction(10) ** int(m.group(2)), True)
        if m := _FRAC_RE.match(s) or _SLASH_RE.match(s):
            groups = m.groups()
            sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
            num, den = _decimal(groups[-2]), _decimal(groups[-1])
            return _Number(sign * num / den, "." in groups[-2] + groups[-1])
        if m := _MIXED_RE.match(s):
            whole, num, den = (int(g) for g in m.groups())
            return _Number(whole + Fraction(num, den), False)
    except (InvalidOperation, ZeroDivisionError, ValueError):
        return None
    return None


def _numbers_equal(gold: _Number, pred: _Number, percent: bool) -> bool:
    scales = _PERCENT_SCALES if percent else _PERCENT_SCALES[:1]
    for scale in scales:
        g = gold.value * scale
        if not (gold.approx or pred.approx) or (not gold.approx and g.denominator == 1):
            if g == pred.value:
                return True
        elif abs(g - pred.value) <= Fraction(1, 10**4) * max(abs(g), abs(pred.value)):
            return True
    return False


def _scalar_equal(gold: str, pred: str, percent: bool) -> bool:
    if gold == pred:
        return True
    if m := _CHOICE_GOLD_RE.match(gold):
        p = _CHOICE_PRED_RE.match(pred)
        return bool(p) and (p.group(1) or p.group(2)) == m.group(1)
    gold_num, pred_num = _parse_number(gold), _parse_number(pred)
    if gold_num and pred_num:
        return _numbers_equal(gold_num, pred_num, percent)
    if re.fullmatch(r"[A-Za-z][A-Za-z ]{2,}", gold):  # words: "odd", "no solution"
        return gold.lower() == pred.lower()
    a, b = symbolic.to_sympy(gold), symbolic.to_sympy(pred)
    if a is None or b is None:
        return False
    a, b = symbolic.prepare_pair(a, b)
    if percent and not a.free_symbols and not b.free_symbols:
        return any(symbolic.expr_equal(a * scale, b) for scale in (1, Rational(1, 100), 100))
    return symbolic.expr_equal(a, b)


# ---- structure comparison ---------------------------------------------------------------


def _unordered_equal(gold: tuple, pred: tuple, percent: bool) -> bool:
    if len(gold) != len(pred) or len(gold) > MAX_ITEMS:
        return False
    unused = list(pred)
    for g in gold:
        for j, p in enumerate(unused):
            if _equal(g, p, percent):
                del unused[j]
                break
        else:
            return False
    return True


def _ordered_equal(gold: tuple, pred: tuple, percent: bool) -> bool:
    return len(gold) == len(pred) <= MAX_ITEMS and all(
        _equal(g, p, percent) for g, p in zip(gold, pred)
    )


def _vector(m: Matrix) -> tuple | None:
    if all(len(r) == 1 for r in m.rows):
        return tuple(r[0] for r in m.rows)
    if len(m.rows) == 1:
        return m.rows[0]
    return None


def _equation_equal(gold: Equation, pred: Equation, percent: bool) -> bool:
    if gold.lhs == pred.lhs:
        return _equal(_parse(gold.rhs), _parse(pred.rhs), percent)
    if gold.lhs == pred.rhs and gold.rhs == pred.lhs:
        return True
    sides = [symbolic.to_sympy(x) for x in (gold.lhs, gold.rhs, pred.lhs, pred.rhs)]
    if any(x is None for x in sides):
        return False
    ga, gb = symbolic.prepare_pair(sides[0], sides[1])
    pa, pb = symbolic.prepare_pair(sides[2], sides[3])
    return symbolic.equation_equal(ga, gb, pa, pb)


def _inequality_equal(gold: Inequality, pred: Inequality, percent: bool) -> bool:
    if len(gold.relations) != len(pred.relations):
        return False
    return all(
        g.op == p.op
        and _equal(_parse(g.lhs), _parse(p.lhs), percent)
        and _equal(_parse(g.rhs), _parse(p.rhs), percent)
        for g, p in zip(gold.relations, pred.relations)
    )


def _equal(gold: object, pred: object, percent: bool) -> bool:
    """Structural comparison: lists unordered, tuples/intervals ordered with brackets."""
    if gold == pred:
        return True
    if isinstance(gold, Equation) and not isinstance(pred, Equation):
        return bool(_NAME_RE.match(gold.lhs)) and _equal(_parse(gold.rhs), pred, percent)
    if isinstance(pred, Equation) and not isinstance(gold, Equation):
        return bool(_NAME_RE.match(pred.lhs)) and _equal(gold, _parse(pred.rhs), percent)
    if isinstance(gold, Equation):
        return _equation_equal(gold, pred, percent)
    if isinstance(gold, Inequality) or isinstance(pred, Inequality):
        if isinstance(gold, Inequality) and isinstance(pred, Inequality):
            return _inequality_equal(gold, pred, percent)
        if isinstance(pred, Inequality):
            pred = _relation_as_interval(pred)
        else:
            gold = _relation_as_interval(gold)
        return gold is not None and pred is not None and _equal(gold, pred, percent)
    if isinstance(gold, Scalar):
        return isinstance(pred, Scalar) and _scalar_equal(gold.text, pred.text, percent)
    if isinstance(gold, SetOf) or (isinstance(gold, Sequence) and not gold.open):
        if isinstance(pred, SetOf) or (isinstance(pred, Sequence) and not pred.open):
            return _unordered_equal(gold.items, pred.items, percent)
        return False
    if isinstance(gold, Sequence):
        if isinstance(pred, Sequence) and (
            (pred.open, pred.close) == (gold.open, gold.close)
            or (not pred.open and gold.open == "(")
        ):
            return _ordered_equal(gold.items, pred.items, percent)
        if isinstance(pred, Matrix) and gold.open == "(" and (vec := _vector(pred)) is not None:
            return _ordered_equal(gold.items, vec, percent)
        return False
    if isinstance(gold, Matrix):
        if isinstance(pred, Matrix):
            return len(gold.rows) == len(pred.rows) and all(
                _ordered_equal(g, p, percent) for g, p in zip(gold.rows, pred.rows)
            )
        vec = _vector(gold)
        if isinstance(pred, Sequence) and pred.open in ("(", "[", "") and vec is not None:
            return _ordered_equal(vec, pred.items, percent)
        return False
    if isinstance(gold, Union):
        return isinstance(pred, Union) and _unordered_equal(gold.items, pred.items, percent)
    return False


def _too_big(s: str) -> bool:
    return len(s) > MAX_ANSWER_CHARS or symbolic.brace_depth(s) > MAX_NESTING


def answers_match(pred: str, gold: str) -> bool:
    """Whether `pred` is mathematically the same answer as `gold` (see module docstring).

    Oversized or deeply nested answers are refused outright (scored wrong)."""
    if pred is None or gold is None or _too_big(pred) or _too_big(gold):
        return False
    return _match_normalized(pred, gold)


@functools.lru_cache(maxsize=8192)  # a group of rollouts often repeats one answer
def _match_normalized(pred: str, gold: str) -> bool:
    p, g = normalize(pred), normalize(gold)
    if not p.text or not g.text:
        return False
    if p.text == g.text:
        return True
    return _equal(_parse(g.text), _parse(p.text), p.percent or g.percent)


def math_reward(response: str, gold: str) -> float:
    """1.0 when the response's final answer (see `extract_answer`) matches `gold`, else 0.0."""
    pred = extract_answer(response)
    return 1.0 if pred is not None and answers_match(pred, gold) else 0.0
