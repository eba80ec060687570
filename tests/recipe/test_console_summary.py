"""What the recipe prints: each step's policy shape (all tokens and gated tokens) and, at the
end, each evaluation set's pass@K first → last."""

from __future__ import annotations

import simko_recipe


def _shape(kind: str, base: float) -> dict[str, float]:
    return {
        f"policy/logprob_rank1_{kind}": base,
        f"policy/logprob_rank2_{kind}": base - 1,
        f"policy/entropy_{kind}": -base,
        f"policy/mass_rank2_to_k_{kind}": 0.25,
    }


def test_step_line_shows_all_and_gated_tokens_apart():
    stats = {
        "reward/mean": 0.5, "loss": 0.01, "response/len_mean": 6.0,
        **_shape("all", -0.1), **_shape("gated", -0.7),
    }  # fmt: skip
    line = simko_recipe._step_line(3, stats, 0.5)
    all_part, gated_part = line.split("| all: ")[1].split(" | gated: ")
    assert all_part.startswith("Λ1 -0.100 Λ2 -1.10 H 0.100 m2..K 0.250")
    assert gated_part.startswith("Λ1 -0.700 Λ2 -1.70 H 0.700 m2..K 0.250")
    assert line.startswith("step     3 reward 0.500")


def test_eval_summary_is_first_to_last_per_set():
    history = {
        "countdown_test": {
            0: {1: 0.19, 256: 0.99},
            40: {1: 0.25, 256: 0.98},
            80: {1: 0.30, 256: 0.97},
        },
        "only_once": {80: {1: 0.5}},  # a single evaluation has nothing to compare
    }
    assert simko_recipe._eval_summary(history) == [
        "eval countdown_test, step 0 → 80: pass@1 0.190 → 0.300, pass@256 0.990 → 0.970"
    ]
