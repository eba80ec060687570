"""Benchmark the math verifier in both reward modes (``boxed``, ``math_verify``).

Reports, for each mode (agreement with the labelled tables is a test's job:
tests/rewards/test_reward_modes.py):
- recall on gold variants (each benchmark gold restated as models restate it: boxed in a
  sentence, `\\dfrac`, changed spacing; for ``math_verify`` also unboxed after "The final
  answer is") and wrong answers judged right (gold + 1), with hostile answers (code,
  exponent towers, deep nesting, 1 MB) mixed in;
- throughput of `RewardPool` (2 workers) against a single process over the same pairs
  (``boxed`` mode; the single process relies on Math-Verify's own soft time limits, as TRL
  does: Math-Verify's SIGALRM would cancel any outer timer of ours).

Prints figures and failures, then ONE JSON line.

    python tools/bench_verifier.py [--limit 60] [--timeout-s 5]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from simko_tune.data import load_benchmark
from simko_tune.rewards import RewardPool, reward_fn_for_mode

MODES = ("boxed", "math_verify")
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


def true_variants(gold: str, mode: str) -> list[str]:
    """Responses whose final answer is `gold`, spelled as models spell it."""
    spaced = re.sub(r"\s*([+=,])\s*", r" \1 ", gold).replace(" ", "  ")
    dfrac = gold.replace("\\frac", "\\dfrac")
    variants = [
        f"So the answer is $\\boxed{{{gold}}}$.",
        f"Therefore \\boxed{{{dfrac}}}",
        f"\\boxed{{{spaced}}}",
    ]
    if mode == "math_verify":
        variants.append(f"The final answer is ${gold}$.")
    return variants


def wrong_variant(gold: str) -> str:
    if re.fullmatch(r"-?\d+", gold):
        return f"\\boxed{{{int(gold) + 1}}}"
    return f"\\boxed{{{gold}+1}}"


def build_pairs(limit: int | None, mode: str) -> list[tuple[str, str, str]]:
    """(kind, response, gold) with kind in {"true", "wrong", "hostile"}."""
    pairs = []
    for name in BENCHMARKS:
        for i, problem in enumerate(load_benchmark(name, limit=limit)):
            gold = problem.answer
            pairs += [("true", r, gold) for r in true_variants(gold, mode)]
            if i % 5 == 0:
                pairs.append(("wrong", wrong_variant(gold), gold))
            if i % 50 == 0:
                pairs += [("hostile", f"Answer: \\boxed{{{h}}}", gold) for h in HOSTILE]
                pairs += [("hostile", f"The answer is {h}", gold) for h in HOSTILE]
    return pairs


def single_process(pairs, mode: str) -> tuple[list[float], float]:
    reward_fn = reward_fn_for_mode(mode)
    start = time.perf_counter()
    scores = [reward_fn(response, gold) for _, response, gold in pairs]
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=60, help="problems per benchmark")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()

    result: dict[str, object] = {"bench": "verifier", "limit": args.limit, "pool_workers": 2}
    for mode in MODES:
        pairs = build_pairs(args.limit, mode)
        counts = {k: sum(1 for p in pairs if p[0] == k) for k in ("true", "wrong", "hostile")}
        print(f"[{mode}] {len(pairs)} pairs: {counts}")
        responses, golds = [p[1] for p in pairs], [p[2] for p in pairs]
        start = time.perf_counter()
        with RewardPool(num_workers=2, timeout_s=args.timeout_s, mode=mode) as pool:
            pool.score(["\\boxed{1}"] * 2, ["1"] * 2)
            startup_s = time.perf_counter() - start
            start = time.perf_counter()
            scores = pool.score(responses, golds)
            pool_s = time.perf_counter() - start
            stats = pool.stats

        def rate(kind: str, scores=scores, pairs=pairs) -> float:
            got = [s for (k, *_), s in zip(pairs, scores) if k == kind]
            return sum(got) / max(len(got), 1)

        misses = [(g, r) for (k, r, g), s in zip(pairs, scores) if k == "true" and s != 1.0]
        false_pos = [(g, r) for (k, r, g), s in zip(pairs, scores) if k == "wrong" and s != 0.0]
        hostile_right = sum(1 for (k, *_), s in zip(pairs, scores) if k == "hostile" and s)
        print(
            f"[{mode}] recall on true variants {rate('true'):.4f}; wrong judged right "
            f"{len(false_pos)}; hostile judged right {hostile_right}; pool stats {stats}"
        )
        for gold, response in misses[:40]:
            print(f"  miss: gold={gold!r:.80}  response={response!r:.100}")
        for gold, response in false_pos[:20]:
            print(f"  wrong judged right: gold={gold!r:.80}  response={response!r:.100}")
        result[mode] = {
            "pairs": len(pairs),
            "recall_true_variants": round(rate("true"), 4),
            "recall_failures": len(misses),
            "wrong_judged_right": len(false_pos),
            "hostile_judged_right": hostile_right,
            "pool_checks_per_s": round(len(pairs) / pool_s, 1),
            "pool_startup_s": round(startup_s, 2),
            "pool_timeouts": stats.timeouts,
            "pool_crashes": stats.crashes,
        }
        if mode == "boxed":
            single_scores, single_s = single_process(pairs, mode)
            disagreements = sum(a != b for a, b in zip(scores, single_scores))
            print(
                f"[{mode}] pool (2 workers) {len(pairs) / pool_s:.1f} checks/s ({pool_s:.1f} s); "
                f"single process {len(pairs) / single_s:.1f} checks/s ({single_s:.1f} s); "
                f"disagreements {disagreements}"
            )
            result["single_checks_per_s"] = round(len(pairs) / single_s, 1)
            result["pool_vs_single"] = round(single_s / pool_s, 2)
            result["pool_single_disagreements"] = disagreements
    print(json.dumps(result))


if __name__ == "__main__":
    main()
