"""A trainer stand-in for the group-signal test: it handles the preemption signals as the
recipe does (:class:`PreemptionWatch`), scores correct answers in a real RewardPool, and
prints the scores and the pool's counters as JSON. The test runs it in a session of its own
and signals that whole process group, as SLURM's ``--signal`` and ``scancel`` do.

Each check sleeps first (``SLOW_S``), so that signals reach the workers mid-check."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from simko_tune.preemption import PreemptionWatch
from simko_tune.rewards import RewardPool, math_reward

SLOW_S = 0.25


def slow_reward(response: str, gold: str) -> float:
    time.sleep(SLOW_S)
    return math_reward(response, gold)


def main(n: int) -> None:
    watch = PreemptionWatch(["SIGTERM", "SIGUSR1"])
    with RewardPool(num_workers=2, timeout_s=30.0, reward_fn=slow_reward) as pool:
        pool.score(["\\boxed{1}"], ["1"])  # the workers are up
        print("scoring", flush=True)  # the test signals the group from now on
        scores = pool.score([f"so \\boxed{{{i}}}" for i in range(n)], [str(i) for i in range(n)])
        print(json.dumps({"scores": scores, "stats": dataclasses.asdict(pool.stats),
                          "signal": watch.signal_name}), flush=True)  # fmt: skip
    watch.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
