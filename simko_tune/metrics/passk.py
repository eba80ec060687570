"""Unbiased pass@K (Chen et al. 2021), mean@n and maj@n for one problem's n samples.

pass@K is the probability that at least one of K samples drawn without replacement from
the n generated ones is correct: ``1 - C(n-c, K) / C(n, K)``. Taking the best of the
first K samples instead (best@K) is biased: this module never does that.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct.

    ``C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k/i)``; summing ``log1p(-k/i)`` and
    taking ``-expm1`` keeps full relative precision at both ends (tiny pass@1 and values
    near 1) without the huge binomials, for any n.
    """
    if n < 1:
        raise ValueError(f"need at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"number correct c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}]")
    if n - c < k:
        return 1.0
    log_all_wrong = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_all_wrong)


def pass_at_k_curve(n: int, c: int, ks: Iterable[int]) -> dict[int, float]:
    """pass@k for every k in ``ks``."""
    return {k: pass_at_k(n, c, k) for k in ks}


def powers_of_two_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n: the K axis the paper reports."""
    return [1 << i for i in range(n.bit_length()) if 1 << i <= n]


def mean_at_n(rewards: Sequence[float]) -> float:
    """Mean reward over one problem's samples (mean@n; its expectation is pass@1)."""
    if not rewards:
        raise ValueError("mean@n needs at least one sample")
    return math.fsum(rewards) / len(rewards)


def maj_at_n(answers: Sequence[str | None], rewards: Sequence[float]) -> float:
    """Majority vote over one problem's samples: 1.0 if the most frequent extracted answer
    is a correct one, else 0.0. Samples with no answer (None) do not vote; answers are
    grouped by their exact (stripped) text; a tie goes to the answer seen first.
    """
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    votes: Counter[str] = Counter()
    reward_of: dict[str, float] = {}
    for answer, reward in zip(answers, rewards):
        if answer is None:
            continue
        key = answer.strip()
        votes[key] += 1
        reward_of.setdefault(key, reward)
    if not votes:
        return 0.0
    majority, _ = votes.most_common(1)[0]
    return 1.0 if reward_of[majority] == 1 else 0.0
