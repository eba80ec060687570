"""Guarded sympy: LaTeX in, a verdict out, with nothing executed and nothing huge evaluated.

Parsing uses `sympy.parsing.latex.parse_latex` (an ANTLR grammar that builds expressions,
never `eval`). Every parsed tree is walked before any evaluation: integrals, sums and limits
are refused, and an upper bound on the number of digits of every intermediate value (powers,
factorials, binomials) must stay small, so `10^{10^{10^{10}}}` is refused instead of
computed. Equality is first tested numerically at fixed sample points (fast, and it rejects
almost every wrong answer), then with `simplify(a - b) == 0`; the pool's wall-clock limit
fences whatever slips through.
"""

from __future__ import annotations

import functools
import math
import re

import sympy
from sympy.core.function import AppliedUndef
from sympy.parsing.latex import parse_latex

MAX_LATEX_CHARS = 400
MAX_BRACE_DEPTH = 12
MAX_NODES = 400
MAX_DIGITS = 10_000  # bound on log10 |value| of any sub-expression
APPROX_TOL = 1e-4  # relative, as the Qwen2.5-Math grader
_REFUSED_LATEX = re.compile(r"\\(?:sum|prod|int|iint|oint|lim|partial|mathbb|over)(?![a-zA-Z])")
_REFUSED_NODES = (
    sympy.Sum,
    sympy.Product,
    sympy.Integral,
    sympy.Limit,
    sympy.Derivative,
    sympy.Subs,
)
_CONSTANTS = {"pi": sympy.pi, "e": sympy.E, "i": sympy.I}
_SAMPLES = (0.7183, 1.3141, 2.1213, 1.6180, 0.5772, 1.9021, 2.5066, 1.2599)


def brace_depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth -= 1
    return best


def _digits_bound(expr: sympy.Basic) -> float:
    """Upper bound on log10 |value| of `expr` (symbols taken near 1); inf when too large.

    Walked before anything is evaluated, so `10^{10^{10}}` or `(10^6)!` is refused
    instead of computed."""
    if expr.is_Integer or expr.is_Rational:
        return max(abs(int(expr.p)).bit_length(), int(expr.q).bit_length()) * 0.30103
    if expr.is_Float:
        value = abs(float(expr))
        return abs(math.log10(value)) if value and math.isfinite(value) else 0.0
    if expr.is_Atom:
        return 0.5
    args = [_digits_bound(a) for a in expr.args]
    if any(math.isinf(a) for a in args):
        return math.inf
    if expr.is_Pow:
        base, exponent = expr.args
        if exponent.is_Rational:
            power = abs(float(exponent))
        elif args[1] <= 6:
            power = 10 ** args[1]
        else:
            return math.inf
        return max(args[0], 0.5) * power
    if isinstance(expr, (sympy.factorial, sympy.binomial, sympy.factorial2)):
        n = expr.args[0]
        n_max = abs(int(n)) if n.is_Integer else (10 ** args[0] if args[0] <= 6 else math.inf)
        return n_max * math.log10(max(n_max, 2))
    if expr.is_Mul:
        return sum(args)
    return max(args) + math.log10(len(args) + 1)


def _constants_and_products(expr: sympy.Expr, product_names: set[str]) -> sympy.Expr:
    """`pi`, `e`, `i` symbols become constants; `k(n+1)`, parsed as an undefined function
    `k` applied to `n+1`, becomes the product `k*(n+1)` when `k` is also a plain symbol."""
    replace = {s: _CONSTANTS[s.name] for s in expr.free_symbols if s.name in _CONSTANTS}
    if replace:
        expr = expr.xreplace(replace)
    for call in list(expr.atoms(AppliedUndef)):
        name = call.func.__name__
        if len(call.args) == 1 and name in product_names:
            expr = expr.xreplace({call: sympy.Symbol(name) * call.args[0]})
    return expr


@functools.lru_cache(maxsize=4096)  # golds repeat across a group; ANTLR parsing is slow
def to_sympy(latex: str) -> sympy.Expr | None:
    """A sympy expression for `latex`, or None when it is unparseable or refused as unsafe."""
    if not latex or len(latex) > MAX_LATEX_CHARS or brace_depth(latex) > MAX_BRACE_DEPTH:
        return None
    if _REFUSED_LATEX.search(latex):
        return None
    try:
        expr = parse_latex(latex, strict=True)  # strict: refuse a parse that stops early
    except Exception:  # LaTeXParsingError, antlr errors, RecursionError on odd input
        return None
    if not isinstance(expr, sympy.Expr):
        return None
    nodes = 0
    for node in sympy.preorder_traversal(expr):
        nodes += 1
        if nodes > MAX_NODES or isinstance(node, _REFUSED_NODES):
            return None
    if _digits_bound(expr) > MAX_DIGITS:
        return None
    return expr


def prepare_pair(a: sympy.Expr, b: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """Apply the symbol fix-ups to both sides with a shared view of their symbol names."""
    names = {s.name for s in a.free_symbols | b.free_symbols}
    return _constants_and_products(a, names), _constants_and_products(b, names)


def _value(expr: sympy.Expr, subs: dict, digits: int) -> sympy.Expr | None:
    """`expr` evaluated to `digits` significant digits; None unless a finite number."""
    try:
        value = expr.evalf(digits, subs=subs)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError):
        return None
    if not value.is_number or value.has(sympy.nan, sympy.zoo, sympy.oo, -sympy.oo):
        return None
    return value


def _close(x: sympy.Expr, y: sympy.Expr, digits: int, approx: bool) -> bool:
    """Decimals on either side: relative 1e-4. Exact answers: equal to within the working
    precision, which is sized to the magnitude, so `100!/2^50 + 1` differs from `100!/2^50`."""
    rel = APPROX_TOL if approx else 10.0 ** -(digits - 10)
    try:
        diff = abs(x - y).evalf(digits)
        scale = max(abs(x).evalf(digits), abs(y).evalf(digits))
        return bool(diff <= rel * scale + (1e-12 if approx else 1e-20))
    except TypeError:  # non-real comparison: not a finite number after all
        return False


def _sample_points(symbols: list[sympy.Symbol]) -> list[dict]:
    return [
        {s: sympy.Float(_SAMPLES[(i + k) % len(_SAMPLES)] + 0.1 * k) for i, s in enumerate(symbols)}
        for k in range(3 if symbols else 1)
    ]


def _working_digits(*exprs: sympy.Expr) -> int:
    return 30 + int(max(_digits_bound(e) for e in exprs))


def expr_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Whether two parsed answers are the same value (or the same function of the same
    variables): numeric agreement at sample points, else `simplify(a - b) == 0`."""
    if a == b:
        return True
    if a.free_symbols != b.free_symbols:
        return False
    symbols = sorted(a.free_symbols, key=lambda s: s.name)
    approx = a.has(sympy.Float) or b.has(sympy.Float)
    digits = _working_digits(a, b)
    agree = 0
    for subs in _sample_points(symbols):
        va, vb = _value(a, subs, digits), _value(b, subs, digits)
        if va is None or vb is None:
            continue
        if not _close(va, vb, digits, approx):
            return False
        agree += 1
    if agree >= (2 if symbols else 1):
        return True
    try:
        return bool(sympy.simplify(a - b) == 0)
    except Exception:  # sympy raises many types on exotic input
        return False


def equation_equal(
    lhs_a: sympy.Expr, rhs_a: sympy.Expr, lhs_b: sympy.Expr, rhs_b: sympy.Expr
) -> bool:
    """`a1 = a2` and `b1 = b2` describe the same relation: (a1 - a2) is a constant nonzero
    multiple of (b1 - b2) (covers side swaps and scaling such as `2x + 2y = 2`)."""
    da, db = lhs_a - rhs_a, lhs_b - rhs_b
    if da.free_symbols != db.free_symbols or not da.free_symbols:
        return False
    symbols = sorted(da.free_symbols, key=lambda s: s.name)
    approx = da.has(sympy.Float) or db.has(sympy.Float)
    digits = _working_digits(da, db)
    ratios = []
    for subs in _sample_points(symbols):
        va, vb = _value(da, subs, digits), _value(db, subs, digits)
        if va is None or vb is None or vb == 0:
            continue
        ratios.append((va / vb).evalf(digits))
    if len(ratios) < 2 or ratios[0] == 0:
        return False
    return all(_close(r, ratios[0], digits, approx) for r in ratios[1:])
