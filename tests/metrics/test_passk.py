"""pass@k against brute-force enumeration and exact rational arithmetic; maj@n against a
hand-rolled vote count."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from simko_tune.metrics import maj_at_n, mean_at_n, pass_at_k, pass_at_k_curve, powers_of_two_up_to


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of the n samples that hold at least one correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(1 for s in subsets if any(samples[i] for i in s)) / len(subsets)


@pytest.mark.parametrize("n", range(1, 10))
def test_matches_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0  # k = n: any correct sample is drawn
    assert pass_at_k(10, 3, 8) == 1.0  # c >= n - k + 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, rel=1e-15)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


@pytest.mark.parametrize("n, c, k", [(10, 1, 11), (10, 11, 1), (10, -1, 1), (10, 1, 0), (0, 0, 1)])
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_large_n_matches_exact_binomials():
    n = 1024
    for c in (0, 1, 2, 5, 37, 300, 700, 1000, 1023, 1024):
        for k in (1, 2, 4, 16, 64, 256, 512, 1000, 1024):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            value = pass_at_k(n, c, k)
            assert math.isfinite(value)
            assert value == pytest.approx(float(exact), rel=1e-12, abs=1e-300), (c, k)


def test_curve_is_monotone_and_keyed_by_k():
    curve = pass_at_k_curve(256, 3, powers_of_two_up_to(256))
    assert list(curve) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    values = list(curve.values())
    assert values == sorted(values) and values[0] == pytest.approx(3 / 256) and values[-1] == 1.0
    assert powers_of_two_up_to(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert powers_of_two_up_to(1) == [1]


def test_mean_at_n():
    assert mean_at_n([1, 0, 0, 1, 1]) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        mean_at_n([])


def reference_majority(answers, rewards) -> float:
    """Count votes by hand; ties go to the answer that appeared first."""
    counts = Counter(a.strip() for a in answers if a is not None)
    if not counts:
        return 0.0
    best = max(counts.values())
    for answer, reward in zip(answers, rewards):
        if answer is not None and counts[answer.strip()] == best:
            return float(reward)
    raise AssertionError("unreachable")


def test_maj_at_n_matches_counter_reference():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 12)
        gold = rng.choice("abc")
        answers = [rng.choice(["a", "b", "c", " a", None]) for _ in range(n)]
        rewards = [1 if a is not None and a.strip() == gold else 0 for a in answers]
        assert maj_at_n(answers, rewards) == reference_majority(answers, rewards), (answers, gold)


def test_maj_at_n_cases():
    assert maj_at_n(["1", "2", "2"], [1, 0, 0]) == 0.0
    assert maj_at_n(["1", "1", "2"], [1, 1, 0]) == 1.0
    assert maj_at_n([None, None, "2"], [0, 0, 1]) == 1.0  # no-answer samples do not vote
    assert maj_at_n([None, None], [0, 0]) == 0.0
    with pytest.raises(ValueError):
        maj_at_n(["1"], [1, 0])
