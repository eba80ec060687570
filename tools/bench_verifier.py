"""Benchmark the math verifier: checks per second of `RewardPool` (2 workers) against a
single-process loop over the same (response, gold) pairs, and the verifier's recall.

Pairs are built from the gold answers of the paper's evaluation benchmarks plus GSM8K:
each gold is restated the ways models restate it (boxed in a sentence, `$...$` after "The
final answer is", `\\dfrac`, changed spacing), some golds get a wrong answer (gold + 1), and
hostile predictions (code, exponent towers, division by zero, deep nesting, 1 MB) are mixed
in. The single-process baseline guards every check with `signal.setitimer`, as the pool
guards it with its wall clock, so both run exactly the same checks.

Prints figures, the true variants judged wrong (recall failures) and the wrong answers
judged right, then ONE JSON line.

    python tools/bench_verifier.py [--limit N] [--timeout-s 5]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import time

from simko_tune.data import load_benchmark
from simko_tune.rewards import RewardPool, math_reward

BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k")
HOSTILE = [
    "__import__('os').system('touch X')",
    "9**9**9**9",
    "10^{10^{10^{10}}}",
    "\\frac{1}{0}",
    "{" * 100 + "1" + "}" * 100,
    "1" * (1 << 20),
    "(10^{6})!",
    "\\sum_{k=1}^{10^{9}} k",
]


def true_variants(gold: str) -> list[str]:
    """Responses whose final answer is `gold`, spelled as models spell it."""
    spaced = re.sub(r"\s*([+=,])\s*", r" \1 ", gold).replace(" ", "  ")
    dfrac = gold.replace("\\frac", "\\dfrac")
    return [
        f"So the answer is $\\boxed{{{gold}}}$.",
        f"The final answer is ${gold}$.",
        f"Therefore \\boxed{{{dfrac}}}",
        f"\\boxed{{{spaced}}}",
    ]


def wrong_variant(gold: str) -> str:
    if re.fullmatch(r"-?\d+", gold):
        return f"\\boxed{{{int(gold) + 1}}}"
    return f"\\boxed{{{gold}+1}}"


def build_pairs(limit: int | None) -> list[tuple[str, str, str]]:
    """(kind, response, gold) with kind in {"true", "wrong", "hostile"}."""
    pairs = []
    for name in BENCHMARKS:
        for i, problem in enumerate(load_benchmark(name, limit=limit)):
            gold = problem.answer
            pairs += [("true", r, gold) for r in true_variants(gold)]
            if i % 5 == 0:
                pairs.append(("wrong", wrong_variant(gold), gold))
            if i % 50 == 0:
                pairs += [("hostile", f"Answer: \\boxed{{{h}}}", gold) for h in HOSTILE]
    return pairs


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Timeout


def single_process(pairs, timeout_s: float) -> tuple[list[float], float, int]:
    signal.signal(signal.SIGALRM, _alarm)
    scores, timeouts = [], 0
    start = time.perf_counter()
    for _, response, gold in pairs:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            scores.append(math_reward(response, gold))
        except _Timeout:
            scores.append(0.0)
            timeouts += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return scores, time.perf_counter() - start, timeouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="problems per benchmark")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()

    pairs = build_pairs(args.limit)
    responses, golds = [p[1] for p in pairs], [p[2] for p in pairs]
    counts = {k: sum(1 for p in pairs if p[0] == k) for k in ("true", "wrong", "hostile")}
    print(f"{len(pairs)} pairs: {counts}")

    start = time.perf_counter()
    with RewardPool(num_workers=2, timeout_s=args.timeout_s) as pool:
        pool.score(["\\boxed{1}"] * 2, ["1"] * 2)
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        pool_scores = pool.score(responses, golds)
        pool_s = time.perf_counter() - start
        stats = pool.stats
    single_scores, single_s, single_timeouts = single_process(pairs, args.timeout_s)

    def rate(kind: str, scores: list[float]) -> float:
        got = [s for (k, *_), s in zip(pairs, scores) if k == kind]
        return sum(got) / max(len(got), 1)

    misses = [(g, r) for (k, r, g), s in zip(pairs, pool_scores) if k == "true" and s != 1.0]
    false_pos = [(g, r) for (k, r, g), s in zip(pairs, pool_scores) if k == "wrong" and s != 0.0]
    disagreements = sum(a != b for a, b in zip(pool_scores, single_scores))
    print(
        f"pool (2 workers): {len(pairs) / pool_s:8.1f} checks/s  ({pool_s:.1f} s, startup {startup_s:.1f} s)"
    )
    print(f"single process:   {len(pairs) / single_s:8.1f} checks/s  ({single_s:.1f} s)")
    print(f"pool stats: {stats}")
    print(
        f"recall on true variants: {rate('true', pool_scores):.4f}; "
        f"wrong judged right: {rate('wrong', pool_scores):.4f}; "
        f"hostile judged right: {rate('hostile', pool_scores):.4f}; "
        f"pool/single disagreements: {disagreements}"
    )
    print(f"recall failures ({len(misses)}):")
    for gold, response in misses[:60]:
        print(f"  gold={gold!r:.80}  response={response!r:.100}")
    print(f"wrong answers judged right ({len(false_pos)}):")
    for gold, response in false_pos[:30]:
        print(f"  gold={gold!r:.80}  response={response!r:.100}")
    print(
        json.dumps(
            {
                "bench": "verifier",
                "pairs": len(pairs),
                "pool_workers": 2,
                "pool_checks_per_s": round(len(pairs) / pool_s, 1),
                "single_checks_per_s": round(len(pairs) / single_s, 1),
                "pool_vs_single": round(single_s / pool_s, 2),
                "pool_startup_s": round(startup_s, 2),
                "recall_true_variants": round(rate("true", pool_scores), 4),
                "recall_failures": len(misses),
                "wrong_judged_right": len(false_pos),
                "hostile_judged_right": int(rate("hostile", pool_scores) * counts["hostile"]),
                "pool_timeouts": stats.timeouts,
                "pool_crashes": stats.crashes,
                "single_timeouts": single_timeouts,
                "pool_single_disagreements": disagreements,
            }
        )
    )


if __name__ == "__main__":
    main()
