"""A reward for the recipe's crash test: every check takes a while (so that a worker can be
killed mid-check) and scores 1. A plain module so that spawned reward workers import it."""

from __future__ import annotations

import time

CHECK_S = 0.1


def slow_full_reward(response: str, gold: str) -> float:
    time.sleep(CHECK_S)
    return 1.0
