"""Reward functions for the pool tests. A plain module (not a test file) so that spawned
workers can import it by name once the test puts this folder on sys.path."""

from __future__ import annotations

import os
import time

from simko_tune.rewards import answers_match, math_reward


def scripted_reward(response: str, gold: str) -> float:
    """Misbehaves on command: "sleep" hangs, "crash" kills the worker, "raise" raises,
    "hog" allocates 4 GiB, "pid" returns the worker's pid; anything else is math_reward."""
    if response == "sleep":
        time.sleep(60)
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise ValueError("scripted failure")
    if response == "hog":
        blob = bytearray(4 * 2**30)
        return float(len(blob) > 0)
    if response == "pid":
        return float(os.getpid())
    return math_reward(response, gold)


def prediction_reward(pred: str, gold: str) -> float:
    """The grader alone, for feeding raw predictions (no extraction)."""
    return float(answers_match(pred, gold))
