"""Plain numbers, parsed with `fractions` (never `eval`) and compared with the tolerance our
benchmarks need: exact against exact, relative 1e-4 when either side is a decimal (as the
Qwen2.5-Math grader), an integer gold hit exactly, percent admitting a factor of 100.

Math-Verify rounds to a fixed number of decimal places instead, which is too loose for
Minerva's small constants (``3.61e-10`` vs ``3.62e-10``) and too strict for decimals
given to five significant digits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_PERCENT_SCALES = (Fraction(1), Fraction(1, 100), Fraction(100))
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_RE = re.compile(rf"^({_NUM})(?:[eE]([+-]?\d{{1,3}}))?$")
_SCI_RE = re.compile(rf"^({_NUM})(?:\\times|\\cdot|\*)10\^\{{?([+-]?\d{{1,3}})\}}?$")
_FRAC_RE = re.compile(rf"^([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}$")
_SLASH_RE = re.compile(rf"^({_NUM})/({_NUM})$")
_MIXED_RE = re.compile(r"^(\d+)\\frac\{(\d+)\}\{(\d+)\}$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


@dataclass(frozen=True)
class PlainNumber:
    value: Fraction
    approx: bool  # written with a decimal point or in scientific notation


def _decimal(text: str) -> Fraction:
    return Fraction(Decimal(text))


def parse_number(s: str) -> PlainNumber | None:
    """A plain number (integer, decimal, scientific, `a/b`, `\\frac{a}{b}`, mixed number,
    `1,000` thousands) in a normalised answer, or None."""
    if len(s) > 400:
        return None
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    try:
        if m := _PLAIN_RE.match(s):
            value = _decimal(m.group(1)) * (Fraction(10) ** int(m.group(2) or 0))
            return PlainNumber(value, "." in m.group(1) or m.group(2) is not None)
        if m := _SCI_RE.match(s):
            return PlainNumber(_decimal(m.group(1)) * Fraction(10) ** int(m.group(2)), True)
        if m := _FRAC_RE.match(s) or _SLASH_RE.match(s):
            groups = m.groups()
            sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
            num, den = _decimal(groups[-2]), _decimal(groups[-1])
            return PlainNumber(sign * num / den, "." in groups[-2] + groups[-1])
        if m := _MIXED_RE.match(s):
            whole, num, den = (int(g) for g in m.groups())
            return PlainNumber(whole + Fraction(num, den), False)
    except (InvalidOperation, ZeroDivisionError, ValueError):
        return None
    return None


def numbers_equal(gold: PlainNumber, pred: PlainNumber, percent: bool) -> bool:
    scales = _PERCENT_SCALES if percent else _PERCENT_SCALES[:1]
    for scale in scales:
        g = gold.value * scale
        if not (gold.approx or pred.approx) or (not gold.approx and g.denominator == 1):
            if g == pred.value:
                return True
        elif abs(g - pred.value) <= Fraction(1, 10**4) * max(abs(g), abs(pred.value)):
            return True
    return False
