"""Countdown: solver, parser and reward against plain references, hostile inputs, generator."""

from __future__ import annotations

import ast
import itertools
import pickle
import random
import time
from fractions import Fraction

import pytest

from simko_tune.demo.countdown import (
    MAX_PAREN_DEPTH,
    SPLITS,
    CountdownSpec,
    ExpressionError,
    countdown_reward,
    evaluate,
    format_gold,
    load_countdown,
    make_countdown_problems,
    parse_gold,
    problem_split,
    problem_universe,
    solve,
)

# --------------------------------------------------------------------------------------------
# Independent references: Python's own parser (ast, never eval) walked with Fractions.

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def ref_eval(text: str) -> tuple[Fraction, list[int]] | None:
    """Value and numbers of an expression of non-negative integer literals < 1000 and binary
    + - * /; None if it is anything else. Raises ZeroDivisionError."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None
    numbers: list[int] = []

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left = walk(node.left)
            right = walk(node.right)
            if left is None or right is None:
                return None
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value < 1000:
            numbers.append(node.value)
            return Fraction(node.value)
        return None

    value = walk(tree.body)
    return None if value is None else (value, numbers)


def brute_force_solutions(numbers: list[int], target: int) -> set[str]:
    """Every fully parenthesised expression over every order of ``numbers``, filtered by the
    reference value, written with minimal parentheses by ``ast.unparse``."""

    def exprs(nums):
        if len(nums) == 1:
            yield str(nums[0])
            return
        for k in range(1, len(nums)):
            for a in exprs(nums[:k]):
                for b in exprs(nums[k:]):
                    for op in "+-*/":
                        yield f"({a}{op}{b})"

    found = set()
    for perm in itertools.permutations(numbers):
        for e in exprs(list(perm)):
            try:
                value, _ = ref_eval(e)
            except ZeroDivisionError:
                continue
            if value == target:
                found.add(ast.unparse(ast.parse(e, mode="eval")).replace(" ", ""))
    return found


# --------------------------------------------------------------------------------------------
# Solver


@pytest.mark.parametrize(
    "numbers,target",
    [
        ([3, 5, 7], 22),
        ([1, 1, 1], 3),
        ([2, 2, 8], 2),
        ([4, 6, 9], 15),
        ([5, 5, 7], 1),
        ([1, 3, 4, 6], 24),
    ],
)
def test_solver_matches_brute_force(numbers, target):
    sols = solve(numbers, target)
    assert len(sols) == len(set(sols))
    assert set(sols) == brute_force_solutions(numbers, target)
    for s in sols:
        value, used = ref_eval(s)
        assert value == target and sorted(used) == sorted(numbers)


def test_solver_reachable_targets_match_brute_force():
    rng = random.Random(0)
    for _ in range(5):
        numbers = [rng.randint(1, 9) for _ in range(3)]
        for target in range(0, 30):
            assert bool(solve(numbers, target)) == bool(brute_force_solutions(numbers, target))


def test_solver_known_cases():
    assert "3*5+7" in solve([3, 5, 7], 22)
    assert "7+3*5" in solve([3, 5, 7], 22)
    assert "(3+5)*7" in solve([3, 5, 7], 56)
    assert solve([1, 1, 1], 100) == []
    # 1,3,4,6 → 24 only as 6/(1-3/4): fractions in between are allowed
    assert solve([1, 3, 4, 6], 24) == ["6/(1-3/4)"]


# --------------------------------------------------------------------------------------------
# Parser


def _random_expression(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return str(rng.randint(0, 20))
    a = _random_expression(rng, depth - 1)
    b = _random_expression(rng, depth - 1)
    text = f"{a}{rng.choice('+-*/')}{b}"
    return f"({text})" if rng.random() < 0.5 else text


def test_parser_matches_reference_on_valid_expressions():
    rng = random.Random(1)
    checked = 0
    for _ in range(2000):
        text = _random_expression(rng, 3)
        if len(text) > 64:
            continue
        try:
            expected = ref_eval(text)
        except ZeroDivisionError:
            with pytest.raises(ZeroDivisionError):
                evaluate(text)
            continue
        assert evaluate(text) == expected, text
        checked += 1
    assert checked > 1000


def test_parser_matches_reference_on_random_strings():
    """Random strings over the expression alphabet: accepted exactly when the reference
    accepts, with the same value. (No '0' so that Python's '00' literal cannot differ.)"""
    rng = random.Random(2)
    alphabet = "123456789+-*/() "
    accepted = 0
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        try:
            expected = ref_eval(text)
        except ZeroDivisionError:
            expected = "zero"
        try:
            got = evaluate(text)
        except ExpressionError:
            got = None
        except ZeroDivisionError:
            got = "zero"
        # Python accepts unary +/- and these operators are rejected by our grammar
        if expected is None or got is not None:
            assert got == expected, text
        else:
            assert "+" in text or "-" in text, text
            assert _has_unary(text), text
        accepted += got not in (None, "zero")
    assert accepted > 500


def _has_unary(text: str) -> bool:
    tree = ast.parse(text.strip(), mode="eval")
    return any(isinstance(n, ast.UnaryOp) for n in ast.walk(tree))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3 5",
        "3+",
        "(3+5",
        "3+5)",
        "-3+5",
        "3**5",
        "3//5",
        "3(5)",
        "0x10",
        "007",
        "1.5",
        "1e3",
        "3%5",
    ],
)
def test_parser_rejects(text):
    with pytest.raises(ExpressionError):
        evaluate(text)


# --------------------------------------------------------------------------------------------
# Reward

REWARD_TABLE = [
    # (response, gold, reward)
    ("3*5+7", "3,5,7=22", 1.0),
    ("7+3*5", "3,5,7=22", 1.0),
    ("5*3+7", "3,5,7=22", 1.0),
    ("(3*5)+7", "3,5,7=22", 1.0),
    ("((3*5)+7)", "3,5,7=22", 1.0),
    (" 3 * 5 + 7 ", "3,5,7=22", 1.0),
    ("3*5+7\n", "3,5,7=22", 1.0),
    ("3*5+7<|im_end|>", "3,5,7=22", 1.0),
    ("3*(5+7)", "3,5,7=22", 0.0),  # 36
    ("3*5+7=22", "3,5,7=22", 0.0),  # answer is the expression only
    ("22", "3,5,7=22", 0.0),  # must use the numbers
    ("3*5+7+0", "3,5,7=22", 0.0),  # extra number
    ("15+7", "3,5,7=22", 0.0),  # 15 is not given
    ("3*5+7*1", "3,5,7=22", 0.0),
    ("3*5", "3,5,7=15", 0.0),  # every number must be used
    ("3*5+7-7", "3,5,7=15", 0.0),  # 7 used twice
    ("5*3*7/7", "3,5,7=15", 0.0),
    ("(5+3)*7", "3,5,7=56", 1.0),
    ("5+3*7", "3,5,7=56", 0.0),  # precedence: 26
    ("7*(3+5)", "3,5,7=56", 1.0),
    ("7-5-3", "3,5,7=1", 0.0),  # -1
    ("7-(5-3)", "3,5,7=5", 1.0),
    ("7-5+3", "3,5,7=5", 1.0),
    ("7/(5-5)", "5,5,7=1", 0.0),  # division by zero
    ("(7-5)/(5-5)", "5,5,7,7=1", 0.0),
    ("5/5*7", "5,5,7=7", 1.0),
    ("7/5*5", "5,5,7=7", 1.0),  # fractions in between are exact
    ("6/(1-3/4)", "1,3,4,6=24", 1.0),
    ("6/(1-0.75)", "1,3,4,6=24", 0.0),
    ("6/(1-3/4)", "1,3,4,6=23", 0.0),
    ("8/2/2", "2,2,8=2", 1.0),
    ("8/(2/2)", "2,2,8=8", 1.0),
    ("8/2/2", "2,2,8=8", 0.0),
    ("-3+5*7", "3,5,7=32", 0.0),  # no unary minus
    ("3×5+7", "3,5,7=22", 0.0),
    ("3*5+7 3", "3,5,7=22", 0.0),
    ("", "3,5,7=22", 0.0),
    ("Answer: 3*5+7", "3,5,7=22", 0.0),
    ("1+1+1", "1,1,1=3", 1.0),
    ("1+(1+1)", "1,1,1=3", 1.0),
    ("11+1", "1,1,1=12", 0.0),  # digits do not concatenate
    ("٣*٥+٧", "3,5,7=22", 0.0),  # non-ASCII digits
    ("03*5+7", "3,5,7=22", 0.0),
    ("3*5+7;", "3,5,7=22", 0.0),
]


@pytest.mark.parametrize("response,gold,expected", REWARD_TABLE)
def test_reward_table(response, gold, expected):
    assert countdown_reward(response, gold) == expected


def test_reward_agrees_with_reference_on_all_candidates():
    """Every expression over 2,3,8 (any order and shape) scored against every target in
    -5..30 agrees with a reference computed from Python's parser."""
    numbers = [2, 3, 8]
    candidates = set()
    for perm in itertools.permutations(numbers):
        for o1, o2 in itertools.product("+-*/", repeat=2):
            a, b, c = perm
            candidates |= {f"{a}{o1}{b}{o2}{c}", f"({a}{o1}{b}){o2}{c}", f"{a}{o1}({b}{o2}{c})"}
    for target in range(0, 31):
        for expr in candidates:
            try:
                value, used = ref_eval(expr)
                expected = float(value == target and sorted(used) == numbers)
            except ZeroDivisionError:
                expected = 0.0
            assert countdown_reward(expr, f"2,3,8={target}") == expected, (expr, target)


HOSTILE = [
    "__import__('os').system('true')",
    "9**9**9",
    "9" * 1_000_000,
    "(" * 100_000 + "3" + ")" * 100_000,
    "(" * (MAX_PAREN_DEPTH + 1) + "3*5+7" + ")" * (MAX_PAREN_DEPTH + 1),  # short, too deep
    "1" + "*1" * 1_000_000,
    "3*5+7\x00",
    "1e9999",
    "\n" * 1_000_000 + "3*5",
    "3*5+7" + " " * 1_000_000 + "1",
]


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_score_zero_quickly(response):
    start = time.perf_counter()
    assert countdown_reward(response, "3,5,7=22") == 0.0
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    "response", ["(" * 3 + "3*5+7" + ")" * 3, "\n" * 1_000_000 + "3*5+7", "3*5+7" + " " * 1_000_000]
)
def test_long_but_correct_answers_score_one_quickly(response):
    """Surrounding whitespace is not part of the answer; moderate nesting is allowed."""
    start = time.perf_counter()
    assert countdown_reward(response, "3,5,7=22") == 1.0
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("gold", ["3,5,7", "3 5 7=22", "=22", "3,5,x=2", "", "3=3"])
def test_malformed_gold_raises(gold):
    with pytest.raises(ValueError, match="gold"):
        countdown_reward("3*5+7", gold)


def test_reward_fn_is_picklable():
    fn = pickle.loads(pickle.dumps(countdown_reward))
    assert fn("3*5+7", "3,5,7=22") == 1.0


# --------------------------------------------------------------------------------------------
# Generator


def test_generator_is_deterministic_by_seed():
    a = make_countdown_problems(50, seed=3)
    assert a == make_countdown_problems(50, seed=3)
    assert a != make_countdown_problems(50, seed=4)
    assert load_countdown("train", 50, 3) == a
    assert make_countdown_problems(20, seed=3) == a[:20]  # smaller n: a prefix


def test_generated_problems_are_valid_distinct_and_split():
    spec = CountdownSpec()
    train = make_countdown_problems(400, seed=0, split="train")
    val = make_countdown_problems(100, seed=0, split="val")
    test = make_countdown_problems(100, seed=0, split="test")
    keys = {}
    for split, problems in (("train", train), ("val", val), ("test", test)):
        assert len({p.id for p in problems}) == len(problems)
        for p in problems:
            numbers, target = parse_gold(p.answer)
            assert p.source == "countdown" and p.id == f"countdown:{p.answer}"
            assert p.problem == f"Numbers: {' '.join(map(str, numbers))}. Target: {target}.\n"
            assert len(numbers) == spec.num_count and all(
                1 <= n <= spec.max_number for n in numbers
            )
            assert 1 <= target <= spec.max_target
            assert len(solve(numbers, target)) >= spec.min_solutions
            assert problem_split(numbers, target, spec.test_fraction, spec.val_fraction) == split
            keys[format_gold(sorted(numbers), target)] = split
    assert len(keys) == 600  # no problem is in two splits


def test_splits_partition_the_universe():
    """Train, val and test are disjoint and cover every problem; n=None takes a whole split;
    the test split is the one it was before the validation split existed (same hash)."""
    universe = problem_universe(CountdownSpec())
    sizes = {s: len(make_countdown_problems(None, seed=0, split=s)) for s in SPLITS}
    assert sum(sizes.values()) == len(universe) == 1716
    assert sizes == {"train": 1358, "val": 193, "test": 165}
    assert [k for k in universe if problem_split(*k, 0.1, 0.1) == "test"] == [
        k for k in universe if problem_split(*k, 0.1) == "test"
    ]


def test_universe_matches_brute_force():
    """Every (multiset, target) pair reachable in >= 2 ways is in the universe, and only those."""
    spec = CountdownSpec(max_number=4, max_target=12)
    expected = set()
    for numbers in itertools.combinations_with_replacement(range(1, 5), 3):
        for target in range(1, 13):
            if len(brute_force_solutions(list(numbers), target)) >= 2:
                expected.add((numbers, target))
    assert set(problem_universe(spec)) == expected


def test_generator_reports_an_exhausted_split():
    test_size = len(
        [k for k in problem_universe(CountdownSpec()) if problem_split(*k, 0.1, 0.1) == "test"]
    )
    assert len(make_countdown_problems(test_size, seed=0, split="test")) == test_size
    with pytest.raises(ValueError, match="test split holds"):
        make_countdown_problems(test_size + 1, seed=0, split="test")
    with pytest.raises(ValueError, match="split must be"):
        make_countdown_problems(5, seed=0, split="validation")
