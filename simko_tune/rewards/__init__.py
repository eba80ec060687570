"""Verifiable rewards: answer extraction, math equivalence (Math-Verify plus the rules our
labelled cases need), and a sandboxed scoring pool."""

from simko_tune.rewards.extract import extract_answer, extract_gsm8k_gold
from simko_tune.rewards.grader import (
    REWARD_MODES,
    answers_match,
    extract_for_mode,
    math_reward,
    math_verify_reward,
    reward_fn_for_mode,
)
from simko_tune.rewards.pool import RewardPool, RewardPoolStats

__all__ = [
    "REWARD_MODES",
    "RewardPool",
    "RewardPoolStats",
    "answers_match",
    "extract_answer",
    "extract_for_mode",
    "extract_gsm8k_gold",
    "math_reward",
    "math_verify_reward",
    "reward_fn_for_mode",
]
