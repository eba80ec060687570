"""Verifiable rewards: answer extraction, math equivalence, and a sandboxed scoring pool."""

from simko_tune.rewards.extract import extract_answer, extract_gsm8k_gold
from simko_tune.rewards.grader import answers_match, math_reward
from simko_tune.rewards.pool import RewardPool, RewardPoolStats

__all__ = [
    "RewardPool",
    "RewardPoolStats",
    "answers_match",
    "extract_answer",
    "extract_gsm8k_gold",
    "math_reward",
]
